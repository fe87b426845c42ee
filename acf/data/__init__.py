"""8-bit image data sets for ACF: two embedded sets and local-file loaders in the standard formats.

One entry point, :func:`load_dataset`, returns an :class:`ImageDataset` holding ``images`` as a
``(N, C, H, W)`` ``torch.uint8`` tensor and ``labels`` as ``int64``. :data:`DATASETS` describes every
name. Nothing is ever downloaded.

``registry`` names the data sets (``DATASETS``) and loads them (``load_dataset``, the embedded sets),
``formats`` reads the file formats, ``sampling`` cuts seeded, resumable batches.
"""
from .formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, MalformedDataError, MissingDataError, PathLike, read_idx
from .registry import (DATASETS, DEFAULT_DATASET, SPLIT_SEED, SPLITS, TEST_FRACTION, DatasetInfo, ImageDataset,
                       load_dataset, stratified_split, to_float, to_uint8)
from .sampling import EpochBatchSampler, endless_batches, epoch_seed, make_loader

__all__ = ["DATASETS", "DEFAULT_DATASET", "DatasetInfo", "EpochBatchSampler", "IDX_IMAGES_MAGIC",
           "IDX_LABELS_MAGIC", "ImageDataset", "MalformedDataError", "MissingDataError", "PathLike", "SPLITS",
           "SPLIT_SEED", "TEST_FRACTION", "endless_batches", "epoch_seed", "load_dataset", "make_loader", "read_idx",
           "stratified_split", "to_float", "to_uint8"]
