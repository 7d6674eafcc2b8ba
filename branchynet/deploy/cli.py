"""``branchynet export CHECKPOINT --format onnx|pt2 --out DIR``: the subcommand, kept
here so that the CLI's own module only registers it."""

from __future__ import annotations

import argparse
import sys

from .._cli_args import int_at_least


def add_export(sub) -> None:
    """Register ``branchynet export`` on the CLI's subparsers."""
    e = sub.add_parser("export", help="export a checkpoint as one graph per exit (ONNX, torch.export, "
                                      "AOTInductor) with a manifest; run it with branchynet.deploy.load")
    e.add_argument("checkpoint")
    e.add_argument("--format", required=True, choices=("onnx", "pt2"))
    e.add_argument("--out", required=True, help="the directory to write (an earlier export there is replaced)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    e.add_argument("--device", default="cpu", help="export from (and with --aoti compile for) this device")
    e.add_argument("--aoti", action="store_true", help="with --format pt2: AOTInductor packages (slow to build)")
    e.add_argument("--max-batch", type=int, default=1024, help="the largest batch the graphs accept")
    e.add_argument("--patience", type=int_at_least(1), default=None,
                   help="export PABEE's patience rule with this P (agreeing exits in a row) instead of "
                        "the checkpoint's thresholds")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> None:
    from ..checkpoint import load_checkpoint
    from .exporter import ExportError, export

    if args.aoti and args.format != "pt2":
        raise SystemExit("error: --aoti needs --format pt2")
    from ..patience import exit_rule

    model = load_checkpoint(args.checkpoint, map_location=args.device)
    try:
        path = export(model, args.out, args.format, device=args.device, opset=args.opset, aoti=args.aoti,
                      max_batch=args.max_batch, progress=not args.quiet, **exit_rule(args.patience))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"wrote {path.parent} ({model.num_exits} exits, {args.format}{' AOTInductor' if args.aoti else ''}); "
          f"run it with branchynet.deploy.load({str(path.parent)!r})")
