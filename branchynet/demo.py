"""The paper's Table I on this machine, as library steps that ``branchynet demo`` prints.

:func:`train_with_twin` trains a B-model with the joint loss and its backbone-only twin
(the same network trained on the final exit alone, the paper's baseline);
:func:`calibrate_and_write` chooses the thresholds on the validation split and writes the
sweep; :func:`measure_table_i` measures accuracy, time per sample at B=1 and B=256, the
exit fractions and the FLOP ideal on the test split. The data-set and model helpers are
shared with the other subcommands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import ExitConfig
from .train import TrainSettings, train

__all__ = ["TABLE_I_HEAD", "DataMismatch", "RowTimes", "TableI", "build_for_data", "calibrate_and_write",
           "check_fits", "demo_splits", "fmt_ms", "measure_table_i", "split_tensors", "train_with_twin"]

#: Table I's columns, as the paper reports them.
TABLE_I_HEAD = ["network", "acc %", "ms/sample B=1", "gain B=1", "ms/sample B=256", "gain B=256",
                "T", "exit % per exit", "ideal gain (FLOPs)"]
_LABELS = {"b-lenet": "LeNet", "b-alexnet": "AlexNet", "b-resnet110": "ResNet-110"}


# -- data and models -----------------------------------------------------------------------


class DataMismatch(ValueError):
    """The model cannot take the data set's inputs or predict its labels."""


def demo_splits(dataset: str, data_root=None, seed: int = 0, limit: int = 0):
    """The data set's splits, the training split cut to its first ``limit`` samples."""
    from .data import load_dataset

    splits = load_dataset(dataset, data_root, seed=seed)
    if limit:
        splits.train = torch.utils.data.Subset(splits.train, range(min(limit, len(splits.train))))
    return splits


def build_for_data(name: str, splits, exit_config: ExitConfig | None = None):
    """The registered model ``name`` sized for the data set (classes, input channels).

    Raises:
        DataMismatch: the model cannot take the data set's inputs or labels.
    """
    from .models.registry import build_model

    kw = {"num_classes": splits.num_classes}
    if name.replace("-", "_") == "b_lenet":
        kw["in_channels"] = splits.input_shape[0]
    model = build_model(name, **kw)
    check_fits(model, splits, name)
    if exit_config is not None:
        model.exit_config = exit_config
    return model


def check_fits(model, splits, what: str) -> None:
    """Refuse a data set the model cannot take: its forward pass would fail deep inside,
    or accuracy would be measured against labels the model cannot predict.

    Raises:
        DataMismatch: saying which and what to pick instead.
    """
    if model.input_shape is not None and tuple(model.input_shape) != tuple(splits.input_shape):
        raise DataMismatch(
            f"{what} takes inputs of shape {tuple(model.input_shape)} but data set "
            f"{splits.name!r} has {tuple(splits.input_shape)}; pick a matching --dataset")
    if model.num_classes is not None and model.num_classes != splits.num_classes:
        raise DataMismatch(
            f"{what} predicts {model.num_classes} classes but data set {splits.name!r} "
            f"has {splits.num_classes}; pick a matching --dataset")


def split_tensors(ds, limit=None) -> tuple:
    """``(x, y)`` of a split as two tensors (its first ``limit`` samples)."""
    x, y = ds.tensors if hasattr(ds, "tensors") else map(torch.stack, zip(*[ds[i] for i in range(len(ds))]))
    return (x[:limit], y[:limit]) if limit else (x, y)


# -- training and calibration --------------------------------------------------------------


def train_with_twin(name: str, splits, settings: TrainSettings, say: Callable = print) -> tuple:
    """Train the B-model ``name`` with the joint loss, then its backbone-only twin (the
    same network with weights ``(0, .., 0, 1)``: the final exit alone), one after the
    other from the global RNG (the twin's initial weights are drawn after the first run).

    Returns:
        ``(model, baseline)``, both in eval mode on ``settings.device``; ``baseline`` is
        the twin's backbone alone (:meth:`BranchyNet.backbone_only`).
    """
    model = build_for_data(name, splits).to(settings.device)
    n = model.num_exits
    say(f"training {name} ({n} exits, joint loss) for {settings.epochs} epochs", flush=True)
    train(model, splits, settings)
    twin = build_for_data(name, splits, ExitConfig(n, weights=[0.0] * (n - 1) + [1.0])).to(settings.device)
    say(f"training its backbone-only twin (final exit only) for {settings.epochs} epochs", flush=True)
    train(twin, splits, settings)
    return model.eval(), twin.backbone_only().eval()


