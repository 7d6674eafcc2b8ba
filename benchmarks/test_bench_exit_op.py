"""The exit op alone: B x C x provider, against a device copy of the bytes it must move.

Group ``"exit_op|B={b}|C={c}"``. Half the rows leave (the threshold is the median
entropy; at B = 1 the one row leaves in every other call). The rows map the K logits
rows to a random permutation of the batch, so the leaving rows' writes scatter as they
do after compaction. Each timed call of pytest-benchmark is one round of
``calls_per_round`` ops back to back in a bare loop, with one synchronisation at its end
(as ``triton.testing.do_bench``), so the time per op (median / ``calls_per_timed_call``)
is its steady-state cost, launch included, without a Python harness per op; the engine's
latency per exit is what the engine suite measures. The logits cycle through enough
copies (row permutations: the same exit count every call) to overflow the GPU's L2, so
no call reads them from cache; the output buffers are reused (the op writes only rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import profiles as P
from branchynet.exits import entropy
from branchynet.ops import _torch as ops_torch

DEVICE = P.bench_device()
CASES = [(b, c, prov) for (b, c) in P.exit_op_cases() for prov in P.exit_op_providers(DEVICE)]
IDS = [f"B{b}-C{c}-{prov}" for (b, c, prov) in CASES]

#: Bytes of logits to cycle through (> the 50 MB L2 of an H100).
CYCLE_BYTES = 128 * 2**20
MAX_COPIES = 16
#: Target length of one round (many back-to-back calls), seconds.
ROUND_S = 2e-3
CRITERION = 0  # entropy
_INPUTS: dict = {}


def _inputs(b: int, c: int, device: torch.device):
    """Logits copies, rows, threshold and exit count for (B, C), built once."""
    key = (b, c, str(device))
    if key not in _INPUTS:
        g = torch.Generator().manual_seed(1000 * b + c)
        # Per-row temperature: entropies spread from ~0 to ~log C, as trained exits give.
        m = max(b, 2)  # at B = 1: a confident row and an unsure one, in turn
        scale = 0.25 + 6.0 * torch.rand(m, 1, generator=g)
        pool = torch.randn(m, c, generator=g) * scale
        h = entropy(pool).numpy()
        t, got = P.split_threshold(np.sort(h), m // 2)
        n_copies = max(2, min(MAX_COPIES, math.ceil(CYCLE_BYTES / max(1, pool.numel() * 4))))
        if b == 1:
            lo, hi = int(np.argmin(h)), int(np.argmax(h))
            copies = [pool[[lo if i % 2 == 0 else hi]] for i in range(n_copies)]
            n_exit = 0.5  # per call, on average
        else:
            copies = [pool] + [pool[torch.randperm(b, generator=g)] for _ in range(n_copies - 1)]
            n_exit = got
        logits = [x.to(device).contiguous() for x in copies]
        rows = torch.randperm(b, generator=g).to(device)
        _INPUTS.clear()  # one shape at a time: the 16384 x 1000 copies are 128 MB
        _INPUTS[key] = (logits, rows, t, got)
    return _INPUTS[key]


def _outputs(b: int, c: int, device, poison: bool = False):
    out = (torch.empty(b, c, device=device), torch.empty(b, dtype=torch.int64, device=device),
           torch.empty(b, dtype=torch.int64, device=device), torch.empty(b, device=device))
    if poison:
        out[0].fill_(float("nan"))
        out[1].fill_(-7)
        out[2].fill_(-7)
        out[3].fill_(float("nan"))
    return out


def _op_fn(provider: str):
    """``f(logits, rows, threshold, exit_index, *out, criterion, last)`` (the op's order) for a provider
    (below the public op's argument checks, for every provider alike: the kernels are
    timed, not Python validation)."""
    if provider == "op_eager":
        f = ops_torch.exit_step_torch
    elif provider == "op_compile":
        P.raise_dynamo_limits()
        f = torch.compile(ops_torch.exit_step_torch, dynamic=False)
    elif provider == "op_triton":
        from branchynet import ops

        f = ops.implementation("triton")[0]
    elif provider in ("op_cuda", "op_cpp"):  # one registered op, CUDA and CPU kernels
        f = torch.ops.branchynet.exit_step.default
    else:
        raise ValueError(provider)
    return f


def _check(fn, logits, rows, t, b, c, device):
    """The provider against exit_step_torch on poisoned output buffers."""
    want_out = _outputs(b, c, device, poison=True)
    got_out = _outputs(b, c, device, poison=True)
    ws, wr, wc = ops_torch.exit_step_torch(logits, rows, t, 0, *want_out, CRITERION, False)
    gs, gr, gc = fn(logits, rows, t, 0, *got_out, CRITERION, False)
    k = int(wc.item())
    assert int(gc.item()) == k, f"survivor count {int(gc.item())} != {k}"
    torch.testing.assert_close(got_out[2], want_out[2])  # exit index (-7 where the row stays)
    left = want_out[2] == 0
    assert int(left.sum()) == b - k
    torch.testing.assert_close(got_out[1][left], want_out[1][left])
    torch.testing.assert_close(got_out[0][left], want_out[0][left])
    torch.testing.assert_close(got_out[3][left], want_out[3][left], rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.sort(gr[:k]).values, torch.sort(wr[:k]).values)
    assert torch.equal(rows[gs[:k]], gr[:k])


@pytest.mark.parametrize("batch,classes,provider", CASES, ids=IDS)
def test_exit_op(benchmark, bench_ctx, batch, classes, provider):
    ctx = bench_ctx
    dev = ctx.device
    logits, rows, t, n_exit = _inputs(batch, classes, dev)
    if n_exit == int(n_exit):
        nbytes = P.exit_op_bytes(batch, classes, int(n_exit), elem=4)
    else:  # B = 1, the row leaves in half the calls: the mean of both
        a, b_ = P.exit_op_bytes(batch, classes, 0), P.exit_op_bytes(batch, classes, 1)
        nbytes = {k: (a[k] + b_[k]) / 2 for k in a}
    n = len(logits)

    if provider == "copy":
        # Traffic of a copy of N bytes is 2N (read + write): copy half the op's bytes.
        half = max(1, (nbytes["total"] + 1) // 2)
        srcs = [torch.empty(half, dtype=torch.uint8, device=dev).random_(0, 255) for _ in range(n)]
        dst = torch.empty(half, dtype=torch.uint8, device=dev)
        bytes_moved = 2 * half
        fn, args = dst.copy_, [(src,) for src in srcs]
    else:
        fn = _op_fn(provider)
        with torch.inference_mode():
            for z in logits[:2]:  # at B = 1 the leaving and the staying row
                _check(fn, z, rows, t, batch, classes, dev)
        out = _outputs(batch, classes, dev)
        bytes_moved = nbytes["total"]
        args = [(z, rows, t, 0, *out, CRITERION, False) for z in logits]

    m_box = [1]
    sync = ctx.sync

    def round_():
        # A bare loop: per op, only the call itself runs in Python.
        m = m_box[0]
        with torch.inference_mode():
            for i in range(m):
                fn(*args[i % n])
        sync()

    # Latency of one synchronised call sets the calls per round.
    t1 = P.calibrate(round_, 1, warmup_s=0.1 * ctx.target_s, min_warmup=3, max_warmup=50)
    m_box[0] = max(2, min(10000, int(ROUND_S / max(t1, 1e-7))))
    m_box[0] += m_box[0] % 2  # even: at B = 1 the row leaves in exactly half the calls
    t_round = P.calibrate(round_, 1, warmup_s=0.0, min_warmup=2)
    rounds = P.choose_rounds(t_round, ctx.target_s, min_rounds=ctx.min_rounds, max_rounds=ctx.max_rounds)

    benchmark.group = f"exit_op|B={batch}|C={classes}"
    benchmark.name = provider
    benchmark.pedantic(round_, rounds=rounds, iterations=1, warmup_rounds=0)
    ctx.sync()

    benchmark.extra_info.update(ctx.common_info())
    benchmark.extra_info.update({
        "suite": "exit_op",
        "batch": batch,
        "classes": classes,
        "provider": provider,
        "dtype": "float32",
        "n_exit": n_exit,
        "threshold": t,
        "bytes": nbytes,
        "bytes_moved": bytes_moved,
        "calls_per_round": m_box[0],
        "calls_per_timed_call": m_box[0],
        "rounds": rounds,
        "logit_copies": n,
        "samples_per_call": 1,
    })
