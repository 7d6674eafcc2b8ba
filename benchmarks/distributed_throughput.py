"""Training throughput (samples/s) with 1 and 2 data-parallel ranks under torchrun.

Launcher (from the repository root)::

    python benchmarks/distributed_throughput.py --out benchmarks/results/<machine>/distributed

runs, for each model, ``torchrun --standalone --nproc-per-node N`` of this file in worker
mode for N in ``--ranks`` (default 1, 2), ``--repeats`` times each, every rank with one
torch thread, and writes ``throughput.json`` and ``report.md`` to ``--out``. A worker
trains with :func:`branchynet.train.train` on synthetic data (the work per sample does
not depend on the values): one untimed warm-up call of ``--warmup`` global batches, then
a timed call of ``--steps`` global batches of ``--batch-size`` (the global batch: each of
N ranks gets 1/N of it). Samples/s = steps x batch / wall time of that call on rank 0,
between two barriers. The machine's load average is recorded before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (model, input shape, global batch, timed steps, warm-up steps)
DEFAULTS = {
    "b-lenet": ((1, 28, 28), 64, 40, 5),
    "b-resnet110": ((3, 32, 32), 64, 3, 1),
}


def worker(args) -> None:
    import torch
    from torch.utils.data import TensorDataset

    from branchynet.distributed import init_from_env, is_distributed
    from branchynet.models.registry import build_model
    from branchynet.train import train

    torch.set_num_threads(1)
    info = init_from_env("cpu")
    shape = tuple(DEFAULTS[args.model][0])

    def data(steps):
        g = torch.Generator().manual_seed(0)
        n = steps * args.batch_size
        return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))

    def barrier():
        if is_distributed():
            torch.distributed.barrier()

    torch.manual_seed(0)
    model = build_model(args.model, **({"in_channels": 1} if args.model == "b-lenet" else {}))
    train(model, data(args.warmup), epochs=1, batch_size=args.batch_size, progress=False)
    timed = data(args.steps)
    barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    train(model, timed, epochs=1, batch_size=args.batch_size, progress=False)
    cpu = time.process_time() - c0
    barrier()
    seconds = time.perf_counter() - t0
    if info.rank == 0:
        Path(args.json).write_text(json.dumps({
            "seconds": seconds, "samples": len(timed), "samples_per_s": len(timed) / seconds,
            # rank 0's CPU time: wall >> cpu means it waited (for a core, or for the other rank)
            "cpu_seconds_rank0": cpu,
            "world_size": info.world_size, "torch_threads": torch.get_num_threads()}))
    if is_distributed():
        torch.distributed.destroy_process_group()


def launch(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs = []
    for model in args.models:
        shape, batch, steps, warmup = DEFAULTS[model]
        steps = args.steps or steps
        for ranks in args.ranks:
            for rep in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    res = Path(tmp) / "r.json"
                    load_before = os.getloadavg()
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", __file__, "--worker", "--model", model,
                           "--batch-size", str(batch), "--steps", str(steps), "--warmup", str(warmup),
                           "--json", str(res)]
                    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
                    r = json.loads(res.read_text())
                r.update(model=model, ranks=ranks, repeat=rep, batch_size=batch, steps=steps,
                         load_before=load_before, load_after=os.getloadavg())
                runs.append(r)
                print(f"{model} ranks={ranks} rep={rep}: {r['samples_per_s']:.1f} samples/s "
                      f"(load {load_before[0]:.2f} -> {r['load_after'][0]:.2f})", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip())
    import torch

    from profiles import cpu_name  # the benchmarks' shared helpers (imports torch)

    machine = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "commit": commit, "dirty": dirty,
               "command": "python benchmarks/distributed_throughput.py " + " ".join(
                   f"--models {' '.join(args.models)} --ranks {' '.join(map(str, args.ranks))} "
                   f"--repeats {args.repeats} --out {args.out}".split())}
    (out / "throughput.json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    (out / "report.md").write_text(report(machine, runs, args.note))
    print(report(machine, runs, args.note))


def report(machine: dict, runs: list, note: str = "") -> str:
    lines = ["# Data-parallel training throughput", "", note.strip(), "",
             f"Command: `{machine['command']}`", "",
             f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, python {machine['python']}, "
             f"torch {machine['torch']}; commit {machine['commit'][:12]}{' (dirty tree)' if machine['dirty'] else ''}. "
             "Every rank runs 1 torch thread, gloo backend.", "",
             "| model | ranks | global batch | samples/s median | min - max | runs | speedup vs 1 rank | "
             "rank 0 CPU s / wall s | samples / rank 0 CPU s (median) | load avg (1 min) before runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        for ranks in dict.fromkeys(r["ranks"] for r in runs if r["model"] == model):
            rs = [r for r in runs if r["model"] == model and r["ranks"] == ranks]
            sps = [r["samples_per_s"] for r in rs]
            med = statistics.median(sps)
            base.setdefault(model, med)
            loads = ", ".join(f"{r['load_before'][0]:.1f}" for r in rs)
            busy = statistics.median(r["cpu_seconds_rank0"] / r["seconds"] for r in rs)
            # What the ranks would do with a core each: every rank does rank 0's work.
            per_cpu = statistics.median(r["samples"] / r["cpu_seconds_rank0"] for r in rs)
            lines.append(f"| {model} | {ranks} | {rs[0]['batch_size']} | {med:.1f} | {min(sps):.1f} - {max(sps):.1f} "
                         f"| {len(rs)} | {med / base[model]:.2f}x | {busy:.2f} | {per_cpu:.1f} | {loads} |")
    return "\n".join(lines) + "\n"



def rewrite_report(out: Path, note: str) -> None:
    """report.md again from throughput.json (e.g. with another note)."""
    d = json.loads((out / "throughput.json").read_text())
    (out / "report.md").write_text(report(d["machine"], d["runs"], note))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--model", default="b-lenet", choices=sorted(DEFAULTS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="timed global batches (default per model)")
    p.add_argument("--models", nargs="+", default=list(DEFAULTS), choices=sorted(DEFAULTS))
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    # Default outside the committed results: a run on another machine must not overwrite them.
    p.add_argument("--out", default="runs/distributed")
    p.add_argument("--note", default="", help="a paragraph for the report (machine state)")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from --out's throughput.json")
    args = p.parse_args()
    if args.report_only:
        rewrite_report(Path(args.out), args.note)
    else:
        worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
