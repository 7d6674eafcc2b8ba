"""Side branches for exits on any model: small classifiers sized from what flows at a cut.

A branch factory takes an example of the cut's features ([B, ...], from the model's
``example_input``) and the number of classes, and returns a module mapping those
features to logits [B, C]. :func:`auto_branch` picks one by the features' rank.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from ..blocks import conv_bn_relu, linear_head

__all__ = ["BranchFactory", "TokenBranch", "auto_branch", "conv_branch", "linear_branch", "pool_linear_branch",
           "token_branch"]

#: ``branch_factory(feature, num_classes) -> module``: ``feature`` is an example of what
#: flows at the cut ([B, ...], from ``example_input``); the module maps it to [B, C].
BranchFactory = Callable[[torch.Tensor, int], nn.Module]


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


class TokenBranch(nn.Module):
    """A side branch on a Transformer stage's state: the first token or the mean over the
    unmasked tokens, LayerNorm, linear.

    It reads the state of a stage cut from an exported graph, ``(h [B, S, D], mask [B, S]
    or None, ...)`` (or a bare ``h``): with ``pool="mean"`` the padded tokens (mask 0)
    are left out of the mean, so padding never changes what the branch sees.

    Args:
        dim: D.
        num_classes: K.
        pool: ``"mean"`` (over the unmasked tokens) or ``"cls"`` (token 0: BERT's [CLS],
            ViT's class token).

    Shapes:
        state ``(h [B, S, D], mask [B, S], ...)`` -> [B, num_classes].
    """

    #: attach_exits hands this branch the whole stage state, not only the features.
    takes_state = True

    def __init__(self, dim: int, num_classes: int, pool: str = "mean") -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, state) -> torch.Tensor:
        h, mask = (state[0], state[1]) if isinstance(state, tuple) else (state, None)
        if self.pool == "cls":
            v = h[:, 0]
        elif mask is None:
            v = h.mean(dim=1)
        else:
            m = mask.to(h.dtype).unsqueeze(-1)
            v = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        return self.fc(self.norm(v))

    def extra_repr(self) -> str:
        return f"pool={self.pool}"


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

