"""The exit server (:mod:`branchynet.serving`): one sample per request, batched behind the
scenes, answered as the paper's rule answers that sample alone.

Every answer is checked against :func:`branchynet.testing.per_sample_rule` (or the
batched engine, which the engine tests hold to that rule). The models are tiny float64
MLPs, so a batched and a one-sample run agree to ~1e-15 and the thresholds from
:func:`~branchynet.testing.split_thresholds` sit in gaps of the scores: no answer can flip
between them. A stage that must hold a run still is a :class:`Gate` (an event, not a
sleep), so what is queued or running when the test acts is known, not raced.

Every wait has a timeout: a server that loses a request fails the test, never hangs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import math
import threading
import time

import pytest
import torch
from torch import nn

import branchynet as bn
from branchynet import testing
from branchynet.exits import exit_scores
from branchynet.testing import per_sample_rule, split_thresholds

from branchynet.serving import ExitAnswer, ExitServer, Overloaded

WAIT = 20.0  # seconds any single answer may take before the test calls it lost


# --- models and samples -----------------------------------------------------------------


def mlp(seed=0, num_exits=3, width=8, classes=5, dtype=torch.float64, stages=None):
    """A random MLP BranchyNet; ``stages`` replaces the generated stage modules (a gate,
    a failing stage) while keeping the random weights of the rest."""
    return testing.random_mlp(seed, num_exits, width, classes, dtype, stages=stages)


def samples(n, width=8, seed=1, dtype=torch.float64):
    """n samples whose scales differ, so their scores (and exits) spread."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 3 + 0.05
    return (torch.randn(n, width, generator=g, dtype=torch.float64) * scale).to(dtype)


def model_and_thresholds(seed=0, **kw):
    """A model with thresholds that send some samples out of every exit."""
    model = mlp(seed, **kw)
    ts = split_thresholds(model, samples(256, width=kw.get("width", 8), seed=seed + 100))
    return model, ts


class Gate(nn.Module):
    """Runs ``inner``, but first waits while the gate is shut: holds a run inside the stage
    so the test knows which requests are queued behind it.

    ``entered`` is set when a run waits at the shut gate.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.is_open = threading.Event()
        self.is_open.set()
        self.entered = threading.Event()

    def shut(self):
        self.entered.clear()
        self.is_open.clear()

    def open(self):
        self.is_open.set()

    def forward(self, h):
        if not self.is_open.is_set():
            self.entered.set()
            assert self.is_open.wait(WAIT), "the test never opened the gate"
        return self.inner(h)


class Slow(nn.Module):
    """Runs ``inner`` after a sleep: a stage slower than the requests arrive."""

    def __init__(self, inner: nn.Module, delay_s: float):
        super().__init__()
        self.inner, self.delay_s = inner, delay_s

    def forward(self, h):
        time.sleep(self.delay_s)
        return self.inner(h)



def gated_model(seed=0, at=0):
    """A model whose stage ``at`` is a :class:`Gate`; returns (model, gate)."""
    base = mlp(seed)
    gate = Gate(base.stages[at])
    stages = [None] * base.num_exits
    stages[at] = gate
    return mlp(seed, stages=stages), gate


# --- the server under a time limit -----------------------------------------------------


def close_within(server, drain=True, timeout=WAIT):
    """``server.close(drain)`` on a helper thread: a close that never returns fails the
    test instead of hanging the suite."""
    errors = []

    def close():
        try:
            server.close(drain=drain)
        except BaseException as e:  # re-raised on the test's thread
            errors.append(e)

    t = threading.Thread(target=close, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"close(drain={drain}) did not return within {timeout} s"
    if errors:
        raise errors[0]


@contextlib.contextmanager
def serve(model, thresholds=None, **kw):
    """An :class:`ExitServer` closed with drain on leaving, within :data:`WAIT`."""
    server = ExitServer(model, thresholds, **kw)
    try:
        yield server
    finally:
        close_within(server)


# --- answers ----------------------------------------------------------------------------


def results(futures, timeout=WAIT):
    """Every future's answer, or the test fails naming the first one not answered."""
    done, pending = cf.wait(futures, timeout=timeout)
    assert not pending, f"{len(pending)} of {len(futures)} requests never answered"
    return [f.result(timeout=0) for f in futures]


