"""What a torch.fx trace does not show, found before a model is cut by name.

A symbolic trace runs the forward's Python once, on proxies. Three things then differ from
the model's own forward, silently:

- a buffer updated in place (a running statistic): the trace records the update once,
  or not at all when nothing reads its result, so the stages drift from the model.
  Refused (:func:`check_no_state_updates`), naming the module: kept whole as a leaf
  module its forward runs as written.
- a Python attribute read by a condition (``if self.flag:``): the trace keeps the branch
  taken at trace time. Handled by a guard (:class:`FrozenPythonState`) on the first stage
  that raises, naming the attribute, once the value differs from the traced one.
- an in-place op on a cut's output (``h.relu_()`` right after the cut): the side branch
  reads the same tensor, so autograd's saved copy is overwritten ("modified by an inplace
  operation" in backward, frozen backbone or not). Handled by copying the cut's output
  at the start of the stage that modifies it (:func:`copy_input_if_modified`): one copy
  of the features, only in the stages that need it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import operator
import textwrap

import torch
from torch import fx, nn

__all__ = ["check_no_state_updates", "python_state_reads", "FrozenPythonState", "copy_input_if_modified",
           "preserved_state"]

_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
# Methods ending in "_" that change no values.
_NOT_MUTATING = {"requires_grad_", "share_memory_", "retain_grad_"}
# Ops whose result shares its input's storage: an in-place op on it changes the input.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute",
                 "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "t", "unbind", "split",
                 "chunk", "as_strided", "diagonal", "movedim", "contiguous", "detach", "__getitem__",
                 "unfold", "swapaxes", "swapdims"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute,
                   torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.t, torch.movedim,
                   torch.split, torch.chunk, torch.unbind, torch.detach, torch.diagonal}


def _inplace_flag(node: fx.Node) -> bool:
    """A functional op called with ``inplace=True`` (``F.relu(h, inplace=True)``, or
    positionally, ``F.relu(h, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def mutated_value(node: fx.Node, modules: dict):
    """``(value node, op name)`` for a node that changes one of its inputs in place (its
    first argument, or ``out=``), else None."""
    target = None
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING:
            target = node.args[0] if node.args else None
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_")) \
                or _inplace_flag(node):
            target = node.args[0] if node.args else node.kwargs.get("input")
        elif isinstance(node.kwargs.get("out"), fx.Node):
            target = node.kwargs["out"]
    elif node.op == "call_module":
        name = type(modules.get(node.target)).__name__
        if getattr(modules.get(node.target), "inplace", False) is True:
            target = node.args[0] if node.args else None
    return (target, name) if isinstance(target, fx.Node) else None


def alias_root(node: fx.Node) -> fx.Node:
    """The node whose storage ``node`` shares, through view ops."""
    while node.args and isinstance(node.args[0], fx.Node) and (
            (node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)):
        node = node.args[0]
    return node


def _stack(node: fx.Node) -> list:
    """The names of the modules whose forwards hold ``node``, outermost first (the stack's
    values: its keys may carry a call count, ``relu@1``)."""
    return [v[0] if isinstance(v, tuple) else k for k, v in (node.meta.get("nn_module_stack") or {}).items()]


def _owner(node: fx.Node) -> str:
    """The innermost module whose forward holds ``node`` ("" for the model's own)."""
    stack = _stack(node)
    return stack[-1] if stack else ""


def _describe(model: nn.Module, name: str) -> str:
    try:
        kind = type(model.get_submodule(name)).__name__
    except AttributeError:  # a name the stack holds that is not a submodule (any more)
        return f"'{name}'"
    return f"'{name}' ({kind})" if name else f"the model ({kind})"


def check_no_state_updates(graph: fx.Graph, model: nn.Module) -> None:
    """Refuse a traced forward that changes a buffer or parameter in place.

    Raises:
        ValueError: naming the module, the buffer and the op, and what to do.
    """
    modules = dict(model.named_modules())
    buffers = dict(model.named_buffers())
    for node in graph.nodes:
        hit = mutated_value(node, modules)
        if hit is None or alias_root(hit[0]).op != "get_attr":
            continue
        tensor = alias_root(hit[0]).target
        owner = _owner(node)
        kind = "buffer" if tensor in buffers else "parameter"
        what = _describe(model, owner)
        fix = (f"keep the module whole with leaf_modules=['{owner}'] (its forward then runs as written)"
               if owner else "move the update into a submodule named in leaf_modules=")
        raise ValueError(
            f"attach_exits: {what} updates its {kind} '{tensor}' in place ({hit[1]}) in its forward; "
            f"torch.fx records such an update once or drops it, so the stages would drift from the "
            f"model. {fix[0].upper() + fix[1:]}, or cut the model by hand with branchynet.from_stages")


@functools.lru_cache(maxsize=None)
def _condition_attributes(cls: type) -> frozenset:
    """The ``self.<name>`` attributes that ``cls.forward`` reads in a condition or a loop
    bound (if / while / assert / a conditional expression / for ... in); empty when its
    source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return frozenset()
    fn = tree.body[0]
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not fn.args.args:
        return frozenset()
    me = fn.args.args[0].arg
    tests = []
    for node in ast.walk(fn):
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(node.test)
        elif isinstance(node, ast.For):
            tests.append(node.iter)
        elif isinstance(node, ast.comprehension):
            tests += [node.iter, *node.ifs]
    return frozenset(sub.attr for t in tests for sub in ast.walk(t)
                     if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == me)


_PLAIN = (bool, int, float, str, type(None))


def python_state_reads(model: nn.Module, graphs) -> list:
    """``(module, name, attribute, value)`` for every plain Python attribute that a traced
    forward reads in a condition (``self.training`` excepted: each mode has its graph).
    Only the forwards torch.fx ran are looked at (leaf modules run their own Python)."""
    traced, leaves = {""}, set()
    for g in graphs:
        for node in g.nodes:
            traced.update(_stack(node))
            if node.op == "call_module":
                leaves.add(node.target)
    reads = []
    for name in sorted(traced - leaves):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        for attr in sorted(_condition_attributes(type(mod)) - {"training"}):
            value = mod.__dict__.get(attr, mod)  # plain attributes live in __dict__
            if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
                reads.append((mod, name, attr, value))
    return reads


class FrozenPythonState:
    """Forward pre-hook of the first stage: the Python attributes the trace read in its
    conditions must still hold the values traced, else the stages no longer do what the
    model does (they run the branch taken at trace time)."""

    def __init__(self, reads: list, model: nn.Module) -> None:
        self.reads = [(mod, attr, value, _describe(model, name)) for mod, name, attr, value in reads]

    def __call__(self, stage, args) -> None:
        for mod, attr, value, what in self.reads:
            now = getattr(mod, attr, None)
            if now is not value and now != value:
                raise RuntimeError(
                    f"self.{attr} of {what} was {value!r} when attach_exits traced it and is {now!r} "
                    f"now: the stages run the forward as traced (torch.fx keeps the branch taken). "
                    f"Set it back, or call attach_exits again after changing it (or keep that "
                    f"module whole with leaf_modules=)")


    def attach(self, stage: fx.GraphModule) -> None:
        """Register on ``stage``, and again on its deep copies (``GraphModule`` drops
        forward hooks when copied; its deep-copy hooks run on the copy, this object and
        the modules it holds copied along)."""
        stage.register_forward_pre_hook(self)
        if hasattr(stage, "_register_deepcopy_hook"):  # private in torch 2.13 / 2.14: no copy guard without it
            stage._register_deepcopy_hook(_GuardCopy(self))


class _GuardCopy:
    def __init__(self, guard: FrozenPythonState) -> None:
        self.guard = guard

    def __call__(self, copied: fx.GraphModule) -> None:
        # torch calls the original's hook; the copy's own (its guard holding the copied
        # modules) is among the copy's deep-copy hooks
        mine = next((h for h in getattr(copied, "_deepcopy_hooks", ()) if isinstance(h, _GuardCopy)), self)
        copied.register_forward_pre_hook(mine.guard)


def _own_copy(x: torch.Tensor) -> torch.Tensor:
    """The cut's output as this stage's own tensor: the side branch (and autograd, which
    saved it for the branch's backward) keeps the original, which this stage modifies
    in place."""
    return x.clone()


def copy_input_if_modified(graph: fx.Graph, modules: dict, force: bool = False) -> bool:
    """Insert :func:`_own_copy` after the stage's input when an op of the stage modifies
    it in place (or ``force``, when a run showed it: a leaf module's own in-place op);
    True when the graph holds the copy."""
    ph = next(n for n in graph.nodes if n.op == "placeholder")
    if any(u.op == "call_function" and u.target is _own_copy for u in ph.users):
        return True
    if not force and not any((hit := mutated_value(n, modules)) is not None and alias_root(hit[0]) is ph
                             for n in graph.nodes):
        return False
    with graph.inserting_after(ph):
        copy = graph.call_function(_own_copy, (ph,))
    ph.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    return True


class preserved_state:
    """Context manager: the model's buffers and plain Python attributes as they were on
    entry, put back on exit where something changed them (buffers: seen by their version
    counter; ``training`` is the caller's). ``changed`` lists what was put back."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [(name, b, b._version, b.detach().clone()) for name, b in model.named_buffers()]
        self.attrs = [(mod, f"{name}.{k}" if name else k, k, v) for name, mod in model.named_modules()
                      for k, v in vars(mod).items() if k != "training" and isinstance(v, _PLAIN)]
        self.changed: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for name, b, version, copy in self.buffers:
                if b._version != version:
                    self.changed.append(name)
                    b.copy_(copy)
        for mod, name, k, v in self.attrs:
            now = mod.__dict__.get(k, v)
            if now is not v and now != v:
                self.changed.append(f"{name} ({v!r} -> {now!r})")
                mod.__dict__[k] = v
