"""The verification harness itself (branchynet.testing): its samples are what they say,
and its comparisons catch each kind of wrong answer (a checker that cannot fail checks
nothing)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import branchynet as bn
from branchynet import testing
from branchynet.exits import entropy, exit_scores
from branchynet.ops import _verify

STEP = testing.backend_impl("torch")[0]
GATHER = testing.backend_impl("torch")[1]


def _case():
    logits = testing.sample_logits(64, 10, torch.float32, "cpu", seed=0, special=True)
    rows = testing.sample_rows(64, 70, "cpu", seed=0)
    return logits, rows, testing.gap_threshold(logits, 0)


def _spoil(what):
    def bad(logits, rows, threshold, exit_index, ol, op, oe, oh, criterion, last):
        res = STEP(logits, rows, threshold, exit_index, ol, op, oe, oh, criterion, last)
        surv, surv_rows, count = res
        n = int(count)
        if what == "extra_write":
            oe[rows[surv[0]]] = exit_index  # a survivor marked as leaving
        elif what == "missed_write":
            oe[rows[surv[-1]]] = testing.POISON["exit"]  # a leaving row not marked
        elif what == "stayer_entropy":
            oh[rows[surv[0]]] = 0.5  # a row that stays written
        elif what == "entropy":
            oh[oe == exit_index] *= 1.001
        elif what == "nan_entropy":
            oh[rows[surv[-1]]] = math.nan
        elif what == "pred":
            op[oe == exit_index] += 1
        elif what == "logits":
            ol[rows[surv[-1]], 0] += 1
        elif what == "count":
            res = (surv, surv_rows, count + 1)
        elif what == "survivors":
            res = (surv.flip(0), surv_rows, count)
        elif what == "survivor_rows":
            res = (surv, surv_rows.flip(0), count)
        elif what == "order":
            res = (torch.cat([surv[:n].flip(0), surv[n:]]), torch.cat([surv_rows[:n].flip(0), surv_rows[n:]]), count)
        elif what == "shape":
            res = (surv, surv_rows, count.reshape(()))
        elif what == "dtype":
            res = (surv.int(), surv_rows, count)
        return res
    return bad


def test_the_reference_passes_its_own_comparison():
    logits, rows, t = _case()
    for _, thr, last in testing.exit_patterns(logits, 0):
        res = testing.compare_exit_step(STEP, logits, rows, 70, thr, 0, 1, last, permutation=True,
                                        same_order=True, against_float64=True)
        assert res.ok, res.failure
        assert res.failure is None and res.error < 1e-6
    failure, err = testing.compare_exit_step(STEP, logits, rows, 70, t, 0, 1, False, strided=True)
    assert failure is None and 0 < testing.compare_exit_step(STEP, logits, rows, 70, t, 0, 1, False).count < 64


@pytest.mark.parametrize("what,msg,kw", [
    ("extra_write", "exit index differs", {}),
    ("missed_write", "exit index differs", {}),
    ("stayer_entropy", "a row that stays was written", {}),
    ("entropy", "entropy off", {}),
    ("nan_entropy", "NaN entropies differ", {}),
    ("pred", "pred differs", {}),
    ("logits", "bit for bit", {}),
    ("count", "survivor count", {}),
    ("survivors", "survivors differ", {}),
    ("survivor_rows", "survivor_rows do not match", {}),
    ("order", "reference's order", {"same_order": True}),
    ("shape", "output shapes", {}),
    ("dtype", "output dtypes", {}),
])
def test_the_comparison_catches_each_kind_of_wrong_answer(what, msg, kw):
    logits, rows, t = _case()
    failure, _ = testing.compare_exit_step(_spoil(what), logits, rows, 70, t, 0, 1, False, **kw)
    assert failure is not None and msg in failure, (what, failure)


def test_the_float64_rule_catches_an_error_the_tolerance_lets_through():
    # 1e-5 off on every leaving row: inside 2e-5, far more than twice the reference's error.
    logits = testing.sample_logits(64, 10, torch.float32, "cpu", seed=1)
    rows = testing.sample_rows(64, 64, "cpu", seed=1)

    def off(logits, rows, threshold, exit_index, ol, op, oe, oh, criterion, last):
        res = STEP(logits, rows, threshold, exit_index, ol, op, oe, oh, criterion, last)
        oh[oe == exit_index] += 1e-5
        return res

    assert testing.compare_exit_step(off, logits, rows, 64, 0.0, 0, 0, True).ok
    res = testing.compare_exit_step(off, logits, rows, 64, 0.0, 0, 0, True, against_float64=True)
    assert not res.ok and "twice the reference's" in res.failure


def test_the_gather_comparison_catches_values_layout_and_dtype():
    f = torch.randn(9, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([8, 0, 3, 3])
    assert testing.compare_gather(GATHER, f, idx) is None
    assert "differ" in testing.compare_gather(lambda x, i: GATHER(x, i).flip(0), f, idx)
    assert "strides" in testing.compare_gather(lambda x, i: GATHER(x, i).contiguous(), f, idx)
    assert "dtype" in testing.compare_gather(lambda x, i: GATHER(x, i).double(), f, idx)
    one = torch.tensor([2])  # one row: no stride to compare, the memory format still counts
    assert "channels_last" in testing.compare_gather(lambda x, i: GATHER(x, i).contiguous(), f, one)


def test_samples_buffers_and_thresholds_are_what_they_say():
    z = testing.sample_logits(7, 5, torch.bfloat16, "cpu", seed=3)
    assert z.shape == (7, 5) and z.dtype == torch.bfloat16 and torch.isfinite(z).all()
    assert torch.equal(z, testing.sample_logits(7, 5, torch.bfloat16, "cpu", seed=3))  # seeded
    special = testing.sample_logits(8, 5, torch.float32, "cpu", seed=3, special=True)
    h = entropy(special)
    assert h[0] == pytest.approx(math.log(5)) and torch.isnan(h[1]) and h[2] < 1e-12 and h[3] == 0
    rows = testing.sample_rows(6, 9, "cpu", seed=0)
    assert rows.unique().numel() == 6 and ((rows >= 0) & (rows < 9)).all()
    out = testing.poisoned_buffers(5, 3, torch.float16, "cpu", strided=True)
    assert [t.stride() for t in out] == [(3, 1), (2,), (2,), (2,)]
    assert torch.isnan(out[0]).all() and (out[1] == testing.POISON["pred"]).all()
    for crit in range(3):
        t = testing.gap_threshold(special, crit)
        s = exit_scores(special, testing.CRITERIA[crit])[0].double()
        s = s[torch.isfinite(s)]
        assert (s < t).any() and (s > t).any()
        assert (s - t).abs().min() > 1e-4 * max(1.0, t)  # no score near it
    assert testing.gap_threshold(torch.zeros(3, 1), 0) == 0.25  # C = 1: every row leaves
    names = [p[0] for p in testing.exit_patterns(special, 0)]
    assert names == list(testing.PATTERNS)
    assert [p[0] for p in testing.exit_patterns(special, 0, full=False)] == ["mixed"]


def test_special_logits_hold_the_hard_rows():
    for c in (1, 2, 10):
        z = testing.special_logits(c, torch.float32, "cpu", seed=c)
        h = entropy(z)
        assert torch.isnan(h).sum() >= (5 if c > 1 else 3)
        assert (h == 0).any() and torch.isinf(z).any()


def test_tie_thresholds_equal_the_flat_rows_scores():
    for c in (1, 2, 4, 64):
        z = testing.tie_logits(c, torch.float32, "cpu")
        for crit in range(3):
            t = testing.tie_threshold(crit, c)
            if t is not None:
                assert float(exit_scores(z, testing.CRITERIA[crit])[0][1]) == t
    assert testing.tie_threshold(0, 10) is None and testing.tie_threshold(1, 10) is None


def _tiny_model():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]
    branches = [nn.Linear(6, 4) for _ in range(3)]
    return bn.from_stages(stages, branches, input_shape=(6,)).eval()


def test_the_per_sample_rule_and_the_engine_comparison():
    model = _tiny_model()
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(0)) * 3
    t = testing.split_thresholds(model, x)
    assert len(t) == 2
    want = testing.per_sample_rule(model, x, t)
    assert len(want) == 12 and {w.exit for w in want} >= {0}
    with torch.no_grad():
        outs = model(x)
    for i, w in enumerate(want):  # the rule by its definition, from one full pass
        h = entropy(outs[w.exit][i:i + 1].double())
        assert w.entropy == pytest.approx(float(h), rel=1e-6)  # fp32 network: one row vs a batch
        assert all(float(entropy(outs[n][i:i + 1])) >= t[n] - 1e-6 for n in range(w.exit))
        assert w.exit == 2 or w.entropy < t[w.exit]
        assert w.pred == int(outs[w.exit][i].argmax())
    res = bn.EarlyExitEngine(model, t, backend="torch")(x)
    assert all(f is None for f, _ in testing.compare_engine(res, want))
    bad = SimpleNamespace(exit=res.exit.clone(), pred=res.pred.clone(), entropy=res.entropy.clone())
    bad.exit[0] = (bad.exit[0] + 1) % 3
    bad.pred[1] = (bad.pred[1] + 1) % 4
    bad.entropy[2] += 0.1
    failures = [f for f, _ in testing.compare_engine(bad, want)]
    assert failures[0].startswith("exit") and failures[1].startswith("pred")
    assert failures[2].startswith("entropy") and failures[3:] == [None] * 9


def test_the_first_use_check_keeps_the_old_names():
    assert _verify.compare_exit_step is testing.compare_exit_step
    assert _verify.compare_gather is testing.compare_gather and _verify.gap_threshold is testing.gap_threshold
    with pytest.raises(AttributeError):
        _verify.no_such_name  # noqa: B018
