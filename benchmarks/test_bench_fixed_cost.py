"""The engine's fixed cost at B = 1: ``engine(x)`` with every sample leaving at the first
branch, against the same stage 1 + branch 1 run by hand under ``torch.inference_mode``.

Group ``"fixed_cost|{model}|B=1"``, providers ``by_hand`` and ``engine_<backend>`` (the
eager engine with each exit-op backend of the device). The target: the engine at
most 1.10x the by-hand time. Every engine benchmark also records an interleaved
ratio: rounds alternate engine and by-hand calls on the same inputs and the ratio is
taken per round (median and quartiles), so a load that drifts between two benchmarks
does not enter it. Default: B-LeNet; BRANCHYNET_BENCH_FULL=1 adds the other two.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import profiles as P
from branchynet.engine import EarlyExitEngine
from branchynet.ops import available_backends

DEVICE = P.bench_device()
MODELS = P.MODEL_NAMES if P.full_scope() else ("b_lenet",)
BACKENDS = [b for b in available_backends(DEVICE) if DEVICE.type == "cuda" or b != "triton"]
CASES = [(m, prov) for m in MODELS for prov in ["by_hand"] + [f"engine_{b}" for b in BACKENDS]]
#: Interleaved rounds (each: CALLS engine calls, then CALLS by-hand calls).
ROUNDS = 201
CALLS = 16


def _by_hand(model):
    stage, branch = model.stages[0], model.branches[0]

    def run(x):
        with torch.inference_mode():
            return branch(stage(x))
    return run


@pytest.mark.parametrize("model_name,provider", CASES, ids=[f"{m}-B1-{p}" for m, p in CASES])
def test_fixed_cost(benchmark, bench_ctx, model_name, provider):
    ctx = bench_ctx
    model = ctx.model(model_name)
    pt, order = ctx.profile(model_name, "all_exit")
    assert pt.realised[0] == 1.0, pt.realised
    cycler = P.BatchCycler(ctx.pool(model_name), 1, order=order)
    hand = _by_hand(model)
    if provider == "by_hand":
        fn = hand
    else:
        eng = EarlyExitEngine(model, thresholds=pt.thresholds, criterion="entropy",
                              backend=provider[len("engine_"):])
        for _ in range(cycler.num_batches):  # every input leaves at exit 0: checked, and warm
            res = eng(cycler())
            assert res.counts[0] == 1, res.counts
        fn = eng
    cycler.reset()
    sync = ctx.sync

    def step():
        fn(cycler())
        sync()

    iterations = P.SAMPLES_PER_ROUND
    t_round = P.calibrate(step, iterations, warmup_s=0.25 * ctx.target_s, max_warmup=cycler.num_batches)
    rounds = P.choose_rounds(t_round, ctx.target_s, min_rounds=ctx.min_rounds, max_rounds=ctx.max_rounds)
    cycler.reset()
    benchmark.group = f"fixed_cost|{model_name}|B=1"
    benchmark.name = provider
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=0)

    info = {"suite": "fixed_cost", "model": model_name, "batch": 1, "provider": provider,
            "samples_per_call": 1, "thresholds": list(pt.thresholds), "iterations": iterations,
            "rounds": rounds}
    if provider != "by_hand":
        timer = getattr(benchmark, "_timer", None) or time.perf_counter
        ratios, t_eng, t_hand = [], [], []
        xs = [cycler() for _ in range(CALLS)]
        for _ in range(ROUNDS):
            t0 = timer()
            for x in xs:
                fn(x)
            sync()
            t1 = timer()
            for x in xs:
                hand(x)
            sync()
            t2 = timer()
            t_eng.append((t1 - t0) / CALLS)
            t_hand.append((t2 - t1) / CALLS)
            ratios.append((t1 - t0) / (t2 - t1))
        q = statistics.quantiles(ratios, n=4)
        info.update({"ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
                     "engine_s_interleaved": statistics.median(t_eng),
                     "by_hand_s_interleaved": statistics.median(t_hand),
                     "interleaved_rounds": ROUNDS, "interleaved_calls": CALLS,
                     "backend": provider[len("engine_"):]})
    benchmark.extra_info.update(ctx.common_info())
    benchmark.extra_info.update(info)
