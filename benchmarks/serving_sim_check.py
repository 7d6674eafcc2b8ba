"""How well the serving simulator predicts this machine: ``branchynet.serving.simulate``
against ``ExitServer`` measured in the same run, on the same arrivals and exits (B-LeNet,
paper profile; ``serving_load.py``'s case).

    python benchmarks/serving_sim_check.py --out benchmarks/results/cpu-xeon-2core/serving

The simulator's inputs, each measured apart from the runs it predicts:

- each stage's compute: ``latency.py``'s segment times (gather, stage, branch, exit op) at
  1, 2, 4, ... ``max_batch_size`` rows, measured alone;
- the server's own cost of a run (taking the rows from the queue, answering, queueing the
  survivors): the worker's busy time per run (``ExitServer(record=True)``) of a server of
  a model with no compute (a 4 -> 2 linear layer), full runs of 1 to ``max_batch_size``
  rows back to back with every request queued first, as a function of the rows;
- the timer's lag: how late ``threading.Condition.wait(max_wait)`` returns on this machine
  (the worker sleeps so until a budget runs out).

Predicted and measured, per configuration: the saturated rate (every request submitted
as fast as one thread can) and the p50 latency under Poisson arrivals at a share of the
backbone's saturated rate. The simulation is fed each measured run's own arrivals (the
server's record: when each ``submit`` happened) and the exits of its requests; latency is
counted from the submit (``ExitAnswer.latency_s``), the server's part: a submitting thread
that falls behind its schedule is the client's lag, not the server's, and no model of the
server can predict it. Error = predicted / measured - 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving_load as L  # noqa: E402
from branchynet import BranchyNet, EarlyExitEngine  # noqa: E402
from branchynet.latency import measure_latency  # noqa: E402
from branchynet.serving import simulate, stage_time_from_profile, stage_time_from_record  # noqa: E402
from branchynet.tables import markdown_table  # noqa: E402

CONFIGS = ("backbone", "per_batch", "rebatch")


class _Gated(nn.Module):
    """A 4 -> 2 linear layer whose forward waits until the gate opens: the requests of a
    measurement are all queued before the first run, so no submitting thread competes
    with the worker for the interpreter while its runs are timed."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.gate = threading.Event()

    def forward(self, x):
        self.gate.wait()
        return self.lin(x)


def server_overhead(batch: int, runs: int = 8):
    """The server's own cost of a run, ``rows -> seconds``: the worker's busy time per run
    (:meth:`ExitServer.record`'s ``busy``) serving a model whose compute is negligible,
    full runs of 1, 4, 16, ... ``batch`` rows back to back (``runs`` of each), with
    nothing else running; grouped and interpolated by rows."""
    from branchynet.serving import ExitServer

    busy = []
    sizes = sorted({min(batch, 4 ** i) for i in range(8)})
    for b in sizes:
        model = _Gated().eval()
        x = torch.randn(runs * b + 1, 4)
        with L._gc_paused(), ExitServer(model, max_batch_size=b, max_wait_ms=0.0, max_queued=len(x),
                                        record=True) as server:
            first = server.submit(x[0])  # its run waits at the gate while the rest queue
            futs = [server.submit(x[i]) for i in range(1, len(x))]
            model.gate.set()
            for f in [first] + futs:
                f.result(timeout=60)
            busy += server.record()["busy"][1:]
    curve = stage_time_from_record(busy, num_stages=1)
    return lambda k: curve(0, k)


def timer_lag(wait_s: float, repeats: int = 200) -> float:
    """Median seconds by which ``Condition.wait(wait_s)`` overshoots on this machine."""
    cv = threading.Condition()
    lags = []
    with cv:
        for _ in range(repeats):
            t = time.perf_counter()
            cv.wait(wait_s)
            lags.append(time.perf_counter() - t - wait_s)
    return max(0.0, statistics.median(lags))


