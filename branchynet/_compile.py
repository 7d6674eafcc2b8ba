"""How the engine's stages are compiled: ``compile=`` and ``buckets=`` checked and
normalised, the row counts a warm-up visits, and a region function with a code object of
its own (dynamo keeps its graphs per code object)."""

from __future__ import annotations

import types

import torch

__all__ = ["compile_kwargs", "check_buckets", "warm_counts", "first_stage_inputs", "own_code"]


def first_stage_inputs(x: torch.Tensor, k: int) -> list:
    """k rows of x (repeated as needed) as a caller may pass them: a slice of a larger
    batch and a tensor of its own, of x's kind (normal or inference tensor). Dynamo's
    guards tell these apart (a view's base is an input too)."""
    with torch.inference_mode(x.is_inference()):
        big = x.repeat(-(-(k + 1) // x.shape[0]), *([1] * (x.dim() - 1)))
        return [big[:k], big[:k].clone()]


def warm_counts(b: int) -> list:
    """Row counts up to b at which a dynamic-batch graph may be specialised: 1, the
    powers of two and b (torch specialises sizes 0 and 1, and the CPU's convolution
    backend switches at a batch of 16)."""
    ks = {b}
    p = 1
    while p < b:
        ks.add(p)
        p *= 2
    return sorted(ks)


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_COMPILE_KEYS = ("mode", "backend", "options", "fullgraph")


def compile_kwargs(compile) -> dict | None:
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, str):
        if compile not in _COMPILE_MODES:
            raise ValueError(f"compile must be True, False, one of {_COMPILE_MODES} or a dict of "
                             f"torch.compile arguments, got {compile!r}")
        return {} if compile == "default" else {"mode": compile}
    if isinstance(compile, dict):
        unknown = sorted(set(compile) - set(_COMPILE_KEYS))
        if unknown:
            raise ValueError(f"compile: unsupported torch.compile arguments {unknown} (the engine sets "
                             f"dynamic itself); allowed: {_COMPILE_KEYS}")
        mode = compile.get("mode")
        if mode is not None and mode not in _COMPILE_MODES:
            raise ValueError(f"compile['mode'] must be one of {_COMPILE_MODES}, got {mode!r}")
        return {k: v for k, v in compile.items() if not (k == "mode" and v == "default")}
    raise TypeError(f"compile must be a bool, a mode string or a dict, got {type(compile).__name__}")


def check_buckets(buckets, compile_kwargs):
    if buckets is None:
        return "pow2" if compile_kwargs is not None and compile_kwargs.get("mode") == "reduce-overhead" else None
    if buckets is False:
        return None
    if compile_kwargs is None:
        raise ValueError("buckets pad the batches of compiled stages: pass compile=True (or a mode) too")
    if buckets is True:
        return "pow2"
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
        raise TypeError(f"buckets must be None, a bool or a sequence of ints, got {type(buckets).__name__}")
    sizes = list(buckets)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"buckets must be a non-empty sequence of ints >= 1, got {buckets!r}")
    return tuple(sorted(set(sizes)))


def own_code(fn, name: str):
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs (and its
    recompile limit) per code object, so regions made from one ``def`` would otherwise
    share them and evict each other."""
    code = fn.__code__
    repl = {"co_name": name}
    if hasattr(code, "co_qualname"):
        repl["co_qualname"] = name
    return types.FunctionType(code.replace(**repl), fn.__globals__, name, fn.__defaults__, fn.__closure__)
