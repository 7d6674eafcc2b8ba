"""The score table: every exit's score and prediction on a data set from one pass, and
any threshold combination scored from it exactly as the engine decides."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CRITERIA
from ..exits import exit_scores
from ..models.branchynet import BranchyNet

__all__ = ["ExitTable", "collect_exit_outputs", "score_thresholds", "candidate_thresholds", "check_split"]


@dataclass
class ExitTable:
    """Every exit's score and prediction on a data set.

    Attributes:
        score: [N, M] float64, the criterion's score of each of M samples at each exit.
        pred: [N, M] int64 predictions.
        target: [M] int64 labels.
        criterion: the criterion the scores are for.
        score_dtype: the dtype the engine computes and compares the scores in (float32,
            or float64 for a float64 model); default: float32 when every score is a
            float32 value, else float64.
        num_classes: C, the labels' range [0, C), when known.
    """

    score: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    criterion: str = "entropy"
    score_dtype: torch.dtype | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.score_dtype is None:
            s = self.score[torch.isfinite(self.score)]
            exact32 = bool((s.float().double() == s).all())
            self.score_dtype = torch.float32 if exact32 else torch.float64
        if self.score_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"score_dtype must be torch.float32 or torch.float64, got {self.score_dtype}")

    @property
    def num_exits(self) -> int:
        return self.score.shape[0]

    def exit_accuracy(self) -> list:
        """Accuracy of each exit on every sample."""
        return (self.pred == self.target).float().mean(dim=1).tolist()


@torch.inference_mode()
def collect_exit_outputs(model: BranchyNet, data, *, criterion: str | None = None,
                         batch_size: int = 256, device: str | torch.device = "cpu") -> ExitTable:
    """One pass over ``data`` computing every exit's score and prediction.

    Args:
        data: a Dataset of ``(x, y)`` or a DataLoader.
    """
    criterion = criterion or model.exit_config.criterion
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    scores, preds, targets = [], [], []
    try:
        for x, y in loader:
            outs = model(x.to(device))
            scored = [exit_scores(z, criterion) for z in outs]  # (score, entropy, pred) per exit
            # float64: the exact values the engine compares with the thresholds
            scores.append(torch.stack([sc for sc, _, _ in scored]).double().cpu())
            preds.append(torch.stack([pr for _, _, pr in scored]).cpu())
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    if not targets:
        raise ValueError("data is empty: calibration needs at least one sample")
    return ExitTable(torch.cat(scores, 1), torch.cat(preds, 1), torch.cat(targets), criterion,
                     score_dtype=torch.float64 if outs[0].dtype == torch.float64 else torch.float32,
                     num_classes=outs[0].shape[1])


def check_split(nan: torch.Tensor, target: torch.Tensor, num_classes: int | None) -> None:
    """Refuse a validation split that calibration cannot score honestly, before anything
    is fitted or folded: a label outside [0, C) (no exit can predict it, yet the final
    exit's accuracy would fall with the others' and the target be "met"), and samples
    whose scores are NaN (no threshold is ever met by NaN: they would all be counted at
    the final exit, and with every score NaN the search returns thresholds of 0).

    Args:
        nan: [N, M] or [M] bool, True where a sample's score (or logits) at an exit is NaN.
        target: [M] int64 labels.
        num_classes: C, or None when unknown (then only negative labels are refused).

    Raises:
        ValueError: naming how many samples and the first one.
    """
    m = target.shape[0]
    low, high = 0, num_classes if num_classes is not None else None
    bad = (target < low) if high is None else (target < low) | (target >= high)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        classes = f"[0, {high}) (the model's {high} classes)" if high is not None else "[0, C)"
        raise ValueError(f"validation labels must be in {classes}; got {int(target[i])} at index {i} "
                         f"({int(bad.sum())} of {m} samples outside)")
    rows = nan.reshape(-1, m).any(0)
    if bool(rows.any()):
        i = int(rows.nonzero()[0])
        exits = nan.reshape(-1, m)[:, i].nonzero().flatten().tolist()
        raise ValueError(
            f"{int(rows.sum())} of {m} validation samples give NaN scores (first at index {i}, at "
            f"exit(s) {exits}): calibration needs finite logits; drop those samples (inputs "
            f"holding NaN?) or fix the model")


def _engine_thresholds(table: ExitTable, thresholds: torch.Tensor) -> torch.Tensor:
    """Thresholds as the engine compares them: rounded to the scores' dtype (every
    backend tests ``score < T`` with T cast to the score's float32 or float64)."""
    return thresholds.to(table.score_dtype).to(torch.float64)


