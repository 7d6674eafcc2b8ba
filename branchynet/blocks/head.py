"""Classifier head: flatten a feature map, then fully connected layers."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["check_num_classes", "linear_head"]


def check_num_classes(num_classes: object, name: str = "num_classes") -> int:
    """Return ``num_classes`` if it is an int >= 2 (a bool is not), else raise ValueError."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{name} must be an int >= 2, got {num_classes!r}")
    return num_classes


def linear_head(in_features: int, num_classes: int,
                hidden_features: int | None = None) -> nn.Sequential:
    """``Flatten`` then ``Linear(in_features, num_classes)``.

    With ``hidden_features``, two linear layers with *no* nonlinearity between them,
    as in the authors' B-ResNet first branch (``Linear(7200, 3600), Linear(3600, 10)``).

    Shapes:
        [B, *] with ``prod(*) == in_features`` -> [B, num_classes].
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    if hidden_features is None:
        layers["fc"] = nn.Linear(in_features, num_classes)
    else:
        layers["fc1"] = nn.Linear(in_features, hidden_features)
        layers["fc2"] = nn.Linear(hidden_features, num_classes)
    return nn.Sequential(layers)
