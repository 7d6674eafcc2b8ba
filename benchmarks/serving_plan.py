"""What stage-level rebatching is worth on a device this project has not run on: the serving
scheduler on a virtual clock (``branchynet.serving.simulate``) with a stated
roofline-style cost curve, for the paper's networks at the paper's exit profiles.

    python benchmarks/serving_plan.py --out benchmarks/results/model-h100/serving_plan.md

Cost of one run of stage n (stage + branch + exit op) on k rows, assumed:

    t(n, k) = T_RUN + F_n * max(k, K_FULL) / ACHIEVED

- F_n: the stage's and its branch's FLOPs per sample, counted (``branchynet.flops``);
- ACHIEVED: the FLOP rate of a full device (assumed: 100 TFLOP/s, a third of an H100
  SXM's ~300 dense TF32/FP16 tensor-core rate after convolution efficiency);
- K_FULL: the rows below which the device is not full and a run costs as much as at
  K_FULL rows (assumed: 256 rows for these small CIFAR/MNIST layers);
- T_RUN: the fixed cost of a run (assumed: 30 us: a stage's kernel launches, the exit op
  and the survivor count's read-back).

These three numbers are assumptions, not measurements; the table shows what follows from
them, and the script takes them as arguments. The backbone is served by the same batcher
as one stage (its FLOPs: every stage + the final classifier).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import profiles as P  # noqa: E402
from branchynet.flops import profile_flops  # noqa: E402
from branchynet.serving import poisson_arrivals, simulate  # noqa: E402
from branchynet.tables import markdown_table  # noqa: E402

LOADS = (0.3, 0.6, 0.9, 1.2)  # of the backbone's saturated rate


def cost_curve(flops: list, t_run: float, achieved: float, k_full: int):
    """``(stage, rows) -> seconds`` of the assumed roofline-style curve."""
    def t(n: int, k: int) -> float:
        return t_run + flops[n] * max(k, k_full) / achieved
    return t


def plan(name: str, args) -> tuple:
    """``(saturation row, latency rows)`` of one network."""
    model = P.make_model(name)
    fp = profile_flops(model)
    fractions = P.PAPER_PROFILES[name]
    per_stage = [fp.stage[n] + fp.branch[n] for n in range(fp.num_exits)]
    ee = cost_curve(per_stage, args.t_run, args.achieved, args.k_full)
    base = cost_curve([fp.backbone], args.t_run, args.achieved, args.k_full)
    exits = np.random.default_rng(0).choice(len(fractions), size=args.requests, p=fractions)
    zeros = np.zeros(args.requests, dtype=int)
    common = dict(max_batch_size=args.max_batch, max_wait_ms=args.max_wait_ms)

    def three(arrivals):
        return (simulate(arrivals, zeros, base, num_stages=1, **common),
                simulate(arrivals, exits, ee, num_stages=fp.num_exits, rebatch=False, **common),
                simulate(arrivals, exits, ee, num_stages=fp.num_exits, rebatch=True, **common))

    # Saturation: every request there at once; requests / makespan.
    a, b, c = three(np.zeros(args.requests))
    sat = [r.throughput for r in (a, b, c)]
    sat_row = [name, *(f"{x:,.0f}" for x in sat), f"{sat[2] / sat[0]:.2f}x", f"{sat[2] / sat[1]:.2f}x",
               f"{b.mean_rows[-1]:.0f} / {c.mean_rows[-1]:.0f}", f"{fp.ideal_speedup(fractions):.2f}x"]
    lat_rows = []
    for load in LOADS:
        a, b, c = three(poisson_arrivals(load * sat[0], args.requests, seed=1))
        lat_rows.append([name, f"{load:.0%}", *(f"{1e3 * r.p50_s:.3f}" for r in (a, b, c)),
                         *(f"{1e3 * r.p99_s:.3f}" for r in (a, b, c))])
    return sat_row, lat_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="b_lenet,b_alexnet,b_resnet110")
    ap.add_argument("--t-run", type=float, default=30e-6, help="fixed seconds per stage run (assumed)")
    ap.add_argument("--achieved", type=float, default=100e12, help="FLOP/s of a full device (assumed)")
    ap.add_argument("--k-full", type=int, default=256, help="rows that fill the device (assumed)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sat_rows, lat_rows = [], []
    for name in args.models.split(","):
        s_row, l_rows = plan(name, args)
        sat_rows.append(s_row)
        lat_rows += l_rows
    sat_head = ["network", "(a) req/s", "(b) req/s", "(c) req/s", "(c) / (a)", "(c) / (b)",
                "last stage rows/run (b) / (c)", "FLOP ideal"]
    lat_head = ["network", "load", "(a) p50 ms", "(b) p50 ms", "(c) p50 ms", "(a) p99 ms", "(b) p99 ms",
                "(c) p99 ms"]
    text = (f"# Serving plan on a virtual clock\n\n`python benchmarks/serving_plan.py` "
            f"(branchynet.serving.simulate): t(n, k) = {args.t_run * 1e6:.0f} us + F_n * "
            f"max(k, {args.k_full}) / {args.achieved / 1e12:.0f} TFLOP/s, a roofline-style curve for an "
            f"H100 whose three numbers are assumptions (see the script's docstring), F_n counted; "
            f"max_batch_size {args.max_batch}, max_wait_ms {args.max_wait_ms}; {args.requests:,} "
            f"requests per point, exits drawn from the paper's profiles. (a) the backbone, same "
            f"batcher; (b) early exit, per-batch compaction; (c) stage-level rebatching.\n\n"
            f"## Saturated (every request there at once)\n\n{markdown_table(sat_head, sat_rows)}\n\n"
            f"## Latency under Poisson load (share of (a)'s saturated rate)\n\n"
            f"{markdown_table(lat_head, lat_rows)}\n")
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
