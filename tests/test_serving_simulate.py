"""The serving schedule on a virtual clock (branchynet/serving/simulate.py): hand-checked
runs, a real ExitServer's record replayed run for run, and the run-cost helpers."""

import math
import time

import numpy as np
import pytest
import torch

from branchynet import testing
from branchynet.latency import LatencyProfile, measure_latency
from branchynet.serving import (ExitServer, SimResult, poisson_arrivals, simulate, stage_time_from_record,
                                stage_time_from_profile, stage_time_from_table)


def mlp(seed=0, num_exits=3, width=12, classes=6):
    return testing.random_mlp(seed, num_exits, width, classes)


def costs(table):
    """stage_time from {stage: seconds per run}, whatever the rows."""
    return lambda n, k: table[n]


def schedule(res):
    """The runs as (stage, rows), and their start times."""
    return [(n, k) for _, n, k, _ in res.runs], [s for s, _, _, _ in res.runs]


# -- the rule on a virtual clock, checked by hand --------------------------------------------

def test_one_request_waits_its_budget_then_runs():
    res = simulate([0.5], [0], costs({0: 0.001}), num_stages=2, max_batch_size=4, max_wait_ms=2.0)
    assert isinstance(res, SimResult)
    assert schedule(res) == ([(0, 1)], [pytest.approx(0.502)])
    assert res.latency_s.tolist() == [pytest.approx(0.003)]
    assert res.throughput == pytest.approx(1 / 0.003) and res.p50_s == pytest.approx(0.003)
    assert res.exit_counts == [1, 0] and res.mean_rows[0] == 1.0 and math.isnan(res.mean_rows[1])


def test_a_full_queue_runs_at_once():
    t = [0.0, 0.0001, 0.0002, 0.0003, 0.0004]
    res = simulate(t, [0] * 5, costs({0: 0.001}), num_stages=1, max_batch_size=4, max_wait_ms=10.0)
    # the fourth arrival fills the batch; the fifth waits its own 10 ms
    assert schedule(res) == ([(0, 4), (0, 1)], [pytest.approx(0.0003), pytest.approx(0.0104)])
    np.testing.assert_allclose(res.latency_s, [0.0013, 0.0012, 0.0011, 0.0010, 0.0110], atol=1e-12)


def test_without_rebatch_a_batch_is_carried_through():
    t, exits = [0.0, 0.0], [0, 2]
    carried = simulate(t, exits, costs({0: 0.001, 1: 0.001, 2: 0.001}), num_stages=3,
                       max_batch_size=4, max_wait_ms=2.0, rebatch=False)
    assert schedule(carried) == ([(0, 2), (1, 1), (2, 1)],
                                 [pytest.approx(0.002), pytest.approx(0.003), pytest.approx(0.004)])
    np.testing.assert_allclose(carried.latency_s, [0.003, 0.005])
    # pooled: the survivor waits stage 2's and stage 3's budget (nothing upstream: 2 ms)
    pooled = simulate(t, exits, costs({0: 0.001, 1: 0.001, 2: 0.001}), num_stages=3,
                      max_batch_size=4, max_wait_ms=2.0)
    assert schedule(pooled) == ([(0, 2), (1, 1), (2, 1)],
                                [pytest.approx(0.002), pytest.approx(0.005), pytest.approx(0.008)])
    np.testing.assert_allclose(pooled.latency_s, [0.003, 0.009])


def test_exits_are_counted_and_survivors_pooled():
    exits = [0, 1, 2, 2, 1, 2, 0, 2]
    res = simulate([0.0] * 8, exits, costs({0: 0.001, 1: 0.002, 2: 0.004}), num_stages=3,
                   max_batch_size=8, max_wait_ms=1.0)
    assert res.exit_counts == [2, 2, 4]
    assert schedule(res)[0] == [(0, 8), (1, 6), (2, 4)]
    assert res.mean_rows == [8.0, 6.0, 4.0]
    # leavers answered at the end of their stage's run: 0.001, 0.001+1ms wait+0.002, ...
    want = {0: 0.001, 1: 0.004, 2: 0.009}
    np.testing.assert_allclose(res.latency_s, [want[e] for e in exits])
    assert res.throughput == pytest.approx(8 / 0.009)


