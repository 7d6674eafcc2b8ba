"""GPU properties of the Triton kernels, checked on a machine without a GPU.

Every launch configuration the dispatcher of :mod:`branchynet.kernels.exit_step` can pick
is compiled ahead of time for sm_90 (H100) with ``triton.compile`` and the ``ptxas`` that
ships with Triton, and ``ptxas -v`` reports its registers and spills; and the launcher is
run with a recording stand-in for the kernels over K = 1..4096 to count the distinct
compiled variants (Triton's own specialisation key) the engine can trigger.

Run as ``TRITON_INTERPRET=0 python -m branchynet.kernels.aot [--full] [--json]``; the
tests (tests/test_aot.py) run the representative grid, ``--full`` compiles every
configuration (a few minutes on 2 cores). Compiled PTX is cached by Triton
(``~/.triton/cache``) and ptxas reports by the PTX's hash (``BRANCHYNET_AOT_CACHE``,
default ``~/.cache/branchynet/aot.json``), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["tile_configs", "chunked_configs", "gather_configs", "ptxas_report", "compile_config",
           "count_variants", "run"]

ARCH = 90
DTYPES = {"fp32": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}
_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_INT_PTR = {1: "*i8", 2: "*i16", 4: "*i32", 8: "*i64"}


def _tk():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run with TRITON_INTERPRET=0: the interpreter has nothing to compile")
    from branchynet.kernels import exit_step as tk

    return tk


def tile_configs():
    """Distinct ``(ROWS, BLOCK_C, num_warps)`` of the tile kernel over C = 1..MAX_TILE_C."""
    tk = _tk()
    out, c = [], 1
    while c <= tk.MAX_TILE_C:
        kind, rows, width, warps = tk.exit_step_config(c)
        assert kind == "tile"
        out.append((rows, width, warps))
        c *= 2
    return sorted(set(out), key=lambda t: t[1])


def chunked_configs():
    """Distinct ``(ROWS, CHUNK, num_warps)`` of the chunked kernel (C > MAX_TILE_C)."""
    tk = _tk()
    return sorted({tk.exit_step_config(c)[1:] for c in (tk.MAX_TILE_C + 1, 20000, 1 << 20)})


def gather_configs():
    """Distinct ``(ROWS, BLOCK_N, num_warps)`` of the gather over rows of 1..2**20 elements."""
    tk = _tk()
    return sorted({tk.gather_config(1 << i) for i in range(21)}, key=lambda t: t[1])


def _signature(fn, ptr_types: dict, default_ptr: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name.endswith("_ptr"):
            sig[name] = default_ptr
        elif name == "threshold":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _cache_path() -> Path:
    return Path(os.environ.get("BRANCHYNET_AOT_CACHE", Path.home() / ".cache" / "branchynet" / "aot.json"))


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache))
    except OSError:  # a read-only home is no reason to fail the check
        pass


def ptxas_report(ptx: str, cache: dict | None = None) -> dict:
    """``{"registers": n, "spill_stores": bytes, "spill_loads": bytes}`` of ``ptxas -v``
    for sm_90a, with the flags Triton itself passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(ARCH).path
    key = hashlib.sha256((ptxas + "\0" + ptx).encode()).hexdigest()
    if cache is not None and key in cache:
        return cache[key]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCH}a",
                               str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log[-4000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log[-4000:]}")
    out = {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
           "spill_loads": int(spills.group(2))}
    if cache is not None:
        cache[key] = out
    return out


