"""argparse ``type=`` validators the ``branchynet`` subcommands share (``cli.py``
imports this module as ``check``).

They check what can be checked from the flags alone (names, devices, where the results
go) while parsing, so a typo is an argparse error line and exit status 2 before a data
set is loaded or an epoch run. Each returns its text unchanged (`int_at_least`: the int).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def int_at_least(low: int):
    """An integer >= ``low`` (returned as an int)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v
    return parse


def dataset(text: str) -> str:
    """``--dataset``: a name (or alias) of :data:`branchynet.data.DATASETS`."""
    from .data import dataset_key

    try:
        dataset_key(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def device(text: str) -> str:
    """``--device``: a device name torch knows, present in this process."""
    from .devices import DeviceUnavailable, check_device

    try:
        check_device(text, "")  # argparse names the flag
    except (ValueError, DeviceUnavailable) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def backend(allow_auto: bool):
    """``--backend``: an exit-op backend name (or ``auto`` where the command takes it)."""
    def parse(text: str) -> str:
        from .ops import BACKENDS

        if text in BACKENDS or (allow_auto and text == "auto"):
            return text
        names = ", ".join(BACKENDS)
        raise argparse.ArgumentTypeError(
            f"expected {'auto or ' if allow_auto else ''}one of {names}, got {text!r}")
    return parse


def cannot_write(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be written as a ``"file"`` (written next to itself and renamed
    over: its folder must be writable) or a ``"folder"`` (created if missing); None if it
    can. Refused: a path component that is a file, a path of the other kind, a folder
    that would hold it and is not writable."""
    if path.exists() and path.is_dir() != (kind == "folder"):
        return f"cannot write {path}: it is a {'folder' if path.is_dir() else 'file'}, expected a {kind}"
    holder = path if kind == "folder" and path.exists() else path.parent
    while not holder.exists():  # the first folder that is there: the rest is created
        holder = holder.parent
    if not holder.is_dir():
        return f"cannot write {path}: {holder} is a file, not a folder"
    if not os.access(holder, os.W_OK | os.X_OK):
        return f"cannot write {path}: {holder} is not writable"
    return None


def writable(kind: str):
    """``--out`` checked by :func:`cannot_write` while parsing."""
    def parse(text: str) -> str:
        why = cannot_write(Path(text), kind)
        if why:
            raise argparse.ArgumentTypeError(why)
        return text
    return parse