def calibrate_and_write(model, splits, device, out: Path, *, batch_size=256, test=None, **targets):
    """Calibrate on the validation split for ``targets`` (``calibrate``'s), with segment
    times measured at ``batch_size``; write the sweep (CSV) and the Pareto plot (PNG)
    into ``out``. Under torchrun each rank scores its part of the split and rank 0 alone
    searches, times and writes (the other ranks get None)."""
    from .calibrate import calibrate
    from .distributed import gather_exit_table, gather_objects, is_distributed, is_main

    # Temperature scaling refits the exits on the logits and rescores after folding, so
    # it runs on rank 0 over the whole split rather than from gathered scores.
    table = None if targets.get("temperature") else gather_exit_table(model, splits.val, device=device)
    cal = failed = None
    if is_main():
        try:
            cal = calibrate(model, splits.val, latency=True, batch_size=batch_size, device=device,
                            test=test, table=table, **targets)
        except ValueError as err:  # TargetUnreachable among them: rank 0 reports it
            failed = err
    if is_distributed() and gather_objects(failed is not None)[0]:
        # Rank 0's search failed: every rank leaves with it, rather than wait in a barrier
        # that rank 0 never reaches (its message is printed once, by rank 0).
        main_rank = is_main()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if not main_rank:
            raise SystemExit(2)
    if failed is not None:
        raise failed
    if not is_main():
        return None
    out.mkdir(parents=True, exist_ok=True)
    cal.to_csv(out / "calibration.csv")
    try:
        cal.plot(out / "pareto.png")
    except ImportError:
        print("matplotlib is not installed: no Pareto plot (pip install matplotlib)")
    return cal


# -- Table I -------------------------------------------------------------------------------


@dataclass
class RowTimes:
    """Medians in seconds per sample of the backbone and of the B-model at B=1 and B=256."""

    backbone_b1: float
    branchy_b1: float
    backbone_b256: float
    branchy_b256: float

    @property
    def gain_b1(self) -> float:
        return self.backbone_b1 / self.branchy_b1

    @property
    def gain_b256(self) -> float:
        return self.backbone_b256 / self.branchy_b256


@dataclass
class TableI:
    """What :func:`measure_table_i` measured; ``N`` = number of exits.

    Attributes:
        label: the backbone's name in the paper ("LeNet", ...).
        acc_backbone, acc_branchy: test accuracy of the backbone and of the B-model at
            its thresholds.
        thresholds: the N-1 thresholds used.
        exit_fractions: [N] share of the test samples leaving at each exit.
        ideal_gain: the FLOP ideal of that exit profile.
        times: eager times; ``compiled``: the same through torch.compile, or None.
        compile_seconds: time spent compiling both (None without compile).
        backend: the exit-op backend the engine ran.
        n_test: test samples; n_b1: samples timed one at a time.
    """

    label: str
    acc_backbone: float
    acc_branchy: float
    thresholds: list
    exit_fractions: list
    ideal_gain: float
    times: RowTimes
    backend: str
    n_test: int
    n_b1: int
    compiled: RowTimes | None = None
    compile_seconds: float | None = None

    def rows(self) -> list:
        """Table I's rows: backbone and B-model, then their compiled twins if timed."""
        rows = self._row_pair("", self.times)
        if self.compiled is not None:
            # Same rows compiled; gains against the compiled backbone.
            rows += self._row_pair(" (compiled)", self.compiled)
        return rows

    def _row_pair(self, suffix: str, t: RowTimes) -> list:
        return [
            [self.label + suffix, f"{100 * self.acc_backbone:.2f}", fmt_ms(t.backbone_b1), "-",
             fmt_ms(t.backbone_b256), "-", "-", "-", "-"],
            ["B-" + self.label + suffix, f"{100 * self.acc_branchy:.2f}", fmt_ms(t.branchy_b1),
             f"{t.gain_b1:.2f}x", fmt_ms(t.branchy_b256), f"{t.gain_b256:.2f}x",
             ", ".join(f"{v:.4g}" for v in self.thresholds),
             ", ".join(f"{100 * f:.1f}" for f in self.exit_fractions), f"{self.ideal_gain:.2f}x"],
        ]

    def summary(self, dataset: str, model: str) -> dict:
        """The plain record ``branchynet demo`` writes to ``summary.json``."""
        t = self.times
        return {"dataset": dataset, "model": model, "acc_backbone": self.acc_backbone,
                "acc_branchy": self.acc_branchy, "thresholds": self.thresholds,
                "exit_fractions": self.exit_fractions, "ideal_gain": self.ideal_gain,
                "ms_b1": [t.backbone_b1 * 1e3, t.branchy_b1 * 1e3],
                "ms_b256": [t.backbone_b256 * 1e3, t.branchy_b256 * 1e3],
                "gain_b1": t.gain_b1, "gain_b256": t.gain_b256}


