"""Checkpoints: one file that rebuilds a trained BranchyNet, its exits and its engine.

A checkpoint is ``torch.save`` of a dict holding only tensors and plain Python types, so
``torch.load(path, weights_only=True)`` reads it and loading one never runs code from
the file. It holds::

    format        "branchynet-checkpoint"
    version       1
    arch          {"name": str, "kwargs": dict}   the factory that rebuilds the model
    exit_config   ExitConfig.to_dict()           thresholds, loss weights, criterion
    state_dict    the weights
    input_shape   list of ints or None
    num_classes   int or None
    optimizer     optimizer.state_dict() or None (to resume training)
    epoch         int or None                    epochs completed
    rng           RNG states or None             (to resume training bit for bit)
    temperature   list of N floats or None       temperatures folded into the branches'
                                                 last linear layers (already in state_dict)
    extra         dict                           e.g. calibration results, train history
    torch_version, branchynet_version            strings, for the record

The model is rebuilt by name through :func:`branchynet.models.registry.build_model`, so
only models built by a registered factory (``model.arch`` set) can be saved this way.
"""

from __future__ import annotations

import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .config import ExitConfig

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "load_checkpoint",
    "build_from_checkpoint",
    "load_engine",
    "read_checkpoint",
    "save_checkpoint",
    "update_checkpoint",
]

FORMAT = "branchynet-checkpoint"
VERSION = 1


# What torch.save's legacy format starts with: pickle protocol 2, then torch's magic
# number 0x1950a86a20f9469cfc6c as a pickled long.
_LEGACY_HEAD = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


class CheckpointError(ValueError):
    """A file that cannot be loaded as a branchynet checkpoint; the message says why."""


# -- saving --------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    model,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    extra: dict | None = None,
    rng: bool = False,
    temperature=None,
) -> Path:
    """Save a BranchyNet (and optionally its training state) to one file.

    The file is written next to ``path`` and renamed over it, so an interrupted save
    leaves the previous checkpoint intact (training saves after every epoch).

    Args:
        path: the file to write.
        model: a :class:`~branchynet.BranchyNet` built by a registered factory
            (``model.arch`` = ``{"name", "kwargs"}``).
        optimizer: its ``state_dict()`` is saved, to resume training.
        epoch: number of epochs completed.
        extra: plain data to keep alongside (str keys; values tensors, numbers, strings,
            lists, tuples, dicts, None), e.g. calibration results.
        rng: also save the torch (CPU and CUDA), numpy and Python RNG states.
        temperature: N temperatures already folded into the weights (a record: the
            saved weights give the scaled logits).

    Returns:
        The path written.

    Raises:
        ValueError: the model has no ``arch`` (e.g. built with ``from_stages``), or
            ``arch`` / ``extra`` hold values other than plain data.
    """
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError(
            "this model has no architecture record (model.arch is None): models built with "
            "from_stages/from_sequential cannot be rebuilt by name, so save_checkpoint cannot "
            "save them; save the weights with torch.save(model.state_dict(), path) and rebuild "
            "the model in code before load_state_dict"
        )
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise ValueError(f"model.arch must be {{'name': str, 'kwargs': dict}}, got {arch!r}")
    kwargs = dict(arch.get("kwargs") or {})
    # The exit config is saved on its own (and may have changed since the model was built:
    # calibration sets thresholds), so the factory gets it from there on load.
    kwargs.pop("exit_config", None)
    _check_plain(kwargs, "model.arch['kwargs']")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    _check_plain(extra, "extra")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise ValueError(f"epoch must be an int, got {epoch!r}")
    temperature = _check_temperature(temperature, model.num_exits)

    from . import __version__

    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "arch": {"name": arch["name"], "kwargs": kwargs},
        "exit_config": model.exit_config.to_dict(),
        "state_dict": OrderedDict((k, v.detach()) for k, v in model.state_dict().items()),
        "input_shape": list(model.input_shape) if model.input_shape is not None else None,
        "num_classes": model.num_classes,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "rng": rng_state() if rng else None,
        "temperature": temperature,
        "extra": extra,
        "torch_version": str(torch.__version__),
        "branchynet_version": __version__,
    }
    return _write(path, ckpt)


