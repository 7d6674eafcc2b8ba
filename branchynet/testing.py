"""The one verification harness of the exit op and the engine.

The tests (tests/test_ops.py and the engine's), the first-use check
(:mod:`branchynet.ops._verify`) and ``branchynet selftest`` all check with the pieces
here, so a sample, a poison value or a tolerance is defined once:

- samples: logits over dtype x K x C with a spread of confidence (:func:`sample_logits`),
  rows that break naive softmax code (:func:`special_logits`), unique original rows
  (:func:`sample_rows`), feature maps for the gather (:func:`gather_samples`);
- output buffers poisoned with values no implementation writes, contiguous or strided
  (:func:`poisoned_buffers`), so a row written that should not be, or a missed write,
  shows;
- thresholds: one in a gap of the scores (:func:`gap_threshold`), the exit patterns
  (:func:`exit_patterns`: all leave, none leave, a mixed split, the last exit), per-exit
  thresholds that split a batch (:func:`split_thresholds`); for the patience criterion
  a start state whose streaks split a batch (:func:`patience_sample_state`);
- the comparison of an implementation with the PyTorch reference
  (:func:`compare_exit_step`, :func:`compare_gather`, and :func:`compare_bound` for the
  op bound as the engine calls it);
- the paper's rule one sample at a time (:func:`per_sample_rule`) and the comparison of
  an engine result with it (:func:`compare_engine`).

An *implementation* of the exit op here is any callable in the op's argument order,
unchecked: ``step(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit,
out_entropy, criterion_id, last[, patience_state]) -> (survivors, survivor_rows, count)``
(the patience state only with the patience criterion's id, 3; every kernel,
``torch.ops.branchynet.exit_step`` and :func:`branchynet.ops.implementation` take it);
:func:`backend_impl` gives the public op with a named backend in that form.

The *reference* is the pure-PyTorch op (:func:`branchynet.ops._torch.exit_step_torch`,
built on :mod:`branchynet.exits`), always run on the host: its answers do not depend on
the device under test.

One module (~600 lines, half of them docstrings) rather than a package: it is read as
one page, and its users import one name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import CRITERIA, OP_CRITERIA, PATIENCE_ID

__all__ = [
    "DTYPES", "POISON", "dtype_name", "sample_logits", "special_logits", "sample_rows",
    "poisoned_buffers", "patience_sample_state", "gap_threshold", "exit_patterns", "tie_logits", "tie_threshold", "gather_samples", "backend_impl",
    "Comparison", "compare_exit_step", "compare_gather", "compare_bound",
    "FaultyStage", "RuleAnswer", "per_sample_rule", "patience_rule", "split_thresholds", "compare_engine",
]

#: Logit dtypes the op takes (Triton: all but float64).
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: What the poisoned buffers hold: no implementation writes these (entropy is >= 0 or
#: NaN, pred and exit are >= 0; a NaN logit is compared bit for bit, poison included).
POISON = {"logits": float("nan"), "pred": -7, "exit": -9, "entropy": -3.0}
#: Same-width integer views, to compare floats bit for bit (NaN payloads included).
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (test ids, table rows)."""
    return str(dtype).replace("torch.", "")


# --- samples ---------------------------------------------------------------------------


