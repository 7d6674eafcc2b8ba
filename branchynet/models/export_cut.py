"""Cutting a model into stages at named modules from its ``torch.export`` graph.

For models torch.fx cannot trace (Hugging Face Transformers: ``symbolic_trace`` fails on
them, and transformers 5 has no fx tracer of its own), the graph comes from
``torch.export.export`` with a dynamic batch (and sequence) dimension. Its nodes carry the
module path they ran in (``nn_module_stack``), so a cut after module ``m`` is the point
after the last node run inside ``m``; the graph is split there into one ``GraphModule``
per stage, the way ``torch.distributed.pipelining`` splits an exported graph, with the
model's own parameters (shared: training the stages trains the model).

What flows from a stage to the next, its *state*, is a tuple
``(features, mask, *carried)``: the cut module's output [B, ...], the model's
``attention_mask`` input [B, S] (or None; side branches read it to pool the real
tokens), and every other batch tensor computed before the cut and read after it (a
Transformer's extended attention mask). Nodes that do not depend on the samples
(parameters, constants, sizes) are recomputed in every stage that reads them: a size is
read again from a tensor of the stage, so that after compaction it is the new batch's.
The first stage takes the model's keyword arguments as one dict; the last returns the
model's logits.
"""

from __future__ import annotations

import copy
import inspect
import operator
from bisect import bisect_left

import torch
from torch import fx, nn

from .fx_cut import _DualGraphStage

__all__ = ["export_stages", "exports_only"]

_DROPPED = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
            torch.ops.aten.sym_constrain_range_for_size.default}
_SIZE_OPS = {torch.ops.aten.sym_size.int}
_MASK = "attention_mask"


def exports_only(model: nn.Module) -> bool:
    """Models that torch.fx cannot trace and ``torch.export`` can: Hugging Face ones."""
    return type(model).__module__.startswith("transformers.")


def as_input_dict(model: nn.Module, example_input) -> dict:
    """The example as the model's keyword arguments (a tensor is the forward's first)."""
    if isinstance(example_input, dict):
        if not example_input or not all(isinstance(v, torch.Tensor) for v in example_input.values()):
            raise ValueError("example_input must be a dict of tensors [B, ...] (the model's keyword arguments)")
        return dict(example_input)
    first = next(iter(inspect.signature(model.forward).parameters))
    return {first: example_input}


def export_stages(model: nn.Module, cuts: list, example_input: dict) -> list:
    """``len(cuts) + 1`` stage modules of ``model`` cut after each named module, from its
    train-mode and eval-mode exported graphs; each in ``model``'s train/eval mode.

    Args:
        model: the network; ``model(**example_input)`` returns its logits [B, C] (or a
            Hugging Face output with ``.logits``).
        cuts: module names in network order.
        example_input: the model's keyword arguments, tensors [B, ...].

    Raises:
        ValueError: a cut that never runs, or runs out of order, or a value without the
            batch dimension first flowing past a cut; a model that writes its buffers.
        RuntimeError: torch.export cannot export the model.
    """
    inputs = _exportable(example_input)
    graphs, values = {}, {}
    modes = {m: m.training for m in model.modules()}
    try:
        for mode in (True, False):
            model.train(mode)
            cutter = _StageCutter(model, _export(model, inputs), cuts)
            graphs[mode] = cutter.graphs()
            values.update(cutter.attrs.values())
    finally:
        for m, mode in modes.items():
            m.training = mode
    stages = []
    for s, (gt, ge) in enumerate(zip(graphs[True], graphs[False])):
        holder = _holder(values, gt, ge)
        name = f"ExportedStage{s}"
        same = str(gt) == str(ge)
        stage = fx.GraphModule(holder, ge, name) if same else _DualStage(holder, gt, ge, name)
        stages.append(stage.train(model.training))
    return stages


def _exportable(example: dict) -> dict:
    # A dynamic dimension of size 1 is specialised by torch.export: two rows at least.
    b = next(iter(example.values())).shape[0]
    if b >= 2:
        return example
    return {k: v.expand(2, *v.shape[1:]).clone() if v.dim() and v.shape[0] == b else v for k, v in example.items()}


def _export(model: nn.Module, inputs: dict):
    auto = torch.export.Dim.AUTO
    # The batch is dynamic (compaction changes it); so is a sequence, dimension 1 of a
    # [B, S] input. Everything else (image size, hidden size) is the example's.
    dynamic = {k: ({0: auto, 1: auto} if v.dim() == 2 else {0: auto}) if v.dim() else None
               for k, v in inputs.items()}
    try:
        ep = torch.export.export(model, (), inputs, dynamic_shapes=dynamic)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"torch.export cannot export {type(model).__name__} ({type(err).__name__}: "
                           f"{first}); cut it by hand with branchynet.from_stages") from err
    if ep.graph_signature.buffers_to_mutate:
        raise ValueError(f"{type(model).__name__} writes its buffers in forward "
                         f"({sorted(ep.graph_signature.buffers_to_mutate.values())}); exits on an "
                         f"exported graph need a forward that only reads them")
    return ep


