"""Data parallelism on torch.distributed, started by torchrun.

torchrun (``python -m torch.distributed.run``) starts one process per device and tells
each its place through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); :func:`init_from_env` reads them and joins the
process group (gloo on the CPU, nccl on GPUs). Without them everything here is the
single-process identity: rank 0 of a world of 1, reductions that return their input.

The sharding is designed so that ``W`` ranks with a global batch ``B`` see exactly the
batches that one process with batch ``B`` sees: each epoch draws one seeded permutation
of the whole data set, cuts it into global batches of ``B`` and gives each rank a
contiguous part of every global batch (:class:`ShardedBatchSampler`). With the loss of
each rank scaled by its share of the global batch, DDP's gradient average is then the
gradient of the global batch's mean loss, the same as one process computes, up to float
rounding. Layers that look at the whole batch in training (BatchNorm) see only the
rank's part; the paper's B-LeNet has none, B-ResNet-110 has BatchNorm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "ShardedBatchSampler",
    "all_reduce_sum",
    "barrier",
    "gather_exit_table",
    "gather_objects",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "shard_range",
    "world_size",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this node (selects the GPU).
        device: the device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_from_env(device: str | torch.device = "cpu") -> DistInfo:
    """Join the process group torchrun set up, if any.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) this initialises the default
    process group once (gloo for a CPU ``device``, nccl for CUDA) and, on CUDA, binds
    this process to GPU ``LOCAL_RANK``. Otherwise it does nothing.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:i"``; under torchrun a CUDA device
            becomes ``cuda:LOCAL_RANK`` (one GPU per process).

    Returns:
        :class:`DistInfo` for this process.

    Raises:
        ValueError: malformed torchrun variables, or more local ranks than GPUs.
    """
    device = torch.device(device)
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1 and not is_distributed():
        return DistInfo(0, 1, 0, device)
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world} but this torch was built without torch.distributed")
    local = _env_int("LOCAL_RANK") or 0
    if device.type == "cuda":
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise ValueError(
                f"LOCAL_RANK={local} but this node has {n_gpu} GPU(s): start at most one "
                f"process per GPU (torchrun --nproc-per-node {n_gpu})"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that prints, logs and writes files (rank 0)."""
    return rank() == 0


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous part of ``range(n)`` that a rank owns: the first ``n % world``
    ranks get one more; concatenated in rank order the parts are ``range(n)``."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (rank_ < extra))


class ShardedBatchSampler(Sampler):
    """Global batches cut from one seeded permutation; this rank's part of each.

    Every epoch draws ``torch.randperm(n, generator=generator)``, exactly as
    ``RandomSampler(generator=generator)`` does, and cuts it into global batches of
    ``batch_size`` (the last one shorter). Rank ``r`` of ``W`` takes part ``r`` of
    :func:`shard_range` of each global batch, so the ranks together see every sample
    once per epoch, and a 1-process run with the same generator state sees the same
    global batches. When the last global batch is smaller than ``W`` some ranks get an
    empty list for it (they still take part in the gradient reduction).

    Args:
        n: data set size.
        batch_size: the global batch size.
        generator: draws the permutation (reseed it per epoch); None: no shuffling.
        rank, world_size: default: this process's.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.generator = generator
        here = dist.get_rank() if is_distributed() else 0
        self.rank = here if rank is None else rank
        self.world_size = (dist.get_world_size() if is_distributed() else 1) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def global_size(self, i: int) -> int:
        """Size of global batch ``i`` (the loss of rank ``r`` is weighted by its share)."""
        return min(self.batch_size, self.n - i * self.batch_size)

    def __iter__(self):
        order = (torch.randperm(self.n, generator=self.generator) if self.generator is not None
                 else torch.arange(self.n))
        for start in range(0, self.n, self.batch_size):
            part = shard_range(min(self.batch_size, self.n - start), self.rank, self.world_size)
            yield order[start + part.start: start + part.stop].tolist()


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place (nothing without a process group)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_exit_table(model, data, *, criterion: str | None = None, batch_size: int = 256,
                      device: str | torch.device = "cpu"):
    """:func:`branchynet.calibrate.collect_exit_outputs` with every rank scoring its
    shard of ``data``; the shards are gathered in data set order on every rank.

    All ranks must call it. Alone it is ``collect_exit_outputs``.

    Args:
        model: the BranchyNet (the same weights on every rank).
        data: a Dataset of ``(x, y)`` (a DataLoader cannot be sharded here).

    Returns:
        :class:`~branchynet.calibrate.ExitTable` over all of ``data``: score [N, M],
        pred [N, M], target [M], equal to the single-process table (sample for sample;
        scores to float rounding, since batches are cut at other places).
    """
    from .calibrate import ExitTable, collect_exit_outputs

    if not is_distributed():
        return collect_exit_outputs(model, data, criterion=criterion, batch_size=batch_size, device=device)
    if isinstance(data, torch.utils.data.DataLoader):
        raise TypeError("gather_exit_table shards a Dataset; got a DataLoader (pass its dataset)")
    part = shard_range(len(data))
    parts = gather_objects(None if len(part) == 0 else _table_dict(
        collect_exit_outputs(model, torch.utils.data.Subset(data, part), criterion=criterion,
                             batch_size=batch_size, device=device)))
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("data is empty: calibration needs at least one sample")
    return ExitTable(torch.cat([p["score"] for p in parts], 1), torch.cat([p["pred"] for p in parts], 1),
                     torch.cat([p["target"] for p in parts]), parts[0]["criterion"])


def _table_dict(table) -> dict:
    return {"score": table.score, "pred": table.pred, "target": table.target, "criterion": table.criterion}
