"""Kernels per decode step: what inductor generates for the compiled step of the full cache, eviction,
calibrate-only and a recomputing CaliDrop, counted from its output code, per layer.

    python -m benchmark.kernels                        # Llama-3-8B's layer shape, 2 layers, 8k and 32k
    python -m benchmark.kernels --device cuda          # the same, Triton kernels on a GPU

On a CPU the output code is C++ kernels (`cpp_fused_*`) and calls into ATen (`extern_kernels.*`, `aten.*`,
custom ops): a proxy of the launches a GPU step makes, where each is a kernel launch (Triton kernels
`triton_*`, cuBLAS matmuls). The model is random weights at Llama-3-8B's layer shape with 2 layers (a layer's
kernels do not depend on the depth); the recomputing row recomputes 2 of the 8 KV heads in every layer-step
(bench.py's --recompute-heads 2: theta1 = 1, a reload capacity of 2 pairs), reading `--reload-pages` pages
(auto: max(12, 1/16 of the evicted pages)) from a store in host memory. Per layer = the recomputing step's
kernels less calibrate-only's, over the layers.
"""
import argparse
import re
from collections import Counter

import torch
from torch._inductor.utils import run_and_get_code

import calidrop
from common import offload_store
from model import RANDOM_CONFIGS, FullCache, decode_one_token, prefill, random_model

KERNEL_CALL = re.compile(r"^\s+(?:\w+ = )?(?:buf\w* = )?((?:cpp_fused|triton)_\w+|extern_kernels\.\w+|"
                         r"torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)[.(]", re.M)


def launches(code):
    """The kernel calls of inductor's output code (its `call` function), by name stem."""
    body = code[code.index("def call("):] if "def call(" in code else code
    names = KERNEL_CALL.findall(body)
    return Counter(re.sub(r"_\d+$", "", re.sub(r"^(cpp_fused|triton_\w+?)_.*", r"\1", n)) for n in names)


def count_step(model, cache, token, pos):
    """Kernels of one compiled decode step (fullgraph, static shapes, as bench.py compiles it)."""
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
    _, codes = run_and_get_code(step, model, token, pos, cache)
    total = Counter()
    for code in codes:
        total += launches(code)
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default="8064,32640", help="prompt lengths, comma-separated")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reload-pages", default="auto")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = dict(RANDOM_CONFIGS["llama3-8b"], num_hidden_layers=args.layers, max_position_embeddings=33000,
                  vocab_size=1024)
    model = random_model(config, device, dtype, seed=0)
    pages = args.reload_pages if args.reload_pages == "auto" else int(args.reload_pages)
    rows = {"full": None, "evict": dict(calibration=False), "calibrate-only": dict(theta1=-1.0),
            "recompute 2/8": dict(theta1=1.0, theta2=2.0, reload_capacity=2, reload_pages=pages)}
    torch.set_grad_enabled(False)
    for L in map(int, args.lengths.split(",")):
        tokens = torch.randint(0, 1024, (1, L), device=device, generator=torch.Generator(device).manual_seed(0))
        full = FullCache(model.args, 1, L + 2, device, dtype)
        recorder = calidrop.PrefillRecorder(full, 32)
        prefill(model, tokens, recorder)
        counts = {}
        for name, settings in rows.items():
            if settings is None:
                cache = full
            else:
                cache = calidrop.CaliDropCache.from_prefill(
                    calidrop.CaliDropConfig(budget=256, **settings), [k[:, :, :L] for k in full.k],
                    [v[:, :, :L] for v in full.v], recorder, 2, offload_store(device), model.inv_freq)
            counts[name] = count_step(model, cache, tokens[:, -1:], torch.tensor([L], device=device))
        pages_read = cache.layers[0].pages
        print(f"prompt {L} tokens, {device.type}, {args.layers} layers; recompute reads "
              f"{'every evicted token' if pages_read is None else f'{pages_read.pages} pages of 16'}")
        for name, c in counts.items():
            print(f"  {name:16s} {sum(c.values()):4d} kernel calls  " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        extra = counts["recompute 2/8"] - counts["calibrate-only"]
        print(f"  recompute over calibrate-only, per layer: {sum(extra.values()) / args.layers:.1f}  "
              + ", ".join(f"{k} {v / args.layers:g}" for k, v in sorted(extra.items())))


if __name__ == "__main__":
    main()
