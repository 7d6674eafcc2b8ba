"""Tables and plots from a pytest-benchmark JSON of the suites in this folder.

    python benchmarks/report.py bench.json [more.json ...] [--out DIR] [--note TEXT]

Prints markdown: the machine (pytest-benchmark's machine_info and commit_info, with the
torch / Triton / CUDA versions, GPU and driver that conftest.py adds), then per model and
exit profile the median time per sample of every provider (with the interquartile range),
the speedup over the backbone without exits, the ideal speedup from counted FLOPs and the
efficiency (measured / ideal); then the exit op: median time, achieved bandwidth, share
of a device copy's bandwidth, and speedups over eager PyTorch and torch.compile.
With ``--out`` it also writes ``report.md`` and PNG plots into DIR.

The functions take the parsed JSON dict, so they can be fed a hand-made one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from branchynet.tables import markdown_table

MODEL_ORDER = ("b_lenet", "b_alexnet", "b_resnet110")
PROFILE_ORDER = ("paper", "all_exit", "none_exit")
PROVIDER_ORDER = (
    "backbone_eager", "backbone_compile", "backbone_cudagraph", "naive", "per_sample",
    "engine_cuda", "engine_cuda_compile", "engine_cuda_graphs", "engine_triton",
    "engine_triton_compile", "engine_triton_graphs", "engine_cpp", "engine_cpp_compile",
    "engine_cpp_buckets", "engine_torch", "engine_torch_compile", "engine_torch_graphs",
)
OP_PROVIDER_ORDER = ("op_eager", "op_compile", "op_triton", "op_cuda", "op_cpp", "copy")
KERNEL_PROVIDERS = ("op_triton", "op_cuda", "op_cpp")
BASELINE = "backbone_eager"
COMPILED_BASELINE = "backbone_compile"


def _order(names, order):
    known = [n for n in order if n in names]
    return known + sorted(n for n in names if n not in order)


def _is_exit_provider(p: str) -> bool:
    return p in ("naive", "per_sample") or p.startswith("engine_")


def _is_compiled(p: str) -> bool:
    return p.endswith(("_compile", "_graphs", "_buckets"))


def load(*paths) -> dict:
    """Read one JSON, or merge several runs (split with ``-k``) into one: their
    benchmarks are concatenated; machine and commit info are the first run's."""
    data = None
    for path in paths:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if data is None:
            data = d
            continue
        data.setdefault("benchmarks", []).extend(d.get("benchmarks", []))
        ids = {(data.get("commit_info") or {}).get("id"), (d.get("commit_info") or {}).get("id")}
        if len(ids) > 1:
            data.setdefault("merged_commits", sorted(str(i) for i in ids))
    if data is None:
        raise ValueError("no JSON given")
    return data


# --- header -----------------------------------------------------------------------------

def header(data: dict) -> str:
    """Machine, software and commit, from the JSON."""
    mi = data.get("machine_info", {}) or {}
    ci = data.get("commit_info", {}) or {}
    cpu = mi.get("cpu", {}) or {}
    lines = ["## Machine", ""]

    def add(label, value):
        if value not in (None, "", {}):
            lines.append(f"- {label}: {value}")

    add("GPU", mi.get("gpu"))
    add("GPU driver", mi.get("driver_version"))
    add("GPU compute capability", mi.get("gpu_capability"))
    add("CPU", cpu.get("brand_raw") or mi.get("processor"))
    add("CPU cores (logical)", cpu.get("count"))
    add("torch threads", mi.get("torch_threads"))
    add("load average (1/5/15 min) at the end of the run", mi.get("load_avg_1_5_15min"))
    add("python", mi.get("python_version"))
    add("torch", mi.get("torch"))
    add("torch CUDA", mi.get("torch_cuda"))
    add("cuDNN", mi.get("cudnn"))
    add("triton", mi.get("triton"))
    add("branchynet", mi.get("branchynet"))
    be = mi.get("branchynet_backends")
    if isinstance(be, dict):
        add("branchynet backends", ", ".join(f"{k}={v}" for k, v in be.items()))
    add("benchmark device", mi.get("bench_device"))
    if ci:
        dirty = " (dirty working tree)" if ci.get("dirty") else ""
        add("commit", f"{ci.get('id', '?')} on {ci.get('branch', '?')}{dirty}, {ci.get('time', '')}")
    if data.get("merged_commits"):
        add("WARNING: runs from several commits merged", ", ".join(data["merged_commits"]))
    add("run", data.get("datetime"))
    return "\n".join(lines) + "\n"


