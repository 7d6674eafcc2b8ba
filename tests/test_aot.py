"""GPU properties of the Triton kernels, checked without a GPU (branchynet.kernels.aot).

The representative grid of launch configurations is compiled once per session for sm_90
with Triton's ptxas, in a subprocess with ``TRITON_INTERPRET=0`` (the test process runs
the interpreter). About a minute of CPU on a fresh machine (120 configurations, 2-core
VM), seconds with the caches warm.
``python -m branchynet.kernels.aot --full`` compiles every configuration.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_present() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _ptxas_present(), reason="Triton's NVIDIA backend (ptxas) is not installed")


def _checked_triton() -> bool:
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", "from branchynet.kernels import exit_step as k; "
                           "print(int(k.triton_checked()))"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.stdout.strip().endswith("1")


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "branchynet.kernels.aot", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_compiled_configuration_is_free_of_spills(report):
    # Registers and spills are a property of one Triton release's compiler: on a release the
    # kernels were not tuned for, the check is informative (the report says which version
    # compiled it), not a failure of the user's install.
    if not report["versions"]["checked_triton"]:
        pytest.skip(f"Triton {report['versions']['triton']} is not among the checked releases; "
                    "run `python -m branchynet.kernels.aot --full` to see its spills")
    spilled = [r for r in report["compiled"] if r["spill_stores"] or r["spill_loads"]]
    assert report["compiled"] and not spilled, spilled
    # 255 is the cap: a kernel there is one temporary away from spilling.
    assert max(r["registers"] for r in report["compiled"]) < 255


def test_report_names_the_compiler(report):
    import triton

    v = report["versions"]
    assert v["triton"] == triton.__version__ and v["target"] == "sm_90a"
    assert v["checked_triton"] == _checked_triton()


def test_grid_covers_every_width_the_dispatcher_picks(report):
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = ("import json; from branchynet.kernels import aot; "
            "print(json.dumps([aot.tile_configs(), aot.chunked_configs()]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    tiles, chunks = json.loads(proc.stdout.strip().splitlines()[-1])
    compiled = {(r["kernel"], r["dtype"], r["rows"], r["width"], r["num_warps"]) for r in report["compiled"]}
    for dtype in ("fp32", "bf16"):
        for rows, width, warps in tiles:
            assert ("tile", dtype, rows, width, warps) in compiled
    for dtype in ("fp32", "fp16", "bf16"):
        for rows, width, warps in chunks:
            assert ("chunked", dtype, rows, width, warps) in compiled
    # C = 1 .. 8192 in powers of two: 14 tile widths.
    assert [t[1] for t in tiles] == [1 << i for i in range(14)]


def test_grid_covers_every_criterion(report):
    # Patience (3) reads and writes its state where the others do not: its own code, whose
    # side-exit tiles of BLOCK_C 16-128 take the most registers of all on sm_90.
    compiled = {(r["kernel"], r["dtype"], r["criterion"], r["last"], r["width"]) for r in report["compiled"]}
    for dtype, crit in (("fp32", 2), ("bf16", 2), ("fp32", 3)):  # patience's bf16: --full
        assert {w for k, d, c, last, w in compiled if (k, d, c, last) == ("tile", dtype, crit, False)} \
            == {1 << i for i in range(14)}, (dtype, crit)
    for last in (False, True):
        crits = {r["criterion"] for r in report["compiled"] if r["kernel"] == "tile" and r["last"] == last}
        assert crits == {0, 1, 2, 3}, (last, crits)
        crits = {r["criterion"] for r in report["compiled"] if r["kernel"] == "chunked" and r["last"] == last}
        assert 3 in crits, (last, crits)
    assert {name.split("criterion=")[1] for name in report["exit_step_variants_k1_4096"]} >= {"0", "2", "3"}


def test_survivor_counts_compile_one_variant_each(report):
    # The engine calls the exit op with every K from 1 to the batch size; a variant per
    # K class (K == 1, K % 16, next_pow2(K) tiles) would stall the first batches for
    # 0.6-2 s a compile.
    for name, n in report["exit_step_variants_k1_4096"].items():
        assert n <= 2, f"{name}: {n} compiled variants over K = 1..4096"
    for name, n in report["gather_variants_m1_4096"].items():
        assert n <= 2, f"gather, rows of {name}: {n} compiled variants over M = 1..4096"


def test_small_classes_spread_over_the_sms(report):
    # K = 4097 rows of 10 classes: about one program per SM of an H100 (132), not 9.
    assert report["programs_k4097_c10"] >= 128
