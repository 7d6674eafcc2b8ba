"""benchmarks/serving_plan.py: the serving scheduler on a virtual clock with an assumed
cost curve (what rebatching is worth on a device not measured here)."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serving_plan  # noqa: E402


def args(**kw):
    base = dict(t_run=30e-6, achieved=100e12, k_full=256, max_batch=256, max_wait_ms=2.0, requests=3000)
    return SimpleNamespace(**{**base, **kw})


def test_the_cost_curve_is_flat_below_a_full_device_and_linear_above():
    t = serving_plan.cost_curve([1e9], t_run=1e-5, achieved=1e12, k_full=100)
    assert t(0, 1) == t(0, 100) == 1e-5 + 1e9 * 100 / 1e12
    assert t(0, 200) - 1e-5 == 2 * (t(0, 100) - 1e-5)


def test_rebatching_fills_the_deep_stage_and_beats_per_batch_compaction():
    sat_row, lat_rows = serving_plan.plan("b_resnet110", args())
    name, a, b, c = sat_row[:4]
    rows_b, rows_c = (float(v) for v in sat_row[6].split(" / "))
    assert name == "b_resnet110" and len(lat_rows) == len(serving_plan.LOADS)
    assert float(c.replace(",", "")) > float(b.replace(",", ""))
    assert rows_c > 2 * rows_b  # the deep stage runs at (near) full batch, not on one batch's survivors