# --- engine suite -----------------------------------------------------------------------

def _iqr_pct(med: float, q1: float, q3: float) -> float:
    """Interquartile range as a percentage of the median (NaN for a zero median)."""
    return 100.0 * (q3 - q1) / med if med > 0 else float("nan")


def _stats(b: dict) -> tuple:
    s = b["stats"]
    return float(s["median"]), float(s.get("q1", s["median"])), float(s.get("q3", s["median"]))


def engine_rows(data: dict) -> list:
    """One dict per engine-suite benchmark: model, profile, batch, provider, ms_per_sample,
    iqr_pct, speedup (over backbone_eager at the same model and batch), ideal, efficiency."""
    rows = []
    for b in data.get("benchmarks", []):
        ei = b.get("extra_info", {})
        if ei.get("suite") != "engine":
            continue
        med, q1, q3 = _stats(b)
        spc = float(ei.get("samples_per_call") or ei.get("batch") or 1)
        rows.append({
            "device": ei.get("device"),
            "model": ei["model"], "profile": ei["profile"], "batch": int(ei["batch"]),
            "provider": ei.get("provider") or b["name"],
            "ms_per_sample": 1e3 * med / spc,
            "iqr_pct": _iqr_pct(med, q1, q3),
            "ideal": ei.get("ideal_speedup"),
            "segment_ms_per_sample": (1e3 * float(ei["segment_s_per_call"]) / spc
                                      if ei.get("segment_s_per_call") else None),
            "segment_interleaved": ((ei.get("segment_times") or {}).get("interleaved_efficiency") or {}).get("median"),
            "compile_s": ei.get("compile_s"),
            "realised": ei.get("realised_fractions"),
            "target": ei.get("target_fractions"),
            "pool": ei.get("pool_fractions"),
        })
    # Baseline: backbone_eager of the same group, else of the same model and batch (the
    # backbone does not depend on the profile).
    def baselines(name):
        group, any_ = {}, {}
        for r in rows:
            if r["provider"] == name:
                group[(r["device"], r["model"], r["profile"], r["batch"])] = r["ms_per_sample"]
                any_.setdefault((r["device"], r["model"], r["batch"]), r["ms_per_sample"])
        return lambda r: group.get((r["device"], r["model"], r["profile"], r["batch"]),
                                   any_.get((r["device"], r["model"], r["batch"])))

    eager_base, compiled_base = baselines(BASELINE), baselines(COMPILED_BASELINE)
    for r in rows:
        base = eager_base(r)
        r["speedup"] = base / r["ms_per_sample"] if base and r["ms_per_sample"] > 0 else None
        if _is_exit_provider(r["provider"]) and r["speedup"] is not None and r["ideal"]:
            r["efficiency"] = r["speedup"] / float(r["ideal"])
        else:
            r["efficiency"] = None
        # The segment-time ideal: the same speedup if the engine cost nothing beyond its
        # stages and branches at the rows they see; efficiency against it = the engine's
        # own overhead, apart from the network's FLOP-versus-time mismatch.
        seg = r["segment_ms_per_sample"]
        r["segment_ideal"] = base / seg if base and seg else None
        # Preferred: measured interleaved with the provider (robust to a drifting load).
        r["segment_efficiency"] = r["segment_interleaved"] or (
            seg / r["ms_per_sample"] if seg and r["ms_per_sample"] > 0 else None)
        cbase = compiled_base(r)
        r["speedup_vs_compiled"] = (cbase / r["ms_per_sample"]
                                    if cbase and _is_compiled(r["provider"]) and r["ms_per_sample"] > 0 else None)
    return rows


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def _pct(fr):
    return "/".join(f"{100 * f:.1f}" for f in fr) + " %" if fr else "–"


def _table(head, body) -> str:
    return markdown_table(head, body, pad=False)


def _group_profile_line(rs) -> str:
    target = next((r["target"] for r in rs if r["target"]), None)
    pool = next((r["pool"] for r in rs if r["pool"]), None)
    return (f"Exit profile (% leaving at each exit): target {_pct(target)}, realised on the "
            f"input pool {_pct(pool)}; the `exits timed` column gives what the engine ran.")


