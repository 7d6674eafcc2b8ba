"""The serving scheduler's rule (branchynet/serving/scheduler.py) on a virtual clock."""

import pytest

from branchynet.serving.scheduler import Scheduler


def ids(a, b):
    return list(range(a, b))


def test_stage_one_waits_its_budget_then_runs():
    s = Scheduler(3, max_batch=4, max_wait_s=0.002)
    s.add(0, ids(0, 1), t=0.0)
    assert s.pick(0.001) is None and s.wake() == pytest.approx(0.002)
    assert s.pick(0.002) == 0
    assert s.take(0) == [[0]] and s.rows == [0, 0, 0]


def test_a_full_queue_runs_at_once_and_the_deepest_first():
    s = Scheduler(3, max_batch=4, max_wait_s=1.0)
    s.add(0, ids(0, 4), t=0.0)
    assert s.pick(0.0) == 0
    s.add(2, ids(10, 14), t=0.0)
    assert s.pick(0.0) == 2  # finishes the requests already in flight


def test_take_splits_the_last_chunk_and_keeps_its_place():
    s = Scheduler(2, max_batch=4, max_wait_s=0.0)
    s.add(0, ids(0, 3), t=0.0)
    s.add(0, ids(3, 6), t=0.5)
    assert s.take(0) == [[0, 1, 2], [3]]
    assert s.rows[0] == 2 and s.queues[0][0].t == 0.5 and s.take(0) == [[4, 5]]


def test_deep_stages_wait_two_stage_one_runs_while_upstream_is_busy():
    s = Scheduler(2, max_batch=100, max_wait_s=0.002)
    s.ran(0, 0.010)  # a stage-1 run takes 10 ms
    s.add(1, ids(0, 30), t=0.0)
    s.add(0, ids(100, 101), t=0.0)  # upstream still has rows: more survivors will come
    assert s.budget(1) == pytest.approx(0.020)
    assert s.pick(0.005) == 0  # stage 1's own budget has run out, not stage 2's
    s.take(0)
    assert s.budget(1) == pytest.approx(0.002)  # nothing upstream: nothing more can join
    assert s.pick(0.005) == 1


def test_closing_drains_every_queue_deepest_first():
    s = Scheduler(3, max_batch=8, max_wait_s=10.0)
    s.add(0, ids(0, 2), t=0.0)
    s.add(1, ids(2, 3), t=0.0)
    assert s.pick(0.0) is None
    assert s.pick(0.0, closing=True) == 1
    s.take(1)
    assert s.pick(0.0, closing=True) == 0
    assert s.clear() == [[0, 1]] and s.rows == [0, 0, 0] and s.wake() is None


def test_the_stage_one_mean_follows_its_runs():
    s = Scheduler(2, max_batch=8, max_wait_s=0.0)
    s.ran(1, 5.0)  # deep runs do not count
    assert s.stage1_s == 0.0
    s.ran(0, 1.0)
    s.ran(0, 2.0)
    assert s.stage1_s == pytest.approx(1.2)
