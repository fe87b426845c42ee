"""The ``l2_attention`` op: L2 self-attention with keys tied to queries.

For each batch element and head, with queries ``q`` (N x d) and values ``v`` (N x e)::

    P_ij = softmax_j( -scale * ||q_i - q_j||^2 )                      (paper eq. 9-10, Kim et al. 2021)
    out_i = sum_j P_ij v_j

Softmax is invariant to a per-row constant, so the logits equal ``scale * (2 q_i.q_j - ||q_j||^2)``:
dot-product attention with K = Q and a per-key bias. ``l2_attention_reference`` materialises P
and is the reference every fast backend is tested against. Fast paths: ``acf._C``'s fused CPU
kernels (``backend="extension"``, ``csrc/l2_attention_cpu.cpp``), the Triton kernels
(``backend="triton"``, ``kernels/l2_attention.py``, installed as ``acf.kernels.l2_attention``) and
SDPA on augmented vectors (``backend="sdpa"``, first order). Backend names: ``acf.ops.backends``.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _ext
from .._checks import check_real, check_tensor
from .backends import EXTENSION_DTYPES, TRITON_DTYPES, TRITON_MAX_HEAD_DIM, check_backend
from .l2_attention_passes import fused_l2_attention, register_autograd, register_vmap

Backend = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def l2_attention_reference(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Materialised L2 attention (eq. 9-10): ``softmax(-scale * ||q_i - q_j||^2) @ v``.

    Pure PyTorch, differentiable to any order. The squared norms are accumulated in at least
    float32 so that half-precision inputs do not lose the per-key bias.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    *lead, n, d = q.shape
    qa = q.to(acc).reshape(-1, n, d)
    sq = (qa * qa).sum(-1)  # ||q_j||^2, (B*H, N)
    # logits = scale * (2 q_i.q_j - ||q_j||^2) in one fused N x N pass (forward and backward)
    logits = torch.baddbmm((-scale * sq).unsqueeze(1), qa, qa.transpose(1, 2), alpha=2.0 * scale)
    p = torch.softmax(logits, dim=-1)
    out = torch.bmm(p, v.to(acc).reshape(-1, n, v.shape[-1]))
    return out.reshape(*lead, n, v.shape[-1]).to(v.dtype)


def _augment(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented vectors with ``qa_i . ka_j = 2 q_i.q_j - ||q_j||^2``: ``qa = [2q, 1]``,
    ``ka = [q, -||q||^2]``, zero-padded to a multiple of 8 (what fused SDPA kernels want).
    ``||q||^2`` is summed in at least fp32, then rounded to q's dtype (in bf16/fp16 that rounding
    perturbs the logits by up to ``scale * ||q||^2 * 2^-9``: a limit of this baseline)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    sq = q.to(acc).pow(2).sum(-1, keepdim=True).to(q.dtype)
    pad = (-(q.shape[-1] + 1)) % 8
    zeros = q.new_zeros(*q.shape[:-1], pad)
    qa = torch.cat([2.0 * q, torch.ones_like(sq), zeros], dim=-1)
    ka = torch.cat([q, -sq, zeros], dim=-1)
    return qa, ka


def _sdpa_graph(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    qa, ka = _augment(q)
    return torch.nn.functional.scaled_dot_product_attention(qa, ka, v, scale=scale)


class _SDPAFirstOrder(torch.autograd.Function):
    """SDPA on augmented vectors with a first-order backward only.

    The forward keeps SDPA's own (O(N) memory) graph on detached inputs; the backward runs it.
    Differentiating the backward again (``create_graph=True``) raises: PyTorch's fused SDPA
    backwards are not differentiable, and silently dropping the second-order term would be wrong.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        with torch.enable_grad():
            qd = q.detach().requires_grad_(ctx.needs_input_grad[0])
            vd = v.detach().requires_grad_(ctx.needs_input_grad[1])
            out = _sdpa_graph(qd, vd, scale)
        ctx.inner = (qd, vd, out)
        return out.detach()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "l2_attention backend 'sdpa' is first-order only: its backward cannot be "
                "differentiated (create_graph=True / double backward). Use backend='triton' "
                "(CUDA) or 'reference', or backend='auto' (which never picks 'sdpa')."
            )
        qd, vd, out = ctx.inner
        wanted = [t for t in (qd, vd) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, g, retain_graph=True))
        dq = next(grads) if qd.requires_grad else None
        dv = next(grads) if vd.requires_grad else None
        return dq, dv, None


