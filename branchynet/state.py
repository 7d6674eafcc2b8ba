"""Stage states of several tensors: what flows between stages when it is not one tensor.

A stage may take and return a tuple (or a dict, or a list) of tensors, as a Transformer
stage does (hidden states [B, S, D], the attention mask [B, S], ...). The engine compacts
such a state by gathering every tensor whose first dimension is the batch (the first
tensor of the state gives B) and passing the rest (scalars, ``None``, tensors of another
first size) as they are. A one-tensor state never comes here: the engine keeps the
bound op's gather for it.
"""

from __future__ import annotations

import torch

__all__ = ["batch_size", "first_tensor", "gather_state", "slice_state", "state_input", "to_device"]


def state_input(x, inputs: dict):
    """The first stage's state from an engine call: ``x`` (a tensor, tuple or dict) or
    the model's keyword arguments as a dict (``{"input_ids": ..., ...}``)."""
    if inputs:
        if x is not None:
            raise TypeError("pass either x or the model's keyword arguments, not both")
        return dict(inputs)
    if not isinstance(x, (torch.Tensor, tuple, dict)):
        raise TypeError(f"x must be a torch.Tensor [B, ...], a tuple or dict of tensors, or the "
                        f"model's keyword arguments; got {type(x).__name__}")
    return x


def first_tensor(h) -> torch.Tensor | None:
    """The first tensor of a state in its order (depth first), or None."""
    if isinstance(h, torch.Tensor):
        return h
    items = h.values() if isinstance(h, dict) else h if isinstance(h, (tuple, list)) else ()
    for v in items:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(h) -> int:
    """B of a state: the first dimension of its first tensor."""
    t = first_tensor(h)
    if t is None or t.dim() == 0:
        raise ValueError("a stage state must hold a tensor [B, ...] (its first tensor gives B), "
                         f"got {_describe(h)}")
    return t.shape[0]


def _map(h, fn):
    if isinstance(h, torch.Tensor):
        return fn(h)
    if isinstance(h, dict):
        return {k: _map(v, fn) for k, v in h.items()}
    if isinstance(h, tuple):
        items = [_map(v, fn) for v in h]
        return type(h)(*items) if hasattr(h, "_fields") else tuple(items)
    if isinstance(h, list):
        return [_map(v, fn) for v in h]
    return h


def gather_state(gather, h, index: torch.Tensor):
    """``h`` at the rows ``index`` [K]: every tensor of ``h`` whose first dimension is B
    through ``gather(tensor, index)`` (the bound exit op's gather), the rest as it is.

    Shapes:
        each batch tensor [B, ...] -> [K, ...].
    """
    k = batch_size(h)
    return _map(h, lambda t: gather(t, index) if t.dim() and t.shape[0] == k else t)


def slice_state(h, start: int, stop: int):
    """Rows ``start:stop`` of every batch tensor of ``h`` (the one-sample runs)."""
    k = batch_size(h)
    return _map(h, lambda t: t[start:stop] if t.dim() and t.shape[0] == k else t)


def to_device(h, device, non_blocking: bool = False):
    """A batch's inputs (a tensor, or a tuple or dict of them) on ``device``."""
    if isinstance(h, torch.Tensor):
        return h.to(device, non_blocking=non_blocking)
    return _map(h, lambda t: t.to(device, non_blocking=non_blocking))


def check_state(h, device: torch.device | None) -> tuple:
    """``(B, device)`` of a first-stage state, after checking that it holds a tensor [B, ...]
    and that its tensors are on the model's ``device``."""
    b = batch_size(h)
    dev = first_tensor(h).device
    bad = []
    _map(h, lambda t: bad.append(t.device) if t.device != dev else None)
    if bad or (device is not None and dev != device):
        raise ValueError(f"every input tensor must be on the model's device {device}, got "
                         f"{sorted({str(d) for d in [dev, *bad]})}")
    return b, dev


def _describe(h) -> str:
    if isinstance(h, dict):
        return "a dict of " + ", ".join(f"{k}: {type(v).__name__}" for k, v in h.items())
    return type(h).__name__
