"""Run folders that cannot be abused: safe checkpoint loading, one writer per folder, validated
configurations, one-line CLI errors (I/O, permissions, a full disk, Ctrl-C)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from acf import experiments as ex
from acf import runfolder
from acf.cli import main
from acf.runfolder import RunFolderError
from acf.train import TrainConfig, Trainer, train

from helpers import assert_same_checkpoint, one_line_error

TINY = dict(data="digits", attention="l2", heads=2, steps=2, batch_size=16, eval_every=2, eval_size=16,
            n_exact_eval=2, warmup=2)
TINY_ARGS = ["--data", "digits", "--attention", "l2", "--heads", "2", "--batch-size", "16", "--eval-size", "16",
             "--n-exact-eval", "2", "--warmup", "2"]
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A finished tiny run, copied by ``run`` for each test that changes it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(**TINY), out, progress=False)
    return out


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ---- safe loading --------------------------------------------------------------------------------

class Payload:
    """Pickles as ``open(marker, "w")``: loading it without ``weights_only`` creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def poison(ckpt_file: Path, marker: Path) -> None:
    """Add a code-running payload to a real checkpoint (it stays loadable by an unsafe torch.load)."""
    ckpt = torch.load(ckpt_file, weights_only=True)
    ckpt["history"].append({"step": Payload(marker)})
    torch.save(ckpt, ckpt_file)


def test_the_payload_would_run_if_loaded_unsafely(run, tmp_path):
    marker = tmp_path / "pwned"
    poison(run / "checkpoint.pt", marker)
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.exists()  # so the refusals below are not vacuous


@pytest.mark.parametrize("command", [["evaluate", "--n", "4"], ["sample", "--n", "4"],
                                     ["train", "--steps", "4", "--resume"], ["experiment"]])
