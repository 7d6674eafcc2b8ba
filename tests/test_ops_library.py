"""The ops as torch sees them (branchynet/ops/_library.py): one schema each, one kernel
per device, the PyTorch implementation where nothing is compiled."""

import json
import os
import subprocess
import sys

import pytest
import torch

import branchynet  # noqa: F401  (defines the ops)
from branchynet import ops
from branchynet.ops import _backends, _library

HAS_EXT = ops._EXT is not None


def _has_kernel(qualname: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


def test_one_schema_per_op():
    assert str(torch.ops.branchynet.exit_step.default._schema) == "branchynet::" + _library.EXIT_STEP_SCHEMA
    assert str(torch.ops.branchynet.gather_rows.default._schema) == "branchynet::" + _library.GATHER_ROWS_SCHEMA
    # No second door: the namespace holds these two ops and no other.
    names = {n for n in dir(torch.ops.branchynet) if not n.startswith("_")}
    assert {"exit_step", "gather_rows"} <= names
    assert not names & {"exit_step_py", "exit_step_direct"}


@pytest.mark.parametrize("qualname", ["branchynet::exit_step", "branchynet::gather_rows"])
def test_kernels_registered_per_device(qualname):
    assert _has_kernel(qualname, "CompositeExplicitAutograd")  # the PyTorch implementation
    assert _has_kernel(qualname, "Meta")  # the fake
    assert _has_kernel(qualname, "CPU") == HAS_EXT  # the C++ kernel, where built
    # CUDA: the extension's kernels, or else the Triton ones attached through torch.library.
    assert _has_kernel(qualname, "CUDA") == (_backends.ext_has_cuda() or _backends.TRITON is not None)


def test_argument_order_is_the_schemas_everywhere():
    import inspect

    want = [a.name for a in torch.ops.branchynet.exit_step.default._schema.arguments]
    impls = [ops.implementation("torch")[0], _library.exit_step_fake]
    if _backends.TRITON is not None:
        impls.append(_backends.TRITON.exit_step_triton)
    for fn in impls:
        assert list(inspect.signature(fn).parameters) == want, fn
    assert list(inspect.signature(ops.exit_step).parameters)[:len(want) - 2] == want[:-2]


def test_opcheck_dispatched_op():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    rows = torch.tensor([6, 0, 3, 1, 5, 2, 4])
    out = (torch.zeros(9, 5), torch.zeros(9, dtype=torch.int64), torch.full((9,), -1, dtype=torch.int64),
           torch.zeros(9))
    torch.library.opcheck(torch.ops.branchynet.exit_step.default, (logits, rows, 0.8, 2, *out),
                          {"criterion": 0, "last": False})
    torch.library.opcheck(torch.ops.branchynet.gather_rows.default, (logits, rows[:3]))


_NO_EXT = r"""
import json, sys, torch


class NoExtension:  # the extension "is not installed": its import fails
    def find_spec(self, name, path=None, target=None):
        if name == "branchynet._C":
            raise ModuleNotFoundError("No module named 'branchynet._C'", name=name)


sys.meta_path.insert(0, NoExtension())
from branchynet import entropy, ops
g = torch.Generator().manual_seed(0)
logits = torch.randn(7, 5, generator=g) * 3
rows = torch.tensor([6, 0, 3, 1, 5, 2, 4])
out = (torch.zeros(9, 5), torch.zeros(9, dtype=torch.int64), torch.full((9,), -1, dtype=torch.int64), torch.zeros(9))
torch.library.opcheck(torch.ops.branchynet.exit_step.default, (logits, rows, 0.8, 2, *out), {"last": False})
s, r, c = torch.ops.branchynet.exit_step(logits, rows, 0.8, 2, *out)
leave = entropy(logits) < 0.8
print(json.dumps({
    "auto": ops.resolve_backend("auto", "cpu"),
    "cpu_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("branchynet::exit_step", "CPU"),
    "count_ok": int(c) == int((~leave).sum()),
    "written_ok": bool((out[2][rows[leave]] == 2).all()) and bool((out[2][rows[~leave]] == -1).all()),
    "gather_ok": torch.equal(torch.ops.branchynet.gather_rows(logits, r[:2]), logits[r[:2]]),
}))
"""


def test_without_the_extension_the_op_runs_the_pytorch_implementation(tmp_path):
    # A fresh interpreter whose extension "failed to load": the same op, served by the
    # PyTorch implementation (opcheck included), and auto resolves to torch.
    env = dict(os.environ, BRANCHYNET_JIT="0", BRANCHYNET_CACHE=str(tmp_path))  # no cached build either
    res = subprocess.run([sys.executable, "-c", _NO_EXT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"auto": "torch", "cpu_kernel": False, "count_ok": True, "written_ok": True,
                   "gather_ok": True}


def test_kernels_is_a_deprecated_name_for_implementation():
    # ops.kernels() shared its name with the Triton package branchynet.kernels.
    with pytest.warns(DeprecationWarning, match="use branchynet.ops.implementation"):
        got = ops.kernels("torch")
    assert got == ops.implementation("torch")
