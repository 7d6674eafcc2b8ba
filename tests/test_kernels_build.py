"""The build of the exit op's compiled sources (csrc/).

Compile checks that need no GPU: ``nvcc`` builds csrc/cuda/exit_step.cu for sm_90 (no
kernel may spill registers) and ``g++`` checks csrc/exit_step.cpp, both against the
installed torch's headers (a CPU wheel ships the ATen/cuda and c10/cuda headers too),
warning-free. About 45 s on 2 cores. And on a GPU machine: the built extension has the
CUDA kernels (else every CUDA case of tests/test_ops.py would skip and pass). The op's
behaviour on every backend is in tests/test_ops.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from branchynet import _build

try:
    from branchynet import _C
except Exception:  # not built (isolated or BRANCHYNET_SKIP_EXT install), or ABI mismatch
    _C = None

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCE = ROOT / "csrc" / "cuda" / "exit_step.cu"
CPP_SOURCE = ROOT / "csrc" / "exit_step.cpp"
COMPILE_TIMEOUT_S = 300  # each compile; nvcc takes ~40 s for sm_90 on 2 idle cores, 4 min on a loaded one

try:  # bound the compile checks when pytest-timeout is installed
    import pytest_timeout  # noqa: F401

    compile_timeout = pytest.mark.timeout(2 * COMPILE_TIMEOUT_S + 10)
except ImportError:
    def compile_timeout(f):
        return f


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


# --- the built extension ----------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_machine_has_the_cuda_kernels():
    # Without this, a GPU machine whose build fell back to CPU-only would skip every
    # CUDA case of tests/test_ops.py and pass. BRANCHYNET_EXPECT_NO_CUDA_EXT=1 says the fallback is meant.
    if _build.env_flag("BRANCHYNET_EXPECT_NO_CUDA_EXT"):
        pytest.skip("BRANCHYNET_EXPECT_NO_CUDA_EXT=1: a CPU-only extension is expected")
    assert _C is not None, "branchynet._C is not importable on a GPU machine"
    assert _C.has_cuda(), "branchynet._C was built without CUDA on a GPU machine: every CUDA test skips"
