"""Exits on any PyTorch model by module name.

:func:`attach_exits` cuts a model at the outputs of modules named as in
``model.named_modules()`` ("layer1", "features.8", "encoder.layers.encoder_layer_1"). The
model is traced with torch.fx the way torchvision's feature extraction does it
(``torchvision/models/feature_extraction.py``): ``torch.nn`` layers are kept whole, the
graph is traced in train and in eval mode (a forward that reads ``self.training`` gets
one graph per mode), and each stage is a ``GraphModule`` holding the very submodules of
the model, so the stages share its parameters and the final exit is the model itself.

The pieces live apart: the side branches in :mod:`branchynet.models.branches`, the fx cut
in :mod:`branchynet.models.fx_cut`, torchvision models by name in
:mod:`branchynet.models.torchvision_models`; their public names are importable from here
as before.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import nn

from ..config import ExitConfig
from ..state import first_tensor
from .branches import (BranchFactory, TokenBranch, auto_branch, conv_branch, linear_branch,
                       pool_linear_branch, token_branch)
from .branchynet import BranchyNet
from .export_cut import InputStage, as_input_dict, export_stages, exports_only, state_branch
from .fx_checks import preserved_state
from .fx_cut import ancestors, copy_stage_input, cut_stages

__all__ = [
    "attach_exits",
    "auto_branch",
    "conv_branch",
    "linear_branch",
    "pool_linear_branch",
    "token_branch",
    "torchvision_exits",
]


def attach_exits(
    model: nn.Module,
    after: Sequence[str],
    *,
    example_input: torch.Tensor | dict,
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

    Models torch.fx cannot trace (Hugging Face Transformers, or any whose fx trace
    fails), or given ``example_input`` as the model's keyword arguments, are cut from
    their ``torch.export`` graph instead
    (:mod:`branchynet.models.export_cut`): the stages then pass a tuple of tensors
    ``(features, attention_mask, ...)``, the result takes the model's keyword arguments
    and its default side branches pool the unmasked tokens
    (:class:`~branchynet.models.branches.TokenBranch`).

    Args:
        model: the network; its forward takes one tensor [B, ...] (or the keyword
            arguments of ``example_input``) and returns the final logits [B, C] (or an
            output with ``.logits``, as Hugging Face models do).
        after: names from ``model.named_modules()``, in network order, after whose output
            a side branch reads the features (e.g. ``["layer1", "layer2"]`` for a
            torchvision ResNet). Each module must run once per forward, and its output must
            be the only value that flows on (so not a layer inside a residual block).
        example_input: an input batch [B, ...] (B >= 1), or the model's keyword arguments
            as a dict of tensors (``{"input_ids": [B, S], "attention_mask": [B, S]}``);
            one eval-mode forward on it sizes the side branches and checks the cuts. A
            tensor's shape without B is the model's ``input_shape``.
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
        RuntimeError: neither torch.fx nor torch.export can trace the model (use
            ``leaf_modules`` or :func:`branchynet.from_stages`).
    """
    cuts, branches = _check_cuts(model, after, example_input, branches)
    shape = tuple(example_input.shape[1:]) if isinstance(example_input, torch.Tensor) else None
    stages, example_input, exported = _cut(model, cuts, example_input, tuple(leaf_modules))
    states = _features_at_cuts(model, stages, example_input, cuts)
    features = [h[0] for h in states[:-1]] + states[-1:] if exported else states
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
            f = features[s]
            b = (TokenBranch(f.shape[2], num_classes) if exported and branch_factory is auto_branch
                 and f.dim() == 3 else branch_factory(f, num_classes))
            b = b.to(device=f.device, dtype=f.dtype)
        if not isinstance(b, nn.Module):
            raise TypeError(f"branch {s} must be an nn.Module, got {type(b).__name__}")
        built.append((state_branch(b) if exported else b).train(model.training))
    net = BranchyNet(stages, built + [nn.Identity()], exit_config=exit_config, input_shape=shape,
                     num_classes=num_classes)
    net.multi_tensor = exported
    return net


def _cut(model, cuts: list, example_input, leaf_modules: tuple) -> tuple:
    """``(stages, example_input, exported)``: the fx cut where fx traces the model, else
    the cut of its exported graph (then the example becomes the model's keyword
    arguments and the first stage takes them)."""
    fx_error = None
    if not (isinstance(example_input, dict) or exports_only(model)):
        try:
            return cut_stages(model, cuts, leaf_modules), example_input, False
        except RuntimeError as err:  # torch.fx cannot trace it: the exported graph may do
            fx_error = err
    example_input = as_input_dict(model, example_input)
    try:
        stages = export_stages(model, cuts, example_input)
    except RuntimeError as err:
        if fx_error is None:
            raise
        raise RuntimeError(f"{fx_error}; and {err}") from err
    stages[0] = InputStage(stages[0], list(example_input))
    return stages, example_input, True


def _check_cuts(model, after, example_input, branches) -> tuple:
    """``(cuts, branches)`` as lists, after the checks that need no tracing: names of
    modules of ``model``, none twice or inside another, one branch per cut."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(after, str):
        raise TypeError(f"after must be a list of module names, got the string {after!r}")
    cuts = list(after)
    if not cuts:
        raise ValueError("after must name at least one module of the model")
    first = first_tensor(example_input) if isinstance(example_input, dict) else example_input
    if not isinstance(first, torch.Tensor) or first.dim() < 1 or first.shape[0] < 1:
        raise ValueError("example_input must be a tensor [B, ...] with B >= 1, or the model's keyword "
                         "arguments as a dict of such tensors")
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
        outer = [p for p in ancestors(name) if p in cuts]
        if outer:
            raise ValueError(f"after: {name!r} is inside {outer[0]!r}; cut at one of them")
    if branches is not None:
        branches = list(branches)
        if len(branches) != len(cuts):
            raise ValueError(f"branches: expected {len(cuts)} (one per cut), got {len(branches)}")
    return cuts, branches


def _features_at_cuts(model, stages, example_input, cuts) -> list:
    """Every stage's output on ``example_input`` from one eval-mode forward (it sizes the
    branches and checks what flows at every cut); the train/eval modes and the buffers
    (a leaf module may update its own) are restored. A stage seen modifying its cut's
    output in place gets its own copy of it, and the pass runs again."""
    for _ in range(2):
        copied = []
        features = _stage_outputs(model, stages, example_input, cuts, copied)
        if not copied:
            break
    return features


def _stage_outputs(model, stages, example_input, cuts, copied: list) -> list:
    modes = {m: m.training for m in model.modules()}
    features = []
    try:
        for st in stages:
            st.eval()
        with torch.no_grad(), preserved_state(model):
            h = example_input
            b = first_tensor(h).shape[0]
            for s, st in enumerate(stages):
                version = h._version if isinstance(h, torch.Tensor) else None
                out = st(h)
                if s > 0 and version is not None and h._version != version:
                    copy_stage_input(st, model)  # a leaf module's in-place op on the cut's output
                    copied.append(s)
                h = out
                features.append(h)
                what = cuts[s] if s < len(cuts) else "the model"
                f = h[0] if isinstance(h, tuple) and s < len(cuts) else h
                if not isinstance(f, torch.Tensor) or f.dim() < 1 or f.shape[0] != b:
                    got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                    raise ValueError(f"the output of {what!r} must be a tensor [B={b}, ...], got {got}")
    finally:
        for m, mode in modes.items():
            m.training = mode
        for st in stages:
            st.train(model.training)
    return features


# torchvision_models builds on attach_exits, so it is imported after it is defined.
from .torchvision_models import torchvision_exits  # noqa: E402
