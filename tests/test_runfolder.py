"""Run folders that cannot be abused: safe checkpoint loading, one writer per folder, validated
configurations, one-line CLI errors (I/O, permissions, a full disk, Ctrl-C)."""
import errno
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import acf
from acf import experiments as ex
from acf import runfolder
from acf.cli import main
from acf.runfolder import RunFolderError
from acf.train import TrainConfig, Trainer, train
from acf.train.config import model_config_of

from helpers import assert_same_checkpoint, one_line_error

# A constant learning rate after the warm-up: a run killed and resumed to another length then follows
# the schedule of the uninterrupted run of that length (a decaying one depends on the run's length).
TINY = dict(data="digits", attention="l2", heads=2, steps=2, batch_size=16, eval_every=2, eval_size=16,
            n_exact_eval=2, warmup=2, lr_schedule="constant")
TINY_ARGS = ["--data", "digits", "--attention", "l2", "--heads", "2", "--batch-size", "16", "--eval-size", "16",
             "--n-exact-eval", "2", "--warmup", "2", "--lr-schedule", "constant"]
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
    one_line_error(capsys, f"{ckpt}: not a readable checkpoint: corrupt or truncated (")
    ckpt.write_bytes(b"not a checkpoint")
    assert main(["sample", str(run), "--n", "4"]) == 2
    one_line_error(capsys, f"{ckpt}: refused: not a checkpoint of tensors and plain data")
    torch.save({"model": {}}, run / "checkpoint.pt")
    assert main(["sample", str(run), "--n", "4"]) == 2
    one_line_error(capsys, "not a checkpoint of acf train (missing config")


def edit_checkpoint(run: Path, change) -> None:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, run / "checkpoint.pt")


def first_weight(state: dict, suffix: str) -> str:
    return next(k for k in state if k.endswith(suffix))


@pytest.mark.parametrize("change,words", [
    (lambda c: c.update(step="ten"), ["field 'step' must be an integer >= 0, got 'ten' (str)"]),
    (lambda c: c.update(step=-1), ["field 'step' must be an integer >= 0, got -1 (int)"]),
    (lambda c: c.update(rng="garbage"), ["field 'rng' must be a list of random generator states (1-D uint8 "
                                         "tensors), one per process, got 'garbage' (str)"]),
    (lambda c: c.update(seconds=float("nan")), ["field 'seconds' must be a finite number >= 0, got nan"]),
    (lambda c: c.update(history="x"), ["field 'history' must be a list of dicts"]),
    (lambda c: c.update(ema=[1, 2]), ["field 'ema' must be a state dict (parameter name -> tensor) or None"]),
    (lambda c: c.update(opt=None), ["field 'opt' must be a dict (the optimizer's state), got None"]),
    (lambda c: c.update(world_size=0), ["field 'world_size' must be an integer >= 1, got 0"]),
])
def test_checkpoint_fields_of_the_wrong_type_are_named(run, capsys, change, words):
    """Before: TypeErrors from deep inside (''>' not supported between 'str' and 'int'', 'expected a
    torch.ByteTensor'), a traceback for a history that is not a list. Now one line naming the file and the
    field, for resume and for the commands that only read the run."""
    edit_checkpoint(run, change)
    before = (run / "checkpoint.pt").read_bytes()
    for command in (["train", "--steps", "4", "--resume"], ["evaluate", "--n", "4"]):
        assert main([*command, str(run)]) == 2
        one_line_error(capsys, f"{run / 'checkpoint.pt'}: ", *words, "the checkpoint is corrupt or was not written "
                       "by acf train")
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("section,suffix,value,counts", [("ema", "weight", float("nan"), "({n} NaN, 0 inf)"),
                                                          ("ema", "theta", float("nan"), "(1 NaN, 0 inf)"),
                                                          ("model", "bias", float("inf"), "NaN, ")])
def test_non_finite_weights_in_a_checkpoint_are_named(run, capsys, section, suffix, value, counts):
    """A NaN weight failed with 'linalg.eigh: failed to converge' (or sampled NaN images); a NaN attention gate
    evaluated to 'x contains non-finite values'. Now: the file, the section and the parameter, with the
    number of non-finite entries ({n}: every entry of the weight)."""
    name = {}

    def change(ckpt):
        name["k"] = first_weight(ckpt[section], suffix)
        ckpt[section][name["k"]].view(-1)[0] = value
        if suffix == "weight":
            ckpt[section][name["k"]].fill_(value)
        name["n"] = ckpt[section][name["k"]].numel()

    edit_checkpoint(run, change)
    counts = counts.format(n=name["n"])
    command = ["train", "--steps", "4", "--resume"] if section == "model" else ["sample", "--n", "2"]
    assert main([*command, str(run)]) == 2
    one_line_error(capsys, f"{run / 'checkpoint.pt'}: {section} weight {name['k']!r} is not finite", counts,
                   "nothing was loaded")
    with pytest.raises(RunFolderError, match=f"{section} weight '{name['k']}' is not finite"):
        acf.load_run(run, device="cpu")


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


BUILT = model_config_of(TrainConfig())  # the default preset's model, which the run fixture uses


@pytest.mark.parametrize("change,words", [
    (lambda m: m.update(hidden=BUILT.hidden + 1), [f"hidden: {BUILT.hidden + 1} (built: {BUILT.hidden})"]),
    (lambda m: (m.update(coeff=0.5), m["estimator"].update(lam=3.0)), [f"coeff: 0.5 (built: {BUILT.coeff})",
                                                                        "estimator.lam: 3.0 (built: 2.0)"]),
    (lambda m: m.update(colour="red"), ["colour: 'red' (no such model field)"]),
    (lambda m: m.update(squeeze_first=1), ["squeeze_first: 1 (built: True)"]),
])
@pytest.mark.parametrize("command", [["evaluate", "--n", "4"], ["sample", "--n", "2"],
                                     ["train", "--steps", "4", "--resume"], "load_run"])
