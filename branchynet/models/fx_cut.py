"""Cutting a model into stages at named modules with torch.fx.

The model is traced the way torchvision's feature extraction does it
(``torchvision/models/feature_extraction.py``): ``torch.nn`` layers and the cut modules
are kept whole, the graph is traced in train and in eval mode (a forward that reads
``self.training`` gets one graph per mode), and the graph is split at the cut modules'
outputs into one ``GraphModule`` per stage, holding the very submodules of the model.
:func:`cut_stages` is the entry point; :func:`branchynet.models.attach.attach_exits`
puts the side branches on top.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

from torch import fx, nn

from .fx_checks import (FrozenPythonState, check_no_state_updates, copy_input_if_modified, preserved_state,
                        python_state_reads)

__all__ = ["cut_stages"]


def cut_stages(model: nn.Module, cuts: list, leaf_modules: tuple) -> list:
    """``len(cuts) + 1`` stage modules of ``model``, cut after each named module.

    Each stage is a ``GraphModule`` (a :class:`_DualGraphStage` when the train and eval
    graphs differ) sharing the model's submodules, in the model's train/eval mode.

    What the trace cannot show (:mod:`.fx_checks`): a forward updating a buffer in place
    is refused; a Python attribute read by a condition is guarded by the first stage; a
    stage modifying its cut's output in place gets its own copy of it. Tracing leaves the
    model's buffers and Python attributes as they were; a forward that changes them while
    traced is refused.

    Raises:
        ValueError: a cut that is missing, runs twice, is out of order, or is not the only
            value flowing on; a model of several inputs or a non-tensor output; a forward
            that updates a buffer or parameter in place.
        RuntimeError: torch.fx cannot trace the model.
    """
    graphs, traced = {}, []
    with preserved_state(model) as kept:
        for mode in (True, False):
            g = _trace(model, cuts, leaf_modules, training=mode)
            check_no_state_updates(g, model)
            traced.append(g)
            graphs[mode] = _split(g, _cut_nodes(g, cuts), cuts)
    if kept.changed:
        raise ValueError(
            f"attach_exits: tracing {type(model).__name__} changed {', '.join(kept.changed)} (put back): "
            f"its forward changes state that torch.fx does not record (it runs that Python once, "
            f"while tracing); keep the modules that do it whole with leaf_modules=, or cut the model "
            f"by hand with branchynet.from_stages")
    modules = dict(model.named_modules())
    for stage_graphs in graphs.values():
        for g in stage_graphs[1:]:  # a stage that modifies the cut's output in place gets its own copy
            copy_input_if_modified(g, modules)
    same = all(str(a) == str(b) for a, b in zip(graphs[True], graphs[False]))
    stages = []
    for s, (gt, ge) in enumerate(zip(graphs[True], graphs[False])):
        name = f"Stage{s}"
        stage = fx.GraphModule(model, ge, name) if same else _DualGraphStage(model, gt, ge, name)
        stages.append(stage.train(model.training))
    reads = python_state_reads(model, traced)
    if reads:  # every forward runs the first stage: it checks the traced values still hold
        FrozenPythonState(reads, model).attach(stages[0])
    return stages


def copy_stage_input(stage: fx.GraphModule, model: nn.Module) -> None:
    """Give ``stage`` its own copy of its input (a run showed that it modifies the cut's
    output in place, inside a leaf module), in each of its graphs."""
    modules = dict(model.named_modules())
    graphs = [stage.train_graph, stage.eval_graph] if isinstance(stage, _DualGraphStage) else [stage.graph]
    for g in graphs:
        copy_input_if_modified(g, modules, force=True)
    stage.recompile()


def ancestors(name: str) -> list:
    """The dotted names enclosing ``name``, innermost first (``"a.b.c"`` -> ``["a.b", "a"]``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


class _CutTracer(fx.Tracer):
    """fx's tracer with the cut modules (and ``leaf_modules``) kept whole, so each cut is
    one ``call_module`` node whose output is exactly that module's output."""

    # Buffers read in a forward become graph inputs (get_attr) instead of the real
    # tensors: an in-place update is recorded (and refused) rather than run on the
    # user's buffer at trace time.
    proxy_buffer_attributes = True

    def __init__(self, cuts: Sequence[str], leaf_modules: tuple) -> None:
        super().__init__()
        self.cuts = set(cuts)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.cuts or qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, cuts, leaf_modules, training: bool) -> fx.Graph:
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        return _CutTracer(cuts, leaf_modules).trace(model)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(
            f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {first}). "
            f"A forward with data-dependent control flow cannot be cut by name: name the "
            f"untraceable submodules in leaf_modules= (kept whole), or cut the model by hand "
            f"with branchynet.from_stages"
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode


def _cut_nodes(graph: fx.Graph, cuts: list) -> list:
    """The ``call_module`` node of every cut, checked for existence and network order."""
    called = {}
    for node in graph.nodes:
        if node.op == "call_module":
            called.setdefault(node.target, []).append(node)
    found = []
    for name in cuts:
        calls = called.get(name, [])
        if len(calls) > 1:
            raise ValueError(f"after: {name!r} runs {len(calls)} times in the forward; a cut needs "
                             f"a module that runs once")
        if not calls:
            holder = next((p for p in ancestors(name) if p in called), None)
            why = (f"it is inside {holder!r}, which torch.fx keeps whole (a torch.nn layer or "
                   f"a leaf module); cut at {holder!r} or outside it" if holder is not None
                   else "the forward never calls it")
            raise ValueError(f"after: cannot cut at {name!r}: {why}")
        found.append(calls[0])
    order = {n: i for i, n in enumerate(graph.nodes)}
    pos = [order[n] for n in found]
    if pos != sorted(pos):
        in_order = [name for _, name in sorted(zip(pos, cuts))]
        raise ValueError(f"after must name modules in network order: got {cuts}, the forward "
                         f"runs them as {in_order}")
    return found


