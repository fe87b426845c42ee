"""The ops of ACF: one module per op, each holding its public function, its pure-PyTorch reference and
the dispatch to the fast paths (``acf._C`` in ``csrc/``, Triton in ``kernels/``).

=================  ==========================================  =================================
op                 public function (reference)                 fast paths
=================  ==========================================  =================================
``l2_attention``   ``l2_attention`` (``l2_attention_reference``)  ``csrc/l2_attention_cpu.cpp``,
                                                               ``kernels/l2_attention.py``, SDPA
``power_iteration`` ``spectral_norms`` (``power_iteration``)   ``csrc/power_iteration.cpp``
``fixed_point``    ``fixed_point_solve``                       ``csrc/fixed_point.cpp``,
                   (``fixed_point_solve_reference``)           ``csrc/fixed_point_cuda.cu``
=================  ==========================================  =================================

``l2_attention_passes`` turns the fused backends of ``l2_attention`` into differentiable PyTorch ops
(three passes each). Every op takes ``backend=`` from one vocabulary (``acf.ops.backends``); ``acf.ops.info``
says what is active here (``acf info``). Import from the op's module
(``from acf.ops.l2_attention import l2_attention``; the package re-exports nothing, so that a module
and its function can share the op's name). Nothing here imports the layers, models or application
above it.
"""