def settled_stats(server, requests=0, *, answered=0, timeout=5.0):
    """``server.stats()`` once at least ``requests`` requests are counted answered or
    failed and ``answered`` answered: the counters may be updated just after a future is
    resolved, so a read right after the last answer could see them one behind."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if ((stats["answered"] + stats["failed"] >= requests and stats["answered"] >= answered)
                or time.monotonic() > deadline):
            return stats
        time.sleep(0.01)


def assert_rule(answers, model, x, thresholds):
    """Each answer is what the paper's rule gives its sample alone."""
    want = per_sample_rule(model, x, thresholds)
    for i, (r, w) in enumerate(zip(answers, want, strict=True)):
        assert isinstance(r, ExitAnswer)
        assert (r.exit, r.pred) == (w.exit, w.pred), f"sample {i}: got exit {r.exit} pred {r.pred}"
        assert isinstance(r.exit, int) and isinstance(r.pred, int)
        assert math.isclose(r.entropy, w.entropy, rel_tol=1e-5, abs_tol=1e-6), f"sample {i}"
        assert math.isclose(r.score, r.entropy, rel_tol=1e-6, abs_tol=1e-7), f"sample {i}"
        assert r.logits.device.type == "cpu" and r.logits.shape == w.logits.shape
        torch.testing.assert_close(r.logits, w.logits, rtol=1e-9, atol=1e-9)
        assert r.latency_s > 0


def submit_from_threads(server, x, threads=4, **kw):
    """Submit every row of x, rows split over ``threads`` threads started together;
    returns the futures in row order."""
    futures = [None] * x.shape[0]
    start = threading.Barrier(threads)

    def work(k):
        start.wait()
        for i in range(k, x.shape[0], threads):
            futures[i] = server.submit(x[i], **kw)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(WAIT)
    assert all(f is not None for f in futures)
    return futures


# --- answers equal the per-sample rule --------------------------------------------------


@pytest.mark.parametrize("rebatch", [True, False], ids=["rebatch", "per-batch"])
def test_answers_from_several_threads_equal_the_per_sample_rule(rebatch):
    model, ts = model_and_thresholds()
    x = samples(300)
    with serve(model, ts, max_batch_size=16, max_wait_ms=1.0, rebatch=rebatch) as server:
        t0 = time.perf_counter()
        answers = results(submit_from_threads(server, x))
        elapsed = time.perf_counter() - t0
    assert_rule(answers, model, x, ts)
    # latency_s runs from submit to answer, both inside this window.
    assert max(r.latency_s for r in answers) <= elapsed
    # The thresholds split the samples: every exit answers some, so a server that sent
    # everyone to one exit cannot pass.
    assert {r.exit for r in answers} == set(range(model.num_exits))


def test_thresholds_default_to_the_models_exit_config():
    model, ts = model_and_thresholds(seed=3)
    model.exit_config.thresholds = ts
    x = samples(64, seed=4)
    with serve(model) as server:
        answers = results([server.submit(row) for row in x])
    assert_rule(answers, model, x, ts)