def _holder(values: dict, *graphs) -> nn.Module:
    """A module holding, under their names, the model's tensors the graphs read."""
    holder = nn.Module()
    for g in graphs:
        for node in g.nodes:
            if node.op != "get_attr" or _has(holder, node.target):
                continue
            value = values[node.target]
            *path, last = node.target.split(".")
            mod = holder
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            if isinstance(value, nn.Parameter):
                mod.register_parameter(last, value)
            else:
                mod.register_buffer(last, value)
    return holder


def _has(mod, target: str) -> bool:
    for part in target.split("."):
        if not hasattr(mod, part):
            return False
        mod = getattr(mod, part)
    return True


class _StageCutter:
    """One exported graph split at the cuts (see the module's docstring)."""

    def __init__(self, model: nn.Module, ep, cuts: list) -> None:
        self.model, self.cuts = model, cuts
        sig = ep.graph_signature
        self.nodes = [n for n in ep.graph.nodes if not (n.op == "call_function" and n.target in _DROPPED)]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.attrs, self.user = {}, {}  # placeholder -> (target, tensor) / input name
        for spec in sig.input_specs:
            node = next(n for n in self.nodes if n.op == "placeholder" and n.name == spec.arg.name)
            kind = spec.kind.name
            if kind == "USER_INPUT":
                self.user[node] = spec.arg.name
            elif kind == "PARAMETER":
                self.attrs[node] = (spec.target, model.get_parameter(spec.target))
            elif kind == "BUFFER":
                self.attrs[node] = (spec.target, model.get_buffer(spec.target))
            elif kind == "CONSTANT_TENSOR":
                self.attrs[node] = ("_constant." + spec.target.replace(".", "_"), ep.constants[spec.target])
            else:
                raise ValueError(f"cannot cut an exported graph with a {kind} input ({spec.arg.name})")
        self.mask = next((n for n, name in self.user.items() if name == _MASK), None)
        batch_inputs = [n for n in self.user if n.meta["val"].dim()]
        self.batch = batch_inputs[0].meta["val"].shape[0] if batch_inputs else None
        self.logits = _logits_node(ep, self.nodes[-1])
        self.free = self._free_nodes()
        self.cut_nodes = [self._cut_node(c) for c in cuts]
        self.bounds = [self.order[n] for n in self.cut_nodes]
        if self.bounds != sorted(self.bounds):
            in_order = [c for _, c in sorted(zip(self.bounds, cuts))]
            raise ValueError(f"after must name modules in network order: got {cuts}, the forward runs "
                             f"them as {in_order}")

    def stage_of(self, n) -> int:
        return bisect_left(self.bounds, self.order[n])

    def _free_nodes(self) -> set:
        """Nodes that carry no sample data: parameters, constants, sizes and what is
        computed from them only."""
        free = set(self.attrs)
        for n in self.nodes:
            if n.op == "get_attr" or (n.op == "call_function" and (
                    n.target in _SIZE_OPS or all(a in free for a in n.all_input_nodes))):
                free.add(n)
        return free

    def _cut_node(self, name: str):
        """The value module ``name`` hands on: its last node read outside it."""
        inside = [n for n in self.nodes if _in_module(n, name)]
        if not inside:
            raise ValueError(f"after: cannot cut at {name!r}: no operation of the exported graph runs "
                             f"inside it (the forward never calls it)")
        members = set(inside)
        out = [n for n in inside if n not in self.free and any(u not in members for u in n.users)]
        if not out:
            raise ValueError(f"after: nothing computed in {name!r} is read after it")
        return out[-1]

    def graphs(self) -> list:
        if self.stage_of(self.logits) != len(self.cuts):
            raise ValueError("the model's output does not depend on the modules after the last cut")
        for s, node in enumerate(self.cut_nodes):
            self._check_batch_first(node, f"the output of {self.cuts[s]!r}")
        carried = [self._carried(s) for s in range(len(self.cuts))]
        out = []
        for s in range(len(self.cuts) + 1):
            inputs = None if s == 0 else [self.cut_nodes[s - 1], self.mask, *carried[s - 1]]
            outputs = self.logits if s == len(self.cuts) else [self.cut_nodes[s], self.mask, *carried[s]]
            out.append(self._stage_graph(s, inputs, outputs))
        return out

    def _carried(self, s: int) -> list:
        """Sample values computed up to stage s and read after it, beside the cut's
        output and the mask."""
        keep = []
        for n in self.nodes:
            if n in self.free or n.op == "output" or n is self.cut_nodes[s] or n is self.mask:
                continue
            if self.stage_of(n) <= s and any(self.stage_of(u) > s for u in n.users if u in self.order):
                self._check_batch_first(n, f"{n.name!r}, computed before {self.cuts[s]!r} and read after it,")
                keep.append(n)
        return keep

    def _check_batch_first(self, n, what: str) -> None:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0 or not _same(val.shape[0], self.batch):
            got = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            raise ValueError(f"after: {what} must be a tensor [B, ...] to flow past a cut, got {got}")

    def _stage_graph(self, s: int, inputs, outputs) -> fx.Graph:
        g = fx.Graph()
        env, state = {}, g.placeholder("inputs" if s == 0 else "state")
        if s == 0:
            for node, name in self.user.items():
                env[node] = g.call_function(operator.getitem, (state, name))
        else:
            for i, node in enumerate(inputs):
                if node is not None:
                    env[node] = g.call_function(operator.getitem, (state, i))
        sources = [n for n in (inputs or []) if n is not None] or list(self.user)

        def copy(n):
            if n in env:
                return env[n]
            if n in self.attrs:
                new = g.get_attr(self.attrs[n][0])
            elif n.op == "call_function" and n.target in _SIZE_OPS and n.args[0] not in env:
                new = self._size_from(g, n, sources, env)
            else:
                for a in n.all_input_nodes:
                    copy(a)
                new = g.node_copy(n, lambda a: env[a])
            env[n] = new
            return new

        for n in self.nodes:
            if n.op not in ("placeholder", "output") and n not in self.free and self.stage_of(n) == s:
                copy(n)
        if isinstance(outputs, list):
            g.output(tuple(copy(n) if n is not None else None for n in outputs))
        else:
            g.output(copy(outputs))
        for n in g.nodes:
            n.meta = {}  # the export's fake tensors: a stage is deep-copied and pickled
        return g

    def _size_from(self, g: fx.Graph, n, sources: list, env: dict):
        """A size read again from a tensor this stage has (the batch's size after
        compaction, not the one the first stage saw)."""
        want = n.meta["val"]
        for src in sources:
            val = src.meta.get("val")
            if isinstance(val, torch.Tensor):
                for d, size in enumerate(val.shape):
                    if _same(size, want):
                        return g.call_function(torch.ops.aten.sym_size.int, (env[src], d))
        raise ValueError(f"after: the size {n.name!r} ({want}) is read after a cut but no tensor "
                         f"flowing past the cut has it")


