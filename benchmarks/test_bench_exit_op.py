"""The exit op alone: B x C x provider, against a device copy of the bytes it must move.

Group ``"exit_op|B={b}|C={c}"``. Half the rows leave (the threshold is the median
entropy). Each round launches ``calls_per_round`` ops back to back and synchronises once
at its end, as ``triton.testing.do_bench`` does, so the time per call is the op's
steady-state cost (launch included) rather than a launch-plus-sync latency; the engine's
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
        scale = 0.25 + 6.0 * torch.rand(b, 1, generator=g)
        base = torch.randn(b, c, generator=g) * scale
        n_exit = (b + 1) // 2
        h = entropy(base).numpy()
        t, got = P.split_threshold(np.sort(h), n_exit)
        n_copies = max(1, min(MAX_COPIES, math.ceil(CYCLE_BYTES / max(1, base.numel() * 4))))
        copies = [base] + [base[torch.randperm(b, generator=g)] for _ in range(n_copies - 1)]
        logits = [x.to(device).contiguous() for x in copies]
        rows = torch.arange(b, dtype=torch.int64, device=device)
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
    """``f(logits, rows, threshold, out)`` for a provider (below the public op's argument
    checks, for every provider alike: the kernels are timed, not Python validation)."""
    if provider == "op_eager":
        f = ops_torch.exit_step_torch
    elif provider == "op_compile":
        P.raise_dynamo_limits()
        f = torch.compile(ops_torch.exit_step_torch, dynamic=False)
    elif provider == "op_triton":
        from branchynet import ops

        f = getattr(getattr(ops, "_TRITON", None), "exit_step_triton", None)
        if f is None:
            return lambda z, r, t, out: ops.exit_step(z, r, t, 0, *out, backend="triton")
    elif provider in ("op_cuda", "op_cpp"):  # one registered op, CUDA and CPU kernels
        f = torch.ops.branchynet.exit_step
    else:
        raise ValueError(provider)
    return lambda z, r, t, out: f(z, r, t, CRITERION, 0, False, *out)


def _check(fn, logits, rows, t, b, c, device):
    """The provider against exit_step_torch on poisoned output buffers."""
    want_out = _outputs(b, c, device, poison=True)
    got_out = _outputs(b, c, device, poison=True)
    ws, wr, wc = ops_torch.exit_step_torch(logits, rows, t, CRITERION, 0, False, *want_out)
    gs, gr, gc = fn(logits, rows, t, got_out)
    k = int(wc.item())
    assert int(gc.item()) == k, f"survivor count {int(gc.item())} != {k}"
    torch.testing.assert_close(got_out[2], want_out[2])  # exit index (-7 where the row stays)
    left = want_out[2] == 0
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
    nbytes = P.exit_op_bytes(batch, classes, n_exit, elem=4)
    n = len(logits)
    state = {"i": 0, "k": 0}

    if provider == "copy":
        # Traffic of a copy of N bytes is 2N (read + write): copy half the op's bytes.
        half = max(1, (nbytes["total"] + 1) // 2)
        srcs = [torch.empty(half, dtype=torch.uint8, device=dev).random_(0, 255) for _ in range(n)]
        dst = torch.empty(half, dtype=torch.uint8, device=dev)
        bytes_moved = 2 * half

        def call():
            dst.copy_(srcs[state["k"] % n])
    else:
        fn = _op_fn(provider)
        with torch.inference_mode():
            _check(fn, logits[0], rows, t, batch, classes, dev)
        out = _outputs(batch, classes, dev)
        bytes_moved = nbytes["total"]

        def call():
            fn(logits[state["k"] % n], rows, t, out)

    m_box = [1]

    def step():
        with torch.inference_mode():
            call()
        state["k"] += 1
        state["i"] += 1
        if state["i"] >= m_box[0]:  # one synchronisation per round
            state["i"] = 0
            ctx.sync()

    # Latency of one synchronised call sets the calls per round.
    t1 = P.calibrate(step, 1, warmup_s=0.1 * ctx.target_s, min_warmup=3, max_warmup=50)
    m_box[0] = max(1, min(1000, int(ROUND_S / max(t1, 1e-7))))
    state["i"] = 0
    t_round = P.calibrate(step, m_box[0], warmup_s=0.0, min_warmup=m_box[0])
    rounds = P.choose_rounds(t_round, ctx.target_s, min_rounds=ctx.min_rounds, max_rounds=ctx.max_rounds)
    state["i"] = 0

    benchmark.group = f"exit_op|B={batch}|C={classes}"
    benchmark.name = provider
    benchmark.pedantic(step, rounds=rounds, iterations=m_box[0], warmup_rounds=0)
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
        "rounds": rounds,
        "logit_copies": n,
        "samples_per_call": 1,
    })