def test_a_criterion_other_than_entropy_answers_as_the_engine_does():
    model = mlp(seed=5)
    x = samples(64, seed=6)
    ts = [0.3, 0.3]
    want = bn.EarlyExitEngine(model, ts, criterion="margin").per_sample(x)
    with serve(model, ts, criterion="margin") as server:
        answers = results([server.submit(row) for row in x])
    assert [r.exit for r in answers] == want.exit.tolist()
    assert [r.pred for r in answers] == want.pred.tolist()
    for i, r in enumerate(answers):
        assert math.isclose(r.entropy, float(want.entropy[i]), rel_tol=1e-5, abs_tol=1e-6)
        # The score is the criterion's, not the entropy: the one the exit was decided on.
        score = float(exit_scores(r.logits[None], "margin")[0])
        assert math.isclose(r.score, score, rel_tol=1e-5, abs_tol=1e-6), f"sample {i}"
        if r.exit < len(ts):
            assert r.score < ts[r.exit]
    assert 0 < sum(r.exit == 0 for r in answers) < len(answers), "margin 0.3 should split"


@pytest.mark.parametrize("rebatch", [True, False], ids=["rebatch", "per-batch"])
def test_patience_answers_as_pabees_rule(rebatch):
    # Each request's streak is carried from its run at one stage to its run at the next,
    # whichever rows it is batched with there.
    model = mlp(seed=3, num_exits=6, classes=3)
    x = samples(200, seed=6)
    with torch.no_grad():
        want = testing.patience_rule(model(x), 2)
    with serve(model, criterion="patience", patience=2, max_batch_size=16, max_wait_ms=1.0,
               rebatch=rebatch) as server:
        answers = results(submit_from_threads(server, x))
    assert [(r.exit, r.pred) for r in answers] == want
    assert len({r.exit for r in answers}) > 2
    # The score is the streak the sample left on (P or more at a side exit).
    assert all(r.score >= 2 for r in answers if r.exit < 5)
    assert all(r.score == int(r.score) >= 0 for r in answers)


def test_a_plain_module_is_one_stage_without_side_exit():
    g = torch.Generator().manual_seed(7)
    module = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = samples(100, seed=8)
    with serve(module, max_batch_size=8) as server:
        answers = results(submit_from_threads(server, x))
        stats = settled_stats(server, 100)
    with torch.no_grad():
        z = module(x)
    p = torch.softmax(z, 1)
    entropy = -(p * p.log()).sum(1)
    for i, r in enumerate(answers):
        assert r.exit == 0 and r.pred == int(z[i].argmax()), f"sample {i}"
        torch.testing.assert_close(r.logits, z[i], rtol=1e-9, atol=1e-9)
        assert math.isclose(r.entropy, float(entropy[i]), rel_tol=1e-5, abs_tol=1e-6)
    assert stats["exits"] == [100] and stats["stage_rows"] == [100]


def test_a_plain_module_refuses_a_sample_of_another_dtype_naming_x():
    module = nn.Sequential(nn.Linear(8, 5)).eval()
    with serve(module) as server:
        for bad in (torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.float64)):
            with pytest.raises(TypeError, match=r"\bx\b"):
                server.submit(bad)
        assert server.stats()["stage_runs"] == [0]
        r = results([server.submit(torch.ones(8))])[0]
    with torch.no_grad():
        assert (r.exit, r.pred) == (0, int(module(torch.ones(1, 8)).argmax()))


# --- nothing lost, nothing answered twice -----------------------------------------------


