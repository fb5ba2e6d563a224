#!/bin/bash
# The GPU checks, sized for one device lease: at most 8 minutes, compiles included; each command has a
# timeout (170 + 250 + 60 s). It installs nothing: a CUDA build of torch brings its own triton, and another
# version can break inductor. No weights travel: random weights at Llama-3-8B's layer shape with 8 layers
# instead of 32 (../shared/gpu/llama3-8b-8layers-32k.json; written here if absent).
#   1. the CUDA tests: offload_gather.py's device read (eager, and inside a compiled step captured as CUDA
#      graphs, against the host read), its kernel in Triton's interpreter, the pinned store's reloads, the
#      full cache's compiled decode (FlexAttention) against SDPA;
#   2. bench.py at 8k and 32k, bf16, budget 256, SnapKV, 2 of the 8 KV heads recomputing in every
#      layer-step (--recompute-heads 2), eager and compiled (mode "reduce-overhead" for every row), with
#      torch's recompile log;
#   3. a float32 tiny-shape bench (2 layers) at 400 tokens: compiled greedy tokens == eager's for every row;
#      PyramidKV's first layer keeps the whole prompt there (an empty evicted set on the device path);
#   4. a summary from the JSON: per compiled row the steps that compiled again after the first, and whether
#      the offload store stayed outside the CUDA graphs' memory pool (a store view that lost its static mark
#      is copied into the pool at every replay: the row's peak memory then exceeds calibrate-only's by the
#      store's size, while the outputs stay equal).
# Writes gpu_check.txt, bench_8layers.{txt,json,log}, bench_tiny_float32.{txt,json} to $OUT (default
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
  python3 -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "no triton: the store is read through the host"
  echo "config $CONFIG, lengths $LENGTHS, device $DEVICE"
} 2>&1 | tee "$OUT/gpu_check.txt"

timeout 170 python3 -m pytest -q -p no:cacheprovider -rs test_offload_gather.py test_calidrop.py test_model.py \
    -k "cuda or gather or flex or not_asked" \
    2>&1 | tail -n 30 | tee -a "$OUT/gpu_check.txt"
stamp "CUDA tests"

TORCH_LOGS=recompiles timeout 250 python3 bench.py --device "$DEVICE" --dtype bfloat16 --random-weights "$CONFIG" \
    --lengths "$LENGTHS" --methods snapkv --budget 256 --recompute-heads 2 --new-tokens 32 --compile-new-tokens 16 \
    --warmup 3 --json "$OUT/bench_8layers.json" 2> "$OUT/bench_8layers.log" | tee "$OUT/bench_8layers.txt"
grep -c "Recompiling" "$OUT/bench_8layers.log" | sed 's/^/recompile messages in the log: /' | tee -a "$OUT/gpu_check.txt"
stamp "bench, $CONFIG at $LENGTHS, bf16"

timeout 60 python3 bench.py --device "$DEVICE" --dtype float32 --random-weights "$OUT/tiny.json" --lengths 400 \
    --methods snapkv,pyramidkv --budget 256 --recompute-heads 1 --new-tokens 16 --compile-new-tokens 16 --warmup 2 \
    --json "$OUT/bench_tiny_float32.json" 2>&1 | tee "$OUT/bench_tiny_float32.txt"
stamp "bench, tiny shape, float32"

python3 - "$OUT"/bench_8layers.json "$OUT"/bench_tiny_float32.json <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.txt"
import json, sys
for path in sys.argv[1:]:
    try:
        run = json.load(open(path))
        rows, on_gpu = run["rows"], run.get("meta", {}).get("device", "").startswith("cuda")
    except (OSError, ValueError, KeyError) as e:
        print(f"{path}: no rows ({e})")
        continue
    print(path)
    for r in rows:
        if r.get("mode") != "compile":
            continue
        line = f"  {r['length']} x {r['batch']} {r['row']}: compiled again after the first step: {r.get('recompiles')}"
        calibrate_only = [c for c in rows if c.get("mode") == "compile" and c["length"] == r["length"]
                          and c["batch"] == r["batch"] and c["row"] == f"{r['method']} calidrop -1"]
        if on_gpu and r.get("kv_bytes_offloaded") and calibrate_only:  # on a CPU the store is in the peak
            extra = r["peak_memory_bytes"] - calibrate_only[0]["peak_memory_bytes"]
            verdict = "store copied into the graph pool?" if extra > r["kv_bytes_offloaded"] / 2 else "store not copied"
            line += (f"; peak memory over calibrate-only {extra / 2**20:.0f} MB, offload store "
                     f"{r['kv_bytes_offloaded'] / 2**20:.0f} MB: {verdict}")
        print(line)
EOF
stamp "done"
