"""The CUDA side of ``acf._C`` compiles, on CI's CPU machines with no GPU and no CUDA toolkit.

Every ``csrc/*.cu`` is compiled for sm_80 and sm_90 with nvcc from NVIDIA's pip wheels (the
``test`` extra installs them on Linux x86-64), with the flags a CUDA build of the package passes
(``gpu_compile.nvcc_command``), and ``ptxas -v``'s registers, stack frame and spills per kernel are
printed (``pytest -rA``, and in the run's closing summary). The C++ sources that bind those kernels
(``#ifdef WITH_CUDA``) are compiled with ``WITH_CUDA`` defined. Nothing here runs a kernel: that
needs a GPU (``pytest -m gpu``, ``bench/gpu_check.sh``).

Skipped, with the reason, only where the wheels are not installed.
"""
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

import gpu_compile as G

CU_SOURCES = sorted(p.relative_to(G.REPO).as_posix() for p in (G.REPO / "csrc").glob("*.cu"))
# C++ sources of acf._C with a CUDA-only part (the bindings of the kernels)
CUDA_BINDINGS = sorted(p for p in G.setup_constant("CPU_SOURCES") if "WITH_CUDA" in (G.REPO / p).read_text())
# Kernels allowed a stack frame or spills (local memory), kernel name -> why. Local memory is slow,
# and the driver reserves the stack frame for every thread that can be resident on the device.
LOCAL_MEMORY_ALLOWED: dict[str, str] = {}

_RESULTS: dict = {}


def _toolkit():
    root = G.cuda_toolkit()
    if root is None:
        where = (f"`pip install -e \".[test]\"` installs them" if G.wheel_platform() else
                 f"the test extra installs them only on Linux x86-64, this is {platform.system()} {platform.machine()}")
        pytest.skip(f"NVIDIA's compiler wheels (nvidia-cuda-nvcc, ...) are not installed: {where}")
    missing = G.missing_cuda_parts(root)
    assert not missing, f"nvcc is installed ({root}) but parts of the toolkit are missing: {', '.join(missing)}"
    return root


def _compiled(src):
    """nvcc's result for ``src`` (compiled once per run)."""
    _toolkit()
    if src not in _RESULTS:
        res = G.compile_cu(G.REPO / src)
        _RESULTS[src] = res
        if res.returncode == 0:
            G.REPORT.append((f"ptxas: {src} (nvcc {res.seconds:.1f} s, sm_{'/sm_'.join(map(str, G.CUDA_ARCHS))})",
                             G.cuda_table([res])))
    return _RESULTS[src]


def test_setup_builds_every_cu_file():
    assert CU_SOURCES, "no csrc/*.cu found"
    assert sorted(G.setup_constant("CUDA_SOURCES")) == CU_SOURCES, \
        "setup.py's CUDA_SOURCES must list every csrc/*.cu (a CUDA build compiles only those)"


@pytest.mark.parametrize("src", CU_SOURCES)
def test_cuda_source_compiles(src):
    res = _compiled(src)
    if res.returncode != 0:
        pytest.fail(f"nvcc failed on {src} (exit {res.returncode}):\n{res.output.strip()}\n\n"
                    f"command: {' '.join(res.command)}", pytrace=False)
    print(f"{src}: nvcc {res.seconds:.1f} s")
    print("\n".join(G.cuda_table([res])))
    if "__global__" in (G.REPO / src).read_text():
        for arch in G.CUDA_ARCHS:
            assert any(k.arch == f"sm_{arch}" for k in res.kernels), \
                f"no ptxas report for sm_{arch} in nvcc's output:\n{res.output}"
        assert all(k.registers > 0 for k in res.kernels), res.output


@pytest.mark.parametrize("src", CU_SOURCES)
def test_cuda_kernels_use_no_local_memory(src):
    res = _compiled(src)
    if res.returncode != 0:
        pytest.skip(f"{src} does not compile (test_cuda_source_compiles reports it)")
    bad = [k for k in res.kernels if k.local_memory and k.kernel.split("<")[0] not in LOCAL_MEMORY_ALLOWED]
    if bad:
        pytest.fail("kernels using local memory (per thread: an array indexed at run time, or too many "
                    "registers); allow one in LOCAL_MEMORY_ALLOWED with the reason:\n" +
                    "\n".join(f"  {k.kernel} {k.arch}: {k.stack} B stack frame, {k.spill_stores} B spill stores, "
                              f"{k.spill_loads} B spill loads" for k in bad), pytrace=False)


@pytest.mark.parametrize("src", CUDA_BINDINGS)
def test_cuda_bindings_compile(src, tmp_path):
    """The ``#ifdef WITH_CUDA`` parts of the C++ sources (kernel launches through c10/cuda), as a
    CUDA build compiles them, syntax and types only (``-fsyntax-only``: no code generated)."""
    from torch.utils import cpp_extension

    root = _toolkit()
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    # torch's CPU wheel ships c10/cuda's headers but not the one its CMake build generates; in a CUDA
    # build of torch (shared libraries, as every wheel) it holds this one definition.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*cpp_extension.include_paths(), str(root / "include"), sysconfig.get_paths()["include"], str(tmp_path)]
    std = G.torch_cxx_std()
    cmd = [cxx, "-fsyntax-only", std, "-DWITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           *(f"-I{p}" for p in includes), str(G.REPO / src)]
    if sys.platform.startswith("linux"):
        cmd.insert(1, "-fopenmp")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"{src} with WITH_CUDA does not compile (exit {r.returncode}):\n{r.stdout}{r.stderr}\n\n"
                    f"command: {' '.join(cmd)}", pytrace=False)


def test_parse_ptxas_report():
    """The parser reads nvcc's -Xptxas -v lines (the format of CUDA 12 and 13)."""
    out = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    2176 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 34 registers, used 1 barriers, 2176 bytes cumulative stack size, 1216 bytes smem
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, 417 bytes cmem[0]
"""
    foo, bar = G.parse_ptxas(out)
    assert (foo.arch, foo.registers, foo.stack, foo.spill_stores, foo.spill_loads, foo.smem) == \
        ("sm_90", 34, 2176, 8, 4, 1216) and foo.local_memory
    assert (bar.arch, bar.registers, bar.stack, bar.smem, bar.local_memory) == ("sm_80", 20, 0, 0, False)
    if shutil.which("c++filt"):
        assert re.fullmatch(r"foo", foo.kernel) and bar.kernel == "bar"