def predictors(model, thresholds, pool: torch.Tensor, batch: int, repeats: int, overhead) -> dict:
    """Per configuration: ``(stage_time, num_stages, exit of each pool row)``; a run of k
    rows costs its segment time plus the server's ``overhead(k)``."""
    example = pool[:batch]
    ee_seg = stage_time_from_profile(measure_latency(model, example, repeats=repeats))
    one = BranchyNet([model.backbone_only()], [nn.Identity()]).eval()
    bb_seg = stage_time_from_profile(measure_latency(one, example, repeats=repeats))

    def ee(n, k):
        return ee_seg(n, k) + overhead(k)

    def bb(n, k):
        return bb_seg(n, k) + overhead(k)
    with torch.inference_mode():
        exits = EarlyExitEngine(model, thresholds)(pool).exit.numpy()
    zeros = np.zeros(len(pool), dtype=np.int64)
    return {"backbone": (bb, 1, zeros), "per_batch": (ee, model.num_exits, exits),
            "rebatch": (ee, model.num_exits, exits)}


def predict(pred, config: str, arrivals: np.ndarray, batch: int, wait_ms: float, wake_lag_s: float = 0.0):
    """The simulated server of ``config`` on ``arrivals`` (seconds); request i is the pool's
    row i mod its size, as the measuring harness submits them."""
    stage_time, n_stages, exits = pred[config]
    ex = exits[np.arange(len(arrivals)) % len(exits)]
    return simulate(arrivals, ex, stage_time, num_stages=n_stages, max_batch_size=batch,
                    max_wait_ms=wait_ms, rebatch=config != "per_batch", wake_lag_s=wake_lag_s)


def measured_arrivals(run: dict, warm: int) -> np.ndarray:
    """The submit times of a measured run's requests (its record, after the warm-up's)."""
    arr = np.asarray(run["record"]["arrivals"][warm:], dtype=np.float64)
    if len(arr) != run.get("n", run.get("requests")) - run.get("refused", 0):
        raise RuntimeError("the record's arrivals do not match the run's requests")
    return arr


def check(model, thr, pool, args) -> dict:
    """Measure and predict every configuration with both cost models; the figures as a dict.

    ``a priori``: segment times measured alone plus the server's cost of a run measured on
    a model with no compute. ``in the server``: each configuration's cost of a run from the
    busy times of its own calibration runs (one saturated, one at ``args.calib_load`` of
    the backbone's saturated rate), separate from the runs predicted.
    """
    b, w = args.max_batch_size, args.max_wait_ms
    kw = dict(max_batch_size=b, max_wait_ms=w, max_queued=4096, warm=2 * b, record=True)
    overhead = server_overhead(b)
    lag = timer_lag(w / 1e3)
    prior = predictors(model, thr, pool, b, repeats=9, overhead=overhead)
    out = {"overhead_us": {k: overhead(k) * 1e6 for k in (1, 16, b)}, "timer_lag_us": lag * 1e6, "configs": {}}
    sat_runs = {c: [L.saturate(model, thr, c, pool, args.saturation_requests, **kw)
                    for _ in range(args.repeats)] for c in CONFIGS}
    sat = {c: float(np.median([r["rps"] for r in runs])) for c, runs in sat_runs.items()}
    rate, calib_rate = args.load * sat["backbone"], args.calib_load * sat["backbone"]
    loop = dict(max_requests=args.max_requests, max_seconds=args.max_seconds, **kw)
    for c in CONFIGS:
        # Each measured pair (saturated, at the load) gets its own calibration pair run
        # just before it: this shared VM's speed drifts by tens of percent within minutes.
        v = {"saturated_rps": sat[c]}
        preds = {"prior": ([], []), "inside": ([], [])}
        p50s = []
        for i, measured in enumerate(sat_runs[c]):
            calib_sat = L.saturate(model, thr, c, pool, args.saturation_requests, **kw)
            calib = L.open_loop(model, thr, c, pool, calib_rate, seed=600 + i, **loop)
            run = L.open_loop(model, thr, c, pool, rate, seed=700 + i, **loop)
            p50s.append(run["server_p50_s"])
            busy = calib_sat["record"]["busy"] + calib["record"]["busy"]
            inside = {c: (stage_time_from_record(busy, prior[c][1]),) + prior[c][1:]}
            for name, pred in (("prior", prior), ("inside", inside)):
                preds[name][0].append(predict(pred, c, measured_arrivals(measured, kw["warm"]), b, w, lag).throughput)
                preds[name][1].append(predict(pred, c, measured_arrivals(run, kw["warm"]), b, w, lag).p50_s)
        v["p50_s"] = float(np.median(p50s))
        for name, (thr_s, p50_s) in preds.items():
            v[f"{name}_saturated_rps"] = float(np.median(thr_s))
            v[f"{name}_p50_s"] = float(np.median(p50_s))
        out["configs"][c] = v
    out["rate"], out["calib_rate"] = rate, calib_rate
    return out


