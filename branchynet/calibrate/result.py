"""The result of a calibration: every combination scored, the chosen point, and its
reports (summary, CSV sweep, Pareto plot, the engine run on the test split)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..flops import FlopProfile

__all__ = ["CalibrationResult", "pareto_front"]


@dataclass
class CalibrationResult:
    """A threshold search and the chosen point.

    Attributes:
        rows: one dict per combination scored: thresholds, accuracy, exit fractions, FLOPs
            per sample (``flops``, and ``flops_fraction`` of the backbone's), speedup from
            FLOPs, time per sample (predicted from measured times, or None).
        chosen: the row picked for the target; with a latency profile it also holds
            ``time_measured`` (the engine timed with the chosen thresholds).
        final_accuracy: accuracy of the final exit alone (the backbone's).
        target: the targets, ``met`` and ``cost`` (what was minimised or held).
        search: ``method`` ("exhaustive" or "beam"), ``scored`` (combinations scored),
            ``combinations`` (the size of the full grid).
        temperature: N fitted temperatures (folded into the model), or None.
        ece: ``{"before": [N], "after": [N]}`` calibration errors, or None.
        test: predicted (validation) and measured (test split) accuracy, FLOPs and time
            of the chosen point, or None.
    """

    rows: list
    chosen: dict
    final_accuracy: float
    target: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    temperature: list | None = None
    ece: dict | None = None
    test: dict | None = None

    def pareto(self) -> list:
        return pareto_front(self.rows)

    def to_csv(self, path) -> None:
        keys = ["thresholds", "accuracy", "exit_fractions", "flops", "ideal_speedup", "time_per_sample",
                "pareto", "flops_fraction"]
        front = {id(r) for r in self.pareto()}
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in self.rows:
                w.writerow([" ".join(f"{t:.9g}" for t in r["thresholds"]), f"{r['accuracy']:.6f}",
                            " ".join(f"{x:.4f}" for x in r["exit_fractions"]), f"{r['flops']:.1f}",
                            f"{r['ideal_speedup']:.4f}",
                            "" if r["time_per_sample"] is None else f"{r['time_per_sample']:.4g}",
                            int(id(r) in front), f"{r['flops_fraction']:.4f}"])

    def plot(self, path) -> None:
        """Accuracy against cost (time per sample if measured, FLOPs for a FLOP budget or
        when no time is known), Pareto front, chosen point and the budget marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        use_time = all(r["time_per_sample"] is not None for r in self.rows) and \
            self.target.get("max_flops") is None
        key, label = ("time_per_sample", "est. time per sample (ms)") if use_time else ("flops", "MFLOPs per sample")
        scale = 1e3 if use_time else 1e-6
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.scatter([r[key] * scale for r in self.rows], [100 * r["accuracy"] for r in self.rows],
                   s=8, alpha=0.35, label="threshold combinations")
        front = sorted(pareto_front(self.rows, key), key=lambda r: r[key])
        ax.plot([r[key] * scale for r in front], [100 * r["accuracy"] for r in front], "o-", color="C3",
                ms=4, label="Pareto front")
        ax.scatter([self.chosen[key] * scale], [100 * self.chosen["accuracy"]], marker="*", s=180,
                   color="k", zorder=5, label="chosen")
        ax.axhline(100 * self.final_accuracy, ls="--", color="gray", lw=1, label="final exit only")
        budget = self.target.get("max_latency") if use_time else self.target.get("max_flops_abs")
        if budget is not None:
            ax.axvline(budget * scale, ls=":", color="C2", lw=1.5, label="budget")
        if self.target.get("min_accuracy") is not None:
            ax.axhline(100 * self.target["min_accuracy"], ls=":", color="C1", lw=1.5, label="accuracy target")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def summary(self) -> str:
        """The chosen point in a few lines: thresholds, predicted and measured figures."""
        c = self.chosen
        lines = [f"final exit accuracy {100 * self.final_accuracy:.2f} %; chosen thresholds "
                 f"{[float(f'{t:.6g}') for t in c['thresholds']]} ({self.search.get('method')}, "
                 f"{self.search.get('scored')} combinations scored)",
                 f"validation (predicted): accuracy {100 * c['accuracy']:.2f} %, exits "
                 f"{[round(100 * f, 1) for f in c['exit_fractions']]} %, FLOPs "
                 f"{c['flops_fraction']:.3f} of the backbone's (ideal speedup {c['ideal_speedup']:.2f}x)"
                 + ("" if c["time_per_sample"] is None else f", {1e3 * c['time_per_sample']:.4g} ms/sample")
                 + ("" if c.get("time_measured") is None else
                    f" (measured {1e3 * c['time_measured']:.4g} ms/sample)")]
        if self.test is not None:
            t = self.test["measured"]
            lines.append(f"test split (measured): accuracy {100 * t['accuracy']:.2f} %, exits "
                         f"{[round(100 * f, 1) for f in t['exit_fractions']]} %, FLOPs "
                         f"{t['flops_fraction']:.3f} of the backbone's"
                         + ("" if t.get("time_per_sample") is None else
                            f", {1e3 * t['time_per_sample']:.4g} ms/sample"))
        if self.ece is not None:
            lines.append("temperature " + ", ".join(f"{t:.3g}" for t in self.temperature) + "; ECE before "
                         + ", ".join(f"{e:.4f}" for e in self.ece["before"]) + "; after "
                         + ", ".join(f"{e:.4f}" for e in self.ece["after"]))
        return "\n".join(lines)


def pareto_front(rows: Sequence[dict], cost: str | None = None) -> list:
    """Rows not dominated in (lower cost, higher accuracy); cost is time if measured, else FLOPs."""
    if not rows:
        return []
    cost = cost or ("time_per_sample" if all(r["time_per_sample"] is not None for r in rows) else "flops")
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r[cost], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def _rows(thr: torch.Tensor, mt: dict, flops: FlopProfile) -> list:
    """One :attr:`CalibrationResult.rows` dict per combination ``thr`` [R, N-1] with its
    metrics ``mt`` (:meth:`~branchynet.calibrate.search._Costs.metrics`)."""
    thr_list = thr.tolist()
    rows = []
    for g in range(thr.shape[0]):
        rows.append({
            "thresholds": thr_list[g],
            "accuracy": float(mt["accuracy"][g]),
            "exit_fractions": mt["fractions"][g].tolist(),
            "flops": float(mt["flops"][g]),
            "flops_fraction": float(mt["flops"][g] / flops.backbone),
            "ideal_speedup": float(flops.backbone / mt["flops"][g]),
            "time_per_sample": None if mt["time"] is None else float(mt["time"][g]),
        })
    return rows


def _measure_on(engine, data, flops: FlopProfile, latency, batch_size: int, device) -> dict:
    """Run the engine over ``data``: accuracy, exit shares, FLOPs and (with a latency
    profile) time per sample at ``batch_size``."""
    from ..timing import time_per_sample

    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    correct, counts, total, xs = 0, None, 0, []
    for x, y in loader:
        x = x.to(device)
        res = engine(x)
        correct += int((res.pred.cpu() == y).sum())
        counts = res.counts if counts is None else [a + b for a, b in zip(counts, res.counts)]
        total += y.shape[0]
        if latency is not None and sum(t.shape[0] for t in xs) < 4 * batch_size:
            xs.append(x)
    if total == 0:
        raise ValueError("test is empty")
    frac = [c / total for c in counts]
    fl = float(np.dot(frac, [flops.path(n) for n in range(flops.num_exits)]))
    out = {"accuracy": correct / total, "exit_fractions": frac, "flops": fl,
           "flops_fraction": fl / flops.backbone, "time_per_sample": None, "samples": total}
    if latency is not None:
        out["time_per_sample"] = time_per_sample(engine, torch.cat(xs), batch_size, repeats=5).median
    return out
