"""The engine with compiled stages (``compile=``) and bucket padding (``buckets=``),
against the eager engine.

Compiles are costly (seconds each): one inductor engine is shared by the module, and the
padding logic, which does not depend on the compiler backend, is checked through
dynamo's ``eager`` backend for every survivor count.
"""

import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from branchynet import EarlyExitEngine, entropy, testing
from branchynet.ops import available_backends

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


def mlp(seed=0, num_exits=3, width=12, classes=6, dtype=torch.float32):
    return testing.random_mlp(seed, num_exits, width, classes, dtype)


def batches(n, b, width=12, seed=0):
    """n batches whose input scales differ, so the survivor counts differ between calls."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, width, generator=g) * (0.05 + 3.0 * i / n) for i in range(n)]


def assert_same(got, want):
    assert got.counts == want.counts
    assert torch.equal(got.exit, want.exit)
    assert torch.equal(got.pred, want.pred)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)


def graphs():
    return counters["stats"]["unique_graphs"]


# --- inductor, dynamic batch ------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled():
    """(model, thresholds, compiled engine warmed for B = 64, graphs after warm-up)."""
    torch._dynamo.reset()
    model = mlp(0)
    thresholds = [1.0, 1.2]
    eng = EarlyExitEngine(model, thresholds, compile=True)
    eng.warmup([64])
    return model, thresholds, eng, graphs()


def test_compaction_does_not_recompile(compiled):
    model, thresholds, eng, after_warmup = compiled
    ref = EarlyExitEngine(model, thresholds)
    seen = set()
    for x in batches(24, 64):
        res = eng(x)
        assert_same(res, ref(x))
        seen.add(tuple(res.counts))
    # Many survivor counts at both deeper stages, and not one new graph for them.
    assert len({c[0] for c in seen}) >= 10 and len({c[1] for c in seen}) >= 5, seen
    assert graphs() == after_warmup
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_small_and_empty_batches(compiled):
    model, thresholds, eng, _ = compiled
    ref = EarlyExitEngine(model, thresholds)
    for x in batches(3, 1, seed=1) + [torch.zeros(0, 12)]:
        assert_same(eng(x), ref(x))  # one row runs uncompiled; B = 0 never reaches a stage


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exit_op_in_the_graph_without_break(backend):
    # fullgraph=True raises at the first graph break: the exit op (the dispatcher op, or
    # an override's Python implementation kept outside the graph) must not break it.
    model = mlp(1)
    eng = EarlyExitEngine(model, [0.9, 1.3], backend=backend,
                          compile={"backend": "aot_eager", "fullgraph": True})
    ref = EarlyExitEngine(model, [0.9, 1.3], backend=backend)
    for x in batches(4, 16, seed=2):
        assert_same(eng(x), ref(x))


def test_override_outside_the_graph_equals_eager():
    # backend="torch" on the CPU, where the dispatcher runs the C++ kernel: the override's
    # Python implementation runs outside the compiled stage (fullgraph still holds).
    model = mlp(1)
    eng = EarlyExitEngine(model, [0.9, 1.3], backend="torch",
                          compile={"backend": "aot_eager", "fullgraph": True})
    assert eng.backend_for("cpu") == "torch"
    ref = EarlyExitEngine(model, [0.9, 1.3], backend="torch")
    for x in batches(3, 16, seed=3):
        assert_same(eng(x), ref(x))


def test_thresholds_change_rebuilds_the_compiled_stages():
    model = mlp(2, num_exits=2)
    eng = EarlyExitEngine(model, [0.5], compile={"backend": "eager"})
    x = batches(1, 32, seed=3)[0]
    for t in (0.2, 0.7, 1.1):
        eng.thresholds = [t]
        assert_same(eng(x), EarlyExitEngine(model, [t])(x))
    eng.criterion = "max_prob"
    assert_same(eng(x), EarlyExitEngine(model, [1.1], criterion="max_prob")(x))


# --- bucket padding: every survivor count ------------------------------------------------

def thresholds_for_counts(model, x, k0, k1):
    """Thresholds under which exactly k0 rows leave at exit 0 and k1 at exit 1."""
    with torch.no_grad():
        z = model(x)
    h0 = entropy(z[0])
    order = h0.argsort()
    t0 = _between(h0[order], k0)
    stay = order[k0:]
    h1 = entropy(z[1][stay]).sort().values
    t1 = _between(h1, k1)
    return [t0, t1]


def _between(sorted_h, k):
    if k == 0:
        return 0.0
    if k == len(sorted_h):
        return float(sorted_h[-1]) + 1.0
    return float((sorted_h[k - 1] + sorted_h[k]) / 2)


@pytest.mark.parametrize("buckets", [True, (3, 5)], ids=["pow2", "3-5"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_equals_eager_for_every_survivor_count(buckets, backend):
    b = 7
    model = mlp(3)
    x = batches(1, b, seed=4)[0] * 1.5
    eng = EarlyExitEngine(model, [0.0, 0.0], backend=backend, compile={"backend": "eager"}, buckets=buckets)
    assert eng.buckets == ("pow2" if buckets is True else (3, 5))
    seen = set()
    for k0 in range(b + 1):
        for k1 in range(b - k0 + 1):
            t = thresholds_for_counts(model, x, k0, k1)
            eng.thresholds = t
            res = eng(x)
            assert_same(res, EarlyExitEngine(model, t, backend=backend)(x))
            seen.add(tuple(res.counts))
    assert len(seen) == (b + 1) * (b + 2) // 2  # every (k0, k1) split was realised


def test_padded_rows_never_reach_the_exit_op(monkeypatch):
    # Spy on the exit op: it must only ever see the real rows, never a bucket's padding.
    model = mlp(4)
    eng = EarlyExitEngine(model, [0.9, 1.2], backend="torch", compile={"backend": "eager"}, buckets=[8])
    op = eng._op(torch.device("cpu"))
    sizes = []

    def spy(z, rows, *args):
        assert z.shape[0] == rows.shape[0]
        sizes.append(z.shape[0])
        return op.step(z, rows, *args)

    eng._ops[torch.device("cpu")] = op._replace(step=spy)
    x = batches(1, 5, seed=5)[0] * 2
    res = eng(x)
    assert_same(res, EarlyExitEngine(model, [0.9, 1.2], backend="torch")(x))
    assert sizes[0] == 5 and sizes == [5, 5 - res.counts[0], 5 - sum(res.counts[:2])][:len(sizes)]
    assert all(s < 8 for s in sizes)


def test_padded_inductor_engine():
    model = mlp(5, num_exits=2)
    eng = EarlyExitEngine(model, [1.0], compile=True, buckets=[4, 8])
    eng.warmup([8])
    before = graphs()
    x = batches(1, 8, seed=6)[0] * 1.5
    with torch.no_grad():
        h0 = entropy(model(x)[0]).sort().values
    seen = set()
    for k0 in range(9):
        t = [_between(h0, k0)]
        eng.thresholds = t  # not a constant of the padded graphs: no rebuild
        res = eng(x)
        assert_same(res, EarlyExitEngine(model, t)(x))
        seen.add(res.counts[0])
    assert seen == set(range(9))
    assert graphs() == before  # every bucket was compiled by warmup


# --- arguments ---------------------------------------------------------------------------

def test_compile_arguments_refused_clearly():
    model = mlp(0)
    with pytest.raises(ValueError, match="compile must be True, False, one of"):
        EarlyExitEngine(model, [0.1, 0.2], compile="fast")
    with pytest.raises(ValueError, match=r"unsupported torch.compile arguments \['dynamic'\]"):
        EarlyExitEngine(model, [0.1, 0.2], compile={"dynamic": True})
    with pytest.raises(TypeError, match="compile must be a bool, a mode string or a dict"):
        EarlyExitEngine(model, [0.1, 0.2], compile=3)
    with pytest.raises(ValueError, match="buckets pad the batches of compiled stages"):
        EarlyExitEngine(model, [0.1, 0.2], buckets=True)
    with pytest.raises(ValueError, match="buckets must be a non-empty sequence of ints >= 1"):
        EarlyExitEngine(model, [0.1, 0.2], compile=True, buckets=[4, 0])
    with pytest.raises(RuntimeError, match="build the engine with compile=True"):
        EarlyExitEngine(model, [0.1, 0.2]).warmup([8])
    eng = EarlyExitEngine(model, [0.1, 0.2], compile={"backend": "eager"})
    with pytest.raises(ValueError, match="batch_sizes must be a non-empty list of ints >= 1"):
        eng.warmup([8, 0])
    assert EarlyExitEngine(model, [0.1, 0.2], compile="reduce-overhead").buckets == "pow2"
    assert EarlyExitEngine(model, [0.1, 0.2], compile="max-autotune").buckets is None


def test_compiled_engine_checks_every_branch_once():
    model = mlp(0, num_exits=2)
    model.branches[1] = nn.Linear(12, 5)  # C differs between exits
    with pytest.raises(ValueError, match="branch 1 returns 5 classes but branch 0 returns 6"):
        EarlyExitEngine(model, [0.5], compile={"backend": "eager"})(torch.randn(4, 12))


def test_bucket_rule():
    eng = EarlyExitEngine(mlp(0), [0.1, 0.2], compile={"backend": "eager"}, buckets=[3, 5])
    assert [eng._bucket(k) for k in (1, 3, 4, 5, 6, 11)] == [3, 3, 5, 5, 10, 15]
    eng = EarlyExitEngine(mlp(0), [0.1, 0.2], compile={"backend": "eager"}, buckets=True)
    assert [eng._bucket(k) for k in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]


# --- GPU: CUDA graphs through torch's own machinery ---------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_reduce_overhead_buckets_on_gpu(backend):
    model = mlp(6).cuda()
    eng = EarlyExitEngine(model, [0.0, 0.0], backend=backend, compile="reduce-overhead")
    eng.warmup([16])
    x = batches(1, 16, seed=7)[0].cuda() * 1.5
    for k0 in range(0, 17, 3):
        for k1 in (0, (16 - k0) // 2):
            t = thresholds_for_counts(model, x, k0, k1)
            eng.thresholds = t
            assert_same(eng(x), EarlyExitEngine(model, t, backend=backend)(x))


@pytest.mark.cuda
def test_compiled_dynamic_on_gpu():
    model = mlp(7).cuda()
    eng = EarlyExitEngine(model, [1.0, 1.2], compile="max-autotune-no-cudagraphs")
    eng.warmup([64])
    before = graphs()
    ref = EarlyExitEngine(model, [1.0, 1.2])
    for x in batches(8, 64, seed=8):
        x = x.cuda()
        assert_same(eng(x), ref(x))
    assert graphs() == before
    assert math.isfinite(before)


def test_demo_compile_flag_parses(capsys):
    from branchynet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).compile is False
    assert parser.parse_args(["demo", "--compile"]).compile is True
    assert parser.parse_args(["demo", "--compile", "max-autotune"]).compile == "max-autotune"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--compile", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_padded_engine_follows_any_survivor_order():
    # The fused GPU kernels compact the survivors in whatever order their atomics ran:
    # the gather must follow that order even when every row stays and the batch is
    # already a bucket size (nothing to pad). A spy reverses the (valid) order here.
    model = mlp(6)
    thresholds = [0.0, 1.2]  # nobody leaves at the first exit
    eng = EarlyExitEngine(model, thresholds, backend="torch", compile={"backend": "eager"}, buckets=[4, 8])
    op = eng._op(torch.device("cpu"))

    def reversed_order(z, rows, threshold, n, out, cid, last):
        survivors, survivor_rows, count = op.step(z, rows, threshold, n, out, cid, last)
        k = int(count)
        return (torch.cat([survivors[:k].flip(0), survivors[k:]]),
                torch.cat([survivor_rows[:k].flip(0), survivor_rows[k:]]), count)

    eng._ops[torch.device("cpu")] = op._replace(step=reversed_order)
    for x in batches(3, 4, seed=6) + batches(2, 8, seed=7):
        assert_same(eng(x), EarlyExitEngine(model, thresholds, backend="torch")(x))
