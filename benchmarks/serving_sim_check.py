"""How well the serving simulator predicts this machine: ``branchynet.serving.simulate``
fed with ``latency.py``'s segment times, against ``ExitServer`` measured in the same run,
on the same arrivals and exits (B-LeNet, paper profile; ``serving_load.py``'s case).
The simulated cost of a run is its segment time plus the server's own cost per row,
measured once on a model whose compute is negligible.

    python benchmarks/serving_sim_check.py --out benchmarks/results/cpu-xeon-2core/serving

Saturated requests/s (every request submitted at once) and p50 latency under Poisson
arrivals at a share of the backbone's saturated rate, for the backbone, per-batch early
exit and stage-level rebatching; prediction error = predicted / measured - 1. The
simulator knows each stage run's compute (gather, stage, branch, exit op), not what the
server adds per request (submit, queue, answer: ~10-14 us on this machine, measured by
``serving_load.py``), so it over-predicts throughput by about that share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving_load as L  # noqa: E402
from branchynet import BranchyNet, EarlyExitEngine  # noqa: E402
from branchynet.latency import measure_latency  # noqa: E402
from branchynet.serving import simulate, stage_time_from_profile  # noqa: E402
from branchynet.tables import markdown_table  # noqa: E402

CONFIGS = ("backbone", "per_batch", "rebatch")


def server_cost_per_row(batch: int, n: int = 8192) -> float:
    """Seconds the server itself spends per request (submit, queue, answer), measured on a
    model whose compute is negligible (a 4 -> 2 linear layer): 1 / its saturated rate."""
    tiny = nn.Linear(4, 2).eval()
    x = torch.randn(n, 4)
    with L._gc_paused():
        from branchynet.serving import ExitServer

        with ExitServer(tiny, max_batch_size=batch, max_queued=n) as server:
            [f.result() for f in [server.submit(x[i]) for i in range(2 * batch)]]  # warm
            t0 = time.perf_counter()
            futs = [server.submit(x[i]) for i in range(n)]
            t1 = max(t0 + f.result(timeout=60).latency_s for f in futs)
    return (t1 - t0) / n


def predictors(model, thresholds, pool: torch.Tensor, batch: int, repeats: int, per_row_s: float) -> dict:
    """Per configuration: ``(stage_time, num_stages, exit of each pool row)``; a run of k
    rows costs its segment time plus ``per_row_s`` per row (the server's own work)."""
    example = pool[:batch]
    ee_seg = stage_time_from_profile(measure_latency(model, example, repeats=repeats))
    one = BranchyNet([model.backbone_only()], [nn.Identity()]).eval()
    bb_seg = stage_time_from_profile(measure_latency(one, example, repeats=repeats))

    def ee(n, k):
        return ee_seg(n, k) + per_row_s * k

    def bb(n, k):
        return bb_seg(n, k) + per_row_s * k
    with torch.inference_mode():
        exits = EarlyExitEngine(model, thresholds)(pool).exit.numpy()
    zeros = np.zeros(len(pool), dtype=np.int64)
    return {"backbone": (bb, 1, zeros), "per_batch": (ee, model.num_exits, exits),
            "rebatch": (ee, model.num_exits, exits)}


def predict(pred, config: str, arrivals: np.ndarray, batch: int, wait_ms: float):
    stage_time, n_stages, exits = pred[config]
    ex = exits[np.arange(len(arrivals)) % len(exits)]  # the servers cycle through the pool
    return simulate(arrivals, ex, stage_time, num_stages=n_stages, max_batch_size=batch,
                    max_wait_ms=wait_ms, rebatch=config != "per_batch")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="b_lenet")
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--saturation-requests", type=int, default=5120)
    ap.add_argument("--load", type=float, default=0.6, help="share of the backbone's saturated rate")
    ap.add_argument("--max-requests", type=int, default=8000)
    ap.add_argument("--max-seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-row-us", type=float, default=None,
                    help="the server's own cost per request (default: measured on a negligible model)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    case = L.paper_case(args.model)
    model, thr, pool = case["model"], case["thresholds"], case["pool"]
    b, w = args.max_batch_size, args.max_wait_ms
    kw = dict(max_batch_size=b, max_wait_ms=w, max_queued=4096, warm=2 * b)
    per_row = server_cost_per_row(b) if args.per_row_us is None else args.per_row_us * 1e-6
    pred = predictors(model, thr, pool, b, repeats=9, per_row_s=per_row)
    rows, out = [], {"settings": vars(args) | {"out": str(args.out)}, "configs": {}}
    sat_rps = {}
    for c in CONFIGS:
        runs = [L.saturate(model, thr, c, pool, args.saturation_requests, **kw)["rps"] for _ in range(args.repeats)]
        sat_rps[c] = float(np.median(runs))
    rate = args.load * sat_rps["backbone"]
    for c in CONFIGS:
        sim_sat = predict(pred, c, np.zeros(args.saturation_requests), b, w).throughput
        p50s, sims = [], []
        for i in range(args.repeats):
            seed = 700 + i
            p = L.open_loop(model, thr, c, pool, rate, max_requests=args.max_requests,
                            max_seconds=args.max_seconds, seed=seed, **kw)
            p50s.append(p["p50_s"])
            arr = L.poisson_arrivals(rate, args.max_requests, args.max_seconds, seed)
            sims.append(predict(pred, c, arr, b, w).p50_s)
        m_p50, s_p50 = float(np.median(p50s)), float(np.median(sims))
        out["configs"][c] = {"saturated_rps": sat_rps[c], "predicted_saturated_rps": sim_sat,
                             "p50_s": m_p50, "predicted_p50_s": s_p50}
        rows.append([c, f"{sat_rps[c]:,.0f}", f"{sim_sat:,.0f}", f"{sim_sat / sat_rps[c] - 1:+.1%}",
                     f"{m_p50 * 1e3:.2f}", f"{s_p50 * 1e3:.2f}", f"{s_p50 / m_p50 - 1:+.1%}"])
    head = ["config", "saturated req/s measured", "predicted", "error", f"p50 ms at {args.load:.0%} measured",
            "predicted", "error"]
    commit = os.popen("git rev-parse --short HEAD").read().strip()
    text = (f"# The serving simulator against the server on this machine\n\n"
            f"`python benchmarks/serving_sim_check.py` at commit {commit}: {args.model} (random init, "
            f"paper-profile thresholds), max_batch_size {b}, max_wait_ms {w}; saturated: "
            f"{args.saturation_requests} requests at once, median of {args.repeats}; p50: Poisson arrivals at "
            f"{args.load:.0%} of the backbone's measured saturated rate ({rate:,.0f}/s), the same "
            f"arrivals simulated, medians of {args.repeats}. Stage costs: `measure_latency` (segment "
            f"times at 1, 2, 4, ..., {b} rows, 9 repeats) plus the server's own cost per row, "
            f"{per_row * 1e6:.1f} us (measured: 1 / the saturated rate of a server of a 4 -> 2 linear "
            f"layer). torch {torch.__version__}, 1 thread, load "
            f"average {os.getloadavg()[0]:.2f} at the end.\n\n{markdown_table(head, rows)}\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "simulator_check.md").write_text(text)
        (args.out / "simulator_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
