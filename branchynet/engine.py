"""Batched early-exit inference.

Every sample leaves at the first side branch whose score (entropy by default) is below
that branch's threshold; the final classifier takes every sample left. After each exit
the exit op writes the leaving samples' results to their original rows and compacts the
survivors on the device; the engine reads back one number (the survivor count) and
gathers the survivors' features, so deeper stages run only on unresolved samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import check_thresholds, criterion_id
from .models.branchynet import BranchyNet
from .ops import kernels, resolve_backend

__all__ = ["EarlyExitEngine", "ExitResult"]


@dataclass
class ExitResult:
    """The answer for every input row, in input order.

    Attributes:
        logits: [B, C] the logits of the exit each sample took (dtype of the model's output).
        pred: [B] int64 predicted class.
        exit: [B] int64 0-based index of the exit taken.
        entropy: [B] float32 softmax entropy at that exit (NaN for NaN logits).
        counts: N ints, how many samples left at each exit (sums to B).
    """

    logits: torch.Tensor
    pred: torch.Tensor
    exit: torch.Tensor
    entropy: torch.Tensor
    counts: list

    @property
    def exit_fractions(self) -> list:
        """Fraction of the batch leaving at each exit."""
        total = sum(self.counts)
        return [c / total if total else 0.0 for c in self.counts]


class EarlyExitEngine:
    """Early-exit inference for a :class:`~branchynet.BranchyNet`.

    Args:
        model: the trained BranchyNet; the engine puts it in eval mode.
        thresholds: ``T_1 .. T_{N-1}`` for the side branches (default: the model's
            ``exit_config.thresholds``). Each >= 0; a sample leaves at exit n when its
            score is strictly below ``T_n``.
        backend: exit-op backend, ``"auto"`` (cuda > triton > torch on a GPU, cpp > torch
            on the CPU), ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"``.
        criterion: ``"entropy"`` (the paper's), ``"max_prob"`` or ``"margin"``
            (default: the model's ``exit_config.criterion``).

    Example:
        >>> engine = EarlyExitEngine(model, thresholds=[0.05])
        >>> res = engine(x)          # x [B, 1, 28, 28]
        >>> res.pred, res.exit, res.counts
    """

    def __init__(
        self,
        model: BranchyNet,
        thresholds: Sequence[float] | None = None,
        backend: str = "auto",
        criterion: str | None = None,
    ) -> None:
        if not isinstance(model, BranchyNet):
            raise TypeError(f"model must be a branchynet.BranchyNet, got {type(model).__name__}")
        self.model = model.eval()
        self.num_exits = model.num_exits
        cfg = model.exit_config
        self.thresholds = cfg.thresholds if thresholds is None else thresholds
        self.criterion = cfg.criterion if criterion is None else criterion
        criterion_id(self.criterion)
        self.backend = backend

    # -- configuration -------------------------------------------------------------------

    @property
    def thresholds(self) -> tuple:
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Sequence[float]) -> None:
        self._thresholds = check_thresholds(value, self.num_exits)

    @property
    def backend(self) -> str:
        """The exit-op backend asked for (``"auto"`` or a name); see :meth:`backend_for`."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value != "auto":
            # Refuse an unknown or unavailable backend now, not at the next call.
            resolve_backend(value, self._device())
        self._backend = value
        self._resolved: dict = {}  # device -> (backend name, exit_step, gather_rows)

    def backend_for(self, device: torch.device | str) -> str:
        """The backend that runs the exit op for inputs on ``device``."""
        return self._kernels(torch.device(device))[0]

    def _first_tensor(self) -> torch.Tensor | None:
        p = next(self.model.parameters(), None)
        return p if p is not None else next(self.model.buffers(), None)

    def _device(self) -> torch.device:
        p = self._first_tensor()
        return p.device if p is not None else torch.device("cpu")

    def _kernels(self, device: torch.device):
        # Resolved once per device: the lookup costs ~10 us, a B=1 LeNet sample ~200 us.
        got = self._resolved.get(device)
        if got is None:
            name = resolve_backend(self.backend, device)
            got = self._resolved[device] = (name, *kernels(name))
        return got

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.model.training:
            # Dropout and batch-norm statistics would make the answers random.
            raise RuntimeError("the model is in training mode: call model.eval() before inference")
        shape = self.model.input_shape
        if shape is not None:
            if x.dim() != len(shape) + 1:
                raise ValueError(
                    f"x must have shape [B, {', '.join(map(str, shape))}] (rank {len(shape) + 1}), "
                    f"got {tuple(x.shape)}"
                )
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"x must have shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")
        elif x.dim() < 1:
            raise ValueError("x must have a batch dimension (rank >= 1)")
        p = self._first_tensor()  # one lookup for the device and the dtype checks
        dev = p.device if p is not None else torch.device("cpu")
        if x.device != dev:
            raise ValueError(f"x is on {x.device} but the model is on {dev}; move one of them")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        # Under autocast the layers cast their inputs themselves; otherwise a mismatch
        # would fail deep inside the first stage with a less helpful message.
        if (p is not None and p.is_floating_point() and x.dtype != p.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x is {x.dtype} but the model's parameters are {p.dtype}; "
                            f"convert one of them (or run under torch.autocast)")

    # -- inference -----------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> ExitResult:
        """Batched early exit.

        Args:
            x: [B, ...] input batch (B may be 0), on the model's device.

        Returns:
            :class:`ExitResult` for every row of ``x``, in input order.
        """
        self._check_input(x)
        with torch.inference_mode():
            return self._run(x)

    def _run(self, x: torch.Tensor) -> ExitResult:
        backend, step, gather = self._kernels(x.device)
        cid = criterion_id(self.criterion)
        b = x.shape[0]
        rows = torch.arange(b, device=x.device)
        counts = [0] * self.num_exits
        out = None
        h = x
        k = b
        for n, (stage, branch) in enumerate(zip(self.model.stages, self.model.branches)):
            last = n == self.num_exits - 1
            h = stage(h)
            z = branch(h)
            if out is None:
                out = _alloc_outputs(b, z)
                if z.dtype == torch.float64 and backend == "triton":
                    raise TypeError("backend 'triton' takes float32/float16/bfloat16 logits; "
                                    "the model returns float64")
            elif z.dtype != out[0].dtype:
                raise TypeError(f"branch {n} returns {z.dtype} logits but branch 0 returns "
                                f"{out[0].dtype}; every exit must return one dtype")
            if k == 0:
                break
            threshold = 0.0 if last else self._thresholds[n]
            survivors, survivor_rows, count = step(z, rows, threshold, cid, n, last, *out)
            if last:
                counts[n] = k
                break
            # The one host read-back per exit: the survivor count (8 bytes).
            k_next = int(count.item())
            counts[n] = k - k_next
            k = k_next
            if k == 0:
                break
            rows = survivor_rows[:k]
            h = gather(h, survivors[:k])
        logits, pred, ex, ent = out
        return ExitResult(logits=logits, pred=pred, exit=ex, entropy=ent, counts=counts)

    @torch.inference_mode()
    def per_sample(self, x: torch.Tensor) -> ExitResult:
        """The paper's regime: one sample at a time (B = 1), each through every exit it
        needs, with a host decision per exit.

        Gives the same answers as :meth:`__call__`, and is the baseline the batched engine
        is timed against.
        """
        self._check_input(x)
        if x.shape[0] == 0:
            return self._run(x)
        results = [self._run(x[i:i + 1]) for i in range(x.shape[0])]
        return ExitResult(
            logits=torch.cat([r.logits for r in results]),
            pred=torch.cat([r.pred for r in results]),
            exit=torch.cat([r.exit for r in results]),
            entropy=torch.cat([r.entropy for r in results]),
            counts=[sum(c) for c in zip(*(r.counts for r in results))],
        )


def _alloc_outputs(b: int, z: torch.Tensor):
    if z.dim() != 2:
        raise ValueError(f"every branch must return logits [B, C], got shape {tuple(z.shape)}")
    c = z.shape[1]
    return (
        torch.empty(b, c, dtype=z.dtype, device=z.device),
        torch.empty(b, dtype=torch.int64, device=z.device),
        torch.empty(b, dtype=torch.int64, device=z.device),
        torch.empty(b, dtype=torch.float32, device=z.device),
    )
