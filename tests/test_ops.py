"""The public exit op's argument checks (every backend shares them)."""

import pytest
import torch

from branchynet.exits import exit_scores
from branchynet.ops import available_backends, exit_step, gather_rows

CPU_BACKENDS = available_backends("cpu")  # triton only under TRITON_INTERPRET=1 (conftest)


def buffers(b, c, dtype=torch.float32):
    return (torch.empty(b, c, dtype=dtype), torch.empty(b, dtype=torch.int64),
            torch.empty(b, dtype=torch.int64), torch.empty(b))


def poisoned(b, c, dtype=torch.float32):
    return (torch.full((b, c), float("nan"), dtype=dtype), torch.full((b,), -1, dtype=torch.int64),
            torch.full((b,), -1, dtype=torch.int64), torch.full((b,), -3.0))


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(logits=torch.zeros(3, 0)), ValueError, "at least one class"),
    (dict(logits=torch.zeros(3)), ValueError, "rank 2"),
    (dict(logits=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "logits must be"),
    (dict(rows=torch.arange(2)), ValueError, "rows must be int64 of shape"),
    (dict(threshold=None), TypeError, "threshold must be a number"),
    (dict(threshold=torch.tensor([0.1, 0.2])), ValueError, "threshold must be one number"),
    (dict(threshold=float("nan")), ValueError, "threshold must be >= 0"),
    (dict(threshold=-1.0), ValueError, "threshold must be >= 0"),
    (dict(out=buffers(3, 5)), ValueError, "out_logits must have shape"),
    (dict(out=buffers(3, 4, torch.float64)), TypeError, "out_logits dtype"),
    (dict(criterion="confidence"), ValueError, "criterion"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, err, msg):
    logits = kwargs.get("logits", torch.zeros(3, 4))
    rows = kwargs.get("rows", torch.arange(3))
    out = kwargs.get("out", buffers(3, logits.shape[1] if logits.dim() == 2 else 4))
    with pytest.raises(err, match=msg):
        exit_step(logits, rows, kwargs.get("threshold", 0.5), 0, *out,
                  criterion=kwargs.get("criterion", "entropy"), backend=kwargs.get("backend", "torch"))


def test_tensor_threshold_and_gather_checks():
    logits = torch.tensor([[5.0, 0.0], [0.0, 0.0]])
    out = poisoned(2, 2)
    surv, surv_rows, count = exit_step(logits, torch.arange(2), torch.tensor(0.3), 2, *out, backend="torch")
    # Row 0 (entropy 0.04) leaves at exit 2; row 1 (log 2) stays and keeps the poison.
    assert int(count) == 1 and int(surv[0]) == 1 and out[2].tolist() == [2, -1]
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        gather_rows(torch.zeros(3, 2), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="index is on"):
        gather_rows(torch.zeros(3, 2), torch.zeros(1, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rows", [[0, 3, 1], [0, -1, 1]], ids=["past_B", "negative"])
def test_rows_outside_the_buffers_are_an_error_on_every_backend(backend, rows):
    # B = 3 output rows: 3 and -1 are outside. The CUDA kernel would assert on the
    # device, Triton would write out of bounds.
    out = poisoned(3, 4)
    with pytest.raises(ValueError, match=r"rows must index the B = 3 rows"):
        exit_step(torch.randn(3, 4), torch.tensor(rows), 10.0, 1, *out, backend=backend)
    assert (out[2] == -1).all(), "nothing may be written before the error"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("criterion", ["max_prob", "margin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_confident_rows_keep_their_max_prob_and_margin_scores(backend, criterion, dtype):
    # logits [20, 0, -1]: 1 - p1 = 2.8e-9 and 1 - (p1 - p2) = 4.9e-9, far below fp32's
    # 1 - 6e-8. Computed as 1 - e1 / S in fp32 the score is 0 and the row leaves at any
    # threshold; from the sum of the other terms it keeps its value on every backend.
    logits = torch.tensor([[20.0, 0.0, -1.0], [0.0, -1.0, 20.0]], dtype=dtype)
    score = float(exit_scores(logits.double(), criterion)[0][0])
    assert 2e-9 < score < 6e-9
    for t, leaves in ((score * (1 - 1e-3), False), (score * (1 + 1e-3), True)):
        out = poisoned(2, 3, dtype)
        _, _, count = exit_step(logits, torch.arange(2), t, 1, *out, criterion=criterion, backend=backend)
        assert int(count) == (0 if leaves else 2), (t, score)
        assert out[2].tolist() == ([1, 1] if leaves else [-1, -1])
        if leaves:
            assert out[1].tolist() == [0, 2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gather_index_outside_the_features_is_an_error_on_every_backend(backend):
    with pytest.raises(ValueError, match=r"index must be in \[0, 3\), got \[3\]"):
        gather_rows(torch.zeros(3, 2), torch.tensor([0, 3]), backend=backend)
