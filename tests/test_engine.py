"""The batched engine against the per-sample rule (the harness's,
:func:`branchynet.testing.per_sample_rule`: written without the engine or the exit op)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import branchynet as bn
from branchynet import EarlyExitEngine, ExitConfig, entropy
from branchynet.ops import available_backends
from branchynet.testing import per_sample_rule as rule_by_hand  # the paper's rule, one sample at a time

# every backend that can run here: torch, cpp (when the extension is built), triton
# (under TRITON_INTERPRET=1 on the CPU; tests/conftest.py sets it without a GPU)
BACKENDS = available_backends("cpu")
F64_BACKENDS = [b for b in BACKENDS if b != "triton"]  # Triton kernels take fp32/16/bf16


def random_model(seed, num_exits=3, classes=6, width=12, dtype=torch.float64):
    """A small MLP BranchyNet with random weights (float64: batched and one-at-a-time
    results then agree to ~1e-15, far from any threshold)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(num_exits)]
    branches = [nn.Linear(width, classes) for _ in range(num_exits)]
    model = bn.BranchyNet(stages, branches, input_shape=(width,), num_classes=classes)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5)
    return model.to(dtype)


def check_against_rule(model, x, thresholds, backend="torch"):
    eng = EarlyExitEngine(model, thresholds=thresholds, backend=backend)
    res = eng(x)
    want = rule_by_hand(model, x, thresholds)
    b = x.shape[0]
    assert res.logits.shape[0] == res.pred.shape[0] == res.exit.shape[0] == res.entropy.shape[0] == b
    assert res.pred.dtype == torch.int64 and res.exit.dtype == torch.int64
    assert res.entropy.dtype == torch.float32
    assert sum(res.counts) == b
    for i, (n, pred, ent, z) in enumerate(want):
        assert res.exit[i].item() == n, f"row {i}"
        assert res.pred[i].item() == pred, f"row {i}"
        assert math.isclose(res.entropy[i].item(), ent, rel_tol=1e-5, abs_tol=1e-6), f"row {i}"
        torch.testing.assert_close(res.logits[i], z, rtol=1e-9, atol=1e-9)
    for n in range(model.num_exits):
        assert res.counts[n] == sum(1 for w in want if w[0] == n)
    return res


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("b", [1, 7, 64])
def test_engine_equals_per_sample_rule(seed, b, backend):
    model = random_model(seed, num_exits=2 + seed % 3)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(b, 12, generator=g, dtype=torch.float64)
    # thresholds spread over [0, log C] so that mixed exit patterns occur
    t = (torch.rand(model.num_exits - 1, generator=g) * math.log(6)).tolist()
    check_against_rule(model, x, t, backend)


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_nobody_exits_and_everybody_exits_first(backend):
    model = random_model(1, num_exits=3)
    x = torch.randn(33, 12, dtype=torch.float64)
    res = check_against_rule(model, x, [0.0, 0.0], backend)
    assert res.counts == [0, 0, 33]
    res = check_against_rule(model, x, [10.0, 0.0], backend)  # log 6 < 10: all leave at exit 0
    assert res.counts == [33, 0, 0]
    assert (res.exit == 0).all()


def test_empty_batch():
    model = random_model(2)
    res = EarlyExitEngine(model, [0.5, 0.5])(torch.zeros(0, 12, dtype=torch.float64))
    assert res.logits.shape == (0, 6) and res.pred.shape == (0,) and res.counts == [0, 0, 0]
    res = EarlyExitEngine(model, [0.5, 0.5]).per_sample(torch.zeros(0, 12, dtype=torch.float64))
    assert res.logits.shape == (0, 6)


def test_per_sample_mode_equals_batched():
    model = random_model(3)
    x = torch.randn(40, 12, dtype=torch.float64)
    eng = EarlyExitEngine(model, [0.9, 1.2])
    a, b = eng(x), eng.per_sample(x)
    assert torch.equal(a.exit, b.exit) and torch.equal(a.pred, b.pred)
    assert a.counts == b.counts
    torch.testing.assert_close(a.logits, b.logits)


