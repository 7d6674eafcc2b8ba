"""Exits on any PyTorch model by module name.

:func:`attach_exits` cuts a model at the outputs of modules named as in
``model.named_modules()`` ("layer1", "features.8", "encoder.layers.encoder_layer_1"). The
model is traced with torch.fx the way torchvision's feature extraction does it
(``torchvision/models/feature_extraction.py``): ``torch.nn`` layers are kept whole, the
graph is traced in train and in eval mode (a forward that reads ``self.training`` gets
one graph per mode), and each stage is a ``GraphModule`` holding the very submodules of
the model, so the stages share its parameters and the final exit is the model itself.
"""

from __future__ import annotations

import difflib
import warnings
from bisect import bisect_left
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import fx, nn

from ..blocks import conv_bn_relu, linear_head
from ..config import ExitConfig
from .branchynet import BranchyNet

__all__ = [
    "attach_exits",
    "auto_branch",
    "conv_branch",
    "linear_branch",
    "pool_linear_branch",
    "token_branch",
    "torchvision_exits",
]

#: ``branch_factory(feature, num_classes) -> module``: ``feature`` is an example of what
#: flows at the cut ([B, ...], from ``example_input``); the module maps it to [B, C].
BranchFactory = Callable[[torch.Tensor, int], nn.Module]


# -- side branches -------------------------------------------------------------------------


def pool_linear_branch(feature: torch.Tensor, num_classes: int) -> nn.Module:
    """Global average pool and one linear layer, for conv feature maps.

    Shapes:
        [B, C, H, W] -> [B, num_classes].
    """
    _check_rank(feature, 4, "pool_linear_branch", "[B, C, H, W]")
    return nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1),
                                     head=linear_head(feature.shape[1], num_classes)))


def conv_branch(feature: torch.Tensor, num_classes: int, width: int | None = None) -> nn.Module:
    """The paper's conv side branch: 3x3 conv -> BatchNorm -> ReLU, then pool and linear.

    A conv layer of its own lets the branch re-mix features that the backbone shaped for
    its next stage, not for classification; it costs ``9 * C * width`` MACs per pixel.

    Args:
        feature: an example feature map [B, C, H, W].
        num_classes: K.
        width: the conv's output channels (default C).

    Shapes:
        [B, C, H, W] -> [B, num_classes].
    """
    _check_rank(feature, 4, "conv_branch", "[B, C, H, W]")
    c = feature.shape[1]
    width = c if width is None else width
    return nn.Sequential(OrderedDict(conv=conv_bn_relu(c, width, 3, 1, 1, eps=1e-5),
                                     pool=nn.AdaptiveAvgPool2d(1),
                                     head=linear_head(width, num_classes)))


def token_branch(feature: torch.Tensor, num_classes: int, pool: str = "mean") -> nn.Module:
    """For token sequences: one token vector per sample, LayerNorm, linear.

    Args:
        feature: an example token sequence [B, S, D].
        num_classes: K.
        pool: ``"mean"`` (mean over the S tokens) or ``"cls"`` (token 0, the class token
            of ViT-style models).

    Shapes:
        [B, S, D] -> [B, num_classes].
    """
    _check_rank(feature, 3, "token_branch", "[B, S, D]")
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
    d = feature.shape[2]
    return nn.Sequential(OrderedDict(pool=_TokenPool(pool), norm=nn.LayerNorm(d),
                                     fc=nn.Linear(d, num_classes)))


def linear_branch(feature: torch.Tensor, num_classes: int) -> nn.Module:
    """One linear layer, for flat features.

    Shapes:
        [B, D] -> [B, num_classes].
    """
    _check_rank(feature, 2, "linear_branch", "[B, D]")
    return linear_head(feature.shape[1], num_classes)