def compile_config(kernel: str, dtype: str, criterion: int, last: bool, cfg: tuple,
                   cache: dict | None = None) -> dict:
    """Compile one configuration for sm_90 and return its ptxas report.

    ``kernel`` is ``"tile"``, ``"chunked"`` or ``"gather"``; for the gather, ``dtype`` is
    the element width in bytes (the copy moves same-width integers) and ``criterion`` and
    ``last`` are ignored.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tk = _tk()
    rows, width, warps = cfg
    if kernel == "gather":
        fn = tk._gather_rows_kernel
        constexprs = {"ROWS": rows, "BLOCK_N": width}
        ptr = _INT_PTR[int(dtype)]
        sig = _signature(fn, {"idx_ptr": "*i64"}, ptr, constexprs)
    else:
        fn = tk._exit_step_tile_kernel if kernel == "tile" else tk._exit_step_chunked_kernel
        constexprs = {"CRITERION": criterion, "LAST": last, "ROWS": rows,
                      ("BLOCK_C" if kernel == "tile" else "CHUNK"): width}
        ptr = _PTR[dtype]
        sig = _signature(fn, {"logits_ptr": ptr, "out_logits_ptr": ptr, "out_ent_ptr": "*fp32"},
                         "*i64", constexprs)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", ARCH, 32), options={"num_warps": warps})
    return ptxas_report(compiled.asm["ptx"], cache)


def grid(full: bool) -> list:
    """The configurations to compile: ``(kernel, dtype, criterion, last, cfg)``.

    ``full``: every configuration the dispatcher can pick (dtypes x criteria x last x
    the tile kernel's C range, the chunked kernel, the gather's row widths x element
    widths). Otherwise a representative grid for CI: every tile width for the heaviest
    variants (margin and patience, a side exit: patience is the heavier at BLOCK_C
    16-128, margin at most others), margin in fp32 and bf16, patience in fp32; every dtype x criterion x last at
    the widths closest to spilling (BLOCK_C 128, and the widest tile); the chunked kernel
    per dtype and last for the margin and patience; the gather at the narrowest, a middle
    and the widest block for every element width.
    """
    tiles, chunks, gathers = tile_configs(), chunked_configs(), gather_configs()
    out = []
    # 0-2: entropy, max probability, margin; 3: patience (its state's loads and stores).
    crits, lasts = (0, 1, 2, 3), (False, True)
    if full:
        for d in DTYPES:
            for c in crits:
                for last in lasts:
                    out += [("tile", d, c, last, cfg) for cfg in tiles]
                    out += [("chunked", d, c, last, cfg) for cfg in chunks]
        out += [("gather", str(w), 0, False, cfg) for w in _INT_PTR for cfg in gathers]
        return out
    # Patience at every width in fp32 only (the full grid has every dtype): CI time.
    heavy = [(d, 2, False) for d in ("fp32", "bf16")] + [("fp32", 3, False)]
    for d, c, last in heavy:
        out += [("tile", d, c, last, cfg) for cfg in tiles]
    hot = [cfg for cfg in tiles if cfg[1] in (128, tiles[-1][1])]
    for d in DTYPES:
        for c in crits:
            for last in lasts:
                out += [("tile", d, c, last, cfg) for cfg in hot if (d, c, last) not in heavy]
        for last in lasts:  # the last exit spilled where the side exit did not
            out += [("chunked", d, c, last, cfg) for c in (2, 3) for cfg in chunks]
    sample = [gathers[0], gathers[len(gathers) // 2], gathers[-1]]
    out += [("gather", w, 0, False, cfg) for w in map(str, _INT_PTR) for cfg in sample]
    return out


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records Triton's
    specialisation key (the cache key of a compiled variant) instead of launching."""

    def __init__(self, real, keys: set, grids: list):
        self.real, self.keys, self.grids = real, keys, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.backends import BaseBackend
            from triton.runtime.jit import native_specialize_impl

            bound = dict(zip(self.real.arg_names, args))
            bound.update({k: v for k, v in kwargs.items() if k in self.real.arg_names})
            options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.real.arg_names))
            spec = []
            for p in self.real.params:
                v = bound[p.name]
                if p.is_constexpr:
                    spec.append(("constexpr", v))
                else:
                    spec.append(tuple(native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                                             not p.do_not_specialize_on_alignment)))
            self.keys.add((self.real.fn.__name__, tuple(spec), options))
            self.grids.append(grid)
        return launch


