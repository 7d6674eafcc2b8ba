"""Stages that carry several tensors, and the patience rule, through the engine's loop.

The reference is the paper's rule one sample at a time (branchynet.testing.per_sample_rule,
written without the engine or the exit op) and PABEE's patience rule written from every
exit's logits (branchynet.testing.patience_rule).
"""

import pytest
import torch
from torch import nn

from branchynet import BranchyNet, EarlyExitEngine
from branchynet.ops import available_backends
from branchynet.testing import compare_engine, patience_rule, per_sample_rule, random_mlp, split_thresholds

# The PyTorch reference and the C++ kernel where this torch loads the extension.
BACKENDS = [b for b in available_backends("cpu") if b in ("torch", "cpp")]


class MaskedStage(nn.Module):
    """(h [B, S, D], mask [B, S], scale [D]) -> the same, h mixed and masked; ``scale``
    has no batch dimension and must pass through compaction as it is."""

    def __init__(self, d: int, first: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.first = first

    def forward(self, state):
        if self.first:  # the model's keyword arguments as one dict
            state = (state["features"], state["mask"], state["scale"])
        h, mask, scale = state
        h = torch.tanh(self.lin(h)) * scale * mask.unsqueeze(-1)
        return h, mask, scale


class MaskedMean(nn.Module):
    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, state):
        h, mask, _ = state
        m = mask.unsqueeze(-1)
        return self.fc((h * m).sum(1) / m.sum(1).clamp_min(1))


def tuple_model(seed=0, n=3, d=8, c=5):
    torch.manual_seed(seed)
    stages = [MaskedStage(d, first=(i == 0)) for i in range(n)]
    model = BranchyNet(stages, [MaskedMean(d, c) for _ in range(n)], num_classes=c)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # scores spread over every exit
    return model.eval()


