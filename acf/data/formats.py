"""The file formats of ACF's file-based data sets: each loader reads ``root`` for one split and returns
``(images uint8 (N, C, H, W), labels int64 (N,))`` as numpy arrays (``acf.data.registry`` names them).

Local files (``root`` required)
-------------------------------
``mnist``
    IDX files (LeCun et al.): ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` and
    ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte``, each optionally ``.gz``, in ``root``
    or ``root/MNIST/raw`` (torchvision's layout). Big-endian header: magic ``0x00000803``
    (unsigned byte, 3 dims) + N, rows, cols for images; magic ``0x00000801`` + N for labels.
``cifar10``
    The "CIFAR-10 python version" (Krizhevsky 2009): ``cifar-10-batches-py/data_batch_1`` ..
    ``data_batch_5`` (train) and ``test_batch`` (test), in ``root`` or ``root`` itself being that
    folder. Each is a pickled dict with ``b'data'`` ``(10000, 3072)`` uint8 (rows channel-major:
    1024 red, 1024 green, 1024 blue, each row-major 32x32) and ``b'labels'`` (0..9). Pickles are
    read with a restricted unpickler that only admits the numpy globals these files contain.
``imagenet32`` / ``imagenet64``
    Downsampled ImageNet, npz version (Chrabaszcz, Loshchilov & Hutter 2017,
    ``Imagenet{32,64}_train_npz`` / ``Imagenet{32,64}_val_npz``): ``train_data_batch_1.npz`` ..
    ``train_data_batch_10.npz`` and ``val_data.npz`` (the validation set is the test split), in
    ``root``, ``root/Imagenet{R}_train_npz`` or ``root/Imagenet{R}_val_npz``. Keys ``data``
    ``(N, 3*R*R)`` uint8, channel-major like CIFAR, and ``labels`` 1..1000 (stored 1-based; returned
    0-based); ``mean`` is ignored.
``celeba64``
    CelebA-HQ at 64x64 as a numpy ``.npy`` file per split: ``root/celeba64_train.npy`` and
    ``root/celeba64_test.npy``, each a uint8 array of shape ``(N, 64, 64, 3)`` (NHWC, as images are
    usually saved) or ``(N, 3, 64, 64)`` (NCHW). There are no class labels: ``labels`` are all
    ``-1`` and ``n_classes`` is 0.

A missing file raises :class:`MissingDataError` (a ``FileNotFoundError``), a malformed one
:class:`MalformedDataError` (a ``ValueError``); both messages name the file and what was expected.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from ..errors import ACFError

PathLike = Union[str, "os.PathLike[str]"]


class MissingDataError(ACFError, FileNotFoundError):
    """A data directory or file is missing; the message names it and the expected layout."""


class MalformedDataError(ACFError, ValueError):
    """A data file is not in the expected format; the message names the file and the expectation."""


# ---------------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------------


def _find(dirs: Sequence[Path], names: Sequence[str], what: str) -> Path:
    """The first ``dir/name`` that is a file, else a :class:`MissingDataError` listing all tried."""
    tried = [d / n for d in dirs for n in names]
    for path in tried:
        if path.is_file():
            return path
    raise MissingDataError(f"{what}: no file found; looked for " + ", ".join(str(p) for p in tried))


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise MalformedDataError(f"{path}: cannot read{' gzip' if path.suffix == '.gz' else ''} data ({exc})") from exc


def _check_labels(path: Path, labels: np.ndarray, n: int, low: int, high: int) -> None:
    if labels.shape != (n,):
        raise MalformedDataError(f"{path}: expected {n} labels (one per image), got shape {labels.shape}")
    if n and (labels.min() < low or labels.max() > high):
        raise MalformedDataError(f"{path}: labels must lie in {low}..{high}, found {labels.min()}..{labels.max()}")


def _channel_major(path: Path, data: Any, channels: int, size: int) -> np.ndarray:
    """``(N, C*S*S)`` uint8 rows, channel-major then row-major (CIFAR / ImageNet-npz) -> ``(N, C, S, S)``."""
    row = channels * size * size
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MalformedDataError(f"{path}: expected 'data' as uint8 (N, {row}) rows ({channels} channels of "
                                 f"{size}x{size}, channel-major), got {got}")
    return data.reshape(-1, channels, size, size)


# ---------------------------------------------------------------------------------------------
# MNIST idx
# ---------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def read_idx(path: PathLike, magic: int) -> np.ndarray:
    """An IDX file (optionally gzipped) with unsigned-byte data: big-endian ``magic``, then one
    uint32 size per dimension (``magic & 0xFF`` of them), then the bytes in row-major order."""
    path = Path(path)
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MalformedDataError(f"{path}: {len(raw)} bytes, shorter than the {header}-byte IDX header "
                                 f"(magic {magic:#010x} and {ndim} sizes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise MalformedDataError(f"{path}: IDX magic number {found:#010x}, expected {magic:#010x} "
                                 f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise MalformedDataError(f"{path}: {len(raw)} bytes, expected {expected} for an IDX array of shape "
                                 f"{dims} ({'truncated' if len(raw) < expected else 'trailing bytes'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    dirs = [root, root / "MNIST" / "raw"]
    img_name, lab_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    img_path = _find(dirs, [img_name, img_name + ".gz"], f"MNIST {split} images")
    lab_path = _find(dirs, [lab_name, lab_name + ".gz"], f"MNIST {split} labels")
    images, labels = read_idx(img_path, IDX_IMAGES_MAGIC), read_idx(lab_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise MalformedDataError(f"{img_path}: expected 28x28 images, got {images.shape[1]}x{images.shape[2]}")
    _check_labels(lab_path, labels, images.shape[0], 0, 9)
    return images[:, None], labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python pickles
# ---------------------------------------------------------------------------------------------

_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled dict of numpy arrays needs (pickles can otherwise run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a data batch never contains")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy >= 2 moved numpy.core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise MalformedDataError(f"{path}: not a CIFAR-10 python batch (a pickled dict with b'data' and "
                                 f"b'labels'): {exc}") from exc


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise MalformedDataError(f"{path}: expected a pickled dict with b'data' and b'labels', "
                                 f"got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise MalformedDataError(f"{path}: expected keys b'data' and b'labels', found {sorted(batch)}")
    images = _channel_major(path, batch["data"], 3, 32)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    _check_labels(path, labels, images.shape[0], 0, 9)
    return images, labels


def load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder = folder if folder.is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_cifar_batch(_find([folder], [n], f"CIFAR-10 {split} batch {n}")) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet (npz)
# ---------------------------------------------------------------------------------------------


def _npz_batch(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("data", "labels") if key in npz.files}
            found = sorted(npz.files)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise MalformedDataError(f"{path}: not a readable .npz archive of arrays 'data' and 'labels' ({exc})") from exc
    if len(arrays) != 2:
        raise MalformedDataError(f"{path}: expected arrays 'data' and 'labels', found {found}")
    images = _channel_major(path, arrays["data"], 3, size)
    labels = np.asarray(arrays["labels"]).astype(np.int64).reshape(-1)
    _check_labels(path, labels, images.shape[0], 1, 1000)  # stored 1-based
    return images, labels - 1


def load_imagenet(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    dirs = [root, root / f"Imagenet{size}_train_npz", root / f"Imagenet{size}_val_npz"]
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train" else ["val_data.npz"]
    parts = [_npz_batch(_find(dirs, [n], f"ImageNet{size} {split} file {n}"), size) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# CelebA-HQ 64 (npy)
# ---------------------------------------------------------------------------------------------


def load_celeba64(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    name = f"celeba64_{split}.npy"
    path = _find([root], [name], f"CelebA-HQ 64 {split} array {name}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MalformedDataError(f"{path}: not a readable .npy array ({exc})") from exc
    expected = "uint8 (N, 64, 64, 3) or (N, 3, 64, 64)"
    if array.dtype != np.uint8 or array.ndim != 4:
        raise MalformedDataError(f"{path}: expected {expected}, got {array.dtype} {array.shape}")
    if array.shape[1:] == (64, 64, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1:] != (3, 64, 64):
        raise MalformedDataError(f"{path}: expected {expected}, got {array.dtype} {array.shape}")
    return array, np.full(array.shape[0], -1, dtype=np.int64)