def _realised_of(cell, bsz, provs):
    for pv in provs:
        r = cell.get((bsz, pv))
        if r and pv.startswith("engine_") and r["realised"]:
            return r["realised"]
    for pv in provs:
        r = cell.get((bsz, pv))
        if r and r["realised"]:
            return r["realised"]
    return None


def engine_tables(data: dict) -> str:
    """Markdown: per model and profile, a time table and a speedup/efficiency table."""
    rows = engine_rows(data)
    if not rows:
        return ""
    by = defaultdict(list)
    for r in rows:
        by[(r["device"], r["model"], r["profile"])].append(r)
    devices = sorted({k[0] for k in by}, key=str)
    out = ["## Early-exit inference", "",
           "Time per sample = median time per call / B. Speedup = backbone_eager time per "
           "sample / provider time per sample, same model, batch size and run. Ideal = "
           "FLOPs of the backbone without exits / expected FLOPs per sample of the exit "
           "profile the provider actually ran. Efficiency = speedup / ideal. Segment ideal "
           "= the speedup if the provider cost only its stages and branches, each timed "
           "alone at the rows it sees (weighted by the exit profile; for compiled providers "
           "the faster of eager and compiled per segment); eff. vs seg. = that time / the "
           "provider's time, median over rounds that alternate the provider's calls and the "
           "segments' (each round's ratio): the engine's own overhead, apart from the network's "
           "FLOP-versus-time mismatch. `vs backbone_compile` = compiled provider against "
           "the compiled backbone.", ""]
    for dev in devices:
        keys = [k for k in by if k[0] == dev]
        models = _order({k[1] for k in keys}, MODEL_ORDER)
        for m in models:
            for p in _order({k[2] for k in keys if k[1] == m}, PROFILE_ORDER):
                rs = by[(dev, m, p)]
                provs = _order({r["provider"] for r in rs}, PROVIDER_ORDER)
                batches = sorted({r["batch"] for r in rs})
                cell = {(r["batch"], r["provider"]): r for r in rs}
                out += [f"### {m}, profile `{p}` ({dev})", "", _group_profile_line(rs), ""]
                body = []
                for bsz in batches:
                    row = [str(bsz)]
                    for pv in provs:
                        r = cell.get((bsz, pv))
                        row.append(f"{_fmt(r['ms_per_sample'])} ({r['iqr_pct']:.0f}%)" if r else "–")
                    body.append(row)
                out += ["Median ms per sample (IQR as % of the median):", "",
                        _table(["B"] + provs, body), ""]
                sp_provs = [pv for pv in provs if pv != BASELINE]
                eff_provs = [pv for pv in provs if _is_exit_provider(pv)]
                body = []
                for bsz in batches:
                    row = [str(bsz)]
                    for pv in sp_provs:
                        r = cell.get((bsz, pv))
                        row.append(f"{_fmt(r['speedup'])}x" if r and r["speedup"] is not None else "–")
                    ideal = _ideal_of(cell, bsz, provs)
                    row.append(f"{_fmt(ideal)}x" if ideal else "–")
                    row.append(_pct(_realised_of(cell, bsz, provs)))
                    for pv in eff_provs:
                        r = cell.get((bsz, pv))
                        row.append(f"{100 * r['efficiency']:.0f}%" if r and r["efficiency"] is not None else "–")
                    body.append(row)
                head = ["B"] + sp_provs + ["ideal", "exits timed"] + [f"eff. {pv}" for pv in eff_provs]
                out += [f"Speedup over {BASELINE}, ideal speedup, efficiency:", "", _table(head, body), ""]
                seg_provs = [pv for pv in eff_provs
                             if any((cell.get((bsz, pv)) or {}).get(k) for bsz in batches
                                    for k in ("segment_ideal", "segment_efficiency"))]
                comp_provs = [pv for pv in provs if _is_compiled(pv)]
                if seg_provs or comp_provs:
                    body = []
                    for bsz in batches:
                        row = [str(bsz)]
                        for pv in seg_provs:
                            r = cell.get((bsz, pv)) or {}
                            row.append(f"{_fmt(r.get('segment_ideal'))}x" if r.get("segment_ideal") else "–")
                            eff = r.get("segment_efficiency")
                            row.append(f"{100 * eff:.0f}%" if eff else "–")
                        for pv in comp_provs:
                            r = cell.get((bsz, pv)) or {}
                            if pv != COMPILED_BASELINE:
                                row.append(f"{_fmt(r.get('speedup_vs_compiled'))}x"
                                           if r.get("speedup_vs_compiled") else "–")
                            row.append(f"{r['compile_s']:.0f} s" if r.get("compile_s") is not None else "–")
                        body.append(row)
                    head = ["B"]
                    for pv in seg_provs:
                        head += [f"seg. ideal {pv}", f"eff. vs seg. {pv}"]
                    for pv in comp_provs:
                        head += ([f"{pv} vs {COMPILED_BASELINE}"] if pv != COMPILED_BASELINE else []) + [
                            f"compile {pv}"]
                    out += ["Segment-time ideal (speedup over the eager backbone), efficiency against it; "
                            "compiled providers against the compiled backbone, compile time apart:", "",
                            _table(head, body), ""]
    return "\n".join(out)


