"""The compiled extension ``branchynet._C`` (csrc/).

1. Compile checks that need no GPU: ``nvcc`` builds csrc/cuda/exit_step.cu for sm_90 and
   ``g++`` checks csrc/exit_step.cpp, both against the installed torch's headers (a CPU
   wheel ships the ATen/cuda and c10/cuda headers too). About 45 s on 2 cores.
2. The ops of the built extension against the PyTorch oracle (branchynet.ops._torch),
   on the CPU kernels whenever ``_C`` is built, and on the CUDA kernels on a GPU: one
   sample generator over device x dtype x batch x classes x criterion, poisoned output
   buffers (exactly the exiting rows must be written), extreme logits, gather with
   contiguous / channels_last / misaligned inputs, ``opcheck`` and ``torch.compile``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from branchynet.exits import exit_scores
from branchynet.config import CRITERIA
from branchynet.ops import _fake
from branchynet.ops._torch import exit_step_torch, gather_rows_torch

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCE = ROOT / "csrc" / "cuda" / "exit_step.cu"
CPP_SOURCE = ROOT / "csrc" / "exit_step.cpp"
COMPILE_TIMEOUT_S = 300  # each compile; nvcc takes ~40 s for sm_90 on 2 idle cores, 4 min on a loaded one

try:
    from branchynet import _C
except Exception:  # not built (isolated or BRANCHYNET_SKIP_EXT install), or ABI mismatch
    _C = None

if _C is not None:
    _fake.register()

HAS_OPS = _C is not None
HAS_CUDA_OPS = HAS_OPS and _C.has_cuda() and torch.cuda.is_available()

needs_ops = pytest.mark.skipif(
    not HAS_OPS, reason="branchynet._C is not built (pip install --no-build-isolation -e .)")
needs_cuda_ops = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_OPS, reason="needs a GPU and branchynet._C built with CUDA"),
]
DEVICES = [pytest.param("cpu", marks=needs_ops), pytest.param("cuda", marks=needs_cuda_ops)]

try:  # bound the compile checks when pytest-timeout is installed
    import pytest_timeout  # noqa: F401

    compile_timeout = pytest.mark.timeout(2 * COMPILE_TIMEOUT_S + 10)
except ImportError:
    def compile_timeout(f):
        return f


# --- 1. compile checks -------------------------------------------------------------------


def _cxx_std() -> str:
    # Follow the standard torch builds extensions with (C++20 since torch 2.10ish; its
    # headers warn under C++17).
    from torch.utils import cpp_extension

    return "c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "c++17"


def _torch_compile_flags() -> list[str]:
    from torch.utils import cpp_extension

    # -isystem: warnings from torch's headers are not ours; our files must be warning-free.
    flags = []
    for inc in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]:
        flags += ["-isystem", inc]
    flags += [
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-std={_cxx_std()}",
    ]
    torch_include = Path(torch.__file__).parent / "include"
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # CPU wheels ship c10/cuda but not this generated header; it only sets a Windows
        # export macro, which the HIP build skips the same way.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _run_compiler(cmd: list[str], source: Path) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compiling {source.name} took more than {COMPILE_TIMEOUT_S} s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{out[-20000:]}"
    ours = [line for line in out.splitlines() if source.name in line and "warning" in line.lower()]
    assert not ours, "warnings in our source:\n" + "\n".join(ours)
    return out


@compile_timeout
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_compiles_cuda_kernels(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    cmd = [
        "nvcc", "-c", str(CU_SOURCE), "-o", str(tmp_path / "exit_step.cuda.o"),
        "-gencode", "arch=compute_90,code=sm_90",
        "-Xptxas", "-v",  # registers and spills of every kernel instantiation
        "-Xcompiler", "-fPIC,-Wall,-Wextra",
        "-DBRANCHYNET_WITH_CUDA",
        *COMMON_NVCC_FLAGS,
        *_torch_compile_flags(),
    ]
    out = _run_compiler(cmd, CU_SOURCE)
    assert (tmp_path / "exit_step.cuda.o").stat().st_size > 0
    # ptxas -v: "Compiling entry function '<mangled>' for 'sm_90'" then, among others,
    # "N bytes stack frame, S bytes spill stores, L bytes spill loads".
    entries = re.findall(r"Compiling entry function '([^']+)'", out)
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)]
    assert any("exit_step_rows_kernel" in e for e in entries) and any("gather_rows_kernel" in e for e in entries)
    assert len(spills) == len(entries), out[-4000:]
    # The one known exception: the fp64 block kernel (C > 1024, float64 logits) saves
    # one 8-byte register around the calls to fp64 division's slow path (an ABI save
    # once per row, with 48 registers in use: not register pressure).
    allowed = {"exit_step_block_kernelIdE": 8}
    spilled = [(e, s) for e, s in zip(entries, spills)
               if max(s) > next((v for k, v in allowed.items() if k in e), 0)]
    assert not spilled, f"{len(spilled)} of {len(entries)} kernels spill: {spilled[:5]}"


@compile_timeout
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_gxx_compiles_op_library(tmp_path):
    cmd = ["g++", "-fsyntax-only", "-fPIC", "-Wall", "-Wextra", "-DBRANCHYNET_WITH_CUDA",
           *_torch_compile_flags(), str(CPP_SOURCE)]
    _run_compiler(cmd, CPP_SOURCE)


# --- 2. the built ops against the oracle -----------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BATCHES = [0, 1, 7, 1023, 4097]
# 1: a single class; 4099 > 1024 takes the block-per-row CUDA kernel.
CLASSES = [1, 2, 10, 100, 1000, 4099]
POISON = {"logits": -1234.0, "pred": -7, "exit": -9, "entropy": -3.0}


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


def make_logits(k: int, c: int, dtype, device, seed: int) -> torch.Tensor:
    """Random logits with a spread of confidence: per-row scales from 0.1 (flat) to 8."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(k, 1, generator=g, dtype=torch.float64) * 7.9 + 0.1
    z = torch.randn(k, c, generator=g, dtype=torch.float64) * scale
    return z.to(dtype).to(device)


