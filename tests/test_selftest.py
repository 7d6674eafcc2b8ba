"""``branchynet selftest``: the table, the exit status, and that a wrong backend fails it.

On the CPU: torch and cpp, and triton under the interpreter (conftest sets
TRITON_INTERPRET=1 without a GPU) on a small grid; the GPU case runs the quick grid on
every GPU and is skipped without one.
"""

import pytest
import torch

from branchynet import cli, ops, selftest, testing

# A small grid: C = 1 (every score 0), 10 (the CUDA/Triton small-C kernels) and 300;
# K = 0, 1, 7 (odd) and 70 (several Triton programs). Float32 and bfloat16.
GRID = dict(dtypes=(torch.float32, torch.bfloat16), classes=(1, 10, 300), batches=(0, 1, 7, 70))
CPU = ops.available_backends("cpu")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes


@pytest.fixture(scope="module")
def cpu_rows():
    # One run for both host backends: the three networks (and the per-sample rule on
    # them) are built once.
    return selftest.run(["cpu"], [b for b in ("cpp", "torch") if b in CPU], **GRID)


def _check_rows(rows, backend, models):
    checks = [r.check for r in rows if r.backend == backend]
    assert checks == ["exit_step float32", "exit_step bfloat16", "exit_step float32 strided out",
                      "gather_rows", *(f"engine {m}" for m in models)]
    for r in rows:
        assert r.ok, (r.check, r.failures[:3])
        assert r.device == "cpu" and r.cases > 0
    ex = {r.check: r for r in rows if r.backend == backend}
    # 3 class counts x 4 batches x 4 criteria (patience too) x 4 exit patterns; strided:
    # K > 0 only.
    assert ex["exit_step float32"].cases == 192 and ex["exit_step float32 strided out"].cases == 144
    assert ex["engine b_lenet"].cases == 16  # one case per sample
    if "b_resnet110" in models:
        assert ex["engine b_resnet110"].cases == 3
    assert ex["exit_step float32"].worst < 1e-5


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in CPU])
def test_selftest_passes_on_the_cpu(backend, cpu_rows):
    rows = [r for r in cpu_rows if r.backend == backend]
    _check_rows(rows, backend, selftest.MODELS)
    lines = []
    assert selftest.report(cpu_rows, lines.append) == 0, "\n".join(lines)
    table = lines[0].splitlines()
    assert table[0].split("|")[1:-1] == [" device ", " backend ", " check                         ",
                                          " result ", " worst error ", " cases ", " seconds "]
    assert sum(f"| cpu    | {backend} " in line and "| pass   |" in line for line in table[2:]) == len(rows)
    assert lines[-1] == f"{len(cpu_rows)} of {len(cpu_rows)} checks passed"


@pytest.mark.skipif("triton" not in CPU, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_selftest_passes_for_triton_under_the_interpreter():
    # The interpreter runs every program as Python: the two small networks only
    # (`branchynet selftest` itself runs B-ResNet-110 too).
    models = ("b_lenet", "b_alexnet")
    rows = selftest.run(["cpu"], ["triton"], models=models, **{**GRID, "classes": (1, 10, 100)})
    _check_rows(rows, "triton", models)


@pytest.mark.skipif("cpp" not in CPU, reason="branchynet._C is not built")
def test_a_wrong_backend_fails_the_selftest(monkeypatch):
    real = testing.backend_impl

    def wrong_entropy(logits, rows, threshold, exit_index, ol, op, oe, oh, criterion, last):
        res = real("cpp")[0](logits, rows, threshold, exit_index, ol, op, oe, oh, criterion, last)
        oh[oe == exit_index] += 1e-3  # a small, systematic error on the rows that leave
        return res

    monkeypatch.setattr(testing, "backend_impl", lambda b: (wrong_entropy, real(b)[1]) if b == "cpp" else real(b))
    lines = []
    code = selftest.main(["cpu"], ["cpp", "torch"], print_fn=lines.append, models=("b_lenet",), **GRID)
    assert code == 1
    out = "\n".join(lines)
    assert "| cpu    | cpp     | exit_step float32             | FAIL" in out
    assert "| cpu    | torch   | exit_step float32             | pass" in out
    assert "FAIL cpu cpp exit_step float32: C=1 K=1 entropy T=inf: entropy off by 0.001" in out
    assert lines[-1].endswith("3 FAILED")  # the three exit_step checks of cpp


def test_cli_selftest_exit_status(monkeypatch, capsys):
    # The CLI on a tiny grid: a pass returns 0, an unavailable backend asked for by name
    # is a failure (non-zero), never a silent pass.
    monkeypatch.setattr(selftest, "DTYPES", (torch.float32,))
    monkeypatch.setattr(selftest, "CLASSES", (10,))
    monkeypatch.setattr(selftest, "BATCHES", (7,))
    monkeypatch.setattr(selftest, "MODELS", ("b_lenet",))
    assert cli.main(["selftest", "--device", "cpu", "--backend", "torch"]) == 0
    assert "4 of 4 checks passed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        cli.main(["selftest", "--device", "cpu", "--backend", "cuda"])
    assert err.value.code == 1
    assert "FAIL - cuda available: backend: not available on cpu" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_selftest_passes_on_the_gpu():
    lines = []
    devs = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    code = selftest.main(devs, None, quick=True, print_fn=lines.append)
    assert code == 0, "\n".join(lines)
    # The fused GPU backends were there and tested, including the host-sync check.
    out = lines[0]
    assert "| cuda" in out and "engine host syncs" in out
    assert " cuda    |" in out or " triton  |" in out