def test_edited_model_section_is_refused(run, capsys, change, words, command):
    """A hand edit of config.json's "model" section (a record of the model) was silently ignored: the
    model is built from the "train" section. Now it is refused, naming the fields, for every reader."""
    edit_config(run, lambda d: change(d["model"]))
    expected = [f"{run / 'config.json'}: the \"model\" section disagrees with the model its \"train\" section "
                "builds", *words, "the \"train\" section defines the model"]
    if command == "load_run":
        with pytest.raises(ValueError) as info:
            acf.load_run(run, device="cpu")
        assert all(w in str(info.value) for w in expected), str(info.value)
        return
    before = (run / "checkpoint.pt").read_bytes()
    assert main([*command, str(run)]) == 2
    one_line_error(capsys, *expected)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_model_section_without_a_later_setting_is_accepted(run):
    """A record written before a model setting existed lacks it: that is not an edit."""
    edit_config(run, lambda d: (d["model"].pop("gamma_init"), d["model"]["estimator"].pop("max_terms")))
    assert isinstance(acf.load_run(run, device="cpu"), acf.ACFModel)


@pytest.mark.parametrize("what", ["/dev/zero", "folder", "big"])
def test_config_file_reads_are_bounded(tmp_path, capsys, what):
    """``--config /dev/zero`` read forever (memory grows until the machine swaps); a huge file was read
    whole. A settings file must be a regular file of at most 1 MB."""
    if what == "/dev/zero":
        path, words = Path("/dev/zero"), "not a regular file"
    elif what == "folder":
        path, words = tmp_path, "not a regular file"
    else:
        path, words = tmp_path / "big.json", "larger than 1,000,000 bytes"
        path.write_text('{"lr": 0.002' + " " * 1_000_000 + "}")  # valid JSON, just too big
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    one_line_error(capsys, f"acf train: error: {path}: {words}")
    assert not out.exists()
    small = tmp_path / "small.json"
    small.write_text('{"lr": 0.002' + " " * 900_000 + "}")
    assert runfolder.read_json(small) == {"lr": 0.002}


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
    ("--gamma-init", "1", "gamma_init (form 'gated') must be in (0.0, 1.0), got 1.0"),
    ("--attention-form residual --gamma-init", "1e308", "gamma_init must be in [-1000000.0, 1000000.0], got 1e+308"),
    ("--lam", "5000", "lam must be in (0.0, 1000], got 5000.0"),
])
def test_bad_settings_fail_before_a_folder_is_made(tmp_path, capsys, flag, value, words):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(out), *flag.split(), value]) == 2
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


class FullDisk(io.RawIOBase):
    """An unbuffered file on a disk that fills up after ``room`` bytes (``OSError(ENOSPC)``), as torch's
    checkpoint writer meets it: it reports a ``RuntimeError`` from ``inline_container``."""

    def __init__(self, fd: int, room: int) -> None:
        self.fd, self.room = fd, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return os.write(self.fd, data)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def test_full_disk_inside_torch_save_is_named_and_keeps_the_checkpoint(run, capsys, monkeypatch):
    """The real torch.save on a disk that fills up mid-checkpoint: its RuntimeError ('[enforce fail at
    inline_container.cc] unexpected pos') is translated into the OSError behind it, naming the file."""
    before = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(fd, room=100_000))
    with pytest.raises(RuntimeError, match="inline_container"):  # what torch.save itself raises
        with FullDisk(os.open(os.devnull, os.O_WRONLY), room=100) as fh:
            torch.save({"w": torch.zeros(1000)}, fh)
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 2
    one_line_error(capsys, f"acf train: error: No space left on device: {run / 'checkpoint.pt'}")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(run) if p.endswith(runfolder.TEMP_SUFFIX)]


def test_a_failed_checkpoint_write_without_an_os_error_names_the_file(tmp_path, monkeypatch):
    def save(obj, fh):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    (tmp_path / "checkpoint.pt").write_bytes(b"previous")
    with pytest.raises(RunFolderError, match=f"cannot write {tmp_path / 'checkpoint.pt'}: \\[enforce fail"):
        runfolder.atomic_write(tmp_path / "checkpoint.pt", lambda fh: save({}, fh))
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"previous" and os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.fixture
def umask():
    """Set the process umask for a test, restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_of_a_run_respects_the_umask(run, umask, mask):
    """mkstemp made every file 0600 whatever the umask (a group could not read a shared run). Now every
    file a run writes (config, checkpoint, metrics, figures, evaluation, the lock) has 0666 less the umask."""
    umask(mask)
    assert runfolder.current_umask() == mask
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    assert main(["evaluate", str(run), "--n", "4"]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.name != runfolder.LOCK_NAME}
    assert {"config.json", "checkpoint.pt", "metrics.csv", "samples.png", "evaluation.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), modes
    fresh = run.parent / "fresh"
    fresh.mkdir()
    with runfolder.lock(fresh, "acf test"):
        pass
    assert stat.S_IMODE((fresh / runfolder.LOCK_NAME).stat().st_mode) == 0o666 & ~mask


def test_interrupt_is_one_line_with_exit_code_130(run, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 130
    one_line_error(capsys, "acf train: interrupted", f"acf train --resume {run}")
    with runfolder.lock(run, "acf train"):  # the interrupted writer released the folder
        pass
