"""Load benchmark of :class:`branchynet.serving.ExitServer`: early exit against the backbone
under the same dynamic batching, saturated and under open-loop Poisson arrivals.

Three configurations, each an ``ExitServer`` with the same ``max_batch_size`` and
``max_wait_ms``:

- ``backbone``: the network without side branches (``model.backbone_only()``, a plain
  module: one stage, the same dynamic batching). The baseline.
- ``per_batch``: early exit, each batch carried through every stage with compaction
  between exits (``rebatch=False``, as :class:`~branchynet.EarlyExitEngine` does).
- ``rebatch``: early exit, the survivors of many runs pooled per stage (``rebatch=True``).

Measured per configuration:

- saturated throughput: N requests submitted as fast as one thread can, requests/s =
  N / (last answer - first submit); the submit rate of that thread during the run and
  alone (into a server whose worker only waits), to show whether it is the bottleneck;
- the bare engine and the bare backbone at B = ``max_batch_size``, timed directly (no
  server), so the server's (rebatch / backbone) throughput ratio can be set against the
  engine's own gain (backbone time / engine time);
- open-loop Poisson arrivals (seeded ``numpy`` Generator; a submitting thread sleeps
  until each arrival) at fractions of each configuration's own saturated rate, and at the
  same absolute rates for all three (fractions of the backbone's saturated rate): achieved
  throughput, p50 / p99 latency (from the scheduled arrival, so a submitter falling
  behind cannot hide queueing), p50 latency per exit, the deep stage's mean rows per run,
  refusals (``Overloaded``).

The networks are randomly initialised (``profiles.make_model``) and their thresholds are
set to realise the paper's exit profile on a pool of random inputs
(``profiles.thresholds_for_profile``): the work per request is the paper's, whatever the
weights. Requests cycle through the pool in a stratified order, so every window of
requests carries the profile.

    OMP_NUM_THREADS=1 python benchmarks/serving_load.py --out benchmarks/results/<machine>/serving
    python benchmarks/serving_load.py --quick          # a small smoke run, seconds
    python benchmarks/serving_load.py --full           # B-ResNet-110 too (slow on a CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import profiles as P  # noqa: E402
from branchynet.engine import EarlyExitEngine  # noqa: E402
from branchynet.serving import ExitServer, Overloaded  # noqa: E402

CONFIGS = ("backbone", "per_batch", "rebatch")
LOADS = (0.1, 0.3, 0.6, 0.9, 1.2)
#: What each target asks; evaluated by :func:`targets`.
TARGET_TEXT = {
    "saturation_gain": "rebatch saturates at >= 1.3x the requests/s of the backbone",
    "gain_kept": "rebatch keeps >= 90 % of the engine's own gain over the backbone at max_batch_size",
    "deep_batch": "the deep stage's mean batch under rebatch >= 2x that under per_batch at saturation",
    "latency_60": "p50 latency at 60 % load (of the backbone's saturated rate): rebatch <= 0.7x backbone",
    "rebatch_vs_per_batch": "rebatch >= per_batch in throughput at every load",
}
#: Two achieved throughputs within this fraction count as equal (run-to-run noise of an
#: open-loop point whose achieved rate is the offered one).
THROUGHPUT_TOLERANCE = 0.02
#: Collect between runs and keep the cyclic garbage collector off during each one. The
#: harness holds every future and answer of a run (tens of thousands of objects) to
#: compute its figures afterwards; with the collector on, its full collections over them
#: stopped every thread for 80-120 ms (measured on the 2-core Xeon: submit lag p99 ~100 ms
#: against ~5 ms with it off), a pause of this harness, not of the server, which keeps
#: nothing per request once answered. ``--keep-gc`` measures with it on.
PAUSE_GC = True


@contextlib.contextmanager
def _gc_paused():
    if not PAUSE_GC:
        yield
        return
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# --- the model and its requests -------------------------------------------------------------

def paper_case(model_name: str, pool_size: int = 1024) -> dict:
    """A paper network (random init) with thresholds realising the paper's exit profile
    on a pool; the pool in a stratified order (every window carries the profile)."""
    model = P.make_model(model_name)
    pool = P.make_pool(model, pool_size)
    fr = P.profile_fractions(model_name, "paper", model.num_exits)
    pt = P.thresholds_for_profile(model, pool, fr)
    order = P.stratified_order(pt.exits, model.num_exits)
    return {"name": model_name, "model": model, "pool": pool.index_select(0, order),
            "thresholds": pt.thresholds, "target": pt.target, "realised": pt.realised}


def trained_case(checkpoint: Path, dataset: str, pool_size: int = 1024) -> dict:
    """A trained network (a checkpoint, e.g. ``branchynet demo``'s ``runs/demo/model.pt``)
    with thresholds realising the paper's exit profile on real inputs: the first
    ``pool_size`` images of the data set's test split, in a stratified order."""
    from branchynet.checkpoint import build_from_checkpoint, read_checkpoint
    from branchynet.data import load_dataset

    ckpt = read_checkpoint(checkpoint)
    model = build_from_checkpoint(ckpt, checkpoint).eval()
    test = load_dataset(dataset).test
    pool = torch.stack([test[i][0] for i in range(min(pool_size, len(test)))]).float()
    name = str(ckpt["arch"]["name"]).replace("-", "_")
    fr = P.profile_fractions("b_lenet" if model.num_exits == 2 else "b_alexnet", "paper", model.num_exits)
    pt = P.thresholds_for_profile(model, pool, fr)
    order = P.stratified_order(pt.exits, model.num_exits)
    return {"name": f"{name}_trained_{dataset.replace('-', '_')}", "model": model, "pool": pool.index_select(0, order),
            "thresholds": pt.thresholds, "target": pt.target, "realised": pt.realised}


def make_server(model, thresholds, config: str, max_batch_size: int, max_wait_ms: float,
                max_queued: int, record: bool = False) -> ExitServer:
    """The ExitServer of one configuration (``CONFIGS``)."""
    if config == "backbone":
        return ExitServer(model.backbone_only(), max_batch_size=max_batch_size,
                          max_wait_ms=max_wait_ms, max_queued=max_queued, record=record)
    if config not in ("per_batch", "rebatch"):
        raise ValueError(f"unknown configuration {config!r}; known: {CONFIGS}")
    return ExitServer(model, thresholds, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                      rebatch=config == "rebatch", max_queued=max_queued, record=record)


# --- bare engine and backbone, no server ----------------------------------------------------

@torch.inference_mode()
def bare_times(model, thresholds, pool: torch.Tensor, batch: int, rounds: int = 15) -> dict:
    """Seconds per sample of the engine and of the backbone at B = ``batch`` (medians over
    rounds that alternate the two, each round one pass over the pool's batches)."""
    eng = EarlyExitEngine(model, thresholds)
    backbone = model.backbone_only()
    cyc = P.BatchCycler(pool, batch)
    xs = [cyc() for _ in range(cyc.num_batches)]
    for x in xs:  # warm both
        eng(x)
        backbone(x)
    t_eng, t_bb = P.interleaved_times(eng, backbone, xs, rounds)
    e, b = statistics.median(t_eng) / batch, statistics.median(t_bb) / batch
    return {"batch": batch, "engine_s_per_sample": e, "backbone_s_per_sample": b,
            "engine_rps": 1 / e, "backbone_rps": 1 / b, "engine_gain": b / e}


# --- saturated throughput ------------------------------------------------------------------

def _warm(server: ExitServer, pool: torch.Tensor, n: int) -> None:
    futs = [server.submit(pool[i % len(pool)]) for i in range(n)]
    for f in futs:
        f.result(timeout=120)


def _stats_delta(after: dict, before: dict) -> dict:
    keys = ("stage_runs", "stage_rows", "exits")
    out = {k: [a - b for a, b in zip(after[k], before[k])] for k in keys}
    for k in ("answered", "failed", "overloaded"):
        out[k] = after[k] - before[k]
    runs, rows = out["stage_runs"], out["stage_rows"]
    out["mean_rows_per_run"] = [r / n if n else None for r, n in zip(rows, runs)]
    out["deep_mean_rows"] = out["mean_rows_per_run"][-1]
    return out


def submit_rate_alone(model, pool: torch.Tensor, n: int) -> float:
    """Requests/s one thread submits when the worker has nothing to run: a backbone server
    whose batch (n rows) and wait (60 s) are never reached while submitting."""
    server = ExitServer(model.backbone_only(), max_batch_size=n, max_wait_ms=60_000.0, max_queued=n)
    try:
        xs = [pool[i % len(pool)] for i in range(n)]
        t0 = time.perf_counter()
        futs = [server.submit(x) for x in xs]
        t1 = time.perf_counter()
    finally:
        server.close()  # drains: one run of n rows
    assert all(f.done() for f in futs)
    return n / (t1 - t0)


def saturate(model, thresholds, config: str, pool: torch.Tensor, n: int, **kw) -> dict:
    """One saturated run (:func:`_saturate`), the garbage collector paused (``PAUSE_GC``)."""
    with _gc_paused():
        return _saturate(model, thresholds, config, pool, n, **kw)


def _saturate(model, thresholds, config: str, pool: torch.Tensor, n: int, *, max_batch_size: int,
              max_wait_ms: float, max_queued: int, warm: int, record: bool = False) -> dict:
    """One saturated run: n requests as fast as one thread submits them.

    ``max_queued`` is raised to n so no request is refused (a refusal would leave N /
    time meaningless); the backlog's latency is not a serving latency and is not reported.
    ``record``: the server's record (:meth:`ExitServer.record`) under ``"record"``, its
    first ``warm`` arrivals the warm-up's.
    """
    server = make_server(model, thresholds, config, max_batch_size, max_wait_ms, max(max_queued, n), record)
    try:
        _warm(server, pool, warm)
        before = server.stats()
        xs = [pool[i % len(pool)] for i in range(n)]
        t_call = np.empty(n)
        futs = []
        t0 = time.perf_counter()
        for i, x in enumerate(xs):
            t_call[i] = time.perf_counter()
            futs.append(server.submit(x))
        t_sub = time.perf_counter()
        answers = [f.result(timeout=300) for f in futs]
        done_at = t_call + np.array([a.latency_s for a in answers])
        t_last = float(done_at.max())
        delta = _stats_delta(server.stats(), before)
        rec = server.record() if record else None
    finally:
        server.close()
    # The served rate once the submitting thread is done: if it is well above the whole
    # run's, the submitter (its share of the GIL and of the 2 cores) slows the worker.
    after = int((done_at > t_sub).sum())
    return {"n": n, "rps": n / (t_last - t0), "submit_rps": n / (t_sub - t0),
            "submit_share": (t_sub - t0) / (t_last - t0),
            "rps_after_submit": after / (t_last - t_sub) if t_last > t_sub else None, "stats": delta,
            "record": rec}


# --- open-loop Poisson arrivals -------------------------------------------------------------

def poisson_arrivals(rate: float, max_requests: int, max_seconds: float, seed: int) -> np.ndarray:
    """Arrival times (s from the start) of a Poisson process of ``rate`` requests/s,
    at most ``max_requests`` of them and none after ``max_seconds``."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, size=max_requests))
    return t[t <= max_seconds]


def _pct(v, q):
    return float(np.percentile(v, q)) if len(v) else None


def open_loop(model, thresholds, config: str, pool: torch.Tensor, rate: float, **kw) -> dict:
    """One open-loop run (:func:`_open_loop`), the garbage collector paused (``PAUSE_GC``)."""
    with _gc_paused():
        return _open_loop(model, thresholds, config, pool, rate, **kw)


def _open_loop(model, thresholds, config: str, pool: torch.Tensor, rate: float, *, max_requests: int,
               max_seconds: float, seed: int, max_batch_size: int, max_wait_ms: float,
               max_queued: int, warm: int, record: bool = False) -> dict:
    """One open-loop point: Poisson arrivals at ``rate`` from a submitting thread that
    sleeps until each arrival time; latency counted from the scheduled arrival (and, as
    ``server_*``, from the submit). ``record``: as for :func:`saturate`."""
    arrivals = poisson_arrivals(rate, max_requests, max_seconds, seed)
    m = len(arrivals)
    server = make_server(model, thresholds, config, max_batch_size, max_wait_ms, max_queued, record)
    futs = [None] * m
    t_call = np.zeros(m)
    refused = [0]
    try:
        _warm(server, pool, warm)
        before = server.stats()
        start = time.perf_counter() + 0.005

        def submitter():
            for i in range(m):
                wait = start + arrivals[i] - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t_call[i] = time.perf_counter()
                try:
                    futs[i] = server.submit(pool[i % len(pool)])
                except Overloaded:
                    refused[0] += 1

        th = threading.Thread(target=submitter, name="poisson-submitter")
        th.start()
        th.join()
        deadline = time.perf_counter() + 120
        for f in futs:
            if f is not None:
                try:
                    f.result(timeout=max(0.0, deadline - time.perf_counter()))
                except Exception:  # counted as unanswered below
                    pass
        delta = _stats_delta(server.stats(), before)
        rec = server.record() if record else None
    finally:
        server.close()
    lat, lat_server, lag, done_at, exits = [], [], [], [], []
    for i, f in enumerate(futs):
        if f is None or not f.done() or f.exception() is not None:
            continue
        a = f.result()
        late = max(0.0, t_call[i] - (start + arrivals[i]))
        lag.append(late)
        lat.append(late + a.latency_s)
        lat_server.append(a.latency_s)
        done_at.append(t_call[i] + a.latency_s)
        exits.append(a.exit)
    answered = len(lat)
    span = (max(done_at) - start) if answered else float("nan")
    lat, exits = np.asarray(lat), np.asarray(exits, dtype=np.int64)
    per_exit = {int(e): _pct(lat[exits == e], 50) for e in np.unique(exits)}
    return {
        "config": config, "offered_rps": rate, "requests": m, "answered": answered,
        "refused": refused[0], "unanswered": m - refused[0] - answered,
        "achieved_rps": answered / span if answered else 0.0,
        "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99),
        "server_p50_s": _pct(lat_server, 50), "server_p99_s": _pct(lat_server, 99),
        "submit_lag_p99_s": _pct(lag, 99), "submit_lag_max_s": max(lag) if lag else None,
        "p50_s_per_exit": per_exit,
        "deep_mean_rows": delta["deep_mean_rows"], "stats": delta, "record": rec,
    }


def median_point(points: list) -> dict:
    """One open-loop point from its repeats: the median of every measure, counts summed;
    the repeats themselves under ``repeats``."""
    def med(key):
        v = [p[key] for p in points if p[key] is not None]
        return float(np.median(v)) if v else None

    out = {k: points[0][k] for k in ("config", "offered_rps")}
    for k in ("achieved_rps", "p50_s", "p99_s", "server_p50_s", "server_p99_s", "submit_lag_p99_s",
              "deep_mean_rows"):
        out[k] = med(k)
    out["submit_lag_max_s"] = max((p["submit_lag_max_s"] or 0.0) for p in points)
    for k in ("requests", "answered", "refused", "unanswered"):
        out[k] = sum(p[k] for p in points)
    exits = sorted({e for p in points for e in p["p50_s_per_exit"]})
    out["p50_s_per_exit"] = {e: float(np.median([p["p50_s_per_exit"][e] for p in points
                                                 if e in p["p50_s_per_exit"]])) for e in exits}
    out["repeats"] = points
    return out


# --- the whole measurement of one model -----------------------------------------------------

def measure(model, thresholds, pool: torch.Tensor, *, max_batch_size: int = 256, max_wait_ms: float = 2.0,
            max_queued: int = 4096, saturation_batches: int = 20, saturation_repeats: int = 3,
            loads=LOADS, max_requests: int = 20_000, max_seconds: float = 2.0, point_repeats: int = 3,
            seed: int = 0, bare_rounds: int = 15, log=print) -> dict:
    """Saturation, bare timings and the open-loop tables for one model; a dict (JSON-able)."""
    kw = dict(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queued=max_queued)
    warm = 2 * max_batch_size
    out = {"settings": dict(kw, saturation_requests=saturation_batches * max_batch_size,
                            saturation_repeats=saturation_repeats, loads=list(loads),
                            max_requests=max_requests, max_seconds=max_seconds,
                            point_repeats=point_repeats, seed=seed)}
    out["bare"] = bare_times(model, thresholds, pool, max_batch_size, bare_rounds)
    log(f"  bare at B={max_batch_size}: engine {out['bare']['engine_rps']:.0f}/s, "
        f"backbone {out['bare']['backbone_rps']:.0f}/s")
    n = saturation_batches * max_batch_size
    out["submit_rps_alone"] = submit_rate_alone(model, pool, n)
    log(f"  submit rate alone: {out['submit_rps_alone']:.0f}/s")
    sat = {}
    for c in CONFIGS:
        runs = [saturate(model, thresholds, c, pool, n, warm=warm, **kw) for _ in range(saturation_repeats)]
        med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        sat[c] = dict(med, rps_runs=[r["rps"] for r in runs])
        log(f"  saturated {c}: {med['rps']:.0f}/s (runs {', '.join(f'{r:.0f}' for r in sat[c]['rps_runs'])}), "
            f"deep rows/run {med['stats']['deep_mean_rows']:.1f}")
    out["saturated"] = sat
    own, shared = {}, {}
    ref = sat["backbone"]["rps"]

    def point(c, rate, s):
        # Repeats with their own seeds; a stall of the shared machine (tens of ms) then
        # moves one repeat's p99, not the median.
        return median_point([open_loop(model, thresholds, c, pool, rate, max_requests=max_requests,
                                       max_seconds=max_seconds, seed=s + 10_000 * i, warm=warm, **kw)
                             for i in range(point_repeats)])

    for k, c in enumerate(CONFIGS):
        own[c] = []
        shared[c] = []
        for j, f in enumerate(loads):
            # The shared table gives every configuration the same arrivals (one seed per
            # load), so their achieved rates differ only by how they serve them.
            s_shared = seed + 500 + j
            s = s_shared if c == "backbone" else seed + 1000 * (k + 1) + j
            p = point(c, f * sat[c]["rps"], s)
            own[c].append(dict(p, load=f))
            if c == "backbone":  # its own rates are the shared ones: one run serves both tables
                shared[c].append(dict(p, load=f))
            else:
                q = point(c, f * ref, s_shared)
                shared[c].append(dict(q, load=f))
            log(f"  {c} at {f:.0%}: own {p['achieved_rps']:.0f}/s p50 {p['p50_s'] * 1e3:.2f} ms; "
                f"shared {shared[c][-1]['achieved_rps']:.0f}/s p50 {shared[c][-1]['p50_s'] * 1e3:.2f} ms")
    out["open_loop_own"] = own
    out["open_loop_shared"] = shared
    out["targets"] = targets(out)
    return out


def targets(r: dict) -> dict:
    """The five targets: value, goal, met, and the margin (value / goal)."""
    sat, bare = r["saturated"], r["bare"]
    res = {}

    def put(key, value, goal, met, **extra):
        res[key] = dict(what=TARGET_TEXT[key], value=value, goal=goal, met=bool(met), **extra)

    gain = sat["rebatch"]["rps"] / sat["backbone"]["rps"]
    put("saturation_gain", gain, 1.3, gain >= 1.3)
    kept = gain / bare["engine_gain"]
    excess = (gain - 1) / (bare["engine_gain"] - 1) if bare["engine_gain"] != 1 else None
    put("gain_kept", kept, 0.9, kept >= 0.9, engine_gain=bare["engine_gain"], server_gain=gain,
        excess_gain_kept=excess)
    db, dr = sat["per_batch"]["stats"]["deep_mean_rows"], sat["rebatch"]["stats"]["deep_mean_rows"]
    ratio = dr / db if db else None
    put("deep_batch", ratio, 2.0, ratio is not None and ratio >= 2.0, per_batch=db, rebatch=dr)
    sh = r["open_loop_shared"]
    loads = r["settings"]["loads"]
    if 0.6 in loads:
        i = loads.index(0.6)
        a, c = sh["backbone"][i]["p50_s"], sh["rebatch"][i]["p50_s"]
        put("latency_60", c / a, 0.7, c / a <= 0.7, backbone_p50_s=a, rebatch_p50_s=c)
    pts = [("saturated", sat["per_batch"]["rps"], sat["rebatch"]["rps"])]
    pts += [(f"{f:.0%} of backbone saturation", b["achieved_rps"], c["achieved_rps"])
            for f, b, c in zip(loads, sh["per_batch"], sh["rebatch"])]
    ratios = [(name, c / b) for name, b, c in pts]
    worst = min(ratios, key=lambda t: t[1])
    put("rebatch_vs_per_batch", worst[1], 1.0, worst[1] >= 1.0 - THROUGHPUT_TOLERANCE,
        worst_point=worst[0], ratios=dict(ratios), tolerance=THROUGHPUT_TOLERANCE)
    return res


# --- environment and report -----------------------------------------------------------------

def environment(argv) -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return None

    return {
        "command": " ".join(["python", "benchmarks/serving_load.py", *argv]),
        "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "platform": platform.platform(), "python": platform.python_version(), "cpu": P.cpu_name(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "loadavg": _loadavg(),
    }


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _ms(s):
    return "-" if s is None else f"{s * 1e3:.2f}"


def _rows(v):
    return "-" if v is None else f"{v:.1f}"


def _table(points) -> list:
    lines = ["| config | load | offered /s | achieved /s | p50 ms | p99 ms | p50 ms per exit | "
             "deep stage rows/run | refused | unanswered | submit lag p99 / max ms |", "|" + " --- |" * 11]
    for c, pts in points.items():
        for p in pts:
            per = ", ".join(f"{e}: {_ms(v)}" for e, v in sorted(p["p50_s_per_exit"].items(), key=lambda t: int(t[0])))
            lines.append(f"| {c} | {p['load']:.0%} | {p['offered_rps']:.0f} | {p['achieved_rps']:.0f} | "
                         f"{_ms(p['p50_s'])} | {_ms(p['p99_s'])} | {per} | {_rows(p['deep_mean_rows'])} | "
                         f"{p['refused']} | {p['unanswered']} | {_ms(p['submit_lag_p99_s'])} / "
                         f"{_ms(p['submit_lag_max_s'])} |")
    return lines


def _fmt_target(key, t) -> str:
    verdict = "**met**" if t["met"] else "**missed**"
    v = t["value"]
    if v is None:
        return f"- {t['what']}: no value ({verdict})"
    if key == "latency_60":
        margin = (f"{v:.2f}x (goal <= {t['goal']}x; {t['rebatch_p50_s'] * 1e3:.2f} ms against "
                  f"{t['backbone_p50_s'] * 1e3:.2f} ms)")
    elif key == "gain_kept":
        margin = (f"{v:.1%} kept (server {t['server_gain']:.3f}x over the backbone, engine {t['engine_gain']:.3f}x; "
                  f"of the excess gain (x - 1) {t['excess_gain_kept']:.1%}; goal >= 90 %)")
    elif key == "deep_batch":
        margin = f"{v:.2f}x ({_rows(t['rebatch'])} rows/run against {_rows(t['per_batch'])}; goal >= 2x)"
    elif key == "rebatch_vs_per_batch":
        margin = (f"worst ratio {v:.3f} at {t['worst_point']} (goal >= 1, within {t['tolerance']:.0%} noise); "
                  + ", ".join(f"{k}: {r:.3f}" for k, r in t["ratios"].items()))
    else:
        margin = f"{v:.3f}x (goal >= {t['goal']}x)"
    short = ""
    if not t["met"]:
        goal = t["goal"]
        short = f"; short by {abs(v - goal) / goal:.0%} of the goal"
    return f"- {t['what']}: {verdict}, {margin}{short}"


def report(results: dict) -> str:
    env = results["environment"]
    lines = ["# ExitServer under load: early exit against the backbone, same dynamic batching", ""]
    lines += [
        "What: `benchmarks/serving_load.py`. Three `ExitServer` configurations with the same "
        "`max_batch_size` and `max_wait_ms`: **backbone** (`model.backbone_only()`, served as one "
        "stage), **per_batch** (early exit, each batch carried through every stage with compaction, "
        "`rebatch=False`) and **rebatch** (survivors pooled per stage, `rebatch=True`). "
        "The networks are randomly initialised (seeded) unless named *trained* (a checkpoint, its "
        "pool the data set's test images), with entropy thresholds set to realise the "
        "paper's exit profile (Table I) on the pool; requests cycle through that pool "
        "in a stratified order, so every window carries the profile.", "",
        f"- Command: `{env['command']}` (`OMP_NUM_THREADS={env['OMP_NUM_THREADS']}`, "
        f"`torch.set_num_threads({env['torch_threads']})`)",
        f"- Commit: {env['commit']}{' (with uncommitted changes)' if env['dirty'] else ''}",
        f"- Machine: {env['platform']}, `{env['cpu']}`, {env['cpu_count']} CPUs; torch {env['torch']}",
        f"- Load average: before {results.get('loadavg_before')}, after {env['loadavg']}",
        "- Saturated: N requests submitted back to back from one thread (`max_queued` raised to N, so "
        "none is refused), requests/s = N / (last answer - first submit), median of the repeats. "
        "Open loop: Poisson arrivals (seeded), a thread sleeping until each arrival; latency from the "
        "scheduled arrival to the answer; achieved = answered / (last answer - start); `max_queued` "
        "as set. "
        + ("The cyclic garbage collector is collected before and off during each run: this harness "
           "holds every future and answer of a run, and full collections over them stopped all threads "
           "for 80-120 ms (a pause of the harness, not of the server; `--keep-gc` keeps it on). "
           if results.get("gc_paused_during_runs") else "The cyclic garbage collector stayed on (`--keep-gc`). ")
        + "Deep stage rows/run = `stage_rows / stage_runs` of the last stage (for the backbone: "
        "its one stage).", "",
    ]
    for name, r in results["models"].items():
        s, bare, sat = r["settings"], r["bare"], r["saturated"]
        lines += [f"## {name}", "",
                  f"Exit profile: target {', '.join(f'{f:.1%}' for f in r['target'])}, realised on the pool "
                  f"{', '.join(f'{f:.1%}' for f in r['realised'])}; thresholds "
                  f"{', '.join(f'{t:.4g}' for t in r['thresholds'])}. max_batch_size {s['max_batch_size']}, "
                  f"max_wait_ms {s['max_wait_ms']}, max_queued {s['max_queued']}; saturation N = "
                  f"{s['saturation_requests']} x {s['saturation_repeats']} repeats; open loop at most "
                  f"{s['max_requests']} requests or {s['max_seconds']} s per run, {s['point_repeats']} runs "
                  "per point (each cell the median over the runs; requests, refusals and unanswered "
                  "summed over them).", "",
                  "### Targets", ""]
        lines += [_fmt_target(k, t) for k, t in r["targets"].items()]
        lines += ["", "### Saturated throughput and the bare engine", "",
                  "| config | requests/s (repeats) | bare rate /s | server cost us/request | submit rate "
                  "during the run /s | submit time / run time | requests/s after the last submit | "
                  "deep stage rows/run | runs per stage |", "|" + " --- |" * 9]
        for c in CONFIGS:
            x = sat[c]
            b = bare["backbone_rps"] if c == "backbone" else bare["engine_rps"]
            after = "-" if x["rps_after_submit"] is None else f"{x['rps_after_submit']:.0f}"
            lines.append(f"| {c} | {x['rps']:.0f} ({', '.join(f'{v:.0f}' for v in x['rps_runs'])}) | {b:.0f} | "
                         f"{(1 / x['rps'] - 1 / b) * 1e6:.1f} | {x['submit_rps']:.0f} | {x['submit_share']:.2f} | "
                         f"{after} | {_rows(x['stats']['deep_mean_rows'])} | {x['stats']['stage_runs']} |")
        lines += ["", "Server cost per request = 1 / (server requests/s) - 1 / (bare requests/s): what "
                  "serving adds to each request's share of the compute (submit, queueing, answering).", "",
                  f"One thread submits {r['submit_rps_alone']:.0f} requests/s alone (into a server whose "
                  "worker only waits).", "",
                  f"Bare, no server, B = {bare['batch']}: engine {bare['engine_s_per_sample'] * 1e6:.1f} us/sample "
                  f"({bare['engine_rps']:.0f}/s), backbone {bare['backbone_s_per_sample'] * 1e6:.1f} us/sample "
                  f"({bare['backbone_rps']:.0f}/s): the engine's gain {bare['engine_gain']:.3f}x. Server "
                  f"(rebatch / backbone) {sat['rebatch']['rps'] / sat['backbone']['rps']:.3f}x; the servers "
                  f"against the bare calls: backbone {sat['backbone']['rps'] / bare['backbone_rps']:.1%}, "
                  f"rebatch {sat['rebatch']['rps'] / bare['engine_rps']:.1%}, per_batch "
                  f"{sat['per_batch']['rps'] / bare['engine_rps']:.1%} of the bare rate.", "",
                  "### Open loop at the same absolute rates (fractions of the backbone's saturated rate)", ""]
        lines += _table(r["open_loop_shared"])
        lines += ["", "### Open loop at each configuration's own saturated rate", ""]
        lines += _table(r["open_loop_own"])
        lines += [""]
        if r.get("plot"):
            lines += [f"![latency against load]({r['plot']})", ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def plot(r: dict, path: Path, title: str) -> bool:
    """p50 / p99 latency against the achieved rate, every open-loop point; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"backbone": "tab:gray", "per_batch": "tab:blue", "rebatch": "tab:red"}
    for c in CONFIGS:
        pts = {round(p["offered_rps"]): p for tab in ("open_loop_shared", "open_loop_own") for p in r[tab][c]}
        pts = sorted(pts.values(), key=lambda p: p["offered_rps"])
        x = [p["offered_rps"] for p in pts]
        ax.plot(x, [p["p50_s"] * 1e3 for p in pts], "o-", color=colours[c], label=f"{c} p50")
        ax.plot(x, [p["p99_s"] * 1e3 for p in pts], "s--", color=colours[c], alpha=0.6, label=f"{c} p99")
        ax.axvline(r["saturated"][c]["rps"], color=colours[c], lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, requests/s (dotted: saturated rate)")
    ax.set_ylabel("latency from arrival, ms")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for serving.json, report.md and the plot")
    ap.add_argument("--full", action="store_true", help="B-ResNet-110 too (slow on a CPU)")
    ap.add_argument("--models", default=None,
                    help="comma-separated paper networks to run instead (b_lenet, b_resnet110, b_alexnet)")
    ap.add_argument("--bare-rounds", type=int, default=15, help="rounds of the bare engine / backbone timing")
    ap.add_argument("--quick", action="store_true", help="a smoke run: small batches, few requests")
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--max-queued", type=int, default=4096)
    ap.add_argument("--saturation-batches", type=int, default=20, help="N = this x max_batch_size")
    ap.add_argument("--repeats", type=int, default=3, help="saturated runs per configuration")
    ap.add_argument("--max-requests", type=int, default=20_000, help="per open-loop run")
    ap.add_argument("--max-seconds", type=float, default=2.0, help="per open-loop run")
    ap.add_argument("--point-repeats", type=int, default=3, help="open-loop runs per point (medians)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a trained network instead of the random B-LeNet (e.g. runs/demo/model.pt)")
    ap.add_argument("--dataset", default="mnist-5k", help="the trained network's data (its test split is the pool)")
    ap.add_argument("--keep-gc", action="store_true",
                    help="leave the cyclic garbage collector on during runs (see PAUSE_GC)")
    args = ap.parse_args(argv)
    global PAUSE_GC
    PAUSE_GC = not args.keep_gc
    torch.set_num_threads(args.threads)
    kw = dict(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queued=args.max_queued,
              saturation_batches=args.saturation_batches, saturation_repeats=args.repeats,
              max_requests=args.max_requests, max_seconds=args.max_seconds,
              point_repeats=args.point_repeats, seed=args.seed, bare_rounds=args.bare_rounds)
    if args.quick:
        kw.update(max_batch_size=32, saturation_batches=4, saturation_repeats=1, max_requests=150,
                  max_seconds=1.0, point_repeats=1, bare_rounds=2)
    names = [None if args.checkpoint else "b_lenet"] + (["b_resnet110"] if args.full else [])
    if args.models:
        names = [None] * bool(args.checkpoint) + args.models.split(",")
    results = {"loadavg_before": _loadavg(), "gc_paused_during_runs": PAUSE_GC, "models": {}}
    t0 = time.perf_counter()
    for name in names:
        case = trained_case(args.checkpoint, args.dataset) if name is None else paper_case(name)
        name = case["name"]
        print(f"{name}:", flush=True)
        r = measure(case["model"], case["thresholds"], case["pool"], **kw)
        r.update(thresholds=case["thresholds"], target=case["target"], realised=case["realised"])
        results["models"][name] = r
    results["seconds"] = time.perf_counter() - t0
    results["environment"] = environment(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, r in results["models"].items():
            png = f"latency_{name}.png"
            if plot(r, args.out / png, f"{name}: ExitServer latency against load"):
                r["plot"] = png
        (args.out / "serving.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (args.out / "report.md").write_text(report(results))
        print(f"wrote {args.out}/serving.json, report.md", flush=True)
    else:
        print(report(results))
    print(f"{results['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
