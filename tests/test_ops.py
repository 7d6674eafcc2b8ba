"""The public exit op's argument checks (every backend shares them)."""

import pytest
import torch

from branchynet.ops import exit_step, gather_rows


def buffers(b, c, dtype=torch.float32):
    return (torch.empty(b, c, dtype=dtype), torch.empty(b, dtype=torch.int64),
            torch.empty(b, dtype=torch.int64), torch.empty(b))


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
    out = buffers(2, 2)
    surv, surv_rows, count = exit_step(logits, torch.arange(2), torch.tensor(0.3), 0, *out, backend="torch")
    assert int(count) == 1 and int(surv[0]) == 1 and out[2][0] == 0
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        gather_rows(torch.zeros(3, 2), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="index is on"):
        gather_rows(torch.zeros(3, 2), torch.zeros(1, dtype=torch.int64, device="meta"))
