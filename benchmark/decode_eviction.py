"""What eviction while decoding costs: the cut (score, select, accumulate, merge, store and sketch writes) per
layer and per cut, amortised over the interval's steps, against the decode step itself.

    python -m benchmark.decode_eviction                 # the default model, 1,024-token prompt, budget 256
    python -m benchmark.decode_eviction --interval 32 --method h2o

One thread, eager (a cut runs between compiled steps, eagerly, in generate.py too), float32. Times are the
thread's CPU time (time.thread_time): with one thread the compute, whatever else the machine runs. Each
method decodes --steps teacher-forced tokens of KJV text after the prompt; the first interval's steps are
left out (warm-up); "step" is a decode step without a cut, "cut" the make_room call that cut every layer.
"""
import argparse
import statistics
import time

import torch

import calidrop
from common import TextCodec, kjv_text, resolve_checkpoint
from evaluation.data import segments
from model import FullCache, decode_one_token, load_model, prefill


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--methods", default="snapkv,h2o,streamingllm")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--interval", type=int, default=64)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--steps", type=int, default=320)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    ckpt = resolve_checkpoint(args.ckpt)
    model = load_model(ckpt)
    tokens = torch.tensor(segments(TextCodec(ckpt), kjv_text(), 1, args.prompt + args.steps))
    L = args.prompt
    print(f"{ckpt.name}, prompt {L}, budget {args.budget}, interval {args.interval}, one thread, CPU time per "
          f"call (thread_time), median")
    for method in args.methods.split(","):
        config = calidrop.CaliDropConfig(method=method, budget=args.budget, interval=args.interval)
        full = FullCache(model.args, 1, L)
        recorder = calidrop.PrefillRecorder(full, config.window, method == "h2o")
        prefill(model, tokens[:, :L], recorder)
        cache = calidrop.CaliDropCache.from_prefill(config, full.k, full.v, recorder, args.steps, inv_freq=model.inv_freq)
        steps, cuts = [], []
        for t in range(L, L + args.steps):
            t0 = time.thread_time()
            cache.make_room(t)
            t1 = time.thread_time()
            decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache)
            t2 = time.thread_time()
            if t - L >= args.interval:
                (cuts if cache.layers[0].cut_pos == t else steps).append((t1 - t0, t2 - t1))
        step = statistics.median(s for _, s in steps)
        cut = statistics.median(c for c, _ in cuts)
        print(f"{method:13s} step {step * 1e3:7.2f} ms, cut {cut * 1e3:7.2f} ms ({len(cuts)} cuts, "
              f"{cut / len(cache.layers) * 1e3:.2f} ms a layer): {cut / args.interval * 1e3:.2f} ms a step "
              f"amortised, {cut / args.interval / step:.1%} of the step")


if __name__ == "__main__":
    main()
