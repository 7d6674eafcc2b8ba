"""The benchmark helpers (benchmarks/profiles.py) and report (benchmarks/report.py)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import branchynet as bn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import profiles as P  # noqa: E402
import report as R  # noqa: E402


def mlp_model(seed=0, num_exits=3, width=16, classes=10):
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(num_exits)]
    branches = [nn.Linear(width, classes) for _ in range(num_exits)]
    with torch.no_grad():
        for b in branches:
            b.weight.mul_(4.0)  # entropies spread over (0, log C)
    return bn.from_stages(stages, branches, input_shape=(width,), num_classes=classes).eval()


@torch.no_grad()
def exits_by_hand(model, x, thresholds):
    """The exit of every row from one full forward pass: the first n with entropy < T_n."""
    outs = model(x)
    exits = torch.full((x.shape[0],), len(outs) - 1, dtype=torch.int64)
    for n in reversed(range(len(outs) - 1)):
        exits[bn.entropy(outs[n]).float() < thresholds[n]] = n
    return exits


@pytest.mark.parametrize("fractions", [
    [0.415, 0.138, 0.447], [0.656, 0.252, 0.092], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.0, 0.8],
])
@pytest.mark.parametrize("m", [500, 1024])
def test_thresholds_realise_the_profile(fractions, m):
    model = mlp_model()
    x = P.make_pool(model, m)
    pt = P.thresholds_for_profile(model, x, fractions)
    assert len(pt.thresholds) == 2 and all(t >= 0 for t in pt.thresholds)
    for got, want in zip(pt.realised, fractions):
        assert abs(got - want) <= 1.0 / m + 1e-12, (pt.realised, fractions)
    # The exits reported (from the engine run inside) are the rule's, recomputed here
    # from one full forward pass: the thresholds do what the profile says.
    exits = exits_by_hand(model, x, pt.thresholds)
    assert torch.equal(pt.exits, exits)
    counts = torch.bincount(exits, minlength=3).tolist()
    assert [c / m for c in counts] == pytest.approx(pt.realised)
    if fractions[0] == 1.0:
        assert pt.exits.eq(0).all()
    if fractions[-1] == 1.0:
        assert pt.thresholds == [0.0, 0.0]


def test_thresholds_paper_profile_b_lenet():
    model = P.make_model("b_lenet")
    x = P.make_pool(model, 256)
    pt = P.thresholds_for_profile(model, x, P.PAPER_PROFILES["b_lenet"])
    assert pt.realised == pytest.approx([0.943, 0.057], abs=1 / 256)
    exits = exits_by_hand(model, x, pt.thresholds)
    assert torch.bincount(exits, minlength=2).tolist() == [round(f * 256) for f in pt.realised]
    res = bn.EarlyExitEngine(model, thresholds=pt.thresholds)(x)  # the fastest backend here
    assert torch.equal(res.exit, exits)


def test_thresholds_with_tied_entropies():
    # A first branch that ignores its input: every exit-0 entropy is the same number, so
    # the pool cannot be split there; the nearest achievable split is taken.
    model = mlp_model()
    with torch.no_grad():
        model.branches[0].weight.zero_()
    x = P.make_pool(model, 200)
    pt = P.thresholds_for_profile(model, x, [0.3, 0.3, 0.4])
    assert pt.realised[0] in (0.0, 1.0)
    assert sum(pt.realised) == pytest.approx(1.0)
    if pt.realised[0] == 0.0:  # the shortfall moves on to exit 1
        assert pt.realised[1] == pytest.approx(0.6, abs=1 / 200)


def test_split_threshold_float32_and_adjacent_values():
    import numpy as np

    h = np.array([0.5, 1.0, 1.0, 2.0], dtype=np.float32)
    t, got = P.split_threshold(h, 1)
    assert got == 1 and 0.5 < t <= 1.0 and np.float32(t) == t
    t, got = P.split_threshold(h, 2)  # tie at 1.0: the nearest split is 1 or 3
    assert got in (1, 3)
    a = np.float32(1.0)
    b = np.nextafter(a, np.float32(2))
    t, got = P.split_threshold(np.array([a, b], dtype=np.float32), 1)
    assert got == 1 and (np.array([a, b]) < np.float32(t)).sum() == 1
    assert P.split_threshold(h, 0) == (0.0, 0)
    t, got = P.split_threshold(h, 4)
    assert got == 4 and t > 2.0


def test_batch_cycler_cycles_and_resets():
    x = torch.arange(10).float().reshape(10, 1)
    c = P.BatchCycler(x, 3)
    assert c.num_batches == 3
    seen = [c()[:, 0].tolist() for _ in range(4)]
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]
    assert c.served_rows().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    c.reset()
    assert c()[:, 0].tolist() == [0, 1, 2]
    one = P.BatchCycler(x, 1)
    assert [int(one()) for _ in range(12)] == list(range(10)) + [0, 1]
    with pytest.raises(ValueError):
        P.BatchCycler(x, 11)


def test_batch_cycler_with_order_and_stratified_windows():
    exits = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    order = P.stratified_order(exits, 3)
    assert sorted(order.tolist()) == list(range(100))
    x = torch.arange(100).float().reshape(100, 1)
    c = P.BatchCycler(x, 10, order=order)
    for _ in range(10):
        rows = c()[:, 0].long()
        counts = torch.bincount(exits[rows], minlength=3).tolist()
        assert all(abs(got - want) <= 1 for got, want in zip(counts, [6, 3, 1])), counts
    assert torch.equal(c.served_rows(), order)


def test_rounds_and_bytes():
    assert P.choose_rounds(0.01, 1.0, min_rounds=3, max_rounds=1000) == 100
    assert P.choose_rounds(1.0, 1.0, min_rounds=3, max_rounds=1000) == 3
    assert P.choose_rounds(1e-6, 1.0, min_rounds=3, max_rounds=1000) == 1000
    assert P.choose_rounds(0.01, 1.0, min_rounds=3, max_rounds=1000, cycle=32) == 96
    assert P.choose_rounds(0.1, 1.0, min_rounds=3, max_rounds=1000, cycle=32) == 10
    by = P.exit_op_bytes(64, 10, 32)
    assert by["logits_read"] == 64 * 10 * 4 and by["rows_read"] == 64 * 8
    assert by["exit_rows_write"] == 32 * (40 + 20) and by["survivor_index_write"] == 32 * 16 + 8
    assert by["total"] == sum(v for k, v in by.items() if k != "total")


def test_grid_cpu_default_and_full():
    cpu = P.engine_cases("cpu", full=False)
    assert ("b_resnet110", 256, "paper") not in cpu and ("b_resnet110", 64, "paper") in cpu
    assert ("b_lenet", 64, "all_exit") in cpu and ("b_lenet", 8, "all_exit") not in cpu
    assert len(P.engine_cases("cpu", full=True)) == 3 * 5 * 3
    provs = P.engine_providers("cpu", 8)
    assert provs[0] == "backbone_eager" and "naive" in provs and "per_sample" in provs
    assert "engine_torch" in provs and "engine_triton" not in provs and "backbone_cudagraph" not in provs
    assert "per_sample" not in P.engine_providers("cpu", 64)
    ops = P.exit_op_providers("cpu")
    assert ops[0] == "op_eager" and ops[-1] == "copy"
    assert "op_triton" not in ops and "op_cuda" not in ops
    assert P.profile_fractions("b_alexnet", "none_exit", 3) == [0.0, 0.0, 1.0]
    for name, f in P.PAPER_PROFILES.items():
        assert sum(f) == pytest.approx(1.0)


# --- report -----------------------------------------------------------------------------

def _bench(group, name, median, extra, q1=None, q3=None):
    q1 = median if q1 is None else q1
    q3 = median if q3 is None else q3
    return {"group": group, "name": name, "fullname": f"x::{name}", "extra_info": extra,
            "stats": {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "mean": median}}


def fake_json():
    def eng(b, prov, median, ideal=None, realised=None, profile="paper", seg=None, compile_s=None):
        ei = {"suite": "engine", "model": "b_lenet", "batch": b, "profile": profile,
              "provider": prov, "device": "cpu", "samples_per_call": b,
              "ideal_speedup": ideal, "realised_fractions": realised,
              "target_fractions": [0.943, 0.057], "pool_fractions": [0.943, 0.057],
              "segment_s_per_call": seg, "compile_s": compile_s}
        return _bench(f"b_lenet|B={b}|{profile}", prov, median, ei, q1=0.9 * median, q3=1.1 * median)

    def op(b, c, prov, median, moved, per=1):
        # a timed call of `per` ops: the report divides by it
        ei = {"suite": "exit_op", "batch": b, "classes": c, "provider": prov, "device": "cpu",
              "bytes_moved": moved, "samples_per_call": 1, "calls_per_timed_call": per}
        return _bench(f"exit_op|B={b}|C={c}", prov, median * per, ei)

    def fixed(prov, median, ratio=None):
        ei = {"suite": "fixed_cost", "model": "b_lenet", "batch": 1, "provider": prov, "device": "cpu",
              "ratio_median": ratio, "ratio_q1": ratio and ratio - 0.01, "ratio_q3": ratio and ratio + 0.02}
        return _bench("fixed_cost|b_lenet|B=1", prov, median, ei)

    return {
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "torch": "2.x", "triton": None,
                         "gpu": "Fake GPU", "driver_version": "999.1"},
        "commit_info": {"id": "abc123", "branch": "main", "dirty": False, "time": "t"},
        "datetime": "now",
        "benchmarks": [
            # B = 1: backbone 1 ms/call; engine 0.5 ms -> 2x; ideal 4x -> 50 %.
            eng(1, "backbone_eager", 1e-3),
            eng(1, "engine_torch", 0.5e-3, ideal=4.0, realised=[0.9, 0.1]),
            eng(1, "naive", 2e-3, ideal=4.0, realised=[0.9, 0.1]),
            eng(1, "per_sample", 1e-3, ideal=4.0, realised=[0.9, 0.1]),
            # B = 64: 32 ms/call = 0.5 ms/sample; engine 8 ms/call -> 4x, ideal 4 -> 100 %;
            # its segments 6.4 ms/call -> segment ideal 5x, 80 % of it.
            eng(64, "backbone_eager", 32e-3),
            eng(64, "engine_torch", 8e-3, ideal=4.0, realised=[0.9, 0.1], seg=6.4e-3),
            # compiled: backbone 16 ms/call; engine 5 ms/call -> 3.2x the compiled backbone.
            eng(64, "backbone_compile", 16e-3, compile_s=12.0),
            eng(64, "engine_cpp_compile", 5e-3, ideal=4.0, realised=[0.9, 0.1], seg=4e-3, compile_s=30.0),
            # all-exit group without its own backbone: uses the paper group's (same B).
            eng(64, "engine_torch", 4e-3, ideal=5.0, realised=[1.0, 0.0], profile="all_exit"),
            op(1024, 10, "op_eager", 100e-6, 1e6),
            op(1024, 10, "op_triton", 10e-6, 1e6, per=100),
            op(1024, 10, "copy", 5e-6, 1e6),
            fixed("by_hand", 100e-6),
            fixed("engine_cpp", 108e-6, ratio=1.08),
            fixed("engine_torch", 150e-6, ratio=1.5),
        ],
    }


def test_report_engine_rows():
    rows = {(r["profile"], r["batch"], r["provider"]): r for r in R.engine_rows(fake_json())}
    assert rows[("paper", 1, "backbone_eager")]["ms_per_sample"] == pytest.approx(1.0)
    assert rows[("paper", 64, "backbone_eager")]["ms_per_sample"] == pytest.approx(0.5)
    e1 = rows[("paper", 1, "engine_torch")]
    assert e1["speedup"] == pytest.approx(2.0) and e1["efficiency"] == pytest.approx(0.5)
    assert e1["iqr_pct"] == pytest.approx(20.0)
    assert rows[("paper", 1, "naive")]["speedup"] == pytest.approx(0.5)
    e64 = rows[("paper", 64, "engine_torch")]
    assert e64["speedup"] == pytest.approx(4.0) and e64["efficiency"] == pytest.approx(1.0)
    ea = rows[("all_exit", 64, "engine_torch")]
    assert ea["speedup"] == pytest.approx(8.0) and ea["efficiency"] == pytest.approx(1.6)
    assert rows[("paper", 1, "backbone_eager")]["efficiency"] is None
    assert e64["segment_ideal"] == pytest.approx(5.0) and e64["segment_efficiency"] == pytest.approx(0.8)
    assert e64["speedup_vs_compiled"] is None  # an eager provider
    c64 = rows[("paper", 64, "engine_cpp_compile")]
    assert c64["speedup_vs_compiled"] == pytest.approx(3.2) and c64["segment_efficiency"] == pytest.approx(0.8)
    assert c64["speedup"] == pytest.approx(6.4)


def _md_table(md, header_start):
    """{header cell: [column cells]} of the first table whose header begins with header_start."""
    lines = md.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if cells[:len(header_start)] == list(header_start):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                body.append([c.strip() for c in row.strip().strip("|").split("|")])
            return {h: [r[j] for r in body] for j, h in enumerate(cells)}
    raise AssertionError(f"no table starting with {header_start}")


def test_report_markdown_and_exit_op():
    data = fake_json()
    ops = {r["provider"]: r for r in R.exit_op_rows(data)}
    assert ops["op_triton"]["gbps"] == pytest.approx(100.0)
    assert ops["copy"]["gbps"] == pytest.approx(200.0)
    assert ops["op_triton"]["copy_pct"] == pytest.approx(50.0)
    assert ops["op_triton"]["vs_eager"] == pytest.approx(10.0)
    assert ops["op_triton"]["vs_compile"] is None
    md = R.render(data, note="note line")
    assert "note line" in md and "Fake GPU" in md and "999.1" in md and "abc123" in md
    t = _md_table(md, ["B", "backbone_compile", "naive"])  # speedups, paper profile
    assert t["B"] == ["1", "64"]
    assert t["engine_torch"] == ["2x", "4x"] and t["naive"] == ["0.5x", "–"]
    assert t["ideal"] == ["4x", "4x"] and t["eff. engine_torch"] == ["50%", "100%"]
    assert t["engine_cpp_compile"] == ["–", "6.4x"]
    t = _md_table(md, ["B", "seg. ideal engine_cpp_compile"])
    assert t["seg. ideal engine_torch"] == ["–", "5x"] and t["eff. vs seg. engine_torch"] == ["–", "80%"]
    assert t["engine_cpp_compile vs backbone_compile"] == ["–", "3.2x"]
    assert t["compile engine_cpp_compile"] == ["–", "30 s"] and t["compile backbone_compile"] == ["–", "12 s"]
    t = _md_table(md, ["B", "C", "op_eager"])
    assert t["op_triton"] == ["10 (0%)"]  # per op: the timed call held 100
    assert t["op_triton vs eager"] == ["10x"]
    fixed = _md_table(md, ["device", "model", "provider"])
    assert fixed["provider"] == ["by_hand", "engine_cpp", "engine_torch"]
    assert fixed["ratio"] == ["–", "1.080", "1.500"]
    assert fixed["interleaved ratio"][1] == "1.080 [1.070, 1.100]"
    assert fixed["target"] == ["–", "met", "missed by 36 %"]


def test_report_plots_and_cli(tmp_path):
    import json

    data = fake_json()
    paths = R.plot(data, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == ["efficiency_b_lenet.png", "exit_op_bandwidth.png", "speedup_b_lenet.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    assert R.main([str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").read_text().startswith("# branchynet benchmarks")
    assert (tmp_path / "out" / "speedup_b_lenet.png").exists()


def test_engine_provider_kwargs_and_segment_rows(monkeypatch):
    monkeypatch.setenv("BRANCHYNET_BENCH_COMPILE_CPU", "1")
    monkeypatch.delenv("BRANCHYNET_BENCH_COMPILE_MODE", raising=False)
    provs = P.engine_providers("cpu", 256)
    best = provs[provs.index("naive") + 1]  # the first engine: the device's best backend
    assert f"{best}_compile" in provs and f"{best}_buckets" in provs and "backbone_compile" in provs
    assert P.engine_kwargs("engine_cpp") == {"backend": "cpp"}
    assert P.engine_kwargs("engine_cpp_compile") == {"backend": "cpp", "compile": True}
    assert P.engine_kwargs("engine_cpp_buckets") == {"backend": "cpp", "compile": True, "buckets": True}
    assert P.engine_kwargs("engine_cuda_graphs") == {"backend": "cuda", "compile": "reduce-overhead"}
    monkeypatch.setenv("BRANCHYNET_BENCH_COMPILE_MODE", "max-autotune")
    assert P.engine_kwargs("engine_torch_compile") == {"backend": "torch", "compile": "max-autotune"}
    # B-LeNet's paper profile: every row reaches exit 0, 5.7 % reach exit 1.
    assert P.reach_fractions([0.943, 0.057]) == pytest.approx([1.0, 0.057])
    assert P.segment_rows(256, [0.943, 0.057]) == [(256, 1.0), (15, 1.0)]
    rows = P.segment_rows(1, [0.943, 0.057])  # one row in 5.7 % of the calls
    assert rows[0] == (1, 1.0) and rows[1][0] == 1 and rows[1][1] == pytest.approx(0.057)
