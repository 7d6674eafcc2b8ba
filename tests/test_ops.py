"""The exit op and the survivor gather, on every backend, against the PyTorch reference.

One test body per behaviour, parametrised over (device, backend): on the CPU ``cpp``
(when ``branchynet._C`` is built), ``triton`` under ``TRITON_INTERPRET=1`` (set by
conftest.py without a GPU) and ``torch``; on a GPU ``cuda``, ``triton`` and ``torch``.
Every case goes through the public op (``branchynet.ops.exit_step`` / ``gather_rows``
with ``backend=``) and is compared by the verification harness
(:mod:`branchynet.testing`) with the reference run on the host, on output buffers
poisoned first, so a write to a row that did not leave (or a missed one) shows. The
compiled op as torch sees it (registration, ``opcheck``, ``torch.compile``) and the
CUDA-only behaviours (streams, graph capture) are at the end.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from branchynet import EarlyExitEngine, ops, testing
from branchynet.config import CRITERIA, OP_CRITERIA, PATIENCE_ID
from branchynet.exits import entropy, exit_scores
from branchynet.models.registry import build_model
from branchynet.ops import _backends, _library, _verify, available_backends, exit_step, gather_rows
from branchynet.ops._torch import exit_step_torch
from branchynet.testing import POISON, poisoned_buffers

# The interpreter evaluates the masked-off lanes too (log(0) of padding rows, NaN rows):
# numpy's warnings about them are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

try:
    from branchynet import _C
except Exception:  # not built (isolated or BRANCHYNET_SKIP_EXT install), or ABI mismatch
    _C = None

HAS_OPS = _C is not None
HAS_CUDA_OPS = HAS_OPS and _C.has_cuda() and torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CPU_BACKENDS = available_backends("cpu")
CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []
WHY_NOT = {"cpp": "branchynet._C is not built (pip install --no-build-isolation -e .)",
           "triton": "Triton runs on the CPU only under TRITON_INTERPRET=1",
           "cuda": "needs a GPU and branchynet._C built with CUDA"}


def _backend(device, backend):
    """A (device, backend) case, the same list on every machine: what this one lacks skips."""
    have = CPU_BACKENDS if device == "cpu" else CUDA_BACKENDS
    marks = [pytest.mark.cuda] if device == "cuda" else []
    if backend not in have:
        marks.append(pytest.mark.skip(reason=WHY_NOT.get(backend, f"{backend} not available on {device}")))
    return pytest.param(device, backend, marks=marks, id=f"{device}-{backend}")


BACKENDS = [_backend("cpu", b) for b in ("cpp", "triton", "torch")] + \
           [_backend("cuda", b) for b in ("cuda", "triton", "torch")]
TRITON = [_backend("cpu", "triton"), _backend("cuda", "triton")]
needs_ops = pytest.mark.skipif(not HAS_OPS, reason=WHY_NOT["cpp"])
needs_cuda_ops = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_OPS, reason=WHY_NOT["cuda"])]
# The compiled op on the devices it is registered for.
EXT_DEVICES = [pytest.param("cpu", marks=needs_ops), pytest.param("cuda", marks=needs_cuda_ops)]

DTYPES = list(testing.DTYPES)
BATCHES = [0, 1, 7, 1023, 4097]
# 1: a single class; 4099 > 1024 takes the block-per-row CUDA kernel.
CLASSES = [1, 2, 10, 100, 1000, 4099]
#: Largest K x C per case under the Triton interpreter (every program is a Python loop;
#: test_exit_step_large runs 4097 x 1000 once per criterion).
MAX_INTERPRETED = 1_100_000


def _impl(device, backend):
    """The public op with ``backend``, after making sure the first-use check keeps it:
    else a backend that failed it would quietly run the next one, and pass."""
    assert _verify.passes(backend, torch.device(device)), f"{backend!r} failed its first-use check on {device}"
    return testing.backend_impl(backend)


def _check(device, backend, logits, rows, b, threshold, criterion, exit_index, last, **kw):
    """Compare ``backend`` with the reference; the survivor count. The compiled
    kernels' survivors are a permutation of the K rows (stronger than the contract),
    and the serial CPU compaction keeps the reference's order."""
    kw.setdefault("permutation", backend in ("cpp", "cuda", "torch"))
    kw.setdefault("same_order", device == "cpu" and backend in ("cpp", "torch"))
    kw.setdefault("tol", 1e-5 if backend == "triton" and logits.dtype != torch.float64 else None)
    res = testing.compare_exit_step(_impl(device, backend)[0], logits, rows, b, threshold, criterion,
                                    exit_index, last, **kw)
    assert res.ok, res.failure
    return res.count


def _skip_float64(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton takes fp32/fp16/bf16 (test_empty_batch_and_float64_refusal)")


# --- the arguments (every backend shares the public op's checks) -----------------------


def _buffers(b, c, dtype=torch.float32):
    return (torch.empty(b, c, dtype=dtype), torch.empty(b, dtype=torch.int64),
            torch.empty(b, dtype=torch.int64), torch.empty(b))


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(logits=torch.zeros(3, 0)), ValueError, "at least one class"),
    (dict(logits=torch.zeros(3)), ValueError, "rank 2"),
    (dict(logits=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "logits must be"),
    (dict(rows=torch.arange(2)), ValueError, "rows must be int64 of shape"),
    (dict(threshold=None), TypeError, "threshold must be a number"),
    (dict(threshold=torch.tensor([0.1, 0.2])), ValueError, "threshold must be one number"),
    (dict(threshold=float("nan")), ValueError, "threshold must be >= 0"),
    (dict(threshold=-1.0), ValueError, "threshold must be >= 0"),
    (dict(out=_buffers(3, 5)), ValueError, "out_logits must have shape"),
    (dict(out=_buffers(3, 4, torch.float64)), TypeError, "out_logits dtype"),
    (dict(criterion="confidence"), ValueError, "criterion"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(criterion="patience"), ValueError, "criterion='patience' needs patience_state"),
    (dict(criterion="patience", state=torch.zeros(3, 2)), ValueError, r"patience_state must be int64 of shape \[3, 2\]"),
    (dict(criterion="patience", state=torch.zeros(2, 2, dtype=torch.int64)), ValueError, "patience_state must be"),
    (dict(criterion="patience", state=torch.zeros(2, 3, dtype=torch.int64).t()), ValueError, "contiguous"),
    (dict(criterion="patience", state=[[0, 0]] * 3), TypeError, "patience_state must be a torch.Tensor"),
    (dict(state=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "only for criterion='patience'"),
])
def test_bad_arguments(kwargs, err, msg):
    logits = kwargs.get("logits", torch.zeros(3, 4))
    rows = kwargs.get("rows", torch.arange(3))
    out = kwargs.get("out", _buffers(3, logits.shape[1] if logits.dim() == 2 else 4))
    with pytest.raises(err, match=msg):
        exit_step(logits, rows, kwargs.get("threshold", 0.5), 0, *out,
                  criterion=kwargs.get("criterion", "entropy"), backend=kwargs.get("backend", "torch"),
                  patience_state=kwargs.get("state"))


