"""Build the compiled extension of ACF; the package's metadata is in ``pyproject.toml``.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as ``acf.kernels``
(never as a generic top-level ``kernels`` module; ``[tool.setuptools]`` in ``pyproject.toml``).

The compiled extension ``acf._C`` (``csrc/``) is built with ``torch.utils.cpp_extension``, which
needs torch importable while building: install torch first, then this package with
``--no-build-isolation`` (an isolated build environment would have no torch, or download a
CUDA build of several GB). Environment flags:

* ``ACF_NO_EXTENSION=1``: do not build ``acf._C`` (pure-PyTorch reference paths only).
* ``ACF_BUILD_CUDA=1`` / ``0``: force / skip the CUDA kernels. Default: build them when the
  installed torch is a CUDA build and ``nvcc`` (CUDA_HOME) is found.
* ``ACF_NATIVE=1``: compile the whole extension with ``-march=native`` (``-mcpu=native`` on macOS)
  for the build machine only; the CPU attention kernels then have one variant, ``"native"``. The
  default build runs on any CPU of its architecture (see ``compile_flags``), as fast.
* ``ACF_PORTABLE=1``: the default (a portable build); it overrides ``ACF_NATIVE=1``.
* ``ACF_REQUIRE_EXTENSION=1``: a failed extension build fails the install (default: warn and
  install the pure-Python package, which then warns once at import and uses the references).

At run time, ``ACF_CPU_ISA=avx2`` or ``baseline`` makes the CPU attention kernels use a narrower
variant than the CPU allows (``torch.ops.acf.cpu_isa()`` names the one in use).
"""
import os
import sys
import warnings

from setuptools import setup

# The CPU L2 attention kernels (csrc/l2_attention_cpu_kernels.h) are compiled once per instruction
# set, by one translation unit each; l2_attention_cpu.cpp picks one at run time.
CPU_SOURCES = ["csrc/extension.cpp", "csrc/power_iteration.cpp", "csrc/fixed_point.cpp", "csrc/l2_attention_cpu.cpp",
               "csrc/l2_attention_cpu_baseline.cpp", "csrc/l2_attention_cpu_avx2.cpp", "csrc/l2_attention_cpu_avx512.cpp"]
CUDA_SOURCES = ["csrc/fixed_point_cuda.cu"]
HEADERS = ["csrc/fixed_point_cuda.h", "csrc/fixed_point_anderson.h", "csrc/l2_attention_cpu.h",
           "csrc/l2_attention_cpu_kernels.h", "csrc/l2_attention_cpu_vec.h", "csrc/l2_attention_cpu_tiled.h",
           "csrc/l2_attention_cpu_blocked.h"]
# nvcc flags of CUDA_SOURCES, on top of torch's own. tests/test_cuda_compile.py reads CPU_SOURCES,
# CUDA_SOURCES and NVCC_FLAGS (without running this file) to compile the CUDA code in CI, which has no
# GPU, as a CUDA build would.
NVCC_FLAGS = ["-O3"]


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value in ("1", "true", "yes", "on")


def _note(msg):
    print(f"acf setup: {msg}", file=sys.stderr)
    warnings.warn(msg)


def native_build():
    """True if ``ACF_NATIVE=1`` (and not ``ACF_PORTABLE=1``) asks for a ``-march=native`` build."""
    if _flag("ACF_PORTABLE"):
        if _flag("ACF_NATIVE"):
            _note("ACF_PORTABLE=1 overrides ACF_NATIVE=1: building a portable acf._C")
        return False
    return bool(_flag("ACF_NATIVE"))


def compile_flags():
    """C++ flags of ``acf._C``.

    * ``-g0``: no debug info (a smaller .so, a faster build).
    * ``-fno-trapping-math``: nothing here traps on FP exceptions; it lets GCC vectorise loops with
      clamps and selects.
    * No ``-march``: the build runs on any CPU of its architecture (x86-64: SSE2). The CPU attention
      kernels, where vector width pays (one core, N = 196-784, d = 8-32: the AVX2 variant takes
      1.4-1.7x and SSE2 3.2-4.2x the time of AVX-512), are compiled for AVX-512, AVX2 + FMA and the
      baseline from one source, under ``#pragma GCC target`` in their own translation units
      (``csrc/l2_attention_cpu.h``), and the widest one the CPU supports is picked at run time:
      within 5% of a ``-march=native`` build on every shape measured (``bench/bench_cpu_isa.py``,
      ``bench/results/2026-11-30-cpu-isa-dispatch.md``).
    * ``-march=native`` (``-mcpu=native`` on macOS; x86-64 / aarch64) only with ``ACF_NATIVE=1``:
      the extension then runs only on CPUs like the build machine, and ``ACF_NATIVE_BUILD`` leaves
      the attention kernels one variant, compiled for it.
    * ``-fopenmp`` (Linux, compile only): ``at::parallel_for`` is an OpenMP pragma in torch's Linux
      builds, ignored without it (one thread). Not linked: the pragmas call the OpenMP runtime torch
      has already loaded, never a second one.
    """
    import platform

    cxx = ["-O3", "-g0", "-fno-trapping-math"]
    if native_build():
        if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
            raise RuntimeError(f"ACF_NATIVE=1 is supported on x86-64 and aarch64, not {platform.machine()}")
        cxx += ["-march=native" if sys.platform != "darwin" else "-mcpu=native", "-DACF_NATIVE_BUILD"]
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
    return cxx


def extension_config():
    """``(ext_modules, cmdclass)``: empty when the extension is switched off or torch is missing."""
    if _flag("ACF_NO_EXTENSION"):
        _note("ACF_NO_EXTENSION=1: not building acf._C (pure-PyTorch fallback)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if _flag("ACF_REQUIRE_EXTENSION"):
            raise
        _note("torch is not importable at build time, so acf._C is not built (pure-PyTorch fallback). "
              "Install torch first and use `pip install --no-build-isolation`.")
        return [], {}

    want_cuda = _flag("ACF_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not cuda_possible:
        raise RuntimeError(f"ACF_BUILD_CUDA=1 but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                           f"and CUDA_HOME={cpp_extension.CUDA_HOME} cannot build CUDA code")
    with_cuda = cuda_possible if want_cuda is None else want_cuda
    cxx = compile_flags()
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "acf._C", CPU_SOURCES + CUDA_SOURCES, define_macros=[("WITH_CUDA", None)], depends=HEADERS,
            extra_compile_args={"cxx": cxx, "nvcc": list(NVCC_FLAGS)})
    else:
        ext = cpp_extension.CppExtension("acf._C", CPU_SOURCES, depends=HEADERS, extra_compile_args={"cxx": cxx})

    # ninja compiles the sources in parallel; without it setuptools compiles them one by one.
    use_ninja = cpp_extension.is_ninja_available()
    base = cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)

    class BuildExtension(base):
        """Warn and carry on without acf._C if compiling fails (unless ACF_REQUIRE_EXTENSION=1)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, incompatible headers, ...
                if _flag("ACF_REQUIRE_EXTENSION"):
                    raise
                _note(f"building acf._C failed ({type(exc).__name__}: {exc}); installing the "
                      f"pure-PyTorch fallback. Set ACF_REQUIRE_EXTENSION=1 to make this an error.")

    print(f"acf setup: building acf._C (CPU{' + CUDA' if with_cuda else ''}, "
          f"{'-march=native' if native_build() else 'portable, CPU kernels dispatched at run time'}, "
          f"{'ninja' if use_ninja else 'setuptools'})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_config()

# Metadata, packages and package data: pyproject.toml. Only the extension is configured here.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