def test_a_hundred_thousand_requests_are_each_answered_once(one_thread):
    """Four threads submit 100,000 requests as fast as they can; a request refused for
    overload is submitted again. Each answer is the one for its own sample (the batched
    engine's row, which the engine tests hold to the per-sample rule)."""
    model, ts = model_and_thresholds(seed=9, num_exits=2, width=4, classes=3)
    total, threads = 100_000, 4
    x = samples(total, width=4, seed=10)
    want = bn.EarlyExitEngine(model, ts)(x)
    calls = [0] * total
    lock = threading.Lock()
    retries = [0] * threads
    futures = [None] * total

    def count(i):
        def done(_):
            with lock:
                calls[i] += 1
        return done

    with serve(model, ts, max_batch_size=256, max_wait_ms=1.0) as server:
        start = threading.Barrier(threads)

        def work(k):
            start.wait()
            for i in range(k, total, threads):
                while True:
                    try:
                        f = server.submit(x[i])
                        break
                    except Overloaded:
                        retries[k] += 1
                        time.sleep(0.001)
                f.add_done_callback(count(i))
                futures[i] = f

        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(120)
        assert all(f is not None for f in futures), "a submitting thread died"
        done, pending = cf.wait(futures, timeout=120)
        assert not pending, f"{len(pending)} requests never answered"
        stats = settled_stats(server, total)
    exits = torch.tensor([f.result(timeout=0).exit for f in futures])
    preds = torch.tensor([f.result(timeout=0).pred for f in futures])
    assert torch.equal(exits, want.exit) and torch.equal(preds, want.pred)
    # A done callback runs once per resolution; a future set twice would raise in the
    # server, and a lost one would have stayed pending above.
    assert calls == [1] * total
    assert stats["answered"] == total and stats["failed"] == 0
    assert sum(stats["exits"]) == total and stats["exits"] == want.counts
    assert stats["overloaded"] == sum(retries)
    assert stats["queued"] == [0] * model.num_exits


# --- overload and timeouts --------------------------------------------------------------


def test_submit_beyond_the_queue_bound_raises_overloaded_at_once():
    assert issubclass(Overloaded, RuntimeError)
    model, gate = gated_model(seed=11)
    ts = split_thresholds(model, samples(256, seed=111))
    x = samples(40, seed=12)
    accepted, refused = [], 0
    with serve(model, ts, max_batch_size=2, max_queued=4, max_wait_ms=0.0) as server:
        gate.shut()
        try:
            accepted.append((0, server.submit(x[0])))
            assert gate.entered.wait(WAIT), "the first request never reached stage 0"
            for i in range(1, 40):
                t0 = time.perf_counter()
                try:
                    accepted.append((i, server.submit(x[i])))
                except Overloaded:
                    refused += 1
                    assert time.perf_counter() - t0 < 0.5, "an overloaded submit waited"
            stats = server.stats()
        finally:
            gate.open()
        # Stage 0 holds one run of at most 2 rows; at most 4 rows wait behind it.
        assert refused >= 40 - 1 - 2 - 4
        assert stats["overloaded"] == refused
        assert sum(stats["queued"]) <= 4
        answers = results([f for _, f in accepted])
    rows = [i for i, _ in accepted]
    assert_rule(answers, model, x[rows], ts)
    assert settled_stats(server, answered=len(accepted))["answered"] == len(accepted)


def test_a_request_past_its_timeout_fails_alone_with_timeout_error():
    model, gate = gated_model(seed=13)
    ts = split_thresholds(model, samples(256, seed=113))
    x = samples(6, seed=14)
    with serve(model, ts, max_batch_size=1, max_wait_ms=0.0) as server:
        gate.shut()
        try:
            first = server.submit(x[0])
            assert gate.entered.wait(WAIT)
            t0 = time.perf_counter()
            late = server.submit(x[1], timeout_s=0.2)
            others = [server.submit(row, timeout_s=60.0) for row in x[2:]]
            # The stage is still held: the timed-out request must fail at its deadline,
            # not when the stage lets it through.
            done, _ = cf.wait([late], timeout=WAIT)
            elapsed = time.perf_counter() - t0
        finally:
            gate.open()
        assert late in done, "the request outlived its timeout while the stage was held"
        assert isinstance(late.exception(timeout=0), TimeoutError)
        assert 0.15 <= elapsed < 10
        answers = results([first] + others)
    assert_rule(answers, model, torch.cat([x[:1], x[2:]]), ts)
    # Whether a timeout also counts as failed is not pinned; the answers are.
    assert settled_stats(server, answered=5)["answered"] == 5