def count_variants(c: int, dtype: str = "fp32", criterion: int = 0, last: bool = False,
                   ks=range(1, 4097)) -> tuple:
    """Distinct compiled variants the engine triggers at one exit over survivor counts
    ``ks``, and the grid of each launch: ``(variants, grids)``.

    The engine hands the exit op freshly allocated logits ``[K, C]`` and the survivors'
    rows as a prefix of its buffer, with fixed ``[B, ...]`` output buffers (and, for
    patience, criterion 3, its fixed ``[B, 2]`` state).
    """
    import torch

    tk = _tk()
    keys, grids = set(), []
    saved = tk._exit_step_tile_kernel, tk._exit_step_chunked_kernel
    tk._exit_step_tile_kernel = _Recorder(saved[0], keys, grids)
    tk._exit_step_chunked_kernel = _Recorder(saved[1], keys, grids)
    try:
        dt = getattr(torch, DTYPES[dtype].split(".")[1])
        b = max(ks)
        out = (torch.empty(b, c, dtype=dt), torch.empty(b, dtype=torch.int64),
               torch.empty(b, dtype=torch.int64), torch.empty(b))
        rows_buf = torch.arange(b)
        state = torch.zeros(b, 2, dtype=torch.int64) if criterion == 3 else None
        for k in ks:
            # Exits 0, 1, 2: the first (where patience does not read its state) and two more.
            tk.exit_step_triton(torch.empty(k, c, dtype=dt), rows_buf[:k], 0.5, k % 3, *out,
                                criterion=criterion, last=last, patience_state=state)
    finally:
        tk._exit_step_tile_kernel, tk._exit_step_chunked_kernel = saved
    return len(keys), grids


def count_gather_variants(n: int, ms=range(1, 4097)) -> int:
    """Distinct compiled variants of the gather over ``ms`` gathered rows of ``n`` floats."""
    import torch

    tk = _tk()
    keys, grids = set(), []
    saved = tk._gather_rows_kernel
    tk._gather_rows_kernel = _Recorder(saved, keys, grids)
    try:
        features = torch.empty(max(ms), n)
        for m in ms:
            tk.gather_rows_triton(features, torch.arange(m))
    finally:
        tk._gather_rows_kernel = saved
    return len(keys)


def versions() -> dict:
    """What compiled the report: Triton, its ptxas, torch, the target."""
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(ARCH)
    return {"triton": triton.__version__, "ptxas": str(getattr(ptxas, "version", "?")),
            "torch": torch.__version__, "target": f"sm_{ARCH}a",
            "checked_triton": _tk().triton_checked()}


def run(full: bool = False) -> dict:
    """Compile the grid and count the variants; the report as a dict."""
    cache = _load_cache()
    compiled = []
    try:
        for kernel, dtype, crit, last, cfg in grid(full):
            rep = compile_config(kernel, dtype, crit, last, cfg, cache)
            compiled.append({"kernel": kernel, "dtype": dtype, "criterion": crit, "last": last,
                             "rows": cfg[0], "width": cfg[1], "num_warps": cfg[2], **rep})
    finally:
        _save_cache(cache)
    variants = {}
    for c in (1, 10, 100, 1000, 20000):
        for crit in (0, 2, 3):
            n, _ = count_variants(c, "fp32", crit, False, range(1, 4097) if c <= 1000 else range(1, 300))
            variants[f"C={c} criterion={crit}"] = n
    _, grids = count_variants(10, ks=[4097])
    return {"versions": versions(), "compiled": compiled, "exit_step_variants_k1_4096": variants,
            "gather_variants_m1_4096": {str(n): count_gather_variants(n) for n in (1, 100, 5000)},
            "programs_k4097_c10": grids[0][0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every configuration, not the CI grid")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    rep = run(args.full)
    if args.json:
        print(json.dumps(rep))
        return 0
    bad = [r for r in rep["compiled"] if r["spill_stores"] or r["spill_loads"]]
    for r in rep["compiled"]:
        print(f"{r['kernel']:8} {r['dtype']:5} crit={r['criterion']} last={int(r['last'])} "
              f"rows={r['rows']:<5} width={r['width']:<6} warps={r['num_warps']:<3} "
              f"regs={r['registers']:<4} spills={r['spill_stores']}/{r['spill_loads']} B")
    print("exit_step variants over K = 1..4096:", rep["exit_step_variants_k1_4096"])
    print("gather variants over M = 1..4096:", rep["gather_variants_m1_4096"])
    print("programs for K = 4097, C = 10:", rep["programs_k4097_c10"])
    v = rep["versions"]
    print(f"{len(rep['compiled'])} configurations compiled for {v['target']} by Triton {v['triton']} "
          f"(ptxas {v['ptxas']}, torch {v['torch']}), {len(bad)} spill")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
