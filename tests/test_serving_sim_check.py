"""benchmarks/serving_sim_check.py: the simulator's inputs and its prediction call."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serving_sim_check as C  # noqa: E402


def test_the_servers_own_cost_per_row_is_measured_and_small():
    c = C.server_cost_per_row(batch=16, n=512)
    assert 0 < c < 0.01


def test_predict_cycles_the_pools_exits_and_knows_per_batch_from_rebatch():
    def cost(n, k):
        return 1e-4 + 1e-5 * k

    pred = {"rebatch": (cost, 2, np.array([0, 1])), "per_batch": (cost, 2, np.array([0, 1]))}
    arrivals = np.zeros(10)
    a = C.predict(pred, "rebatch", arrivals, batch=4, wait_ms=1.0)
    b = C.predict(pred, "per_batch", arrivals, batch=4, wait_ms=1.0)
    assert a.exit_counts == b.exit_counts == [5, 5]
    assert a.mean_rows[1] > b.mean_rows[1]  # pooled survivors: fuller deep runs