def _ideal_of(cell, bsz, provs):
    # The ideal of what the engines ran (they all see the same samples); else any.
    for pv in provs:
        r = cell.get((bsz, pv))
        if r and pv.startswith("engine_") and r["ideal"]:
            return float(r["ideal"])
    for pv in provs:
        r = cell.get((bsz, pv))
        if r and r["ideal"]:
            return float(r["ideal"])
    return None


# --- fixed cost -------------------------------------------------------------------------

FIXED_COST_TARGET = 1.10


def fixed_cost_rows(data: dict) -> list:
    """One dict per fixed-cost benchmark: model, provider, us (median), iqr_pct, by_hand_us
    (the by_hand benchmark of the same model), ratio (us / by_hand_us), and for engines
    the interleaved ratio (median, q1, q3) measured inside the benchmark."""
    rows = []
    for b in data.get("benchmarks", []):
        ei = b.get("extra_info", {})
        if ei.get("suite") != "fixed_cost":
            continue
        med, q1, q3 = _stats(b)
        rows.append({"device": ei.get("device"), "model": ei["model"],
                     "provider": ei.get("provider") or b["name"], "us": 1e6 * med,
                     "iqr_pct": _iqr_pct(med, q1, q3),
                     "ratio_median": ei.get("ratio_median"), "ratio_q1": ei.get("ratio_q1"),
                     "ratio_q3": ei.get("ratio_q3")})
    hand = {(r["device"], r["model"]): r["us"] for r in rows if r["provider"] == "by_hand"}
    for r in rows:
        h = hand.get((r["device"], r["model"]))
        r["by_hand_us"] = h
        r["ratio"] = r["us"] / h if h and r["provider"] != "by_hand" else None
    return rows


def fixed_cost_table(data: dict) -> str:
    rows = fixed_cost_rows(data)
    if not rows:
        return ""
    out = ["## Engine fixed cost at B = 1", "",
           "`engine(x)` at B = 1 with every sample leaving at the first branch, against the same "
           "stage 1 + branch 1 by hand under `torch.inference_mode` (`by_hand`). Ratio = engine "
           "median / by_hand median (two benchmarks); interleaved = median [quartiles] of the "
           "per-round ratio with engine and by-hand calls alternating in one loop. "
           f"Target: at most {FIXED_COST_TARGET:.2f}x.", ""]
    body = []
    for r in sorted(rows, key=lambda r: (str(r["device"]), r["model"], r["provider"] != "by_hand", r["provider"])):
        inter = (f"{r['ratio_median']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]"
                 if r["ratio_median"] is not None else "–")
        met = "–"
        if r["ratio_median"] is not None:
            met = "met" if r["ratio_median"] <= FIXED_COST_TARGET else (
                f"missed by {100 * (r['ratio_median'] / FIXED_COST_TARGET - 1):.0f} %")
        body.append([str(r["device"]), r["model"], r["provider"], f"{_fmt(r['us'])} ({r['iqr_pct']:.0f}%)",
                     f"{r['ratio']:.3f}" if r["ratio"] else "–", inter, met])
    out += [_table(["device", "model", "provider", "median µs per call (IQR)", "ratio", "interleaved ratio",
                    "target"], body), ""]
    return "\n".join(out)


# --- exit-op suite ----------------------------------------------------------------------