# --- bad samples ------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(1, 8), ValueError),                     # a batch dimension
    (torch.zeros(9), ValueError),                        # another size
    (torch.zeros(()), ValueError),                       # a scalar
    (torch.zeros(8, dtype=torch.int64), TypeError),      # not floating point
    (torch.zeros(8, dtype=torch.float64), TypeError),    # not the model's float32
], ids=["batch-dim", "wrong-size", "scalar", "int64", "float64"])
def test_a_bad_sample_is_refused_at_submit_naming_x(bad, error):
    model = mlp(seed=15, dtype=torch.float32)
    with serve(model, [0.0, 0.0]) as server:
        with pytest.raises(error, match=r"\bx\b"):
            server.submit(bad)
        stats = server.stats()
        assert stats["stage_runs"] == [0, 0, 0] and stats["stage_rows"] == [0, 0, 0]
        # The refused sample never reached a batch: the next request runs alone.
        good = samples(1, seed=16, dtype=torch.float32)
        r = results([server.submit(good[0])])[0]
        stats = settled_stats(server, 1)
        assert stats["stage_rows"][0] == 1 and stats["failed"] == 0
    w = per_sample_rule(model, good, [0.0, 0.0])[0]
    assert (r.exit, r.pred) == (w.exit, w.pred)


def test_a_bad_sample_to_predict_is_refused_naming_x():
    model = mlp(seed=15, dtype=torch.float32)

    async def ask(server):
        return await server.predict(torch.zeros(1, 8))

    with serve(model, [0.5, 0.5]) as server:
        with pytest.raises(ValueError, match=r"\bx\b"):
            asyncio.run(ask(server))


# --- a failing stage --------------------------------------------------------------------


def faulty_model(seed=17):
    """Stage 0 passes samples through unchanged and stage 1 raises for a marked sample;
    with thresholds 0 nobody leaves at exit 0, so every sample reaches the faulty stage."""
    return mlp(seed, stages=[nn.Identity(), testing.FaultyStage(mlp(seed).stages[1]), None])


@pytest.mark.parametrize("rebatch", [True, False], ids=["rebatch", "per-batch"])
def test_a_failing_stage_fails_its_runs_requests_and_the_server_goes_on(rebatch):
    model, ts = faulty_model(), [0.0, 0.0]
    x = samples(40, seed=18)
    marked = samples(1, seed=19)
    marked[0, 0] = 1e6
    with serve(model, ts, max_batch_size=8, rebatch=rebatch) as server:
        bad = server.submit(marked[0])
        assert cf.wait([bad], timeout=WAIT).done == {bad}
        error = bad.exception(timeout=0)
        assert isinstance(error, ValueError) and "marked sample" in str(error)
        # A burst with a marked sample in the middle: the marked one fails; the others
        # either share its run (and fail with the same error) or answer correctly.
        burst = torch.cat([x[:20], marked, x[20:]])
        futures = submit_from_threads(server, burst, threads=2)
        cf.wait(futures, timeout=WAIT)
        assert all(f.done() for f in futures)
        assert isinstance(futures[20].exception(timeout=0), ValueError)
        ok = [i for i, f in enumerate(futures) if f.exception(timeout=0) is None]
        for i, f in enumerate(futures):
            if i not in ok:
                assert "marked sample" in str(f.exception(timeout=0))
        assert_rule([futures[i].result(timeout=0) for i in ok], model, burst[ok], ts)
        # Later requests are served.
        later = results(submit_from_threads(server, x, threads=2))
        stats = settled_stats(server, 1 + len(futures) + len(x))
    assert_rule(later, model, x, ts)
    failed = 1 + len(futures) - len(ok)
    assert stats["failed"] == failed
    assert stats["answered"] == len(ok) + len(x)
    assert stats["stage_rows"][0] == failed + stats["answered"]


# --- close ------------------------------------------------------------------------------