def make_rows(k: int, b: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(b, generator=g)[:k].to(device)


def make_buffers(b: int, c: int, dtype, device):
    return (
        torch.full((b, c), POISON["logits"], dtype=dtype, device=device),
        torch.full((b,), POISON["pred"], dtype=torch.int64, device=device),
        torch.full((b,), POISON["exit"], dtype=torch.int64, device=device),
        torch.full((b,), POISON["entropy"], dtype=torch.float32, device=device),
    )


def pick_threshold(logits: torch.Tensor, criterion: int) -> float:
    """A threshold in the widest gap of the middle half of the reference scores, so that
    about half the rows leave and no score sits within fp32 rounding of it."""
    score, _, _ = exit_scores(logits.cpu(), CRITERIA[criterion])
    s = score[torch.isfinite(score)].double().sort().values
    if s.numel() == 0:
        return 0.5
    if s.numel() == 1 or s[0] == s[-1]:
        # One score (C = 1: every criterion is 0): every finite row must leave.
        return float(s[0]) + 0.25
    lo, hi = s.numel() // 4, max(s.numel() * 3 // 4, s.numel() // 4 + 1)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


def check_exit_step(logits, rows, b, threshold, criterion, exit_index, last):
    """Run the compiled op and the oracle on identical poisoned buffers; compare all."""
    k, c = logits.shape
    dev = logits.device
    got_bufs = make_buffers(b, c, logits.dtype, dev)
    ref_bufs = tuple(t.clone() for t in got_bufs)
    ref = exit_step_torch(logits, rows, threshold, criterion, exit_index, last, *ref_bufs)
    got = torch.ops.branchynet.exit_step(logits, rows, threshold, criterion, exit_index, last, *got_bufs)

    # Written rows and untouched rows alike: logits copied bit for bit, pred and exit exact.
    torch.testing.assert_close(got_bufs[0], ref_bufs[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_bufs[1], ref_bufs[1]), "pred differs"
    assert torch.equal(got_bufs[2], ref_bufs[2]), "exit index differs (wrong rows written?)"
    tol = 1e-6 if logits.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got_bufs[3], ref_bufs[3], rtol=tol, atol=tol, equal_nan=True)

    # Entropy error against float64 at most twice the oracle's (both accumulate in fp32).
    exited = ref_bufs[2] == exit_index
    if exited.any() and logits.dtype != torch.float64:
        _, h64, _ = exit_scores(logits.double().cpu(), "entropy")
        full64 = torch.full((b,), float("nan"), dtype=torch.float64)
        full64[rows.cpu()] = h64
        sel = exited.cpu() & torch.isfinite(full64)
        err_got = (got_bufs[3].cpu().double()[sel] - full64[sel]).abs().max().item() if sel.any() else 0.0
        err_ref = (ref_bufs[3].cpu().double()[sel] - full64[sel]).abs().max().item() if sel.any() else 0.0
        assert err_got <= 2 * err_ref + 1e-6, (err_got, err_ref)

    survivors, survivor_rows, count = got
    assert survivors.shape == (k,) and survivor_rows.shape == (k,) and count.shape == (1,)
    assert survivors.dtype == survivor_rows.dtype == count.dtype == torch.int64
    assert survivors.device == survivor_rows.device == count.device == dev
    n = int(count.item())
    assert n == int(ref[2].item())
    assert torch.equal(survivors[:n].sort().values, ref[0][:n].sort().values)
    assert torch.equal(survivor_rows[:n], rows[survivors[:n]])
    # Stronger than the contract: survivors is a permutation of 0..K-1 (leavers at the tail).
    assert torch.equal(survivors.sort().values, torch.arange(k, device=dev))
    assert torch.equal(survivor_rows, rows[survivors])
    if dev.type == "cpu":  # serial compaction: the oracle's order exactly
        assert torch.equal(survivors, ref[0]) and torch.equal(survivor_rows, ref[1])
    return n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("criterion", [0, 1, 2], ids=list(CRITERIA))
@pytest.mark.parametrize("c", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("k", BATCHES, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_exit_step_matches_oracle(device, dtype, k, c, criterion):
    if device == "cpu" and (k > 1023 and c > 1000 or dtype != torch.float32 and (k > 1023 or c > 1000)):
        pytest.skip("on the CPU the largest shapes run in float32 only (time); CUDA runs them all")
    seed = 1000 * k + 10 * c + criterion
    logits = make_logits(k, c, dtype, device, seed)
    b = k + 3  # rows the op must leave untouched
    rows = make_rows(k, b, device, seed)
    t = pick_threshold(logits, criterion)
    n = check_exit_step(logits, rows, b, t, criterion, exit_index=2, last=False)
    if k >= 7 and c > 1 and criterion == 0:
        assert 0 < n < k, "the threshold should split the batch"
    if c == 1:  # one class: p = 1, every score 0 < T, every row leaves with pred 0
        assert n == 0
    assert check_exit_step(logits, rows, b, t, criterion, exit_index=3, last=True) == 0


def extreme_logits(c: int, dtype, device) -> torch.Tensor:
    """Rows that break naive softmax/entropy code."""
    big = 1e4
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(c)
    out = []

    def row(fill=0.0):
        r = torch.full((c,), fill, dtype=torch.float64)
        out.append(r)
        return r

    r = row(-big); r[0] = big                 # one-hot: H = 0, pred 0
    row(0.0)                                  # uniform: H = log C, pred 0
    row(big)                                  # uniform at +1e4
    r = row(0.0); r[0] = 5; r[-1] = 5        # tie at the max: pred 0
    if c > 1:
        r = row(-inf); r[0] = 0.0             # -inf classes contribute 0, not NaN
        r = row(0.0); r[c // 2] = nan         # NaN: H NaN, never leaves early, pred = NaN column
        r = row(0.0); r[-1] = inf             # +inf max: H NaN, pred = that column
        r = row(0.0); r[0] = nan; r[1] = inf  # NaN (as +inf) and +inf tie: first wins
    row(-inf)                                 # all -inf: H NaN, pred 0
    r = row(); r.copy_(torch.randn(c, generator=g, dtype=torch.float64) * big)
    r = row(); r.copy_(torch.randn(c, generator=g, dtype=torch.float64) + big)
    r = row(); r.copy_(torch.randn(c, generator=g, dtype=torch.float64) - big)
    r = row(); r.copy_(torch.linspace(-big, big, c, dtype=torch.float64))
    return torch.stack(out).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("last", [False, True], ids=["side", "last"])
@pytest.mark.parametrize("criterion", [0, 1, 2], ids=list(CRITERIA))
@pytest.mark.parametrize("c", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_exit_step_extreme_logits(device, dtype, c, criterion, last):
    logits = extreme_logits(c, dtype, device)
    k = logits.shape[0]
    rows = make_rows(k, k + 2, device, seed=c)
    n = check_exit_step(logits, rows, k + 2, 0.3, criterion, exit_index=0, last=last)
    if not last and c > 1:
        # NaN rows (3 with NaN/inf, plus all -inf) must survive a side exit.
        assert n >= 4


@pytest.mark.parametrize("device", DEVICES)
def test_exit_step_noncontiguous_inputs(device):
    base = make_logits(64, 40, torch.float32, device, seed=3)
    logits = base[:, ::2]  # strided columns: the op takes a contiguous copy
    rows_base = torch.arange(128, device=device).flip(0)
    rows = rows_base[::2]
    b = 128
    bufs = make_buffers(b, 20, torch.float32, device)
    out_pred = torch.full((2 * b,), -7, dtype=torch.int64, device=device)[::2]  # strided 1-D out
    ref_bufs = tuple(t.clone() for t in bufs)
    ref = exit_step_torch(logits, rows, 1.5, 0, 1, False, *ref_bufs)
    got = torch.ops.branchynet.exit_step(logits, rows, 1.5, 0, 1, False, bufs[0], out_pred, bufs[2], bufs[3])
    assert torch.equal(out_pred, ref_bufs[1])
    assert torch.equal(bufs[0], ref_bufs[0]) and torch.equal(bufs[2], ref_bufs[2])
    torch.testing.assert_close(bufs[3], ref_bufs[3], rtol=2e-5, atol=2e-5)
    assert int(got[2]) == int(ref[2])


@needs_ops
def test_exit_step_rejects_bad_arguments():
    logits = torch.randn(4, 3)
    rows = torch.arange(4)
    bufs = make_buffers(4, 3, torch.float32, "cpu")
    op = torch.ops.branchynet.exit_step
    with pytest.raises(RuntimeError, match="rows"):
        op(logits, rows.int(), 0.5, 0, 0, False, *bufs)
    with pytest.raises(RuntimeError, match="out of range"):
        op(logits, torch.tensor([0, 1, 2, 4]), 0.5, 0, 0, False, *bufs)
    with pytest.raises(RuntimeError, match="criterion"):
        op(logits, rows, 0.5, 3, 0, False, *bufs)
    with pytest.raises(RuntimeError, match="out_logits"):
        op(logits, rows, 0.5, 0, 0, False, bufs[0].half(), *bufs[1:])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.branchynet.gather_rows(torch.randn(3, 2), torch.tensor([3]))


# --- gather_rows -------------------------------------------------------------------------


def _gather_cases(device):
    g = torch.Generator().manual_seed(0)
    yield "2d_f32", torch.randn(37, 7, generator=g)
    yield "1d_i64", torch.randint(0, 100, (37,), generator=g)
    yield "4d_f16", torch.randn(37, 3, 5, 5, generator=g).half()
    yield "4d_f32_cl", torch.randn(37, 64, 8, 8, generator=g).to(memory_format=torch.channels_last)
    yield "4d_bf16_cl", torch.randn(37, 3, 5, 5, generator=g).bfloat16().to(memory_format=torch.channels_last)
    yield "3d_u8_odd", torch.randint(0, 255, (37, 3, 3), generator=g, dtype=torch.uint8)
    yield "bool", torch.rand(37, 5, generator=g) > 0.5
    yield "transposed", torch.randn(7, 37, generator=g).t()  # neither layout: contiguous out
    yield "5d", torch.randn(37, 2, 3, 4, 5, generator=g)
    flat = torch.randn(37 * 16 + 1, generator=g).half()
    yield "misaligned_f16", flat[1:].view(37, 16)  # 2-byte aligned: the narrow copy path
    yield "cl_ambiguous", torch.randn(37, 1, 4, 4, generator=g).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [0, 1, 5, 37, 100])
def test_gather_rows_matches_index_select(device, m):
    g = torch.Generator().manual_seed(m)
    for name, features in _gather_cases(device):
        features = features.to(device) if features.device.type != device else features
        if name == "misaligned_f16" and device == "cuda":  # .to() made an aligned copy
            flat = torch.randn(37 * 16 + 1, generator=g).half().to(device)
            features = flat[1:].view(37, 16)
        index = torch.randint(0, 37, (m,), generator=g).to(device)  # repeats allowed
        got = torch.ops.branchynet.gather_rows(features, index)
        ref = gather_rows_torch(features, index)
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert torch.equal(got, ref), name
        if m > 1:
            assert got.stride() == ref.stride(), (name, got.stride(), ref.stride())
        fake = _fake.gather_rows_fake(features, index)
        assert fake.shape == got.shape and (m <= 1 or fake.stride() == got.stride()), name


# --- registration ------------------------------------------------------------------------


@needs_ops
def test_registration():
    assert _fake.register() is True  # idempotent
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("branchynet::exit_step", "CUDA")
    assert _C.has_cuda() == has_cuda_kernel
    for op in ("branchynet::exit_step", "branchynet::gather_rows"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    schema = str(torch.ops.branchynet.exit_step.default._schema)
    assert "Tensor(a!) out_logits" in schema and "Tensor(d!) out_entropy" in schema


def _opcheck_exit_step_args(device, criterion, last):
    # K = 37 rows of C = 10: one CUDA block (64 rows), so even the order is deterministic.
    k, c, b = 37, 10, 40
    logits = make_logits(k, c, torch.float32, device, seed=7)
    rows = make_rows(k, b, device, seed=7)
    return (logits, rows, pick_threshold(logits, criterion), criterion, 1, last,
            *make_buffers(b, c, torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("last", [False, True], ids=["side", "last"])
@pytest.mark.parametrize("criterion", [0, 2], ids=["entropy", "margin"])
def test_opcheck_exit_step(device, criterion, last):
    torch.library.opcheck(torch.ops.branchynet.exit_step.default,
                          _opcheck_exit_step_args(device, criterion, last))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_gather_rows(device, layout):
    features = torch.randn(9, 4, 3, 5, device=device)
    if layout == "channels_last":
        features = features.to(memory_format=torch.channels_last)
    index = torch.tensor([8, 0, 3, 3, 5], device=device)
    torch.library.opcheck(torch.ops.branchynet.gather_rows.default, (features, index))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def step(logits, rows, features, out_logits, out_pred, out_exit, out_entropy):
        surv, surv_rows, count = torch.ops.branchynet.exit_step(
            logits, rows, 1.0, 0, 0, False, out_logits, out_pred, out_exit, out_entropy)
        return surv, surv_rows, count, torch.ops.branchynet.gather_rows(features, surv)

    k, c = 37, 10
    logits = make_logits(k, c, torch.float32, device, seed=11)
    rows = make_rows(k, k, device, seed=11)
    features = torch.randn(k, 8, 3, 3, device=device).to(memory_format=torch.channels_last)
    eager_bufs = make_buffers(k, c, torch.float32, device)
    comp_bufs = tuple(t.clone() for t in eager_bufs)
    expected = step(logits, rows, features, *eager_bufs)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(logits, rows, features, *comp_bufs)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    for e, g in zip(eager_bufs, comp_bufs):  # the in-place writes survive functionalization
        assert torch.equal(e, g)


# --- CUDA only ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_OPS, reason="needs a GPU and branchynet._C built with CUDA")
def test_cuda_side_stream_and_graph_capture():
    k, c = 1023, 100
    logits = make_logits(k, c, torch.float16, "cuda", seed=5)
    rows = make_rows(k, k, "cuda", seed=5)
    t = pick_threshold(logits, 0)
    ref_bufs = make_buffers(k, c, torch.float16, "cuda")
    ref = exit_step_torch(logits, rows, t, 0, 0, False, *ref_bufs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bufs = make_buffers(k, c, torch.float16, "cuda")
        got = torch.ops.branchynet.exit_step(logits, rows, t, 0, 0, False, *bufs)
    torch.cuda.current_stream().wait_stream(side)
    assert int(got[2]) == int(ref[2]) and torch.equal(bufs[1], ref_bufs[1])

    # Capturable: no host sync, no allocation outside the graph pool's reach.
    bufs = make_buffers(k, c, torch.float16, "cuda")
    with torch.cuda.stream(side):  # warm up outside the capture
        torch.ops.branchynet.exit_step(logits, rows, t, 0, 0, False, *make_buffers(k, c, torch.float16, "cuda"))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.branchynet.exit_step(logits, rows, t, 0, 0, False, *bufs)
        gathered = torch.ops.branchynet.gather_rows(logits, out[0])
    for buf, val in zip(bufs, POISON.values()):
        buf.fill_(val)
    graph.replay()
    torch.cuda.synchronize()
    assert int(out[2]) == int(ref[2])
    assert torch.equal(bufs[0], ref_bufs[0]) and torch.equal(bufs[1], ref_bufs[1])
    assert torch.equal(gathered, logits[out[0]])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_OPS, reason="needs a GPU and branchynet._C built with CUDA")
def test_cuda_dispatch_uses_extension():
    from branchynet import ops

    assert ops.resolve_backend("auto", "cuda") == "cuda"
    logits = make_logits(100, 10, torch.float32, "cuda", seed=1)
    rows = torch.arange(100, device="cuda")
    bufs = make_buffers(100, 10, torch.float32, "cuda")
    # Even rows confident (+20 against -20: entropy ~2e-15), odd rows flat (entropy log 10).
    logits[::2] = -20.0
    logits[::2, 3] = 20.0
    logits[1::2] = 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        surv, _, count = ops.exit_step(logits, rows, 1.0, 2, *bufs, backend="cuda")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("exit_step_rows_kernel" in n for n in names), names  # our kernel ran
    assert int(count) == 50
    assert torch.equal(surv[:50].sort().values, torch.arange(1, 100, 2, device="cuda"))
    assert bufs[2][::2].eq(2).all() and bufs[2][1::2].eq(POISON["exit"]).all()
    assert bufs[1][::2].eq(3).all() and bufs[3][::2].lt(1e-6).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_machine_has_the_cuda_kernels():
    # Without this, a GPU machine whose build fell back to CPU-only would skip every
    # CUDA case above and pass. BRANCHYNET_EXPECT_NO_CUDA_EXT=1 says the fallback is meant.
    if os.environ.get("BRANCHYNET_EXPECT_NO_CUDA_EXT") == "1":
        pytest.skip("BRANCHYNET_EXPECT_NO_CUDA_EXT=1: a CPU-only extension is expected")
    assert HAS_OPS, "branchynet._C is not importable on a GPU machine"
    assert _C.has_cuda(), "branchynet._C was built without CUDA on a GPU machine: every CUDA test skips"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_OPS, reason="needs a GPU and branchynet._C built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [10, 100, 3000])
def test_cuda_copies_nan_payloads_bit_for_bit(dtype, c):
    # fp16/bf16 -> fp32 -> back quiets a signalling NaN and can change its payload; the
    # leaving rows' logits must be the input's bits, as on every other path.
    bits = torch.randint(-2000, 2000, (8, c), generator=torch.Generator().manual_seed(c), dtype=torch.int16)
    payloads = [0x7C01, 0x7D55, -0x0201] if dtype == torch.float16 else [0x7F81, 0x7FA5, -0x007F]
    for i, p in enumerate(payloads):
        bits[i, i] = p
    logits = bits.view(dtype).cuda()
    assert torch.isnan(logits[:3].float()).any(dim=1).all()
    bufs = make_buffers(8, c, dtype, "cuda")
    torch.ops.branchynet.exit_step(logits, torch.arange(8, device="cuda"), 0.5, 0, 4, True, *bufs)
    assert torch.equal(bufs[0].view(torch.int16).cpu(), bits)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=needs_ops),
    pytest.param("cuda", marks=needs_cuda_ops),
])
@pytest.mark.parametrize("c", [10, 1000, 3000])
def test_small_entropies_are_accurate_relative_to_themselves(device, c):
    # Confident rows (entropies down to 1e-10): the kernels take log S as log1p of the
    # sum of every e but the largest (CUDA, fp32) or sum in double (CPU); plain fp32
    # logf(S) would miss the entropy by ~5 % at 1e-6.
    from branchynet.ops._torch import exit_step_torch

    g = torch.Generator().manual_seed(c)
    k = 256
    z = torch.randn(k, c, generator=g, dtype=torch.float64)
    z[torch.arange(k), torch.randint(0, c, (k,), generator=g)] += 8 + 16 * torch.rand(k, generator=g)
    z = z.float()
    def bufs(dev):
        return (torch.empty(k, c, device=dev), torch.empty(k, dtype=torch.int64, device=dev),
                torch.empty(k, dtype=torch.int64, device=dev), torch.empty(k, device=dev))
    got = bufs(device)
    torch.ops.branchynet.exit_step(z.to(device), torch.arange(k, device=device), 0.0, 0, 0, True, *got)
    want = bufs("cpu")
    exit_step_torch(z, torch.arange(k), 0.0, 0, 0, True, *want)
    assert float(want[3].min()) < 1e-5  # the regime fp32 logf(S) gets wrong by > 0.1 %
    rel = ((got[3].cpu().double() - want[3].double()).abs() / want[3].double().clamp_min(1e-30)).max()
    assert rel < 1e-5, float(rel)
    assert torch.equal(got[1].cpu(), want[1])
