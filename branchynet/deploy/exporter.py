"""Export a BranchyNet as one graph per exit (ONNX, torch.export, AOTInductor) plus a
manifest: the artifact :func:`branchynet.deploy.load` runs without the model's code.

Each exit's graph is stage n + branch n + the exit score (:class:`ExitGraph`), with a
dynamic batch dimension on every tensor, so the host loop can hand it the survivors of
the previous exit whatever their number. The early exit itself (threshold test, writing
the leaving rows, compacting the survivors) stays on the host, as in the engine: one
static graph per stage keeps the saving that a single graph with every exit would lose.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Sequence

import torch

from .graph import OUTPUTS, ExitGraph, flatten_state
from .manifest import MANIFEST, write_manifest

__all__ = ["export", "ExportError", "FORMATS"]

FORMATS = ("onnx", "pt2")
_EXAMPLE_ROWS = 2  # torch.export specialises a dimension whose example size is 0 or 1


class ExportError(ValueError):
    """The model or the arguments cannot be exported as asked."""


def export(model, out: str | Path, format: str = "onnx", *, thresholds: Sequence[float] | None = None,
           criterion: str | None = None, device: str | torch.device | None = None, opset: int | None = None,
           aoti: bool = False, example_input: torch.Tensor | None = None, max_batch: int = 1024,
           progress: bool = True, patience: int | None = None) -> Path:
    """Write one graph per exit and ``manifest.json`` to ``out``.

    Args:
        model: a :class:`~branchynet.BranchyNet` (put in eval mode).
        out: the directory (created; an earlier export there is replaced; any other
            non-empty directory is refused).
        format: ``"onnx"`` (``torch.onnx.export``, the torch.export-based exporter: needs
            ``onnx`` and ``onnxscript``, extra ``[export]``) or ``"pt2"`` (``torch.export``
            programs, or with ``aoti`` AOTInductor packages compiled for ``device``).
        thresholds, criterion: the exit rule written to the manifest (default: the
            model's ``exit_config``); thresholds can be changed on the runner later, the
            criterion is in the graphs. ``criterion="patience"`` (PABEE) with
            ``patience=P``: the graphs give the prediction and entropy, the runner keeps
            each row's streak (P can be changed on the runner too).
        device: where the model is exported from (and, for ``aoti``, compiled for);
            default: the model's device.
        opset: ONNX opset version (default: the exporter's).
        aoti: compile each exit with AOTInductor (``format="pt2"`` only; minutes on a
            small CPU).
        example_input: [B, ...] an input batch; default: standard normal rows of the
            model's ``input_shape``.
        max_batch: the largest batch the graphs accept (the dynamic dimension's bound).
        progress: a tqdm bar over the exits.

    Returns:
        The path of the manifest.
    """
    from ..engine import EarlyExitEngine  # checks the model as the engine does

    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    if aoti and format != "pt2":
        raise ExportError("aoti=True compiles torch.export programs: use it with format='pt2'")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
        raise ExportError(f"max_batch must be an int >= 2, got {max_batch!r}")
    engine = EarlyExitEngine(model, thresholds=thresholds, criterion=criterion, patience=patience)
    if device is not None:
        model.to(device)
    x = _example(model, example_input)
    out = _prepare(Path(out))
    graphs, states = _exit_graphs(model, engine, x)
    files = []
    bar = _bar(len(graphs), progress, f"export {format}{' (AOTInductor)' if aoti else ''}")
    for n, (graph, state) in enumerate(zip(graphs, states)):
        program = _export_program(graph, state, max_batch, n)
        name = f"exit{n}.{format}"
        if format == "onnx":
            opset = _write_onnx(program, state, out / name, opset, n)
        elif aoti:
            torch._inductor.aoti_compile_and_package(program, package_path=str(out / name))
        else:
            torch.export.save(program, out / name)
        files.append(name)
        bar.update(1)
    bar.close()
    return write_manifest(out, _body(model, engine, x, graphs, states, files, format, aoti, opset, max_batch))


def _example(model, x: torch.Tensor | None) -> torch.Tensor:
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    if x is None:
        if model.input_shape is None:
            raise ExportError("the model has no input_shape: pass example_input [B, ...]")
        g = torch.Generator().manual_seed(0)
        return torch.randn((_EXAMPLE_ROWS, *model.input_shape), generator=g).to(dev, dtype)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ExportError(f"example_input must be a tensor [B, ...] with B >= 1, got {x!r:.80}")
    if x.shape[0] < _EXAMPLE_ROWS:
        x = x[:1].expand(_EXAMPLE_ROWS, *x.shape[1:]).contiguous()
    return x.to(dev)


def _prepare(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ExportError(f"out must be a directory, {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ExportError(f"out: {out} is not empty and holds no earlier export; choose an empty directory")
        shutil.rmtree(out)  # an earlier export: its files would be listed in the new manifest
    out.mkdir(parents=True, exist_ok=True)
    return out


@torch.no_grad()
def _exit_graphs(model, engine, x: torch.Tensor):
    """The exit graphs and the example state each one takes (one eager pass)."""
    graphs, states = [], []
    h = x
    last = model.num_exits - 1
    # Patience has no score: its graphs return the entropy's (what the op writes).
    cid = 0 if engine.criterion == "patience" else engine._cid
    for n, (stage, branch) in enumerate(zip(model.stages, model.branches)):
        state = flatten_state(h, f"the input of stage {n}")
        packed = None if isinstance(h, torch.Tensor) else len(state)
        graphs.append(ExitGraph(stage, branch, cid, n == last, packed).eval())
        states.append(state)
        h = stage(h)
        z = branch(h)
        if z.dim() != 2:
            raise ExportError(f"branch {n} must return logits [B, C], got shape {tuple(z.shape)}")
    return graphs, states


def _export_program(graph: ExitGraph, state: tuple, max_batch: int, n: int):
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        # forward(*state): its dynamic shapes are one tuple, a dict per state tensor.
        return torch.export.export(graph, state, dynamic_shapes=(tuple({0: batch} for _ in state),))
    except Exception as err:
        raise ExportError(f"exit {n}: torch.export failed on stage {n} + branch {n} with a dynamic batch "
                          f"dimension ({type(err).__name__}: {str(err)[:2000]})") from err


def _write_onnx(program, state: tuple, path: Path, opset: int | None, n: int) -> int:
    """Write exit n's graph as ONNX (weights in a ``.data`` file beside it); returns the
    opset the file declares."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; say so before it does)
    except ImportError as err:
        raise ImportError("format='onnx' needs onnx and onnxscript: pip install 'branchynet[export]'") from err
    n_out = len(program.graph_signature.user_outputs)
    inputs = ["x"] if n == 0 and len(state) == 1 else [f"state{i}" for i in range(len(state))]
    outputs = [f"next{i}" for i in range(n_out - len(OUTPUTS))] + list(OUTPUTS)
    kwargs = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(program, (), str(path), input_names=inputs, output_names=outputs, dynamo=True,
                      external_data=True, verbose=False, **kwargs)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def _body(model, engine, x, graphs, states, files, format, aoti, opset, max_batch) -> dict:
    with torch.no_grad():
        z = model.branches[0](model.stages[0](x[:1]))
    exits = []
    for graph, state, name in zip(graphs, states, files):
        exits.append({"file": name, "state_in": len(state), "packed": graph.packed})
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    from .. import __version__
    versions["branchynet"] = __version__
    if format == "onnx":
        import onnx
        versions["onnx"] = onnx.__version__
        versions["opset"] = opset
    return {
        "backend": "aoti" if aoti else format,
        "num_exits": model.num_exits,
        "criterion": engine.criterion,
        "thresholds": list(engine.thresholds),
        "patience": engine.patience if engine.criterion == "patience" else None,
        "num_classes": int(z.shape[1]),
        "logits_dtype": str(z.dtype).removeprefix("torch."),
        "input": {"shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch."),
                  "max_batch": max_batch},
        "device": str(x.device),
        "exits": exits,
        "versions": versions,
    }


def _bar(total: int, progress: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the demo extra; without it, no bar
        progress = False
    if not progress:
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="exit")
