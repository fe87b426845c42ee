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
  killed writer left behind are removed by the next holder of the lock.
* **Safe loading.** ``load_checkpoint`` reads with ``torch.load(weights_only=True)``: tensors and
  plain containers only, so a file carrying a pickled payload is refused before anything in it
  runs. ``read_json`` names the file it could not parse.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pickle
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Callable, Iterator, Union

import torch

PathLike = Union[str, Path]
LOCK_NAME = ".lock"
TEMP_SUFFIX = ".partial"  # temporary files of atomic_write: .<name>.<random>.partial
CHECKPOINT_KEYS = ("config", "step", "seconds", "history", "model", "ema", "opt", "sched", "rng")

_held: dict[tuple[str, int], int] = {}  # (folder, thread) -> depth of the locks this process holds


class RunFolderError(RuntimeError):
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
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
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


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically and durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:  # name the file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def write_text(path: PathLike, text: str) -> None:
    """``atomic_write`` of a text file (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def read_json(path: PathLike) -> object:
    """The JSON document in ``path``; a file that is not JSON raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused (e.g. ``Unsupported global: GLOBAL io.open``)."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return reason.split(" was not an allowed global")[0]


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict:
    """A checkpoint written by ``acf train``, read with ``torch.load(weights_only=True)``: anything
    but tensors and plain containers (e.g. a pickled object whose loading would run code) is refused
    with a ``RunFolderError`` naming the file, and nothing in it runs."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as exc:
        raise RunFolderError(f"{path}: refused: not a checkpoint of tensors and plain data ({_unpickler_reason(exc)}); "
                             f"nothing in it was run") from None
    except Exception as exc:  # the weights-only unpickler fails on damaged files in many ways
        raise RunFolderError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise RunFolderError(f"{path}: not a checkpoint of acf train (missing {', '.join(missing)})")
    return ckpt