def sample_logits(k: int, c: int, dtype, device, seed: int, *, special: bool = False) -> torch.Tensor:
    """Random logits whose per-row sharpness varies, so scores spread over their range.

    Args:
        k, c: rows and classes.
        dtype, device: of the result (drawn in float64 on the host, then rounded).
        seed: the draw.
        special: when ``k >= 4``, rows 0-3 are a flat row (ties: the first index wins),
            a row with one NaN (NaN entropy: never leaves early), a confident row (scores
            ~1e-13) and a one-hot row at +-1e4.

    Returns:
        [K, C] logits, row scales from 0.05 (flat) to 8.05.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, c, generator=g, dtype=torch.float64)
    z = z * (torch.rand(k, 1, generator=g, dtype=torch.float64) * 8 + 0.05)
    if special and k >= 4:
        z[0, :] = 0.0
        z[1, c // 2] = math.nan
        z[2, :] = -30.0
        z[2, c - 1] = 30.0
        z[3, :] = -1e4
        z[3, 0] = 1e4
    return z.to(dtype).to(device)


def special_logits(c: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Rows that break naive softmax / entropy / argmax code, between ordinary rows.

    One-hot at +-1e4 (entropy 0), uniform at 0, at +1e4 and at -1e4, ties at the max
    (first index wins), tied top two (margin 1), -inf classes (they add 0, not
    ``0 * -inf``), all -inf, NaN and all-NaN rows, +inf, NaN before +inf, logits 1e4
    apart, offset by +-1e4, a linear ramp over +-1e4. NaN, +inf and all--inf rows have a
    NaN entropy: they never leave at a side exit.

    Returns:
        [K, C] with K = 8 ordinary + 18 special (+ 2 when C > 1) + 8 ordinary rows.
    """
    g = torch.Generator().manual_seed(seed)
    inf, nan, big = math.inf, math.nan, 1e4
    rows = []

    def row(fill=0.0, values=None):
        r = torch.full((c,), fill, dtype=torch.float64) if values is None else values.double()
        rows.append(r)
        return r

    r = row(-big); r[0] = big                              # one-hot at column 0: pred 0
    r = row(-big); r[c // 2] = big                         # one-hot in the middle
    row(values=torch.where(torch.rand(c, generator=g) < 0.5, big, -big))
    row(0.0)                                               # uniform: H = log C, pred 0
    row(big)                                               # uniform at +1e4
    row(-big)                                              # uniform at -1e4
    r = row(0.0); r[0] = 5; r[-1] = 5                      # tie at the max: pred 0
    r = row(values=torch.randn(c, generator=g)); r[[c // 3, c - 1]] = 50.0  # tied top two
    r = row(-inf); r[0] = 0.0                              # every other class masked
    r = row(values=torch.randn(c, generator=g)); r[::2] = -inf
    row(-inf)                                              # all -inf: NaN entropy, pred 0
    r = row(values=torch.randn(c, generator=g)); r[c - 1] = nan   # NaN row, pred c - 1
    row(nan)                                               # all NaN, pred 0
    r = row(values=torch.randn(c, generator=g)); r[c // 2] = inf  # +inf: NaN entropy
    row(values=torch.randn(c, generator=g, dtype=torch.float64) * big)
    row(values=torch.randn(c, generator=g, dtype=torch.float64) + big)
    row(values=torch.randn(c, generator=g, dtype=torch.float64) - big)
    row(values=torch.linspace(-big, big, c, dtype=torch.float64))
    if c > 1:
        r = row(values=torch.randn(c, generator=g)); r[-1], r[0] = inf, nan  # NaN first: pred 0
        r = row(0.0); r[0] = nan; r[1] = inf               # NaN (as +inf) and +inf tie
    normal = torch.randn(16, c, generator=g, dtype=torch.float64) * torch.rand(16, 1, generator=g) * 10
    z = torch.cat([normal[:8], torch.stack(rows), normal[8:]])
    return z.to(dtype).to(device)


def sample_rows(k: int, b: int, device, seed: int) -> torch.Tensor:
    """[K] int64: K distinct original rows out of B (B - K rows the op must not touch)."""
    return torch.randperm(b, generator=torch.Generator().manual_seed(seed))[:k].to(device)


def poisoned_buffers(b: int, c: int, dtype, device, *, strided: bool = False):
    """The op's four output buffers, full of :data:`POISON`.

    Args:
        b, c: rows of the original batch and classes.
        dtype: of the logits buffer.
        strided: the per-row outputs are every other element of a wider buffer
            (stride 2): an implementation that assumes stride 1 writes wrong rows.

    Returns:
        ``(out_logits [B, C] dtype, out_pred [B] int64, out_exit [B] int64,
        out_entropy [B] float32)``.
    """
    def per_row(fill, dt):
        if strided:
            return torch.full((b, 2), fill, dtype=dt, device=device)[:, 0]
        return torch.full((b,), fill, dtype=dt, device=device)

    return (torch.full((b, c), POISON["logits"], dtype=dtype, device=device),
            per_row(POISON["pred"], torch.int64), per_row(POISON["exit"], torch.int64),
            per_row(POISON["entropy"], torch.float32))


def patience_sample_state(logits: torch.Tensor, rows: torch.Tensor, b: int, seed: int) -> torch.Tensor:
    """[B, 2] int64 on the host: a patience state as an earlier exit left it for the rows
    of a call (half of them predicted there what ``logits`` predicts now, streaks 0..3),
    and values no exit writes (-7, -9) at the other rows, which the op must not touch.
    With the threshold P = 2 of :func:`exit_patterns` the rows split."""
    from .exits import _scores

    g = torch.Generator().manual_seed(seed)
    k, c = logits.shape
    state = torch.tensor([[POISON["pred"], POISON["exit"]]], dtype=torch.int64).repeat(b, 1)
    if k:
        pred = _scores(logits.detach().cpu(), 0)[2]
        agree = torch.rand(k, generator=g) < 0.5
        state[rows.cpu(), 0] = torch.where(agree, pred, (pred + 1) % c)
        state[rows.cpu(), 1] = torch.randint(0, 4, (k,), generator=g)
    return state


def gather_samples(k: int, device, seed: int = 0):
    """``(name, features [K, ...])`` pairs for the survivor gather: every layout and
    dtype the engine's stage states come in (2-D, 1-D int64, 4-D fp16, channels_last
    fp32 and bf16, odd uint8, bool, a transposed view, 5-D, a 2-byte aligned fp16 view,
    a channels_last tensor with one channel, a view that is not dense)."""
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    yield "2d_f32", torch.randn(k, 7, generator=g).to(device)
    yield "1d_i64", torch.randint(0, 100, (k,), generator=g).to(device)
    yield "4d_f16", torch.randn(k, 3, 5, 5, generator=g).half().to(device)
    yield "4d_f32_cl", torch.randn(k, 64, 8, 8, generator=g).to(device).contiguous(memory_format=cl)
    yield "4d_bf16_cl", torch.randn(k, 3, 5, 5, generator=g).bfloat16().to(device).contiguous(memory_format=cl)
    yield "3d_u8_odd", torch.randint(0, 255, (k, 3, 3), generator=g, dtype=torch.uint8).to(device)
    yield "bool", (torch.rand(k, 5, generator=g) > 0.5).to(device)
    yield "transposed", torch.randn(7, k, generator=g).to(device).t()  # neither layout
    yield "5d", torch.randn(k, 2, 3, 4, 5, generator=g).to(device)
    flat = torch.randn(k * 16 + 1, generator=g).half().to(device)
    yield "misaligned_f16", flat[1:].view(k, 16)  # 2-byte aligned: the narrow copy path
    yield "cl_ambiguous", torch.randn(k, 1, 4, 4, generator=g).to(device).contiguous(memory_format=cl)
    yield "not_dense", torch.randn(k, 6, 10, generator=g).to(device)[:, :, ::2]


# --- thresholds ------------------------------------------------------------------------


def gap_threshold(logits: torch.Tensor, criterion: int) -> float:
    """A threshold in the widest gap of the middle half of the reference scores.

    About half the rows leave, and no score sits within fp32 rounding of the threshold,
    so a few-ulp difference between two implementations' ``exp`` cannot flip a row.
    When every finite score is the same (C = 1: every criterion is 0), a threshold 0.25
    above it: every finite row leaves.

    Args:
        logits: [K, C], any device.
        criterion: integer id (index into :data:`branchynet.config.CRITERIA`); the
            patience criterion's threshold is P = 2 (see :func:`patience_sample_state`).
    """
    from .exits import _scores

    if criterion == PATIENCE_ID:
        return 2.0

    score = _scores(logits.detach().cpu(), criterion)[0].double()
    s = score[torch.isfinite(score)].unique().sort().values
    if s.numel() == 0:
        return 0.5
    if s.numel() == 1:
        return float(s[0]) + 0.25
    lo, hi = s.numel() // 4, max(s.numel() * 3 // 4, s.numel() // 4 + 1)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


#: Names of the exit patterns, in :func:`exit_patterns` order.
PATTERNS = ("all leave", "none leave", "mixed", "last")


def exit_patterns(logits: torch.Tensor, criterion: int, *, full: bool = True):
    """``(name, threshold, last)`` triples: everyone leaves (T = inf), nobody leaves
    (T = 0: scores are >= 0 and the test is strict), a mixed split
    (:func:`gap_threshold`), the last exit (every row leaves whatever its score). NaN
    rows stay at every side exit. ``full=False``: the mixed split only (large batches
    under the Triton interpreter). For the patience criterion the threshold is P, and
    P = 0 lets every row leave, P = inf none."""
    mixed = ("mixed", gap_threshold(logits, criterion), False)
    if not full:
        return [mixed]
    everyone, nobody = (0.0, math.inf) if criterion == PATIENCE_ID else (math.inf, 0.0)
    return [("all leave", everyone, False), ("none leave", nobody, False), mixed, ("last", 0.0, True)]


def tie_logits(c: int, dtype, device) -> torch.Tensor:
    """[8, C]: flat rows (every logit 0) between confident ones (+30 against -30), for a
    threshold equal to the flat rows' score (:func:`tie_threshold`)."""
    z = torch.full((8, c), -30.0, dtype=torch.float64)
    z[1::2] = 0.0
    z[0::2, 0] = 30.0
    return z.to(dtype).to(device)


def tie_threshold(criterion: int, c: int) -> float | None:
    """The score of a flat row of C classes where every implementation computes it
    exactly, or None: with C = 1 every score is 0; max_prob is 1 - 1/C, exact for C a
    power of two; margin is 1 - (1/C - 1/C) = 1. The exit test is strict: a row whose
    score equals the threshold stays."""
    if c == 1:
        return 0.0
    if CRITERIA[criterion] == "max_prob" and c & (c - 1) == 0:
        return 1.0 - 1.0 / c
    if CRITERIA[criterion] == "margin":
        return 1.0
    return None


# --- the implementations under test ----------------------------------------------------


def backend_impl(backend: str):
    """``(exit_step, gather_rows)`` of the public op with ``backend`` named, the exit
    step in the unchecked form (criterion as its integer id). The public op checks its
    arguments and resolves the backend through the first-use check: a caller that must
    run ``backend`` itself turns that check off (``BRANCHYNET_VERIFY=0``)."""
    from . import ops

    def exit_step(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy,
                  criterion=0, last=False, patience_state=None):
        return ops.exit_step(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy,
                             criterion=OP_CRITERIA[criterion], last=last, backend=backend,
                             patience_state=patience_state)

    def gather_rows(features, index):
        return ops.gather_rows(features, index, backend=backend)

    return exit_step, gather_rows


# --- comparisons -----------------------------------------------------------------------


@dataclass
class Comparison:
    """What a comparison with the reference found.

    Attributes:
        failure: None, or what differs first (one line).
        error: worst absolute entropy error against the reference (inf on a failure
            other than the entropy's).
        count: survivors, as the reference counts them.
    """

    failure: str | None
    error: float
    count: int

    @property
    def ok(self) -> bool:
        return self.failure is None

    def __iter__(self):  # ``failure, error = compare_exit_step(...)``
        return iter((self.failure, self.error))


def entropy_tolerance(dtype) -> float:
    """Relative and absolute tolerance on the entropy against the reference: the GPU
    kernels accumulate fp32 (~1e-6 relative, 2e-5 with the fp32 ``exp``) where the
    reference accumulates float64; float64 logits are computed in float64 everywhere."""
    return 1e-9 if dtype == torch.float64 else 2e-5


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def _check_outputs(res, k: int, device) -> str | None:
    """The contract's shapes, dtypes and device of ``(survivors, survivor_rows, count)``."""
    if not isinstance(res, (tuple, list)) or len(res) != 3:
        return f"returned {type(res).__name__}, not (survivors, survivor_rows, count)"
    surv, s_rows, count = res
    if tuple(surv.shape) != (k,) or tuple(s_rows.shape) != (k,) or tuple(count.shape) != (1,):
        return f"output shapes {tuple(surv.shape)} {tuple(s_rows.shape)} {tuple(count.shape)}, want ({k},) ({k},) (1,)"
    if not surv.dtype == s_rows.dtype == count.dtype == torch.int64:
        return f"output dtypes {surv.dtype} {s_rows.dtype} {count.dtype}, want int64"
    if not surv.device == s_rows.device == count.device == torch.device(device):
        return f"outputs on {surv.device}, inputs on {device}"
    return None


def compare_exit_step(step, logits, rows, b, threshold, criterion, exit_index, last, *,
                      strided: bool = False, out_factory=None, tol: float | None = None,
                      against_float64: bool = False, permutation: bool = False,
                      same_order: bool = False, patience_state: torch.Tensor | None = None) -> Comparison:
    """Run ``step`` and the reference on the same inputs and poisoned buffers; compare.

    Checked: the outputs' shapes, dtypes and device; the survivor count; the survivors
    as a set and ``survivor_rows`` consistent with them; exactly the leaving rows written
    (every other row keeps its poison); exit index and prediction exact; logits copied
    bit for bit; entropy within :func:`entropy_tolerance` (NaN where the reference's is);
    for the patience criterion the whole state after the call, exactly.

    Args:
        step: the implementation, in the unchecked form (module docstring).
        logits: [K, C]; rows: [K] int64 in [0, B), unique; b: B.
        threshold, criterion (int id), exit_index, last: the op's arguments.
        strided: per-row output buffers with stride 2 (:func:`poisoned_buffers`).
        out_factory: ``f(b, c, dtype, device) -> buffers`` instead of
            :func:`poisoned_buffers`, called once per side: a clone would make a
            non-dense buffer contiguous.
        tol: entropy tolerance instead of :func:`entropy_tolerance`.
        against_float64: also require the entropy error against float64 to be at most
            twice the reference's (fp16/bf16/fp32 logits).
        permutation: also require ``survivors`` to be a permutation of 0..K-1 and
            ``survivor_rows`` to follow it in full (stronger than the contract).
        same_order: also require the reference's survivor order (a serial compaction).
        patience_state: the patience criterion's state before the call, [B, 2] int64
            (default: :func:`patience_sample_state`); each side runs on a copy.

    Returns:
        A :class:`Comparison`.
    """
    from .ops._torch import exit_step_torch

    k, c = logits.shape
    dev = logits.device
    make = out_factory or (lambda b_, c_, dt, d: poisoned_buffers(b_, c_, dt, d, strided=strided))
    got = make(b, c, logits.dtype, dev)
    want = make(b, c, logits.dtype, "cpu")
    h_logits, h_rows = logits.cpu(), rows.cpu()
    state = ()
    if criterion == PATIENCE_ID:
        start = patience_sample_state(h_logits, h_rows, b, seed=k + b) if patience_state is None else patience_state
        state = (start.cpu().clone(), start.clone().to(dev))
    r_surv, r_rows, r_count = exit_step_torch(h_logits, h_rows, threshold, exit_index, *want, criterion, last,
                                              *state[:1])
    n = int(r_count)
    res = step(logits, rows, threshold, exit_index, *got, criterion, last, *state[1:])
    failure = _survivor_failure(res, dev, h_rows, r_surv, r_rows, n, permutation, same_order)
    if failure:
        return Comparison(failure, math.inf, n)
    if state and not torch.equal(state[1].cpu(), state[0]):
        wrong = (state[1].cpu() != state[0]).any(1).nonzero().squeeze(1)
        return Comparison(f"patience state differs at {wrong.numel()} of {b} rows (first: row {int(wrong[0])}, "
                          f"{state[1][int(wrong[0])].tolist()}, reference {state[0][int(wrong[0])].tolist()})",
                          math.inf, n)
    # Exactly the leaving rows' outputs are written: the reference's survivors say which.
    leaving = torch.ones(k, dtype=torch.bool)
    leaving[r_surv[:n]] = False
    written = torch.zeros(b, dtype=torch.bool)
    written[h_rows[leaving]] = True
    got = tuple(t.cpu() for t in got)
    failure = _buffer_failure(got, want, written)
    if failure:
        return Comparison(failure, math.inf, n)
    o_ent, e_ent = got[3], want[3]
    ge, we = o_ent.double(), e_ent.double()
    nan_g, nan_w = torch.isnan(ge), torch.isnan(we)
    if not torch.equal(nan_g, nan_w):
        return Comparison("NaN entropies differ", math.inf, n)
    diff = (ge - we).abs()[~nan_w]
    err = float(diff.max()) if diff.numel() else 0.0
    t = entropy_tolerance(logits.dtype) if tol is None else tol
    if bool((diff > t + t * we[~nan_w].abs()).any()):
        return Comparison(f"entropy off by {err:.3g}", err, n)
    if against_float64 and logits.dtype != torch.float64:
        failure = _float64_error(h_logits, h_rows, written, o_ent, e_ent)
        if failure:
            return Comparison(failure, err, n)
    return Comparison(None, err, n)


def _survivor_failure(res, device, rows, r_surv, r_rows, n, permutation, same_order) -> str | None:
    """What is wrong with ``(survivors, survivor_rows, count)`` against the reference's
    (``rows``, ``r_surv``, ``r_rows`` on the host, ``n`` survivors), or None."""
    k = rows.shape[0]
    bad = _check_outputs(res, k, device)
    if bad:
        return bad
    g_surv, g_rows, g_count = (t.cpu() for t in res)
    if int(g_count) != n:
        return f"survivor count {int(g_count)}, reference {n}"
    if not torch.equal(g_surv[:n].sort().values, r_surv[:n].sort().values):
        return "survivors differ"
    if not torch.equal(g_rows[:n], rows[g_surv[:n]]):
        return "survivor_rows do not match the survivors"
    if permutation and not (torch.equal(g_surv.sort().values, torch.arange(k))
                            and torch.equal(g_rows, rows[g_surv])):
        return "survivors are not a permutation of the K rows"
    if same_order and not (torch.equal(g_surv, r_surv) and torch.equal(g_rows, r_rows)):
        return "survivors are not in the reference's order"
    return None


def _buffer_failure(got, want, written) -> str | None:
    """What differs in the output buffers but the entropy values, or None: the rows
    written (``written`` [B] bool), exit index, prediction, the poison of the rows that
    stay, the logits bit for bit. ``got``, ``want``: the four buffers, on the host."""
    o_logits, o_pred, o_exit, o_ent = got
    e_logits, e_pred, e_exit, _ = want
    if not torch.equal(o_exit != POISON["exit"], written):
        wrong = int(((o_exit != POISON["exit"]) != written).sum())
        return f"exit index differs at {wrong} of {written.shape[0]} rows (rows written that should not be, or missed)"
    if not torch.equal(o_exit, e_exit):
        return f"exit index differs at {int((o_exit != e_exit).sum())} rows"
    if not torch.equal(o_pred, e_pred):
        return f"pred differs at {int((o_pred != e_pred).sum())} rows"
    stays = ~written
    if bool((o_ent[stays] != POISON["entropy"]).any()) or not bool(torch.isnan(o_logits[stays].float()).all()):
        return "a row that stays was written (entropy or logits lost their poison)"
    if not torch.equal(_bits(o_logits), _bits(e_logits)):
        return "logits not copied bit for bit"
    return None


def _float64_error(logits, rows, written, got_entropy, ref_entropy) -> str | None:
    """The flash-attention rule: against float64, at most twice the reference's error."""
    from .exits import entropy

    h64 = torch.full((written.shape[0],), math.nan, dtype=torch.float64)
    h64[rows] = entropy(logits.double())
    sel = written & torch.isfinite(h64)
    if not bool(sel.any()):
        return None
    err_got = float((got_entropy.double()[sel] - h64[sel]).abs().max())
    err_ref = float((ref_entropy.double()[sel] - h64[sel]).abs().max())
    if err_got > 2 * err_ref + 1e-6:
        return f"entropy error {err_got:.3g} against float64, more than twice the reference's {err_ref:.3g}"
    return None


def compare_gather(gather, features: torch.Tensor, index: torch.Tensor) -> str | None:
    """None, or how ``gather(features, index)`` differs from the reference
    (``index_select`` along dim 0, channels_last kept): shape, dtype, device, strides,
    memory format, and the values bit for bit."""
    from .ops._torch import gather_rows_torch

    got = gather(features, index)
    want = gather_rows_torch(features.cpu(), index.cpu())
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        return f"gather shape/dtype {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}"
    if got.device != features.device:
        return f"gather result on {got.device}, features on {features.device}"
    if index.numel() > 1 and got.stride() != want.stride():
        return f"gather strides {got.stride()}, want {want.stride()}"
    for fmt in (torch.channels_last, torch.contiguous_format):
        if want.dim() == 4 or fmt == torch.contiguous_format:
            if want.is_contiguous(memory_format=fmt) and not got.is_contiguous(memory_format=fmt):
                return f"gather result not in {fmt} like the reference's"
    if not torch.equal(_bits(got.cpu()), _bits(want)):
        return "gathered rows differ"
    return None


def compare_bound(step, logits: torch.Tensor, criterion: int, threshold: float) -> str | None:
    """The op bound as the engine calls it (``branchynet.ops.bind(...).step``: for the
    ``cpp`` backend the extension's own entry, with its own argument parsing; outputs
    allocated at the first exit, filled in at the last), against the reference on two
    exits: a side exit at ``threshold`` and the last exit on other logits. None, or what
    differs."""
    from .ops._torch import exit_step_torch

    k, c = logits.shape
    rows = torch.arange(k, device=logits.device)
    got = []
    surv, s_rows, n = step(logits, rows, threshold, 0, got, criterion, False)
    want = list(poisoned_buffers(k, c, logits.dtype, logits.device))
    if criterion == PATIENCE_ID:  # the bound op allocates the state with the buffers
        want.append(torch.full((k, 2), POISON["pred"], dtype=torch.int64, device=logits.device))
        if len(got) != 5:
            return f"the bound op allocated {len(got)} buffers for the patience criterion, not 5"
    r_surv, r_rows, r_count = exit_step_torch(logits, rows, threshold, 0, *want[:4], criterion, False, *want[4:])
    if int(n) != int(r_count):
        return f"survivor count {int(n)}, reference {int(r_count)}"
    n = int(n)
    if not torch.equal(surv[:n].sort().values, r_surv[:n].sort().values):
        return "survivors differ"
    last = torch.flip(logits, (1,)) * 0.5  # the last branch's logits, one row per sample
    step(last[s_rows[:n]], s_rows[:n], 0.0, 1, got, criterion, True)
    exit_step_torch(last[r_rows[:n]], r_rows[:n], 0.0, 1, *want[:4], criterion, True, *want[4:])
    for i, what in ((2, "exit index"), (1, "pred"), (4, "patience state")):
        if i < len(want) and not torch.equal(got[i], want[i]):
            return f"{what} differs at {int((got[i] != want[i]).sum())} of {k} rows"
    if not torch.equal(_bits(got[0]), _bits(want[0])):
        return "logits not copied bit for bit"
    tol = entropy_tolerance(logits.dtype)
    if not torch.allclose(got[3].double(), want[3].double(), rtol=tol, atol=tol, equal_nan=True):
        return "entropy differs"
    return None


# --- models ----------------------------------------------------------------------------


def random_mlp(seed: int = 0, num_exits: int = 3, width: int = 12, classes: int = 6,
               dtype: torch.dtype = torch.float32, stages=None):
    """A small MLP BranchyNet, [B, width] -> N x [B, classes], weights drawn N(0, 1.5^2)
    from ``seed`` (large enough that scores spread over every exit), in eval mode.

    ``stages``: N entries replacing the generated stage modules (a slowed or failing
    stage in a test); None entries keep theirs. The other weights are the same either way.
    """
    from torch import nn

    from .models.branchynet import BranchyNet

    g = torch.Generator().manual_seed(seed)
    made = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(num_exits)]
    branches = [nn.Linear(width, classes) for _ in range(num_exits)]
    with torch.no_grad():
        for m in made + branches:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
    if stages is not None:
        made = [s if s is not None else m for s, m in zip(stages, made)]
    model = BranchyNet(made, branches, input_shape=(width,), num_classes=classes)
    return model.to(dtype).eval()


class FaultyStage(torch.nn.Module):
    """A stage that raises for any run holding a marked sample (first feature above 1e5)
    and otherwise runs ``inner``: a failing stage in the serving tests."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, h):
        if bool((h[:, 0] > 1e5).any()):
            raise ValueError("a marked sample reached the faulty stage")
        return self.inner(h)


# --- the paper's rule, one sample at a time --------------------------------------------


class RuleAnswer(NamedTuple):
    """What the paper's rule gives one sample."""

    exit: int             # 0-based exit it leaves at
    pred: int             # argmax of that exit's logits
    entropy: float        # that exit's softmax entropy, float64
    logits: torch.Tensor  # [C], that exit's logits


@torch.no_grad()
def per_sample_rule(model, x: torch.Tensor, thresholds) -> list:
    """The paper's rule one sample at a time, written without the library's engine or
    exit op: run stage n and branch n on the sample alone; leave at exit n when the
    softmax entropy (float64) is below ``thresholds[n]``, else go on; the last exit
    takes the sample whatever its entropy.

    Args:
        model: a BranchyNet-like module with ``stages`` and ``branches`` (put in eval
            mode here).
        x: [B, ...] inputs, or a tuple or dict of tensors (a state of several tensors;
            each sample is its rows of every batch tensor).
        thresholds: one per side exit.

    Returns:
        B :class:`RuleAnswer`, in input order.
    """
    from .state import batch_size, slice_state

    model.eval()
    out = []
    for i in range(batch_size(x)):
        h = x[i:i + 1] if isinstance(x, torch.Tensor) else slice_state(x, i, i + 1)
        for n, (stage, branch) in enumerate(zip(model.stages, model.branches)):
            h = stage(h)
            z = branch(h)
            p = torch.softmax(z.double(), 1)
            ent = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
            if n == len(model.stages) - 1 or ent < thresholds[n]:
                out.append(RuleAnswer(n, int(z.argmax()), ent, z[0]))
                break
    return out


def patience_rule(exit_logits, patience: int) -> list:
    """PABEE's patience rule one sample at a time, from every exit's logits (all computed
    on the whole batch, as ``model(x)`` returns them), written without the engine:
    ``cnt_0 = 0``, ``cnt_n = cnt_{n-1} + 1`` if exit n's argmax equals exit n-1's, else
    0; a sample leaves at the first side exit with ``cnt_n >= patience``, else at the last.
    As under every criterion, a row whose logits hold a NaN or +inf (or only -inf) never
    leaves early; the argmax counts NaN as +inf, first index on ties.

    Returns:
        B ``(exit, pred)`` pairs, in input order.
    """
    preds, finite = [], []
    for z in exit_logits:
        z = z.detach().double().cpu()
        preds.append(torch.where(torch.isnan(z), math.inf, z).argmax(1).tolist())
        ok = ~(torch.isnan(z) | (z == math.inf)).any(1) & (z > -math.inf).any(1)
        finite.append(ok.tolist())
    last = len(preds) - 1
    out = []
    for i in range(len(preds[0])):
        cnt = 0
        for n in range(last + 1):
            if n:
                cnt = cnt + 1 if preds[n][i] == preds[n - 1][i] else 0
            if n == last or (cnt >= patience and finite[n][i]):
                out.append((n, preds[n][i]))
                break
    return out


@torch.no_grad()
def split_thresholds(model, x: torch.Tensor) -> list:
    """Per side exit, a threshold in the widest gap of the middle third of the batch's
    entropies there: some samples leave at each exit, and none sits on a threshold (so
    fp32 rounding cannot flip one between the engine and the per-sample rule)."""
    from .exits import entropy

    ts = []
    for z in model(x)[:-1]:
        h = entropy(z.float()).double().cpu().sort().values
        h = h[torch.isfinite(h)]
        if h.numel() < 2:
            ts.append(0.0)
            continue
        lo, hi = h.numel() // 3, max(h.numel() * 2 // 3, h.numel() // 3 + 1)
        gaps = h[lo + 1:hi + 1] - h[lo:hi]
        i = lo + int(gaps.argmax())
        ts.append(float((h[i] + h[i + 1]) / 2))
    return ts


def compare_engine(result, want, *, rel_tol: float = 1e-4, abs_tol: float = 1e-5):
    """Per sample, ``(failure or None, entropy error)`` of an engine result against the
    rule's answers (:func:`per_sample_rule`): exit index, prediction, entropy."""
    out = []
    for i, w in enumerate(want):
        got_exit, got_pred, got_h = int(result.exit[i]), int(result.pred[i]), float(result.entropy[i])
        failure = None
        if got_exit != w.exit:
            failure = f"exit {got_exit}, rule {w.exit}"
        elif got_pred != w.pred:
            failure = f"pred {got_pred}, rule {w.pred}"
        elif not math.isclose(got_h, w.entropy, rel_tol=rel_tol, abs_tol=abs_tol):
            failure = f"entropy {got_h:.6g}, rule {w.entropy:.6g}"
        out.append((failure, abs(got_h - w.entropy)))
    return out
