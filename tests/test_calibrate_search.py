"""Calibration at any number of exits: the search, the targets, temperature scaling."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import branchynet as bn
from branchynet.calibrate import (calibrate, candidate_thresholds, collect_exit_outputs, collect_logits,
                                  expected_calibration_error, fit_temperature, fold_temperature,
                                  score_thresholds)
from branchynet.calibrate.exit_table import _count_exits
from branchynet.calibrate.search import _vary_one
from branchynet.flops import profile_flops
from branchynet.latency import LatencyProfile, measure_latency


def mlp(n_exits, seed=0, d=12, h=24, c=5, scale=2.5):
    """An untrained MLP with an exit after every layer; weights scaled up so that the
    exits' entropies spread over a wide range."""
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(d if i == 0 else h, h), nn.ReLU()) for i in range(n_exits)]
    model = bn.from_stages(stages, [nn.Linear(h, c) for _ in range(n_exits)], input_shape=(d,))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def data(seed=1, m=400, d=12, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(m, d, generator=g), torch.randint(0, c, (m,), generator=g))


def engine_profile(model, thresholds, x, y):
    res = bn.EarlyExitEngine(model, thresholds, backend="torch")(x)
    return float((res.pred == y).double().mean()), res.exit_fractions


# -- thresholds as the engine compares them ----------------------------------------------


def adjacent_float32_pair():
    """Two logit rows whose float32 entropies are adjacent float32 values whose float64
    midpoint rounds onto the lower one."""
    d = torch.linspace(2.0, 2.001, 20001, dtype=torch.float32)
    s, _, _ = bn.exit_scores(torch.stack([torch.zeros_like(d), d], 1))
    order = torch.argsort(s)
    s, d = s[order], d[order]
    up = torch.nextafter(s[:-1], torch.full_like(s[:-1], math.inf))
    mid = ((s[:-1].double() + s[1:].double()) / 2).float()
    hit = torch.nonzero((up == s[1:]) & (mid == s[:-1]))
    assert hit.numel(), "no adjacent pair found"
    i = int(hit[0])
    return float(d[i]), float(d[i + 1])


def identity_model():
    return bn.BranchyNet([nn.Identity(), nn.Identity()], [nn.Identity(), nn.Identity()],
                         input_shape=(2,), num_classes=2).eval()


def test_candidates_split_adjacent_float32_scores_as_the_engine_does():
    lo, hi = adjacent_float32_pair()
    x = torch.tensor([[0.0, lo], [0.0, hi]])  # the inputs are the logits of both exits
    y = torch.tensor([1, 1])
    model = identity_model()
    table = collect_exit_outputs(model, torch.utils.data.TensorDataset(x, y))
    assert table.score_dtype == torch.float32
    grid = torch.tensor(candidate_thresholds(table), dtype=torch.float64).reshape(-1, 1)
    _, frac = score_thresholds(table, grid)
    assert 0.5 in frac[:, 0].tolist()  # a candidate splits the two samples
    eng = bn.EarlyExitEngine(model, [0.0], backend="torch")
    for g in range(grid.shape[0]):
        eng.thresholds = grid[g].tolist()
        assert eng(x).exit_fractions == frac[g].tolist(), float(grid[g])


def test_sweep_rounds_a_given_threshold_as_the_engine_does():
    lo, hi = adjacent_float32_pair()
    x = torch.tensor([[0.0, lo], [0.0, hi]])
    model = identity_model()
    table = collect_exit_outputs(model, torch.utils.data.TensorDataset(x, torch.tensor([1, 1])))
    s = table.score[0]
    mid = float((s[0] + s[1]) / 2)  # float64: strictly between, float32: onto the lower score
    _, frac = score_thresholds(table, torch.tensor([[mid]], dtype=torch.float64))
    assert frac[0].tolist() == bn.EarlyExitEngine(model, [mid], backend="torch")(x).exit_fractions


# -- the search ----------------------------------------------------------------------------


