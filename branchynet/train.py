"""Training with the joint loss, and per-exit evaluation.

:func:`train` minimises ``L = sum_n w_n * CE(z_n, y)`` over all exits (the paper's
objective), optionally after the authors' warm-up of the main network alone
(``main_first_epochs``), and can save a checkpoint after every epoch and resume from it
bit for bit. Its options are one :class:`TrainSettings`; the loop is a few small steps:
resume (:func:`_resume`), one epoch (:func:`branchynet.epoch.train_epoch`), the record
(:func:`_record_epoch`), the checkpoint (:func:`_checkpoint_payload`).
:func:`evaluate` (from :mod:`branchynet.evaluation`) reports every exit's accuracy on
every sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import CheckpointError, read_checkpoint, rng_state, set_rng_state
from .config import ExitConfig, check_weights
from .distributed import barrier, gather_objects, is_distributed, is_main, rank, world_size
from .epoch import AMP_DTYPES  # noqa: F401 (still importable from here)
from .epoch import check_amp, train_epoch, trainable, wrap_ddp
from .evaluation import evaluate
from .loaders import train_loaders
from .models.branchynet import BranchyNet

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainHistory", "TrainSettings", "evaluate", "train"]

OPTIMIZERS = ("adam", "adamw", "sgd")
FREEZE = (None, "backbone")
SCHEDULES = (None, "cosine")


@dataclass
class TrainSettings:
    """The options of one training run (every keyword argument of :func:`train`).

    Attributes:
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
            settings (``epochs`` may be larger; with ``schedule="cosine"`` it must be the
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
    """

    epochs: int = 5
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 64
    weights: Sequence[float] | None = None
    device: str | torch.device = "cpu"
    seed: int = 0
    checkpoint: str | Path | None = None
    resume: bool = False
    progress: bool = True
    main_first_epochs: int = 0
    schedule: str | None = None
    log: Callable[[str], None] | None = None
    extra: dict | None = None
    amp: str | None = None
    freeze: str | None = None
    distill: float = 0.0
    temperature: float = 3.0

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch``."""
        if self.schedule is None:
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


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


def train(model: BranchyNet, data, settings: TrainSettings | None = None, *, val=None,
          **kwargs) -> TrainHistory:
    """Train a BranchyNet with the joint loss.

    Args:
        model: the BranchyNet; trained in place (and moved to ``settings.device``).
        data: a :class:`~branchynet.data.DataSplits` (trains on ``train``, reports on
            ``val``), a ``Dataset`` of ``(x [C, H, W], y)`` or a ``DataLoader`` of
            ``(x [B, C, H, W], y [B])`` batches.
        settings: a :class:`TrainSettings` (default: its defaults).
        val: a Dataset or DataLoader to report on after every epoch (overrides the
            splits' ``val``).
        **kwargs: any :class:`TrainSettings` field (``epochs=``, ``lr=``, ...), building
            the settings or overriding those of ``settings``.

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
        TypeError: ``model`` is not a BranchyNet, ``data`` of an unknown type, a keyword
            that is not a :class:`TrainSettings` field.
        ValueError: bad settings; ``checkpoint`` given for a model without ``arch``.
        CheckpointError: ``resume`` from a checkpoint trained with another ``optimizer``,
            ``arch``, ``freeze``, ``amp`` or ``distill``, or without training state.
    """
    s = _settings(settings, kwargs)
    weights = _check_settings(model, s)
    device = torch.device(s.device)
    amp_dtype = check_amp(s.amp, device)
    model.to(device)
    loader, val_data = train_loaders(data, val, s.batch_size, device)
    run = _Run(model, s, device, loader,
               opt=_make_optimizer(s.optimizer, trainable(model, s.freeze), s.lr, s.weight_decay, s.momentum),
               scaler=torch.amp.GradScaler(device.type) if s.amp == "fp16" else None)
    ckpt = _resume(run) if s.resume and Path(s.checkpoint).exists() else None
    if ckpt is None:
        # Rank 0 draws what one process draws; other ranks' dropout masks differ from it.
        torch.manual_seed(s.seed + rank())
    else:
        _restore_rng(run, ckpt)  # last, after everything above that might draw random numbers
    main_only = (0.0,) * (model.num_exits - 1) + (1.0,)
    for epoch in range(run.start, s.epochs):
        t0 = time.perf_counter()
        w = main_only if epoch < s.main_first_epochs else weights
        stats = _train_one_epoch(run, epoch, w, amp_dtype)
        v = None
        if val_data is not None:
            v = evaluate(model, val_data, device=device, batch_size=max(256, s.batch_size), weights=w)
        _record_epoch(run.history, epoch, s.lr_at(epoch), w, stats, v, time.perf_counter() - t0)
        if s.checkpoint is not None:
            _save_epoch(run, epoch)
        if s.log is not None and is_main():
            s.log(_summary(run.history))
    model.eval()
    return run.history


@dataclass
class _Run:
    """What one call of :func:`train` carries from epoch to epoch."""

    model: BranchyNet
    settings: TrainSettings
    device: torch.device
    loader: object
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    history: TrainHistory = field(default_factory=TrainHistory)
    start: int = 0  # the first epoch to run (0-based): the checkpoint's epoch when resumed
    folded: object = None  # temperatures folded into the weights (a record kept across saves)
    ddp: object = None
    ddp_weights: tuple | None = None

    @property
    def shuffle_gen(self):
        """The generator of the loader's shuffling, when the loader was built here."""
        return getattr(self.loader, "_branchynet_generator", None)


def _settings(settings: TrainSettings | None, kwargs: dict) -> TrainSettings:
    known = [f.name for f in fields(TrainSettings)]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise TypeError(f"train() got an unexpected keyword argument {unknown[0]!r} "
                        f"(the settings are TrainSettings' fields: {', '.join(known)})")
    if settings is None:
        return TrainSettings(**kwargs)
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a branchynet.TrainSettings, got {type(settings).__name__}")
    return replace(settings, **kwargs)


def _check_settings(model, s: TrainSettings) -> tuple:
    """Refuse a bad model or settings before anything moves; the checked loss weights."""
    if not isinstance(model, BranchyNet):
        raise TypeError(f"model must be a branchynet.BranchyNet, got {type(model).__name__}")
    _check_int("epochs", s.epochs, 0)
    _check_int("batch_size", s.batch_size, 1)
    _check_int("main_first_epochs", s.main_first_epochs, 0)
    if s.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {s.optimizer!r}")
    if s.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {s.schedule!r}")
    if not (s.lr > 0 and math.isfinite(s.lr)):
        raise ValueError(f"lr must be a positive number, got {s.lr}")
    if s.resume and s.checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if s.checkpoint is not None and model.arch is None:
        raise ValueError(
            "checkpoint= needs a model built by a registered factory (model.arch is None: "
            "models from from_stages/from_sequential cannot be rebuilt by name); train "
            "without checkpoint= and save model.state_dict() yourself"
        )
    weights = check_weights(model.exit_config.weights if s.weights is None else s.weights, model.num_exits)
    if s.freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {s.freeze!r}")
    if s.freeze is not None:
        if s.main_first_epochs:
            raise ValueError("main_first_epochs trains the final exit alone, which "
                             "freeze='backbone' keeps fixed; use one or the other")
        if not any(wk > 0 for wk in weights[:-1]):
            raise ValueError(f"freeze='backbone' trains the side branches, but every side exit's "
                             f"weight is 0 (weights {weights}); give one a weight > 0")
    if not 0.0 <= s.distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {s.distill}")
    if not (s.temperature > 0 and math.isfinite(s.temperature)):
        raise ValueError(f"temperature must be a positive number, got {s.temperature}")
    return weights


def _resume(run: _Run) -> dict:
    """Load the model, optimizer, grad scaler, history and epoch from the checkpoint, after
    checking that it was trained with this run's settings; the raw checkpoint (its RNG
    states are restored last, by :func:`_restore_rng`)."""
    s, model, path = run.settings, run.model, run.settings.checkpoint
    ckpt = read_checkpoint(path, map_location=run.device)
    if ckpt["arch"].get("name") != model.arch.get("name"):
        raise CheckpointError(
            f"{path} holds a {ckpt['arch'].get('name')!r}, not this "
            f"{model.arch.get('name')!r}; cannot resume"
        )
    state = (ckpt.get("extra") or {}).get("train")
    if state is None or ckpt.get("optimizer") is None or ckpt.get("rng") is None:
        raise CheckpointError(f"{path} has no training state to resume from")
    # A setting that changes the optimizer's groups, the parameters or the loss cannot
    # change halfway through a run. Checkpoints older than these records skip the check.
    kwargs = {k: v for k, v in (model.arch.get("kwargs") or {}).items() if k != "exit_config"}
    for name, want in (("optimizer", s.optimizer), ("arch", _plain({**model.arch, "kwargs": kwargs})),
                       ("freeze", s.freeze), ("amp", s.amp), ("distill", s.distill)):
        got = _plain(ckpt["arch"]) if name == "arch" else state.get(name, want)
        if got != want:
            raise CheckpointError(
                f"{path} was trained with {name}={got!r}, this run asks for {name}="
                f"{want!r}; resume with the same {name} (or train afresh without --resume)"
            )
    model.load_state_dict(ckpt["state_dict"], strict=True)
    run.opt.load_state_dict(ckpt["optimizer"])
    # Calibration (`calibrate --write`) may have set thresholds and folded temperatures
    # into the weights: keep them; the loss weights stay this run's.
    saved_cfg = ExitConfig.from_dict(ckpt["exit_config"])
    model.exit_config.thresholds = saved_cfg.thresholds
    model.exit_config.criterion = saved_cfg.criterion
    run.folded = ckpt.get("temperature")
    if run.scaler is not None and state.get("grad_scaler"):
        run.scaler.load_state_dict(state["grad_scaler"])
    run.start = int(ckpt["epoch"])
    run.history = TrainHistory.from_dict(state["history"])
    return ckpt


def _restore_rng(run: _Run, ckpt: dict) -> None:
    """The RNG states of the checkpoint (this rank's, under torchrun) and of the loader's
    generator, so that the resumed run draws what the uninterrupted one would have."""
    set_rng_state(ckpt["rng"])
    state = ckpt["extra"]["train"]
    rng_ranks = state.get("rng_ranks")
    if is_distributed() and rng_ranks and len(rng_ranks) == world_size():
        set_rng_state(rng_ranks[rank()])
    gen_state = state.get("loader_generator")
    if gen_state is not None and getattr(run.loader, "generator", None) is not None:
        run.loader.generator.set_state(gen_state)


def _train_one_epoch(run: _Run, epoch: int, w: tuple, amp_dtype) -> dict:
    """Set the epoch's learning rate, DDP wrapper and shuffling, then run it."""
    s = run.settings
    for g in run.opt.param_groups:
        g["lr"] = s.lr_at(epoch)
    if is_distributed() and w != run.ddp_weights:
        run.ddp = None  # its reducer's hooks go with it, before the new one adds its own
        run.ddp, run.ddp_weights = wrap_ddp(run.model, run.device, w, s.freeze), w
    if run.shuffle_gen is not None:
        # Each epoch's order depends on (seed, epoch) only, so resuming needs no
        # sampler state.
        run.shuffle_gen.manual_seed(_epoch_seed(s.seed, epoch))
    return train_epoch(run.model, run.loader, run.opt, w, run.device, s.progress and is_main(),
                       desc=f"epoch {epoch + 1}/{s.epochs}", ddp=run.ddp, amp_dtype=amp_dtype,
                       scaler=run.scaler, freeze=s.freeze, distill=s.distill, temperature=s.temperature)


def _record_epoch(history: TrainHistory, epoch: int, lr: float, w, stats: dict, val: dict | None,
                  seconds: float) -> None:
    history.epoch.append(epoch + 1)
    history.lr.append(lr)
    history.weights.append(list(w))
    history.train_loss.append(stats["joint_loss"])
    history.train_exit_loss.append(stats["loss"])
    history.train_acc.append(stats["acc"])
    if val is not None:
        history.val_loss.append(val["joint_loss"])
        history.val_exit_loss.append(val["loss"])
        history.val_acc.append(val["acc"])
    history.seconds.append(seconds)


def _save_epoch(run: _Run, epoch: int) -> None:
    """Rank 0 writes the checkpoint after ``epoch``; every rank waits for it."""
    # Looked up when called, so that a wrapper put on branchynet.checkpoint.save_checkpoint
    # sees every save (the torchrun test counts them with one).
    from .checkpoint import save_checkpoint

    # Every rank's RNG state, so that a resumed run draws what this one would have.
    rng_ranks = gather_objects(rng_state()) if is_distributed() else None
    if is_main():
        save_checkpoint(run.settings.checkpoint, run.model, optimizer=run.opt, epoch=epoch + 1, rng=True,
                        extra=_checkpoint_payload(run, rng_ranks), temperature=run.folded)
    barrier()  # no rank goes on (and reads the file: resume) before it is written


def _checkpoint_payload(run: _Run, rng_ranks: list | None) -> dict:
    """The checkpoint's ``extra``: the caller's ``extra`` and, under ``"train"``, what
    resuming needs and the settings it checks."""
    s = run.settings
    gen = getattr(run.loader, "generator", None)
    return {**(s.extra or {}), "train": {
        "history": run.history.to_dict(),
        "optimizer": s.optimizer,
        "seed": s.seed,
        "loader_generator": gen.get_state() if gen is not None and run.shuffle_gen is None else None,
        "rng_ranks": rng_ranks,
        "grad_scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "freeze": s.freeze,
        "amp": s.amp,
        "distill": s.distill,
    }}


# -- internals -----------------------------------------------------------------------------


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