def _split(graph: fx.Graph, cut_nodes: list, cuts: list) -> list:
    """One graph per stage: stage s runs from cut s-1's output (or the input) to cut s's
    output (or the model's output). Refuses cuts across which more than the cut's output
    flows on."""
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"the model's forward takes {len(placeholders)} inputs; attach_exits "
                         f"cuts models of one input tensor")
    output = nodes[-1]
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise ValueError(f"the model returns {type(result).__name__}, not one tensor of logits; "
                         f"wrap it so its forward returns the final logits [B, C]")
    if result is cut_nodes[-1]:
        raise ValueError(f"after: {cuts[-1]!r} gives the model's output, which is the final exit "
                         f"already; leave it out")
    order = {n: i for i, n in enumerate(nodes)}
    bounds = [order[n] for n in cut_nodes]

    # Nodes that depend on no input (parameters read with get_attr, constants built from
    # them) are recomputed in every stage that reads them: they carry no sample data.
    free = set()
    for n in nodes:
        if n.op == "get_attr" or (n.op in ("call_function", "call_method")
                                  and all(a in free for a in n.all_input_nodes)):
            free.add(n)

    def stage_of(n):
        return bisect_left(bounds, order[n])

    _check_only_cut_flows(nodes, free, stage_of, cut_nodes, cuts)
    if result.op == "placeholder" or stage_of(result) != len(cut_nodes):
        raise ValueError("the model's output does not depend on the modules after the last cut")
    starts = [placeholders[0], *cut_nodes]
    ends = [*cut_nodes, result]
    return [_stage_graph(nodes, free, stage_of, s, starts[s], ends[s]) for s in range(len(ends))]


def _check_only_cut_flows(nodes, free, stage_of, cut_nodes: list, cuts: list) -> None:
    """Every value a stage reads comes from that stage, from the cut just before it, or is
    free; anything else would have to flow past a cut beside the cut's output."""
    for n in nodes:
        if n.op in ("placeholder", "output") or n in free:
            continue
        s = stage_of(n)
        for a in n.all_input_nodes:
            if a in free:
                continue
            sa = stage_of(a)
            if sa == s or (sa == s - 1 and a is cut_nodes[sa]):
                continue
            crossed = cuts[sa]
            # The innermost module that runs the user and holds the cut is the block to
            # cut at instead (a residual block's add runs in the block's own forward).
            stack = list((n.meta.get("nn_module_stack") or {}).keys())
            block = next((m for m in reversed(stack) if crossed.startswith(m + ".")), None)
            hint = (f"; cut at the enclosing block {block!r} instead" if block
                    else "; the model's forward reuses a value from before the cut")
            raise ValueError(
                f"after: cannot cut at {crossed!r}: more than its output flows on past it "
                f"({a.name!r}, computed before the cut, is used by {n.name!r} after it), as "
                f"inside a residual block{hint}"
            )


def _stage_graph(nodes, free, stage_of, s: int, start: fx.Node, end: fx.Node) -> fx.Graph:
    """Stage ``s``'s graph: ``start``'s value as its input ``x``, ``end``'s as its output,
    the free nodes it reads copied in."""
    g = fx.Graph()
    env = {start: g.placeholder("x")}

    def copy(n):
        for a in n.all_input_nodes:
            if a not in env:
                copy(a)  # only free nodes get here: _check_only_cut_flows ruled out the rest
        env[n] = g.node_copy(n, lambda a: env[a])
        return env[n]

    for n in nodes:
        if n.op in ("placeholder", "output") or n in free or stage_of(n) != s or n in env:
            continue
        copy(n)
    g.output(env[end])
    return g


class _DualGraphStage(fx.GraphModule):
    """A stage whose forward differs between train and eval mode (one graph for each),
    as torchvision's ``DualGraphModule``; it holds the model's own submodules."""

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph,
                 class_name: str) -> None:
        super().__init__(root, train_graph, class_name)
        for node in eval_graph.nodes:
            if node.op in ("get_attr", "call_module") and not _has_attr(self, node.target):
                _copy_attr(root, self, node.target)
        self.train_graph = train_graph
        self.eval_graph = eval_graph

    def train(self, mode: bool = True):
        graph = self.train_graph if mode else self.eval_graph
        if self.graph is not graph:
            self.graph = graph  # the setter regenerates forward
        return super().train(mode)


def _has_attr(mod, target: str) -> bool:
    for part in target.split("."):
        if not hasattr(mod, part):
            return False
        mod = getattr(mod, part)
    return True


def _copy_attr(src: nn.Module, dst: nn.Module, target: str) -> None:
    *path, last = target.split(".")
    for part in path:
        s, d = getattr(src, part), getattr(dst, part, None)
        if d is None:
            d = nn.Module()
            setattr(dst, part, d)
        src, dst = s, d
    setattr(dst, last, getattr(src, last))