def test_checkpoint_with_a_pickle_payload_is_refused(run, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    if command == ["experiment"]:  # the experiment runner reuses or resumes runs it finds under --out
        cfg = ex.train_config(ex.MICRO, ex.Variant("resflow", None), seed=0)
        folder = tmp_path / "experiments" / "convergence" / "runs" / ex.run_key(cfg)
        shutil.copytree(run, folder)  # found where the runner looks for the run: loaded before anything else
        poison(folder / "checkpoint.pt", marker)
        with pytest.raises(RunFolderError, match="refused.*Unsupported global: GLOBAL io.open"):
            ex.ensure_run(tmp_path / "experiments", "convergence", cfg, progress=False)
    else:
        poison(run / "checkpoint.pt", marker)
        assert main([*command, str(run)]) == 2
        one_line_error(capsys, "checkpoint.pt: refused", "Unsupported global: GLOBAL io.open", "nothing in it was run")
    assert not marker.exists()


def test_damaged_checkpoint_is_named(run, capsys):
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a copy cut short
    assert main(["sample", str(run), "--n", "4"]) == 2
    one_line_error(capsys, f"{ckpt}: not a readable checkpoint")
    ckpt.write_bytes(b"not a checkpoint")
    assert main(["sample", str(run), "--n", "4"]) == 2
    one_line_error(capsys, f"{ckpt}: refused: not a checkpoint of tensors and plain data")
    torch.save({"model": {}}, run / "checkpoint.pt")
    assert main(["sample", str(run), "--n", "4"]) == 2
    one_line_error(capsys, "not a checkpoint of acf train (missing config")


# ---- validated configuration -----------------------------------------------------------------------

def edit_config(run: Path, change) -> None:
    doc = json.loads((run / "config.json").read_text())
    change(doc)
    (run / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("change,words", [
    (lambda d: d["train"].update(heads="4"), ["heads must be an integer, got '4'"]),
    (lambda d: d["train"].update(lr=-1.0), ["lr must be in (0.0, inf), got -1.0"]),
    (lambda d: d["train"].update(colour="red"), ["unknown training setting(s) ['colour']"]),
    (lambda d: d["train"].pop("seed"), ["missing setting(s) ['seed']"]),
    (lambda d: d.pop("train"), ['no "train" section']),
    (lambda d: d.update(extra=1), ["unknown section(s) ['extra']"]),
])
def test_config_errors_name_the_file_and_the_field(run, capsys, change, words):
    edit_config(run, change)
    assert main(["evaluate", str(run), "--n", "4"]) == 2
    one_line_error(capsys, str(run / "config.json"), *words)


def test_invalid_json_names_the_file(run, capsys):
    (run / "config.json").write_text('{"train": {')
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 2
    one_line_error(capsys, f"{run / 'config.json'}: not valid JSON")


def test_resume_states_what_it_takes_from_the_command_line(run, capsys):
    assert main(["train", "--resume", str(run), "--data", "mnist5k", "--lr", "0.5", "--heads", "2"]) == 2
    line = one_line_error(capsys, "takes only --steps", "--data mnist5k (stored: digits)", "--lr 0.5 (stored: ")
    assert "--heads" not in line  # the same value as stored: not a conflict
    assert main(["train", "--resume", str(run), "--steps", "3", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "settings of its config.json; from the command line: --steps 3" in out
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3
    assert main(["train", "--resume", str(run), "--steps", "1"]) == 2
    one_line_error(capsys, "is at step 3, past the 1 steps requested")
    with pytest.raises(SystemExit):  # --out and --resume exclude each other
        main(["train", "--resume", str(run), "--out", str(run)])


@pytest.mark.parametrize("flag,value,words", [
    ("--ema-decay", "5", "ema_decay must be in [0.0, 1.0), got 5.0"),
    ("--warmup", "-3", "warmup must be >= 0, got -3"),
    ("--lam", "inf", "lam must be finite"),
    ("--batch-size", "100000", "batch_size=100000 exceeds"),
    ("--epochs", "0", "--epochs must be >= 1"),
    ("--device", "gpu", "device 'gpu' is not a torch device"),
])
def test_bad_settings_fail_before_a_folder_is_made(tmp_path, capsys, flag, value, words):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(out), flag, value]) == 2
    one_line_error(capsys, words)
    assert not out.exists()


# ---- one writer per folder ---------------------------------------------------------------------

def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    held, release = threading.Event(), threading.Event()

    def holder():
        with runfolder.lock(tmp_path, "acf evaluate"):
            with runfolder.lock(tmp_path, "acf train"):  # re-entrant within one thread
                held.set()
                release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    try:
        with pytest.raises(RunFolderError, match=rf"is in use by acf evaluate \(pid {os.getpid()} on"):
            with runfolder.lock(tmp_path, "acf sample"):
                pass
    finally:
        release.set()
        thread.join()
    with runfolder.lock(tmp_path, "acf sample"):  # released
        pass


def test_folder_of_another_program_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "metrics.csv").write_text("someone else's numbers\n")
    assert main(["train", *TINY_ARGS, "--steps", "2", "--out", str(out)]) == 2
    one_line_error(capsys, f"{out} is not empty and holds no acf run (metrics.csv)")
    assert (out / "metrics.csv").read_text() == "someone else's numbers\n" and sorted(os.listdir(out)) == ["metrics.csv"]


def test_run_stopped_before_its_first_checkpoint_restarts_with_the_same_settings(run, tmp_path, capsys):
    for name in os.listdir(run):
        if name != "config.json":
            os.remove(run / name)  # what a run killed before its first checkpoint leaves
    with pytest.raises(FileExistsError, match="stopped before its first checkpoint, with another configuration"):
        train(TrainConfig(**{**TINY, "lr": 0.5}), run, progress=False)
    assert train(TrainConfig(**TINY), run, progress=False).step == 2


def test_concurrent_training_is_refused_and_a_killed_writer_resumes_bit_identically(tmp_path):
    """Two trainings into one folder: the second is refused, naming the first. The first is then
    killed (SIGKILL) at a random point: its lock does not outlive it, and the run resumes to the
    state of an uninterrupted run, bit for bit (model, EMA, optimizer)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "acf", "train", *TINY_ARGS, "--steps", "1000", "--eval-every", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # it holds the lock and has checkpointed step 1
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by acf train (pid {first.pid} on" in second.stderr, second.stderr
        time.sleep(torch.rand(()).item())  # a random point: during a step, an evaluation or a write
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    steps = torch.load(out / "checkpoint.pt", weights_only=True)["step"] + 1
    cfg = TrainConfig(**{**TINY, "steps": steps, "eval_every": 1})
    train(cfg, out, resume=True, progress=False)
    train(cfg, tmp_path / "uninterrupted", progress=False)
    assert_same_checkpoint(out / "checkpoint.pt", tmp_path / "uninterrupted" / "checkpoint.pt")
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())] == list(range(1, steps + 1))


# ---- one-line errors: permissions, a full disk, Ctrl-C -------------------------------------------

@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only; as root (where permission bits do not stop writes) creating files in it
    fails as it would on a read-only mount."""
    folders = []

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        folders.append(folder)
        probe = folder / "probe"
        try:
            probe.touch()
        except PermissionError:
            return folder
        probe.unlink()
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_evaluate_on_a_read_only_folder_refuses_before_computing(run, read_only, capsys, monkeypatch):
    import acf.evaluate

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although the result could not be written")

    monkeypatch.setattr(acf.evaluate, "evaluate_bits_per_dim", must_not_run)
    read_only(run)
    assert main(["evaluate", str(run)]) == 2
    one_line_error(capsys, f"acf evaluate: error: cannot write into {run}: Permission denied")
    assert not (run / "evaluation.json").exists()


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(run, capsys, monkeypatch):
    before = (run / "checkpoint.pt").read_bytes()

    def save(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 2
    one_line_error(capsys, f"acf train: error: No space left on device: {run / 'checkpoint.pt'}")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(run) if p.endswith(runfolder.TEMP_SUFFIX)]
    monkeypatch.undo()

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["evaluate", str(run), "--n", "4"]) == 2
    one_line_error(capsys, f"No space left on device: {run / 'evaluation.json'}")


def test_interrupt_is_one_line_with_exit_code_130(run, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 130
    one_line_error(capsys, "acf train: interrupted", f"acf train --resume {run}")
    with runfolder.lock(run, "acf train"):  # the interrupted writer released the folder
        pass
