"""Run folders that cannot be corrupted by accident or abused on purpose.

* **One writer per folder.** ``lock(run, holder)`` takes an exclusive ``flock`` on ``<run>/.lock``
  (the kernel releases it when its process ends, however it ends: a killed writer never leaves a
  stale lock) and writes who holds it into the file, so that a second writer is refused with a
  message naming the first. The lock is re-entrant within one thread (``acf experiment`` holds it
  around the training it starts), and it checks that the folder is writable before its holder
  computes anything.
* **Atomic files.** ``atomic_write`` writes a temporary file with a name of its own (no two
  writers share one), flushes it to disk and renames it over the target: a reader, or a process
  killed at any point, sees the old file or the new one, never a part of one. Temporary files a
  killed writer left behind are removed by the next holder of the lock. Files get the mode a plain
  ``open(path, "w")`` would give (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``. A
  failed write (a full disk, however torch's checkpoint writer reports it) is an ``OSError`` naming
  the target, and the previous file is left as it was.
* **Safe loading.** ``load_checkpoint`` reads with ``torch.load(weights_only=True)``: tensors and
  plain containers only, so a file carrying a pickled payload is refused before anything in it
  runs; then every field is checked (type, and finite weights), naming the file and the field.
  ``read_json`` reads regular files of at most ``MAX_JSON_BYTES`` and names the file it refuses or
  could not parse; ``check_model_section`` refuses a config.json whose "model" record was edited.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import pickle
import socket
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Union

import torch

from ._checks import first_non_finite
from .errors import ACFError

# The files of a run folder (``acf train`` writes them, every command on a run reads them).
CONFIG, CHECKPOINT = "config.json", "checkpoint.pt"
SAMPLE_TEMPERATURES = (0.5, 0.7, 0.85, 1.0)  # samples.png (`acf train`, `acf sample`): a row block per temperature
CLASS_SAMPLE_TEMPERATURE = 0.7  # class_samples.png of a class-conditional run: a row of samples per class

PathLike = Union[str, Path]
LOCK_NAME = ".lock"
TEMP_SUFFIX = ".partial"  # temporary files of atomic_write: .<name>.<random>.partial
CHECKPOINT_KEYS = ("config", "step", "seconds", "history", "model", "ema", "opt", "sched", "rng")
MAX_JSON_BYTES = 1_000_000  # read_json: a settings file (config.json, acf train --config) is at most 1 MB

_held: dict[tuple[str, int], int] = {}  # (folder, thread) -> depth of the locks this process holds


class RunFolderError(ACFError, RuntimeError):
    """A run folder, or a file in it, that cannot be used as asked (in use, unwritable, refused)."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"{info.get('holder', 'a process')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"


def _flock(lock_file: Path) -> int:
    """An open descriptor of ``lock_file`` holding its exclusive lock; ``RunFolderError`` naming the
    holder if another process (or thread) has it."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for every file
    except OSError as exc:
        raise RunFolderError(f"cannot lock {lock_file.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(f"{lock_file.parent} is in use by {_holder_text(lock_file)}; wait until it "
                             f"finishes or choose another folder") from None
    return fd


def _key(run: Path) -> tuple[str, int]:
    return os.path.realpath(run), threading.get_ident()


def check_free(run: PathLike) -> None:
    """Refuse now (``RunFolderError`` naming the holder) if another process holds ``run``'s lock: an
    early check with the best message; only ``lock`` makes its caller the folder's writer."""
    lock_file = Path(run) / LOCK_NAME
    if _key(Path(run)) not in _held and lock_file.exists():
        os.close(_flock(lock_file))


def check_writable(folder: Path) -> None:
    """Raise ``RunFolderError`` unless a file can be created in ``folder`` (also under root, on a
    read-only file system, where permission bits say nothing)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check-", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise RunFolderError(f"cannot write into {folder}: {exc.strerror}") from None


def _remove_stale_temporaries(folder: Path) -> None:
    for stale in folder.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def lock(run: PathLike, holder: str) -> Iterator[None]:
    """Hold the run folder ``run`` (which must exist) as its only writer; ``holder`` (e.g.
    ``"acf train"``) names this process to a writer that is refused meanwhile."""
    run = Path(run)
    key = _key(run)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _flock(run / LOCK_NAME)
    _held[key] = 1
    try:
        info = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        check_writable(run)
        _remove_stale_temporaries(run)
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


def contents(run: PathLike) -> list[str]:
    """Names in ``run`` other than the lock file and temporary files (``[]`` if it does not exist)."""
    run = Path(run)
    if not run.is_dir():
        return []
    return sorted(p.name for p in run.iterdir() if p.name != LOCK_NAME and not p.name.endswith(TEMP_SUFFIX))


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it (``/proc/self/status``); where
    that is not available, set and restored at once under a lock (``os.umask`` can only be read by
    setting it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` with an errno that caused ``exc`` (itself, or in its ``__cause__`` / ``__context__``
    chain): torch's checkpoint writer reports a failed write (a full disk) as a ``RuntimeError`` from
    ``inline_container`` raised while handling the file's ``OSError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _write_failure(exc: BaseException, path: Path) -> Optional[BaseException]:
    """What a failed write of ``path`` raises instead of ``exc``: its ``OSError`` naming ``path`` (e.g.
    ``No space left on device: <path>``), or for torch's writer failing without one, a
    ``RunFolderError`` naming ``path``; None to re-raise ``exc`` as it is."""
    os_error = _os_error_in(exc)
    if os_error is not None and (os_error is not exc or exc.filename is None):
        return OSError(os_error.errno, os_error.strerror or os.strerror(os_error.errno), str(path))
    if isinstance(exc, RuntimeError) and ("inline_container" in str(exc) or "PytorchStreamWriter" in str(exc)):
        return RunFolderError(f"cannot write {path}: {' '.join(str(exc).split())[:200]}")
    return None


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically and durably, with the mode
    ``0o666`` less the umask. If anything fails the previous file is left as it was, and a failed write
    raises an ``OSError`` naming ``path`` (``No space left on device: <path>``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())  # mkstemp's 0o600 is not what the user asked
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        failure = _write_failure(exc, path) if isinstance(exc, Exception) else None
        if failure is not None:
            raise failure from exc
        raise


def write_text(path: PathLike, text: str) -> None:
    """``atomic_write`` of a text file (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def read_json(path: PathLike, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON document in the regular file ``path`` of at most ``max_bytes`` bytes; anything else (a
    device such as ``/dev/zero``, a pipe, a folder, a larger file) or a file that is not JSON raises
    ``ValueError`` naming it (a missing file: ``FileNotFoundError``)."""
    path = Path(path)
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file; settings are read from a JSON file of at most "
                         f"{max_bytes:,} bytes")
    too_big = ValueError(f"{path}: larger than {max_bytes:,} bytes, the most a settings file may hold; is it the "
                         f"right file?")
    if info.st_size > max_bytes:
        raise too_big
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since stat
        raise too_big
    try:
        return json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def check_model_section(config: PathLike, built: dict) -> None:
    """Refuse a run's config.json whose "model" section (a record of the model) disagrees with
    ``built``, the ``ModelConfig.to_dict()`` of the model its "train" section builds: a hand edit of the
    record would otherwise be silently ignored. Fields the record lacks (settings added after the run
    was written) are accepted; the error names the file and every field that differs."""
    config = Path(config)
    doc = read_json(config)
    stored = doc.get("model") if isinstance(doc, dict) else None
    if stored is None:
        return
    if not isinstance(stored, dict):
        raise ValueError(f"{config}: the \"model\" section must be a JSON object (a record of the model), got "
                         f"{type(stored).__name__}")
    expected = json.loads(json.dumps(built, default=str))
    diffs = _record_differences(stored, expected, "")
    if diffs:
        raise ValueError(f"{config}: the \"model\" section disagrees with the model its \"train\" section builds "
                         f"({'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}); the \"train\" section "
                         f"defines the model and \"model\" only records it: undo the edit (to change the model, "
                         f"start a new run with other training settings)")


def _record_differences(stored: dict, expected: dict, prefix: str) -> list[str]:
    out = []
    for key, value in stored.items():
        name = f"{prefix}{key}"
        if key not in expected:
            out.append(f"{name}: {value!r} (no such model field)")
        elif isinstance(value, dict) and isinstance(expected[key], dict):
            out += _record_differences(value, expected[key], f"{name}.")
        elif value != expected[key] or type(value) is not type(expected[key]) and not (
                isinstance(value, (int, float)) and isinstance(expected[key], (int, float))
                and not isinstance(value, bool) and not isinstance(expected[key], bool)):
            out.append(f"{name}: {value!r} (built: {expected[key]!r})")
    return out


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused (e.g. ``Unsupported global: GLOBAL io.open``)."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return reason.split(" was not an allowed global")[0]


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict:
    """A checkpoint written by ``acf train``, read with ``torch.load(weights_only=True)``: anything
    but tensors and plain containers (e.g. a pickled object whose loading would run code) is refused
    with a ``RunFolderError`` naming the file, and nothing in it runs. A damaged file (cut short, or
    not a checkpoint), a field of the wrong type or non-finite weights are refused the same way,
    naming the file and the field. The random generator states come back on the CPU, where
    ``torch.set_rng_state`` wants them, whatever ``device``."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as exc:
        raise RunFolderError(f"{path}: refused: not a checkpoint of tensors and plain data ({_unpickler_reason(exc)}); "
                             f"nothing in it was run") from None
    except Exception as exc:  # the weights-only unpickler fails on damaged files in many ways
        raise RunFolderError(f"{path}: not a readable checkpoint: corrupt or truncated ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise RunFolderError(f"{path}: not a checkpoint of acf train (missing {', '.join(missing)})")
    for field, (ok, expected) in _CHECKPOINT_FIELDS.items():
        if field in ckpt and not ok(ckpt[field]):
            raise RunFolderError(f"{path}: field {field!r} must be {expected}, got {_shown(ckpt[field])}: the "
                                 f"checkpoint is corrupt or was not written by acf train")
    for section in ("model", "ema"):
        bad = first_non_finite(ckpt[section].items()) if ckpt[section] is not None else None
        if bad is not None:
            raise RunFolderError(f"{path}: {section} weight {bad[0]!r} is not finite ({bad[1]}): the checkpoint is "
                                 f"corrupt (or its run diverged); nothing was loaded")
    ckpt["rng"] = [state.cpu() for state in ckpt["rng"]]
    return ckpt


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


# Each field of a checkpoint: (check, what it must be).
_CHECKPOINT_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "config": (lambda v: isinstance(v, dict), "a dict of training settings"),
    "step": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "seconds": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                "a finite number >= 0"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
                "a list of dicts (one per evaluation)"),
    "model": (_is_state_dict, "a state dict (parameter name -> tensor)"),
    "ema": (lambda v: v is None or _is_state_dict(v), "a state dict (parameter name -> tensor) or None"),
    "opt": (lambda v: isinstance(v, dict), "a dict (the optimizer's state)"),
    "sched": (lambda v: isinstance(v, dict), "a dict (the learning-rate schedule's state)"),
    "rng": (lambda v: isinstance(v, list) and len(v) > 0 and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in v),
        "a list of random generator states (1-D uint8 tensors), one per process"),
    "world_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
}


def _shown(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"
