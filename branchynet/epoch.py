"""One epoch of joint-loss training, and the pieces it runs on.

:func:`train_epoch` is the inner loop of :func:`branchynet.train.train`: forward, the
joint loss over the exits with a non-zero weight, one optimizer step per batch, and each
exit's loss and accuracy summed on the device. A frozen backbone
(``freeze="backbone"``) runs outside autograd; under torchrun the model is wrapped in
DistributedDataParallel (:func:`wrap_ddp`) and each rank's loss is scaled so that the
averaged gradient is the global batch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum, world_size
from .loss import joint_loss
from .models.branchynet import BranchyNet
from .state import to_device

__all__ = ["AMP_DTYPES", "check_amp", "forward_frozen", "train_epoch", "trainable", "wrap_ddp"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_epoch(model, loader, opt, w, device, progress, desc, ddp=None, amp_dtype=None, scaler=None,
                freeze=None, distill=0.0, temperature=3.0) -> dict:
    """One pass over ``loader`` with the joint loss weighted by ``w``, one step per batch.

    Returns:
        ``{"joint_loss": mean joint loss, "loss": [N] mean cross-entropy per exit,
        "acc": [N] accuracy per exit}`` over the epoch's samples (all ranks' under DDP).
    """
    model.train()
    live = [k for k, wk in enumerate(w) if wk > 0]
    if freeze is not None:
        live = [k for k in live if k < model.num_exits - 1]
        for m in _frozen(model):
            m.eval()
    live_w = [w[k] for k in live]
    forward = model
    if ddp is not None:
        ddp.module.live = live
        forward = ddp
        sharded = getattr(loader, "_branchynet_sharded", None)
        world = world_size()
    n_exits = model.num_exits
    # Sums stay on the device; reading them every batch would sync a GPU every step.
    correct = torch.zeros(n_exits, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(n_exits, dtype=torch.float64, device=device)
    joint_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    bar = _progress_bar(loader, desc, progress)
    for i, (x, y) in enumerate(bar):
        x, y = to_device(x, device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = forward(x) if freeze is None or ddp is not None else forward_frozen(model, x)
            # Only exits with a non-zero weight enter the graph: the others' branches (and
            # stages past the last live exit) get grad None, so the optimizer leaves them and
            # their state alone, rather than stepping on zero gradients.
            loss = joint_loss([outputs[k] for k in live], y, live_w, distill=distill,
                              temperature=temperature, teacher=outputs[-1])
        step_loss = loss
        if ddp is not None:
            global_b = sharded.global_size(i) if sharded is not None else y.shape[0] * world
            step_loss = _rank_share(loss, [outputs[k] for k in live], y.shape[0], world, global_b)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            step_loss.backward()
            opt.step()
        else:
            scaler.scale(step_loss).backward()
            scaler.step(opt)
            scaler.update()
        b = y.shape[0]
        n += b
        with torch.no_grad():
            if b:  # a rank's part of the last global batch may be empty (its loss is NaN)
                joint_sum += loss.detach().double() * b
            for k, z in enumerate(outputs):
                z = z.detach()
                correct[k] += (z.argmax(1) == y).sum()
                loss_sum[k] += F.cross_entropy(z.float(), y, reduction="sum").double()
        if not bar.disable and (i % 10 == 0 or i == len(bar) - 1):
            acc = (correct.double() / n).tolist()
            bar.set_postfix(loss=f"{joint_sum.item() / n:.4f}",
                            acc="/".join(f"{a:.3f}" for a in acc), refresh=False)
    bar.close()
    if ddp is not None:
        n_all = torch.tensor(float(n), dtype=torch.float64, device=device)
        all_reduce_sum(correct, loss_sum, joint_sum, n_all)
        n = int(n_all.item())
    if n == 0:
        raise ValueError("train: the training data is empty")
    return {
        "joint_loss": joint_sum.item() / n,
        "loss": (loss_sum / n).tolist(),
        "acc": (correct.double() / n).tolist(),
    }


class _NoBar:
    """Stands in for tqdm when it is off or not installed (it is a demo extra)."""

    disable = True

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def close(self):
        pass


def _progress_bar(loader, desc: str, progress: bool):
    if not progress:
        return _NoBar(loader)
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(loader)
    # disable=None: tqdm hides itself when stderr is not a terminal (CI logs, pytest).
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)


class _LiveExits(torch.nn.Module):
    """What DDP wraps: the model, with the outputs of exits not in the loss detached, so
    that DDP's search for parameters without a gradient does not wait for theirs."""

    def __init__(self, model: BranchyNet, freeze: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.freeze = freeze
        self.live = list(range(model.num_exits))

    def forward(self, x):
        outs = self.model(x) if self.freeze is None else forward_frozen(self.model, x)
        return [z if k in self.live else z.detach() for k, z in enumerate(outs)]


def wrap_ddp(model, device, w, freeze=None):
    # An exit with weight 0 (all but the last in the warm-up) leaves parameters without
    # gradients, which DDP must search for; a search with none to find only costs time
    # (and a warning), so the wrapper is rebuilt when the weights change. A frozen
    # backbone runs outside autograd: its parameters get no gradient either.
    return torch.nn.parallel.DistributedDataParallel(
        _LiveExits(model, freeze), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=min(w) == 0 or freeze is not None)


def _rank_share(loss, live_outputs, b: int, world: int, global_b: int):
    """This rank's loss scaled so that DDP's average over ranks of the gradients is the
    gradient of the global batch's mean loss: ``loss * b * world / global_b`` (1 when
    the global batch is split evenly; not when the last one is not)."""
    if b == 0:
        # Nothing to learn from, but DDP's reduction needs this rank's (zero) gradients.
        return sum(z.sum() for z in live_outputs) * 0.0
    return loss * (b * world / global_b)


def _frozen(model) -> list:
    """What ``freeze="backbone"`` keeps fixed: every stage and the final exit."""
    return [*model.stages, model.branches[-1]]


def trainable(model, freeze) -> list:
    """Every parameter, or with a frozen backbone those of the side branches only."""
    if freeze is None:
        return list(model.parameters())
    fixed = {id(p) for m in _frozen(model) for p in m.parameters()}
    return [p for p in model.branches[:-1].parameters() if id(p) not in fixed]


def forward_frozen(model, x) -> list:
    """``model(x)`` with the stages and the final exit outside autograd: the side branches
    are all that is trained, so backward stops at their inputs."""
    outputs = []
    last = model.num_exits - 1
    for n, (stage, branch) in enumerate(zip(model.stages, model.branches)):
        with torch.no_grad():
            x = stage(x)
            if n == last:
                outputs.append(branch(x))
        if n < last:
            outputs.append(branch(x))
    return outputs


def check_amp(amp, device: torch.device):
    """The autocast dtype of ``amp`` (None: off), refused where this device cannot run it."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"amp={amp!r}: torch has no autocast for device type {device.type!r}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp='bf16': {torch.cuda.get_device_name(device)} has no bfloat16; use amp='fp16'")
    return AMP_DTYPES[amp]
