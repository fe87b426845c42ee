"""The command line: the README's main command, one-line errors with exit code 2 (a CUDA device on a
machine without one, a corrupt checkpoint) and tracebacks for bugs, Ctrl-C while starting (exit code 130),
the uncertified ablation announced, --device auto, --help with the defaults, acf train --config."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acf._checks import resolve_device
from acf.cli import TRAIN_DEFAULTS, build_parser, main
from acf.runfolder import LOCK_NAME
from acf.train import TrainConfig, read_config_file, read_run_config
from helpers import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = "cuda" if torch.cuda.is_available() else "cpu"


def test_demo_runs(capsys):
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
    assert read_run_config(out).attention == "dot"  # the record reads back
    plain = tmp_path / "plain"
    assert main(["train", "--data", "digits", "--heads", "2", "--steps", "1", "--batch-size", "16",
                 "--eval-every", "1", "--eval-size", "16", "--n-exact-eval", "2", "--warmup", "1",
                 "--out", str(plain)]) == 0
    assert "WARNING" not in capsys.readouterr().err and "warning" not in json.loads((plain / "config.json").read_text())


# ---- --device auto, --help ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["demo"], ["evaluate", "R"], ["sample", "R"], ["reconstruct", "R"],
                                  ["interpolate", "R"], ["perturb", "R"]])
def test_device_defaults_to_auto(argv):
    assert build_parser().parse_args(argv).device == "auto"
    assert resolve_device("auto") == torch.device(HERE)


def test_train_runs_on_the_auto_device(cli_run, tmp_path, capsys):
    assert TRAIN_DEFAULTS["device"] == "auto" and read_run_config(cli_run).device == "auto"
    shutil.copytree(cli_run, tmp_path / "run")
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "2"]) == 0  # no step left: prints the plan
    assert f"2 steps on {HERE} -> resuming" in capsys.readouterr().out


@pytest.mark.parametrize("command,shown", [
    ("train", ["--steps STEPS", f"(default: {TrainConfig().steps})", "(default: auto)", "(default: mnist5k)",
               f"(default: {TrainConfig().lr})", f"(default: {TrainConfig().preset})", f"(default: {TrainConfig().max_grad_norm})"]),
    ("sample", ["samples per temperature (default: 16)", "(default: [0.5, 0.7, 0.85, 1.0])", "(default: auto)"]),
    ("evaluate", ["exact log-det terms (default: 20)", "test images (default: all)"]),
    ("perturb", ["test images (default: 64)"]),
    ("demo", ["attention heads (default: 4)", "(default: auto)"]),
])
def test_help_shows_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(s in text for s in shown) and "(default: None)" not in text, text


# ---- acf train --config ----------------------------------------------------------------------------

@pytest.mark.parametrize("flag,given,stored", [("--max-grad-norm", "none", None), ("--max-grad-norm", "0.5", 0.5),
                                               ("--eval-size", "all", None), ("--eval-size", "12", 12)])
def test_settings_that_take_a_word_for_none(cli_run, tmp_path, flag, given, stored):
    """``--max-grad-norm none`` switches clipping off, ``--eval-size all`` evaluates the whole test set
    (each setting's None); a number sets the value."""
    new = tmp_path / "new"
    assert main(["train", "--config", str(cli_run / "config.json"), flag, given, "--steps", "1",
                 "--out", str(new)]) == 0
    assert json.loads((new / "config.json").read_text())["train"][flag[2:].replace("-", "_")] == stored


@pytest.mark.parametrize("flag,given,expected", [("--eval-size", "half", "expected a whole number or all, got 'half'"),
                                                 ("--max-grad-norm", "all", "expected a number or none, got 'all'")])
def test_settings_that_take_a_word_refuse_other_words(flag, given, expected, capsys):
    with pytest.raises(SystemExit):
        main(["train", flag, given])
    assert expected in capsys.readouterr().err


def test_config_file_round_trip(cli_run, tmp_path, capsys):
    new = tmp_path / "new"
    assert main(["train", "--config", str(cli_run / "config.json"), "--out", str(new), "--steps", "3"]) == 0
    assert f"settings from {cli_run / 'config.json'}" in capsys.readouterr().out
    stored = json.loads((cli_run / "config.json").read_text())
    again = json.loads((new / "config.json").read_text())
    assert again["train"] == {**stored["train"], "steps": 3} and again["model"] == stored["model"]


def test_config_file_of_training_settings(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"data": "digits", "lr": 0.002}))
    assert read_config_file(path, TRAIN_DEFAULTS) == TrainConfig(data="digits", lr=0.002, device="auto")


@pytest.mark.parametrize("doc,words", [
    ({"lr": 0.002, "colour": "red"}, ["unknown training setting(s) ['colour']"]),
    ({"heads": "4"}, ["heads must be an integer, got '4'"]),
    ([1, 2], ["must be a JSON object"]),
    ({"train": {"lr": 0.002}}, ["(train)", "missing setting(s)"]),  # a run's config.json is complete
])
def test_config_file_errors_name_the_file_and_the_field(tmp_path, capsys, doc, words):
    path, out = tmp_path / "settings.json", tmp_path / "run"
    path.write_text(json.dumps(doc))
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    one_line_error(capsys, str(path), *words)
    assert not out.exists()


def test_config_and_resume_exclude_each_other(cli_run, capsys):
    assert main(["train", "--config", str(cli_run / "config.json"), "--resume", str(cli_run)]) == 2
    one_line_error(capsys, "--config and --resume exclude each other")


# ---- a corrupt checkpoint ----------------------------------------------------------------------------