def test_tensor_threshold_and_gather_checks():
    logits = torch.tensor([[5.0, 0.0], [0.0, 0.0]])
    out = poisoned_buffers(2, 2, torch.float32, "cpu")
    surv, surv_rows, count = exit_step(logits, torch.arange(2), torch.tensor(0.3), 2, *out, backend="torch")
    # Row 0 (entropy 0.04) leaves at exit 2; row 1 (log 2) stays and keeps the poison.
    assert int(count) == 1 and int(surv[0]) == 1 and out[2].tolist() == [2, POISON["exit"]]
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        gather_rows(torch.zeros(3, 2), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="index is on"):
        gather_rows(torch.zeros(3, 2), torch.zeros(1, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("rows", [[0, 3, 1], [0, -1, 1]], ids=["past_B", "negative"])
def test_rows_outside_the_buffers_are_an_error_on_every_backend(device, backend, rows):
    # B = 3 output rows: 3 and -1 are outside. The CUDA kernel would assert on the
    # device, Triton would write out of bounds.
    out = poisoned_buffers(3, 4, torch.float32, device)
    with pytest.raises(ValueError, match=r"rows must index the B = 3 rows"):
        exit_step(torch.randn(3, 4, device=device), torch.tensor(rows, device=device), 10.0, 1, *out,
                  backend=backend)
    assert (out[2] == POISON["exit"]).all(), "nothing may be written before the error"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("entry", ["op", "harness"])
def test_duplicate_rows_and_a_negative_exit_index_are_errors(device, backend, entry):
    # Two rows writing the same output row race on a GPU (which one wins is undefined),
    # and a negative exit index reads as "no exit" downstream: both refused, nothing written.
    step = exit_step if entry == "op" else testing.backend_impl(backend)[0]
    kw = {"backend": backend} if entry == "op" else {}
    out = poisoned_buffers(4, 4, torch.float32, device)
    logits = torch.randn(3, 4, device=device)
    with pytest.raises(ValueError, match=r"rows must be unique, got 2 twice"):
        step(logits, torch.tensor([2, 0, 2], device=device), 10.0, 1, *out, **kw)
    with pytest.raises(ValueError, match=r"exit_index must be an integer >= 0, got -1"):
        step(logits, torch.arange(3, device=device), 10.0, -1, *out, **kw)
    with pytest.raises(TypeError, match=r"exit_index must be an integer"):
        step(logits, torch.arange(3, device=device), 10.0, 1.5, *out, **kw)
    assert (out[2] == POISON["exit"]).all(), "nothing may be written before the error"


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gather_index_outside_the_features_is_an_error_on_every_backend(device, backend):
    with pytest.raises(ValueError, match=r"index must be in \[0, 3\), got \[3\]"):
        gather_rows(torch.zeros(3, 2, device=device), torch.tensor([0, 3], device=device), backend=backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_batch_and_float64_refusal(device, backend):
    logits = torch.zeros(0, 10, device=device)
    rows = torch.zeros(0, dtype=torch.int64, device=device)
    out = poisoned_buffers(4, 10, torch.float32, device)
    surv, srows, count = exit_step(logits, rows, 0.5, 0, *out, backend=backend)
    assert surv.shape == srows.shape == (0,) and count.tolist() == [0]
    assert (out[2] == POISON["exit"]).all()
    if backend == "triton":  # the public op and the kernel itself refuse float64
        from branchynet.kernels import exit_step as tk

        with pytest.raises(TypeError):
            exit_step(logits.double(), rows, 0.5, 0, out[0].double(), *out[1:], backend=backend)
        with pytest.raises(TypeError):
            tk.exit_step_triton(logits.double(), rows, 0.5, 0, out[0].double(), *out[1:], 0, False)


@needs_ops
def test_the_compiled_op_rejects_bad_arguments():
    # torch.ops.branchynet.exit_step checks too: the engine calls it without the
    # public op's checks.
    logits = torch.randn(4, 3)
    rows = torch.arange(4)
    bufs = poisoned_buffers(4, 3, torch.float32, "cpu")
    op = torch.ops.branchynet.exit_step
    with pytest.raises(RuntimeError, match="rows"):
        op(logits, rows.int(), 0.5, 0, *bufs, 0, False)
    with pytest.raises(RuntimeError, match="out of range"):
        op(logits, torch.tensor([0, 1, 2, 4]), 0.5, 0, *bufs, 0, False)
    with pytest.raises(RuntimeError, match="criterion must be 0, 1, 2 or 3"):
        op(logits, rows, 0.5, 0, *bufs, 4, False)
    with pytest.raises(RuntimeError, match="criterion 3 .patience. needs patience_state"):
        op(logits, rows, 0.5, 0, *bufs, 3, False)
    with pytest.raises(RuntimeError, match="patience_state must be contiguous"):
        op(logits, rows, 0.5, 0, *bufs, 3, False, torch.zeros(2, 4, dtype=torch.int64).t())
    with pytest.raises(RuntimeError, match="out_logits"):
        op(logits, rows, 0.5, 0, bufs[0].half(), *bufs[1:], 0, False)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.branchynet.gather_rows(torch.randn(3, 2), torch.tensor([3]))


# --- exit_step against the reference ---------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("criterion", [0, 1, 2, 3], ids=list(OP_CRITERIA))
@pytest.mark.parametrize("c", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("k", BATCHES, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("dtype", DTYPES, ids=testing.dtype_name)
def test_exit_step_matches_reference(device, backend, dtype, k, c, criterion):
    _skip_float64(backend, dtype)
    if device == "cpu" and (k > 1023 and c > 1000 or dtype != torch.float32 and (k > 1023 or c > 1000)):
        pytest.skip("on the CPU the largest shapes run in float32 only (time); CUDA runs them all")
    if device == "cpu" and backend == "triton" and k * c > MAX_INTERPRETED:
        pytest.skip("too large for the Triton interpreter (test_exit_step_large: 4097 x 1000)")
    seed = 1000 * k + 10 * c + criterion
    logits = testing.sample_logits(k, c, dtype, device, seed)
    b = k + 3  # rows the op must leave untouched
    rows = testing.sample_rows(k, b, device, seed)
    # Small batches: every pattern; large ones the split and the last exit (time).
    for name, t, last in testing.exit_patterns(logits, criterion, full=k <= 7):
        n = _check(device, backend, logits, rows, b, t, criterion, 2, last, against_float64=True)
        if name == "mixed" and k >= 7 and (c > 1 and criterion == 0 or criterion == PATIENCE_ID):
            assert 0 < n < k, "the threshold should split the batch"
        if name == "mixed" and c == 1 and criterion != PATIENCE_ID:
            assert n == 0  # one class: p = 1, every score 0 < T, every row leaves
        if name == "none leave":
            assert n == k
        if name == "all leave":
            assert n == 0
    assert _check(device, backend, logits, rows, b, 0.0, criterion, 3, True) == 0


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_public_op_splits_a_batch_with_every_criterion(device, backend, criterion):
    # By criterion name, as callers pass it: 100 fp16 rows out of 120, split by a
    # threshold in a gap of that criterion's scores.
    cid = CRITERIA.index(criterion)
    logits = testing.sample_logits(100, 10, torch.float16, device, seed=9)
    rows = testing.sample_rows(100, 120, device, seed=9)
    t = testing.gap_threshold(logits, cid)
    outs = [poisoned_buffers(120, 10, torch.float16, device) for _ in range(2)]
    ref = exit_step(logits, rows, t, 1, *outs[0], criterion=criterion, backend="torch")
    got = exit_step(logits, rows, t, 1, *outs[1], criterion=criterion, backend=backend)
    n = int(ref[2])
    assert int(got[2]) == n and 0 < n < 100
    assert torch.equal(got[0][:n].sort().values, ref[0][:n].sort().values)
    assert torch.equal(outs[1][1], outs[0][1]) and torch.equal(outs[1][2], outs[0][2])
    assert torch.equal(outs[1][0].view(torch.int16), outs[0][0].view(torch.int16))
    torch.testing.assert_close(outs[1][3], outs[0][3], rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_patience_through_the_exits_is_pabees_rule(device, backend, patience):
    # The op at every exit with the survivors compacted between exits, as the engine
    # runs it, against PABEE's rule written from every exit's logits at once
    # (testing.patience_rule). Few classes and logits that often agree, so every exit
    # gets leavers; a NaN row never leaves early (row 0 has one at exit 1, row 1 at all).
    b, c, exits = 300, 3, 5
    g = torch.Generator().manual_seed(patience)
    base = torch.randn(b, c, generator=g) * 2
    logits = [base + torch.randn(b, c, generator=g) * 0.8 * (n + 1) for n in range(exits)]
    logits[1][0, 1] = float("nan")
    for z in logits:
        z[1, 0] = float("nan")
    want = testing.patience_rule(logits, patience)
    logits = [z.to(device) for z in logits]
    step = _impl(device, backend)[0]
    out = list(poisoned_buffers(b, c, torch.float32, device))
    state = ops.new_patience_state(b, device)
    rows, local = torch.arange(b, device=device), torch.arange(b, device=device)
    for n, z in enumerate(logits):
        z = z[rows]  # this exit's logits for the rows still in flight
        surv, s_rows, count = step(z, rows, float(patience), n, *out, PATIENCE_ID, n == exits - 1, state)
        k = int(count)
        rows = s_rows[:k]
        if k == 0:
            break
    got = list(zip(out[2].tolist(), out[1].tolist()))
    assert got == want
    exits_taken = sorted({e for e, _ in want})
    assert exits_taken[0] == patience and len(exits_taken) >= 2, exits_taken
    assert want[0][0] != 1 and want[1][0] == exits - 1  # the NaN rows


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("last", [False, True], ids=["side", "last"])
@pytest.mark.parametrize("criterion", [0, 1, 2, 3], ids=list(OP_CRITERIA))
@pytest.mark.parametrize("c", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=testing.dtype_name)
def test_exit_step_special_logits(device, backend, dtype, c, criterion, last):
    _skip_float64(backend, dtype)
    logits = testing.special_logits(c, dtype, device, seed=c)
    k = logits.shape[0]
    rows = testing.sample_rows(k, k + 2, device, seed=c)
    nan_rows = int(torch.isnan(entropy(logits.cpu())).sum())
    assert nan_rows >= (5 if c > 1 else 3)
    patterns = [("fixed", 0.3, last)] + ([] if last else testing.exit_patterns(logits, criterion))
    for name, t, is_last in patterns:
        n = _check(device, backend, logits, rows, k + 2, t, criterion, 0, is_last)
        if is_last:
            assert n == 0
        elif name == "all leave":
            assert n == nan_rows  # the NaN-entropy rows never leave early
        else:
            assert n >= nan_rows


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=testing.dtype_name)
@pytest.mark.parametrize("c", [1, 2, 4, 64])
def test_a_score_equal_to_the_threshold_stays(device, backend, dtype, c):
    # The exit test is strict: flat rows whose score is exactly T stay, the confident
    # rows between them leave (C = 1: every score is 0 = T, so every row stays).
    logits = testing.tie_logits(c, dtype, device)
    rows = testing.sample_rows(8, 10, device, seed=c)
    ties = [crit for crit in range(3) if testing.tie_threshold(crit, c) is not None]
    assert ties
    for crit in ties:
        n = _check(device, backend, logits, rows, 10, testing.tie_threshold(crit, c), crit, 1, False)
        assert n == (8 if c == 1 else 4), (CRITERIA[crit], n)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=testing.dtype_name)
def test_exit_step_strided_inputs_and_outputs(device, backend, dtype):
    wide = testing.sample_logits(40, 2 * 37, dtype, device, seed=5)
    transposed = testing.sample_logits(10, 37, dtype, device, seed=6).t()  # [37, 10], stride (1, 37)
    for logits in (wide[:, ::2], transposed):
        assert not logits.is_contiguous()
        for criterion in (0, 2):
            t = testing.gap_threshold(logits, criterion)
            k = logits.shape[0]
            rows = testing.sample_rows(k, k + 5, device, seed=2)
            _check(device, backend, logits, rows, k + 5, t, criterion, 3, False)
            _check(device, backend, logits, rows, k + 5, t, criterion, 3, False, strided=True)
    # Strided rows (every other element of a reversed arange) and a strided out_pred.
    logits = testing.sample_logits(64, 40, dtype, device, seed=3)[:, ::2]
    rows = torch.arange(128, device=device).flip(0)[::2]
    assert not rows.is_contiguous()
    _check(device, backend, logits, rows, 128, 1.5, 0, 1, False, strided=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("criterion", [0, 2], ids=["entropy", "margin"])
def test_exit_step_large(device, backend, criterion):
    logits = testing.sample_logits(4097, 1000, torch.float32, device, seed=11)
    rows = testing.sample_rows(4097, 4097 + 3000, device, seed=1)
    n = _check(device, backend, logits, rows, 4097 + 3000, testing.gap_threshold(logits, criterion),
               criterion, 3, False)
    assert 0 < n < 4097


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=testing.dtype_name)
def test_exit_step_wide_rows(device, backend, dtype):
    # 20000 classes: several chunks per row in the wide-row kernels; the max in the last.
    logits = testing.sample_logits(6, 20000, dtype, device, seed=8)
    logits[1, 19999] = 1e4
    rows = testing.sample_rows(6, 11, device, seed=4)
    for criterion in (0, 2):
        for _, t, last in testing.exit_patterns(logits, criterion):
            _check(device, backend, logits, rows, 11, t, criterion, 3, last)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_column_strided_logits_past_2_31_elements(device, backend):
    # A transposed view (stride (1, S)) whose last column starts past element 2**31: the
    # column offset col * S must be int64. The 4 GiB fp16 storage is never touched
    # except at the 3 x 8 elements in use (pages are allocated lazily on the CPU).
    s_c = 2**30 + 16
    k, c = 8, 3
    store = torch.empty(2 * s_c + k, dtype=torch.float16, device=device)
    logits = store.as_strided((k, c), (1, s_c))
    logits.copy_((torch.randn(k, c, generator=torch.Generator().manual_seed(0)) * 4).to(device))
    assert logits.storage_offset() + (c - 1) * s_c >= 2**31
    rows = testing.sample_rows(k, k + 5, device, seed=1)
    for criterion in (0, 1):
        _check(device, backend, logits, rows, k + 5, testing.gap_threshold(logits, criterion), criterion, 3, False)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("criterion", ["max_prob", "margin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=testing.dtype_name)
def test_confident_rows_keep_their_max_prob_and_margin_scores(device, backend, criterion, dtype):
    # logits [20, 0, -1]: 1 - p1 = 2.8e-9 and 1 - (p1 - p2) = 4.9e-9, far below fp32's
    # 1 - 6e-8. Computed as 1 - e1 / S in fp32 the score is 0 and the row leaves at any
    # threshold; from the sum of the other terms it keeps its value on every backend.
    logits = torch.tensor([[20.0, 0.0, -1.0], [0.0, -1.0, 20.0]], dtype=dtype, device=device)
    score = float(exit_scores(logits.double().cpu(), criterion)[0][0])
    assert 2e-9 < score < 6e-9
    for t, leaves in ((score * (1 - 1e-3), False), (score * (1 + 1e-3), True)):
        out = poisoned_buffers(2, 3, dtype, device)
        _, _, count = exit_step(logits, torch.arange(2, device=device), t, 1, *out,
                                criterion=criterion, backend=backend)
        assert int(count) == (0 if leaves else 2), (t, score)
        assert out[2].tolist() == ([1, 1] if leaves else [POISON["exit"]] * 2)
        if leaves:
            assert out[1].tolist() == [0, 2]


def _confident_logits(k, c):
    """Entropies down to 1e-10: one logit 8-24 above N(0, 1) others."""
    g = torch.Generator().manual_seed(c)
    z = torch.randn(k, c, generator=g, dtype=torch.float64)
    z[torch.arange(k), torch.randint(0, c, (k,), generator=g)] += 8 + 16 * torch.rand(k, generator=g)
    return z.float()


def _relative_entropy_error(device, backend, z):
    k, c = z.shape
    out = poisoned_buffers(k, c, torch.float32, device)
    exit_step(z.to(device), torch.arange(k, device=device), 0.0, 0, *out, last=True, backend=backend)
    want = poisoned_buffers(k, c, torch.float32, "cpu")
    exit_step(z, torch.arange(k), 0.0, 0, *want, last=True, backend="torch")
    assert float(want[3].min()) < 1e-5  # the regime fp32 logf(S) gets wrong by > 0.1 %
    assert torch.equal(out[1].cpu(), want[1])
    return float(((out[3].cpu().double() - want[3].double()).abs() / want[3].double().clamp_min(1e-30)).max())


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("c", [10, 1000, 3000])
def test_small_entropies_are_accurate_relative_to_themselves(device, backend, c):
    # Confident rows: the kernels take log S as log1p of the sum of every e but the
    # largest (CUDA, Triton: fp32) or sum in double (CPU); plain fp32 logf(S) would miss
    # the entropy by ~5 % at 1e-6.
    assert _relative_entropy_error(device, backend, _confident_logits(256, c)) < 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=testing.dtype_name)
@pytest.mark.parametrize("c", [10, 100, 3000])
def test_nan_payloads_are_copied_bit_for_bit(device, backend, dtype, c):
    # fp16/bf16 -> fp32 -> back quiets a signalling NaN and can change its payload; the
    # leaving rows' logits must be the input's bits, as on every other path.
    bits = torch.randint(-2000, 2000, (8, c), generator=torch.Generator().manual_seed(c), dtype=torch.int16)
    payloads = [0x7C01, 0x7D55, -0x0201] if dtype == torch.float16 else [0x7F81, 0x7FA5, -0x007F]
    for i, p in enumerate(payloads):
        bits[i, i] = p
    logits = bits.view(dtype).to(device)
    assert torch.isnan(logits[:3].float()).any(dim=1).all()
    bufs = poisoned_buffers(8, c, dtype, device)
    exit_step(logits, torch.arange(8, device=device), 0.5, 4, *bufs, last=True, backend=backend)
    assert torch.equal(bufs[0].view(torch.int16).cpu(), bits)


# --- Triton's wide-row kernel at small C -----------------------------------------------


def _chunked(monkeypatch):
    """Force the Triton wide-C kernel at small C: 64-wide chunks."""
    from branchynet.kernels import exit_step as tk

    monkeypatch.setattr(tk, "MAX_TILE_C", 64)
    monkeypatch.setattr(tk, "CHUNK_C", 64)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("criterion", [0, 1, 2, 3], ids=list(OP_CRITERIA))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=testing.dtype_name)
def test_triton_chunked_kernel(device, backend, dtype, criterion, monkeypatch):
    # The last chunk partial; the max, ties, NaN and +inf placed in different chunks.
    _chunked(monkeypatch)
    for c in (100, 1000):
        z = testing.sample_logits(300, c, torch.float32, "cpu", seed=c + criterion)
        z[0, [5, c - 3]] = 40.0                 # tie across chunks: first wins
        z[1, c - 1] = 60.0                      # max in the last, partial chunk
        z[2, c // 2] = float("nan")
        z[3, [c - 2, c // 2 + 1]] = torch.tensor([float("inf"), float("nan")])
        z[4, :] = float("-inf")
        z[5, 70:] = float("-inf")               # whole -inf chunks after a finite one
        z[6, :70] = float("-inf")               # whole -inf chunk before finite ones
        z[7, :] = -1e4
        z[7, c - 1] = 1e4
        z[8, :] = 0.0
        z[9, [3, 90]] = 30.0                    # tied top-2 in two chunks: margin 1
        logits = z.to(dtype).to(device)
        for k in (1, 7, 300):
            rows = testing.sample_rows(k, k + 5, device, seed=k)
            for _, t, last in testing.exit_patterns(logits[:k], criterion, full=k <= 7):
                _check(device, backend, logits[:k], rows, k + 5, t, criterion, 3, last)


@pytest.mark.parametrize("device,backend", TRITON)
def test_triton_chunked_small_entropies(device, backend, monkeypatch):
    _chunked(monkeypatch)
    assert _relative_entropy_error(device, backend, _confident_logits(256, 300)) < 1e-5


# --- gather_rows against the reference -------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 5, 37, 100])
def test_gather_rows_sample_cases(device, backend, m):
    gather = _impl(device, backend)[1]
    g = torch.Generator().manual_seed(m)
    for name, features in testing.gather_samples(37, device):
        index = torch.randint(0, 37, (m,), generator=g).to(device)  # repeats allowed
        failure = testing.compare_gather(gather, features, index)
        assert failure is None, (name, failure)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool],
                         ids=testing.dtype_name)
@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last", "1d", "strided"])
def test_gather_rows_dtypes_and_layouts(device, backend, dtype, layout):
    k = 50
    g = torch.Generator().manual_seed(k)
    shape = {"2d": (k, 37), "4d": (k, 6, 5, 7), "channels_last": (k, 6, 5, 7), "1d": (k,), "strided": (k, 6, 10)}
    x = torch.randn(shape[layout], generator=g) * 100
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = x[:, :, ::2]                    # not dense: made contiguous first
    f = (x > 0 if dtype == torch.bool else x.to(dtype)).to(device)
    gather = _impl(device, backend)[1]
    for m in (0, 1, 17, k):
        idx = torch.randperm(k, generator=g)[:m].to(device)
        failure = testing.compare_gather(gather, f, idx)
        assert failure is None, (m, failure)
        if layout == "channels_last":
            assert gather(f, idx).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gather_rows_wide_rows_and_nan_payloads(device, backend):
    # Wide rows (several column blocks per row) and NaN payloads copied bit for bit.
    f = torch.randn(5, 3 * 4096 + 17, device=device)
    f[2, 100] = float("nan")
    assert testing.compare_gather(_impl(device, backend)[1], f, torch.tensor([2, 4, 0], device=device)) is None


# --- the compiled op as torch sees it --------------------------------------------------


@needs_ops
def test_registration():
    from branchynet.ops import _backends

    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("branchynet::exit_step", "CUDA")
    # CUDA: the extension's kernels, or else Triton's attached through torch.library.
    assert (_C.has_cuda() or _backends.TRITON is not None) == has_cuda_kernel
    for op in ("branchynet::exit_step", "branchynet::gather_rows"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    schema = str(torch.ops.branchynet.exit_step.default._schema)
    assert "Tensor(a!) out_logits" in schema and "Tensor(d!) out_entropy" in schema


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize("m", [0, 1, 5, 37, 100])
def test_compiled_gather_and_its_fake_agree(device, m):
    # The dispatcher op itself (what the engine and torch.compile call), and the shapes
    # and strides its fake promises the compiler.
    from branchynet.ops import _library

    g = torch.Generator().manual_seed(m)
    for name, features in testing.gather_samples(37, device):
        index = torch.randint(0, 37, (m,), generator=g).to(device)
        assert testing.compare_gather(torch.ops.branchynet.gather_rows, features, index) is None, name
        got = torch.ops.branchynet.gather_rows(features, index)
        fake = _library.gather_rows_fake(features, index)
        assert fake.shape == got.shape and (m <= 1 or fake.stride() == got.stride()), name


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize("criterion", [0, 1, 2, 3], ids=list(OP_CRITERIA))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_compiled_exit_step_matches_reference(device, criterion, layout):
    # The dispatcher op itself, as the engine calls it: strided logits (every other
    # column), strided rows and per-row outputs with stride 2 reach the kernel as they are.
    logits = testing.sample_logits(300, 20, torch.float32, device, seed=criterion, special=True)
    rows = testing.sample_rows(300, 310, device, seed=criterion)
    if layout == "strided":
        logits, rows = logits[:, ::2], torch.stack([rows, rows], 1)[:, 0]
        assert not logits.is_contiguous() and rows.stride() == (2,)
    for _, t, last in testing.exit_patterns(logits, criterion):
        res = testing.compare_exit_step(torch.ops.branchynet.exit_step, logits, rows, 310, t, criterion, 1,
                                        last, strided=layout == "strided", permutation=True,
                                        same_order=device == "cpu")
        assert res.ok, res.failure


def _opcheck_exit_step_args(device, criterion, last):
    # K = 37 rows of C = 10: one CUDA block (64 rows), so even the order is deterministic.
    k, c, b = 37, 10, 40
    logits = testing.sample_logits(k, c, torch.float32, device, seed=7)
    rows = testing.sample_rows(k, b, device, seed=7)
    state = (testing.patience_sample_state(logits, rows, b, seed=7).to(device),) if criterion == PATIENCE_ID else ()
    return (logits, rows, testing.gap_threshold(logits, criterion), 1,
            *poisoned_buffers(b, c, torch.float32, device), criterion, last, *state)


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize("last", [False, True], ids=["side", "last"])
@pytest.mark.parametrize("criterion", [0, 2, 3], ids=["entropy", "margin", "patience"])
def test_opcheck_exit_step(device, criterion, last):
    torch.library.opcheck(torch.ops.branchynet.exit_step.default,
                          _opcheck_exit_step_args(device, criterion, last))


@pytest.mark.parametrize("device", EXT_DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_gather_rows(device, layout):
    features = torch.randn(9, 4, 3, 5, device=device)
    if layout == "channels_last":
        features = features.to(memory_format=torch.channels_last)
    index = torch.tensor([8, 0, 3, 3, 5], device=device)
    torch.library.opcheck(torch.ops.branchynet.gather_rows.default, (features, index))


@pytest.mark.parametrize("device", EXT_DEVICES)
def test_compile_fullgraph(device):
    def step(logits, rows, features, out_logits, out_pred, out_exit, out_entropy):
        surv, surv_rows, count = torch.ops.branchynet.exit_step(
            logits, rows, 1.0, 0, out_logits, out_pred, out_exit, out_entropy, 0, False)
        return surv, surv_rows, count, torch.ops.branchynet.gather_rows(features, surv)

    k, c = 37, 10
    logits = testing.sample_logits(k, c, torch.float32, device, seed=11)
    rows = testing.sample_rows(k, k, device, seed=11)
    features = torch.randn(k, 8, 3, 3, device=device).to(memory_format=torch.channels_last)
    eager_bufs = poisoned_buffers(k, c, torch.float32, device)
    comp_bufs = poisoned_buffers(k, c, torch.float32, device)
    expected = step(logits, rows, features, *eager_bufs)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(logits, rows, features, *comp_bufs)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    for e, g in zip(eager_bufs, comp_bufs):  # the in-place writes survive functionalization
        assert torch.equal(testing._bits(e), testing._bits(g))


# --- one schema per op, one kernel per device (branchynet/ops/_library.py) ---------------

def _has_kernel(qualname: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


def test_one_schema_per_op():
    assert str(torch.ops.branchynet.exit_step.default._schema) == "branchynet::" + _library.EXIT_STEP_SCHEMA
    assert str(torch.ops.branchynet.gather_rows.default._schema) == "branchynet::" + _library.GATHER_ROWS_SCHEMA
    # No second door: the namespace holds these two ops and no other.
    names = {n for n in dir(torch.ops.branchynet) if not n.startswith("_")}
    assert {"exit_step", "gather_rows"} <= names
    assert not names & {"exit_step_py", "exit_step_direct"}


@pytest.mark.parametrize("qualname", ["branchynet::exit_step", "branchynet::gather_rows"])
def test_kernels_registered_per_device(qualname):
    assert _has_kernel(qualname, "CompositeExplicitAutograd")  # the PyTorch implementation
    assert _has_kernel(qualname, "Meta")  # the fake
    assert _has_kernel(qualname, "CPU") == HAS_OPS  # the C++ kernel, where built
    # CUDA: the extension's kernels, or else the Triton ones attached through torch.library.
    assert _has_kernel(qualname, "CUDA") == (_backends.ext_has_cuda() or _backends.TRITON is not None)


def test_argument_order_is_the_schemas_everywhere():
    want = [a.name for a in torch.ops.branchynet.exit_step.default._schema.arguments]
    impls = [ops.implementation("torch")[0], _library.exit_step_fake]
    if _backends.TRITON is not None:
        impls.append(_backends.TRITON.exit_step_triton)
    for fn in impls:
        assert list(inspect.signature(fn).parameters) == want, fn
    assert list(inspect.signature(ops.exit_step).parameters)[:len(want) - 2] == want[:-2]


def test_opcheck_dispatched_op():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    rows = torch.tensor([6, 0, 3, 1, 5, 2, 4])
    out = (torch.zeros(9, 5), torch.zeros(9, dtype=torch.int64), torch.full((9,), -1, dtype=torch.int64),
           torch.zeros(9))
    torch.library.opcheck(torch.ops.branchynet.exit_step.default, (logits, rows, 0.8, 2, *out),
                          {"criterion": 0, "last": False})
    torch.library.opcheck(torch.ops.branchynet.gather_rows.default, (logits, rows[:3]))


_NO_EXT = r"""
import json, sys, torch


class NoExtension:  # the extension "is not installed": its import fails
    def find_spec(self, name, path=None, target=None):
        if name == "branchynet._C":
            raise ModuleNotFoundError("No module named 'branchynet._C'", name=name)


sys.meta_path.insert(0, NoExtension())
from branchynet import entropy, ops
g = torch.Generator().manual_seed(0)
logits = torch.randn(7, 5, generator=g) * 3
rows = torch.tensor([6, 0, 3, 1, 5, 2, 4])
out = (torch.zeros(9, 5), torch.zeros(9, dtype=torch.int64), torch.full((9,), -1, dtype=torch.int64), torch.zeros(9))
torch.library.opcheck(torch.ops.branchynet.exit_step.default, (logits, rows, 0.8, 2, *out), {"last": False})
s, r, c = torch.ops.branchynet.exit_step(logits, rows, 0.8, 2, *out)
leave = entropy(logits) < 0.8
print(json.dumps({
    "auto": ops.resolve_backend("auto", "cpu"),
    "cpu_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("branchynet::exit_step", "CPU"),
    "count_ok": int(c) == int((~leave).sum()),
    "written_ok": bool((out[2][rows[leave]] == 2).all()) and bool((out[2][rows[~leave]] == -1).all()),
    "gather_ok": torch.equal(torch.ops.branchynet.gather_rows(logits, r[:2]), logits[r[:2]]),
}))
"""


def test_without_the_extension_the_op_runs_the_pytorch_implementation(tmp_path):
    # A fresh interpreter whose extension "failed to load": the same op, served by the
    # PyTorch implementation (opcheck included), and auto resolves to torch.
    env = dict(os.environ, BRANCHYNET_JIT="0", BRANCHYNET_CACHE=str(tmp_path))  # no cached build either
    res = subprocess.run([sys.executable, "-c", _NO_EXT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"auto": "torch", "cpu_kernel": False, "count_ok": True, "written_ok": True,
                   "gather_ok": True}


def test_kernels_is_a_deprecated_name_for_implementation():
    # ops.kernels() shared its name with the Triton package branchynet.kernels.
    with pytest.warns(DeprecationWarning, match="use branchynet.ops.implementation"):
        got = ops.kernels("torch")
    assert got == ops.implementation("torch")


# --- CUDA only -------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_OPS, reason=WHY_NOT["cuda"])
def test_cuda_side_stream_and_graph_capture():
    k, c = 1023, 100
    logits = testing.sample_logits(k, c, torch.float16, "cuda", seed=5)
    rows = testing.sample_rows(k, k, "cuda", seed=5)
    t = testing.gap_threshold(logits, 0)
    ref_bufs = poisoned_buffers(k, c, torch.float16, "cuda")
    ref = exit_step(logits, rows, t, 0, *ref_bufs, backend="torch")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bufs = poisoned_buffers(k, c, torch.float16, "cuda")
        got = torch.ops.branchynet.exit_step(logits, rows, t, 0, *bufs, 0, False)
    torch.cuda.current_stream().wait_stream(side)
    assert int(got[2]) == int(ref[2]) and torch.equal(bufs[1], ref_bufs[1])

    # Capturable: no host sync, no allocation outside the graph pool's reach.
    bufs = poisoned_buffers(k, c, torch.float16, "cuda")
    with torch.cuda.stream(side):  # warm up outside the capture
        torch.ops.branchynet.exit_step(logits, rows, t, 0, *poisoned_buffers(k, c, torch.float16, "cuda"), 0, False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.branchynet.exit_step(logits, rows, t, 0, *bufs, 0, False)
        gathered = torch.ops.branchynet.gather_rows(logits, out[0])
    for buf, val in zip(bufs, POISON.values()):
        buf.fill_(val)
    graph.replay()
    torch.cuda.synchronize()
    assert int(out[2]) == int(ref[2])
    assert torch.equal(testing._bits(bufs[0]), testing._bits(ref_bufs[0])) and torch.equal(bufs[1], ref_bufs[1])
    assert torch.equal(gathered, logits[out[0]])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_OPS, reason=WHY_NOT["cuda"])
def test_cuda_dispatch_uses_extension():
    from branchynet import ops

    assert ops.resolve_backend("auto", "cuda") == "cuda"
    logits = testing.sample_logits(100, 10, torch.float32, "cuda", seed=1)
    rows = torch.arange(100, device="cuda")
    bufs = poisoned_buffers(100, 10, torch.float32, "cuda")
    # Even rows confident (+20 against -20: entropy ~2e-15), odd rows flat (entropy log 10).
    logits[::2] = -20.0
    logits[::2, 3] = 20.0
    logits[1::2] = 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        surv, _, count = exit_step(logits, rows, 1.0, 2, *bufs, backend="cuda")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("exit_step_rows_kernel" in n for n in names), names  # our kernel ran
    assert int(count) == 50
    assert torch.equal(surv[:50].sort().values, torch.arange(1, 100, 2, device="cuda"))
    assert bufs[2][::2].eq(2).all() and bufs[2][1::2].eq(POISON["exit"]).all()
    assert bufs[1][::2].eq(3).all() and bufs[3][::2].lt(1e-6).all()


# --- the bound op: the engine's entry (branchynet.ops.bind) -----------------------------
#
# On the cpp backend, branchynet._C.exit_step_direct: the CPU kernel called without the
# dispatcher (the engine's fixed cost at B = 1), in the op's argument order. It must give
# exactly what the registered op gives (same kernel), allocate the output buffers itself
# when four None are passed, return the count as an int, refuse bad arguments with the
# op's messages, and be what the eager engine calls.

needs_direct = pytest.mark.skipif(_C is None or not hasattr(_C, "exit_step_direct"),
                                  reason="branchynet._C with exit_step_direct is not built")

NONE = (None, None, None, None)  # no output buffers: the entry allocates them


def _median_score(logits, criterion):
    # About half the rows leave; random logits put no score on the median exactly.
    return float(exit_scores(logits.float(), CRITERIA[criterion])[0].median())


def _direct_buffers(b, c, dtype):
    # Poisoned: exactly the leaving rows must be written.
    return (torch.full((b, c), -3.0, dtype=dtype), torch.full((b,), -7, dtype=torch.int64),
            torch.full((b,), -9, dtype=torch.int64), torch.full((b,), -5.0))


@needs_direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("criterion", [0, 1, 2, 3])
@pytest.mark.parametrize("last", [False, True])
def test_direct_with_buffers_matches_reference(dtype, criterion, last):
    g = torch.Generator().manual_seed(7 + criterion)
    k, c, b = 37, 10, 45
    logits = (torch.randn(k, c, generator=g) * 3).to(dtype)
    rows = torch.randperm(b, generator=g)[:k]
    ref_bufs, bufs = _direct_buffers(b, c, dtype), _direct_buffers(b, c, dtype)
    state = ()
    if criterion == PATIENCE_ID:
        start = testing.patience_sample_state(logits, rows, b, seed=7)
        ref_bufs, bufs, state = (*ref_bufs, start.clone()), (*bufs, start.clone()), (start,)
        t = 2.0
    else:
        t = _median_score(logits, criterion)
    ref = exit_step_torch(logits, rows, t, 2, *ref_bufs[:4], criterion, last, *ref_bufs[4:])
    survivors, survivor_rows, n = _C.exit_step_direct(logits, rows, t, 2, *bufs[:4], criterion, last, *bufs[4:])
    if state:
        assert torch.equal(bufs[4], ref_bufs[4]) and not torch.equal(bufs[4], state[0])
    assert isinstance(n, int) and n == int(ref[2])
    if not last:
        assert 0 < n < k, "the threshold should split the batch"
    assert torch.equal(survivors, ref[0]) and torch.equal(survivor_rows, ref[1])
    for got, want in zip(bufs[:3], ref_bufs[:3]):
        assert torch.equal(got, want)
    torch.testing.assert_close(bufs[3], ref_bufs[3], rtol=2e-5, atol=2e-5)


@needs_direct
def test_direct_allocates_buffers_like_the_op():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 20, generator=g)[:, ::2] * 4  # strided: the kernel copies it
    rows = torch.arange(64)
    bufs = _direct_buffers(64, 10, torch.float32)
    t = _median_score(logits, 0)
    ref = torch.ops.branchynet.exit_step(logits, rows, t, 0, *bufs, criterion=0, last=False)
    survivors, survivor_rows, n, *out = _C.exit_step_direct(logits, rows, t, 0, *NONE, 0, False)
    assert n == int(ref[2]) and 0 < n < 64
    assert torch.equal(survivors, ref[0]) and torch.equal(survivor_rows, ref[1])
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in bufs]
    leave = survivors[n:]  # rows = 0..K-1: the leavers' rows are their local indices
    for got, want in zip(out, bufs):
        assert torch.equal(got[leave], want[leave])


@needs_direct
def test_direct_rejects_bad_arguments():
    logits, rows = torch.randn(4, 3), torch.arange(4)
    bufs = _direct_buffers(4, 3, torch.float32)
    d = _C.exit_step_direct
    with pytest.raises(RuntimeError, match="rows must be int64"):
        d(logits, rows.int(), 0.5, 0, *bufs, 0, False)
    with pytest.raises(RuntimeError, match="out of range"):
        d(logits, torch.tensor([0, 1, 2, 4]), 0.5, 0, *bufs, 0, False)
    with pytest.raises(RuntimeError, match="criterion must be 0, 1, 2 or 3"):
        d(logits, rows, 0.5, 0, *NONE, 4, False)
    with pytest.raises(RuntimeError, match="needs patience_state"):
        d(logits, rows, 0.5, 0, *bufs, 3, False)
    with pytest.raises(RuntimeError, match="patience_state is only for criterion 3"):
        d(logits, rows, 0.5, 0, *bufs, 0, False, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"patience_state must be int64 \[4, 2\]"):
        d(logits, rows, 0.5, 0, *bufs, 3, False, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="patience_state must be a tensor or None"):
        d(logits, rows, 0.5, 0, *bufs, 3, False, [[0, 0]] * 4)
    with pytest.raises(RuntimeError, match="out_logits must be"):
        d(logits, rows, 0.5, 0, bufs[0].half(), *bufs[1:], 0, False)
    with pytest.raises(RuntimeError, match=r"logits must be \[K, C\]"):
        d(torch.randn(4), rows, 0.5, 0, *NONE, 0, False)
    with pytest.raises(TypeError, match="all four out_\\* buffers or four None"):
        d(logits, rows, 0.5, 0, bufs[0], None, None, None, 0, False)
    with pytest.raises(TypeError, match="tensors expected"):
        d(logits.tolist(), rows, 0.5, 0, *NONE, 0, False)
    with pytest.raises(TypeError):  # the old order (criterion before exit_index, no buffers)
        d(logits, rows, 0.5, 0, 0, False)


@needs_direct
def test_eager_engine_calls_the_direct_entry(monkeypatch):
    torch.manual_seed(0)
    model = build_model("b_lenet").eval()
    x = torch.randn(9, 1, 28, 28)
    with torch.no_grad():
        t = _median_score(model.branches[0](model.stages[0](x)), 0)
    eng = EarlyExitEngine(model, [t], backend="cpp")
    want = EarlyExitEngine(model, [t], backend="torch")(x)
    calls = []
    real = _C.exit_step_direct

    def spy(*args):
        calls.append(args[4] is None)
        return real(*args)

    # The bound op takes the extension's entry when the engine binds it (first call).
    monkeypatch.setattr(_backends, "EXT", SimpleNamespace(exit_step_direct=spy, has_cuda=_C.has_cuda))
    got = eng(x)
    # First exit: the entry allocates the buffers (four None); the last one passes them.
    assert calls == [True, False]
    assert eng.backend_for("cpu") == "cpp"
    assert got.counts == want.counts and 0 < got.counts[0] < 9
    assert torch.equal(got.pred, want.pred) and torch.equal(got.exit, want.exit)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
    # Buffers made in C++ follow inference mode as torch.empty's do.
    assert [t.is_inference() for t in (got.logits, got.pred, got.exit, got.entropy)] == [True] * 4


@needs_direct
def test_direct_large_batch_releases_the_interpreter_and_still_raises():
    # Above 65536 logits the entry runs the kernel without the GIL: same answers, and
    # an error raised there still reaches Python as the op's error.
    g = torch.Generator().manual_seed(5)
    k, c = 7000, 10
    logits = torch.randn(k, c, generator=g) * 3
    rows = torch.randperm(k, generator=g)
    t = _median_score(logits, 0)
    bufs = _direct_buffers(k, c, torch.float32)
    ref = torch.ops.branchynet.exit_step(logits, rows, t, 1, *bufs, criterion=0, last=False)
    survivors, survivor_rows, n, *out = _C.exit_step_direct(logits, torch.arange(k), t, 1, *NONE, 0, False)
    assert 0 < n < k and n == int(ref[2])
    assert torch.equal(survivors, ref[0])
    bad = rows.clone()
    bad[-1] = k
    with pytest.raises(RuntimeError, match=rf"rows\[{k - 1}\] = {k} is out of range"):
        _C.exit_step_direct(logits, bad, t, 1, *NONE, 0, False)


@needs_direct
@pytest.mark.parametrize("backend", [b for b in ops.available_backends("cpu") if b != "triton"])
def test_bound_step_over_two_exits_equals_the_reference(backend):
    # The engine's use: an empty output list filled at the first exit, then passed on.
    g = torch.Generator().manual_seed(11)
    k, c = 40, 7
    z1, z2 = torch.randn(k, c, generator=g) * 3, torch.randn(k, c, generator=g)
    s = exit_scores(z1, "entropy")[0].sort().values
    t = float(s[k // 2 - 1] + s[k // 2]) / 2  # between two scores: no float-rounding tie
    op = ops.bind("cpu", backend)
    assert op.backend == backend
    out, rows = [], torch.arange(k)
    survivors, survivor_rows, n = op.step(z1, rows, t, 0, out, 0, False)
    n = int(n)
    assert 0 < n < k and len(out) == 4
    op.step(z2[survivors[:n]], survivor_rows[:n], 0.0, 1, out, 0, True)
    want = _direct_buffers(k, c, torch.float32)
    r_surv, r_rows, r_n = exit_step_torch(z1, rows, t, 0, *want)
    exit_step_torch(z2[r_surv[:n]], r_rows[:n], 0.0, 1, *want, last=True)
    assert int(r_n) == n
    for got, ref in zip(out[:3], want[:3]):
        assert torch.equal(got, ref)
    torch.testing.assert_close(out[3], want[3], rtol=2e-5, atol=2e-5)