def _same(a, b) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt) and a == b


def _in_module(n, name: str) -> bool:
    stack = n.meta.get("nn_module_stack") or {}
    return any(path == name or path.startswith(name + ".") for path, _ in stack.values())


def _logits_node(ep, output):
    """The node of the model's logits: its one output, or the ``logits`` field of a
    Hugging Face output."""
    spec = ep.call_spec.out_spec
    leaves = list(output.args[0])
    tree = torch.utils._pytree.tree_unflatten(leaves, spec)
    if isinstance(tree, fx.Node):
        return tree
    logits = getattr(tree, "logits", None)
    if logits is None and isinstance(tree, dict):
        logits = tree.get("logits")
    if isinstance(logits, fx.Node):
        return logits
    if len(leaves) == 1:
        return leaves[0]
    raise ValueError(f"the model returns {spec}; attach_exits needs its logits [B, C] (one tensor, "
                     f"or an output with .logits)")


class _DualStage(_DualGraphStage):
    """A stage with a train graph (dropout on) and an eval graph, that survives
    ``copy.deepcopy`` (GraphModule's own copy keeps only the current graph)."""

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.train_graph = copy.deepcopy(self.train_graph, memo)
        res.eval_graph = copy.deepcopy(self.eval_graph, memo)
        return res.train(self.training)


class InputStage(nn.Module):
    """The first exported stage, taking the model's keyword arguments as one dict, or
    its first argument alone (``model(pixel_values)``)."""

    def __init__(self, stage: nn.Module, names: list) -> None:
        super().__init__()
        self.stage = stage
        self.names = list(names)

    def forward(self, inputs):
        if not isinstance(inputs, dict):
            inputs = dict(zip(self.names, inputs if isinstance(inputs, tuple) else (inputs,)))
        missing = [k for k in self.names if k not in inputs]
        if missing:
            raise ValueError(f"missing model inputs {missing}: the exits were attached with "
                             f"example_input {self.names} and the graph needs every one")
        return self.stage(inputs)


class FeatureBranch(nn.Module):
    """A side branch that reads only the cut module's output (``state[0]``) of an
    exported stage's state."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, state):
        return self.branch(state[0])


def state_branch(branch: nn.Module) -> nn.Module:
    """``branch`` as it reads an exported stage's state: whole when it says it takes the
    state (``takes_state = True``, as :class:`~branchynet.models.branches.TokenBranch`),
    else on the cut's output."""
    return branch if getattr(branch, "takes_state", False) else FeatureBranch(branch)
