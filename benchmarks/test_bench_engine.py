"""Early-exit inference against its baselines: model x batch size x exit profile x provider.

Each benchmark is one provider in the group ``"{model}|B={b}|{profile}"``; its time is
per call of B samples (``extra_info["samples_per_call"]``), synchronised with the GPU at
the end of every call. See README.md in this folder for the providers and how to run.

Before timing, every batch the timed rounds will serve is run once and checked: no
batch is timed unchecked, and no survivor count meets its first compile (a Triton
specialisation, a dynamo graph) inside a timed round. Exit providers also get their
segment-time ideal (each stage and branch timed alone at the rows it sees).
"""

from __future__ import annotations

import time

import pytest
import torch

import profiles as P
from branchynet.baselines import naive_early_exit
from branchynet.engine import EarlyExitEngine

DEVICE = P.bench_device()
CASES = [(m, b, p, prov) for (m, b, p) in P.engine_cases(DEVICE)
         for prov in P.engine_providers(DEVICE, b)]
IDS = [f"{m}-B{b}-{p}-{prov}" for (m, b, p, prov) in CASES]

EXIT_PROVIDERS = ("naive", "per_sample")  # plus every engine_*


def _is_exit_provider(provider: str) -> bool:
    return provider in EXIT_PROVIDERS or provider.startswith("engine_")


def _engine_kwargs(provider: str) -> dict:
    return P.engine_kwargs(provider)


def build_provider(ctx, provider: str, name: str, batch: int, thresholds, example):
    """``fn(x)`` for one provider; exit providers return an ExitResult. Compiled ones
    are compiled here (``ctx.compile_s`` records how long, apart from the timing)."""
    model = ctx.model(name)
    if provider == "backbone_eager":
        return ctx.backbone(name)
    if provider == "backbone_compile":
        fn = ctx.compiled_backbone(name)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn(example)  # one graph per batch size (dynamic=False)
        ctx.sync()
        ctx.compile_s = time.perf_counter() - t0
        return fn
    if provider == "backbone_cudagraph":
        return ctx.cudagraph_backbone(name, batch, example)
    if provider == "naive":
        return lambda x: naive_early_exit(model, x, thresholds)
    if provider == "per_sample":
        # the best exit op for the device, so per_sample vs engine_* isolates batching
        return EarlyExitEngine(model, thresholds=thresholds, criterion="entropy").per_sample
    if provider.startswith("engine_"):
        kw = _engine_kwargs(provider)
        eng = EarlyExitEngine(model, thresholds=thresholds, criterion="entropy", **kw)
        if kw.get("compile"):
            P.raise_dynamo_limits()
            t0 = time.perf_counter()
            # Rows cut from the pool, as the timed batches are (views of one tensor).
            eng.warmup([batch], x=ctx.pool(name))
            ctx.sync()
            ctx.compile_s = time.perf_counter() - t0
        return eng
    raise ValueError(f"unknown provider {provider!r}")


@torch.inference_mode()
def _check(ctx, provider, fn, name, thresholds, x):
    """Correctness on the GPU (or CPU) before timing: against the torch-backend engine
    for exit providers, against the eager backbone for the compiled/captured ones."""
    model = ctx.model(name)
    got = fn(x)
    if _is_exit_provider(provider):
        ref = EarlyExitEngine(model, thresholds=thresholds, backend="torch", criterion="entropy")(x)
        P.check_exit_result(got, ref, thresholds)
    else:
        ref = ctx.backbone(name)(x)
        err = float((got.float() - ref.float()).abs().max())
        scale = float(ref.float().abs().max())
        # A garbage check, not a precision test: compile and TF32 convolutions reorder sums.
        assert err <= 2e-2 * scale + 1e-4, f"{provider}: max error {err} vs max |logit| {scale}"


