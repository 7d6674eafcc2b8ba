"""Where the engine's time over the by-hand stage 1 + branch 1 goes at B = 1 (B-LeNet,
every sample leaves at exit 0): each row adds one piece of the engine's work to the
by-hand call; rounds alternate all rows; thread CPU time, 1 torch thread; median of the
per-round ratios to `hand`.

    python benchmarks/results/cpu-issue10/fixed_cost_breakdown.py [ROUNDS]
"""
import os, statistics, sys, time
import torch
torch.set_num_threads(1)
from branchynet import EarlyExitEngine
from branchynet.engine import ExitResult, _direct_step, _inference_mode
from branchynet.models.registry import build_model
torch.manual_seed(0)
m = build_model("b_lenet").eval()
g = torch.Generator().manual_seed(1)
xs = [torch.randn(1, 1, 28, 28, generator=g) for _ in range(16)]
eng = EarlyExitEngine(m, [100.0])
s0, b0 = m.stages[0], m.branches[0]
rows = torch.arange(1)
d = _direct_step()
outs = [torch.empty(1, 10), torch.empty(1, dtype=torch.long), torch.empty(1, dtype=torch.long), torch.empty(1)]
def hand(x):  # the reference: torch.inference_mode's Python context manager
    with torch.inference_mode():
        return b0(s0(x))
def guard(x):  # the engine's inference-mode guard (torch._C._InferenceMode)
    with _inference_mode(True):
        return b0(s0(x))
def op_given(x):  # + the direct exit entry, output buffers given
    with _inference_mode(True):
        return d(b0(s0(x)), rows, 100.0, 0, 0, False, *outs)
def op_alloc(x):  # + the entry allocating the four output buffers
    with _inference_mode(True):
        return d(b0(s0(x)), rows, 100.0, 0, 0, False)
def result(x):  # + the ExitResult
    with _inference_mode(True):
        s, r, k, *out = d(b0(s0(x)), rows, 100.0, 0, 0, False)
        return ExitResult(*out, counts=[1, 0])
def run(x):  # the engine's _run (per-call set-up, the loop, the result)
    with _inference_mode(True):
        return eng._run(x)
fs = {"hand": hand, "guard": guard, "op_given": op_given, "op_alloc": op_alloc, "result": result,
      "run": run, "engine": eng}
for f in fs.values():
    for _ in range(50):
        for x in xs: f(x)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 600
ts = {k: [] for k in fs}
for _ in range(rounds):
    for k, f in fs.items():
        t0 = time.thread_time()
        for x in xs: f(x)
        ts[k].append((time.thread_time() - t0) / len(xs))
print(f"torch {torch.__version__}, 1 thread, {rounds} rounds x {len(xs)} calls, load average {os.getloadavg()}")
prev = None
for k, v in ts.items():
    r = [a / h for a, h in zip(v, ts["hand"])]
    step = "" if prev is None else f", {1e6 * statistics.median([a - b for a, b in zip(v, ts[prev])]):+.1f} us over {prev}"
    print(f"{k:9s} median {1e6 * statistics.median(v):6.1f} us, /hand {statistics.median(r):.3f}{step}")
    prev = k
