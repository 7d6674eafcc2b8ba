"""Time ``calibrate`` of another checkout (e.g. commit d68f9ee, whose search scored every
combination) on the models of ``test_bench_calibrate.py``, in this process, for a
same-load comparison.

    mkdir /tmp/other && git archive d68f9ee | tar -x -C /tmp/other   # exhaustive search
    cp branchynet/_C*.so /tmp/other/branchynet/                        # the built extension
    python benchmarks/calibrate_against_checkout.py /tmp/other
    python benchmarks/calibrate_against_checkout.py .

Prints JSON: per number of exits, the median / min / max seconds of 3 calls (target
max_drop=0.01, 5,000 validation samples), rows scored and the chosen point.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

root = str(Path(sys.argv[1]).resolve())
sys.path.insert(0, root)
sys.path.insert(1, str(Path(__file__).resolve().parent))
torch.set_num_threads(int(os.environ.get("BRANCHYNET_BENCH_THREADS", 1)))

import branchynet  # noqa: E402
import test_bench_calibrate as T  # noqa: E402
from branchynet.calibrate import calibrate  # noqa: E402

assert branchynet.__file__.startswith(root), f"imported {branchynet.__file__}, not {root}"
out = {}
for n in [int(a) for a in (sys.argv[2].split(",") if len(sys.argv) > 2 else ["3", "4"])]:
    model, val = T.build(n)
    calibrate(model, val, max_drop=0.01)  # warm-up
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = calibrate(model, val, max_drop=0.01)
        ts.append(time.perf_counter() - t0)
    out[n] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "rows": len(res.rows),
              "chosen_accuracy": res.chosen["accuracy"], "chosen_flops": res.chosen["flops"]}
print(json.dumps({"checkout": root, "load_avg": os.getloadavg(), "results": out}, indent=1))