def test_close_with_drain_answers_everything_queued():
    model, gate = gated_model(seed=20)
    ts = split_thresholds(model, samples(256, seed=120))
    x = samples(10, seed=21)
    server = ExitServer(model, ts, max_batch_size=2, max_wait_ms=0.0)
    gate.shut()
    opener = threading.Timer(0.3, gate.open)
    try:
        futures = [server.submit(x[0])]
        assert gate.entered.wait(WAIT)
        futures += [server.submit(row) for row in x[1:]]
        opener.start()  # close must wait for the held run, then answer the queue
        close_within(server, drain=True)
    finally:
        opener.cancel()
        gate.open()
    assert all(f.done() for f in futures), "close(drain=True) returned with requests pending"
    assert_rule(results(futures), model, x, ts)
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(x[0])
    assert settled_stats(server, answered=10)["answered"] == 10


def test_close_without_drain_fails_the_queued_requests():
    model, gate = gated_model(seed=22)
    ts = split_thresholds(model, samples(256, seed=122))
    x = samples(10, seed=23)
    server = ExitServer(model, ts, max_batch_size=1, max_wait_ms=0.0)
    gate.shut()
    opener = threading.Timer(0.3, gate.open)
    try:
        held = server.submit(x[0])
        assert gate.entered.wait(WAIT)
        queued = [server.submit(row) for row in x[1:]]
        opener.start()
        close_within(server, drain=False)
    finally:
        opener.cancel()
        gate.open()
    cf.wait([held] + queued, timeout=WAIT)
    for f in queued:
        assert f.done()
        error = f.exception(timeout=0)
        assert isinstance(error, RuntimeError) and "closed" in str(error)
    # The run inside the stage when close came may finish or fail, but not hang.
    assert held.done()
    if held.exception(timeout=0) is None:
        assert_rule([held.result(timeout=0)], model, x[:1], ts)
    else:
        assert "closed" in str(held.exception(timeout=0))
    stats = settled_stats(server, 10)
    assert stats["answered"] + stats["failed"] == 10
    assert stats["failed"] >= 9
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(x[0])


def test_the_context_manager_drains_on_exit_and_then_refuses():
    model, ts = model_and_thresholds(seed=24)
    x = samples(50, seed=25)
    futures, used = [], []

    def use():
        with ExitServer(model, ts, max_batch_size=4) as server:
            futures.extend(server.submit(row) for row in x)
        used.append(server)

    # On a helper thread: a __exit__ that never returns fails the test, not the suite.
    t = threading.Thread(target=use, daemon=True)
    t.start()
    t.join(WAIT)
    assert used, "the with block did not finish"
    server = used[0]
    assert all(f.done() for f in futures), "__exit__ returned with requests pending"
    assert_rule(results(futures), model, x, ts)
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(x[0])


# --- asyncio ----------------------------------------------------------------------------


def test_predict_answers_as_submit_does():
    model, ts = model_and_thresholds(seed=26)
    x = samples(32, seed=27)

    async def ask_all(server):
        return await asyncio.wait_for(
            asyncio.gather(*(server.predict(row) for row in x)), WAIT)

    with serve(model, ts, max_batch_size=8) as server:
        by_predict = asyncio.run(ask_all(server))
        by_submit = results([server.submit(row) for row in x])
    assert_rule(by_predict, model, x, ts)
    for a, b in zip(by_predict, by_submit, strict=True):
        assert (a.exit, a.pred) == (b.exit, b.pred)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-9, atol=1e-9)
        assert math.isclose(a.entropy, b.entropy, rel_tol=1e-6, abs_tol=1e-7)


def test_predict_past_its_timeout_raises_timeout_error():
    model, gate = gated_model(seed=28)
    x = samples(2, seed=29)

    async def ask(server):
        # Not asyncio.wait_for: its own timeout is a TimeoutError too, and would pass.
        task = asyncio.ensure_future(server.predict(x[1], timeout_s=0.1))
        done, _ = await asyncio.wait({task}, timeout=WAIT)
        assert task in done, "predict outlived its timeout while the stage was held"
        return task.exception()

    with serve(model, [0.0, 0.0], max_batch_size=1, max_wait_ms=0.0) as server:
        gate.shut()
        try:
            first = server.submit(x[0])
            assert gate.entered.wait(WAIT)
            assert isinstance(asyncio.run(ask(server)), TimeoutError)
        finally:
            gate.open()
        results([first])


