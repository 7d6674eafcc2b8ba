"""The ``branchynet`` command: demo, train, calibrate, bench, build, info."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from .config import ExitConfig

MODEL_CHOICES = ("b-lenet", "b-alexnet", "b-resnet110")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] (0.005 = 0.5 pt), got {v}")
    return v


def _int_list(text: str) -> list:
    """Comma-separated positive integers, e.g. ``1,8,64``."""
    return [_positive_int(t) for t in text.split(",")]


def _float_list(text: str) -> list:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _model_kwargs(name: str, splits) -> dict:
    kw = {"num_classes": splits.num_classes}
    if name.replace("-", "_") == "b_lenet":
        kw["in_channels"] = splits.input_shape[0]
    return kw


def _build(name: str, splits, exit_config: ExitConfig | None = None):
    from .models.registry import build_model

    model = build_model(name, **_model_kwargs(name, splits))
    if tuple(model.input_shape) != tuple(splits.input_shape):
        raise SystemExit(
            f"error: {name} takes inputs of shape {model.input_shape} but data set {splits.name!r} "
            f"has {tuple(splits.input_shape)}; pick a matching --dataset")
    if exit_config is not None:
        model.exit_config = exit_config
    return model


def _tensors(ds, limit=None):
    x, y = ds.tensors if hasattr(ds, "tensors") else map(torch.stack, zip(*[ds[i] for i in range(len(ds))]))
    return (x[:limit], y[:limit]) if limit else (x, y)


def _fmt_ms(t):
    return f"{t * 1e3:.3f}"


def _calibrate_and_write(model, splits, device, out: Path, *, max_drop=None, min_accuracy=None):
    """Sweep thresholds on the validation split with measured path times (batch of 256);
    write the sweep (CSV) and the Pareto plot (PNG) into ``out``."""
    from .calibrate import calibrate, measure_path_times

    xv, _ = _tensors(splits.val)
    path_times = measure_path_times(model, xv[:256].to(device), repeats=5)
    cal = calibrate(model, splits.val, max_drop=max_drop, min_accuracy=min_accuracy,
                    path_times=path_times, device=device)
    out.mkdir(parents=True, exist_ok=True)
    cal.to_csv(out / "calibration.csv")
    try:
        cal.plot(out / "pareto.png")
    except ImportError:
        print("matplotlib is not installed: no Pareto plot (pip install matplotlib)")
    return cal


def _open_checkpoint(args):
    """``(model in eval mode, extra, data set name or None)``, reading the file once."""
    from .checkpoint import build_from_checkpoint, read_checkpoint

    raw = read_checkpoint(args.checkpoint, map_location=args.device)
    extra = raw.get("extra") or {}
    return build_from_checkpoint(raw, args.checkpoint).eval(), extra, args.dataset or extra.get("dataset")


# --- demo ------------------------------------------------------------------------------

def run_demo(args) -> dict:
    """Train a B-model and its backbone-only twin, calibrate, time, print Table I."""
    from .checkpoint import save_checkpoint
    from .data import default_dataset_for, load_dataset
    from .engine import EarlyExitEngine
    from .flops import profile_flops
    from .timing import time_fn, time_per_sample
    from .train import train

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model
    dataset = args.dataset or default_dataset_for(name.replace("-", "_"))
    out = Path(args.out)  # created by the calibration step, which writes there first
    splits = load_dataset(dataset, args.data_root, seed=args.seed)
    if args.limit:
        splits.train = torch.utils.data.Subset(splits.train, range(min(args.limit, len(splits.train))))
    print(f"data: {dataset}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
          f"{splits.num_classes} classes, input {tuple(splits.input_shape)}", flush=True)
    device = torch.device(args.device)

    model = _build(name, splits).to(device)
    n = model.num_exits
    print(f"training {name} ({n} exits, joint loss) for {args.epochs} epochs", flush=True)
    train(model, splits, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=device,
          seed=args.seed, progress=not args.quiet)
    twin = _build(name, splits, ExitConfig(n, weights=[0.0] * (n - 1) + [1.0])).to(device)
    print(f"training its backbone-only twin (final exit only) for {args.epochs} epochs", flush=True)
    train(twin, splits, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=device,
          seed=args.seed, progress=not args.quiet)
    baseline = twin.backbone_only().eval()
    model.eval()

    cal = _calibrate_and_write(model, splits, device, out, max_drop=args.max_drop)
    thresholds = cal.chosen["thresholds"]
    model.exit_config.thresholds = thresholds
    save_checkpoint(out / "model.pt", model, extra={"dataset": dataset, "seed": args.seed})

    xt, yt = _tensors(splits.test)
    xt, yt = xt.to(device), yt.to(device)
    engine = EarlyExitEngine(model, thresholds, backend=args.backend)
    with torch.inference_mode():
        res = engine(xt)
        acc_b = float((res.pred == yt).float().mean())
        acc_base = float((baseline(xt).argmax(1) == yt).float().mean())
    fracs = res.exit_fractions
    ideal = profile_flops(model).ideal_speedup(fracs)

    n1 = min(args.time_samples, xt.shape[0])
    x1 = xt[:n1]
    t_base_1 = time_per_sample(baseline, x1, 1, repeats=args.repeats)
    # the paper's regime: one sample at a time through the exits it needs
    t_b_1 = time_fn(lambda: engine.per_sample(x1), repeats=args.repeats, device=device).scaled(1.0 / n1)
    t_base_256 = time_per_sample(baseline, xt, 256, repeats=args.repeats)
    t_b_256 = time_per_sample(engine, xt, 256, repeats=args.repeats)

    label = {"b-lenet": "LeNet", "b-alexnet": "AlexNet", "b-resnet110": "ResNet-110"}.get(
        name.replace("_", "-"), name)
    rows = [
        [label, f"{100 * acc_base:.2f}", _fmt_ms(t_base_1.median), "-", _fmt_ms(t_base_256.median), "-",
         "-", "-", "-"],
        ["B-" + label, f"{100 * acc_b:.2f}", _fmt_ms(t_b_1.median),
         f"{t_base_1.median / t_b_1.median:.2f}x", _fmt_ms(t_b_256.median),
         f"{t_base_256.median / t_b_256.median:.2f}x",
         ", ".join(f"{t:.4g}" for t in thresholds), ", ".join(f"{100 * f:.1f}" for f in fracs),
         f"{ideal:.2f}x"],
    ]
    head = ["network", "acc %", "ms/sample B=1", "gain B=1", "ms/sample B=256", "gain B=256",
            "T", "exit % per exit", "ideal gain (FLOPs)"]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    print()
    print(f"Table I on this machine ({device.type}: {dev_name}, {torch.get_num_threads()} threads, "
          f"exit-op backend {engine.backend_for(device)}, "
          f"torch {torch.__version__}); {dataset} test split, {xt.shape[0]} samples; "
          f"times are medians of {args.repeats} runs (B=1 over {n1} samples)")
    print(_markdown(head, rows))
    print(f"\ncalibration: {len(cal.rows)} threshold combinations on the validation split "
          f"(target: at most {100 * args.max_drop:.1f} pt below the final exit, "
          f"{'met' if cal.target['met'] else 'NOT met'}); "
          f"sweep in {out / 'calibration.csv'}, plot in {out / 'pareto.png'}, model in {out / 'model.pt'}")
    summary = {"dataset": dataset, "model": name, "acc_backbone": acc_base, "acc_branchy": acc_b,
               "thresholds": thresholds, "exit_fractions": fracs, "ideal_gain": ideal,
               "ms_b1": [t_base_1.median * 1e3, t_b_1.median * 1e3],
               "ms_b256": [t_base_256.median * 1e3, t_b_256.median * 1e3],
               "gain_b1": t_base_1.median / t_b_1.median, "gain_b256": t_base_256.median / t_b_256.median}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _markdown(head, rows) -> str:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


# --- train / calibrate / bench / info --------------------------------------------------

def run_train(args) -> None:
    from .data import default_dataset_for, load_dataset
    from .train import evaluate, train

    dataset = args.dataset or default_dataset_for(args.model.replace("-", "_"))
    splits = load_dataset(dataset, args.data_root, seed=args.seed)
    model = _build(args.model, splits).to(args.device)
    if args.weights:
        model.exit_config = ExitConfig(model.num_exits, weights=args.weights)
    # One file: the weights and the training state (to --resume), plus the data set the
    # later commands need, saved after every epoch.
    train(model, splits, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=args.device,
          seed=args.seed, checkpoint=args.out, resume=args.resume, progress=not args.quiet,
          main_first_epochs=args.main_first, extra={"dataset": dataset, "seed": args.seed})
    acc = evaluate(model, splits.test, device=args.device)
    print(json.dumps(acc, indent=2, default=float))
    print(f"saved {args.out}")


def run_calibrate(args) -> None:
    from .checkpoint import save_checkpoint
    from .data import load_dataset

    model, extra, dataset = _open_checkpoint(args)
    if dataset is None:
        raise SystemExit("error: the checkpoint does not name its data set: pass --dataset")
    splits = load_dataset(dataset, args.data_root, seed=extra.get("seed", 0))
    out = Path(args.out)
    cal = _calibrate_and_write(model, splits, args.device, out,
                               max_drop=None if args.min_accuracy is not None else args.max_drop,
                               min_accuracy=args.min_accuracy)
    c = cal.chosen
    print(f"final exit accuracy {100 * cal.final_accuracy:.2f} %; chosen thresholds {c['thresholds']}: "
          f"accuracy {100 * c['accuracy']:.2f} %, exits {[round(100 * f, 1) for f in c['exit_fractions']]} %, "
          f"ideal speedup {c['ideal_speedup']:.2f}x, target {'met' if cal.target['met'] else 'NOT met'}")
    print(f"wrote {out / 'calibration.csv'} and {out / 'pareto.png'}")
    if args.write:
        model.exit_config.thresholds = c["thresholds"]
        save_checkpoint(args.checkpoint, model, extra=extra)
        print(f"thresholds written to {args.checkpoint}")


def run_bench(args) -> None:
    from .data import load_dataset
    from .engine import EarlyExitEngine
    from .flops import profile_flops
    from .timing import time_per_sample

    model, extra, dataset = _open_checkpoint(args)
    if dataset:
        x, _ = _tensors(load_dataset(dataset, args.data_root, seed=extra.get("seed", 0)).test)
    else:
        x = torch.randn(1024, *model.input_shape)
    x = x[: args.samples].to(args.device)
    too_big = [b for b in args.batch_sizes if b > x.shape[0]]
    if too_big:
        raise SystemExit(f"error: --batch-sizes {too_big} exceed the {x.shape[0]} samples available "
                         f"(--samples {args.samples})")
    engine = EarlyExitEngine(model, backend=args.backend)
    baseline = model.backbone_only().eval()
    res = engine(x)
    ideal = profile_flops(model).ideal_speedup(res.exit_fractions)
    rows = []
    for b in args.batch_sizes:
        xs = x[: max(b, args.samples_b1 if b == 1 else x.shape[0])]
        tb = time_per_sample(baseline, xs, b, repeats=args.repeats)
        te = time_per_sample(engine.per_sample if b == 1 and args.per_sample_b1 else engine, xs, b,
                             repeats=args.repeats)
        rows.append([b, _fmt_ms(tb.median), _fmt_ms(te.median), f"{tb.median / te.median:.2f}x",
                     f"{ideal:.2f}x", f"{tb.median / te.median / ideal:.2f}"])
    print(f"{args.checkpoint}: thresholds {list(engine.thresholds)}, exits "
          f"{[round(100 * f, 1) for f in res.exit_fractions]} %, device {args.device}, "
          f"backend {engine.backend_for(args.device)}")
    print(_markdown(["batch", "backbone ms/sample", "engine ms/sample", "gain", "ideal gain", "efficiency"],
                    rows))


def run_build(args) -> None:
    """Build the extension now instead of on first use (a no-op when it is there)."""
    from . import _build, ops

    if ops._EXT is not None:
        print(f"branchynet._C is there: {_build.describe(_build.build_record())}")
        return
    mod, rec = _build.build(force=args.force)
    print(f"{'built' if mod is not None else 'no extension'}: {_build.describe(rec)}")
    if mod is None:
        raise SystemExit(1)


def run_info(args) -> None:
    from . import __version__, _build
    from .ops import backend_status

    info = {
        "branchynet": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info.update(backend_status())
    info["extension_build"] = _build.describe(_build.build_record())
    w = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k.ljust(w)}  {v}")


# --- parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchynet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model=True):
        if model:
            sp.add_argument("--model", default="b-lenet", choices=MODEL_CHOICES)
        sp.add_argument("--dataset", default=None,
                        help="mnist-5k (offline), digits (offline), mnist, fashion-mnist, cifar10 "
                             "(default: mnist-5k for b-lenet, cifar10 otherwise)")
        sp.add_argument("--data-root", default=None, help="folder with the standard data files")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("demo", help="train, calibrate and print the paper's Table I for this machine")
    common(d)
    d.add_argument("--epochs", type=_positive_int, default=15)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--batch-size", type=_positive_int, default=64)
    d.add_argument("--max-drop", type=_fraction, default=0.005, help="accuracy drop allowed (0.005 = 0.5 pt)")
    d.add_argument("--limit", type=_nonneg_int, default=0, help="use at most this many training samples")
    d.add_argument("--time-samples", type=_positive_int, default=500, help="samples timed one at a time (B=1)")
    d.add_argument("--repeats", type=_positive_int, default=5)
    d.add_argument("--threads", type=_nonneg_int, default=0, help="torch CPU threads (default: torch's)")
    d.add_argument("--backend", default="auto", help="exit-op backend: auto, cuda, triton, cpp, torch")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run_demo)

    t = sub.add_parser("train", help="joint-loss training to a checkpoint")
    common(t)
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--weights", type=_float_list, default=None, help="joint-loss weights, comma separated, one per exit")
    t.add_argument("--main-first", type=_nonneg_int, default=0, help="epochs training the final exit alone first")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--out", default="runs/model.pt")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run_train)

    c = sub.add_parser("calibrate", help="sweep thresholds on the validation split")
    common(c, model=False)
    c.add_argument("checkpoint")
    c.add_argument("--max-drop", type=_fraction, default=0.005)
    c.add_argument("--min-accuracy", type=_fraction, default=None)
    c.add_argument("--out", default="runs/calibration")
    c.add_argument("--write", action="store_true", help="store the chosen thresholds in the checkpoint")
    c.set_defaults(func=run_calibrate)

    b = sub.add_parser("bench", help="time a checkpoint against its backbone-only twin")
    common(b, model=False)
    b.add_argument("checkpoint")
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 64, 256])
    b.add_argument("--backend", default="auto")
    b.add_argument("--samples", type=_positive_int, default=1024)
    b.add_argument("--samples-b1", type=_positive_int, default=200)
    b.add_argument("--per-sample-b1", action="store_true", help="at B=1 time the per-sample mode")
    b.add_argument("--repeats", type=_positive_int, default=5)
    b.set_defaults(func=run_bench)

    bu = sub.add_parser("build", help="build the compiled exit-op kernels now (otherwise: on first use)")
    bu.add_argument("--force", action="store_true", help="retry a build that failed before")
    bu.set_defaults(func=run_build)

    i = sub.add_parser("info", help="versions, devices and exit-op backends")
    i.set_defaults(func=run_info)
    return p


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetUnavailable

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (CheckpointError, DatasetUnavailable) as err:
        # The user's file or data, not a bug: the message says what to do.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
