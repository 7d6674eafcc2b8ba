"""The engine on a GPU: every backend gives the per-sample rule's answers, and an engine
call synchronises with the host only at the survivor-count read-backs."""

import copy
import importlib.util
import warnings

import pytest
import torch

import branchynet as bn
from branchynet import EarlyExitEngine, entropy
from branchynet._build import env_flag
from branchynet.ops import _verify, available_backends

from test_engine import random_model, rule_by_hand

pytestmark = pytest.mark.cuda

GPU_BACKENDS = ["cuda", "triton", "torch"]


def _need(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # On a GPU machine a missing fused backend is a broken build, not a reason to skip
    # (every case would then skip and the suite pass with no kernel run), unless it is
    # declared: BRANCHYNET_EXPECT_NO_CUDA_EXT=1, or Triton not installed.
    if backend == "cuda" and env_flag("BRANCHYNET_EXPECT_NO_CUDA_EXT"):
        pytest.skip("BRANCHYNET_EXPECT_NO_CUDA_EXT=1")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    assert backend in available_backends("cuda"), f"backend {backend!r} missing on a GPU machine"
    # A backend failing its first-use check would be swapped for the next one, and these
    # tests would pass on that one.
    assert _verify.passes(backend, torch.device("cuda")), f"{backend!r} failed its first-use check"


def _midpoint_thresholds(model, x, ranks):
    with torch.no_grad():
        outs = model(x)
    ts = []
    for n, r in enumerate(ranks):
        h = entropy(outs[n]).sort().values
        ts.append(float((h[r] + h[r + 1]) / 2))
    return ts


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("b", [1, 7, 300, 4097])
def test_engine_equals_rule_on_gpu(backend, b):
    _need(backend)
    model = random_model(11, num_exits=3, dtype=torch.float32).cuda().eval()
    x = torch.randn(b, 12, device="cuda", generator=torch.Generator("cuda").manual_seed(b))
    ranks = [max(0, b // 3 - 1), max(0, b // 2 - 1)] if b > 1 else [0, 0]
    t = _midpoint_thresholds(model, x, ranks) if b > 2 else [0.5, 0.5]
    res = EarlyExitEngine(model, t, backend=backend)(x)
    if b <= 300:  # the rule, one sample at a time, on a CPU copy of the model
        want = rule_by_hand(copy.deepcopy(model).cpu(), x.cpu(), t)
        for i, (n, pred, ent, z) in enumerate(want):
            assert res.exit[i].item() == n and res.pred[i].item() == pred, f"row {i}"
            torch.testing.assert_close(res.logits[i].cpu(), z, rtol=1e-4, atol=1e-4)
    # all backends agree with the torch backend on the GPU, whatever B
    ref = EarlyExitEngine(model, t, backend="torch")(x)
    assert torch.equal(res.exit, ref.exit) and torch.equal(res.pred, ref.pred)
    torch.testing.assert_close(res.entropy, ref.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_engine_syncs_only_at_count_readbacks(backend):
    _need(backend)
    model = bn.models.b_alexnet(num_classes=10).cuda().eval()
    x = torch.randn(256, 3, 32, 32, device="cuda")
    t = _midpoint_thresholds(model, x, [99, 199])
    eng = EarlyExitEngine(model, t, backend=backend)
    eng(x)  # warm-up: lazy initialisation (cuDNN, Triton compilation) may sync
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            res = eng(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # one read-back per side branch that still had samples in flight
    expected = sum(1 for n in range(model.num_exits - 1) if sum(res.counts[n:]) > 0)
    assert len(syncs) == expected, [str(w.message) for w in syncs]
