"""The Triton kernels of ``kernels/l2_attention.py`` compile for an H100/H200 (sm_90), with no GPU.

CI runs the kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``), which checks their math
but never compiles them: a kernel that the interpreter runs may still fail to compile (a layout or
type error, ptxas running out of registers). Here every kernel (forward, VJP, double VJP) is
compiled ahead of time (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``) at the launches a real
call makes and at the configuration the launcher tries first, for float32 (exact products, the
default) and bfloat16 at head dims 16 and 64; shared memory, registers and spills are printed.
The compile runs in a subprocess without ``TRITON_INTERPRET`` (see ``gpu_compile``). More
dtypes, head dims, architectures and the fallback configurations: ``python bench/compile_check.py``.
"""
import importlib.util
import re

import pytest

import gpu_compile as G

DTYPES = ["fp32-ieee", "bf16"]
DIMS = [16, 64]
ARCH = 90
# The kernels a forward, VJP and double VJP launch: every @triton.jit ``*_kernel`` of the module.
KERNELS = sorted(set(re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", (G.REPO / "kernels" / "l2_attention.py").read_text())))


@pytest.fixture(scope="module")
def rows():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (the package installs it on Linux only)")
    rows = G.compile_triton_in_subprocess(dtypes=DTYPES, dims=DIMS, arch=ARCH)
    secs = sum(r["secs"] for r in rows)
    G.REPORT.append((f"Triton AOT compile for sm_{ARCH}: {len(rows)} kernels, {secs:.0f} s of compile",
                     G.triton_table(rows)))
    return rows


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels_compile(rows, dtype, d):
    mine = [r for r in rows if r["dtype"] == dtype and r["d"] == d]
    print("\n".join(G.triton_table(mine)))
    assert KERNELS and sorted({r["kernel"] for r in mine}) == KERNELS, \
        f"compiled {sorted({r['kernel'] for r in mine})}, the module defines {KERNELS}"
    failed = [r for r in mine if r["status"] != "ok"]
    if failed:
        pytest.fail("Triton compile failed for sm_%d:\n%s" % (ARCH, "\n".join(
            f"  {r['kernel']} {r['dtype']} d={r['d']} tile {r['tile']}: {r['error']}" for r in failed)), pytrace=False)
