"""Engine fixed cost at B = 1 (B-LeNet, every sample leaves at exit 0): the current engine
against earlier engines in one process. Each earlier engine.py is loaded beside the
current one (same extension, same model); rounds alternate the by-hand stage 1 + branch
1 under inference_mode and every engine; thread CPU time, 1 torch thread; median and
quartiles of the per-round ratios to the by-hand time.

    python benchmarks/results/cpu-issue10/before_after_10b.py ROUNDS LABEL=ENGINE_PY ...
"""
import importlib.util, os, statistics, sys, time
import torch
torch.set_num_threads(1)
import branchynet
from branchynet import EarlyExitEngine
from branchynet.models.registry import build_model
rounds = int(sys.argv[1])
engines = {}
torch.manual_seed(0)
m = build_model("b_lenet").eval()
for arg in sys.argv[2:]:
    label, path = arg.split("=", 1)
    spec = importlib.util.spec_from_file_location(f"branchynet._engine_{label}", path)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    engines[label] = mod.EarlyExitEngine(m, [100.0])
engines["new"] = EarlyExitEngine(m, [100.0])
g = torch.Generator().manual_seed(1)
xs = [torch.randn(1, 1, 28, 28, generator=g) for _ in range(16)]
s0, b0 = m.stages[0], m.branches[0]
def hand(x):
    with torch.inference_mode():
        return b0(s0(x))
fs = {"hand": hand, **engines}
for x in xs:
    for e in engines.values():
        assert e(x).counts == [1, 0]
for f in fs.values():
    for _ in range(20):
        for x in xs: f(x)
ts = {k: [] for k in fs}
for _ in range(rounds):
    for k, f in fs.items():
        t0 = time.thread_time()
        for x in xs: f(x)
        ts[k].append((time.thread_time() - t0) / len(xs))
print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {rounds} rounds x {len(xs)} calls, "
      f"load average {os.getloadavg()}")
for k, v in ts.items():
    q = statistics.quantiles(v, n=4)
    print(f"{k}: median {1e6 * statistics.median(v):.1f} us [q1 {1e6 * q[0]:.1f}, q3 {1e6 * q[2]:.1f}]")
for k in engines:
    r = [a / h for a, h in zip(ts[k], ts["hand"])]
    q = statistics.quantiles(r, n=4)
    print(f"{k}/hand: median {statistics.median(r):.3f} [q1 {q[0]:.3f}, q3 {q[2]:.3f}]")
for k in engines:
    if k != "new":
        r = [a / b for a, b in zip(ts["new"], ts[k])]
        print(f"new/{k}: median {statistics.median(r):.3f}")
