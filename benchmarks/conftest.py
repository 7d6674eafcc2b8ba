"""Shared state of the benchmark suites: models, input pools, exit profiles, compiled and
captured backbones (built once per session), and the machine information written into
pytest-benchmark's JSON beside the numbers."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# `import profiles` from the suites, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import profiles as P  # noqa: E402


def pytest_configure(config):
    # BRANCHYNET_BENCH_THREADS: intra-op threads on the CPU (recorded as torch_threads).
    n = os.environ.get("BRANCHYNET_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))


# --- machine information ----------------------------------------------------------------

def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True).stdout
    except Exception:
        return {}
    first = out.strip().splitlines()[0] if out.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) < 2:
        return {}
    keys = ("gpu_name_smi", "driver_version", "gpu_memory", "gpu_max_sm_clock")
    return dict(zip(keys, parts))


def software_info() -> dict:
    """torch / CUDA / Triton versions, the GPU and its driver, and branchynet's backends."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "torch_threads": torch.get_num_threads(),
        "bench_device": str(P.bench_device()),
        "bench_full": P.full_scope(),
    }
    if hasattr(os, "getloadavg"):
        # A busy machine distorts CPU timings (a 2-thread OpenMP region waits a whole
        # scheduler slice, ~5 ms, for a descheduled worker): keep the load beside them.
        info["load_avg_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        dev = P.bench_device()
        idx = dev.index if dev.type == "cuda" and dev.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(idx)
        cap = torch.cuda.get_device_capability(idx)
        info["gpu_capability"] = f"{cap[0]}.{cap[1]}"
        info["cudnn"] = torch.backends.cudnn.version()
        info.update(_nvidia_smi())
    try:
        import branchynet
        from branchynet.ops import backend_status

        info["branchynet"] = branchynet.__version__
        info["branchynet_backends"] = {k: (v if isinstance(v, (str, bool, type(None))) else str(v))
                                       for k, v in backend_status().items()}
    except Exception as err:  # never lose a run to the info block
        info["branchynet_backends"] = f"unavailable: {err}"
    return info


def pytest_report_header(config):
    from branchynet.ops import backend_status

    ext = backend_status()["extension"]
    if ext != "loaded":
        return [f"branchynet extension {ext}: the cpp/cuda providers are NOT in this run "
                f"(build it: pip install --no-build-isolation -e .)"]
    return ["branchynet extension loaded"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(software_info())
    machine_info.setdefault("platform", platform.platform())


# --- session state ----------------------------------------------------------------------

class BenchContext:
    """What the suites share in one session, built on first use and kept."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.target_s = P.target_seconds(device)
        self.min_rounds = int(os.environ.get("BRANCHYNET_BENCH_MIN_ROUNDS", 5 if self.cuda else 3))
        self.max_rounds = 10000
        self.info = software_info()
        self.device_name = self.info.get("gpu") if self.cuda else (platform.processor() or platform.machine())
        self._models, self._pools, self._profiles, self._flops = {}, {}, {}, {}
        self._backbones, self._compiled, self._graphs = {}, {}, {}
        self._segment_fns, self._segments = {}, {}
        self.compile_s = None

    # device ------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # models and inputs -------------------------------------------------------------------
    def model(self, name: str):
        if name not in self._models:
            self._models[name] = P.make_model(name, self.device)
        return self._models[name]

    def pool(self, name: str) -> torch.Tensor:
        if name not in self._pools:
            n = max(P.POOL_SIZE, max(P.BATCH_SIZES))
            self._pools[name] = P.make_pool(self.model(name), n, device=self.device)
        return self._pools[name]

    def profile(self, name: str, profile: str):
        """(ProfileThresholds, stratified order of the pool) for a named profile."""
        key = (name, profile)
        if key not in self._profiles:
            model = self.model(name)
            fr = P.profile_fractions(name, profile, model.num_exits)
            pt = P.thresholds_for_profile(model, self.pool(name), fr)
            order = P.stratified_order(pt.exits, model.num_exits)
            self._profiles[key] = (pt, order)
        return self._profiles[key]

    def flops(self, name: str):
        if name not in self._flops:
            from branchynet.flops import profile_flops

            self._flops[name] = profile_flops(self.model(name))
        return self._flops[name]

    # backbones ---------------------------------------------------------------------------
    def backbone(self, name: str):
        if name not in self._backbones:
            self._backbones[name] = self.model(name).backbone_only().eval()
        return self._backbones[name]

    def compiled_backbone(self, name: str):
        """torch.compile of the backbone (one object per model; one graph per batch size)."""
        if name not in self._compiled:
            P.raise_dynamo_limits()
            mode = os.environ.get("BRANCHYNET_BENCH_COMPILE_MODE") or None
            self._compiled[name] = torch.compile(self.backbone(name), dynamic=False, mode=mode)
        return self._compiled[name]

    def cudagraph_backbone(self, name: str, batch: int, example: torch.Tensor):
        """The backbone captured in a CUDA graph for a static batch of ``batch`` rows.

        Returns ``run(x)``: copies ``x`` into the static input, replays, returns the
        static output (valid until the next replay).
        """
        key = (name, batch)
        if key not in self._graphs:
            bb = self.backbone(name)
            with torch.inference_mode():
                static_x = example.clone()
                # Warm up on a side stream (cuDNN/cuBLAS workspaces, lazy init) before capture,
                # as torch.cuda.graphs documents.
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        bb(static_x)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_y = bb(static_x)
            torch.cuda.synchronize(self.device)

            def run(x, _g=graph, _x=static_x, _y=static_y):
                _x.copy_(x)
                _g.replay()
                return _y

            self._graphs[key] = run
        return self._graphs[key]

    # segment-time ideal -----------------------------------------------------------------
    def _time_call(self, fn, timer, target_s: float = 0.15, rounds: int = 15) -> float:
        """Median seconds per call of ``fn()`` over ``rounds`` rounds (after warm-up)."""
        for _ in range(3):  # compile / allocator growth
            fn()
        self.sync()
        t0 = timer()
        fn()
        self.sync()
        one = max(timer() - t0, 1e-7)
        per_round = max(1, min(1000, int(target_s / rounds / one)))
        ts = []
        for _ in range(rounds):
            t0 = timer()
            for _ in range(per_round):
                fn()
            self.sync()
            ts.append((timer() - t0) / per_round)
        return statistics.median(ts)

    def segment_fn(self, name: str, n: int):
        """Stage n and branch n compiled together (static batch, one graph per size)."""
        key = (name, n)
        if key not in self._segment_fns:
            P.raise_dynamo_limits()
            model = self.model(name)
            mod = torch.nn.Sequential(model.stages[n], model.branches[n]).eval()
            mode = os.environ.get("BRANCHYNET_BENCH_COMPILE_MODE") or None
            self._segment_fns[key] = torch.compile(mod, dynamic=False, mode=mode)
        return self._segment_fns[key]

    def segment_times(self, name: str, batch: int, profile: str, fractions, kind: str, timer=None) -> dict:
        """The segment-time ideal of a call of ``batch`` samples with exit ``fractions``:
        each stage with its branch timed alone on the rows it sees (``P.segment_rows``),
        summed. ``kind="compiled"`` takes, per segment, the faster of eager and compiled
        (the compiled engine runs one row eagerly). Cached per arguments."""
        fractions = [float(f) for f in fractions]
        key = (name, batch, profile, kind, tuple(round(f, 9) for f in fractions))
        if key in self._segments:
            return self._segments[key]
        timer = timer or time.perf_counter
        model = self.model(name)
        rows = P.segment_rows(batch, fractions)
        per_exit = []
        with torch.inference_mode():
            h = self.pool(name)
            for n, (stage, branch) in enumerate(zip(model.stages, model.branches)):
                k, weight = rows[n]
                # Up to 8 disjoint inputs in turn, as the providers get a new batch per
                # call: one input timed over and over would sit in cache.
                ins = [h[i * k:(i + 1) * k].contiguous() for i in range(max(1, min(8, h.shape[0] // k)))]
                turn = [0]

                def nxt(ins=ins, turn=turn):
                    turn[0] = (turn[0] + 1) % len(ins)
                    return ins[turn[0]]

                fns = {"eager": lambda s=stage, b=branch, nxt=nxt: b(s(nxt()))}
                if kind == "compiled":
                    seg = self.segment_fn(name, n)
                    fns["compiled"] = lambda f=seg, nxt=nxt: f(nxt())
                times = {label: self._time_call(f, timer) for label, f in fns.items()}
                best = min(times, key=times.get)
                per_exit.append({"rows": k, "weight": weight, "s": times[best], "by": best, "times": times})
                self._segment_fns[key + (n,)] = fns[best]
                h = torch.cat([stage(h[i:i + 256]) for i in range(0, h.shape[0], 256)])
        out = {"kind": kind, "exits": per_exit, "total": sum(e["s"] * e["weight"] for e in per_exit),
               "key": list(key)}
        self._segments[key] = out
        return out

    def interleaved_segment_efficiency(self, seg: dict, key: tuple, call, per_call_s: float, timer=None,
                                       rounds: int = 31, round_s: float = 0.03) -> dict:
        """Segment time / provider time, per round, with the provider's calls (``call``)
        and the segments' alternating in one loop: a load that drifts between two
        measurements does not enter it. Returns median and quartiles."""
        timer = timer or time.perf_counter
        fns = [(self._segment_fns[key + (n,)], e["weight"], max(1, int(round_s / 2 / max(e["s"], 1e-7))))
               for n, e in enumerate(seg["exits"])]
        n_call = max(1, int(round_s / 2 / max(per_call_s, 1e-7)))
        ratios = []
        with torch.inference_mode():
            for _ in range(rounds):
                t0 = timer()
                for _ in range(n_call):
                    call()
                self.sync()
                t_call = (timer() - t0) / n_call
                t_seg = 0.0
                for fn, weight, reps in fns:
                    t0 = timer()
                    for _ in range(reps):
                        fn()
                    self.sync()
                    t_seg += weight * (timer() - t0) / reps
                ratios.append(t_seg / t_call)
        q = statistics.quantiles(ratios, n=4)
        return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "rounds": rounds}

    # extra_info common to every benchmark ------------------------------------------------
    def common_info(self) -> dict:
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "torch": self.info.get("torch"),
            "triton": self.info.get("triton"),
            "torch_cuda": self.info.get("torch_cuda"),
            "driver_version": self.info.get("driver_version"),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        }


@pytest.fixture(scope="session")
def bench_ctx():
    dev = P.bench_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("BRANCHYNET_BENCH_DEVICE asks for CUDA but there is no GPU")
    return BenchContext(dev)
