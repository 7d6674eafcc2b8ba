"""Devices named by the user (``--device``, ``map_location=``): parsed and checked to
exist in this process before any work, so that a missing GPU is reported as such and
never as a corrupt file or a traceback from deep inside torch."""

from __future__ import annotations

import torch

__all__ = ["DeviceUnavailable", "check_device"]


class DeviceUnavailable(RuntimeError):
    """A well-formed device that this process cannot use (no CUDA, an index past the last
    GPU); the message starts with "device unavailable"."""


def _count(kind: str) -> int | None:
    """How many ``kind`` devices this process sees (None when torch cannot tell)."""
    if kind == "cpu" or kind == "meta":
        return 1
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = getattr(torch, kind, None)
    if backend is None:
        return None
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        return 0
    count = getattr(backend, "device_count", None)
    return count() if count is not None else None


def check_device(device, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, checked to exist here.

    Args:
        device: a ``torch.device`` or a string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        what: how the caller names the argument, for the messages ("" for none).

    Raises:
        ValueError: not a device name torch knows (e.g. ``"gpu"``).
        DeviceUnavailable: a device type or index this process does not have.
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{what + ': ' if what else ''}{device!r} is not a device name; expected e.g. "
                         f"cpu, cuda, cuda:0") from None
    named = f"{what + ' ' if what else ''}{str(dev)!r}"
    n = _count(dev.type)
    if n == 0:
        why = ("torch.cuda.is_available() is False: a CPU-only torch, or no GPU visible"
               if dev.type == "cuda" else f"torch.{dev.type} reports none")
        raise DeviceUnavailable(f"device unavailable: {named} ({why}); use cpu")
    if n is not None and dev.index is not None and dev.index >= n:
        raise DeviceUnavailable(f"device unavailable: {named} (this process sees {n} "
                                f"{dev.type} device(s), indices 0 to {n - 1})")
    return dev
