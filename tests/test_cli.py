"""The README's main command runs and reports a reconstruction within tolerance."""
import re
import subprocess
import sys


def test_demo_runs(capsys):
    from acf.cli import main

    assert main(["demo", "--size", "8", "--blocks", "1", "--hidden", "8", "--batch", "2", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "all < 1: True" in out
    err = float(re.search(r"max \|f\^-1\(f\(x\)\) - x\| = ([0-9.e+-]+)", out).group(1))
    assert err <= 1e-4


def test_python_m_acf_reports_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "acf", "demo", "--size", "7", "--heads", "2", "--hidden", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "divisible" in proc.stderr


def test_info_lists_backends(capsys):
    from acf.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "device", "extension", "triton", "l2_attention"):
        assert word in out
