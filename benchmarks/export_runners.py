"""Exported runners against the eager engine and against each exported backbone alone,
at the paper's exit profile, on the CPU (one thread).

    OMP_NUM_THREADS=1 python benchmarks/export_runners.py --out benchmarks/results/cpu-xeon-2core/export

For each of the paper's networks (seeded random init, thresholds that realise the
paper's Table I exit fractions on a pool of 1,024 inputs): the model is exported with
branchynet.deploy (ONNX for ONNX Runtime; pt2 compiled by AOTInductor), and its backbone
alone (every stage, then the final classifier: BackboneOnly) is exported the same way
as one graph. Every comparison is timed as interleaved rounds
(``profiles.interleaved_times``: a round of the runner, then a round of what it is
compared with, so a load that drifts hits both); a round is 32 consecutive samples at
B = 1 and a few batches at B = 256 of a pool ordered so that every window carries the
profile. Ratios are taken per round; the table gives medians and the 20-80 % spread.
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import profiles as P  # noqa: E402
from branchynet import EarlyExitEngine  # noqa: E402
from branchynet.deploy import export, load  # noqa: E402

ROUNDS = {1: int(os.environ.get("EXPORT_BENCH_ROUNDS", 31)), 256: int(os.environ.get("EXPORT_BENCH_ROUNDS", 7))}
CALLS = {1: P.SAMPLES_PER_ROUND, 256: 2}


def _backbone(model, out: Path, fmt: str, max_batch: int = 1024):
    """The backbone alone as one exported graph, and a callable that runs it."""
    bb = model.backbone_only().eval()
    x = P.make_pool(model, 2)
    program = torch.export.export(bb, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1,
                                                                                  max=max_batch)},))
    if fmt == "onnx":
        import onnxruntime as ort

        path = out / "backbone.onnx"
        torch.onnx.export(program, (), str(path), input_names=["x"], output_names=["logits"], dynamo=True,
                          external_data=True, verbose=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return lambda xb: sess.run(None, {"x": xb.numpy()})
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(out / "backbone.pt2"))
    # Through the package's loader, as the runner calls its exit graphs (the package's
    # __call__ parses its specs on every call).
    run = torch._inductor.aoti_load_package(path).loader.run

    def call(xb):
        with torch.inference_mode():
            return run([xb])
    return call


def _spread(values) -> tuple:
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return statistics.median(values), q[1], q[7]


def _compare(fa, fb, inputs, rounds: int, rows: int) -> dict:
    for x in inputs:  # warm both (allocator, ORT arenas, first-call lazy init)
        fa(x)
        fb(x)
    ta, tb = P.interleaved_times(fa, fb, inputs, rounds)
    ratio = [b / a for a, b in zip(ta, tb)]
    return {"a_us": _spread([t / rows * 1e6 for t in ta]), "b_us": _spread([t / rows * 1e6 for t in tb]),
            "speedup": _spread(ratio)}


def bench_model(name: str, work: Path, formats: list) -> list:
    model = P.make_model(name)
    pool = P.make_pool(model, P.POOL_SIZE)
    fractions = P.profile_fractions(name, "paper", model.num_exits)
    pt = P.thresholds_for_profile(model, pool, fractions)
    order = P.stratified_order(pt.exits, model.num_exits)
    engine = EarlyExitEngine(model, thresholds=pt.thresholds)

    def eager_backbone(xb, bb=model.backbone_only().eval()):
        with torch.inference_mode():
            return bb(xb)

    rows_out = []
    runners = {}
    for fmt in formats:
        d = work / name / fmt
        t0 = time.perf_counter()
        export(model, d, "pt2" if fmt == "aoti" else "onnx", aoti=fmt == "aoti", thresholds=pt.thresholds,
               progress=False)
        runner = load(d, threads=1) if fmt == "onnx" else load(d)
        backbone = _backbone(model, d, fmt)
        build_s = time.perf_counter() - t0
        res = runner(pool[:256])
        P.check_exit_result(res, engine(pool[:256]), pt.thresholds)
        runners[fmt] = (runner, backbone, build_s)
    for b in (1, 256):
        cyc = P.BatchCycler(pool, b, order=order)
        inputs = [cyc() for _ in range(CALLS[b])]
        ref = _compare(engine, eager_backbone, inputs, ROUNDS[b], b)
        rows_out.append({"model": name, "B": b, "runner": "eager engine", "us": ref["a_us"],
                         "vs_engine": (1.0, 1.0, 1.0), "backbone_us": ref["b_us"], "vs_backbone": ref["speedup"],
                         "realised": pt.realised})
        for fmt, (runner, backbone, build_s) in runners.items():
            vs_engine = _compare(runner, engine, inputs, ROUNDS[b], b)
            vs_backbone = _compare(runner, backbone, inputs, ROUNDS[b], b)
            rows_out.append({"model": name, "B": b, "runner": fmt, "us": vs_engine["a_us"],
                             "vs_engine": vs_engine["speedup"], "backbone_us": vs_backbone["b_us"],
                             "vs_backbone": vs_backbone["speedup"], "build_s": build_s,
                             "realised": pt.realised})
            print(json.dumps(rows_out[-1]), flush=True)
    return rows_out


def _fmt(t) -> str:
    return f"{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})"


def _ratio(t) -> str:
    return f"{t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f})"


def table(rows: list) -> str:
    from branchynet.tables import markdown_table

    head = ["network", "B", "runner", "us / sample", "speedup vs eager engine", "its backbone alone, us / sample",
            "speedup vs its backbone alone"]
    names = {"eager engine": "eager engine (cpp exit op)", "onnx": "ONNX Runtime runner",
             "aoti": "AOTInductor runner"}
    order = {m: i for i, m in enumerate(P.MODEL_NAMES)}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["B"]))  # stable: runners keep theirs
    body = [[r["model"], r["B"], names[r["runner"]], _fmt(r["us"]), _ratio(r["vs_engine"]),
             _fmt(r["backbone_us"]), _ratio(r["vs_backbone"])] for r in rows]
    return markdown_table(head, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="b_lenet,b_alexnet,b_resnet110")
    ap.add_argument("--formats", default="onnx,aoti")
    ap.add_argument("--out", default=None, help="folder for results.json and table.md")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of --out/results.json for the other networks (one run per network)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, Path(tmp), args.formats.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    meta = {"command": "OMP_NUM_THREADS=1 python benchmarks/export_runners.py " + " ".join(sys.argv[1:]),
            "commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": P.cpu_name(), "threads": torch.get_num_threads(), "load_average_end": os.getloadavg(),
            "models": args.models.split(",")}
    try:
        import onnxruntime
        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    runs = [meta]
    if args.append and args.out and (Path(args.out) / "results.json").is_file():
        before = json.loads((Path(args.out) / "results.json").read_text())
        names = {r["model"] for r in rows}
        rows = [r for r in before["rows"] if r["model"] not in names] + rows
        # A run whose networks were all measured again here is replaced by this one.
        runs = [r for r in before["runs"] if not (r.get("models") and set(r["models"]) <= names)] + runs
    text = table(rows)
    print(json.dumps(meta, indent=1))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
        (out / "table.md").write_text(text + "\n")



if __name__ == "__main__":
    main()
