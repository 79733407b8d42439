#!/usr/bin/env bash
# The head-sparse kernel's GPU check in one call (a few minutes on an H100/H200): the kernel tests compiled
# for the GPU, then bench/attention.py in the issue's setting. Run from the repository root; no install needed
# (the package is read from the source tree); the log goes to $OUT/log (or ./gpu-bench.log), the markdown tables to
# $OUT/gpu-bench.md (or ./gpu-bench.md).
#   bash bench/gpu.sh                       # tests + benchmark
#   BENCH_ARGS="--lengths 4096" bash bench/gpu.sh
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -n "${OUT:-}" ] && LOG="$OUT/log" || LOG=gpu-bench.log
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$LOG"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_sparse_kernel.py 2>&1 | tee -a "$LOG"
timeout 400 python3 bench/attention.py --device cuda --dtype bfloat16 --lengths 1024 4096 8192 --tokens 16384 \
    --backward --check --decode --end-to-end --configs 128,64,8,2,8 64,32,4,3,4 ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
# the lines to paste into the README: the setting, the self-check's cost and the tables
grep -E '^(device|kernel self-check|\|)' "$LOG" > "${OUT:-.}/gpu-bench.md"
