"""Batched early-exit inference.

Every sample leaves at the first side branch whose score (entropy by default) is below
that branch's threshold; the final classifier takes every sample left. After each exit
the exit op writes the leaving samples' results to their original rows and compacts the
survivors on the device; the engine reads back one number (the survivor count) and
gathers the survivors' features, so deeper stages run only on unresolved samples.

One loop (:meth:`EarlyExitEngine._run`) serves every mode; the modes differ only in how
a stage's *region* (stage n, branch n, exit op n) is built:

- eager: the modules and the bound exit op (:func:`branchynet.ops.bind`), as they are;
- ``compile=``: stage + branch + exit op as one graph for a dynamic batch dimension (the
  exit op is the dispatcher op, traced through its fake; an overriding ``backend`` that
  the dispatcher would not run on the device stays outside the graph);
- ``buckets``: stage + branch as one static graph per bucket size, on rows padded up to
  it (CUDA graphs through ``mode="reduce-overhead"``); the exit op runs on the real rows.

A region takes ``(h, rows, out)`` and returns ``(h, (survivors, survivor_rows, count))``;
``int(count)`` is the one host read-back per exit. How the stages are compiled (options,
warm-up sizes) is in :mod:`branchynet._compile`. (Over 500 lines: one class, half of it
argument checks and the docstrings of its public arguments.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Sequence

import torch

from ._compile import check_buckets, compile_kwargs, first_stage_inputs, own_code, warm_counts
from .config import PATIENCE_ID, check_thresholds, criterion_id
from .ops import bind, resolve_backend
from .ops._backends import new_outputs
from .patience import check_patience
from .state import check_state, first_tensor, gather_state, slice_state, state_input

if TYPE_CHECKING:
    from .models.branchynet import BranchyNet

__all__ = ["EarlyExitEngine", "ExitResult"]


@dataclass
class ExitResult:
    """The answer for every input row, in input order.

    Attributes:
        logits: [B, C] the logits of the exit each sample took (dtype of the model's output).
        pred: [B] int64 predicted class.
        exit: [B] int64 0-based index of the exit taken.
        entropy: [B] float32 softmax entropy at that exit (NaN for NaN logits).
        counts: N ints, how many samples left at each exit (sums to B).
    """

    logits: torch.Tensor
    pred: torch.Tensor
    exit: torch.Tensor
    entropy: torch.Tensor
    counts: list

    @property
    def exit_fractions(self) -> list:
        """Fraction of the batch leaving at each exit."""
        total = sum(self.counts)
        return [c / total if total else 0.0 for c in self.counts]


class EarlyExitEngine:
    """Early-exit inference for a :class:`~branchynet.BranchyNet`.

    Args:
        model: the trained BranchyNet; the engine puts it in eval mode.
        thresholds: ``T_1 .. T_{N-1}`` for the side branches (default: the model's
            ``exit_config.thresholds``). Each >= 0; a sample leaves at exit n when its
            score is strictly below ``T_n``.
        backend: exit-op backend, ``"auto"`` (cuda > triton > torch on a GPU, cpp > torch
            on the CPU), ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"``.
        criterion: ``"entropy"`` (the paper's), ``"max_prob"`` or ``"margin"``
            (default: the model's ``exit_config.criterion``).
        compile: ``False`` (eager), ``True`` (``torch.compile``'s default mode), a mode
            (``"default"``, ``"reduce-overhead"``: CUDA graphs on a GPU,
            ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``) or a dict of
            ``torch.compile`` keyword arguments (e.g. ``{"backend": "aot_eager"}``). Each
            stage is compiled with its branch and its exit op (a registered op with a
            fake: no graph break) once, for a dynamic batch dimension, so compaction does
            not recompile; see :meth:`warmup`. Changing ``thresholds`` recompiles.
        buckets: pad the rows a stage sees up to a bucket size, so one static graph per
            bucket serves every survivor count (what CUDA graphs need): ``None`` (on for
            ``"reduce-overhead"``, off otherwise), ``True`` (powers of two), ``False``, or
            a sequence of sizes (counts above the largest are padded to a multiple of
            it). Padded rows never reach the exit op: they write no output and are not
            counted. Needs ``compile``.
        patience: P of ``criterion="patience"`` (PABEE): a sample leaves at the first
            side exit whose prediction equals that of the P exits before it
            (:mod:`branchynet.patience`); the thresholds are not used. The exit op
            decides it on every backend, compiled stages and buckets included.

    Example:
        >>> engine = EarlyExitEngine(model, thresholds=[0.05])
        >>> res = engine(x)          # x [B, 1, 28, 28]
        >>> res.pred, res.exit, res.counts
    """

    def __init__(
        self,
        model: BranchyNet,
        thresholds: Sequence[float] | None = None,
        backend: str = "auto",
        criterion: str | None = None,
        compile: bool | str | dict = False,
        buckets: bool | Sequence[int] | None = None,
        patience: int | None = None,
    ) -> None:
        # Imported here: ExitResult (branchynet.deploy's result too) needs no model class.
        from .models.branchynet import BranchyNet

        if not isinstance(model, BranchyNet):
            raise TypeError(f"model must be a branchynet.BranchyNet, got {type(model).__name__}")
        self.model = model.eval()
        self.num_exits = model.num_exits
        # Stages that pass a tuple or dict of tensors (exits on an exported graph): calls
        # take the state path even with one tensor in.
        self._multi_model = bool(getattr(model, "multi_tensor", False))
        self.patience = patience
        cfg = model.exit_config
        self.thresholds = cfg.thresholds if thresholds is None else thresholds
        self.criterion = cfg.criterion if criterion is None else criterion
        self._compile = compile_kwargs(compile)
        self._buckets = check_buckets(buckets, self._compile)
        # Checked once here, re-read only when a call's input disagrees with it: the
        # parameter objects survive model.to() / .double(), so its device and dtype follow.
        self._param = self._first_tensor()
        self._aranges: dict = {}  # (B, device) -> arange(B): read-only row maps, reused
        self._regions: dict = {}  # device (eager) or (device, True) -> (regions, gather)
        self._static: dict = {}  # exit -> static-shape compiled stage + branch (buckets)
        self._specs: dict = {}  # (device, dtype, autocast) -> (C, logits dtype), checked once
        self.backend = backend

    @property
    def criterion(self) -> str:
        return self._criterion

    @criterion.setter
    def criterion(self, value: str) -> None:
        if value == "patience":
            check_patience(self.patience)
            # The exit op keeps each row's streak and compares it with P, every side
            # exit's threshold; the leaving rows' entropy is written as for the others.
            self._cid, self._patience = PATIENCE_ID, self.patience
        else:
            self._cid, self._patience = criterion_id(value), None
        self._criterion = value
        self._regions = {}  # they hold the criterion (a graph's constant)

    @property
    def patience(self) -> int | None:
        """P of the patience criterion (None: not set)."""
        return self._patience_p

    @patience.setter
    def patience(self, value: int | None) -> None:
        self._patience_p = None if value is None else check_patience(value)
        if getattr(self, "_criterion", None) == "patience":
            self.criterion = "patience"

    @property
    def compile_options(self) -> dict | None:
        """The ``torch.compile`` keyword arguments of the stages (None: eager)."""
        return None if self._compile is None else dict(self._compile)

    @property
    def buckets(self):
        """The padding rule: None (off), ``"pow2"`` or a tuple of bucket sizes."""
        return self._buckets

    # -- configuration -------------------------------------------------------------------

    @property
    def thresholds(self) -> tuple:
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Sequence[float]) -> None:
        self._thresholds = check_thresholds(value, self.num_exits)
        # The regions hold the thresholds: a dynamic-batch graph as constants (a float
        # argument would be guarded on its value anyway), so it is rebuilt with fresh code
        # objects rather than piling up recompiles on the old ones. The static graphs of
        # buckets do not hold them and are kept.
        self._regions = {}

    @property
    def backend(self) -> str:
        """The exit-op backend asked for (``"auto"`` or a name); see :meth:`backend_for`."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value != "auto":
            # Refuse an unknown or unavailable backend now, not at the next call.
            resolve_backend(value, self._device())
        self._backend = value
        self._ops: dict = {}  # device -> the bound exit op (branchynet.ops.ExitOp)
        self._regions = {}

    def backend_for(self, device: torch.device | str) -> str:
        """The backend that runs the exit op for inputs on ``device``."""
        return self._op(torch.device(device)).backend

    def _op(self, device: torch.device):
        # Resolved once per device: the lookup costs ~10 us, a B=1 LeNet sample ~200 us.
        op = self._ops.get(device)
        if op is None:
            op = self._ops[device] = bind(device, self._backend)
        return op

    def _first_tensor(self) -> torch.Tensor | None:
        p = next(self.model.parameters(), None)
        return p if p is not None else next(self.model.buffers(), None)

    def _device(self) -> torch.device:
        p = self._first_tensor()
        return p.device if p is not None else torch.device("cpu")

    def _rows(self, b: int, device: torch.device) -> torch.Tensor:
        # Every call starts from rows 0..B-1; the ops only read them, so one arange per
        # (B, device) serves every call (~1 us saved at B = 1).
        key = (b, device)
        r = self._aranges.get(key)
        if r is None:
            if len(self._aranges) >= 64:
                self._aranges.clear()
            r = self._aranges[key] = torch.arange(b, device=device)
        return r

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.model.training:
            # Dropout and batch-norm statistics would make the answers random.
            raise RuntimeError("the model is in training mode: call model.eval() before inference")
        # Fast path (~1 us instead of ~4): the input matches the cached parameter's device
        # and dtype and the model's input shape; anything else takes the full check below.
        p, shape = self._param, self.model.input_shape
        if (p is not None and x.dtype == p.dtype and x.device == p.device and x.is_floating_point()
                and (shape is None or x.shape[1:] == shape) and x.dim() >= 1):
            return
        self._param = self._first_tensor()  # the model may have changed (a module replaced)
        if shape is not None:
            if x.dim() != len(shape) + 1:
                raise ValueError(
                    f"x must have shape [B, {', '.join(map(str, shape))}] (rank {len(shape) + 1}), "
                    f"got {tuple(x.shape)}"
                )
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"x must have shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")
        elif x.dim() < 1:
            raise ValueError("x must have a batch dimension (rank >= 1)")
        p = self._param
        dev = p.device if p is not None else torch.device("cpu")
        if x.device != dev:
            raise ValueError(f"x is on {x.device} but the model is on {dev}; move one of them")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        # Under autocast the layers cast their inputs themselves; otherwise a mismatch
        # would fail deep inside the first stage with a less helpful message.
        if (p is not None and p.is_floating_point() and x.dtype != p.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x is {x.dtype} but the model's parameters are {p.dtype}; "
                            f"convert one of them (or run under torch.autocast)")

    # -- inference -----------------------------------------------------------------------

    def __call__(self, x: torch.Tensor | tuple | dict | None = None, /, **inputs) -> ExitResult:
        """Batched early exit.

        Args:
            x: [B, ...] input batch (B may be 0), on the model's device; or a tuple or
                dict of tensors (the first tensor gives B), for stages that carry several.
            **inputs: the model's own keyword arguments instead of ``x`` (e.g.
                ``input_ids=[B, S], attention_mask=[B, S]`` for an exported Transformer).

        Returns:
            :class:`ExitResult` for every row, in input order.
        """
        if inputs or self._multi_model or not isinstance(x, torch.Tensor):
            if len(inputs) == 1 and "x" in inputs and x is None and not self._multi_model:
                return self(inputs["x"])  # engine(x=...), as before keyword arguments
            return self._call_state(state_input(x, inputs))
        self._check_input(x)
        with _inference_mode(True):
            if self._compile is None or x.shape[0] == 0:
                return self._run(x, self._plan(x.device, False), [])
            c, dtype = self._spec(x)
            out = self._new_outputs(x.shape[0], c, dtype, x.device)
            if self._buckets is None:
                return self._run(x, self._plan(x.device, True), out)
            if self._cudagraphs():
                torch.compiler.cudagraph_mark_step_begin()
            return self._run(x, self._plan(x.device, True), out, padded=True)

    def _new_outputs(self, b: int, c: int, dtype: torch.dtype, device: torch.device) -> list:
        """The exit op's buffers for a compiled call, the patience state among them."""
        return new_outputs(b, c, dtype, device, self._patience is not None)

    def _call_state(self, h) -> ExitResult:
        """:meth:`__call__` for a state of several tensors: the same loop and regions,
        with :func:`~branchynet.state.gather_state` as the gather."""
        if self.model.training:
            raise RuntimeError("the model is in training mode: call model.eval() before inference")
        b, dev = check_state(h, self._device())
        rows = self._rows(b, dev)
        with _inference_mode(True):
            if self._compile is None or b == 0:
                return self._run(h, self._plan(dev, False, True), [], rows=rows)
            c, dtype = self._spec(h)
            out = self._new_outputs(b, c, dtype, dev)
            padded = self._buckets is not None
            if padded and self._cudagraphs():
                torch.compiler.cudagraph_mark_step_begin()
            return self._run(h, self._plan(dev, True, True), out, padded=padded, rows=rows)

    def _run(self, x, plan: tuple, out: list, padded: bool = False, rows=None) -> ExitResult:
        """The one compaction loop: region n (stage, branch, exit op) on the rows still in
        flight, then the survivors gathered for region n + 1.

        Args:
            x: [B, ...] the batch.
            plan: ``(regions, gather)``: a region per exit, ``(h, rows, out) -> (h,
                (survivors, survivor_rows, count))``, and the bound op's gather.
            out: the four output buffers of B rows (and the patience state), or an
                empty list for the first exit op to fill.
            padded: the regions run static graphs: survivors are gathered padded up to
                their bucket (:meth:`_pad`).
            rows: ``arange(B)`` for a state of several tensors (default: from ``x``).
        """
        if rows is None:
            rows = self._rows(x.shape[0], x.device)
        b = rows.shape[0]
        regions, gather = plan
        last_n = self.num_exits - 1
        counts = [0] * self.num_exits
        h, k = (self._pad(x, rows, gather) if padded and self._bucket(b) != b else x), b
        for n, region in enumerate(regions):
            h, (survivors, survivor_rows, count) = region(h, rows, out)
            if n == last_n:
                counts[n] = k
                break
            k_next = int(count)  # the one host read-back per exit: the survivor count
            counts[n] = k - k_next
            k = k_next
            if k == 0:
                break
            rows = survivor_rows[:k]
            h = self._pad(h, survivors[:k], gather) if padded else gather(h, survivors[:k])
        return ExitResult(logits=out[0], pred=out[1], exit=out[2], entropy=out[3], counts=counts)

    # -- regions ---------------------------------------------------------------------------

    def _plan(self, device: torch.device, compiled: bool, state: bool = False) -> tuple:
        """``(regions, gather)`` for inputs on ``device``, built once (per thresholds).

        ``state``: the stages carry a tuple or dict of tensors: the gather is
        :func:`gather_state`, picked here once so that a one-tensor state keeps the
        bound op's gather and pays nothing for the others."""
        key = ((device, True) if compiled else device) if not state else (device, compiled, "state")
        plan = self._regions.get(key)
        if plan is None:
            op = self._op(device)
            if not compiled:
                make = self._eager_region
            else:
                make = self._compiled_region if self._buckets is None else self._bucket_region
            gather = op.gather if not state else partial(gather_state, op.gather)
            plan = self._regions[key] = ([make(n, op) for n in range(self.num_exits)], gather)
        return plan

    def _exit_args(self, n: int) -> tuple:
        """``(stage, branch, threshold, criterion id, last)`` of exit n; under the
        patience criterion every side exit's threshold is P."""
        last = n == self.num_exits - 1
        threshold = 0.0 if last else (self._thresholds[n] if self._patience is None else float(self._patience))
        return (self.model.stages[n], self.model.branches[n], threshold, self._cid, last)

    def _eager_region(self, n: int, op):
        stage, branch, threshold, cid, last = self._exit_args(n)
        step = op.step

        def region(h, rows, out):
            h = stage(h)
            z = branch(h)
            if not out:
                if z.dim() != 2:
                    raise ValueError(f"every branch must return logits [B, C], got shape {tuple(z.shape)}")
            elif z.dtype != out[0].dtype:
                raise _dtype_mismatch(n, z.dtype, out[0].dtype)
            return h, step(z, rows, threshold, n, out, cid, last)
        return region

    def _compiled_region(self, n: int, op):
        """Stage, branch and exit op compiled once for a dynamic batch dimension; one row
        runs the eager region (a graph for size 1 would be one more compile, and at one
        row the guards cost more than the kernels save)."""
        stage, branch, threshold, cid, last = self._exit_args(n)
        eager = self._eager_region(n, op)
        kwargs = dict(self._compile, dynamic=True)
        if op.traceable is not None:
            exit_op = op.traceable

            def fn(h, rows, out_logits, out_pred, out_exit, out_entropy, patience_state=None):
                h = stage(h)
                return h, exit_op(branch(h), rows, threshold, n, out_logits, out_pred, out_exit, out_entropy,
                                  cid, last, patience_state)
            graph = torch.compile(own_code(fn, f"exit{n}_region"), **kwargs)

            def compiled(h, rows, out):
                return graph(h, rows, *out)
        else:
            # A backend override that the dispatcher would not run on this device: its
            # Python implementation stays out of the graph.
            def fn(h):
                h = stage(h)
                return h, branch(h)
            graph = torch.compile(own_code(fn, f"exit{n}_stage"), **kwargs)
            step = op.step

            def compiled(h, rows, out):
                h, z = graph(h)
                return h, step(z, rows, threshold, n, out, cid, last)

        def region(h, rows, out):
            return (eager if rows.shape[0] == 1 else compiled)(h, rows, out)
        region.eager = eager
        return region

    def _static_graph(self, n: int):
        """Stage n and its branch compiled for static shapes (one graph per bucket size)."""
        graph = self._static.get(n)
        if graph is None:
            stage, branch = self.model.stages[n], self.model.branches[n]

            def fn(h):
                h = stage(h)
                return h, branch(h)
            graph = self._static[n] = torch.compile(own_code(fn, f"exit{n}_static"),
                                                    **dict(self._compile, dynamic=False))
        return graph

    def _bucket_region(self, n: int, op):
        """The static graph on the padded rows; the exit op outside it on the real rows
        only (a graph that mutated its inputs would not be captured anyway)."""
        _, _, threshold, cid, last = self._exit_args(n)
        graph, step = self._static_graph(n), op.step

        def region(h, rows, out):
            k = rows.shape[0]
            h, z = graph(h)
            if z.dim() == 2 and z.shape[0] != k:
                z = z[:k]  # the padded rows stop here: never written, never counted
            return h, step(z, rows, threshold, n, out, cid, last)
        return region

    def _bucket(self, k: int) -> int:
        rule = self._buckets
        if rule == "pow2":
            return 1 << (k - 1).bit_length()
        for size in rule:
            if size >= k:
                return size
        return -(-k // rule[-1]) * rule[-1]

    def _pad(self, h: torch.Tensor, index: torch.Tensor, gather) -> torch.Tensor:
        """``h[index]`` with rows appended up to the bucket of ``len(index)`` (copies of
        row 0 of ``h``: real numbers, so the padded rows run like any other and are dropped)."""
        k = index.shape[0]
        kp = self._bucket(k)
        if kp > k:
            index = torch.nn.functional.pad(index, (0, kp - k))
        return gather(h, index)

    def _spec(self, x: torch.Tensor) -> tuple:
        """``(C, logits dtype)`` for inputs like ``x``, from one eager pass of every stage
        and branch on one row, once per (device, dtype, autocast): the compiled regions
        need the output buffers before the first branch runs, and every branch is checked
        here with the eager engine's errors."""
        t = x if isinstance(x, torch.Tensor) else first_tensor(x)
        dt = t.device.type
        ac = torch.is_autocast_enabled(dt)
        key = (t.device, t.dtype, ac, torch.get_autocast_dtype(dt) if ac else None)
        spec = self._specs.get(key)
        if spec is None:
            h, first = (x[:1] if x is t else slice_state(x, 0, 1)), None
            for n, (stage, branch) in enumerate(zip(self.model.stages, self.model.branches)):
                h = stage(h)
                z = branch(h)
                if z.dim() != 2:
                    raise ValueError(f"every branch must return logits [B, C], got shape {tuple(z.shape)}")
                if first is None:
                    first = z
                elif z.dtype != first.dtype:
                    raise _dtype_mismatch(n, z.dtype, first.dtype)
                elif z.shape[1] != first.shape[1]:
                    raise ValueError(f"branch {n} returns {z.shape[1]} classes but branch 0 returns "
                                     f"{first.shape[1]}; every exit must return one C")
            spec = self._specs[key] = (first.shape[1], first.dtype)
        return spec

    def _cudagraphs(self) -> bool:
        return self._compile is not None and self._compile.get("mode") == "reduce-overhead"

    def warmup(self, batch_sizes: Sequence[int], x: torch.Tensor | None = None) -> None:
        """Compile (and with ``"reduce-overhead"`` capture) ahead of the first request.

        Runs every compiled stage on the row counts calls of these batch sizes can give
        it: with buckets, every bucket up to that of the largest B; without, the powers
        of two and B (the sizes at which torch specialises a dynamic graph), so that no
        survivor count compiles later. One row runs uncompiled.

        Args:
            batch_sizes: the B values calls will use (ints >= 1).
            x: optional example inputs [M, ...] of the kind calls will pass (default:
                standard normal inputs of the model's ``input_shape``, made outside
                inference mode as a data loader's are: dynamo keeps apart graphs for
                tensors made inside and outside ``torch.inference_mode``); rows are
                repeated where more are needed.

        Raises:
            RuntimeError: the engine was built without ``compile``.
        """
        if self._compile is None:
            raise RuntimeError("warmup() compiles the stages: build the engine with compile=True (or a mode)")
        if isinstance(batch_sizes, int):
            batch_sizes = [batch_sizes]
        sizes = list(batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of ints >= 1, got {batch_sizes!r}")
        p = self._first_tensor()
        dev = p.device if p is not None else torch.device("cpu")
        if x is None:
            if self.model.input_shape is None:
                raise ValueError("the model has no input_shape: pass example inputs x")
            g = torch.Generator().manual_seed(0)
            with torch.inference_mode(False):  # a normal tensor, even when called in inference mode
                x = torch.randn((max(sizes), *self.model.input_shape), generator=g).to(
                    dev, p.dtype if p is not None and p.is_floating_point() else torch.float32)
        self._check_input(x)
        if x.shape[0] == 0:
            raise ValueError("x must hold at least one example row")
        # Cut before entering inference mode: the rows keep x's kind (normal or inference
        # tensor), which dynamo's guards tell apart.
        if self._buckets is not None:
            counts = {self._bucket(k) for b in sizes for k in range(1, b + 1)}
        else:
            counts = {k for b in sizes for k in warm_counts(b)}
        inputs = {k: first_stage_inputs(x, k) for k in counts}
        with torch.inference_mode():
            self._warmup(sizes, inputs)

    def _warmup(self, sizes: list, inputs: dict) -> None:
        first = next(iter(inputs.values()))[0]
        dev = first.device
        if self._buckets is not None:
            graphs = [self._static_graph(n) for n in range(self.num_exits)]
            for kp in sorted(inputs):
                for x in inputs[kp]:
                    for _ in range(3 if self._cudagraphs() else 1):  # cudagraph trees record on a later call
                        if self._cudagraphs():
                            torch.compiler.cudagraph_mark_step_begin()
                        h = x
                        for graph in graphs:
                            h, _ = graph(h)
            return
        regions = self._plan(dev, True)[0]
        c, dtype = self._spec(first)
        for b in sorted(set(sizes)):
            out = self._new_outputs(b, c, dtype, dev)
            for k in warm_counts(b):
                if k == 1:
                    continue  # one row runs uncompiled
                rows = self._rows(k, dev)
                for x in inputs[k]:
                    # The first stage always sees the whole batch: k < b only from stage 2 on.
                    h = (regions[0] if k == b else regions[0].eager)(x, rows, out)[0]
                for region in regions[1:]:
                    h = region(h, rows, out)[0]

    @torch.inference_mode()
    def per_sample(self, x: torch.Tensor | tuple | dict | None = None, /, **inputs) -> ExitResult:
        """The paper's regime: one sample at a time (B = 1), each through every exit it
        needs, with a host decision per exit. Takes what :meth:`__call__` takes.

        Gives the same answers as :meth:`__call__`, and is the baseline the batched engine
        is timed against.
        """
        if len(inputs) == 1 and "x" in inputs and x is None and not self._multi_model:
            x, inputs = inputs["x"], {}  # per_sample(x=...), as before keyword arguments
        if inputs or self._multi_model or not isinstance(x, torch.Tensor):
            h = state_input(x, inputs)
            b, dev = check_state(h, self._device())
            plan, one = self._plan(dev, False, True), self._rows(1, dev)
            if b == 0:
                return self._run(h, plan, [], rows=self._rows(0, dev))
            results = [self._run(slice_state(h, i, i + 1), plan, [], rows=one) for i in range(b)]
            return _concat(results)
        self._check_input(x)
        plan = self._plan(x.device, False)
        if x.shape[0] == 0:
            return self._run(x, plan, [])
        return _concat([self._run(x[i:i + 1], plan, []) for i in range(x.shape[0])])


def _concat(results: list) -> ExitResult:
    """One :class:`ExitResult` from the one-sample results, in order."""
    return ExitResult(
        logits=torch.cat([r.logits for r in results]),
        pred=torch.cat([r.pred for r in results]),
        exit=torch.cat([r.exit for r in results]),
        entropy=torch.cat([r.entropy for r in results]),
        counts=[sum(c) for c in zip(*(r.counts for r in results))],
    )


# torch.inference_mode's own C++ guard (private API): entering the public context manager
# costs ~1.5 us more per call (2.6 against 1.0 us, a 2-core Xeon VM, torch 2.13), 6 % of the
# engine's budget at B = 1 (10 % of a ~250 us B-LeNet stage 1 + branch 1). Its effect is
# tested (the results are inference tensors, tests/test_ops.py); a torch without it
# gets the public one.
_inference_mode = getattr(torch._C, "_InferenceMode", torch.inference_mode)


def _dtype_mismatch(n: int, got: torch.dtype, first: torch.dtype) -> TypeError:
    return TypeError(f"branch {n} returns {got} logits but branch 0 returns {first}; "
                     f"every exit must return one dtype")
