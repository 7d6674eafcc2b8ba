"""Run an exported BranchyNet: the engine's compaction loop over the exported graphs.

:func:`load` checks the directory against its manifest and returns a runner with the
engine's call and result (:class:`~branchynet.engine.ExitResult`). It imports no model
definition (``branchynet.models`` stays unimported): the graphs are all it runs.

One loop (:meth:`Runner.__call__`), as in the engine: exit graph n on the rows still in
flight, the exit decision, the survivors' state gathered for graph n + 1. The two
runtimes differ in how a graph runs and how the decision is taken:

- ONNX Runtime: arrays stay numpy on the host; the decision is the graph's own score
  against the threshold in the score's dtype (the engine's float rule), rows written and
  survivors compacted with numpy indexing;
- torch.export / AOTInductor: tensors stay on the device; the decision is this package's
  exit op (:func:`branchynet.ops.bind`, the engine's, on the graph's logits), and the
  survivors are gathered with its gather.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import PATIENCE_ID, check_thresholds, criterion_id
from ..patience import check_patience
from ..engine import ExitResult, _inference_mode
from ..ops._torch import _patience_streak
from .manifest import ManifestError, read_manifest

__all__ = ["load", "Runner"]


def load(path: str | Path, device: str | torch.device | None = None, providers: Sequence | None = None,
         threads: int | None = None) -> "Runner":
    """A runner for an export directory, after checking every file's sha256.

    Args:
        path: a directory written by :func:`branchynet.deploy.export` (or ``branchynet export``).
        device: where the pt2 graphs run (default: the device they were exported on;
            AOTInductor packages run only on the kind of device they were compiled for).
            For ONNX: ``"cuda"`` asks for the CUDA execution provider first.
        providers: ONNX Runtime execution providers (default: CPU, or CUDA then CPU
            for ``device="cuda"``).
        threads: ONNX Runtime's intra-op threads (default: its own choice); the pt2
            graphs use torch's (``torch.set_num_threads``).

    Raises:
        ManifestError: a file missing, changed or added, or a manifest from a newer format.
    """
    root = Path(path)
    manifest = read_manifest(root)
    backend = manifest.get("backend")
    if backend == "onnx":
        return _OnnxRunner(root, manifest, device, providers, threads)
    if backend in ("pt2", "aoti"):
        if providers is not None:
            raise ValueError("providers= is for ONNX Runtime; this directory holds pt2 programs")
        return _TorchRunner(root, manifest, device)
    raise ManifestError(f"{root / 'manifest.json'}: unknown backend {backend!r} (expected onnx, pt2 or aoti)")


class Runner:
    """Early exit over exported graphs; call it like :class:`~branchynet.EarlyExitEngine`.

    Attributes:
        manifest: the checked manifest (dict).
        num_exits, criterion, input_shape, dtype, max_batch: from the manifest.
        thresholds: ``T_1 .. T_{N-1}``; settable (the graphs do not hold them).
        patience: P of the patience criterion (None under the others); settable.

    A runtime subclass supplies what the loop calls: ``_input`` (checked input),
    ``_outputs`` / ``_result`` (the four output buffers of B rows, and the result made
    of them), ``_arange``, ``_run_graph(n, state)`` (exit graph n: the next state, then
    logits, score, entropy, pred), ``_exit`` (the decision: writes the leaving rows at
    their original rows, returns ``(survivors, survivor_rows, count)``) and ``_gather``.
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root, self.manifest = root, manifest
        try:
            self.num_exits = int(manifest["num_exits"])
            self.criterion = manifest["criterion"]
            self._cid = criterion_id(self.criterion, patience=True)
            self._patience = None
            if self._cid == PATIENCE_ID:
                self.patience = manifest.get("patience")
            self.input_shape = tuple(manifest["input"]["shape"])
            self.dtype = getattr(torch, manifest["input"]["dtype"])
            self.max_batch = int(manifest["input"]["max_batch"])
            self.num_classes = int(manifest["num_classes"])
            self.logits_dtype = getattr(torch, manifest["logits_dtype"])
            self._exits = manifest["exits"]
            self.thresholds = manifest["thresholds"]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ManifestError(f"{root / 'manifest.json'}: incomplete or invalid manifest "
                                f"({type(err).__name__}: {err})") from err
        if len(self._exits) != self.num_exits:
            raise ManifestError(f"{root / 'manifest.json'}: {len(self._exits)} exits listed, num_exits "
                                f"= {self.num_exits}")

    @property
    def patience(self) -> int | None:
        return self._patience

    @patience.setter
    def patience(self, value: int) -> None:
        if self._cid != PATIENCE_ID:
            raise ValueError(f"patience is for the patience criterion; this export's is {self.criterion!r}")
        self._patience = check_patience(value)

    def _threshold(self, n: int, last: bool) -> float:
        """Exit n's threshold for the exit rule: P under the patience criterion."""
        if last:
            return 0.0
        return float(self._patience) if self._cid == PATIENCE_ID else self._thresholds[n]

    @property
    def thresholds(self) -> tuple:
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Sequence[float]) -> None:
        self._thresholds = check_thresholds(value, self.num_exits)

    def _check_input(self, x) -> None:
        if tuple(x.shape[1:]) != self.input_shape or len(x.shape) != len(self.input_shape) + 1:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.input_shape))}], "
                             f"got {tuple(x.shape)}")
        if x.shape[0] > self.max_batch:
            raise ValueError(f"x has {x.shape[0]} rows; the graphs were exported for at most "
                             f"max_batch = {self.max_batch}")

    def __call__(self, x) -> ExitResult:
        """Batched early exit over the exported graphs.

        Args:
            x: [B, *input_shape] (B from 0 to max_batch), a torch tensor (or, for ONNX, a
                numpy array) of the exported dtype.

        Returns:
            :class:`~branchynet.engine.ExitResult` for every row, in input order.
        """
        x = self._input(x)
        b = x.shape[0]
        counts = [0] * self.num_exits
        out = self._outputs(b)
        if b == 0:
            return self._result(out, counts)
        rows, k, state = self._arange(b), b, (x,)
        last_n = self.num_exits - 1
        for n in range(self.num_exits):
            *state, z, score, entropy, pred = self._run_graph(n, state)
            survivors, survivor_rows, count = self._exit(n, z, score, entropy, pred, rows, out, n == last_n)
            if n == last_n:
                counts[n] = k
                break
            k_next = int(count)  # the one host read-back per exit
            counts[n], k = k - k_next, k_next
            if k == 0:
                break
            rows = survivor_rows[:k]
            state = self._gather(state, survivors[:k])
        return self._result(out, counts)