def measure_table_i(model, baseline, x, y, thresholds, *, name: str, device, backend: str = "auto",
                    compile=False, time_samples: int = 500, repeats: int = 5) -> TableI:
    """Accuracy, exit profile and times of ``model`` at ``thresholds`` against ``baseline``.

    Args:
        model: the trained B-model (eval mode); baseline: its twin's backbone.
        x, y: the test samples [B, ...] and labels [B], on ``device``.
        thresholds: the N-1 thresholds to run at.
        name: the model's registry name (for the label).
        backend: the exit-op backend.
        compile: False, True or a torch.compile mode: also time both compiled (dynamic
            batch), compile time apart.
        time_samples: samples timed one at a time (the paper's regime).
        repeats: timing repeats (medians reported).
    """
    from .engine import EarlyExitEngine
    from .flops import profile_flops
    from .timing import time_fn

    engine = EarlyExitEngine(model, thresholds, backend=backend)
    with torch.inference_mode():
        res = engine(x)
        acc_b = float((res.pred == y).float().mean())
        acc_base = float((baseline(x).argmax(1) == y).float().mean())
    compiled = compile_seconds = None
    if compile:
        t0 = time.perf_counter()
        compiled = _compile_pair(model, baseline, thresholds, x, backend, compile)
        compile_seconds = time.perf_counter() - t0
    ideal = profile_flops(model).ideal_speedup(res.exit_fractions)
    n1 = min(time_samples, x.shape[0])
    x1 = x[:n1]
    # the paper's regime: one sample at a time through the exits it needs
    times = _time_rows(baseline, engine, x1, x, repeats, time_engine_b1=lambda: time_fn(
        lambda: engine.per_sample(x1), repeats=repeats, device=device).scaled(1.0 / n1))
    compiled_times = None if compiled is None else _time_rows(*compiled, x1, x, repeats)
    return TableI(label=_LABELS.get(name.replace("_", "-"), name), acc_backbone=acc_base, acc_branchy=acc_b,
                  thresholds=thresholds, exit_fractions=res.exit_fractions,
                  ideal_gain=ideal, times=times,
                  backend=engine.backend_for(device), n_test=x.shape[0], n_b1=n1,
                  compiled=compiled_times, compile_seconds=compile_seconds)


def _compile_pair(model, baseline, thresholds, x, backend: str, compile) -> tuple:
    """(compiled backbone, compiled engine), both warmed up at B=1 and B=256."""
    from .engine import EarlyExitEngine

    engine_c = EarlyExitEngine(model, thresholds, backend=backend, compile=compile)
    engine_c.warmup([1, 256], x=x)
    baseline_c = torch.compile(baseline, dynamic=True, mode=None if compile is True else compile)
    with torch.inference_mode():
        for b in (1, 256):
            baseline_c(x[:b])
    return baseline_c, engine_c


def _time_rows(baseline, engine, x1, x, repeats: int, time_engine_b1=None) -> RowTimes:
    """Per-sample medians at B=1 (over ``x1``) and B=256 (over ``x``);
    ``time_engine_b1()`` times the engine at B=1 another way (default: like the others)."""
    from .timing import time_per_sample

    t_base_1 = time_per_sample(baseline, x1, 1, repeats=repeats)
    t_b_1 = time_engine_b1() if time_engine_b1 else time_per_sample(engine, x1, 1, repeats=repeats)
    t_base_256 = time_per_sample(baseline, x, 256, repeats=repeats)
    t_b_256 = time_per_sample(engine, x, 256, repeats=repeats)
    return RowTimes(t_base_1.median, t_b_1.median, t_base_256.median, t_b_256.median)


def fmt_ms(t: float) -> str:
    """Seconds as milliseconds with three decimals, as the tables print them."""
    return f"{t * 1e3:.3f}"
