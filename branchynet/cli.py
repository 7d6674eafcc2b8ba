"""The ``branchynet`` command: demo, train, calibrate, bench, build, info, serve."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
from pathlib import Path

import torch

from . import _cli_args as check
from .config import ExitConfig
from .deploy.cli import add_export
from .tables import markdown_table

MODEL_CHOICES = ("b-lenet", "b-alexnet", "b-resnet110")


_int_at_least = check.int_at_least
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


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def _int_list(text: str) -> list:
    """Comma-separated positive integers, e.g. ``1,8,64``."""
    return [_positive_int(t) for t in text.split(",")]


def _name_list(text: str) -> list:
    """Comma-separated module names, e.g. ``layer1,layer2``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _float_list(text: str) -> list:
    """Comma-separated finite numbers >= 0, e.g. the joint loss's ``1,0.5``."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 <= v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers >= 0, got {text!r}")
    return values


def _build(name: str, splits):
    from .demo import build_for_data

    with _data_mismatch_exits():
        return build_for_data(name, splits)


def _check_fits(model, splits, what: str) -> None:
    from .demo import check_fits

    with _data_mismatch_exits():
        check_fits(model, splits, what)


@contextlib.contextmanager
def _data_mismatch_exits():
    """A model that cannot take the data set is the user's choice of flags: a message."""
    from .demo import DataMismatch

    try:
        yield
    except DataMismatch as err:
        raise SystemExit(f"error: {err}") from None


def _open_checkpoint(args):
    """``(model in eval mode, extra, data set name or None)``, reading the file once."""
    from .checkpoint import build_from_checkpoint, read_checkpoint

    raw = read_checkpoint(args.checkpoint, map_location=args.device)
    extra = raw.get("extra") or {}
    return build_from_checkpoint(raw, args.checkpoint).eval(), extra, args.dataset or extra.get("dataset")


# --- demo ------------------------------------------------------------------------------

def _print_table_i(table, dataset: str, device: torch.device, repeats: int) -> None:
    from .demo import TABLE_I_HEAD

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    print()
    print(f"Table I on this machine ({device.type}: {dev_name}, {torch.get_num_threads()} threads, "
          f"exit-op backend {table.backend}, "
          f"torch {torch.__version__}); {dataset} test split, {table.n_test} samples; "
          f"times are medians of {repeats} runs (B=1 over {table.n_b1} samples)")
    print(markdown_table(TABLE_I_HEAD, table.rows()))


def run_demo(args) -> dict:
    """Train a B-model and its backbone-only twin, calibrate, time, print Table I."""
    from .checkpoint import save_checkpoint
    from .data import default_dataset_for
    from .demo import calibrate_and_write, demo_splits, measure_table_i, split_tensors, train_with_twin
    from .distributed import init_from_env, is_main
    from .train import TrainSettings

    device = init_from_env(args.device).device
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = args.dataset or default_dataset_for(args.model.replace("-", "_"))
    out = Path(args.out)  # created by the calibration step, which writes there first
    splits = demo_splits(dataset, args.data_root, seed=args.seed, limit=args.limit)
    say = print if is_main() else (lambda *a, **k: None)
    say(f"data: {dataset}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
        f"{splits.num_classes} classes, input {tuple(splits.input_shape)}", flush=True)
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=device,
                             seed=args.seed, progress=not args.quiet)
    with _data_mismatch_exits():
        model, baseline = train_with_twin(args.model, splits, settings, say=say)
    cal = calibrate_and_write(model, splits, device, out, max_drop=args.max_drop)
    if not is_main():  # rank 0 alone times the engine and writes the results
        return {}
    thresholds = cal.chosen["thresholds"]
    model.exit_config.thresholds = thresholds
    save_checkpoint(out / "model.pt", model, extra={"dataset": dataset, "seed": args.seed})
    x, y = (t.to(device) for t in split_tensors(splits.test))
    table = measure_table_i(model, baseline, x, y, thresholds, name=args.model, device=device,
                            backend=args.backend, compile=args.compile, time_samples=args.time_samples,
                            repeats=args.repeats)
    if table.compile_seconds is not None:
        print(f"compiled in {table.compile_seconds:.0f} s", flush=True)
    _print_table_i(table, dataset, device, args.repeats)
    print(f"\ncalibration: {len(cal.rows)} threshold combinations on the validation split "
          f"(target: at most {100 * args.max_drop:.1f} pt below the final exit, "
          f"{'met' if cal.target['met'] else 'NOT met'}); "
          f"sweep in {out / 'calibration.csv'}, plot in {out / 'pareto.png'}, model in {out / 'model.pt'}")
    summary = table.summary(dataset, args.model)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- train / calibrate / bench / info --------------------------------------------------

