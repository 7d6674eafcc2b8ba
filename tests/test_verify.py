"""The first-use check of the fused backends (branchynet.ops._verify)."""

import warnings

import pytest
import torch

from branchynet import EarlyExitEngine, ops, testing
from branchynet.ops import _backends, _verify

needs_cpp = pytest.mark.skipif("cpp" not in ops.available_backends("cpu"), reason="branchynet._C is not built")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(_verify.ENV, raising=False)
    _verify.reset()
    yield
    _verify.reset()


def _break_cpp_pred(monkeypatch):
    """The cpp backend with a wrong prediction for every leaving row."""
    real = _backends.implementation

    def step(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy, criterion, last):
        res = real("cpp")[0](logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy,
                             criterion, last)
        out_pred[out_exit == exit_index] += 1
        return res

    def implementation(backend):
        return (step, real("cpp")[1]) if backend == "cpp" else real(backend)

    monkeypatch.setattr(_backends, "implementation", implementation)


@needs_cpp
def test_a_correct_backend_passes_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", "cpu") == "cpp"
        assert ops.resolve_backend("cpp", "cpu") == "cpp"


@needs_cpp
def test_wrong_answers_warn_once_naming_the_backend_and_fall_back(monkeypatch):
    _break_cpp_pred(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"the 'cpp' exit-op backend failed its first-use check.*pred differs"):
        assert ops.resolve_backend("auto", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device: no second warning
        assert ops.resolve_backend("auto", "cpu") == "torch"
        assert ops.resolve_backend("cpp", "cpu") == "torch"  # named, it falls back too
        # The engine resolves through the same path and so runs the reference instead.
        from test_engine import random_model

        model = random_model(3, num_exits=2, dtype=torch.float32).eval()
        eng = EarlyExitEngine(model, [0.5], backend="auto")
        assert eng.backend_for("cpu") == "torch"


@needs_cpp
def test_a_backend_that_raises_fails_the_check(monkeypatch):
    real = _backends.implementation

    def boom(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(_backends, "implementation", lambda b: (boom, real(b)[1]) if b == "cpp" else real(b))
    with pytest.warns(RuntimeWarning, match=r"'cpp'.*raised RuntimeError: no kernel image"):
        assert ops.resolve_backend("auto", "cpu") == "torch"


@needs_cpp
def test_the_environment_variable_turns_the_check_off(monkeypatch):
    _break_cpp_pred(monkeypatch)
    monkeypatch.setenv(_verify.ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", "cpu") == "cpp"


@needs_cpp
def test_a_wrong_direct_entry_fails_the_check_and_the_engine_falls_back(monkeypatch):
    # The engine's bound op calls the extension's exit_step_direct, not the dispatcher op
    # the rest of the check runs: a fault in its own argument handling must show too.
    from types import SimpleNamespace

    from test_engine import random_model

    real = ops._EXT
    sample = testing.sample_logits(64, 10, torch.float32, "cpu", 0, special=True)
    assert testing.compare_bound(_backends.bound("cpp", torch.device("cpu")).step, sample, 0, 0.5) is None

    def wrong(*args):
        res = real.exit_step_direct(*args)
        if len(res) == 7:  # the first exit: the outputs it allocated come back
            res[4][res[5] == 0] += 1  # a wrong prediction for every row leaving there
        return res

    monkeypatch.setattr(_backends, "EXT", SimpleNamespace(exit_step_direct=wrong, has_cuda=real.has_cuda))
    model = random_model(3, num_exits=2, dtype=torch.float32).eval()
    eng = EarlyExitEngine(model, [0.5], backend="auto")
    with pytest.warns(RuntimeWarning, match=r"'cpp'.*the bound op \(the engine's\).*pred differs"):
        assert eng.backend_for("cpu") == "torch"


def test_unchecked_triton_release_warns_once_when_its_kernels_go_to_a_gpu(monkeypatch):
    pytest.importorskip("triton")
    from branchynet.kernels import exit_step as tk
    from branchynet.ops import _backends

    assert tk.triton_checked("3.8.0") and tk.triton_checked("3.9.1+git1234")
    assert not tk.triton_checked("3.10.0") and not tk.triton_checked("3.7.1")
    monkeypatch.setattr(_backends, "TRITON", tk)
    monkeypatch.setattr(tk, "triton_checked", lambda version=None: False)
    monkeypatch.setattr(_backends, "_TRITON_WARNED", False)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="outside the versions"):
        assert _backends._note_unchecked_triton("triton", cuda) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backends._note_unchecked_triton("triton", cuda)  # once per process
        monkeypatch.setattr(_backends, "_TRITON_WARNED", False)
        _backends._note_unchecked_triton("cpp", torch.device("cpu"))  # other backends: silent
        _backends._note_unchecked_triton("triton", torch.device("cpu"))  # the interpreter: silent
