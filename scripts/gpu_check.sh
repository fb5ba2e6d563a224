#!/bin/bash
# The GPU checks (issue 25), sized for one device lease: at most 8 minutes on an H200, compiles included;
# each command has a timeout (130 + 270 + 70 s). No weights travel: random weights at Llama-3-8B's layer
# shape with 8 layers instead of 32 (../shared/gpu/llama3-8b-8layers-32k.json; written here if absent).
#   1. the CUDA tests: offload_gather.py's device read (eager, and inside a compiled step captured as CUDA
#      graphs, against the host read), its kernel in Triton's interpreter, the pinned store's reloads, the
#      full cache's compiled decode (FlexAttention) against SDPA;
#   2. bench.py at 8k and 32k, bf16, budget 256, SnapKV, 2 of the 8 KV heads recomputing in every
#      layer-step (--recompute-heads 2), eager and compiled (mode "reduce-overhead" for every row);
#   3. a float32 tiny-shape bench (2 layers): compiled greedy tokens == eager's for every row.
# Writes gpu_check.txt, bench_8layers.{txt,json} and bench_tiny_float32.{txt,json} to $OUT (default
# results/gpu). A dry run on CPU, small and short (the flags parse, the script runs end to end):
#   DEVICE=cpu CONFIG=tiny LENGTHS=300,400 OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
DEVICE=${DEVICE:-cuda}
LENGTHS=${LENGTHS:-8k,32k}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS
stamp() { echo "[gpu_check] $1: $((SECONDS - start)) s since the start" | tee -a "$OUT/gpu_check.txt"; }

# the configs: the 8-layer shape (from ../shared, else written from model.py's llama3-8b), a tiny one
python3 - "$OUT" <<'EOF'
import json, sys
from model import RANDOM_CONFIGS
out = sys.argv[1]
eight = dict(RANDOM_CONFIGS["llama3-8b"], num_hidden_layers=8, max_position_embeddings=32896, model_type="llama")
tiny = dict(RANDOM_CONFIGS["llama3-8b"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=4096)
json.dump(eight, open(f"{out}/llama3-8b-8layers-32k.json", "w"), indent=1)
json.dump(tiny, open(f"{out}/tiny.json", "w"), indent=1)
EOF
case ${CONFIG:-8layers} in
    8layers) CONFIG=../shared/gpu/llama3-8b-8layers-32k.json
             [ -f "$CONFIG" ] || CONFIG=$OUT/llama3-8b-8layers-32k.json ;;
    tiny) CONFIG=$OUT/tiny.json ;;
esac

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "no triton: the store is read through the host"
  echo "config $CONFIG, lengths $LENGTHS, device $DEVICE"
} 2>&1 | tee "$OUT/gpu_check.txt"

timeout 130 python3 -m pytest -q -p no:cacheprovider -rs test_offload_gather.py test_calidrop.py test_model.py \
    -k "cuda or gather or flex" \
    2>&1 | tail -n 30 | tee -a "$OUT/gpu_check.txt"
stamp "CUDA tests"

timeout 270 python3 bench.py --device "$DEVICE" --dtype bfloat16 --random-weights "$CONFIG" --lengths "$LENGTHS" \
    --methods snapkv --budget 256 --recompute-heads 2 --new-tokens 32 --compile-new-tokens 16 --warmup 3 \
    --json "$OUT/bench_8layers.json" 2>&1 | tee "$OUT/bench_8layers.txt"
stamp "bench, $CONFIG at $LENGTHS, bf16"

timeout 70 python3 bench.py --device "$DEVICE" --dtype float32 --random-weights "$OUT/tiny.json" --lengths 1k \
    --methods snapkv --budget 256 --recompute-heads 1 --new-tokens 16 --compile-new-tokens 16 --warmup 2 \
    --json "$OUT/bench_tiny_float32.json" 2>&1 | tee "$OUT/bench_tiny_float32.txt"
stamp "bench, tiny shape, float32"