def test_a_deep_stage_waits_two_stage_one_runs_while_upstream_is_busy():
    # Stage 1 takes 6 ms, so stage 2's budget is 12 ms while stage 1 holds rows (4 ms
    # otherwise). Requests 3 and 4 go on to stage 2; 5 arrives to keep stage 1 busy.
    t = [0.0, 0.0, 0.0, 0.0, 0.011, 0.019]
    exits = [0, 0, 0, 1, 1, 0]
    res = simulate(t, exits, costs({0: 0.006, 1: 0.001}), num_stages=2, max_batch_size=8,
                   max_wait_ms=4.0)
    stages, starts = schedule(res)
    assert stages == [(0, 4), (0, 1), (1, 2), (0, 1)]
    # request 3 joined stage 2 at 0.010 and runs at 0.010 + 2 x 6 ms, not at 0.014 (its
    # max_wait) nor at 0.021 (stage 1 empty for a moment): survivors of two stage-1 runs.
    assert starts == [pytest.approx(s) for s in (0.004, 0.015, 0.022, 0.023)]
    assert res.exit_counts == [4, 2]


def test_the_same_inputs_give_the_same_result():
    t = poisson_arrivals(2000.0, 3000, seed=1)
    exits = np.random.default_rng(2).integers(0, 3, size=t.size)
    cost = stage_time_from_table({"stages": [{"rows": [1, 64], "seconds": [2e-4, 1e-3]}] * 3})
    a, b = (simulate(t, exits, cost, num_stages=3, max_batch_size=64, max_wait_ms=2.0)
            for _ in range(2))
    assert a.runs == b.runs and np.array_equal(a.latency_s, b.latency_s)
    assert (a.exit_counts, a.throughput, a.p99_s) == (b.exit_counts, b.throughput, b.p99_s)
    assert sum(k for _, n, k, _ in a.runs if n == 0) == t.size  # every request ran stage 1
    assert np.all(a.latency_s > 0) and a.exit_counts == np.bincount(exits, minlength=3).tolist()
    np.testing.assert_array_equal(t, poisson_arrivals(2000.0, 3000, seed=1))
    assert not np.array_equal(t, poisson_arrivals(2000.0, 3000, seed=3))
    assert np.all(np.diff(t) >= 0) and abs(t.size / t[-1] - 2000.0) < 200.0


def test_a_replayed_record_that_runs_out_or_bad_exits_say_so():
    with pytest.raises(ValueError, match="ran out at run 2"):
        simulate([0.0], [1], [0.001], num_stages=2, max_wait_ms=1.0)
    with pytest.raises(ValueError, match="exits must be ints in"):
        simulate([0.0], [2], [0.001], num_stages=2)
    with pytest.raises(ValueError, match="ascending"):
        simulate([0.1, 0.0], [0, 0], [0.001], num_stages=1)


# -- a real server's record, replayed --------------------------------------------------------

def _burst(server, xs, futures):
    for x in xs:
        futures.append(server.submit(x, timeout_s=30.0))


def test_costs_from_a_record_group_rows_by_powers_of_two_and_take_medians():
    busy = [(0, 1, 1.0), (0, 1, 3.0), (0, 1, 2.0), (0, 3, 40.0), (0, 2, 4.0), (0, 2, 6.0), (0, 2, 5.0),
            (1, 4, 8.0)]
    cost = stage_time_from_record(busy)
    assert cost(0, 1) == 2.0  # median of 1, 3, 2
    assert cost(0, 2) == 5.5  # 2-3 rows: median rows 2, median seconds of 4, 6, 5, 40
    assert cost(1, 4) == 8.0 and cost(1, 2) == 4.0  # through (0, 0) below the smallest
    with pytest.raises(ValueError, match="stage 2 never ran"):
        stage_time_from_record(busy, num_stages=3)
    with pytest.raises(ValueError, match="no runs"):
        stage_time_from_record({"busy": []})


def test_a_late_timer_delays_a_budget_run_but_an_arrival_wakes_the_worker():
    const = lambda n, k: 1e-3  # noqa: E731
    late = simulate([0.0], [0], const, num_stages=1, max_batch_size=8, max_wait_ms=2.0, wake_lag_s=5e-4)
    assert late.runs[0][0] == pytest.approx(2.5e-3)
    # the second request arrives after the budget ran out but before the timer fires: its
    # submit wakes the worker, which finds the budget spent and runs both at once
    woken = simulate([0.0, 2.2e-3], [0, 0], const, num_stages=1, max_batch_size=8, max_wait_ms=2.0,
                     wake_lag_s=5e-4)
    assert [(r[0], r[2]) for r in woken.runs] == [(pytest.approx(2.2e-3), 2)]
    with pytest.raises(ValueError, match="wake_lag_s"):
        simulate([0.0], [0], const, num_stages=1, wake_lag_s=-1.0)


