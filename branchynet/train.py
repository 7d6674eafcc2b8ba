"""Training with the joint loss, and per-exit evaluation.

:func:`train` minimises ``L = sum_n w_n * CE(z_n, y)`` over all exits (the paper's
objective), optionally after the authors' warm-up of the main network alone
(``main_first_epochs``), and can save a checkpoint after every epoch and resume from it
bit for bit. :func:`evaluate` reports every exit's accuracy on every sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset, TensorDataset

from .config import ExitConfig, check_weights
from .data import DataSplits
from .distributed import (ShardedBatchSampler, all_reduce_sum, barrier, gather_objects, is_distributed, is_main,
                          rank, shard_range, world_size)
from .loss import joint_loss
from .models.branchynet import BranchyNet

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainHistory", "evaluate", "train"]

OPTIMIZERS = ("adam", "adamw", "sgd")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FREEZE = (None, "backbone")
SCHEDULES = (None, "cosine")


@dataclass
class TrainHistory:
    """Per-epoch record of a training run; ``N`` = number of exits.

    Attributes:
        epoch: 1-based epoch numbers.
        lr: learning rate used in each epoch.
        weights: the N joint-loss weights used in each epoch (``(0, .., 0, 1)`` during
            the main-network warm-up).
        train_loss: mean joint loss over the epoch's batches (weighted by batch size),
            with that epoch's weights.
        train_exit_loss: [epochs][N] mean cross-entropy of each exit.
        train_acc: [epochs][N] accuracy of each exit on the training batches, as seen
            during the epoch (the model changes while it is measured).
        val_loss, val_exit_loss, val_acc: the same on the val set after the epoch, with
            the model in eval mode (empty when there is no val set).
        seconds: wall time of each epoch.
    """

    epoch: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    train_exit_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_exit_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epoch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainHistory":
        return cls(**{f.name: [(list(v) if isinstance(v, (list, tuple)) else v) for v in d.get(f.name, [])]
                      for f in fields(cls)})


def train(
    model: BranchyNet,
    data,
    *,
    val=None,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    batch_size: int = 64,
    weights: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    main_first_epochs: int = 0,
    schedule: str | None = None,
    log: Callable[[str], None] | None = None,
    extra: dict | None = None,
    amp: str | None = None,
    freeze: str | None = None,
    distill: float = 0.0,
    temperature: float = 3.0,
) -> TrainHistory:
    """Train a BranchyNet with the joint loss.

    Args:
        model: the BranchyNet; trained in place (and moved to ``device``).
        data: a :class:`~branchynet.data.DataSplits` (trains on ``train``, reports on
            ``val``), a ``Dataset`` of ``(x [C, H, W], y)`` or a ``DataLoader`` of
            ``(x [B, C, H, W], y [B])`` batches.
        val: a Dataset or DataLoader to report on after every epoch (overrides the
            splits' ``val``).
        epochs: total number of epochs, warm-up included.
        lr: (peak) learning rate.
        optimizer: ``"adam"`` (the authors'), ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        weight_decay: the optimizer's weight decay.
        momentum: SGD momentum.
        batch_size: for loaders built here.
        weights: the N joint-loss weights (default ``model.exit_config.weights``). Exits
            with weight 0, and stages after the last exit with a non-zero weight, get no
            gradient and are not touched by the optimizer.
        device: where to train.
        seed: seeds ``torch`` once at the start and the shuffling of each epoch
            (``seed`` and the epoch number), so a run is reproducible on one machine.
        checkpoint: a path; the model, optimizer, epoch, RNG states and history are saved
            there after every epoch (:func:`branchynet.checkpoint.save_checkpoint`; the
            model needs ``model.arch``).
        resume: continue from ``checkpoint`` if the file exists (a fresh start if not),
            keeping its thresholds, criterion and temperature record (``calibrate --write``).
            The resumed run gives the same weights as an uninterrupted one with the same
            arguments (``epochs`` may be larger; with ``schedule="cosine"`` it must be the
            same, as it sets the schedule's length).
        progress: a tqdm bar over each epoch's batches (hidden when stderr is not a tty).
        main_first_epochs: the authors' recipe: train only the final exit (weights
            ``(0, .., 0, 1)``) for this many epochs before the joint training.
        schedule: ``None`` (constant lr) or ``"cosine"`` (per epoch, from ``lr`` towards 0).
        log: called with a one-line summary after every epoch (e.g. ``print``).
        extra: plain data saved in every checkpoint beside the training state (e.g. the
            data set's name, so ``branchynet calibrate`` finds it).
        amp: mixed precision: ``None`` (off, float32), ``"bf16"`` or ``"fp16"``: the
            forward pass and the loss run under ``torch.autocast`` at that dtype (the
            weights and the optimizer stay float32); ``"fp16"`` also scales the loss
            with a ``torch.amp.GradScaler`` so that small gradients do not underflow.
        freeze: ``None`` (train everything with the joint loss) or ``"backbone"``: train
            only the side branches, as on a pretrained backbone. The stages and the final
            exit run in eval mode without autograd (batch-norm statistics included, they
            stay bit-identical); the final exit's term leaves the loss.
        distill: share of the self-distillation term in each side exit's loss (SDN /
            BYOT style, the final exit as teacher; see :func:`branchynet.joint_loss`).
        temperature: the distillation temperature ``T``.

    Data parallel: when a process group of more than one process is initialised (by
    :func:`branchynet.distributed.init_from_env` under torchrun), the model is wrapped in
    ``DistributedDataParallel``; ``batch_size`` is the global batch, each rank takes its
    part of every global batch of the 1-process order (so ``W`` ranks give the weights
    that one process gives, to float rounding, BatchNorm and dropout aside), train and
    val statistics are summed over ranks, and only rank 0 shows progress, calls ``log``
    and writes ``checkpoint``. Every rank must call ``train`` with the same arguments;
    a ``DataLoader`` given as ``data`` is used as is (shard it yourself).

    Returns:
        :class:`TrainHistory`, one entry per epoch (resumed runs include the epochs
        before the checkpoint).

    Raises:
        TypeError: ``model`` is not a BranchyNet, or ``data`` of an unknown type.
        ValueError: bad arguments; ``checkpoint`` given for a model without ``arch``.
        CheckpointError: ``resume`` from a checkpoint trained with another ``optimizer``,
            ``arch``, ``freeze``, ``amp`` or ``distill``, or without training state.
    """
    from .checkpoint import CheckpointError, read_checkpoint, rng_state, save_checkpoint, set_rng_state

    if not isinstance(model, BranchyNet):
        raise TypeError(f"model must be a branchynet.BranchyNet, got {type(model).__name__}")
    _check_int("epochs", epochs, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("main_first_epochs", main_first_epochs, 0)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if checkpoint is not None and model.arch is None:
        raise ValueError(
            "checkpoint= needs a model built by a registered factory (model.arch is None: "
            "models from from_stages/from_sequential cannot be rebuilt by name); train "
            "without checkpoint= and save model.state_dict() yourself"
        )
    n_exits = model.num_exits
    weights = check_weights(model.exit_config.weights if weights is None else weights, n_exits)
    main_only = (0.0,) * (n_exits - 1) + (1.0,)
    if freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {freeze!r}")
    if freeze is not None:
        if main_first_epochs:
            raise ValueError("main_first_epochs trains the final exit alone, which "
                             "freeze='backbone' keeps fixed; use one or the other")
        if not any(wk > 0 for wk in weights[:-1]):
            raise ValueError(f"freeze='backbone' trains the side branches, but every side exit's "
                             f"weight is 0 (weights {weights}); give one a weight > 0")
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {distill}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")

    device = torch.device(device)
    amp_dtype = _check_amp(amp, device)
    model.to(device)
    train_loader, val_data = _loaders(data, val, batch_size, device)
    shuffle_gen = getattr(train_loader, "_branchynet_generator", None)
    ddp, ddp_w = None, None
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    opt = _make_optimizer(optimizer, _trainable(model, freeze), lr, weight_decay, momentum)

    history = TrainHistory()
    start = 0
    ckpt = None
    folded = None  # temperatures folded into the weights (a record kept across saves)
    if resume and Path(checkpoint).exists():
        ckpt = read_checkpoint(checkpoint, map_location=device)
        if ckpt["arch"].get("name") != model.arch.get("name"):
            raise CheckpointError(
                f"{checkpoint} holds a {ckpt['arch'].get('name')!r}, not this "
                f"{model.arch.get('name')!r}; cannot resume"
            )
        state = (ckpt.get("extra") or {}).get("train")
        if state is None or ckpt.get("optimizer") is None or ckpt.get("rng") is None:
            raise CheckpointError(f"{checkpoint} has no training state to resume from")
        # A setting that changes the optimizer's groups, the parameters or the loss cannot
        # change halfway through a run. Checkpoints older than these records skip the check.
        kwargs = {k: v for k, v in (model.arch.get("kwargs") or {}).items() if k != "exit_config"}
        for name, want in (("optimizer", optimizer), ("arch", _plain({**model.arch, "kwargs": kwargs})),
                           ("freeze", freeze), ("amp", amp), ("distill", distill)):
            got = _plain(ckpt["arch"]) if name == "arch" else state.get(name, want)
            if got != want:
                raise CheckpointError(
                    f"{checkpoint} was trained with {name}={got!r}, this run asks for {name}="
                    f"{want!r}; resume with the same {name} (or train afresh without --resume)"
                )
        model.load_state_dict(ckpt["state_dict"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        # Calibration (`calibrate --write`) may have set thresholds and folded temperatures
        # into the weights: keep them; the loss weights stay this run's.
        saved_cfg = ExitConfig.from_dict(ckpt["exit_config"])
        model.exit_config.thresholds = saved_cfg.thresholds
        model.exit_config.criterion = saved_cfg.criterion
        folded = ckpt.get("temperature")
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        start = int(ckpt["epoch"])
        history = TrainHistory.from_dict(state["history"])
    else:
        # Rank 0 draws what one process draws; other ranks' dropout masks differ from it.
        torch.manual_seed(seed + rank())

    if ckpt is not None:
        # Restored last, after everything above that might draw random numbers.
        set_rng_state(ckpt["rng"])
        rng_ranks = ckpt["extra"]["train"].get("rng_ranks")
        if is_distributed() and rng_ranks and len(rng_ranks) == world_size():
            set_rng_state(rng_ranks[rank()])
        gen_state = ckpt["extra"]["train"].get("loader_generator")
        if gen_state is not None and getattr(train_loader, "generator", None) is not None:
            train_loader.generator.set_state(gen_state)

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        w = main_only if epoch < main_first_epochs else weights
        lr_e = lr if schedule is None else lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        for g in opt.param_groups:
            g["lr"] = lr_e
        if is_distributed() and w != ddp_w:
            ddp = None  # its reducer's hooks go with it, before the new one adds its own
            ddp, ddp_w = _wrap_ddp(model, device, w, freeze), w
        if shuffle_gen is not None:
            # Each epoch's order depends on (seed, epoch) only, so resuming needs no
            # sampler state.
            shuffle_gen.manual_seed(_epoch_seed(seed, epoch))
        stats = _train_epoch(model, train_loader, opt, w, device, progress and is_main(),
                             desc=f"epoch {epoch + 1}/{epochs}", ddp=ddp, amp_dtype=amp_dtype, scaler=scaler,
                             freeze=freeze, distill=distill, temperature=temperature)
        history.epoch.append(epoch + 1)
        history.lr.append(lr_e)
        history.weights.append(list(w))
        history.train_loss.append(stats["joint_loss"])
        history.train_exit_loss.append(stats["loss"])
        history.train_acc.append(stats["acc"])
        if val_data is not None:
            v = evaluate(model, val_data, device=device, batch_size=max(256, batch_size), weights=w)
            history.val_loss.append(v["joint_loss"])
            history.val_exit_loss.append(v["loss"])
            history.val_acc.append(v["acc"])
        history.seconds.append(time.perf_counter() - t0)
        # Every rank's RNG state, so that a resumed run draws what this one would have.
        rng_ranks = gather_objects(rng_state()) if checkpoint is not None and is_distributed() else None
        if checkpoint is not None and is_main():
            gen = getattr(train_loader, "generator", None)
            save_checkpoint(
                checkpoint, model, optimizer=opt, epoch=epoch + 1, rng=True,
                extra={**(extra or {}), "train": {
                    "history": history.to_dict(),
                    "optimizer": optimizer,
                    "seed": seed,
                    "loader_generator": gen.get_state() if gen is not None and shuffle_gen is None else None,
                    "rng_ranks": rng_ranks,
                    "grad_scaler": scaler.state_dict() if scaler is not None else None,
                    "freeze": freeze,
                    "amp": amp,
                    "distill": distill,
                }}, temperature=folded,
            )
        if checkpoint is not None:
            barrier()  # no rank goes on (and reads the file: resume) before it is written
        if log is not None and is_main():
            log(_summary(history))
    model.eval()
    return history


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
        data = _shard(data)
    loader = data if isinstance(data, DataLoader) else _eval_loader(data, batch_size, device)
    was_training = model.training
    model.to(device).eval()
    n = 0
    correct = torch.zeros(model.num_exits, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(model.num_exits, dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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


# -- internals -----------------------------------------------------------------------------


def _train_epoch(model, loader, opt, w, device, progress, desc, ddp=None, amp_dtype=None, scaler=None,
                 freeze=None, distill=0.0, temperature=3.0) -> dict:
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
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = forward(x) if freeze is None or ddp is not None else _forward_frozen(model, x)
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


def _loaders(data, val, batch_size: int, device: torch.device):
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


def _eval_loader(ds, batch_size: int, device: torch.device) -> DataLoader:
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


def _shard(ds):
    """This rank's contiguous part of a Dataset (a TensorDataset stays one, for the
    batched fast path)."""
    part = shard_range(len(ds))
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[part.start:part.stop] for t in ds.tensors))
    return Subset(ds, part)


class _LiveExits(torch.nn.Module):
    """What DDP wraps: the model, with the outputs of exits not in the loss detached, so
    that DDP's search for parameters without a gradient does not wait for theirs."""

    def __init__(self, model: BranchyNet, freeze: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.freeze = freeze
        self.live = list(range(model.num_exits))

    def forward(self, x):
        outs = self.model(x) if self.freeze is None else _forward_frozen(self.model, x)
        return [z if k in self.live else z.detach() for k, z in enumerate(outs)]


def _wrap_ddp(model, device, w, freeze=None):
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


def _check_amp(amp, device: torch.device):
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"amp={amp!r}: torch has no autocast for device type {device.type!r}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp='bf16': {torch.cuda.get_device_name(device)} has no bfloat16; use amp='fp16'")
    return AMP_DTYPES[amp]

def _frozen(model) -> list:
    return [*model.stages, model.branches[-1]]


def _trainable(model, freeze) -> list:
    """Every parameter, or with a frozen backbone those of the side branches only."""
    if freeze is None:
        return list(model.parameters())
    fixed = {id(p) for m in _frozen(model) for p in m.parameters()}
    return [p for p in model.branches[:-1].parameters() if id(p) not in fixed]


def _forward_frozen(model, x) -> list:
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


def _make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible per (seed, epoch); a large odd multiplier keeps seed s,
    # epoch e+1 from colliding with seed s+1, epoch e.
    return (seed * 1_000_003 + epoch) % (2**63)


def _plain(obj):
    """Tuples as lists (a checkpoint may hold either), to compare records by value."""
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _summary(h: TrainHistory) -> str:
    parts = [f"epoch {h.epoch[-1]}", f"lr {h.lr[-1]:.3g}", f"loss {h.train_loss[-1]:.4f}",
             "train acc " + "/".join(f"{a:.4f}" for a in h.train_acc[-1])]
    if h.val_acc:
        parts.append(f"val loss {h.val_loss[-1]:.4f}")
        parts.append("val acc " + "/".join(f"{a:.4f}" for a in h.val_acc[-1]))
    parts.append(f"{h.seconds[-1]:.1f}s")
    return ", ".join(parts)
