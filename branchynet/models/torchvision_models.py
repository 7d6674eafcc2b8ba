"""torchvision models by name with exits after named modules, rebuilt from checkpoints.

:func:`torchvision_exits` is what ``branchynet train --arch torchvision:NAME --after ..``
builds and what ``model.arch == {"name": "torchvision", ...}`` rebuilds on load.
"""

from __future__ import annotations

import difflib
import warnings
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..config import ExitConfig
from .attach import attach_exits
from .branches import auto_branch, conv_branch
from .branchynet import BranchyNet

__all__ = ["torchvision_exits"]

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
