"""Readers of the standard data files, in numpy only: MNIST's IDX and CIFAR-10's batches.

:mod:`branchynet.data` reads the standard sets with these when their files are on disk
(no torchvision needed); they are importable from there as before.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

__all__ = ["read_cifar_batch", "read_idx"]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped if it ends in ``.gz``.

    Format: two zero bytes, a type code, the number of dimensions ``d``, then ``d``
    big-endian int32 sizes, then the data in C order.

    Returns:
        The array, in native byte order (uint8 for MNIST images [N, 28, 28] and labels [N]).

    Raises:
        ValueError: not an idx file, or a truncated one.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: idx header says shape {shape} ({count * dtype.itemsize} data bytes), "
            f"the file holds {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches, which hold only numpy arrays, lists and bytes:
    refusing every other global keeps a tampered file from running code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # numpy >= 2 moved numpy.core to numpy._core; the old path only warns.
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike):
    """Read one CIFAR-10 python batch (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    Each is a pickled dict with ``b"data"`` uint8 [N, 3072] (1024 red, 1024 green, 1024
    blue values, rows of 32) and ``b"labels"`` N ints.

    Returns:
        ``(x, y)``: x uint8 [N, 3, 32, 32], y int64 [N].

    Raises:
        ValueError: not a CIFAR-10 batch.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            # The official files are Python 2 pickles: bytes keys.
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except Exception as err:
            raise ValueError(f"{path} is not a CIFAR-10 python batch: {err}") from err
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (holds {type(d).__name__})")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (keys {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path}: data of shape {data.shape} with {len(labels)} labels; want [N, 3072] and N"
        )
    return data.reshape(-1, 3, 32, 32), labels