def auto_branch(feature: torch.Tensor, num_classes: int) -> nn.Module:
    """The default side branch for what flows at the cut, chosen by its rank.

    [B, C, H, W] -> :func:`pool_linear_branch`; [B, S, D] -> :func:`token_branch` (mean
    over tokens); [B, D] -> :func:`linear_branch`.
    """
    rank = feature.dim()
    if rank == 4:
        return pool_linear_branch(feature, num_classes)
    if rank == 3:
        return token_branch(feature, num_classes)
    if rank == 2:
        return linear_branch(feature, num_classes)
    raise ValueError(
        f"no default side branch for features of shape {tuple(feature.shape)} (expected "
        f"[B, C, H, W], [B, S, D] or [B, D]); pass branches= or branch_factory="
    )


class _TokenPool(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.mode == "cls" else x.mean(dim=1)

    def extra_repr(self) -> str:
        return self.mode


def _check_rank(feature, rank: int, who: str, shape: str) -> None:
    if not isinstance(feature, torch.Tensor) or feature.dim() != rank:
        got = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
        raise ValueError(f"{who} takes features {shape}, got {got}")


# -- tracing and cutting -------------------------------------------------------------------


class _CutTracer(fx.Tracer):
    """fx's tracer with the cut modules (and ``leaf_modules``) kept whole, so each cut is
    one ``call_module`` node whose output is exactly that module's output."""

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
            holder = next((p for p in _ancestors(name) if p in called), None)
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


def _ancestors(name: str) -> list:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


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
    if result.op == "placeholder" or stage_of(result) != len(cut_nodes):
        raise ValueError("the model's output does not depend on the modules after the last cut")

    graphs = []
    for s in range(len(cut_nodes) + 1):
        g = fx.Graph()
        env = {}
        start = placeholders[0] if s == 0 else cut_nodes[s - 1]
        env[start] = g.placeholder("x")

        def copy(n, g=g, env=env):
            for a in n.all_input_nodes:
                if a not in env:
                    copy(a)  # only free nodes get here: the checks above ruled out the rest
            env[n] = g.node_copy(n, lambda a: env[a])
            return env[n]

        for n in nodes:
            if n.op in ("placeholder", "output") or n in free or stage_of(n) != s or n in env:
                continue
            copy(n)
        end = cut_nodes[s] if s < len(cut_nodes) else result
        g.output(env[end])
        graphs.append(g)
    return graphs


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


def attach_exits(
    model: nn.Module,
    after: Sequence[str],
    *,
    example_input: torch.Tensor,
    num_classes: int | None = None,
    branches: Sequence[nn.Module | None] | None = None,
    branch_factory: BranchFactory = auto_branch,
    exit_config: ExitConfig | None = None,
    leaf_modules: Sequence[type | str] = (),
) -> BranchyNet:
    """Put a side branch after each named module of any model; the model is the final exit.

    The model is traced with torch.fx and cut at the outputs of the named modules; the
    stages are ``GraphModule``s holding the model's own submodules (they share its
    parameters: training the result trains ``model``), and the last stage ends with the
    model's output, so the final exit equals ``model(x)``.

    Args:
        model: the network; its forward takes one tensor [B, ...] and returns the final
            logits [B, C].
        after: names from ``model.named_modules()``, in network order, after whose output
            a side branch reads the features (e.g. ``["layer1", "layer2"]`` for a
            torchvision ResNet). Each module must run once per forward, and its output must
            be the only value that flows on (so not a layer inside a residual block).
        example_input: an input batch [B, ...] (B >= 1); one eval-mode forward on it sizes
            the side branches and checks the cuts. Its shape without B is the model's
            ``input_shape``.
        num_classes: C; default: read from the model's output on ``example_input``.
        branches: one side branch per cut, each mapping the cut's features to [B, C];
            ``None`` entries (or ``branches=None``) are built by ``branch_factory``.
        branch_factory: ``factory(feature, num_classes) -> nn.Module`` with ``feature`` an
            example of the cut's output. Default :func:`auto_branch` (pool + linear for
            conv maps, token pooling + LayerNorm + linear for token sequences, linear for
            flat features); :func:`conv_branch` is the paper's conv branch.
        exit_config: thresholds, loss weights and criterion for the ``len(after) + 1``
            exits (default: thresholds 0, weights 1, entropy).
        leaf_modules: module types or names that torch.fx must not trace into (kept whole,
            e.g. a submodule with data-dependent control flow).

    Returns:
        A :class:`BranchyNet` with ``len(after) + 1`` exits whose last branch is the
        identity; new branches are on ``example_input``'s device and dtype.

    Shapes:
        input [B, *example_input.shape[1:]] -> list of ``len(after) + 1`` tensors [B, C].

    Raises:
        ValueError: a name that is not a module of ``model``, names out of network order
            or nested in each other, a cut that is not the only value flowing on, a model
            whose output is not one tensor [B, C], a ``num_classes`` that differs from it,
            a ``branches`` list of the wrong length.
        RuntimeError: torch.fx cannot trace the model (use ``leaf_modules`` or
            :func:`branchynet.from_stages`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(after, str):
        raise TypeError(f"after must be a list of module names, got the string {after!r}")
    cuts = list(after)
    if not cuts:
        raise ValueError("after must name at least one module of the model")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("example_input must be a tensor [B, ...] with B >= 1")
    modules = dict(model.named_modules())
    for name in cuts:
        if not isinstance(name, str) or name not in modules or name == "":
            close = difflib.get_close_matches(str(name), [m for m in modules if m], n=5)
            hint = f"; close names: {close}" if close else ""
            raise ValueError(f"after: {name!r} is not a module of {type(model).__name__} "
                             f"(names as in model.named_modules()){hint}")
    if len(set(cuts)) != len(cuts):
        raise ValueError(f"after names a module twice: {cuts}")
    for name in cuts:
        outer = [p for p in _ancestors(name) if p in cuts]
        if outer:
            raise ValueError(f"after: {name!r} is inside {outer[0]!r}; cut at one of them")
    if branches is not None:
        branches = list(branches)
        if len(branches) != len(cuts):
            raise ValueError(f"branches: expected {len(cuts)} (one per cut), got {len(branches)}")
    leaf_modules = tuple(leaf_modules)

    graphs = {}
    for mode in (True, False):
        g = _trace(model, cuts, leaf_modules, training=mode)
        graphs[mode] = _split(g, _cut_nodes(g, cuts), cuts)
    same = all(str(a) == str(b) for a, b in zip(graphs[True], graphs[False]))
    stages = []
    for s, (gt, ge) in enumerate(zip(graphs[True], graphs[False])):
        name = f"Stage{s}"
        stage = fx.GraphModule(model, ge, name) if same else _DualGraphStage(model, gt, ge, name)
        stages.append(stage.train(model.training))

    # One eval-mode forward sizes the branches and checks what flows at every cut.
    modes = {m: m.training for m in model.modules()}
    features = []
    try:
        for st in stages:
            st.eval()
        with torch.no_grad():
            h = example_input
            for s, st in enumerate(stages):
                h = st(h)
                features.append(h)
                what = cuts[s] if s < len(cuts) else "the model"
                if not isinstance(h, torch.Tensor) or h.dim() < 1 or h.shape[0] != example_input.shape[0]:
                    got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                    raise ValueError(f"the output of {what!r} must be a tensor [B={example_input.shape[0]}, ...], "
                                     f"got {got}")
    finally:
        for m, mode in modes.items():
            m.training = mode
        for st in stages:
            st.train(model.training)
    logits = features[-1]
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits [B, C], got shape {tuple(logits.shape)}")
    if num_classes is None:
        num_classes = logits.shape[1]
    elif num_classes != logits.shape[1]:
        raise ValueError(f"num_classes = {num_classes} but the model returns {logits.shape[1]} classes "
                         f"(every exit must predict the same classes)")

    side = branches if branches is not None else [None] * len(cuts)
    built = []
    for s, b in enumerate(side):
        if b is None:
            b = branch_factory(features[s], num_classes)
            b = b.to(device=features[s].device, dtype=features[s].dtype)
        if not isinstance(b, nn.Module):
            raise TypeError(f"branch {s} must be an nn.Module, got {type(b).__name__}")
        built.append(b.train(model.training))
    return BranchyNet(stages, built + [nn.Identity()], exit_config=exit_config,
                      input_shape=tuple(example_input.shape[1:]), num_classes=num_classes)


# -- torchvision models, rebuilt by name from checkpoints ----------------------------------

_BRANCHES = {"auto": auto_branch, "conv": conv_branch}


def torchvision_exits(
    model: str,
    after: Sequence[str],
    num_classes: int,
    input_shape: Sequence[int],
    *,
    weights: str | None = None,
    branch: str = "auto",
    model_kwargs: dict | None = None,
    exit_config: ExitConfig | None = None,
) -> BranchyNet:
    """A torchvision model by name with exits after the named modules (needs torchvision).

    The result records its recipe in ``model.arch``, so :func:`branchynet.save_checkpoint`
    saves it and :func:`branchynet.load_checkpoint` rebuilds it (the weights come from the
    checkpoint; nothing is downloaded).

    Args:
        model: a name from ``torchvision.models.list_models()``, e.g. ``"resnet18"``.
        after: module names to cut at (see :func:`attach_exits`).
        num_classes: C of every exit.
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``. One-channel inputs are
            repeated to the three channels torchvision's models take.
        weights: a local file with the model's ``state_dict`` (e.g. pretrained weights);
            tensors whose shape differs (a classifier for other classes) are left as
            initialised, with a warning.
        branch: ``"auto"`` (:func:`auto_branch`) or ``"conv"`` (:func:`conv_branch`).
        model_kwargs: passed to the torchvision builder (e.g. ``{"image_size": 32}``).
        exit_config: as in :func:`attach_exits`.

    Raises:
        ImportError: torchvision is not installed.
        ValueError: unknown model or branch name, a weights file that does not fit.
    """
    try:
        import torchvision
    except ImportError as err:
        raise ImportError("torchvision_exits needs torchvision (pip install torchvision)") from err
    if branch not in _BRANCHES:
        raise ValueError(f"branch must be one of {sorted(_BRANCHES)}, got {branch!r}")
    known = torchvision.models.list_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5)
        raise ValueError(f"unknown torchvision model {model!r}" + (f"; close names: {close}" if close else ""))
    input_shape = tuple(int(d) for d in input_shape)
    net = torchvision.models.get_model(model, weights=None, num_classes=num_classes,
                                       **(model_kwargs or {}))
    if weights is not None:
        _load_matching(net, weights)
    first_conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    wants = first_conv.in_channels if first_conv is not None else input_shape[0]
    if input_shape[0] != wants and input_shape[0] != 1:
        raise ValueError(f"input_shape {input_shape}: {model} takes {wants} channels")
    example = torch.zeros(2, wants, *input_shape[1:])
    bn_model = attach_exits(net.eval(), list(after), example_input=example, num_classes=num_classes,
                            branch_factory=_BRANCHES[branch], exit_config=exit_config)
    if input_shape[0] != wants:
        # Grey images as RGB: the first stage repeats the channel (no new parameters).
        bn_model.stages[0] = nn.Sequential(OrderedDict(to_rgb=_RepeatChannels(wants),
                                                       stage=bn_model.stages[0]))
        bn_model.input_shape = input_shape
    bn_model.arch = {"name": "torchvision", "kwargs": {
        "model": model, "after": list(after), "num_classes": num_classes,
        "input_shape": list(input_shape), "branch": branch, "model_kwargs": dict(model_kwargs or {})}}
    return bn_model.train()


class _RepeatChannels(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, *x.shape[2:])


def _load_matching(net: nn.Module, path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"weights: cannot read {path} as a state_dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path} does not hold a state_dict (name -> tensor)")
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"weights: {path} does not fit {type(net).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    skipped = [k for k in own if state[k].shape != own[k].shape]
    if skipped:
        warnings.warn(f"weights: left as initialised (shape differs from {path}): "
                      + ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in skipped),
                      stacklevel=3)
    net.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
