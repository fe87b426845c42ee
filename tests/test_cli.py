"""The command line: the README's main command, one-line errors with exit code 2 (a CUDA device on a
machine without one), Ctrl-C while starting (exit code 130), and the uncertified ablation announced."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acf.cli import main
from helpers import one_line_error


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


# ---- --device cuda without CUDA --------------------------------------------------------------------

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
CUDA_MISSING = "--device 'cuda': CUDA is not available on this machine (torch "


@no_cuda
@pytest.mark.parametrize("argv", [["train", "--data", "digits", "--steps", "1"], ["evaluate", "RUN"],
                                  ["sample", "RUN"], ["demo"]])
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys, argv):
    """Before: a traceback ending in 'AssertionError: Torch not compiled with CUDA enabled'."""
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    extra = ["--out", str(tmp_path / "new")] if argv[0] == "train" else []
    assert main([*argv, *extra, "--device", "cuda"]) == 2
    line = one_line_error(capsys, f"acf {argv[0]}: error: {CUDA_MISSING}", "use --device cpu or auto")
    assert ("was built without CUDA" in line) == (torch.version.cuda is None)
    assert not (tmp_path / "new").exists()


@no_cuda
def test_cuda_without_cuda_from_python():
    import acf

    with pytest.raises(ValueError, match=r"device 'cuda:1': CUDA is not available on this machine \(torch .*\); "
                                         r"use device='cpu' or 'auto'"):
        acf.load_run("no-such-run", device="cuda:1")  # refused before anything is read
    from acf.train import TrainConfig

    assert TrainConfig(device="cuda").device == "cuda"  # a stored setting stays readable anywhere


# ---- Ctrl-C while the command starts ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = """import re
import sys
from acf.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""  # what pip generates for [project.scripts] acf = "acf.cli:main"


@pytest.mark.parametrize("entry", ["python -m acf", "console script"])
@pytest.mark.parametrize("interrupted", ["scipy", "tqdm"])  # imported by the package / only by acf.cli
def test_interrupt_while_importing_is_one_line_and_exit_130(tmp_path, entry, interrupted):
    """Ctrl-C during the first seconds (torch, scipy, ... importing) printed a KeyboardInterrupt traceback.
    A stand-in module raises it where the import of ``interrupted`` happens, deterministically."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / f"{interrupted}.py").write_text("raise KeyboardInterrupt\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)]), "OMP_NUM_THREADS": "1"}
    if entry == "console script":
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "acf").write_text(CONSOLE_SCRIPT)
        cmd = [sys.executable, str(tmp_path / "bin" / "acf"), "info"]
    else:
        cmd = [sys.executable, "-m", "acf", "info"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["acf: interrupted (while starting)"], proc.stderr
    # A library user's import is theirs: the interrupt propagates as usual.
    lib = subprocess.run([sys.executable, "-c", "import acf"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert lib.returncode != 130 and "KeyboardInterrupt" in lib.stderr


def test_interrupt_while_parsing_is_one_line(monkeypatch, capsys):
    import acf.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(acf.cli, "build_parser", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "acf: interrupted\n"


# ---- --attention dot: uncertified, and said so ---------------------------------------------------------

def test_dot_attention_is_announced_as_uncertified(tmp_path, capsys):
    """The ablation is not Lipschitz: --help, the run's first lines and its config.json say so."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "dot is an UNCERTIFIED ablation: not Lipschitz, its blocks are NOT guaranteed invertible" in help_text
    out = tmp_path / "dot"
    with pytest.warns(RuntimeWarning, match="not certified contractive"):
        assert main(["train", "--data", "digits", "--attention", "dot", "--heads", "2", "--steps", "1",
                     "--batch-size", "16", "--eval-every", "1", "--eval-size", "16", "--n-exact-eval", "2",
                     "--warmup", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("WARNING:")]
    assert len(warning) == 1 and "--attention dot is an UNCERTIFIED ablation" in warning[0]
    assert "NOT guaranteed invertible" in warning[0] and "training does not stop when a bound reaches 1" in warning[0]
    assert json.loads((out / "config.json").read_text())["warning"] == warning[0]
    from acf.train import read_run_config

    assert read_run_config(out).attention == "dot"  # the record reads back
    plain = tmp_path / "plain"
    assert main(["train", "--data", "digits", "--heads", "2", "--steps", "1", "--batch-size", "16",
                 "--eval-every", "1", "--eval-size", "16", "--n-exact-eval", "2", "--warmup", "1",
                 "--out", str(plain)]) == 0
    assert "WARNING" not in capsys.readouterr().err and "warning" not in json.loads((plain / "config.json").read_text())
