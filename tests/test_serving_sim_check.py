"""benchmarks/serving_sim_check.py: the simulator's inputs and its prediction call."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serving_sim_check as C  # noqa: E402


def test_the_servers_own_cost_of_a_run_is_measured_per_row_count():
    cost = C.server_overhead(batch=16, runs=4)
    # Measured times: only that they are there and sane (their order is the machine's).
    assert all(0 < cost(k) < 0.05 for k in (1, 4, 16))


def test_timer_lag_is_a_small_non_negative_number():
    assert 0 <= C.timer_lag(0.001, repeats=20) < 0.05


def test_predict_cycles_the_pools_exits_and_knows_per_batch_from_rebatch():
    def cost(n, k):
        return 1e-4 + 1e-5 * k

    pred = {"rebatch": (cost, 2, np.array([0, 1])), "per_batch": (cost, 2, np.array([0, 1]))}
    arrivals = np.zeros(10)
    a = C.predict(pred, "rebatch", arrivals, batch=4, wait_ms=1.0)
    b = C.predict(pred, "per_batch", arrivals, batch=4, wait_ms=1.0)
    assert a.exit_counts == b.exit_counts == [5, 5]
    assert a.mean_rows[1] > b.mean_rows[1]  # pooled survivors: fuller deep runs