@pytest.mark.parametrize("model_name,batch,profile,provider", CASES, ids=IDS)
def test_engine(benchmark, bench_ctx, model_name, batch, profile, provider):
    ctx = bench_ctx
    model = ctx.model(model_name)
    n_exits = model.num_exits
    pt, order = ctx.profile(model_name, profile)
    thresholds = pt.thresholds
    cycler = P.BatchCycler(ctx.pool(model_name), batch, order=order)
    ctx.compile_s = None
    fn = build_provider(ctx, provider, model_name, batch, thresholds, cycler())
    compile_s = ctx.compile_s
    cycler.reset()

    exits = _is_exit_provider(provider)
    counts = [0] * n_exits
    last = [None]
    sync = ctx.sync

    if exits:
        def step():
            with torch.inference_mode():
                res = fn(cycler())
            c = res.counts
            for i in range(n_exits):
                counts[i] += c[i]
            last[0] = c
            sync()
    else:
        def step():
            with torch.inference_mode():
                fn(cycler())
            sync()

    # A round times SAMPLES_PER_ROUND consecutive samples at small B (see profiles.py).
    iterations = max(1, -(-P.SAMPLES_PER_ROUND // batch))
    t_round = P.calibrate(step, iterations, warmup_s=0.25 * ctx.target_s,
                          max_warmup=max(2, cycler.num_batches))
    cycle = cycler.num_batches // iterations if cycler.num_batches % iterations == 0 else None
    rounds = P.choose_rounds(t_round, ctx.target_s, min_rounds=ctx.min_rounds,
                             max_rounds=ctx.max_rounds, cycle=cycle)
    # Every batch the timed rounds serve (plus pedantic's one extra call), run and
    # checked once now: warm-up above is capped in time, this is not.
    cycler.reset()
    for _ in range(min(cycler.num_batches, rounds * iterations + 1)):
        _check(ctx, provider, fn, model_name, thresholds, cycler())
    cycler.reset()
    counts[:] = [0] * n_exits

    benchmark.group = f"{model_name}|B={batch}|{profile}"
    benchmark.name = provider
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=0)

    fl = ctx.flops(model_name)
    if exits:
        if iterations > 1 and last[0] is not None and sum(counts) > rounds * iterations * batch:
            # pedantic makes one untimed call after looped rounds, for its return value.
            counts[:] = [a - b for a, b in zip(counts, last[0])]
        realised = P.fractions_from_counts(counts)
        ideal = fl.ideal_speedup(realised)
        flops = fl.expected(realised)
    else:
        realised = None
        ideal = fl.ideal_speedup(pt.realised)
        flops = fl.backbone
    kw = _engine_kwargs(provider) if provider.startswith("engine_") else {}
    seg = None
    if exits:
        kind = "compiled" if kw.get("compile") else "eager"
        timer = getattr(benchmark, "_timer", None)
        # A copy: the segment times are shared (cached) between providers, the
        # interleaved efficiency is this provider's own.
        seg = dict(ctx.segment_times(model_name, batch, profile, realised, kind, timer=timer))
        cycler.reset()
        per_call = benchmark.stats.stats.median  # per iteration (one call of B samples)
        seg["interleaved_efficiency"] = ctx.interleaved_segment_efficiency(
            seg, tuple(seg["key"]), lambda: fn(cycler()), per_call, timer=timer)
    benchmark.extra_info.update(ctx.common_info())
    benchmark.extra_info.update({
        "suite": "engine",
        "model": model_name,
        "batch": batch,
        "profile": profile,
        "provider": provider,
        "backend": kw.get("backend"),
        "compile": kw.get("compile") if kw.get("compile") is not True else "default",
        "compile_s": compile_s,
        "buckets": bool(kw.get("buckets")) or kw.get("compile") == "reduce-overhead",
        "cuda_graphs": provider == "backbone_cudagraph" or kw.get("compile") == "reduce-overhead",
        "segment_s_per_call": seg["total"] if seg else None,
        "segment_times": seg,
        "thresholds": list(thresholds),
        "target_fractions": pt.target,
        "pool_fractions": pt.realised,
        "realised_fractions": realised,
        "timed_counts": list(counts) if exits else None,
        "ideal_speedup": ideal,
        "flops_per_sample": flops,
        "backbone_flops_per_sample": fl.backbone,
        "samples_per_call": batch,
        "iterations": iterations,
        "rounds": rounds,
        "pool_size": int(ctx.pool(model_name).shape[0]),
    })