def _write(path, ckpt: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_temperature(temperature, num_exits: int):
    if temperature is None:
        return None
    values = [float(t) for t in temperature]
    if len(values) != num_exits or not all(t > 0 and t < float("inf") for t in values):
        raise ValueError(f"temperature: expected {num_exits} finite values > 0 (one per exit), got {values}")
    return values


def update_checkpoint(path: str | os.PathLike, model, *, extra: dict | None = None,
                      temperature=None) -> Path:
    """Write ``model``'s weights and exit config into an existing checkpoint, keeping
    everything else it holds (optimizer, epoch, RNG states: ``train --resume`` still
    works), e.g. after calibration.

    Args:
        path: a file written by :func:`save_checkpoint` (rewritten atomically).
        model: the same architecture, e.g. with new thresholds or folded temperatures.
        extra: merged into the saved ``extra`` (these keys replace the saved ones).
        temperature: N temperatures just folded into ``model``'s weights; multiplied into
            the saved ones (folding twice divides the logits twice).

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also weights that do not fit.
    """
    ckpt = read_checkpoint(path)
    old = ckpt["state_dict"]
    new = OrderedDict((k, v.detach().to(old[k].device) if k in old else v.detach())
                      for k, v in model.state_dict().items())
    if set(new) != set(old) or any(new[k].shape != old[k].shape for k in new):
        raise CheckpointError(f"{path}: the model's weights do not fit the saved ones (another architecture?)")
    temperature = _check_temperature(temperature, model.num_exits)
    if temperature is not None and ckpt.get("temperature") is not None:
        temperature = [a * b for a, b in zip(ckpt["temperature"], temperature)]
    if extra is not None:
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
        _check_plain(extra, "extra")
        ckpt["extra"] = {**(ckpt.get("extra") or {}), **extra}
    ckpt["state_dict"] = new
    ckpt["exit_config"] = model.exit_config.to_dict()
    if temperature is not None:
        ckpt["temperature"] = temperature
    return _write(path, ckpt)


def _check_plain(obj, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.Size)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: keys must be str or int, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(
        f"{where} is a {type(obj).__name__}; checkpoints hold only tensors and plain Python "
        f"data (numbers, strings, lists, tuples, dicts, None) so that they load with "
        f"weights_only=True"
    )


def rng_state() -> dict:
    """Every RNG a training loop may draw from, as plain data."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # The numpy state's key array becomes a tensor: numpy arrays are not plain data.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- loading -------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and check a checkpoint file; returns the raw dict (see the module docstring).

    Raises:
        CheckpointError: missing, unreadable, truncated or corrupt file; a torch file that
            is not a branchynet checkpoint (e.g. a plain state_dict or a pickled model); a
            newer format version.
        DeviceUnavailable: ``map_location`` names a device this process does not have
            (checked before the file is read).
        ValueError: ``map_location`` is not a device name.
    """
    path = Path(path)
    if isinstance(map_location, (str, torch.device)):
        # before reading: torch reports a missing device as a failed load, which is not
        # the file's fault (it must never be called corrupt)
        from .devices import check_device

        check_device(map_location, "map_location")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_HEAD))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    # torch.save writes a zip archive; a pickle with torch's magic number is the legacy
    # (torch < 1.6) format; anything else is junk.
    is_zip, legacy = head[:4] == b"PK\x03\x04", head == _LEGACY_HEAD
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if (is_zip or legacy) and isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            # torch's message goes on to suggest weights_only=False, which would run
            # whatever code the file holds: not repeated here.
            kind = "a legacy (torch < 1.6, not zip) torch file that" if legacy else "it"
            raise CheckpointError(
                f"{path} is not a branchynet checkpoint: {kind} holds Python objects other than "
                f"tensors and plain data (a whole pickled model?), which are not unpickled because "
                f"unpickling can run code from the file. Write checkpoints with "
                f"branchynet.checkpoint.save_checkpoint."
            ) from err
        what = ("corrupt or truncated" if is_zip or legacy
                else "corrupt or not a torch file (random bytes?)")
        raise CheckpointError(
            f"{path} is {what}: torch.load failed ({type(err).__name__}: {first_line})"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(_foreign_message(path, ckpt))
    version = ckpt.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: checkpoint has no valid format version ({version!r})")
    if version > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer branchynet (checkpoint format version {version}; "
            f"this one reads up to {VERSION}); upgrade branchynet to load it"
        )
    missing = [k for k in ("arch", "exit_config", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    return ckpt


def _foreign_message(path: Path, obj) -> str:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:3]
        return (
            f"{path} is not a branchynet checkpoint: it has no 'format' tag and looks like a "
            f"plain state_dict (keys {keys}...). Build the model in code and call "
            f"model.load_state_dict(torch.load(path)), or save with "
            f"branchynet.checkpoint.save_checkpoint to get a self-describing file"
        )
    what = type(obj).__name__
    if isinstance(obj, dict):
        what = f"dict with keys {list(obj)[:5]}"
    return (
        f"{path} is not a branchynet checkpoint: no '{FORMAT}' format tag (the file holds a "
        f"{what}); write checkpoints with branchynet.checkpoint.save_checkpoint"
    )


def load_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """Rebuild a BranchyNet from a checkpoint: architecture, weights and exit config.

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: where the tensors go (as in ``torch.load``).

    Returns:
        The :class:`~branchynet.BranchyNet` in eval mode, with the saved weights (loaded
        strictly) and ``exit_config`` (thresholds included).

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also an architecture this version
            does not know, or weights that do not fit it.
    """
    ckpt = read_checkpoint(path, map_location=map_location)
    return build_from_checkpoint(ckpt, Path(path))


def build_from_checkpoint(ckpt: dict, path: str | os.PathLike = "<checkpoint>"):
    """:func:`load_checkpoint` for a dict :func:`read_checkpoint` already returned (one
    read when the caller also needs its ``extra``); ``path`` names it in errors."""
    from .models.registry import MODELS, build_model

    arch = ckpt["arch"]
    name = arch.get("name") if isinstance(arch, dict) else None
    kwargs = arch.get("kwargs") if isinstance(arch, dict) else None
    if not isinstance(name, str) or _registry_key(name) not in {_registry_key(k) for k in MODELS}:
        raise CheckpointError(
            f"{path}: unknown architecture {name!r}; this branchynet knows {sorted(MODELS)}"
        )
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: arch['kwargs'] must be a dict, got {kwargs!r}")
    kwargs = dict(kwargs or {})
    try:
        exit_config = ExitConfig.from_dict(ckpt["exit_config"])
    except Exception as err:
        raise CheckpointError(f"{path}: invalid exit_config {ckpt['exit_config']!r}: {err}") from err
    try:
        model = build_model(name, exit_config=exit_config, **kwargs)
    except Exception as err:
        raise CheckpointError(
            f"{path}: could not rebuild {name!r} with {kwargs}: {type(err).__name__}: {err}"
        ) from err
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except Exception as err:
        raise CheckpointError(f"{path}: the saved weights do not fit {name!r}: {err}") from err
    device = next((t.device for t in ckpt["state_dict"].values()), None)
    if device is not None:
        model.to(device)
    model.exit_config = exit_config
    return model.eval()


def _registry_key(name: str) -> str:
    return name.lower().replace("-", "_")


def load_engine(path: str | os.PathLike, backend: str = "auto", map_location="cpu"):
    """An :class:`~branchynet.EarlyExitEngine` for a checkpoint, with its saved thresholds
    and criterion.

    Args:
        path: a file written by :func:`save_checkpoint`.
        backend: the engine's exit-op backend (``"auto"``, ``"cuda"``, ``"triton"``,
            ``"torch"``).
        map_location: where the model goes (as in ``torch.load``).
    """
    from .engine import EarlyExitEngine

    model = load_checkpoint(path, map_location=map_location)
    cfg = model.exit_config
    return EarlyExitEngine(model, thresholds=cfg.thresholds, backend=backend,
                           criterion=cfg.criterion)