def l2_attention_sdpa(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """L2 attention through ``scaled_dot_product_attention`` on augmented vectors (first order)."""
    if torch.is_grad_enabled() and (q.requires_grad or v.requires_grad):
        return _SDPAFirstOrder.apply(q, v, scale)
    return _sdpa_graph(q, v, scale)


# The fused backends, as PyTorch ops of three passes each (``acf.ops.l2_attention_passes``): acf._C's CPU
# kernels below, the Triton kernels in ``_triton_kernels``.


def _register_cpu_ops() -> None:
    """Fake kernels, autograd and vmap of ``acf._C``'s CPU ops (outputs take their input's layout)."""
    @torch.library.register_fake("acf::l2_attention_fwd")
    def _fwd(q, v, scale):
        return torch.empty_like(v), q.new_empty(q.shape[:-1])

    @torch.library.register_fake("acf::l2_attention_bwd")
    def _bwd(q, v, o, lse, g, scale):
        return torch.empty_like(q), torch.empty_like(v)

    @torch.library.register_fake("acf::l2_attention_bwd2")
    def _bwd2(q, v, o, lse, g, u, w, scale):
        return torch.empty_like(q), torch.empty_like(v), torch.empty_like(v)

    register_autograd("l2_attention")
    register_vmap("l2_attention")


def l2_attention_extension(q: Tensor, v: Tensor, scale: float) -> Tensor:
    """``acf._C``'s per-head CPU kernels (float32 / float64; ``torch.ops.acf.l2_attention_fwd``),
    differentiable twice. The layer's column-major heads reach the kernels as views."""
    loaded = cpu_kernels_available()
    if q.device.type != "cpu" or q.dtype not in EXTENSION_DTYPES or not loaded:
        raise ValueError(f"l2_attention backend 'extension' needs CPU float32/float64 tensors and the compiled "
                         f"extension acf._C (got {q.dtype} on {q.device}; extension loaded: {loaded})")
    o = fused_l2_attention(q.reshape(-1, *q.shape[-2:]), v.reshape(-1, *v.shape[-2:]), "l2_attention", scale)
    return o.reshape(v.shape)


def cpu_kernels_available() -> bool:
    """True if ``acf._C`` loaded with its L2 attention kernels."""
    return _ext.available() and hasattr(torch.ops.acf, "l2_attention_fwd")


def l2_attention_triton(q: Tensor, v: Tensor, scale: Optional[float] = None, precision: Optional[str] = None) -> Tensor:
    """The Triton kernels (``acf.kernels.l2_attention``, imported lazily), differentiable twice.

    ``scale`` (default ``1 / sqrt(d)``) is applied in fp32 (for fp64 inputs it is the fp32-rounded
    value). ``precision`` ("ieee" or "tf32") only matters for fp32 inputs; None follows
    ``torch.backends.cuda.matmul.allow_tf32``.
    """
    kernels = _triton_kernels()
    kernels.check_inputs(q, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scale = float(torch.tensor(float(scale), dtype=torch.float32))  # what the kernels see
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return v * 0  # empty: nothing to attend over
    return fused_l2_attention(q, v, "l2_attention_triton", scale, kernels.precision_of(q.dtype, precision))


def _triton_kernels():
    """``acf.kernels.l2_attention`` (importing it defines the Triton ops with their autograd and vmap).
    From a source checkout, where ``kernels/`` is not yet installed as ``acf.kernels``, the folder
    beside the package is loaded under that name."""
    try:
        from ..kernels import l2_attention as kernels
    except ModuleNotFoundError as exc:
        source = Path(__file__).resolve().parents[2] / "kernels"
        if exc.name != "acf.kernels" or not (source / "__init__.py").is_file():
            raise
        spec = importlib.util.spec_from_file_location("acf.kernels", source / "__init__.py",
                                                      submodule_search_locations=[str(source)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["acf.kernels"] = package
        spec.loader.exec_module(package)
        from ..kernels import l2_attention as kernels
    return kernels


_BACKENDS: dict[str, Backend] = {
    "reference": l2_attention_reference,
    "sdpa": l2_attention_sdpa,
    "triton": l2_attention_triton,
    "extension": l2_attention_extension,
}


def triton_available() -> bool:
    """True if Triton and the fused kernels import (cached). Without Triton that is expected (False,
    silently); with Triton installed, kernels that fail to import are a fault: one warning names it."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            _triton_kernels()
            _TRITON_OK = True
        except ModuleNotFoundError as exc:
            if exc.name != "triton":
                _warn_triton(exc)
            _TRITON_OK = False
        except Exception as exc:  # a triton too old for the kernels, a broken install
            _warn_triton(exc)
            _TRITON_OK = False
    return _TRITON_OK


def _warn_triton(exc: Exception) -> None:
    warnings.warn(f"acf: Triton is installed but the fused attention kernels (acf.kernels.l2_attention) do not "
                  f"import ({type(exc).__name__}: {exc}); l2_attention's 'auto' runs the reference on CUDA",
                  RuntimeWarning, stacklevel=3)


_TRITON_OK: Optional[bool] = None
# What ``backend="auto"`` tests (``_auto_backend``; ``auto_rule`` says it in words).


def _auto_backend(q: torch.Tensor, v: torch.Tensor) -> str:
    """The rule behind ``backend="auto"`` (``auto_rule()`` states it in words, from the same constants).

    * CUDA: ``"triton"`` (fused forward, VJP and double VJP) when Triton imports, the dtype is
      one of ``TRITON_DTYPES`` and both head dims are <= ``TRITON_MAX_HEAD_DIM``; otherwise
      ``"reference"``.
    * CPU, ``EXTENSION_DTYPES``, ``acf._C`` loaded: ``"extension"`` at every head dim; ``"reference"``
      for half precision. The extension runs register-tiled kernels up to head dim 16 and blocked
      ones (batched BLAS products, elementwise steps fused in cache) above
      (``csrc/l2_attention_cpu.cpp``). Measured on one thread over a training step's mix (forward,
      6 VJPs, one double VJP; ``python bench/bench_l2_attention.py --crossover``,
      ``bench/results/2026-11-30-cpu-attention-crossover.md``): faster than the reference at every
      head dim from 8 to 128 and N from 49 to 1024, in O(N) memory per head instead of O(N^2).
      ``"sdpa"`` is never chosen automatically: it is first-order only and, at forward time,
      nothing tells whether the caller will differentiate a VJP later (the Neumann log-det
      gradient does, with ``create_graph=True``); on CPU it is also slower than the reference.
      The Triton interpreter is far slower still, so ``"triton"`` on CPU is only for tests
      (``TRITON_INTERPRET=1``, forced).
    * Derivative orders: reference any order; triton and extension two (a third raises); sdpa one (a
      second raises). ``auto`` therefore always supports the second order a training step needs.
    """
    if (
        q.is_cuda
        and q.dtype in TRITON_DTYPES
        and max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_HEAD_DIM
        and triton_available()
    ):
        return "triton"
    if q.device.type == "cpu" and q.dtype in EXTENSION_DTYPES and cpu_kernels_available():
        return "extension"
    return "reference"


def auto_rule() -> str:
    """The rule of ``backend="auto"`` in words, made from the constants ``_auto_backend`` tests (``acf
    info`` prints it; the README and docs/design.md quote it, checked by a test)."""
    def names(dtypes: tuple) -> str:
        return "/".join(str(t).replace("torch.", "") for t in dtypes)

    return (f"on CUDA triton when Triton imports, the dtype is {names(TRITON_DTYPES)} and both head dims are <= "
            f"{TRITON_MAX_HEAD_DIM}; on CPU the extension (acf._C) at every head dim when it is loaded and the dtype "
            f"is {names(EXTENSION_DTYPES)}; else the reference")


def auto_backend_summary(device: torch.device) -> str:
    """What ``backend="auto"`` runs on ``device`` for float32, in words (``acf info``), read off
    ``_auto_backend`` itself at a small head dim and just above the Triton kernels' limit."""
    small, large = (_auto_backend(t, t) for t in (torch.empty(1, 1, 1, d, device=device)
                                                  for d in (1, TRITON_MAX_HEAD_DIM + 1)))
    return small if small == large else f"{small} (head dim <= {TRITON_MAX_HEAD_DIM}; {large} above)"


def _select_backend(q: torch.Tensor, backend: str, v: Optional[torch.Tensor] = None) -> Backend:
    check_backend(backend, "l2_attention", ("auto", *_BACKENDS))
    if backend == "auto":
        return _BACKENDS[_auto_backend(q, q if v is None else v)]
    return _BACKENDS[backend]


def l2_attention(
    q: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, backend: str = "auto"
) -> torch.Tensor:
    """L2 self-attention with tied keys on ``(batch, heads, N, d)`` tensors (eq. 9-10).

    Args:
        q: queries, which are also the keys, shape ``(B, H, N, d)``.
        v: values, shape ``(B, H, N, e)``.
        scale: logit scale, a finite number > 0 (checked before any backend runs); defaults to
            ``1 / sqrt(d)``.
        backend: ``"auto"`` (see ``_auto_backend``: Triton on CUDA, ``acf._C`` on CPU), or
            ``"triton"`` (fused kernels, differentiable twice), ``"extension"`` (``acf._C``'s CPU
            kernels, differentiable twice), ``"sdpa"`` (PyTorch SDPA on augmented vectors, first
            order only) or ``"reference"`` (materialises P, any order).

    Returns:
        ``(B, H, N, e)`` tensor ``softmax(-scale * ||q_i - q_j||^2) @ v``. With no tokens (``N = 0``), or
        ``B``, ``H`` or ``e`` 0, the empty result of that shape (differentiable, zero gradients) from
        every backend. Queries need ``d >= 1``.
    """
    check_tensor(q, "q", ndim=4)
    check_tensor(v, "v", ndim=4)
    if q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q and v must agree in (batch, heads, N): got q {tuple(q.shape)} and v {tuple(v.shape)}"
        )
    if q.dtype != v.dtype:
        raise TypeError(f"q and v must share a dtype: got {q.dtype} and {v.dtype}")
    if q.device != v.device:
        raise ValueError(f"q and v must be on the same device: got {q.device} and {v.device}")
    if q.shape[-1] == 0:
        raise ValueError(f"l2_attention: q has head dim d = 0 (shape {tuple(q.shape)}); queries need at least one "
                         f"component")
    scale = _check_scale(scale, q.shape[-1])
    check_backend(backend, "l2_attention", ("auto", *_BACKENDS))
    if q.numel() == 0 or v.numel() == 0:  # no tokens (or heads, batch, value channels): nothing to attend over
        return v * 0 + q.sum() * 0
    return _select_backend(q, backend, v)(q, v, scale)


def _check_scale(scale: object, d: int) -> float:
    """The logit scale as a float: ``1 / sqrt(d)`` for None, else a finite number > 0 (a 0-dim tensor is
    read as its value); an error naming ``scale`` otherwise."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.requires_grad:
        scale = scale.item()
    try:
        return check_real(scale, "scale", low=0.0, low_open=True)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"l2_attention: {exc} (the logit scale of softmax(-scale ||q_i - q_j||^2) must be a "
                        f"finite number > 0)") from None


if cpu_kernels_available():
    _register_cpu_ops()