class _OnnxRunner(Runner):
    """ONNX Runtime sessions, numpy between them."""

    def __init__(self, root, manifest, device, providers, threads) -> None:
        super().__init__(root, manifest)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("running an ONNX export needs onnxruntime: pip install 'branchynet[export]'") from err
        if providers is None:
            cuda = device is not None and torch.device(device).type == "cuda"
            wanted = (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
            providers = [p for p in wanted if p in ort.get_available_providers()]
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self._sessions, self._inputs = [], []
        for e in self._exits:
            s = ort.InferenceSession(str(root / e["file"]), sess_options=opts, providers=list(providers))
            self._sessions.append(s)
            self._inputs.append([i.name for i in s.get_inputs()])
        self._np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        self._score_dtype = np.float64 if self.logits_dtype == torch.float64 else np.float32

    def _input(self, x):
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                raise ValueError(f"x is on {x.device}; ONNX Runtime takes host arrays: pass x.cpu()")
            x = x.detach().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a torch.Tensor or a numpy array, got {type(x).__name__}")
        self._check_input(x)
        if x.dtype != self._np_dtype:
            raise TypeError(f"x is {x.dtype} but the graphs were exported for {self._np_dtype}")
        return np.ascontiguousarray(x)

    def _outputs(self, b: int) -> list:
        logits_np = torch.empty(0, dtype=self.logits_dtype).numpy().dtype
        out = [np.empty((b, self.num_classes), logits_np), np.empty(b, np.int64), np.empty(b, np.int64),
               np.empty(b, np.float32)]
        if self._cid == PATIENCE_ID:
            out.append(np.empty((b, 2), np.int64))
        return out

    def _arange(self, b: int):
        return np.arange(b)

    def _run_graph(self, n: int, state):
        return self._sessions[n].run(None, dict(zip(self._inputs[n], state)))

    def _exit(self, n, z, score, entropy, pred, rows, out, last):
        if self._cid == PATIENCE_ID:
            # The exit op's patience rule, its PyTorch reference on views of the arrays:
            # each original row's (previous prediction, streak) in out[4], not read at
            # exit 0; a NaN row never leaves early.
            streak = _patience_streak(torch.from_numpy(out[4]), torch.from_numpy(rows), torch.from_numpy(pred),
                                      n).numpy()
            leave = np.ones(z.shape[0], dtype=bool) if last else (streak >= self._patience) & ~np.isnan(entropy)
        elif last:
            leave = np.ones(z.shape[0], dtype=bool)
        else:
            # The engine's rule: the score against the threshold rounded to the score's
            # dtype (float32 scores: float32(T)).
            leave = score < self._score_dtype(self.thresholds[n])
        go = np.flatnonzero(leave)
        stay = np.flatnonzero(~leave)
        dst = rows[go]
        out[0][dst] = z[go]
        out[1][dst] = pred[go]
        out[2][dst] = n
        out[3][dst] = entropy[go]
        return stay, rows[stay], stay.shape[0]

    def _gather(self, state, index):
        return [s[index] for s in state]

    def _result(self, out, counts) -> ExitResult:
        t = [torch.from_numpy(a) for a in out]
        return ExitResult(logits=t[0], pred=t[1], exit=t[2], entropy=t[3], counts=counts)


class _TorchRunner(Runner):
    """torch.export programs or AOTInductor packages, this package's exit op between them."""

    def __init__(self, root, manifest, device) -> None:
        super().__init__(root, manifest)
        from .. import ops

        exported_on = torch.device(manifest.get("device", "cpu"))
        self.device = torch.device(device) if device is not None else exported_on
        aoti = manifest["backend"] == "aoti"
        if aoti and self.device.type != exported_on.type:
            raise ValueError(f"device={self.device}: these AOTInductor packages were compiled for "
                             f"{exported_on.type}; export again with --device {self.device.type}")
        self._graphs = [self._load(root / e["file"], aoti, exported_on) for e in self._exits]
        self._op = ops.bind(self.device)
        self._aranges: dict = {}

    def _load(self, path: Path, aoti: bool, exported_on: torch.device):
        if aoti:
            package = torch._inductor.aoti_load_package(str(path))
            loader = getattr(package, "loader", None)
            if loader is None or not hasattr(loader, "run"):
                return package
            # The package's __call__ parses its input and output specs (JSON) on every
            # call, ~40 us at B = 1 on a 2-core Xeon (torch 2.13); the graphs take and
            # return flat tuples of tensors, so the loader's run needs no spec.
            return lambda *state: loader.run(list(state))
        program = torch.export.load(path)
        if self.device != exported_on:
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, self.device)
        return program.module()

    def _input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        self._check_input(x)
        if x.dtype != self.dtype:
            raise TypeError(f"x is {x.dtype} but the graphs were exported for {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the runner is on {self.device}; move one of them")
        return x

    def __call__(self, x) -> ExitResult:
        with _inference_mode(True):  # the engine's guard: ~1.5 us less than the context manager
            return super().__call__(x)

    def _outputs(self, b: int) -> list:
        return []  # the first exit op allocates them (the engine's way)

    def _arange(self, b: int):
        r = self._aranges.get(b)
        if r is None:
            if len(self._aranges) >= 64:
                self._aranges.clear()
            r = self._aranges[b] = torch.arange(b, device=self.device)
        return r

    def _run_graph(self, n: int, state):
        return self._graphs[n](*state)

    def _exit(self, n, z, score, entropy, pred, rows, out, last):
        return self._op.step(z, rows, self._threshold(n, last), n, out, self._cid, last)

    def _gather(self, state, index):
        return [self._op.gather(s, index) for s in state]

    def _result(self, out, counts) -> ExitResult:
        if not out:  # B = 0
            from ..ops._backends import new_outputs
            out = new_outputs(0, self.num_classes, self.logits_dtype, self.device)
        return ExitResult(logits=out[0], pred=out[1], exit=out[2], entropy=out[3], counts=counts)