def exit_op_rows(data: dict) -> list:
    """One dict per exit-op benchmark: batch, classes, provider, us, iqr_pct, gbps,
    copy_pct (of the copy's GB/s at the same B, C), vs_eager, vs_compile (speedups)."""
    rows = []
    for b in data.get("benchmarks", []):
        ei = b.get("extra_info", {})
        if ei.get("suite") != "exit_op":
            continue
        per = float(ei.get("calls_per_timed_call") or 1)  # a timed call = a round of ops
        med, q1, q3 = (v / per for v in _stats(b))
        moved = float(ei.get("bytes_moved") or 0)
        rows.append({
            "device": ei.get("device"), "batch": int(ei["batch"]), "classes": int(ei["classes"]),
            "provider": ei.get("provider") or b["name"], "seconds": med,
            "us": 1e6 * med, "iqr_pct": _iqr_pct(med, q1, q3),
            "bytes_moved": moved, "gbps": moved / med / 1e9 if med > 0 else None,
        })
    idx = {(r["device"], r["batch"], r["classes"], r["provider"]): r for r in rows}
    for r in rows:
        k = (r["device"], r["batch"], r["classes"])
        cp, eg, co = idx.get(k + ("copy",)), idx.get(k + ("op_eager",)), idx.get(k + ("op_compile",))
        r["copy_pct"] = 100.0 * r["gbps"] / cp["gbps"] if cp and cp["gbps"] and r["gbps"] else None
        r["vs_eager"] = eg["seconds"] / r["seconds"] if eg else None
        r["vs_compile"] = co["seconds"] / r["seconds"] if co else None
    return rows


def exit_op_table(data: dict) -> str:
    rows = exit_op_rows(data)
    if not rows:
        return ""
    out = ["## Exit op", "",
           "Bytes the op must move: logits read once, row map read once, the leaving rows' "
           "logits/prediction/exit/entropy written once, the survivors' two indices written "
           "once (half the rows leave). `copy` copies half that many bytes (read + write = "
           "the same traffic). GB/s = bytes moved / median time; `% copy` = share of the "
           "copy's GB/s at the same size. Calls run back to back, one synchronisation per round.", ""]
    for dev in sorted({r["device"] for r in rows}, key=str):
        rs = [r for r in rows if r["device"] == dev]
        provs = _order({r["provider"] for r in rs}, OP_PROVIDER_ORDER)
        kern = [p for p in provs if p != "copy"]
        fast = [p for p in provs if p in KERNEL_PROVIDERS]
        cell = {(r["batch"], r["classes"], r["provider"]): r for r in rs}
        shapes = sorted({(r["batch"], r["classes"]) for r in rs})
        peak = max((r["gbps"] or 0 for r in rs if r["provider"] == "copy"), default=0)
        if peak:
            out += [f"Measured copy bandwidth on {dev} (best over sizes): {peak:.1f} GB/s.", ""]
        body = []
        for (bsz, c) in shapes:
            row = [str(bsz), str(c)]
            for pv in provs:
                r = cell.get((bsz, c, pv))
                row.append(f"{_fmt(r['us'])} ({r['iqr_pct']:.0f}%)" if r else "–")
            for pv in fast:
                r = cell.get((bsz, c, pv))
                row.append(f"{_fmt(r['vs_eager'])}x" if r and r["vs_eager"] else "–")
                row.append(f"{_fmt(r['vs_compile'])}x" if r and r["vs_compile"] else "–")
            body.append(row)
        head = ["B", "C"] + provs
        for pv in fast:
            head += [f"{pv} vs eager", f"{pv} vs compile"]
        out += [f"Median µs per call (IQR as % of the median), {dev}:", "", _table(head, body), ""]
        body = []
        for (bsz, c) in shapes:
            r0 = cell.get((bsz, c, kern[0])) or cell.get((bsz, c, "copy"))
            mb = (r0["bytes_moved"] / 1e6) if r0 else None
            row = [str(bsz), str(c), _fmt(mb)]
            for pv in kern:
                r = cell.get((bsz, c, pv))
                if r and r["gbps"] is not None:
                    pct = f" ({r['copy_pct']:.0f}%)" if r["copy_pct"] is not None else ""
                    row.append(f"{_fmt(r['gbps'])}{pct}")
                else:
                    row.append("–")
            r = cell.get((bsz, c, "copy"))
            row.append(_fmt(r["gbps"]) if r else "–")
            body.append(row)
        out += ["Achieved GB/s (% of the copy's GB/s at the same size):", "",
                _table(["B", "C", "MB moved"] + kern + ["copy"], body), ""]
    return "\n".join(out)


