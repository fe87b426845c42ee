"""The CPU attention kernels' instruction-set variants (``csrc/l2_attention_cpu.h``).

One portable build of ``acf._C`` holds the kernels compiled for AVX-512, AVX2 + FMA and the
baseline, and picks the widest the CPU supports at the first call; ``ACF_CPU_ISA`` (read once per
process) forces a narrower one, so each variant is checked in its own subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acf.ops import l2_attention as F

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("avx512", "avx2", "baseline")  # widest first



def run_python(code: str, isa: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACF_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def available() -> list[str]:
    """The variants this CPU runs: the one chosen in this process and every narrower one."""
    best = torch.ops.acf.cpu_isa()
    return list(NAMES[NAMES.index(best):]) if best in NAMES else [best]


@pytest.mark.needs_ext
def test_cpu_isa_names_a_variant():
    assert torch.ops.acf.cpu_isa() in NAMES + ("native",)  # "native": an ACF_NATIVE=1 build


@pytest.mark.needs_ext
def test_unknown_variant_refused():
    if torch.ops.acf.cpu_isa() == "native":
        pytest.skip("an ACF_NATIVE=1 build has one variant")
    proc = run_python("import torch, acf._ext as e; e.load(); print(torch.ops.acf.cpu_isa())", "sse9")
    assert proc.returncode != 0 and "ACF_CPU_ISA=sse9 is not a variant" in proc.stderr, proc.stderr[-2000:]
    assert "auto, avx512, avx2, baseline" in proc.stderr


# A few seconds per variant: float32 at three head dims and odd N, float64 to rounding, saturated rows.
SUBSET = ("extension_matches_fp64_reference and (2x2x17 or 1x3x100 or 3x4x49) or extension_fp64_equals_reference "
          "or extension_saturated")


@pytest.mark.needs_ext
@pytest.mark.parametrize("isa", NAMES)
def test_variant_matches_fp64_reference(isa):
    """Forward, VJP and double VJP of each variant against the float64 reference
    (the extension tests of tests/test_l2_attention.py), in a subprocess that forces the variant (any case)."""
    if isa not in available():
        pytest.skip(f"this CPU (or build) does not run the {isa} variant")
    code = (f"import sys, pytest, torch, acf._ext as e; e.load(); isa = torch.ops.acf.cpu_isa(); "
            f"assert isa == {isa!r}, isa; "
            f"sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', 'tests/test_l2_attention.py', "
            f"'-k', {SUBSET!r}]))")
    proc = run_python(code, f" {isa.upper()} ")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "7 passed" in proc.stdout, proc.stdout[-500:]