def run_train(args) -> None:
    from .data import default_dataset_for, load_dataset
    from .distributed import init_from_env, is_main
    from .train import TrainSettings, evaluate, train

    if args.arch is None and (args.after or args.pretrained):
        raise SystemExit("error: --after and --pretrained go with --arch torchvision:NAME")
    device = init_from_env(args.device).device
    dataset = args.dataset or ("digits" if args.arch else default_dataset_for(args.model.replace("-", "_")))
    splits = load_dataset(dataset, args.data_root, seed=args.seed)
    # The initial weights are part of the run: seeded here, not by train(), which comes
    # after the model is built.
    torch.manual_seed(args.seed)
    model = (_build(args.model, splits) if args.arch is None else _build_arch(args, splits)).to(device)
    if args.weights:
        if len(args.weights) != model.num_exits:
            raise SystemExit(f"error: --weights needs {model.num_exits} values (one per exit of this "
                             f"model), got {len(args.weights)}: {','.join(map(str, args.weights))}")
        model.exit_config = ExitConfig(model.num_exits, weights=args.weights)
    # One file: the weights and the training state (to --resume), plus the data set the
    # later commands need, saved after every epoch.
    train(model, splits, TrainSettings(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=device, seed=args.seed,
        checkpoint=args.out, resume=args.resume, progress=not args.quiet, main_first_epochs=args.main_first,
        extra={"dataset": dataset, "seed": args.seed}, amp=args.amp, freeze=args.freeze, distill=args.distill))
    acc = evaluate(model, splits.test, device=device)
    if is_main():
        print(json.dumps(acc, indent=2, default=float))
        print(f"saved {args.out}")


