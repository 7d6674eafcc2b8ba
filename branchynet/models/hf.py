"""Hugging Face Transformers models with exits: loading them offline, cutting them.

transformers is an optional dependency (``pip install branchynet[hf]``), imported here
lazily. Weights come only from a local directory (``from_pretrained(path)`` with
``local_files_only``), never from the Hub at run time. The cut itself is
:mod:`branchynet.models.export_cut` (torch.fx cannot trace these models).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..config import ExitConfig

__all__ = ["hf_exits", "import_transformers", "load_hf_model"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def load_hf_model(source, num_classes: int | None = None):
    """A Hugging Face classification model, offline.

    Args:
        source: a local directory written by ``save_pretrained`` (its weights are
            loaded when it holds them; a config alone gives random weights), a
            ``config.json`` file, a config dict (with ``model_type``), or a
            ``PretrainedConfig``. Nothing is fetched from the Hub.
        num_classes: the classifier's K (``num_labels``); a pretrained classifier of
            another size is left as initialised.

    Returns:
        ``AutoModelForImageClassification`` for configs with an ``image_size`` (ViT),
        ``AutoModelForSequenceClassification`` otherwise, in eval mode.

    Raises:
        ValueError: a path that is neither a directory nor a JSON file, a config without
            ``model_type``.
    """
    tf = import_transformers()
    kw = {} if num_classes is None else {"num_labels": int(num_classes)}
    weights = None
    if isinstance(source, tf.PretrainedConfig):
        config = source
    elif isinstance(source, dict):
        config = _config_from_dict(tf, dict(source))
    else:
        path = Path(source)
        if path.is_dir():
            config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
            if any((path / f).exists() for f in _WEIGHT_FILES):
                weights = path
        elif path.is_file():
            try:
                config = _config_from_dict(tf, json.loads(path.read_text()))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not a JSON config ({err})") from err
        else:
            raise ValueError(f"{source!r} is neither a local model directory nor a config JSON file "
                             f"(models are never downloaded)")
    for k, v in kw.items():
        setattr(config, k, v)
    auto = (tf.AutoModelForImageClassification if hasattr(config, "image_size")
            else tf.AutoModelForSequenceClassification)
    if weights is not None:
        model = auto.from_pretrained(weights, config=config, local_files_only=True, ignore_mismatched_sizes=True)
    else:
        model = auto.from_config(config)
    return model.eval()


def _config_from_dict(tf, d: dict):
    kind = d.pop("model_type", None)
    if kind is None:
        raise ValueError("a Hugging Face config needs its model_type (e.g. 'bert', 'distilbert', 'vit')")
    return tf.AutoConfig.for_model(kind, **d)


def hf_exits(
    model,
    after: Sequence[str],
    num_classes: int,
    input_shape: Sequence[int] | None = None,
    *,
    weights: str | None = None,
    branch: str = "auto",
    seq_len: int = 16,
    exit_config: ExitConfig | None = None,
):
    """A Hugging Face model (local directory or config) with exits after the named
    modules; what ``branchynet train --arch hf:PATH_OR_CONFIG`` builds.

    The result records its recipe in ``model.arch`` (the config itself, so a checkpoint
    rebuilds it without the directory; the weights come from the checkpoint).

    Args:
        model: what :func:`load_hf_model` takes.
        after: module names to cut at, e.g. ``["bert.encoder.layer.1"]``.
        num_classes: C of every exit.
        input_shape: one image's shape ``(C, H, W)`` for image models (checked against
            the config); None for text models.
        weights: a local ``state_dict`` file for the Hugging Face model (tensors of
            another shape are left as initialised).
        branch: ``"auto"`` (mean over the unmasked tokens) or ``"cls"`` (first token).
        seq_len: the example's sequence length for text models (any length runs later).
        exit_config: as in :func:`~branchynet.models.attach.attach_exits`.
    """
    from .attach import attach_exits
    from .branches import TokenBranch
    from .torchvision_models import _load_matching

    if branch not in ("auto", "cls"):
        raise ValueError(f"branch must be 'auto' or 'cls' for a Transformers model, got {branch!r}")
    net = load_hf_model(model, num_classes)
    if weights is not None:
        _load_matching(net, weights)
    cfg = net.config
    if hasattr(cfg, "image_size"):
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if input_shape is not None and tuple(input_shape) != want:
            raise ValueError(f"input_shape {tuple(input_shape)}: the {cfg.model_type} config takes images "
                             f"{want} (set image_size and num_channels in its config)")
        example = torch.zeros(2, *want)
    else:
        if input_shape is not None:
            raise ValueError(f"{cfg.model_type} is a text model: it takes token ids, not images of shape "
                             f"{tuple(input_shape)}; train it through the Python API on token data")
        ids = torch.arange(2 * seq_len).remainder(cfg.vocab_size).view(2, seq_len)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pool = "mean" if branch == "auto" else "cls"
    bn_model = attach_exits(net, list(after), example_input=example, num_classes=num_classes,
                            branch_factory=lambda f, k: TokenBranch(f.shape[-1], k, pool), exit_config=exit_config)
    config = cfg.to_dict()
    bn_model.arch = {"name": "hf", "kwargs": {
        "model": config, "after": list(after), "num_classes": num_classes,
        "input_shape": None if input_shape is None else list(input_shape), "branch": branch, "seq_len": seq_len}}
    return bn_model.train()


def import_transformers():
    """The ``transformers`` module, or an ImportError saying how to install it."""
    _unshadow_hub_kernels()
    try:
        import transformers
    except ImportError as err:
        raise ImportError("exits on Hugging Face models need transformers: "
                          "pip install 'branchynet[hf]' (or pip install transformers)") from err
    return transformers


def _unshadow_hub_kernels() -> None:
    """transformers 5 imports the Hub's ``kernels`` package; run from the root of a source
    checkout, this repository's top-level ``kernels/`` folder (installed as
    ``branchynet.kernels``, never as ``kernels``) would shadow it and break that import.
    Load the installed one under its own name first."""
    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if spec is None or not spec.origin or os.path.dirname(os.path.dirname(spec.origin)) != checkout:
        return
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    real = importlib.machinery.PathFinder.find_spec("kernels", paths)
    if real is None:
        return
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    try:
        real.loader.exec_module(module)
    except Exception:
        del sys.modules["kernels"]
        raise
