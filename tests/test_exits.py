"""Entropy and exit scores against a float64 reference written independently here."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import branchynet as bn
from branchynet import CRITERIA, entropy, exit_scores
from branchynet.exits import exit_mask
from branchynet.ops import available_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def ref_entropy(z: np.ndarray) -> np.ndarray:
    """-sum p log p in float64 via scipy-free log-softmax, row by row."""
    z = z.astype(np.float64)
    out = np.empty(z.shape[0])
    for i, row in enumerate(z):
        m = row.max()
        logp = row - m - math.log(np.exp(row - m).sum())
        p = np.exp(logp)
        out[i] = -np.sum(np.where(p > 0, p * logp, 0.0))
    return out


def make_logits(b, c, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [0, 1, 7, 1023])
@pytest.mark.parametrize("c", [2, 10, 1000])
def test_entropy_matches_float64_reference(dtype, b, c):
    z = make_logits(b, c, dtype, scale=3.0, seed=b * 31 + c)
    h = entropy(z)
    assert h.shape == (b,)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = ref_entropy(z.double().numpy())  # reference on the same (rounded) logits
    # float64 in, float64 out: accurate to ~1e-14 relative (measured 2e-14), so rtol must
    # be tight too, or a float32 computation (~1e-7) would pass.
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 2e-5 * max(1.0, math.log(c)))
    np.testing.assert_allclose(h.double().numpy(), ref, rtol=rtol, atol=atol)
    if b:
        assert (h >= 0).all() and (h <= math.log(c) + 1e-4).all()


def test_entropy_low_precision_not_worse_than_torch_at_that_dtype():
    # fp16 logits: our fp32 accumulation must be at least as accurate as computing the
    # entropy in fp16 with PyTorch (the flash-attention rule: at most 2x that error).
    z = make_logits(512, 1000, torch.float16, scale=4.0, seed=3)
    ref = torch.from_numpy(ref_entropy(z.double().numpy()))
    p16 = torch.softmax(z, dim=1)
    naive = -(p16 * torch.log_softmax(z, dim=1)).sum(1)
    ours = entropy(z).double()
    assert (ours - ref).abs().max() <= 2 * (naive.double() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_are_finite(dtype):
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4], [0.0, 0.0, 0.0]])
    z = z.to(dtype) if dtype != torch.float16 else z.clamp(-6e4, 6e4).to(dtype)
    h = entropy(z)
    assert torch.isfinite(h).all()
    expect = torch.tensor([0.0, math.log(3), math.log(2), math.log(3)])
    torch.testing.assert_close(h, expect, atol=1e-3, rtol=1e-3)


def test_minus_inf_logits_mask_classes():
    z = torch.tensor([[float("-inf"), 0.0, 0.0], [float("-inf"), float("-inf"), 5.0]])
    h = entropy(z)
    torch.testing.assert_close(h, torch.tensor([math.log(2), 0.0]))


def test_nan_propagates_and_never_exits():
    z = torch.tensor([[float("nan"), 1.0, 2.0], [5.0, 0.0, 0.0]])
    for crit in ("entropy", "max_prob", "margin"):
        score, h, pred = exit_scores(z, crit)
        assert torch.isnan(score[0]) and torch.isnan(h[0])
        assert pred[0] == 0  # NaN counts as +inf: the NaN column wins
        m = exit_mask(z, 1e9, crit)
        assert not m[0] and m[1]


def test_criteria_scores():
    z = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))
    s, _, pred = exit_scores(z, "max_prob")
    torch.testing.assert_close(s, torch.tensor([0.3, 0.6]))
    s, _, _ = exit_scores(z, "margin")
    torch.testing.assert_close(s, torch.tensor([0.5, 1.0]))
    assert pred.tolist() == [0, 0]
    # one class: entropy 0, margin 0 (p1 - 0)
    one = torch.randn(4, 1)
    s, h, p = exit_scores(one, "margin")
    assert (h == 0).all() and (p == 0).all() and torch.allclose(s, torch.zeros(4))


def test_exit_rule_is_strict():
    z = torch.zeros(1, 2)  # entropy log 2
    h = float(entropy(z))
    assert not exit_mask(z, h)[0]
    assert exit_mask(z, math.nextafter(h, 1.0) + 1e-7)[0]


@pytest.mark.parametrize("bad,err", [
    (torch.zeros(3), ValueError),
    (torch.zeros(2, 3, 4), ValueError),
    (torch.zeros(2, 3, dtype=torch.int64), TypeError),
    ([[0.0, 1.0]], TypeError),
    (torch.zeros(2, 0), ValueError),
])
def test_bad_logits_raise(bad, err):
    with pytest.raises(err, match="logits"):
        entropy(bad)


def test_unknown_criterion():
    with pytest.raises(ValueError, match="criterion"):
        exit_scores(torch.zeros(2, 3), "confidence")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_confident_rows_small_entropy_relative_accuracy(dtype):
    # Thresholds of confident networks sit at entropies of 1e-6..1e-3, where float32
    # log(S) with S = 1 + delta would lose delta (a ~5 % relative error): the reference
    # must be accurate relative to the entropy itself, not to an absolute 1e-5.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 10, generator=g, dtype=torch.float64)
    z[torch.arange(2000), torch.randint(0, 10, (2000,), generator=g)] += 8 + 12 * torch.rand(2000, generator=g)
    z = z.to(dtype)
    ref = ref_entropy(z.double().numpy())
    assert ref.min() < 1e-6  # the regime this test is about
    np.testing.assert_allclose(entropy(z).double().numpy(), ref, rtol=1e-5, atol=1e-12)


class _NaNWhereFirstFeatureIsZero(nn.Module):
    """Side-branch logits that are NaN exactly for the rows whose first feature is 0."""

    def forward(self, h):
        return h * (h[:, :1] / h[:, :1])  # 0 / 0 = NaN; x / x = 1 elsewhere


def _nan_model(num_classes=5):
    torch.manual_seed(0)
    stages = [nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 6)]
    branches = [nn.Sequential(_NaNWhereFirstFeatureIsZero(), nn.Linear(6, num_classes)),
                nn.Linear(6, num_classes), nn.Linear(6, num_classes)]
    return bn.from_stages(stages, branches, input_shape=(6,)).eval()


_ENGINE_CASES = [("cpu", b) for b in available_backends("cpu")] + [
    pytest.param("cuda", b, marks=pytest.mark.cuda)
    for b in (available_backends("cuda") if torch.cuda.is_available() else ("cuda", "triton", "torch"))
]


@pytest.mark.parametrize("device,backend", _ENGINE_CASES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_engine_routes_nan_rows_past_the_side_branches(device, backend, criterion):
    # Thresholds so high that every finite row leaves at its first exit: only the NaN
    # rule keeps a row in. Rows 1, 4: NaN input, so NaN logits at every exit: they must
    # reach the last exit. Rows 2, 6: NaN at branch 0 only (stage 0 makes their first
    # feature exactly 0): they must go on to exit 1 and leave there.
    model = _nan_model()
    with torch.no_grad():
        model.stages[0].weight[0] = torch.tensor([1.0, 0, 0, 0, 0, 0])
        model.stages[0].bias[0] = 0.0  # stage 0's first feature = x[:, 0]
    x = torch.randn(8, 6)
    x[:, 0] = 1.0 + torch.rand(8)
    x[[2, 6], 0] = 0.0
    x[[1, 4]] = float("nan")
    model, x = model.to(device), x.to(device)
    engine = bn.EarlyExitEngine(model, thresholds=[1e9, 1e9], backend=backend, criterion=criterion)
    res = engine(x)
    nan_everywhere, nan_at_branch0, finite = [1, 4], [2, 6], [0, 3, 5, 7]
    assert res.exit.tolist() == [0, 2, 1, 0, 2, 0, 1, 0]
    assert res.counts == [4, 2, 2]
    assert torch.isnan(res.entropy[nan_everywhere]).all() and torch.isnan(res.logits[nan_everywhere]).all()
    assert res.pred[nan_everywhere].tolist() == [0, 0]  # all-NaN row: NaN counts as +inf, first wins
    with torch.no_grad():
        outs = model(x)
    # The rows that were NaN only at branch 0 get exactly what exit 1 computes for them.
    torch.testing.assert_close(res.logits[nan_at_branch0], outs[1][nan_at_branch0])
    torch.testing.assert_close(res.entropy[nan_at_branch0], entropy(outs[1][nan_at_branch0]))
    assert res.pred[nan_at_branch0].tolist() == outs[1][nan_at_branch0].argmax(1).tolist()
    torch.testing.assert_close(res.logits[finite], outs[0][finite])
    # The paper's one-sample loop takes the same exits.
    assert engine.per_sample(x).exit.tolist() == res.exit.tolist()
