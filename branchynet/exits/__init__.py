"""Entropy and the exit decision: the pure-PyTorch reference.

These functions are the PyTorch fallback of the exit op and the oracle every kernel is
tested against. They are vectorised over the batch and accumulate in float64 whatever
the logits' dtype, returning float32 (float64 for float64 logits): in float32,
``log S`` with ``S = 1 + delta`` loses delta for confident rows, a ~5 % relative error at
entropies of 1e-6, which is where thresholds of confident networks live. The C++ CPU
kernel accumulates in double too; the GPU kernels accumulate in float32.

NaN policy (the same in every backend): NaN is *propagated*, never mapped to "exit".
A row with a NaN logit has NaN entropy and NaN score, so ``score < T`` is false at every
side branch; the row reaches the last exit, which takes every remaining sample, and
reports NaN entropy. Its prediction treats NaN as +inf (the first column that is NaN or
+inf wins), so ``pred`` is always a valid class index.
"""

from __future__ import annotations

import torch

from ..config import CRITERIA, criterion_id

__all__ = ["entropy", "exit_scores", "exit_mask", "CRITERIA"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape [B, C] (rank 2), got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class (C >= 1), got shape {tuple(logits.shape)}")


def _softmax_parts(logits: torch.Tensor):
    """Stable softmax pieces in float64: shifted logits d = z - max, e = exp(d), S = sum e."""
    z = logits.double()
    m = z.amax(dim=1, keepdim=True)
    d = z - m
    e = d.exp()
    s = e.sum(dim=1)
    return d, e, s


def _entropy_from_parts(d, e, s):
    # H = log S - sum_c e_c d_c / S. Classes with e_c == 0 (d = -inf, or underflow for
    # logits ~1e4 apart) contribute 0: "0 * -inf" must not become NaN.
    # A NaN in e * d can only come from 0 * -inf here: a row with a NaN or +inf logit has
    # a NaN sum S and so a NaN entropy whatever this term holds. In-place ops: this runs
    # once per exit per batch, and each op saved is ~1 us at B = 1.
    ed = (e * d).nan_to_num_(nan=0.0).sum(dim=1)
    # Rounding can leave -1e-8 for a one-hot softmax; entropy is >= 0. clamp keeps NaN.
    return s.log().sub_(ed.div_(s)).clamp_min_(0.0)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy ``H = -sum_c p_c log p_c`` (natural log) of each row.

    Args:
        logits: [B, C] float32/float16/bfloat16/float64 (B may be 0).

    Returns:
        [B] float32 (float64 for float64 input), finite for any finite logits
        (e.g. +-1e4), NaN for rows containing NaN.
    """
    _check_logits(logits)
    return _entropy_from_parts(*_softmax_parts(logits)).to(_out_dtype(logits))


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _argmax_nan_as_inf(z: torch.Tensor) -> torch.Tensor:
    if not z.shape[0]:
        return torch.zeros(0, dtype=torch.int64, device=z.device)
    inf = float("inf")
    return torch.nan_to_num(z, nan=inf, posinf=inf, neginf=-inf).argmax(dim=1)


def exit_scores(logits: torch.Tensor, criterion: str = "entropy"):
    """Score, entropy and prediction of each row.

    Args:
        logits: [B, C].
        criterion: one of ``"entropy"``, ``"max_prob"``, ``"margin"`` (see
            :data:`branchynet.config.CRITERIA`); lower score = more confident.

    Returns:
        ``(score [B] float32, entropy [B] float32, pred [B] int64)``.
    """
    _check_logits(logits)
    return _scores(logits, criterion_id(criterion))


def _scores(logits: torch.Tensor, cid: int):
    """:func:`exit_scores` without the argument checks (criterion as its integer id)."""
    d, e, s = _softmax_parts(logits)
    h = _entropy_from_parts(d, e, s)
    pred = _argmax_nan_as_inf(logits.float() if logits.dtype != torch.float64 else logits)
    if cid == 0:
        score = h
    else:
        p = e / s.unsqueeze(1)
        if cid == 1:
            score = 1.0 - p.amax(dim=1) if p.shape[1] else p.sum(1)
        else:
            k = min(2, p.shape[1])
            top = p.topk(k, dim=1).values if p.shape[0] else p.new_zeros(0, k)
            second = top[:, 1] if k == 2 else torch.zeros_like(top[:, 0])
            score = 1.0 - (top[:, 0] - second)
        # NaN rows: topk/amax may drop NaN; keep the documented propagation.
        score = torch.where(torch.isnan(h), h, score)
    out = _out_dtype(logits)
    return score.to(out), h.to(out), pred


def exit_mask(logits: torch.Tensor, threshold: float, criterion: str = "entropy") -> torch.Tensor:
    """[B] bool: which rows leave at an exit with this threshold (``score < threshold``)."""
    score, _, _ = exit_scores(logits, criterion)
    return score < threshold