def snapshot(folder):
    """Every file of a run folder (its lock file aside) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK_NAME}


@pytest.mark.parametrize("command", [["evaluate"], ["sample"], ["reconstruct"], ["interpolate"], ["perturb"],
                                     ["train", "--steps", "4", "--resume"]])
def test_corrupt_checkpoint_is_one_line_and_changes_nothing(cli_run, tmp_path, capsys, command):
    copy = tmp_path / "run"
    shutil.copytree(cli_run, copy)
    ckpt = copy / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    before = snapshot(copy)
    assert main([*command, str(copy)]) == 2
    one_line_error(capsys, f"acf {command[0]}: error: {ckpt}: not a readable checkpoint")
    assert snapshot(copy) == before


def test_train_help_shows_every_default_of_train_config(capsys, monkeypatch):
    """Every TrainConfig setting with an option shows the value acf train uses when it is not given (the
    dataclass's default, TRAIN_DEFAULTS over it), and the command's description names the default run."""
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps long lines, also at a name's hyphen
    used = {**vars(TrainConfig()), **TRAIN_DEFAULTS}
    train_parser = next(a for a in build_parser()._subparsers._group_actions).choices["train"]
    options = {a.dest: a for a in train_parser._actions}
    assert set(used) - set(options) == {"logit_alpha"}  # the one setting only --config sets
    for name, value in used.items():
        if name in options and value not in (None, {}):
            assert options[name].help.endswith(f"(default: {value})"), (name, options[name].help)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = TrainConfig()
    assert (f"default: {d.arch} without attention on {d.data}, preset {d.preset}, {d.steps} steps of batch "
            f"{d.batch_size}") in text


def test_info_prints_the_auto_rule(capsys):
    from acf.ops.l2_attention import auto_rule

    assert main(["info"]) == 0
    assert f"auto rule    l2_attention: {auto_rule()}" in capsys.readouterr().out


def test_experiment_help_names_every_experiment_and_scale(capsys):
    from acf.experiment_names import EXPERIMENT_NAMES, SCALES

    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(EXPERIMENT_NAMES) + ", all, or report" in text
    assert "; ".join(f"{name}: {what}" for name, what in SCALES.items()) in text


# ---- errors: one line for a user's, the traceback for a bug ------------------------------------------

def _info_raising(monkeypatch, exc):
    """``acf info`` raising ``exc`` (a stand-in for any command that meets it)."""
    import acf.cli

    def cmd(args):
        raise exc

    monkeypatch.setattr(acf.cli, "cmd_info", cmd)


def _user_errors():
    from acf.layers.block import CertificateError
    from acf.ops.fixed_point import ConvergenceError
    from acf.runfolder import RunFolderError
    from acf.train import NonFiniteLossError

    return [ValueError("lr must be > 0"), TypeError("heads must be an integer"),
            FileNotFoundError(2, "No such file or directory", "settings.json"),
            RunFolderError("run is in use by acf train"), CertificateError("block 'x' has Lip(g) = 1.2"),
            NonFiniteLossError("training diverged at step 3"), ConvergenceError("did not converge")]


BUGS = [IndexError("list index out of range"),
        RuntimeError("The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1"),
        KeyError("step"), AttributeError("'NoneType' object has no attribute 'shape'")]


def test_project_errors_share_a_base_and_keep_their_builtin_class():
    from acf.data import MalformedDataError, MissingDataError
    from acf.errors import ACFError

    errors = _user_errors()
    assert all(isinstance(e, ACFError) for e in errors[3:])
    assert isinstance(errors[3], RuntimeError) and isinstance(errors[5], RuntimeError)
    assert issubclass(MissingDataError, (ACFError)) and issubclass(MissingDataError, FileNotFoundError)
    assert issubclass(MalformedDataError, ACFError) and issubclass(MalformedDataError, ValueError)


@pytest.mark.parametrize("index", range(7))
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, index):
    monkeypatch.delenv("ACF_TRACEBACK", raising=False)
    exc = _user_errors()[index]
    _info_raising(monkeypatch, exc)
    assert main(["info"]) == 2
    one_line_error(capsys, "acf info: error: ", exc.strerror if isinstance(exc, OSError) else str(exc))


@pytest.mark.parametrize("switch", ["env", "flag"])
def test_user_errors_show_their_traceback_when_asked(monkeypatch, capsys, switch):
    """ACF_TRACEBACK=1 or acf --traceback: the traceback, then the same one line and exit code 2."""
    _info_raising(monkeypatch, ValueError("lr must be > 0"))
    if switch == "env":
        monkeypatch.setenv("ACF_TRACEBACK", "1")
        assert main(["info"]) == 2
    else:
        monkeypatch.delenv("ACF_TRACEBACK", raising=False)
        assert main(["--traceback", "info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ValueError: lr must be > 0" in err
    assert err.strip().splitlines()[-1] == "acf info: error: lr must be > 0"


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: type(e).__name__)
def test_bugs_keep_their_traceback(monkeypatch, exc):
    """A genuine bug is not a user error: main() lets it through, so the interpreter prints its traceback."""
    monkeypatch.delenv("ACF_TRACEBACK", raising=False)
    _info_raising(monkeypatch, exc)
    with pytest.raises(type(exc), match=re.escape(str(exc).strip("'"))):
        main(["info"])


def test_a_bug_in_the_command_prints_a_traceback_and_exits_1(tmp_path):
    """The same through the real entry point (python -m acf): traceback on stderr, exit code 1."""
    script = ("import runpy, sys, acf.cli\n"
              "def cmd_info(args):\n"
              "    return [][0]\n"
              "acf.cli.cmd_info = cmd_info\n"
              "sys.argv = ['acf', 'info']\n"
              "runpy.run_module('acf', run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ACF_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last):" in proc.stderr and "IndexError: list index out of range" in proc.stderr
    assert "acf info: error" not in proc.stderr