def render(data: dict, note: str | None = None) -> str:
    parts = ["# branchynet benchmarks", ""]
    if note:
        parts += [note.rstrip(), ""]
    parts += [header(data), fixed_cost_table(data), engine_tables(data), exit_op_table(data)]
    return "\n".join(p for p in parts if p is not None).rstrip() + "\n"


# --- plots ------------------------------------------------------------------------------

def plot(data: dict, out_dir) -> list:
    """Write PNGs into ``out_dir``: per model, speedup vs batch size (one panel per exit
    profile, one line per provider, the ideal dashed) and efficiency vs batch size; the
    exit op's GB/s vs B per C. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = engine_rows(data)
    for dev in sorted({r["device"] for r in rows}, key=str):
        rd = [r for r in rows if r["device"] == dev]
        tag = "" if len({r["device"] for r in rows}) == 1 else f"_{str(dev).replace(':', '')}"
        for m in _order({r["model"] for r in rd}, MODEL_ORDER):
            rm = [r for r in rd if r["model"] == m]
            profiles = _order({r["profile"] for r in rm}, PROFILE_ORDER)
            for what in ("speedup", "efficiency"):
                fig, axes = plt.subplots(1, len(profiles), figsize=(5.2 * len(profiles), 4), squeeze=False)
                for ax, p in zip(axes[0], profiles):
                    rp = [r for r in rm if r["profile"] == p]
                    provs = _order({r["provider"] for r in rp}, PROVIDER_ORDER)
                    for pv in provs:
                        if pv == BASELINE or (what == "efficiency" and not _is_exit_provider(pv)):
                            continue
                        pts = sorted((r["batch"], r[what]) for r in rp if r["provider"] == pv and r[what])
                        if pts:
                            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=pv)
                    if what == "speedup":
                        cell = {(r["batch"], r["provider"]): r for r in rp}
                        ideal = sorted((b, _ideal_of(cell, b, provs)) for b in {r["batch"] for r in rp})
                        ideal = [(b, v) for b, v in ideal if v]
                        if ideal:
                            ax.plot([b for b, _ in ideal], [v for _, v in ideal], "k--", marker="x",
                                    label="ideal (FLOPs)")
                        ax.axhline(1.0, color="grey", lw=0.8)
                        ax.set_yscale("log")
                        ax.yaxis.set_major_formatter(plain)
                        ax.yaxis.set_minor_formatter(plain)
                        ax.set_ylabel(f"speedup over {BASELINE}")
                    else:
                        ax.axhline(1.0, color="grey", lw=0.8)
                        ax.set_ylabel("efficiency (speedup / ideal)")
                    ax.set_xscale("log", base=2)
                    ax.set_xlabel("batch size")
                    ax.set_title(f"{m}, {p} ({dev})")
                    ax.grid(True, which="both", alpha=0.3)
                    ax.legend(fontsize=7)
                fig.tight_layout()
                path = out_dir / f"{what}_{m}{tag}.png"
                fig.savefig(path, dpi=110)
                plt.close(fig)
                written.append(path)
    ops = exit_op_rows(data)
    for dev in sorted({r["device"] for r in ops}, key=str):
        ro = [r for r in ops if r["device"] == dev]
        tag = "" if len({r["device"] for r in ops}) == 1 else f"_{str(dev).replace(':', '')}"
        cs = sorted({r["classes"] for r in ro})
        fig, axes = plt.subplots(1, len(cs), figsize=(5 * len(cs), 4), squeeze=False)
        for ax, c in zip(axes[0], cs):
            for pv in _order({r["provider"] for r in ro}, OP_PROVIDER_ORDER):
                pts = sorted((r["batch"], r["gbps"]) for r in ro if r["classes"] == c and r["provider"] == pv
                             and r["gbps"])
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=pv,
                            ls="--" if pv == "copy" else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("B (rows)")
            ax.set_ylabel("GB/s (bytes the op must move / time)")
            ax.set_title(f"exit op, C = {c} ({dev})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"exit_op_bandwidth{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json); several are merged")
    ap.add_argument("--out", help="folder for report.md and the PNG plots")
    ap.add_argument("--note", help="text (or @file) put under the title of the report")
    args = ap.parse_args(argv)
    data = load(*args.json)
    note = args.note
    if note and note.startswith("@"):
        note = Path(note[1:]).read_text(encoding="utf-8")
    md = render(data, note)
    sys.stdout.write(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(md, encoding="utf-8")
        for p in plot(data, out):
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