def _build_arch(args, splits):
    """``--arch torchvision:NAME --after a,b``: the model with exits after those modules."""
    from .models.attach import torchvision_exits

    kind, _, name = args.arch.partition(":")
    if kind not in ("torchvision", "hf") or not name:
        raise SystemExit(f"error: --arch must be torchvision:NAME (e.g. torchvision:resnet18) or "
                         f"hf:PATH_OR_CONFIG (a local Hugging Face model directory or config.json), got {args.arch!r}")
    if not args.after:
        raise SystemExit("error: --arch needs --after, the modules to put exits after (e.g. layer1,layer2)")
    build = torchvision_exits
    if kind == "hf":
        from .models.hf import hf_exits as build
    try:
        return build(name, args.after, splits.num_classes, splits.input_shape,
                     weights=args.pretrained, branch=args.branch)
    except (ImportError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None


def run_calibrate(args) -> None:
    from .calibrate import TargetUnreachable
    from .checkpoint import CheckpointError, update_checkpoint
    from .data import load_dataset
    from .demo import calibrate_and_write
    from .distributed import init_from_env

    args.device = str(init_from_env(args.device).device)
    model, extra, dataset = _open_checkpoint(args)
    why = check.cannot_write(Path(args.checkpoint), "file") if args.write else None
    if why:  # --write rewrites the checkpoint after the calibration: known now
        raise CheckpointError(f"--write: {why}")
    if dataset is None:
        raise SystemExit("error: the checkpoint does not name its data set: pass --dataset")
    splits = load_dataset(dataset, args.data_root, seed=extra.get("seed", 0))
    _check_fits(model, splits, args.checkpoint)
    out = Path(args.out)
    try:
        cal = calibrate_and_write(
            model, splits, args.device, out, batch_size=args.batch_size, test=splits.test,
            max_drop=args.max_drop, min_accuracy=args.min_accuracy, max_flops=args.max_flops,
            max_latency=None if args.max_latency_ms is None else args.max_latency_ms / 1e3,
            exit_fraction=args.exit_fraction, temperature=args.temperature)
    except (TargetUnreachable, ValueError) as err:  # the message gives the best reachable value
        # ... or says what in this model calibration cannot handle (e.g. fold a temperature)
        raise SystemExit(f"error: {err}") from None
    if cal is None:  # not rank 0: it writes the result
        return
    print(cal.summary())
    print(f"wrote {out / 'calibration.csv'} and {out / 'pareto.png'}")
    if args.write:
        model.exit_config.thresholds = cal.chosen["thresholds"]
        # only the weights (temperature folded) and the exit config change: the training
        # state stays, so `train --resume` still works
        update_checkpoint(args.checkpoint, model, temperature=cal.temperature)
        print(f"thresholds{' and temperatures' if cal.temperature else ''} written to {args.checkpoint}")


def run_bench(args) -> None:
    from .bench import bench_against_backbone
    from .data import load_dataset
    from .demo import fmt_ms, split_tensors

    model, extra, dataset = _open_checkpoint(args)
    if dataset:
        splits = load_dataset(dataset, args.data_root, seed=extra.get("seed", 0))
        _check_fits(model, splits, args.checkpoint)
        x, _ = split_tensors(splits.test)
    else:
        x = torch.randn(1024, *model.input_shape)
    x = x[: args.samples].to(args.device)
    too_big = [b for b in args.batch_sizes if b > x.shape[0]]
    if too_big:
        raise SystemExit(f"error: --batch-sizes {too_big} exceed the {x.shape[0]} samples available "
                         f"(--samples {args.samples})")
    bench = bench_against_backbone(model, x, args.batch_sizes, backend=args.backend, repeats=args.repeats,
                                   samples_b1=args.samples_b1, per_sample_b1=args.per_sample_b1)
    rows = [[r.batch, fmt_ms(r.backbone), fmt_ms(r.engine), f"{r.gain:.2f}x", f"{r.ideal_gain:.2f}x",
             f"{r.efficiency:.2f}"] for r in bench.rows]
    print(f"{args.checkpoint}: thresholds {bench.thresholds}, exits "
          f"{[round(100 * f, 1) for f in bench.exit_fractions]} %, device {args.device}, "
          f"backend {bench.backend}")
    print(markdown_table(["batch", "backbone ms/sample", "engine ms/sample", "gain", "ideal gain", "efficiency"],
                    rows))


def run_build(args) -> None:
    """Build the extension now instead of on first use (a no-op when it is there)."""
    from . import _build, ops

    if ops._EXT is not None and not args.force:
        print(f"branchynet._C is there: {_build.describe(_build.build_record())}")
        return
    if ops._EXT is not None:
        loaded = _build.describe(_build.build_record())
        code = _build.build_in_subprocess()  # this process cannot load a second one
        print(f"rebuilt in a new process. Processes that had loaded an extension (this one "
              f"had: {loaded}) keep it: restart them to use the new build. An installed "
              "ahead-of-time branchynet._C is loaded before any just-in-time build.")
        if code:
            raise SystemExit(code)
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


def run_selftest(args) -> None:
    from . import selftest

    code = selftest.main(args.device or None, args.backend or None, quick=args.quick)
    if code:
        raise SystemExit(code)  # any failed check: non-zero exit status


# --- parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchynet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_calibrate, _add_tools, _add_serve, add_export):
        add(sub)
    return p


def _common(sp, model=True) -> None:
    """The flags every data-set command takes."""
    if model:
        sp.add_argument("--model", default="b-lenet", choices=MODEL_CHOICES)
    sp.add_argument("--dataset", type=check.dataset, default=None,
                    help="mnist-5k (offline), digits (offline), mnist, fashion-mnist, cifar10 "
                         "(default: mnist-5k for b-lenet, cifar10 otherwise)")
    sp.add_argument("--data-root", default=None, help="folder with the standard data files")
    sp.add_argument("--device", type=check.device, default="cpu")
    sp.add_argument("--seed", type=int, default=0)


def _add_demo(sub) -> None:
    """``branchynet demo``."""
    d = sub.add_parser("demo", help="train, calibrate and print the paper's Table I for this machine")
    _common(d)
    d.add_argument("--epochs", type=_positive_int, default=15)
    d.add_argument("--lr", type=_positive_float, default=1e-3)
    d.add_argument("--batch-size", type=_positive_int, default=64)
    d.add_argument("--max-drop", type=_fraction, default=0.005, help="accuracy drop allowed (0.005 = 0.5 pt)")
    d.add_argument("--limit", type=_nonneg_int, default=0, help="use at most this many training samples")
    d.add_argument("--time-samples", type=_positive_int, default=500, help="samples timed one at a time (B=1)")
    d.add_argument("--repeats", type=_positive_int, default=5)
    d.add_argument("--threads", type=_nonneg_int, default=0, help="torch CPU threads (default: torch's)")
    d.add_argument("--backend", type=check.backend(allow_auto=True), default="auto",
                   help="exit-op backend: auto, cuda, triton, cpp, torch")
    d.add_argument("--compile", nargs="?", const=True, default=False,
                   choices=[True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="also time the engine and the backbone through torch.compile (optionally a mode); "
                        "adds two rows, compile time printed apart")
    d.add_argument("--out", type=check.writable("folder"), default="runs/demo")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run_demo)


def _add_train(sub) -> None:
    """``branchynet train``."""
    t = sub.add_parser("train", help="joint-loss training to a checkpoint")
    _common(t)
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--weights", type=_float_list, default=None,
                   help="joint-loss weights, comma separated, one per exit")
    t.add_argument("--main-first", type=_nonneg_int, default=0, help="epochs training the final exit alone first")
    t.add_argument("--arch", default=None, help="torchvision:NAME or hf:PATH_OR_CONFIG, exits on a torchvision "
                   "or local Hugging Face model (instead of --model)")
    t.add_argument("--after", type=_name_list, default=None, help="with --arch: module names to put exits after")
    t.add_argument("--pretrained", default=None, help="with --arch: a local state_dict file to start from")
    t.add_argument("--branch", default="auto", choices=("auto", "conv"), help="with --arch: side branch kind")
    t.add_argument("--freeze", default=None, choices=("backbone",), help="train only the side branches")
    t.add_argument("--distill", type=_fraction, default=0.0, help="self-distillation share (final exit teaches)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--amp", default=None, choices=("bf16", "fp16"),
                   help="mixed-precision training (torch.autocast; fp16 with a GradScaler); default off")
    t.add_argument("--out", type=check.writable("file"), default="runs/model.pt")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run_train)


