"""Engine fixed cost at B = 1 (B-LeNet, every sample leaves at exit 0), before and after
issue 10, in one process: rounds alternate the by-hand stage 1 + branch 1, the engine of
the base commit d68f9ee (its engine.py loaded beside this one) and the current engine;
thread CPU time, 1 torch thread; median of per-round ratios."""
import importlib.util, statistics, sys, time
import torch
torch.set_num_threads(1)
import branchynet
from branchynet import EarlyExitEngine
from branchynet.models.registry import build_model
spec = importlib.util.spec_from_file_location("branchynet._engine_base", sys.argv[1])
base = importlib.util.module_from_spec(spec); sys.modules[spec.name] = base; spec.loader.exec_module(base)
torch.manual_seed(0)
m = build_model("b_lenet").eval()
g = torch.Generator().manual_seed(1)
xs = [torch.randn(1, 1, 28, 28, generator=g) for _ in range(16)]
new, old = EarlyExitEngine(m, [100.0]), base.EarlyExitEngine(m, [100.0])
s0, b0 = m.stages[0], m.branches[0]
def hand(x):
    with torch.inference_mode():
        return b0(s0(x))
fs = {"hand": hand, "base": old, "new": new}
for x in xs:
    assert new(x).counts == [1, 0] and old(x).counts == [1, 0]
for f in fs.values():
    for _ in range(20):
        for x in xs: f(x)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 600
ts = {k: [] for k in fs}
for _ in range(rounds):
    for k, f in fs.items():
        t0 = time.thread_time()
        for x in xs: f(x)
        ts[k].append((time.thread_time() - t0) / len(xs))
for k, v in ts.items():
    print(f"{k}: median {1e6 * statistics.median(v):.1f} us")
for k in ("base", "new"):
    r = [a / h for a, h in zip(ts[k], ts["hand"])]
    q = statistics.quantiles(r, n=4)
    print(f"{k}/hand: median {statistics.median(r):.3f} [q1 {q[0]:.3f}, q3 {q[2]:.3f}]")
r = [a / b for a, b in zip(ts["new"], ts["base"])]
print(f"new/base: median {statistics.median(r):.3f}")