def inputs(b, s=6, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    mask[:, 0] = 1
    # scale [d]: with d == s == b it would look like a batch tensor: keep b != d here
    return {"features": torch.randn(b, s, d, generator=g), "mask": mask, "scale": torch.full((d,), 1.1)}


@pytest.mark.parametrize("b", [1, 5, 13])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keyword_state_equals_per_sample_rule(b, backend):
    model = tuple_model()
    x = inputs(b)
    th = split_thresholds(model, x) if b > 2 else [0.5, 0.5]
    eng = EarlyExitEngine(model, th, backend=backend)
    res = eng(**x)
    want = per_sample_rule(model, x, th)
    assert [f for f, _ in compare_engine(res, want)] == [None] * b
    assert sum(res.counts) == b
    one = eng.per_sample(**x)
    assert torch.equal(one.exit, res.exit) and torch.equal(one.pred, res.pred)
    # x as one dict, positionally: the same answers
    again = eng(x)
    assert torch.equal(again.exit, res.exit) and torch.equal(again.pred, res.pred)


def test_state_passes_non_batch_tensors_and_keeps_one_tensor_gather():
    model = tuple_model()
    eng = EarlyExitEngine(model, [10.0, 10.0])  # entropy of 5 classes < log 5 < 10: all leave at 0
    res = eng(**inputs(7))
    assert res.counts[0] == 7
    seen = []
    stage = model.stages[1]
    hook = stage.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        eng.thresholds = [0.0, 0.0]  # nobody leaves early: stage 1 sees every row
        eng(**inputs(7))
    finally:
        hook.remove()
    h, mask, scale = seen[0]
    assert h.shape[0] == 7 and mask.shape == (7, 6) and scale.shape == (8,)
    # A one-tensor model keeps the bound op's own gather: no state handling on its path.
    mlp = EarlyExitEngine(random_mlp(), [0.1, 0.1])
    regions, gather = mlp._plan(torch.device("cpu"), False)
    assert gather is mlp._op(torch.device("cpu")).gather


def test_state_errors():
    eng = EarlyExitEngine(tuple_model(), [0.1, 0.1])
    with pytest.raises(TypeError, match="either x or"):
        eng(torch.zeros(2, 6, 8), mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="first tensor gives B"):
        eng(features=None)
    x = inputs(3)
    x["mask"] = x["mask"].to("meta")
    with pytest.raises(ValueError, match="device"):
        eng(**x)
    eng.model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        eng(**inputs(2))


def test_state_compiled_equals_eager():
    model = tuple_model()
    x = inputs(9)
    th = split_thresholds(model, x)
    want = EarlyExitEngine(model, th)(**x)
    got = EarlyExitEngine(model, th, compile={"backend": "eager"})(**x)
    assert torch.equal(got.exit, want.exit) and torch.equal(got.pred, want.pred)
    torch.testing.assert_close(got.logits, want.logits)


@pytest.mark.parametrize("patience", [1, 2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patience_equals_rule_from_every_exit(patience, backend):
    model = random_mlp(seed=3, num_exits=6, classes=3)
    x = torch.randn(257, 12, generator=torch.Generator().manual_seed(0))
    eng = EarlyExitEngine(model, criterion="patience", patience=patience, backend=backend)
    res = eng(x)
    with torch.no_grad():
        exits = model(x)
    want = patience_rule(exits, patience)
    assert res.exit.tolist() == [e for e, _ in want]
    assert res.pred.tolist() == [p for _, p in want]
    # every row's logits are those of the exit it took
    got = torch.stack([exits[e][i] for i, (e, _) in enumerate(want)])
    torch.testing.assert_close(res.logits, got, rtol=1e-5, atol=1e-5)
    assert sum(res.counts) == 257 and len(set(res.exit.tolist())) > 1
    one = eng.per_sample(x[:40])
    assert one.exit.tolist() == [e for e, _ in want[:40]]


@pytest.mark.parametrize("buckets", [False, True], ids=["dynamic", "buckets"])
def test_patience_compiled_equals_the_rule(buckets):
    # The op (with its mutated patience state) inside compiled regions: functionalised
    # by aot_eager as inductor would; the bucketed regions run it outside the graph.
    model = random_mlp(seed=3, num_exits=6, classes=3)
    x = torch.randn(257, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = patience_rule(model(x), 2)
    eng = EarlyExitEngine(model, criterion="patience", patience=2, compile={"backend": "aot_eager"},
                          buckets=buckets)
    for rows in (257, 100):  # a second batch size: the state is the call's own
        res = eng(x[:rows])
        assert res.exit.tolist() == [e for e, _ in want[:rows]]
        assert res.pred.tolist() == [p for _, p in want[:rows]]
    assert len(set(res.exit.tolist())) > 2


def test_patience_never_takes_a_nan_row_early():
    model = random_mlp(seed=3, num_exits=6, classes=3)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    x[5, 3] = float("nan")  # NaN logits at every exit
    res = EarlyExitEngine(model, criterion="patience", patience=1)(x)
    with torch.no_grad():
        want = patience_rule(model(x), 1)
    assert res.exit.tolist() == [e for e, _ in want]
    assert int(res.exit[5]) == 5 and int((res.exit < 5).sum()) > 10


def test_patience_on_a_state_of_several_tensors():
    model = tuple_model(n=4, c=2)
    x = inputs(31)
    eng = EarlyExitEngine(model, criterion="patience", patience=1)
    res = eng(**x)
    with torch.no_grad():
        exits = model(**x)
    want = patience_rule(exits, 1)
    assert res.exit.tolist() == [e for e, _ in want]
    assert res.pred.tolist() == [p for _, p in want]


def test_patience_arguments():
    model = random_mlp()
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        EarlyExitEngine(model, criterion="patience")
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        EarlyExitEngine(model, criterion="patience", patience=0)
    eng = EarlyExitEngine(model, [0.1, 0.1], patience=2)
    assert eng.criterion == "entropy"
    eng.criterion = "patience"
    assert eng(torch.randn(5, 12)).counts[0] == 0  # cnt_0 = 0 < P: nobody leaves at exit 0


def test_choose_patience_scores_every_p_as_the_engine_decides():
    from branchynet.calibrate import collect_exit_outputs
    from branchynet.calibrate.patience import choose_patience

    model = random_mlp(seed=3, num_exits=6, classes=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 12, generator=g)
    with torch.no_grad():
        y = model(x)[-1].argmax(1)
    y[:30] = torch.randint(0, 3, (30,), generator=g)  # the final exit is not always right
    table = collect_exit_outputs(model, torch.utils.data.TensorDataset(x, y))
    choice = choose_patience(table, max_drop=0.05)
    assert [r[0] for r in choice.table] == [1, 2, 3, 4]
    for p, acc, _, fractions in choice.table:
        res = EarlyExitEngine(model, criterion="patience", patience=p)(x)
        assert res.exit_fractions == pytest.approx(fractions)
        assert float((res.pred == y).float().mean()) == pytest.approx(acc)
    final = float((table.pred[-1] == y).float().mean())
    assert choice.accuracy >= final - 0.05
    cheaper = [r for r in choice.table if r[2] < [c for c in choice.table if c[0] == choice.patience][0][2]]
    assert all(r[1] < final - 0.05 for r in cheaper)  # nothing cheaper meets the floor
    with pytest.raises(ValueError, match="2 side exits"):
        choose_patience(collect_exit_outputs(random_mlp(num_exits=2), torch.utils.data.TensorDataset(x, y)))


def test_x_by_keyword_still_means_the_input_tensor():
    model = random_mlp()
    x = torch.randn(6, 12)
    eng = EarlyExitEngine(model, [0.3, 0.3])
    a, b = eng(x), eng(x=x)
    assert torch.equal(a.exit, b.exit) and torch.equal(a.pred, b.pred)
    assert torch.equal(eng.per_sample(x=x).exit, a.exit)