def _errors(v: dict, name: str) -> tuple:
    return (v[f"{name}_saturated_rps"] / v["saturated_rps"] - 1, v[f"{name}_p50_s"] / v["p50_s"] - 1)


def report(r: dict, args) -> str:
    rows = []
    for c, v in r["configs"].items():
        for name, label in (("inside", "in the server"), ("prior", "a priori")):
            e_sat, e_p50 = _errors(v, name)
            rows.append([c, label, f"{v['saturated_rps']:,.0f}", f"{v[name + '_saturated_rps']:,.0f}",
                         f"{e_sat:+.1%}", f"{v['p50_s'] * 1e3:.2f}", f"{v[name + '_p50_s'] * 1e3:.2f}",
                         f"{e_p50:+.1%}"])
    head = ["config", "costs", "saturated req/s measured", "predicted", "error",
            f"p50 ms at {args.load:.0%} measured", "predicted", "error"]
    worst = {name: max(abs(e) for v in r["configs"].values() for e in _errors(v, name))
             for name in ("inside", "prior")}
    commit = os.popen("git rev-parse --short HEAD").read().strip()
    oh = ", ".join(f"{k} rows {v:.0f} us" for k, v in r["overhead_us"].items())
    return (f"# The serving simulator against the server on this machine\n\n"
            f"`python benchmarks/serving_sim_check.py` at commit {commit}: {args.model} (random init, "
            f"paper-profile thresholds), max_batch_size {args.max_batch_size}, max_wait_ms "
            f"{args.max_wait_ms}; saturated: {args.saturation_requests} requests submitted back to "
            f"back, median of {args.repeats}; p50: Poisson arrivals at {args.load:.0%} of the "
            f"backbone's measured saturated rate ({r['rate']:,.0f}/s), latency from each submit, "
            f"medians of {args.repeats}. Each prediction simulates the measured run's own submit "
            f"times, with the timer's lag ({r['timer_lag_us']:.0f} us). Costs of a run: **in the "
            f"server**: each configuration's busy times (`ExitServer(record=True)`) in its own "
            f"calibration runs, one saturated and one at {args.calib_load:.0%} load "
            f"({r['calib_rate']:,.0f}/s), run just before each measured pair and not among the runs predicted; **a priori**: `measure_latency` "
            f"segment times (1 ... {args.max_batch_size} rows, 9 repeats) plus the server's cost of a "
            f"run measured on a model with no compute ({oh}). torch {torch.__version__}, 1 thread, "
            f"load average {os.getloadavg()[0]:.2f} at the end.\n\n{markdown_table(head, rows)}\n\n"
            f"Largest error: {worst['inside']:.1%} with the costs measured in the server, "
            f"{worst['prior']:.1%} a priori (goal: within 15 %).\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="b_lenet")
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--saturation-requests", type=int, default=5120)
    ap.add_argument("--load", type=float, default=0.6, help="share of the backbone's saturated rate")
    ap.add_argument("--calib-load", type=float, default=0.3, help="load of the calibration run")
    ap.add_argument("--max-requests", type=int, default=8000)
    ap.add_argument("--max-seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    case = L.paper_case(args.model)
    r = check(case["model"], case["thresholds"], case["pool"], args)
    text = report(r, args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "simulator_check.md").write_text(text)
        (args.out / "simulator_check.json").write_text(json.dumps(r | {"settings": vars(args) | {
            "out": str(args.out)}}, indent=1))


if __name__ == "__main__":
    main()
