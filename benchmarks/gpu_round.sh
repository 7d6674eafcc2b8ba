#!/usr/bin/env bash
# One GPU round (../shared/GPU.md): build the extension in place, run the whole test
# suite with the CUDA cases, then the benchmarks, split to stay under a 10-minute command
# limit, and the report. Usage: bash benchmarks/gpu_round.sh OUTDIR [PART]
#   PART: test | bench-small | bench-resnet | bench-op | report | all (default)
set -euo pipefail
out=${1:?usage: gpu_round.sh OUTDIR [PART]}
part=${2:-all}
mkdir -p "$out"
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true; } > "$out/machine.txt" 2>&1
if [ ! -e branchynet/_C*.so ] || [ "$part" = all ] || [ "$part" = test ]; then
  pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
fi
python -m branchynet info >> "$out/machine.txt"
case "$part" in all|test)
  python -m pytest -q tests -x 2>&1 | tail -40 > "$out/tests.txt" ;; esac
case "$part" in all|bench-small)
  python -m pytest -q benchmarks -k "b_lenet or b_alexnet" --benchmark-json="$out/bench_small.json" > /dev/null ;; esac
case "$part" in all|bench-resnet)
  python -m pytest -q benchmarks -k b_resnet110 --benchmark-json="$out/bench_resnet.json" > /dev/null ;; esac
case "$part" in all|bench-op)
  python -m pytest -q benchmarks -k exit_op --benchmark-json="$out/bench_op.json" > /dev/null ;; esac
case "$part" in all|report|bench-*)
  ls "$out"/bench_*.json > /dev/null 2>&1 && python benchmarks/report.py "$out"/bench_*.json --out "$out" > "$out/report.md" ;; esac
