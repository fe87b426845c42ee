"""Training loop of the main job: ``acf train`` (density or hybrid), with resumable run folders.

A run folder holds ``config.json``, ``checkpoint.pt``, ``metrics.csv`` / ``metrics.json`` and PNG
figures, each written atomically (``acf.runfolder``), by one process at a time (the folder's lock). The
checkpoint holds the history and is written first; the metrics files are then rewritten from it (and
again when the run is resumed), so a run killed at any point never lists a step its checkpoint does
not have, and a resumed run never duplicates or loses rows. Everything random
(batch order: a ``DataLoader`` over ``acf.data.EpochBatchSampler``, a permutation per epoch from
``epoch_seed(seed, epoch)``, restarted mid-epoch on resume; dequantisation noise, roulette draws and
probes: the global torch generator, saved in the checkpoint) is reproducible, so a run resumed from a
checkpoint ends with the same parameters as an uninterrupted one.

``config`` holds the settings (``TrainConfig``) and their record in ``config.json``, ``trainer`` the loop
(``Trainer``, ``train``), ``folder`` the checks of the folder a run writes into.
"""
from .config import (CHECKPOINT, CONFIG, CONFIG_SECTIONS, CONTINUATION_SETTINGS, DECAY_FRACTION, LR_SCHEDULES,
                     MODEL_SETTINGS_OF_TRAINING, SAMPLE_TEMPERATURES, SETTINGS_ADDED_LATER, TASKS, TrainConfig,
                     build_for, config_diff, config_from_dict, model_config_of, read_config_file, read_run_config)
from .folder import check_folder
from .trainer import METRIC_FIELDS, NonFiniteLossError, Trainer, lr_factor, train

__all__ = ["CHECKPOINT", "CONFIG", "CONFIG_SECTIONS", "CONTINUATION_SETTINGS", "DECAY_FRACTION", "LR_SCHEDULES",
           "METRIC_FIELDS", "MODEL_SETTINGS_OF_TRAINING", "NonFiniteLossError", "SAMPLE_TEMPERATURES",
           "SETTINGS_ADDED_LATER", "TASKS", "TrainConfig", "Trainer", "build_for", "check_folder", "config_diff",
           "config_from_dict", "lr_factor", "model_config_of", "read_config_file", "read_run_config", "train"]
