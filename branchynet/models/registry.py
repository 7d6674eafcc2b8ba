"""Name -> factory registry for the paper's networks."""

from __future__ import annotations

from typing import Callable

from .alexnet import b_alexnet
from .attach import torchvision_exits
from .branchynet import BranchyNet
from .hf import hf_exits
from .lenet import b_lenet
from .resnet import b_resnet110

__all__ = ["MODELS", "build_model"]

#: The paper's networks by factory name (``arch["name"]`` of the models they build), and
#: ``"torchvision"``: exits on a torchvision model (:func:`~branchynet.models.attach.torchvision_exits`).
MODELS: dict[str, Callable[..., BranchyNet]] = {
    "b_lenet": b_lenet,
    "b_alexnet": b_alexnet,
    "b_resnet110": b_resnet110,
    "torchvision": torchvision_exits,  # exits on a torchvision model (needs torchvision)
    "hf": hf_exits,  # exits on a Hugging Face model (needs transformers)
}


def build_model(name: str, **kwargs) -> BranchyNet:
    """Build a registered network by name; ``-`` and ``_`` are interchangeable ("b-lenet").

    Args:
        name: a key of :data:`MODELS`, case-insensitive, with ``-`` or ``_``.
        **kwargs: passed to the factory (e.g. ``num_classes``, ``exit_config``).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)
