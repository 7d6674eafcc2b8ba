"""The loaders that training and evaluation build from a Dataset.

A ``TensorDataset`` is indexed with a whole batch of indices at once (one gather per
batch, no collate); under torchrun each rank takes its part of every global batch of the
1-process order (:class:`~branchynet.distributed.ShardedBatchSampler`), so ``W`` ranks
see the samples one process sees.
"""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset, TensorDataset

from .data import DataSplits
from .distributed import ShardedBatchSampler, is_distributed, shard_range

__all__ = ["eval_loader", "shard", "train_loaders"]


def train_loaders(data, val, batch_size: int, device: torch.device):
    """(train loader, val data or None) from what :func:`train` accepts."""
    if isinstance(data, DataSplits):
        train_ds = data.train
        val = data.val if val is None else val
    elif isinstance(data, (Dataset, DataLoader)):
        train_ds = data
    else:
        raise TypeError(
            f"data must be a DataSplits, Dataset or DataLoader, got {type(data).__name__}"
        )
    if val is not None and not isinstance(val, DataLoader) and len(val) == 0:
        val = None
    if isinstance(train_ds, DataLoader):
        return train_ds, val
    if len(train_ds) == 0:
        raise ValueError("train: the training data is empty")
    gen = torch.Generator()
    pin = device.type == "cuda"
    if is_distributed():
        # The 1-process order (RandomSampler draws randperm from gen too), cut into global
        # batches, this rank's part of each.
        sampler = ShardedBatchSampler(len(train_ds), batch_size, gen)
        if isinstance(train_ds, TensorDataset):
            loader = DataLoader(train_ds, sampler=sampler, batch_size=None, pin_memory=pin)
        else:
            # generator=gen: the 1-process DataLoader draws a worker seed from it before
            # the permutation, and so must this one to draw the same permutation.
            loader = DataLoader(train_ds, batch_sampler=sampler, pin_memory=pin, generator=gen,
                                collate_fn=_collate_or_empty(train_ds))
        loader._branchynet_sharded = sampler
    elif isinstance(train_ds, TensorDataset):
        # Index the tensors with a whole batch of indices at once: one gather per batch
        # instead of batch_size __getitem__ calls and a collate.
        sampler = BatchSampler(RandomSampler(train_ds, generator=gen), batch_size, drop_last=False)
        loader = DataLoader(train_ds, sampler=sampler, batch_size=None, pin_memory=pin)
    else:
        loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen,
                            pin_memory=pin)
    loader._branchynet_generator = gen
    return loader, val


def eval_loader(ds, batch_size: int, device: torch.device) -> DataLoader:
    pin = device.type == "cuda"
    if isinstance(ds, TensorDataset):
        sampler = BatchSampler(SequentialSampler(ds), batch_size, drop_last=False)
        return DataLoader(ds, sampler=sampler, batch_size=None, pin_memory=pin)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, pin_memory=pin)


def _collate_or_empty(ds):
    """default_collate, except that a rank's empty part of the last global batch becomes
    zero rows shaped like the data set's samples (default_collate cannot collate [])."""
    from torch.utils.data import default_collate

    def collate(batch):
        if batch:
            return default_collate(batch)
        return [t[:0] for t in default_collate([ds[0]])]
    return collate


def shard(ds):
    """This rank's contiguous part of a Dataset (a TensorDataset stays one, for the
    batched fast path)."""
    part = shard_range(len(ds))
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[part.start:part.stop] for t in ds.tensors))
    return Subset(ds, part)

