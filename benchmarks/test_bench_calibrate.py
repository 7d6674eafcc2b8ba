"""Calibration cost against the number of exits.

An MLP with an exit after each of its N layers (N = 2..8), trained a few epochs with the
joint loss on a synthetic 10-class task; ``calibrate`` end to end (the scoring pass over
5,000 validation samples, FLOP counting, the search) for an accuracy target and a FLOP
budget. The peak memory of one call is measured in a fresh process that only loads the
trained model and the data: the high-water RSS during the call minus the RSS before it
(``/proc/self/clear_refs`` resets the mark; torch's CPU allocations are invisible to
``tracemalloc``).

    python -m pytest -q benchmarks/test_bench_calibrate.py --benchmark-json=cal.json
    PYTHONPATH=. python benchmarks/test_bench_calibrate.py --report cal.json > report.md
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import branchynet as bn
from branchynet.calibrate import calibrate

VAL_SAMPLES = 5000
EXITS = (2, 3, 4, 6, 8)
TARGETS = {"max_drop": {"max_drop": 0.01}, "max_flops": {"max_drop": None, "max_flops": 0.5}}


def build(n_exits: int, seed: int = 0, d: int = 32, h: int = 64, c: int = 10, train: bool = True):
    """``(model, val)``: an N-exit MLP trained 3 epochs (joint loss) on 20,000 samples of
    a 10-class Gaussian mixture, and 5,000 validation samples of it."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 0.4  # overlapping classes: ~85 % at the last exit

    def sample(m):
        y = torch.randint(0, c, (m,), generator=g)
        return centers[y] + torch.randn(m, d, generator=g), y

    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(d if i == 0 else h, h), nn.ReLU()) for i in range(n_exits)]
    model = bn.from_stages(stages, [nn.Linear(h, c) for _ in range(n_exits)], input_shape=(d,))
    x, y = sample(20000)
    if train:
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(3):
            for i in range(0, x.shape[0], 256):
                opt.zero_grad()
                bn.joint_loss(model(x[i:i + 256]), y[i:i + 256]).backward()
                opt.step()
    model.eval()
    return model, torch.utils.data.TensorDataset(*sample(VAL_SAMPLES))


_CACHE: dict = {}


def _built(n):
    if n not in _CACHE:
        _CACHE[n] = build(n)
    return _CACHE[n]


def _peak_mb(model, val, target: str, tmp: Path) -> float:
    """Peak resident memory added by one calibrate call, in a fresh process that only
    loads the trained model and the data (MB)."""
    f = tmp / "calib_case.pt"
    torch.save({"n": model.num_exits, "state": model.state_dict(), "x": val.tensors[0], "y": val.tensors[1]}, f)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's branchynet, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--peak", str(f), target],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("n_exits", EXITS)
def test_calibrate(benchmark, n_exits, target, tmp_path):
    model, val = _built(n_exits)
    calibrate(model, val, **TARGETS[target])  # warm-up: imports, FLOP counter
    benchmark.group = f"calibrate|{target}"
    res = benchmark.pedantic(lambda: calibrate(model, val, **TARGETS[target]), rounds=3, iterations=1)
    benchmark.extra_info.update(
        n_exits=n_exits, target_name=target, target=TARGETS[target], val_samples=VAL_SAMPLES,
        method=res.search["method"],
        scored=res.search["scored"], combinations=res.search["combinations"],
        chosen_accuracy=res.chosen["accuracy"], final_accuracy=res.final_accuracy,
        chosen_flops_fraction=res.chosen["flops_fraction"],
        peak_rss_mb=_peak_mb(model, val, target, tmp_path),
        load_avg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _report(path: str) -> str:
    data = json.loads(Path(path).read_text())
    mi, ci = data["machine_info"], data.get("commit_info", {})
    lines = [f"machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor'))}, "
             f"{mi.get('cpu', {}).get('count')} logical CPUs, torch {mi.get('torch')} "
             f"({mi.get('torch_threads')} threads), load average at the end "
             f"{mi.get('load_avg_1_5_15min')}; commit {ci.get('id', '?')[:10]}"
             f"{' (dirty tree)' if ci.get('dirty') else ''}", "",
             "| target | exits | method | combinations | scored | median s | min-max s (3 rounds) | "
             "peak RSS MB | chosen acc % | final acc % | FLOPs / backbone |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in sorted(data["benchmarks"], key=lambda b: (b["extra_info"]["target_name"], b["extra_info"]["n_exits"])):
        e, s = b["extra_info"], b["stats"]
        lines.append(
            f"| {e['target_name']} | {e['n_exits']} | {e['method']} | {e['combinations']:,} | "
            f"{e['scored']:,} | {s['median']:.3f} | {s['min']:.3f}-{s['max']:.3f} | {e['peak_rss_mb']:.0f} | "
            f"{100 * e['chosen_accuracy']:.2f} | {100 * e['final_accuracy']:.2f} | "
            f"{e['chosen_flops_fraction']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--peak":
        torch.set_num_threads(int(os.environ.get("BRANCHYNET_BENCH_THREADS", torch.get_num_threads())))
        case = torch.load(sys.argv[2])
        model, _ = build(case["n"], train=False)
        model.load_state_dict(case["state"])
        val = torch.utils.data.TensorDataset(case["x"], case["y"])
        from branchynet.flops import profile_flops

        profile_flops(model)  # imports and the FLOP counter's first use, outside the peak
        before = _status_kb("VmRSS")
        try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        calibrate(model, val, **TARGETS[sys.argv[3]])
        after = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_mb": (after - before) / 1024, "rss_before_mb": before / 1024}))
    elif sys.argv[1] == "--report":
        print(_report(sys.argv[2]))
