"""Calibration: scoring from cached exit outputs must equal running the engine."""

import csv

import pytest
import torch
from torch import nn

import branchynet as bn
from branchynet.calibrate import (calibrate, collect_exit_outputs, measure_path_times,
                                  pareto_front, score_thresholds)
from branchynet.flops import count_flops, profile_flops


def small_model(seed=0):
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(10, 32), nn.ReLU()) for _ in range(1)] + \
             [nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(2)]
    branches = [nn.Linear(32, 4) for _ in range(3)]
    model = bn.BranchyNet(stages, branches, input_shape=(10,), num_classes=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def dataset(seed=1, m=300):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 10, generator=g)
    y = torch.randint(0, 4, (m,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def test_scores_equal_engine_results():
    model, val = small_model(), dataset()
    table = collect_exit_outputs(model, val, batch_size=64)
    grid = torch.tensor([[0.0, 0.0], [0.5, 0.8], [1.0, 0.3], [5.0, 5.0]])
    acc, frac = score_thresholds(table, grid)
    x, y = val.tensors
    for g in range(grid.shape[0]):
        res = bn.EarlyExitEngine(model, grid[g].tolist())(x)
        assert abs(float((res.pred == y).double().mean()) - float(acc[g])) < 1e-12
        assert [c / len(y) for c in res.counts] == pytest.approx(frac[g].tolist())
    assert frac[0].tolist() == [0.0, 0.0, 1.0] and frac[3].tolist() == [1.0, 0.0, 0.0]


def test_chosen_thresholds_meet_target_on_their_data(tmp_path):
    model, val = small_model(), dataset()
    res = calibrate(model, val, max_drop=0.02)
    assert res.target["met"]
    x, y = val.tensors
    eng = bn.EarlyExitEngine(model, res.chosen["thresholds"])
    out = eng(x)
    acc = float((out.pred == y).double().mean())
    assert acc >= res.final_accuracy - 0.02 - 1e-9
    assert acc == pytest.approx(res.chosen["accuracy"])
    # it is the cheapest such point
    cheaper = [r for r in res.rows if r["flops"] < res.chosen["flops"] - 1e-9]
    assert all(r["accuracy"] < res.final_accuracy - 0.02 for r in cheaper)
    res.to_csv(tmp_path / "sweep.csv")
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert len(rows) == len(res.rows) and sum(int(r["pareto"]) for r in rows) == len(res.pareto())
    res.plot(tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_min_accuracy_target_and_unreachable_target():
    model, val = small_model(), dataset()
    best = calibrate(model, val, max_drop=None, min_accuracy=0.0, search="exhaustive")
    top = max(r["accuracy"] for r in best.rows)
    with pytest.raises(ValueError, match=rf"best reachable is {100 * top:.2f} %"):
        calibrate(model, val, max_drop=None, min_accuracy=min(1.0, top + 0.01), search="exhaustive")
    with pytest.raises(ValueError, match="max_drop"):
        calibrate(model, val, max_drop=5)


def test_pareto_front_is_non_dominated():
    rows = [{"flops": f, "accuracy": a, "time_per_sample": None}
            for f, a in [(1, 0.5), (2, 0.6), (2, 0.4), (3, 0.55), (4, 0.9)]]
    front = pareto_front(rows)
    assert [(r["flops"], r["accuracy"]) for r in front] == [(1, 0.5), (2, 0.6), (4, 0.9)]


def test_flops_counted_from_modules():
    lin = nn.Linear(10, 32)
    assert count_flops(lin, torch.zeros(1, 10)) == 2 * 10 * 32
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, torch.zeros(1, 3, 8, 8)) == 2 * 3 * 8 * 9 * 64
    model = small_model()
    prof = profile_flops(model)
    assert prof.stage == [640, 2048, 2048] and prof.branch == [256, 256, 256]
    assert prof.backbone == 640 + 2048 * 2 + 256
    assert prof.ideal_speedup([0, 0, 1]) < 1  # all at the last exit: side branches are overhead
    assert prof.ideal_speedup([1, 0, 0]) == pytest.approx(prof.backbone / (640 + 256))


def test_path_times_sum_the_segment_times_on_the_way(monkeypatch):
    # Each timed call gets its own known time: segment n (stage, branch and exit op, timed
    # at the example's batch of 4) takes 10^n; path n is their sum up to n, per sample.
    import branchynet.timing as timing

    calls = []

    def fake_time_fn(fn, *, repeats=5, warmup=1, device=None):
        fn()
        calls.append(len(calls))
        t = 10.0 ** (len(calls) - 1)
        return timing.Timing(t, t, t, repeats)

    monkeypatch.setattr(timing, "time_fn", fake_time_fn)
    model = small_model()
    t = measure_path_times(model, torch.randn(4, 10), repeats=3)
    assert len(calls) == 3
    assert t == pytest.approx([1 / 4, 11 / 4, 111 / 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_candidate_scores_what_every_backend_does(dtype):
    # Confident exits (entropies down to ~1e-7) and every candidate the sweep tries:
    # the fraction leaving at each exit must be what each CPU backend's engine does.
    from branchynet.calibrate import candidate_thresholds
    from branchynet.ops import available_backends

    model = small_model(3)
    with torch.no_grad():
        for b in model.branches:
            b.weight.mul_(4.0)
    model = model.to(dtype)
    val = dataset(4, m=400)
    x, y = val.tensors
    x = x.to(dtype)
    table = collect_exit_outputs(model, torch.utils.data.TensorDataset(x, y))
    assert float(table.score[0].min()) < 1e-4
    cands = candidate_thresholds(table, per_exit=25)
    grid = torch.tensor([[a, b] for a in cands[0] for b in cands[1][::5]], dtype=torch.float64)
    acc, frac = score_thresholds(table, grid)
    for backend in available_backends("cpu"):
        if backend == "triton" and dtype == torch.float64:
            continue
        eng = bn.EarlyExitEngine(model, [0.0, 0.0], backend=backend)
        for g in range(0, grid.shape[0], 3 if backend == "triton" else 1):
            eng.thresholds = grid[g].tolist()
            res = eng(x)
            assert [c / len(y) for c in res.counts] == pytest.approx(frac[g].tolist()), (backend, grid[g])
            assert float((res.pred == y).double().mean()) == pytest.approx(float(acc[g]))


# -- bad validation data: a clear error, and the model as it was ----------------------------


def poisoned(val, row=5, label=None):
    """``val`` with one NaN input row (-> NaN logits at every exit) or one label set to
    ``label``."""
    x, y = (t.clone() for t in val.tensors)
    if label is None:
        x[row] = float("nan")
    else:
        y[row] = label
    return torch.utils.data.TensorDataset(x, y)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("temperature", [False, True])
def test_a_nan_row_is_an_error_before_anything_changes(temperature):
    # Used to divide the branches' weights by the fitted temperatures, then die inside
    # torch ("atol ... got nan") without restoring them.
    model = small_model()
    before = state(model)
    with pytest.raises(ValueError, match=r"1 of 300 validation samples give NaN scores \(first at index 5"):
        calibrate(model, poisoned(dataset()), temperature=temperature, max_drop=0.02)
    assert same_state(model, before)


def test_all_nan_scores_are_an_error_not_thresholds_of_zero():
    model = small_model()
    x, y = dataset().tensors
    with pytest.raises(ValueError, match=r"300 of 300 validation samples"):
        calibrate(model, torch.utils.data.TensorDataset(torch.full_like(x, float("nan")), y))


@pytest.mark.parametrize("label", [4, -1])
@pytest.mark.parametrize("temperature", [False, True])
def test_labels_outside_the_classes_are_an_error_before_anything_changes(label, temperature):
    # Used to report the target met (a label no exit can predict is simply "wrong").
    model = small_model()
    before = state(model)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 4\).* {label} .*index 7"):
        calibrate(model, poisoned(dataset(), row=7, label=label), temperature=temperature)
    assert same_state(model, before)


def test_a_failure_after_folding_puts_the_weights_back():
    # The temperatures are folded first; a target nothing meets is found after that.
    from branchynet.calibrate import TargetUnreachable

    model = small_model()
    before = state(model)
    with pytest.raises(TargetUnreachable):
        calibrate(model, dataset(), temperature=True, max_drop=None, max_flops=1e-6)
    assert same_state(model, before)


def test_fold_temperature_puts_the_weights_back_on_any_exception(monkeypatch):
    from branchynet.calibrate import fold_temperature
    from branchynet.calibrate import temperature as temp_mod

    model = small_model()
    before = state(model)

    def boom(*args, **kwargs):
        raise RuntimeError("not a ValueError")

    monkeypatch.setattr(temp_mod, "_check_folded", boom)
    with pytest.raises(RuntimeError, match="not a ValueError"):
        fold_temperature(model, [2.0, 3.0, 1.5], torch.randn(8, 10))
    assert same_state(model, before)


def test_fold_temperature_checks_an_example_with_a_nan_row():
    # The check compared with a NaN tolerance (torch: "atol ... got nan").
    from branchynet.calibrate import fold_temperature

    model = small_model()
    x = torch.randn(8, 10)
    x[2] = float("nan")
    z0 = [z.clone() for z in model(x)]
    assert fold_temperature(model, [2.0, 3.0, 1.5], x) == [2.0, 3.0, 1.5]
    for a, b, t in zip(z0, model(x), [2.0, 3.0, 1.5]):
        assert torch.allclose(b[[0, 1, 3]], a[[0, 1, 3]] / t, rtol=1e-5, atol=1e-5)


def test_an_interrupt_after_folding_puts_the_weights_back(monkeypatch):
    from branchynet.calibrate import temperature as temp_mod

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(temp_mod, "expected_calibration_error", boom)  # runs after the fold
    model = small_model()
    before = state(model)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, dataset(), temperature=True)
    assert same_state(model, before)
