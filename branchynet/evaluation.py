"""Per-exit evaluation: every exit's accuracy and loss on every sample, no early exit."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import check_weights
from .data import DataSplits
from .distributed import all_reduce_sum, is_distributed
from .loaders import eval_loader, shard
from .models.branchynet import BranchyNet
from .state import to_device

__all__ = ["evaluate"]


def evaluate(
    model: BranchyNet,
    data,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    weights: Sequence[float] | None = None,
) -> dict:
    """Every exit's accuracy and loss on every sample (no early exit).

    Args:
        model: the BranchyNet (moved to ``device``; its train/eval mode is restored).
        data: a Dataset of ``(x, y)`` or a DataLoader of ``(x [B, ...], y [B])``.
        device: where to run.
        batch_size: for a loader built here.
        weights: joint-loss weights for ``"joint_loss"`` (default the model's).

    In a process group (torchrun) every rank must call it: each scores its shard of a
    Dataset (a DataLoader is used as is: give it a DistributedSampler) and the sums are
    reduced, so every rank returns the result over all of ``data``.

    Returns:
        ``{"n": samples, "acc": [N] per-exit accuracy, "loss": [N] per-exit mean
        cross-entropy, "joint_loss": the weighted sum, "final_acc": acc[-1]}``.
    """
    if not isinstance(model, BranchyNet):
        raise TypeError(f"model must be a branchynet.BranchyNet, got {type(model).__name__}")
    if isinstance(data, DataSplits):
        raise TypeError("pass one split (e.g. splits.test), not the whole DataSplits")
    device = torch.device(device)
    weights = check_weights(model.exit_config.weights if weights is None else weights, model.num_exits)
    if is_distributed() and not isinstance(data, DataLoader):
        data = shard(data)
    loader = data if isinstance(data, DataLoader) else eval_loader(data, batch_size, device)
    was_training = model.training
    model.to(device).eval()
    n = 0
    correct = torch.zeros(model.num_exits, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(model.num_exits, dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = to_device(x, device, non_blocking=True), y.to(device, non_blocking=True)
                outputs = model(x)
                for k, z in enumerate(outputs):
                    correct[k] += (z.argmax(1) == y).sum()
                    loss_sum[k] += F.cross_entropy(z.float(), y, reduction="sum").double()
                n += y.shape[0]
    finally:
        model.train(was_training)
    if is_distributed():
        n_all = torch.tensor(float(n), dtype=torch.float64, device=device)
        all_reduce_sum(correct, loss_sum, n_all)
        n = int(n_all.item())
    if n == 0:
        raise ValueError("evaluate: the data set is empty")
    acc = (correct.double() / n).tolist()
    loss = (loss_sum / n).tolist()
    return {
        "n": n,
        "acc": acc,
        "loss": loss,
        "joint_loss": sum(w * l for w, l in zip(weights, loss)),
        "final_acc": acc[-1],
    }