def test_coordinate_step_scores_equal_the_direct_count():
    model, val = mlp(5, seed=3), data(4)
    table = collect_exit_outputs(model, val)
    cands = candidate_thresholds(table, per_exit=6)
    cur = torch.tensor([c[len(c) // 2] for c in cands], dtype=torch.float64)
    for j in range(4):
        c = torch.tensor(cands[j], dtype=torch.float64)
        grid = cur[None].repeat(len(c), 1)
        grid[:, j] = c
        good, counts = _vary_one(table, cur, j, c)
        good2, counts2 = _count_exits(table, grid)
        assert torch.equal(good, good2) and torch.equal(counts, counts2)


TARGETS = [dict(max_drop=0.0), dict(max_drop=0.03), dict(max_flops=0.5), dict(max_flops=0.8, max_drop=0.05),
           dict(exit_fraction=0.3)]


@pytest.mark.parametrize("n_exits", [2, 3])
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()))
def test_beam_chooses_the_exhaustive_point_up_to_three_exits(n_exits, target):
    model, val = mlp(n_exits, seed=n_exits), data(5)
    table = collect_exit_outputs(model, val)
    kw = dict(table=table, per_exit=12, **target)
    full = calibrate(model, val, search="exhaustive", **kw)
    beam = calibrate(model, val, search="beam", beam_width=16, **kw)
    assert full.search["method"] == "exhaustive" and beam.search["method"] == "beam"
    assert full.search["scored"] == full.search["combinations"]
    for key in ("accuracy", "flops", "exit_fractions"):
        assert beam.chosen[key] == pytest.approx(full.chosen[key], abs=1e-12), key


def test_beam_rows_are_scored_right_and_never_beat_exhaustive():
    model, val = mlp(5, seed=7), data(8)
    table = collect_exit_outputs(model, val)
    kw = dict(table=table, per_exit=5, max_flops=0.6, max_drop=None)
    full = calibrate(model, val, search="exhaustive", **kw)
    beam = calibrate(model, val, search="beam", beam_width=8, **kw)
    assert beam.search["scored"] < full.search["combinations"] == len(full.rows)
    for res in (full, beam):  # every row as the direct count over all samples gives it
        thr = torch.tensor([r["thresholds"] for r in res.rows], dtype=torch.float64)
        acc, frac = score_thresholds(table, thr)
        assert acc.tolist() == pytest.approx([r["accuracy"] for r in res.rows], abs=1e-12)
        assert torch.allclose(frac, torch.tensor([r["exit_fractions"] for r in res.rows], dtype=torch.float64),
                              rtol=0, atol=1e-12)
    assert beam.chosen["accuracy"] <= full.chosen["accuracy"] + 1e-12
    assert beam.chosen["flops_fraction"] <= 0.6 + 1e-12


def test_scored_combinations_grow_linearly_with_exits():
    val = data(9, m=300)
    scored = {}
    for n in (4, 5, 6, 7, 8):
        res = calibrate(mlp(n, seed=n), val, per_exit=10, beam_width=8, polish_starts=2, search="beam")
        assert res.search["combinations"] > 8 ** (n - 1)
        scored[n] = res.search["scored"]
    # per side branch: at most beam_width x K children (K <= 12 candidates), plus the
    # coordinate-descent sweeps (polish_starts x 4 sweeps x K per side branch)
    per_exit = 8 * 12 + 2 * 4 * 12
    for n, s in scored.items():
        assert s <= per_exit * (n - 1), (n, s)
    assert scored[8] < 5 * scored[4]  # 7 side branches against 3; the full grid grows >= 8^4 times


# -- targets -------------------------------------------------------------------------------


def test_max_flops_thresholds_use_at_most_that_share_when_the_engine_runs_them():
    model, val = mlp(6, seed=11), data(12)
    res = calibrate(model, val, max_drop=None, max_flops=0.5)
    x, y = val.tensors
    acc, frac = engine_profile(model, res.chosen["thresholds"], x, y)
    prof = profile_flops(model)
    assert prof.expected(frac) <= 0.5 * prof.backbone
    assert acc == pytest.approx(res.chosen["accuracy"])
    # no other point scored meets the budget with a higher accuracy
    assert all(r["accuracy"] <= res.chosen["accuracy"] for r in res.rows if r["flops_fraction"] <= 0.5)


def test_a_budget_nothing_meets_names_the_least_reachable():
    model, val = mlp(3, seed=2), data(3)
    prof = profile_flops(model)
    least = prof.path(0) / prof.backbone  # every sample leaves at the first branch
    with pytest.raises(ValueError, match=rf"max_flops=0.01 .* the least reachable is {least:.4f}"):
        calibrate(model, val, max_drop=None, max_flops=0.01)
    with pytest.raises(ValueError, match="max_flops is a fraction"):
        calibrate(model, val, max_flops=-1)


def test_exit_fraction_sets_the_share_leaving_at_the_first_branch():
    model, val = mlp(4, seed=5), data(6)
    x, y = val.tensors
    for want in (0.25, 0.9):
        res = calibrate(model, val, exit_fraction=want)
        _, frac = engine_profile(model, res.chosen["thresholds"], x, y)
        assert abs(frac[0] - want) <= 1 / len(y) + 1e-12
        assert res.chosen["exit_fractions"][0] == pytest.approx(frac[0])


def test_exit_fraction_blocked_by_ties_is_an_error():
    model = identity_model()
    x = torch.tensor([[0.0, 5.0]] * 10)  # ten identical scores: 0 % or 100 % leave
    val = torch.utils.data.TensorDataset(x, torch.ones(10, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"exit_fraction=0.5: .* nearest reachable are 0.0000 and 1.0000"):
        calibrate(model, val, exit_fraction=0.5)


def test_time_target_with_path_times_picks_the_fastest_point_meeting_the_accuracy():
    # path_times make exit 1 (the middle one) cost as much as the last: by time, leaving
    # there gains nothing, by FLOPs it does
    model, val = mlp(3, seed=13), data(14)
    path_times = [1e-4, 1e-3, 1e-3]
    res = calibrate(model, val, max_drop=0.03, path_times=path_times, search="exhaustive")
    assert res.target["cost"] == "time"
    for r in res.rows:
        assert r["time_per_sample"] == pytest.approx(float(np.dot(r["exit_fractions"], path_times)))
    ok = [r for r in res.rows if r["accuracy"] >= res.final_accuracy - 0.03 - 1e-12]
    assert res.chosen["time_per_sample"] == min(r["time_per_sample"] for r in ok)
    by_flops = calibrate(model, val, max_drop=0.03, search="exhaustive")
    assert by_flops.chosen["flops"] <= res.chosen["flops"]


def test_latency_prediction_formula():
    # two exits, B = 8, segment times known at sizes 1 and 8 (linear in between, 0 at 0)
    lat = LatencyProfile(batch_size=8, sizes=[1, 8], segment=[[1.0, 8.0], [2.0, 30.0]])
    # all leave at the first exit: only segment 0, at 8 samples
    assert lat.predict([1.0, 0.0]) == pytest.approx(8.0 / 8)
    # half leave: segment 1 sees 4 samples: 2 + (4 - 1) * (30 - 2) / 7 = 14
    assert lat.predict([0.5, 0.5]) == pytest.approx((8.0 + 14.0) / 8)
    # 1/16 stays: 0.5 samples per batch, half the time of one
    assert lat.predict(np.array([[15 / 16, 1 / 16]])) == pytest.approx([(8.0 + 1.0) / 8])
    with pytest.raises(ValueError, match="sizes must be ascending"):
        LatencyProfile(batch_size=8, sizes=[8, 1], segment=[[1.0, 1.0]])


@pytest.mark.filterwarnings("ignore:calibrate. the chosen thresholds were predicted")  # injected times
def test_max_latency_with_injected_segment_times_is_predicted_and_checked():
    model, val = mlp(3, seed=15), data(16, m=256)
    # the last segment is 20x the first two: the budget forces early exits
    lat = LatencyProfile(batch_size=64, sizes=[1, 64], segment=[[1e-5, 64e-5], [1e-5, 64e-5], [2e-4, 128e-4]])
    full_time = lat.predict([0.0, 0.0, 1.0])
    res = calibrate(model, val, max_drop=None, max_latency=0.5 * full_time, latency=lat, batch_size=64)
    c = res.chosen
    assert c["time_per_sample"] == pytest.approx(lat.predict(c["exit_fractions"]))
    assert c["time_per_sample"] <= 0.5 * full_time
    assert c["time_measured"] > 0  # the engine timed with these thresholds (value not asserted)
    assert all(r["accuracy"] <= c["accuracy"] for r in res.rows if r["time_per_sample"] <= 0.5 * full_time)
    least = lat.predict([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=rf"max_latency=1e-09 .* least reachable is {least:.4g} s"):
        calibrate(model, val, max_drop=None, max_latency=1e-9, latency=lat, batch_size=64)


def test_measured_latency_profile_has_a_time_per_segment_and_size():
    model = mlp(3, seed=1)
    lat = measure_latency(model, torch.randn(20, 12), repeats=1)
    assert lat.batch_size == 20 and lat.sizes == [1, 2, 4, 8, 16, 20]
    assert len(lat.segment) == 3 and all(len(s) == 6 and min(s) > 0 for s in lat.segment)


def test_result_reports_predicted_and_measured_on_the_test_split(tmp_path):
    model, val, test = mlp(4, seed=17), data(18), data(19, m=200)
    res = calibrate(model, val, max_flops=0.7, max_drop=None, test=test)
    x, y = test.tensors
    acc, frac = engine_profile(model, res.chosen["thresholds"], x, y)
    m = res.test["measured"]
    assert m["accuracy"] == pytest.approx(acc) and m["exit_fractions"] == pytest.approx(frac)
    assert m["flops_fraction"] == pytest.approx(profile_flops(model).expected(frac) / profile_flops(model).backbone)
    assert res.test["predicted"]["accuracy"] == res.chosen["accuracy"]
    assert "test split (measured)" in res.summary()
    res.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


# -- temperature scaling -------------------------------------------------------------------


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 6, generator=g) * 3
    y = torch.distributions.Categorical(logits=z).sample()
    t = fit_temperature(z * 2.5, y)  # logits 2.5x too confident
    assert t == pytest.approx(2.5, rel=0.1)
    assert expected_calibration_error(z * 2.5 / t, y) < expected_calibration_error(z * 2.5, y)


def test_temperature_is_folded_predictions_unchanged_and_ece_reported():
    model, val = mlp(3, seed=21, scale=4.0), data(22, m=600)
    x, _ = val.tensors
    before = [z.clone() for z in model(x)]
    res = calibrate(model, val, temperature=True, max_drop=0.02)
    after = model(x)
    assert len(res.temperature) == 3 and res.temperature[0] != pytest.approx(1.0, abs=0.05)
    for z0, z1, t in zip(before, after, res.temperature):
        assert torch.equal(z0.argmax(1), z1.argmax(1))
        assert torch.allclose(z1, z0 / t, rtol=1e-4, atol=1e-5)
    assert len(res.ece["before"]) == 3 and all(
        a <= b + 1e-9 for a, b in zip(res.ece["after"], res.ece["before"]))
    # the thresholds were searched on the scaled scores: the engine agrees
    acc, frac = engine_profile(model, res.chosen["thresholds"], *val.tensors)
    assert frac == pytest.approx(res.chosen["exit_fractions"]) and acc == pytest.approx(res.chosen["accuracy"])


def test_temperature_cannot_be_folded_through_a_layer_after_the_linear():
    torch.manual_seed(0)
    model = bn.from_stages([nn.Linear(4, 8), nn.Linear(8, 8)],
                           [nn.Sequential(nn.Linear(8, 3), nn.Tanh()), nn.Linear(8, 3)], input_shape=(4,))
    w = model.branches[0][0].weight.clone()
    with pytest.raises(ValueError, match="branch 0: its logits are not its last nn.Linear's output"):
        fold_temperature(model, [2.0, 1.0], torch.randn(5, 4))
    assert torch.equal(model.branches[0][0].weight, w)  # undone


def test_temperature_is_not_folded_anywhere_when_a_side_branch_has_no_linear():
    torch.manual_seed(0)
    model = bn.from_stages([nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(3, 8)],
                           [nn.Linear(8, 3), nn.Identity(), nn.Linear(8, 3)], input_shape=(4,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="branch 1 has no nn.Linear layer to fold temperature 3 into"):
        fold_temperature(model, [2.0, 3.0, 1.0], torch.randn(5, 4))
    # branch 0 comes first but was not scaled either
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def attached_mlp(tail=()):
    """An attach_exits model (final branch nn.Identity) on a plain MLP, weights scaled up
    so that the fitted temperatures are far from 1."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5), *tail)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4.0)
    model = bn.attach_exits(net, ["1"], example_input=torch.randn(2, 12), num_classes=5).eval()
    assert isinstance(model.branches[-1], nn.Identity)
    return model


@pytest.mark.parametrize("tail", [(), (nn.Tanh(),)], ids=["linear-last", "tanh-after-linear"])
def test_temperature_on_an_attach_exits_model(tail):
    # Used to raise "branch 1 has no nn.Linear layer to fold temperature ... into".
    model, val = attached_mlp(tail), data(5, m=600)
    x, _ = val.tensors
    before = [z.clone() for z in model(x)]
    res = calibrate(model, val, temperature=True, max_drop=0.05)
    after = model(x)
    for z0, z1, t in zip(before, after, res.temperature):
        assert torch.equal(z0.argmax(1), z1.argmax(1))
        assert torch.allclose(z1, z0 / t, rtol=1e-4, atol=1e-5)
    assert res.temperature[0] != pytest.approx(1.0, abs=0.05)
    if tail:  # a Tanh after the last Linear: nothing to fold into, the final exit stays unscaled
        assert res.temperature[-1] == 1.0 and torch.equal(before[-1], after[-1])
    else:  # folded into the last stage's last Linear
        assert res.temperature[-1] != pytest.approx(1.0, abs=0.05)


def test_collect_logits_gives_every_exit():
    model, val = mlp(3), data(m=50)
    logits, y = collect_logits(model, val, batch_size=16)
    assert [tuple(z.shape) for z in logits] == [(50, 5)] * 3 and torch.equal(y, val.tensors[1])


def test_max_latency_measures_a_profile_at_the_batch_size_when_none_is_given():
    model, val = mlp(3, seed=23), data(24, m=200)
    res = calibrate(model, val, max_drop=None, max_latency=10.0, batch_size=32)  # a budget every point meets
    c = res.chosen
    assert res.target["cost"] == "time" and c["time_per_sample"] is not None and c["time_measured"] > 0
    assert all(r["time_per_sample"] is not None for r in res.rows)
    with pytest.raises(ValueError, match="path_times is a time model of its own"):
        calibrate(model, val, max_latency=1.0, path_times=[1.0, 2.0, 3.0])