def _count_exits(table: ExitTable, thresholds: torch.Tensor):
    """``(correct [G] int64, counts [G, N] int64)`` for G combinations, scored in chunks
    so that memory stays below ~16 M booleans whatever G is."""
    n, m = table.score.shape
    thresholds = _engine_thresholds(table, thresholds)
    correct_all = table.pred == table.target[None]                            # [N, M]
    chunk = max(1, (1 << 24) // max(1, n * m))
    corrects, counts = [], []
    for g0 in range(0, thresholds.shape[0], chunk):
        t = thresholds[g0:g0 + chunk]
        g = t.shape[0]
        leave = table.score[None, : n - 1, :] < t[:, :, None]                 # [g, N-1, M]
        leave = torch.cat([leave, torch.ones(g, 1, m, dtype=torch.bool)], dim=1)  # last takes all
        exit_idx = leave.to(torch.uint8).argmax(dim=1)                        # first exit taken
        corrects.append(correct_all.gather(0, exit_idx).sum(dim=1))
        flat = (exit_idx + n * torch.arange(g)[:, None]).reshape(-1)
        counts.append(torch.bincount(flat, minlength=g * n).reshape(g, n))
    if not corrects:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, n, dtype=torch.int64)
    return torch.cat(corrects), torch.cat(counts)


def score_thresholds(table: ExitTable, thresholds: torch.Tensor):
    """Score G threshold combinations from the cached exit scores, as the engine decides.

    Args:
        table: from :func:`collect_exit_outputs` (N exits, M samples).
        thresholds: [G, N-1] float, one combination per row.

    Returns:
        ``(accuracy [G] float64, fractions [G, N] float64)``.
    """
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    n, m = table.score.shape
    if thresholds.dim() != 2 or thresholds.shape[1] != n - 1:
        raise ValueError(f"thresholds must have shape [G, {n - 1}], got {tuple(thresholds.shape)}")
    correct, counts = _count_exits(table, thresholds)
    return correct.double() / m, counts.double() / m


def _split(lo: float, hi: float, dtype: torch.dtype) -> float:
    """A threshold T with ``lo < T <= hi`` in ``dtype`` (lo < hi there): the midpoint
    rounded to ``dtype`` when it stays above lo, else hi itself (adjacent values)."""
    mid = float(torch.tensor((lo + hi) / 2, dtype=torch.float64).to(dtype))
    return mid if lo < mid <= hi else hi


def candidate_thresholds(table: ExitTable, per_exit: int = 20) -> list:
    """Candidate T values for each side branch: 0 (nobody leaves), ``per_exit`` cuts at
    quantiles of the branch's scores, and a value above every score (everyone leaves).

    Each cut lies half-way between two neighbouring distinct scores, never on a score:
    then a backend whose rounding differs in the last bits (fp32 GPU kernels, the fp64
    reference) makes the same decision for every sample the sweep was scored on. Cuts
    are values of the engine's dtype (``table.score_dtype``): a float64 midpoint of two
    adjacent float32 scores would round onto one of them when the engine casts it.
    """
    out = []
    dt = table.score_dtype
    for s in table.score[:-1]:
        u = torch.unique(s[torch.isfinite(s)].double())  # sorted
        if u.numel() == 0:
            out.append([0.0])
            continue
        top = float(torch.tensor(float(u[-1]) * (1 + 1e-6) + 1e-9, dtype=torch.float64).to(dt))
        if not top > float(u[-1]):
            top = float(torch.nextafter(torch.tensor(float(u[-1]), dtype=dt), torch.tensor(float("inf"), dtype=dt)))
        vals = {0.0, top}
        if u.numel() > 1:
            pos = torch.linspace(0, u.numel() - 2, min(per_exit, u.numel() - 1), dtype=torch.float64)
            for p in pos:
                i = int(round(float(p)))
                vals.add(_split(float(u[i]), float(u[i + 1]), dt))
        out.append(sorted(v for v in vals if v >= 0))
    return out


def _first_inputs(data, limit: int) -> torch.Tensor:
    """The first ``limit`` inputs of ``data`` (a Dataset of ``(x, y)`` or a DataLoader)."""
    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=min(limit, 1024), shuffle=False)
    xs, got = [], 0
    for x, _ in loader:
        xs.append(x)
        got += x.shape[0]
        if got >= limit:
            break
    if not xs:
        raise ValueError("data is empty")
    return torch.cat(xs)[:limit]
