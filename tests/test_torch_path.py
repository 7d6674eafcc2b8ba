"""The pure-PyTorch exit op's CPU path for a few rows (Python floats) against its
vectorised form, which is the reference's own arithmetic (branchynet.exits._scores)."""

import math
import zlib

import pytest
import torch

from branchynet import testing
from branchynet.ops import _torch
from branchynet.ops._torch import SCALAR_MAX_ELEMENTS, exit_step_torch

DTYPES = list(testing.DTYPES)
POISON = testing.POISON["exit"]


def _buffers(b, c, dtype):
    return testing.poisoned_buffers(b, c, dtype, "cpu")


def _logits(gen, k, c, dtype, kind):
    z = torch.randn(k, c, generator=gen, dtype=torch.float64) * 4
    if kind == "confident":
        z[:, 0] += 30  # entropies down to ~1e-12
    elif kind == "special" and k * c:
        flat = z.view(-1)
        picks = torch.randint(0, k * c, (max(1, k * c // 4),), generator=gen)
        values = torch.tensor([math.nan, math.inf, -math.inf, 1e4, -1e4])
        flat[picks] = values[torch.randint(0, 5, (picks.numel(),), generator=gen)].double()
        if k > 1:
            z[1] = -math.inf  # a row with every class masked
    elif kind == "masked":  # -inf logits mask classes: they add 0, never 0 * -inf = NaN
        mask = torch.rand(k, c, generator=gen) < 0.4
        mask[:, 0] = False
        z[mask] = -math.inf
    elif kind == "ties":
        z = torch.round(z)
    return z.to(dtype)


def _compare(logits, rows, b, threshold, criterion, last):
    k, c = logits.shape
    got_bufs, ref_bufs = _buffers(b, c, logits.dtype), _buffers(b, c, logits.dtype)
    got = _torch._exit_step_scalar(logits, rows, threshold, 2, *got_bufs, criterion, last)
    ref = _torch._exit_step_vectorized(logits, rows, threshold, 2, *ref_bufs, criterion, last)
    torch.testing.assert_close(got_bufs[0], ref_bufs[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_bufs[1], ref_bufs[1]), "pred"
    assert torch.equal(got_bufs[2], ref_bufs[2]), "exit (which rows left)"
    torch.testing.assert_close(got_bufs[3], ref_bufs[3], rtol=1e-6, atol=1e-15, equal_nan=True)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype == torch.int64
        assert torch.equal(g, r), (g, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "confident", "special", "masked", "ties"])
@pytest.mark.parametrize("criterion", [0, 1, 2])
def test_scalar_path_equals_vectorised(dtype, kind, criterion):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}-{kind}-{criterion}".encode()))
    for k, c in [(1, 1), (1, 2), (1, 10), (3, 10), (8, 10), (5, 3), (2, 64), (0, 10)]:
        b = k + 3
        rows = torch.randperm(b, generator=gen)[:k]
        logits = _logits(gen, k, c, dtype, kind)
        # Thresholds: fixed ones, and just above and below each row's own score. Not at
        # it: the two paths sum in different orders, and a float64 entropy of 1e-11 is
        # only good to ~1e-16 absolute in either (test_threshold_is_strict_in_float32
        # checks the boundary itself).
        score = [float(s) for s in _torch._scores(logits, criterion)[0] if not math.isnan(s)]
        gaps = [max(abs(s) * 1e-4, 1e-12) for s in score]  # 1 - max p of 1e-13 is +-1e-16
        for t in [0.0, 0.3, 1.7, 1e30, *[max(0.0, s + f * g) for s, g in zip(score, gaps) for f in (-1, 1)]]:
            _compare(logits, rows, b, t, criterion, last=False)
        _compare(logits, rows, b, 0.0, criterion, last=True)


def test_dispatch_by_size_and_device():
    calls = []
    real = _torch._exit_step_scalar

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    _torch._exit_step_scalar = spy
    try:
        for k in (1, SCALAR_MAX_ELEMENTS // 10, SCALAR_MAX_ELEMENTS // 10 + 1):
            z = torch.randn(k, 10)
            exit_step_torch(z, torch.arange(k), 0.5, 0, *_buffers(k, 10, z.dtype), 0, False)
    finally:
        _torch._exit_step_scalar = real
    assert calls == [(1, 10), (SCALAR_MAX_ELEMENTS // 10, 10)]


def test_scalar_path_refuses_grad_buffers():
    z = torch.randn(1, 4)
    bufs = list(_buffers(1, 4, z.dtype))
    bufs[3] = bufs[3].requires_grad_()
    with pytest.raises(RuntimeError, match="must not require grad"):
        _torch._exit_step_scalar(z, torch.arange(1), 10.0, 0, *bufs, 0, False)


@pytest.mark.parametrize("path", ["_exit_step_scalar", "_exit_step_vectorized"])
def test_threshold_is_strict_in_float32(path):
    # Two equal logits: H = log 2, float32 0.693147182464599609375. A threshold a hair
    # above it rounds to the same float32, so "H < T" is false and the row stays (the
    # reference compares float32 scores with the threshold in float32); one float32 ulp
    # above, it leaves.
    h32 = float(torch.tensor(math.log(2.0)).float())
    step = getattr(_torch, path)
    for t, leaves in [(h32, False), (h32 + 1e-12, False), (math.nextafter(h32, 1.0), False),
                      (h32 + 2 ** -23, True)]:
        bufs = _buffers(1, 2, torch.float32)
        _, _, count = step(torch.zeros(1, 2), torch.arange(1), t, 0, *bufs, 0, False)
        assert int(count) == (0 if leaves else 1), t
        assert bufs[2].item() == (0 if leaves else POISON)
