"""Which folders ``acf train`` may write into: checked before the run is built and again once it holds
the folder's lock (``acf.train.trainer.train``)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .. import runfolder
from ..runfolder import CHECKPOINT, CONFIG
from .config import TrainConfig, config_diff, read_run_config


def check_folder(run: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse a folder ``train`` must not write into: in use by another writer; no checkpoint to resume;
    a run already there (a new run may only restart one that stopped before its first checkpoint, with
    the same settings); files that are not an acf run."""
    runfolder.check_free(run)
    ckpt = run / CHECKPOINT
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from")
        return
    if ckpt.exists():
        raise FileExistsError(f"{run} already holds a run; resume it with --resume or choose another --out")
    names = runfolder.contents(run)
    if not names:
        return
    if CONFIG not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(f"{run} is not empty and holds no acf run ({shown}); choose another --out")
    diff = config_diff(asdict(read_run_config(run)), cfg)
    if diff:
        raise FileExistsError(f"{run} holds a run that stopped before its first checkpoint, with another "
                              f"configuration (stored, requested): {diff}; choose another --out")
