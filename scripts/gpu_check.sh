#!/bin/bash
# The GPU checks, as run through the device tool on a lent H100 (no weights travel: random weights at
# Llama-3-8B's shape): the CUDA-only test (reloads from pinned host memory), then the bandwidths (device
# memory, host-to-device pageable and pinned) and every row of bench.py at an 8k prompt, budget 256, bf16,
# eager and compiled (CUDA graphs).
# Writes gpu.txt, bench_cuda.txt and bench_cuda.json to $OUT (default /tmp/gpu_check).
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())"
} | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider test_calidrop.py -k cuda 2>&1 | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-480}" python3 bench.py --device cuda --dtype bfloat16 --random-weights llama3-8b \
    --lengths 8k --budget 256 --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.txt"