def test_deeper_stages_see_only_survivors():
    model = random_model(4)
    x = torch.randn(50, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # Thresholds between observed entropies: 20 rows leave at exit 0, 15 of the other
    # 30 at exit 1, so every stage runs, each on its own survivors.
    with torch.no_grad():
        z = model(x)
    h0 = entropy(z[0])
    order = h0.argsort()
    h0s = h0[order]
    h1s = entropy(z[1][order[20:]]).sort().values
    t = [float((h0s[19] + h0s[20]) / 2), float((h1s[14] + h1s[15]) / 2)]
    seen = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    res = EarlyExitEngine(model, t)(x)
    assert res.counts == [20, 15, 15]
    assert seen == [50, 30, 15]


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_on_conv_model_float32(backend):
    # A float32 conv model: compare to the rule with thresholds placed half-way
    # between observed entropies, so fp32 rounding cannot flip a decision.
    torch.manual_seed(0)
    model = bn.models.b_lenet(num_classes=10)
    model.eval()
    x = torch.randn(20, 1, 28, 28)
    with torch.no_grad():
        h0 = entropy(model(x)[0]).sort().values
    t = float((h0[9] + h0[10]) / 2)
    res = check_against_rule_f32(model, x, [t], backend)
    assert res.counts[0] == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_float32_three_exits_all_backends(backend):
    model = random_model(7, num_exits=3, dtype=torch.float32).eval()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        outs = model(x)
    h0 = entropy(outs[0]).sort().values
    h1 = entropy(outs[1]).sort().values
    t = [float((h0[20] + h0[21]) / 2), float((h1[31] + h1[32]) / 2)]
    res = check_against_rule_f32(model, x, t, backend)
    assert res.counts[0] == 21 and sum(res.counts) == 64


def check_against_rule_f32(model, x, thresholds, backend="auto"):
    res = EarlyExitEngine(model, thresholds, backend=backend)(x)
    want = rule_by_hand(model, x, thresholds)
    for i, (n, pred, ent, z) in enumerate(want):
        assert res.exit[i].item() == n and res.pred[i].item() == pred
        torch.testing.assert_close(res.logits[i], z, rtol=1e-4, atol=1e-5)
    return res


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(0, 70),
    num_exits=st.integers(1, 4),
    t=st.lists(st.floats(0.0, 2.0), min_size=3, max_size=3),
)
def test_every_row_answered_exactly_once(backend, seed, b, num_exits, t):
    model = random_model(seed, num_exits=num_exits, dtype=torch.float32)
    thresholds = t[: num_exits - 1]
    eng = EarlyExitEngine(model, thresholds, backend=backend)
    x = torch.randn(b, 12, generator=torch.Generator().manual_seed(seed))
    res = eng(x)
    assert sum(res.counts) == b
    assert res.exit.shape == (b,)
    assert ((res.exit >= 0) & (res.exit < num_exits)).all()
    for n in range(num_exits):
        assert int((res.exit == n).sum()) == res.counts[n]
    # every row carries the logits of the exit it took: recompute them in one full pass
    with torch.no_grad():
        outs = model(x)
    for n in range(num_exits):
        rows = res.exit == n
        torch.testing.assert_close(res.logits[rows], outs[n][rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.entropy[rows], entropy(outs[n][rows]), rtol=1e-4, atol=1e-5)
        # exited early => below the threshold; went deeper => not below (up to rounding)
        if n < num_exits - 1:
            assert (entropy(outs[n][rows]) < thresholds[n] + 1e-5).all()
            deeper = res.exit > n
            assert (entropy(outs[n][deeper]) >= thresholds[n] - 1e-5).all()


# --- bad input --------------------------------------------------------------------------

@pytest.fixture
def model():
    return random_model(0, num_exits=3, dtype=torch.float32)


@pytest.mark.parametrize("thresholds,err,msg", [
    ([0.1], ValueError, "expected 2"),
    ([0.1, 0.2, 0.3], ValueError, "expected 2"),
    ([0.1, float("nan")], ValueError, r"thresholds\[1\] is NaN"),
    ([-0.1, 0.2], ValueError, "negative"),
    (0.5, TypeError, "thresholds"),
    (["a", 0.1], TypeError, "thresholds"),
])
def test_bad_thresholds(model, thresholds, err, msg):
    with pytest.raises(err, match=msg):
        EarlyExitEngine(model, thresholds)
    eng = EarlyExitEngine(model, [0.1, 0.2])
    with pytest.raises(err, match=msg):
        eng.thresholds = thresholds


def test_bad_inputs(model):
    eng = EarlyExitEngine(model, [0.1, 0.2])
    with pytest.raises(ValueError, match="rank 2"):
        eng(torch.zeros(4, 12, 1))
    with pytest.raises(ValueError, match="shape"):
        eng(torch.zeros(4, 11))
    with pytest.raises(ValueError, match="meta"):
        eng(torch.zeros(4, 12, device="meta"))
    with pytest.raises(TypeError, match="floating"):
        eng(torch.zeros(4, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be"):
        eng([[0.0] * 12])
    with pytest.raises(TypeError, match="x is torch.float64 but the model's parameters are torch.float32"):
        eng(torch.zeros(4, 12, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the layers
        assert sum(eng(torch.zeros(4, 12, dtype=torch.bfloat16)).counts) == 4
    with pytest.raises(TypeError, match="BranchyNet"):
        EarlyExitEngine(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="backend"):
        EarlyExitEngine(model, [0.1, 0.2], backend="fast")
    with pytest.raises(ValueError, match="criterion"):
        EarlyExitEngine(model, [0.1, 0.2], criterion="confidence")


def test_training_mode_refused_and_backend_switch(model):
    x = torch.randn(8, 12)
    eng = EarlyExitEngine(model, [0.5, 0.5])
    assert eng.backend_for("cpu") == ("cpp" if "cpp" in BACKENDS else "torch")  # what auto picks
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        eng(x)
    model.eval()
    eng.backend = "torch"  # takes effect at the next call, not cached from the last one
    assert eng.backend_for("cpu") == "torch"
    with pytest.raises(ValueError, match="backend"):
        eng.backend = "fast"
    with pytest.raises(TypeError, match="thresholds"):
        EarlyExitEngine(model, torch.tensor(0.5))
    import numpy as np

    assert EarlyExitEngine(model, np.array([0.1, 0.2])).thresholds == pytest.approx((0.1, 0.2))


def test_branches_of_different_dtypes_refused():
    model = random_model(0, num_exits=2, dtype=torch.float32)
    model.branches[1] = model.branches[1].double()
    model.stages[1] = nn.Sequential(model.stages[1], _ToDouble())
    with pytest.raises(TypeError, match="branch 1 returns torch.float64"):
        EarlyExitEngine(model, [0.0])(torch.randn(4, 12))


class _ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


def test_unavailable_backend_refused_clearly(model):
    # the model lives on the CPU: the cuda backend cannot run there, extension or not
    with pytest.raises(RuntimeError, match="backend='cuda' is not available on device cpu"):
        EarlyExitEngine(model, [0.1, 0.2], backend="cuda")


def test_engine_uses_model_config_and_criteria(model):
    model.exit_config = ExitConfig(3, thresholds=(0.3, 0.4), criterion="max_prob")
    eng = EarlyExitEngine(model)
    assert eng.thresholds == (0.3, 0.4) and eng.criterion == "max_prob"
    x = torch.randn(30, 12)
    res = eng(x)
    with torch.no_grad():
        z0 = model(x)[0]
    p0 = torch.softmax(z0, 1).amax(1)
    assert torch.equal(res.exit == 0, (1 - p0) < 0.3)


def test_naive_baseline_gives_the_engine_answers():
    from branchynet.baselines import naive_early_exit

    model = random_model(5, num_exits=3, dtype=torch.float64)
    x = torch.randn(80, 12, dtype=torch.float64)
    t = [1.0, 1.4]
    a, b = EarlyExitEngine(model, t)(x), naive_early_exit(model, x, t)
    assert a.counts == b.counts and 0 < a.counts[0] < 80
    assert torch.equal(a.exit, b.exit) and torch.equal(a.pred, b.pred)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-6)