@pytest.mark.parametrize("rebatch", [True, False])
def test_replaying_a_real_servers_record_makes_the_same_runs(one_thread, rebatch):
    """Every decision of this load falls on a full queue or a 30 ms budget expiry with no
    other event within 20 ms of it, so thread jitter cannot change it."""
    model = mlp(0)
    thresholds = [0.5, 0.8]
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(50, 12, generator=g) * torch.linspace(0.05, 3.0, 50).unsqueeze(1)
    futures = []
    with ExitServer(model, thresholds, max_batch_size=16, max_wait_ms=30, rebatch=rebatch,
                     record=True) as server:
        t0 = time.perf_counter()
        # rebatch=True: 10 rows wait 30 ms at every stage; a full batch runs at once; a
        # full batch, then 8 more 25 ms later: stage 2 runs the survivors of the 16 while
        # stage 1's 8 still wait. rebatch=False: each batch carried through at once.
        plan = [(0.0, xs[0:10]), (0.3, xs[10:26]), (0.6, xs[26:42]), (0.625, xs[42:50])]
        for at, chunk in plan:
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            _burst(server, chunk, futures)
        exits = [f.result(timeout=30.0).exit for f in futures]
    rec = server.record()  # after close: a run is recorded just after its answers resolve
    assert len(rec["arrivals"]) == 50 and len(set(exits)) == 3, exits
    res = simulate(rec["arrivals"], exits, [s for _, _, _, s in rec["runs"]], num_stages=3,
                   max_batch_size=16, max_wait_ms=30, rebatch=rebatch)
    stages, starts = schedule(res)
    assert stages == [(n, k) for _, n, k, _ in rec["runs"]]
    # The server starts a run when its worker wakes, never before the rule allows it, so
    # it lags the virtual clock by the wake-up delays along a chain of runs: 1 to 5 ms on
    # a quiet 2-core CPU, up to 19 ms with both cores saturated by other work (load average
    # 7). The decisions above rely on no more than the 20 ms between events.
    lag = np.array([s for s, _, _, _ in rec["runs"]]) - np.array(starts)
    assert np.all(lag > -1e-6) and np.all(lag < 0.02), lag
    # busy: the worker's whole time on each run, in the same order, never less than the run
    assert [(n, k) for n, k, _ in rec["busy"]] == stages
    assert all(b >= s for (_, _, b), (_, _, _, s) in zip(rec["busy"], rec["runs"]))
    cost = stage_time_from_record(rec)
    assert all(cost(n, k) > 0 for n, k in stages)
    assert res.exit_counts == np.bincount(exits, minlength=3).tolist()


# -- what a run costs ------------------------------------------------------------------------

def test_stage_time_from_a_profile_interpolates_and_extrapolates():
    profile = LatencyProfile(batch_size=8, sizes=[1, 2, 4, 8],
                             segment=[[1.0, 2.0, 3.0, 5.0], [0.5, 0.5, 0.5, 0.5]])
    f = stage_time_from_profile(profile)
    assert [f(0, k) for k in (1, 2, 3, 4, 6, 8)] == pytest.approx([1.0, 2.0, 2.5, 3.0, 4.0, 5.0])
    assert f(0, 12) == pytest.approx(7.0)  # beyond 8: the slope of (4, 3) to (8, 5)
    assert f(1, 3) == pytest.approx(0.5) and f(1, 100) == pytest.approx(0.5)
    assert f(0, 0.5) == pytest.approx(0.5)  # t(0) = 0 below the smallest size
    with pytest.raises(IndexError, match="stages 0 to 1"):
        f(2, 1)


def test_stage_time_from_a_measured_profile_gives_its_times(one_thread):
    model = mlp(1, num_exits=2)
    profile = measure_latency(model, torch.randn(4, 12), repeats=1)
    f = stage_time_from_profile(profile)
    for n, seg in enumerate(profile.segment):
        assert [f(n, k) for k in profile.sizes] == pytest.approx(seg)
        assert f(n, 3) == pytest.approx((seg[1] + seg[2]) / 2)  # sizes 1, 2, 4


def test_stage_time_from_a_table():
    f = stage_time_from_table({"stages": [{"rows": [0, 16], "seconds": [0.001, 0.003]},
                                          {"rows": [4], "seconds": [0.002]}]})
    assert f(0, 8) == pytest.approx(0.002) and f(0, 32) == pytest.approx(0.005)
    assert f(1, 2) == pytest.approx(0.001) and f(1, 8) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="ascending"):
        stage_time_from_table({"stages": [{"rows": [4, 2], "seconds": [1.0, 2.0]}]})
    with pytest.raises(ValueError, match="stages"):
        stage_time_from_table({"rows": [1], "seconds": [1.0]})
