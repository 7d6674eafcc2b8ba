"""The engine's speed in two checkouts, measured in one run: the eager engine's fixed cost
at B = 1 (every sample leaving at branch 1, against stage 1 + branch 1 by hand) and
B-LeNet at the paper's exit profile, B = 1 and 256, eager and compiled; and PABEE's
patience on a 6-exit MLP, B = 1 and 256, eager.

    mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before
    cp branchynet/_C*.so /tmp/before/branchynet/       # an extension built from the same csrc/
    python benchmarks/engine_against_checkout.py /tmp/before .        # alternates the two

With two or more checkouts it runs each one in a child process (the package and its op
library can be imported once per process), alternating them ``--repeats`` times so a
load that drifts hits both, and prints a markdown table of the medians over the
repeats (each repeat's number is itself a median). With ``--child`` it measures one
checkout and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _median_time(fn, inputs, reps: int) -> float:
    """Median over ``reps`` rounds of the mean seconds per call over ``inputs``."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x in inputs:
            fn(x)
        ts.append((time.perf_counter() - t0) / len(inputs))
    return statistics.median(ts)


def child(root: str, compile_: bool) -> dict:
    sys.path.insert(0, root)
    sys.path.insert(1, str(HERE))
    import torch

    torch.set_num_threads(1)
    import branchynet  # noqa: F401
    import profiles as P
    from branchynet.engine import EarlyExitEngine

    assert branchynet.__file__.startswith(root), f"imported {branchynet.__file__}, not {root}"
    model = P.make_model("b_lenet")
    pool = P.make_pool(model, 1024)
    out = {}
    # Fixed cost: every sample leaves at branch 1; rounds alternate engine and by hand.
    fr = P.profile_fractions("b_lenet", "all_exit", model.num_exits)
    pt = P.thresholds_for_profile(model, pool, fr)
    eng = EarlyExitEngine(model, thresholds=pt.thresholds)
    stage, branch = model.stages[0], model.branches[0]

    def by_hand(x):
        with torch.inference_mode():
            return branch(stage(x))

    xs = [pool[i:i + 1] for i in range(32)]
    assert all(eng(x).counts[0] == 1 for x in xs)
    t_eng, t_hand = P.interleaved_times(eng, by_hand, xs, 301)
    out["fixed_ratio"] = statistics.median(a / b for a, b in zip(t_eng, t_hand))
    out["fixed_engine_us"] = statistics.median(t_eng) * 1e6
    # The paper's profile, eager and (optionally) compiled.
    fr = P.profile_fractions("b_lenet", "paper", model.num_exits)
    pt = P.thresholds_for_profile(model, pool, fr)
    order = P.stratified_order(pt.exits, model.num_exits)
    modes = [("eager", False)] + ([("compiled", True)] if compile_ else [])
    for name, comp in modes:
        eng = EarlyExitEngine(model, thresholds=pt.thresholds, compile=comp)
        if comp:
            eng.warmup([1, 256])
        for b, n_calls, reps in ((1, 64, 31), (256, 4, 15)):
            cyc = P.BatchCycler(pool, b, order=order)
            inputs = [cyc() for _ in range(n_calls)]
            for x in inputs:
                eng(x)
            out[f"{name}_B{b}_us_per_sample"] = _median_time(eng, inputs, reps) / b * 1e6
    # PABEE's patience (P = 2) on a 6-exit MLP of width 64: stages of a few us, so the
    # cost of the decision itself shows.
    from branchynet.testing import random_mlp

    mlp = random_mlp(seed=3, num_exits=6, width=64, classes=3, dtype=torch.float32)
    px = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    eng = EarlyExitEngine(mlp, criterion="patience", patience=2)
    out["patience_exit_counts_B256"] = eng(px).counts
    for b, inputs, reps in ((1, [px[i:i + 1] for i in range(64)], 31), (256, [px] * 4, 15)):
        for x in inputs:
            eng(x)
        out[f"patience_B{b}_us_per_sample"] = _median_time(eng, inputs, reps) / b * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs="+")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time compiled stages (slow to build)")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    roots = [str(Path(c).resolve()) for c in args.checkouts]
    if args.child:
        print(json.dumps(child(roots[0], args.compile)))
        return
    runs = {r: [] for r in roots}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    for _ in range(args.repeats):
        for r in roots:
            cmd = [sys.executable, __file__, r, "--child"] + (["--compile"] if args.compile else [])
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=r, check=True)
            runs[r].append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = list(runs[roots[0]][0])
    print(f"load average at the end: {os.getloadavg()}; {args.repeats} alternations, medians (min-max)\n")
    print("| measure | " + " | ".join(roots) + " |")
    print("| --- |" + " --- |" * len(roots))
    for k in keys:
        cells = []
        for r in roots:
            v = [run[k] for run in runs[r]]
            if isinstance(v[0], list):  # a profile, not a time: the first repeat's
                cells.append(str(v[0]))
                continue
            cells.append(f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
