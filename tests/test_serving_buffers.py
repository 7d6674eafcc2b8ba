"""StageBuffer: a stage's queued rows in one tensor, first-in first-out."""

import pytest
import torch

from branchynet.serving.buffers import StageBuffer


def test_rows_come_out_in_the_order_they_went_in_across_growth_and_pops():
    q = StageBuffer(capacity=2)
    ref = []
    counter = iter(range(10_000))

    def rows(k):
        return torch.tensor([[float(next(counter))] * 3 for _ in range(k)]).reshape(k, 3)

    g = torch.Generator().manual_seed(0)
    for step in range(200):
        k = int(torch.randint(0, 5, (1,), generator=g))
        if k:
            r = rows(k)
            q.append(r)
            ref += r[:, 0].tolist()
        if q.rows and step % 3 == 0:
            take = int(torch.randint(1, q.rows + 1, (1,), generator=g))
            assert q.front(take)[:, 0].tolist() == ref[:take]
            q.pop_front(take)
            del ref[:take]
        assert q.rows == len(ref)
    assert q.buf.shape[0] > 2  # it grew


def test_gather_appends_the_indexed_rows_at_the_fill_offset():
    q = StageBuffer(capacity=4)
    q.append(torch.zeros(2, 2))
    h = torch.arange(10.0).reshape(5, 2)
    q.gather(h, torch.tensor([4, 1]))
    q.gather(h, torch.tensor([], dtype=torch.int64))  # no survivors: nothing
    assert q.rows == 4 and q.front(4).tolist() == [[0, 0], [0, 0], [8, 9], [2, 3]]
    q.gather(h, torch.tensor([0, 2, 3]))  # past the capacity: grows, keeps the rows
    assert q.front(7)[2:].tolist() == [[8, 9], [2, 3], [0, 1], [4, 5], [6, 7]]


def test_a_view_taken_before_growth_stays_valid():
    q = StageBuffer(capacity=2)
    q.append(torch.ones(2, 1))
    view = q.front(2)
    q.append(torch.full((3, 1), 2.0))  # reallocates while the view is in use
    assert view.tolist() == [[1.0], [1.0]]
    q.pop_front(2)
    assert q.front(3).tolist() == [[2.0]] * 3


def test_bad_calls_say_what_was_expected():
    q = StageBuffer(capacity=2)
    with pytest.raises(ValueError, match="capacity"):
        StageBuffer(0)
    q.append(torch.ones(1, 3))
    with pytest.raises(ValueError, match="shape"):
        q.append(torch.ones(1, 4))
    with pytest.raises(ValueError, match="shape"):
        q.append(torch.ones(5, 4))  # also where it would have to grow
    with pytest.raises(ValueError, match=r"k must be in \[1, 1\]"):
        q.front(2)
    with pytest.raises(ValueError, match=r"k must be in \[0, 1\]"):
        q.pop_front(2)


def test_rows_written_from_inference_mode_can_be_moved_outside_it():
    q = StageBuffer(capacity=2)
    with torch.inference_mode():
        q.gather(torch.ones(3, 2), torch.tensor([0, 1, 2]))
    q.pop_front(1)  # a buffer allocated as an inference tensor would refuse this
    assert q.rows == 2


def test_taking_rows_does_not_copy_the_backlog_and_appends_copy_each_row_o1_times():
    q = StageBuffer(capacity=4)
    copied = [0]
    real_room = StageBuffer._room

    def counting_room(self, like, k):
        before = self.buf
        out = real_room(self, like, k)
        if before is not None and self.buf is not before:
            copied[0] += self.rows  # rows moved to the new tensor
        return out

    StageBuffer._room = counting_room
    try:
        n = 0
        for step in range(2000):  # a backlog of ~1000 rows, one taken for every two added
            q.append(torch.full((2, 1), float(step)))
            n += 2
            q.pop_front(1)
    finally:
        StageBuffer._room = real_room
    assert q.rows == 2000
    assert copied[0] < 3 * n  # amortised: a few copies per row, not one per pop


def test_pop_front_moves_no_rows():
    q = StageBuffer(capacity=8)
    q.append(torch.arange(6.0).reshape(6, 1))
    second = q.front(2)[1].data_ptr()
    q.pop_front(1)  # a stage-1 backlog stays where it is: no copy per run
    assert q.front(1).data_ptr() == second and q.front(5)[:, 0].tolist() == [1, 2, 3, 4, 5]