# --- stats ------------------------------------------------------------------------------


STATS_KEYS = {"stage_runs", "stage_rows", "exits", "queued", "answered", "failed",
              "overloaded", "latency_s"}


def test_stats_before_any_request():
    model, ts = model_and_thresholds(seed=30)
    with serve(model, ts) as server:
        stats = server.stats()
    assert set(stats) == STATS_KEYS
    for key in ("stage_runs", "stage_rows", "exits", "queued"):
        assert stats[key] == [0, 0, 0], key
    assert (stats["answered"], stats["failed"], stats["overloaded"]) == (0, 0, 0)
    assert stats["latency_s"] == {"p50": None, "p99": None}


@pytest.mark.parametrize("rebatch", [True, False], ids=["rebatch", "per-batch"])
def test_stats_count_the_rows_each_stage_ran_and_each_exit_answered(rebatch):
    model, ts = model_and_thresholds(seed=31)
    x = samples(200, seed=32)
    max_batch = 16
    with serve(model, ts, max_batch_size=max_batch, rebatch=rebatch) as server:
        results(submit_from_threads(server, x))
        stats = settled_stats(server, 200)
    assert set(stats) == STATS_KEYS
    want = per_sample_rule(model, x, ts)
    n = model.num_exits
    # Which stages a sample runs is the rule's, whatever the batching: stage k runs every
    # sample whose exit is k or later, exit k answers those whose exit is k.
    assert stats["exits"] == [sum(w.exit == k for w in want) for k in range(n)]
    assert stats["stage_rows"] == [sum(w.exit >= k for w in want) for k in range(n)]
    assert stats["answered"] == sum(stats["exits"]) == 200
    assert (stats["failed"], stats["overloaded"]) == (0, 0)
    assert stats["queued"] == [0] * n
    for k in range(n):
        runs, rows = stats["stage_runs"][k], stats["stage_rows"][k]
        assert (runs > 0) == (rows > 0)
        assert runs <= rows <= runs * max_batch, f"stage {k}: {rows} rows in {runs} runs"
    lat = stats["latency_s"]
    assert set(lat) == {"p50", "p99"}
    assert 0 < lat["p50"] <= lat["p99"] < WAIT


def test_stats_show_the_rows_waiting_at_a_held_stage():
    model, gate = gated_model(seed=33, at=1)
    x = samples(12, seed=34)
    # Thresholds 0: nobody leaves early, so every sample queues for stage 1.
    with serve(model, [0.0, 0.0], max_batch_size=2, max_wait_ms=0.0) as server:
        gate.shut()
        try:
            futures = [server.submit(x[0])]
            assert gate.entered.wait(WAIT)
            futures += [server.submit(row) for row in x[1:]]
            # Whether stage 0 runs on while stage 1 is held is the server's choice; wait
            # until no stage-0 run is under way and every row not in the held run waits.
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                stats = server.stats()
                if (sum(stats["queued"]) >= 10
                        and stats["stage_rows"][0] + stats["queued"][0] == 12):
                    break
                time.sleep(0.01)
        finally:
            gate.open()
        answers = results(futures)
    # The run held in stage 1 took 1 or 2 rows; the rest wait at stage 0 or 1, none past
    # the held stage, and each row waiting at stage 1 ran stage 0 once.
    assert 10 <= sum(stats["queued"]) <= 11
    assert stats["queued"][2] == 0
    assert stats["stage_rows"][0] == 12 - stats["queued"][0]
    assert stats["answered"] == 0
    assert all(r.exit == 2 for r in answers)
    assert_rule(answers, model, x, [0.0, 0.0])
