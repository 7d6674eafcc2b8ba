"""The bound exit op (``branchynet.ops.bind``) on the ``cpp`` backend:
``branchynet._C.exit_step_direct``, the CPU exit kernel called without the dispatcher (the
engine's fixed cost at B = 1), in the op's argument order.

It must give exactly what the registered op gives (same kernel), allocate the output
buffers itself when four None are passed, return the count as an int, refuse bad
arguments with the op's messages, and be what the eager engine calls.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from branchynet import EarlyExitEngine, ops
from branchynet.ops import _backends
from branchynet.config import CRITERIA
from branchynet.exits import exit_scores
from branchynet.models.registry import build_model
from branchynet.ops._torch import exit_step_torch

# The module the engine uses: branchynet._C, or a just-in-time build where that is missing
# (asking for the backends is what loads it).
_C = ops._EXT if "cpp" in ops.available_backends("cpu") else None

pytestmark = pytest.mark.skipif(
    _C is None or not hasattr(_C, "exit_step_direct"),
    reason="branchynet._C with exit_step_direct is not built (python setup.py build_ext --inplace)")


NONE = (None, None, None, None)  # no output buffers: the entry allocates them


def _median_score(logits, criterion):
    # About half the rows leave; random logits put no score on the median exactly.
    return float(exit_scores(logits.float(), CRITERIA[criterion])[0].median())


def _buffers(b, c, dtype):
    # Poisoned: exactly the leaving rows must be written.
    return (torch.full((b, c), -3.0, dtype=dtype), torch.full((b,), -7, dtype=torch.int64),
            torch.full((b,), -9, dtype=torch.int64), torch.full((b,), -5.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("criterion", [0, 1, 2])
@pytest.mark.parametrize("last", [False, True])
def test_direct_with_buffers_matches_reference(dtype, criterion, last):
    g = torch.Generator().manual_seed(7 + criterion)
    k, c, b = 37, 10, 45
    logits = (torch.randn(k, c, generator=g) * 3).to(dtype)
    rows = torch.randperm(b, generator=g)[:k]
    ref_bufs, bufs = _buffers(b, c, dtype), _buffers(b, c, dtype)
    t = _median_score(logits, criterion)
    ref = exit_step_torch(logits, rows, t, 2, *ref_bufs, criterion=criterion, last=last)
    survivors, survivor_rows, n = _C.exit_step_direct(logits, rows, t, 2, *bufs, criterion, last)
    assert isinstance(n, int) and n == int(ref[2])
    if not last:
        assert 0 < n < k, "the threshold should split the batch"
    assert torch.equal(survivors, ref[0]) and torch.equal(survivor_rows, ref[1])
    for got, want in zip(bufs[:3], ref_bufs[:3]):
        assert torch.equal(got, want)
    torch.testing.assert_close(bufs[3], ref_bufs[3], rtol=2e-5, atol=2e-5)


def test_direct_allocates_buffers_like_the_op():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 20, generator=g)[:, ::2] * 4  # strided: the kernel copies it
    rows = torch.arange(64)
    bufs = _buffers(64, 10, torch.float32)
    t = _median_score(logits, 0)
    ref = torch.ops.branchynet.exit_step(logits, rows, t, 0, *bufs, criterion=0, last=False)
    survivors, survivor_rows, n, *out = _C.exit_step_direct(logits, rows, t, 0, *NONE, 0, False)
    assert n == int(ref[2]) and 0 < n < 64
    assert torch.equal(survivors, ref[0]) and torch.equal(survivor_rows, ref[1])
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in bufs]
    leave = survivors[n:]  # rows = 0..K-1: the leavers' rows are their local indices
    for got, want in zip(out, bufs):
        assert torch.equal(got[leave], want[leave])


def test_direct_rejects_bad_arguments():
    logits, rows = torch.randn(4, 3), torch.arange(4)
    bufs = _buffers(4, 3, torch.float32)
    d = _C.exit_step_direct
    with pytest.raises(RuntimeError, match="rows must be int64"):
        d(logits, rows.int(), 0.5, 0, *bufs, 0, False)
    with pytest.raises(RuntimeError, match="out of range"):
        d(logits, torch.tensor([0, 1, 2, 4]), 0.5, 0, *bufs, 0, False)
    with pytest.raises(RuntimeError, match="criterion must be 0, 1 or 2"):
        d(logits, rows, 0.5, 0, *NONE, 3, False)
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


def test_direct_large_batch_releases_the_interpreter_and_still_raises():
    # Above 65536 logits the entry runs the kernel without the GIL: same answers, and
    # an error raised there still reaches Python as the op's error.
    g = torch.Generator().manual_seed(5)
    k, c = 7000, 10
    logits = torch.randn(k, c, generator=g) * 3
    rows = torch.randperm(k, generator=g)
    t = _median_score(logits, 0)
    bufs = _buffers(k, c, torch.float32)
    ref = torch.ops.branchynet.exit_step(logits, rows, t, 1, *bufs, criterion=0, last=False)
    survivors, survivor_rows, n, *out = _C.exit_step_direct(logits, torch.arange(k), t, 1, *NONE, 0, False)
    assert 0 < n < k and n == int(ref[2])
    assert torch.equal(survivors, ref[0])
    bad = rows.clone()
    bad[-1] = k
    with pytest.raises(RuntimeError, match=rf"rows\[{k - 1}\] = {k} is out of range"):
        _C.exit_step_direct(logits, bad, t, 1, *NONE, 0, False)


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
    want = _buffers(k, c, torch.float32)
    r_surv, r_rows, r_n = exit_step_torch(z1, rows, t, 0, *want)
    exit_step_torch(z2[r_surv[:n]], r_rows[:n], 0.0, 1, *want, last=True)
    assert int(r_n) == n
    for got, ref in zip(out[:3], want[:3]):
        assert torch.equal(got, ref)
    torch.testing.assert_close(out[3], want[3], rtol=2e-5, atol=2e-5)