def _add_calibrate(sub) -> None:
    """``branchynet calibrate``."""
    c = sub.add_parser("calibrate", help="sweep thresholds on the validation split")
    _common(c, model=False)
    c.add_argument("checkpoint")
    c.add_argument("--max-drop", type=_fraction, default=None,
                   help="accuracy drop allowed below the final exit (0.005 = 0.5 pt; the default "
                        "target when none is given)")
    c.add_argument("--min-accuracy", type=_fraction, default=None)
    c.add_argument("--max-flops", type=_positive_float, default=None,
                   help="expected FLOPs per sample, as a fraction of the backbone's (e.g. 0.4)")
    c.add_argument("--max-latency-ms", type=_positive_float, default=None,
                   help="ms per sample at --batch-size on --device (predicted, then timed)")
    c.add_argument("--batch-size", type=_positive_int, default=256, help="the engine's batch size")
    c.add_argument("--exit-fraction", type=_fraction, default=None,
                   help="share of samples leaving at the first branch (the paper's way)")
    c.add_argument("--temperature", action="store_true",
                   help="fit a temperature per exit (NLL on the validation split), folded into the branches")
    c.add_argument("--out", type=check.writable("folder"), default="runs/calibration")
    c.add_argument("--write", action="store_true",
                   help="store the chosen thresholds (and temperatures) in the checkpoint")
    c.set_defaults(func=run_calibrate)


def _add_tools(sub) -> None:
    """``branchynet bench``, ``build``, ``info``, ``selftest``."""
    b = sub.add_parser("bench", help="time a checkpoint against its backbone-only twin")
    _common(b, model=False)
    b.add_argument("checkpoint")
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 64, 256])
    b.add_argument("--backend", type=check.backend(allow_auto=True), default="auto")
    b.add_argument("--samples", type=_positive_int, default=1024)
    b.add_argument("--samples-b1", type=_positive_int, default=200)
    b.add_argument("--per-sample-b1", action="store_true", help="at B=1 time the per-sample mode")
    b.add_argument("--repeats", type=_positive_int, default=5)
    b.set_defaults(func=run_bench)

    bu = sub.add_parser("build", help="build the compiled exit-op kernels now (otherwise: on first use)")
    bu.add_argument("--force", action="store_true",
                    help="rebuild from scratch: a build that failed before, or one already there")
    bu.set_defaults(func=run_build)

    i = sub.add_parser("info", help="versions, devices and exit-op backends")
    i.set_defaults(func=run_info)

    st = sub.add_parser("selftest", help="check every exit-op backend on every device against the "
                                         "reference, and the engine against the per-sample rule")
    st.add_argument("--device", type=check.device, action="append",
                    help="only this device (repeatable; default: all)")
    st.add_argument("--backend", type=check.backend(allow_auto=False), action="append",
                    help="only this backend (repeatable; default: all)")
    st.add_argument("--quick", action="store_true", help="a smaller grid (fp32/fp16, 4 class counts)")
    st.set_defaults(func=run_selftest)


def _add_serve(sub) -> None:
    """``branchynet serve`` (branchynet/serving/cli.py)."""
    from .serving.cli import add_parser

    add_parser(sub)


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetUnavailable
    from .devices import DeviceUnavailable

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # torchrun: no rank leaves the group before all are done
    except KeyboardInterrupt:
        return 130
    except (CheckpointError, DatasetUnavailable, DeviceUnavailable) as err:
        # The user's file or data, not a bug: the message says what to do.
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
