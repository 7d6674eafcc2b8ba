"""The serving load benchmark's functions (benchmarks/serving_load.py) on a tiny model."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import branchynet as bn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import profiles as P  # noqa: E402
import serving_load as S  # noqa: E402


def tiny_case(width=8, classes=4):
    """A 2-exit MLP BranchyNet with thresholds sending about half the pool out early."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(2)]
    branches = [nn.Linear(width, classes) for _ in range(2)]
    with torch.no_grad():
        for b in branches:
            b.weight.mul_(4.0)  # entropies spread over (0, log C)
    model = bn.from_stages(stages, branches, input_shape=(width,), num_classes=classes).eval()
    pool = P.make_pool(model, 64)
    pt = P.thresholds_for_profile(model, pool, [0.5, 0.5])
    return model, pt.thresholds, pool


def test_poisson_arrivals_are_seeded_and_bounded():
    a = S.poisson_arrivals(1000.0, 500, 10.0, seed=3)
    assert np.array_equal(a, S.poisson_arrivals(1000.0, 500, 10.0, seed=3))
    assert len(a) == 500 and np.all(np.diff(a) > 0)
    assert abs(len(a) / a[-1] - 1000.0) < 200  # the rate asked for, within Poisson noise
    b = S.poisson_arrivals(1000.0, 10_000, 0.2, seed=3)
    assert 0 < len(b) < 10_000 and b[-1] <= 0.2  # the time bound cuts it


@pytest.mark.parametrize("config", S.CONFIGS)
def test_open_loop_answers_every_request(config):
    model, thresholds, pool = tiny_case()
    p = S.open_loop(model, thresholds, config, pool, 400.0, max_requests=40, max_seconds=2.0, seed=1,
                    max_batch_size=8, max_wait_ms=1.0, max_queued=4096, warm=8)
    assert p["requests"] == 40 and p["answered"] == 40
    assert p["refused"] == 0 and p["unanswered"] == 0
    assert p["stats"]["answered"] == 40  # the server's own count, warm-up excluded
    assert 0 < p["p50_s"] <= p["p99_s"] and p["achieved_rps"] > 0
    exits = set(p["p50_s_per_exit"])
    assert exits <= ({0} if config == "backbone" else {0, 1}) and exits
    if config != "backbone":
        assert sum(p["stats"]["exits"]) == 40 and p["stats"]["exits"][0] > 0
    assert p["deep_mean_rows"] is None or 1 <= p["deep_mean_rows"] <= 8


def test_saturate_counts_every_request():
    model, thresholds, pool = tiny_case()
    r = S.saturate(model, thresholds, "rebatch", pool, 64, max_batch_size=16, max_wait_ms=1.0,
                   max_queued=8, warm=16)  # max_queued is raised to n: nothing refused
    assert r["n"] == 64 and r["stats"]["answered"] == 64 and r["stats"]["overloaded"] == 0
    # Submitting ends before the last answer: the submit rate is at least the served rate.
    assert 0 < r["submit_share"] <= 1 and r["submit_rps"] >= r["rps"] > 0
    assert r["stats"]["stage_rows"][0] == 64 and sum(r["stats"]["exits"]) == 64


def test_measure_and_report_structure(tmp_path):
    model, thresholds, pool = tiny_case()
    r = S.measure(model, thresholds, pool, max_batch_size=8, max_wait_ms=1.0, saturation_batches=4,
                  saturation_repeats=1, loads=(0.1, 0.6), max_requests=30, max_seconds=0.5, bare_rounds=1,
                  log=lambda *a: None)
    assert set(r["saturated"]) == set(S.CONFIGS)
    for table in ("open_loop_own", "open_loop_shared"):
        assert set(r[table]) == set(S.CONFIGS)
        for c in S.CONFIGS:
            assert [p["load"] for p in r[table][c]] == [0.1, 0.6]
            for p in r[table][c]:
                assert p["answered"] + p["refused"] == p["requests"] and p["unanswered"] == 0
    # The shared table offers every configuration the same rates (the backbone's).
    for c in S.CONFIGS:
        assert [p["offered_rps"] for p in r["open_loop_shared"][c]] == \
            pytest.approx([p["offered_rps"] for p in r["open_loop_shared"]["backbone"]])
    assert set(r["targets"]) == set(S.TARGET_TEXT)
    for t in r["targets"].values():
        assert isinstance(t["met"], bool) and t["what"]
    r.update(thresholds=thresholds, target=[0.5, 0.5], realised=[0.5, 0.5])
    results = {"models": {"tiny": r}, "environment": S.environment(["--quick"]), "loadavg_before": None}
    json.dumps(results, default=str)
    md = S.report(results)
    assert "## tiny" in md and md.count("**met**") + md.count("**missed**") == 5


def test_targets_met_and_missed():
    def pt(rps, p50=0.001):
        return {"achieved_rps": rps, "p50_s": p50}

    r = {"settings": {"loads": [0.6]}, "bare": {"engine_gain": 1.6},
         "saturated": {"backbone": {"rps": 100.0, "stats": {"deep_mean_rows": 8.0}},
                       "per_batch": {"rps": 120.0, "stats": {"deep_mean_rows": 2.0}},
                       "rebatch": {"rps": 140.0, "stats": {"deep_mean_rows": 5.0}}},
         "open_loop_shared": {"backbone": [pt(60, 0.010)], "per_batch": [pt(60, 0.008)],
                              "rebatch": [pt(50, 0.006)]}}
    t = S.targets(r)
    assert t["saturation_gain"]["met"] and t["saturation_gain"]["value"] == pytest.approx(1.4)
    assert not t["gain_kept"]["met"] and t["gain_kept"]["value"] == pytest.approx(1.4 / 1.6)
    assert t["deep_batch"]["met"] and t["deep_batch"]["value"] == pytest.approx(2.5)
    assert t["latency_60"]["met"] and t["latency_60"]["value"] == pytest.approx(0.6)
    assert not t["rebatch_vs_per_batch"]["met"] and t["rebatch_vs_per_batch"]["worst_point"].startswith("60%")
