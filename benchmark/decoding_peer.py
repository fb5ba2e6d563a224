"""kvpress 0.5.5's DecodingPress on our decode-time eviction task: the peer of issue 32's head-to-head.

Runs kvpress's own presses (not a re-implementation) through transformers on the same checkpoint, tokens and
positions as evaluate.py's long-continuation task, and reports NLL and KL(P_full || P_press) per block of 256
positions and the bytes each cache holds. kvpress 0.5.5 needs transformers < 5.3, so this module runs in its own
virtual environment (not committed; the main environment keeps its transformers):

    python -m venv --system-site-packages .venv-kvpress
    .venv-kvpress/bin/pip install kvpress==0.5.5 "transformers<5.3" "kernels>=0.10.2,<0.11"
    .venv-kvpress/bin/python -m benchmark.decoding_peer --ckpt smollm2-135m --segments 8 --new-tokens 2048 \\
        --out results/long/peer_smollm2

(transformers 5.2 refuses to import beside the system's kernels 0.19, hence the kernels pin; torch comes from the
system site-packages.)

The task. Segments are evaluate.py's: `segments(codec, kjv_text(), S, 1024 + T + 1)`. The first 1,024 tokens of a
row are the prompt, prefilled at once; then for t in 0..T-1 the model is fed token 1024+t at position 1024+t and
predicts token 1025+t (teacher forcing): the NLL of that true token, and KL(P_full || P_press) of its next-token
distribution against the full cache's at the same position. Blocks are predictions 0-255, 256-511, ... of the T.
The reference is the full cache (a DynamicCache), teacher-forced token by token from the same 1,024-token prefill.

The kvpress configuration, per scorer X (SnapKVPress, StreamingLLMPress, ExpectedAttentionPress):

    PrefillDecodingPress(
        prefilling_press=X(compression_ratio=1 - 256/1024 = 0.75, ...),
        decoding_press=DecodingPress(base_press=X(compression_ratio=0.0, ...), compression_interval=64,
                                     target_size=256, hidden_states_buffer_size=256))

applied as KVPressTextGenerationPipeline._forward applies it: the prompt is prefilled through `model.model` inside
`with press(model):` (forward hooks on every layer's self_attn; PrefillDecodingPress hands the prefill to its
prefilling press, which keeps int(1024 * 0.25) = 256 tokens per (layer, KV head)), then the tokens are fed one at a
time inside a second `with press(model):` with explicit position_ids (as the pipeline's generate_answer passes them:
after compression the cache's length is not the position). Why this is "capped at 256 per KV head, compressing every
64 steps": DecodingPress's hook counts the decoding forward passes of each layer and, on the 64th since the last
compression, compresses that layer's cache to exactly target_size=256 tokens (it searches the compression ratio so
that int(k_len * (1 - ratio)) == 256 and hands it to the base scorer, which keeps the top-256 scores per (layer, KV
head)). The compression runs after the layer's attention of that step, so the cache holds 256 + 1..64 tokens while
attending (320 at the step that compresses) and 256..319 between steps; the script reads those sizes from the
cache's tensors rather than assuming them.

Scorer settings (set by flags; defaults match calidrop.CaliDropConfig's where it has one): SnapKV window_size=32,
kernel_size=5 (kvpress's default window 64 cannot run with a 64-step interval: DecodingPress buffers exactly 64 hidden
states per compression and SnapKVPress.score asserts that the buffer is longer than the window); StreamingLLM
n_sink=32; ExpectedAttention kvpress's defaults (n_future_positions=512, n_sink=4, covariance and value norms).
Attention is transformers' sdpa (kvpress's path that scores from DecodingPress's buffered hidden states; with eager
attention SnapKV would score from the current query's attention row alone).

What kvpress 0.5.5 does under DecodingPress, read in its source and seen in results.json's `layer0_kept` (the
positions each press holds in layer 0 at the end, matched against the full cache's keys):
- ScorerPress.compress gathers the kept tokens in top-k order, not position order (NVIDIA/kvpress#173). On CPU
  torch.topk returns ties in no particular order, and StreamingLLMPress scores by ties (1 kept, 0 evicted) and
  reads sinks and recent window off the cache's order: after the first decoding cut it holds neither its sinks
  nor the newest tokens (KL ~1 nat). --keep-order sorts the kept indices (the one patch of kvpress, a separate
  run reported as NAME+order).
- SnapKVPress rotates all its window's buffered queries with the current step's RoPE (position_embeddings holds
  one position while decoding); ExpectedAttentionPress averages RoPE over positions len(buffer) .. +512 (64 ..
  575 here) rather than the positions that follow, and drops the buffer's first n_sink hidden states.

The segments run as one batch (the presses score each row on its own; all rows have the same length, so no mask),
the reference and the presses in lockstep (module copies sharing the weights, one per press), so that the full
cache's distribution at each position is compared without storing it. results.json holds the settings, and per
scorer the per-segment and per-block means, mean +- standard error over segments, bytes held and wall time.
"""
import argparse
import copy
import json
import math
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress
from kvpress import (DecodingPress, ExpectedAttentionPress, PrefillDecodingPress, SnapKVPress,
                     StreamingLLMPress)

SCORERS = {
    "snapkv": lambda a, ratio: SnapKVPress(compression_ratio=ratio, window_size=a.window, kernel_size=a.kernel),
    "streamingllm": lambda a, ratio: StreamingLLMPress(compression_ratio=ratio, n_sink=a.sink),
    "expected_attention": lambda a, ratio: ExpectedAttentionPress(compression_ratio=ratio),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def keep_position_order():
    """The one deviation from kvpress, only with --keep-order: ScorerPress.compress with the kept indices sorted,
    so that the cache stays in position order. kvpress 0.5.5 gathers them in top-k order (NVIDIA/kvpress#173,
    acknowledged as overlooked); presses that read positions off the cache's order (StreamingLLM's sinks and
    recent window, SnapKV's pooling over neighbours) then see a scrambled cache after the first compression.
    Otherwise the method below is kvpress 0.5.5's, line for line."""
    from kvpress.presses.scorer_press import ScorerPress
    from kvpress.utils import compute_n_kept

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        indices = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values  # the added sort
        indices = indices.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
        return keys.gather(2, indices).contiguous(), values.gather(2, indices).contiguous()

    ScorerPress.compress = compress


def make_press(scorer, args, prompt_len):
    """kvpress's prefill + decoding press for one scorer: the prompt cut to target_size at prefill, then back to
    target_size every `interval` decoding steps."""
    ratio = 1 - args.target_size / prompt_len
    return PrefillDecodingPress(
        prefilling_press=SCORERS[scorer](args, ratio),
        decoding_press=DecodingPress(base_press=SCORERS[scorer](args, 0.0), compression_interval=args.interval,
                                     target_size=args.target_size))


def load_model(ckpt, attn="sdpa"):
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation=attn).eval()


def share_weights_copy(model):
    """A copy of the model's modules (so that hooks on one do not fire on the other) sharing its parameters."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def attn_modules(model):
    return [layer.self_attn for layer in model.model.layers]


class Stream:
    """One model copy, its cache and (optionally) a kvpress press, teacher-forced one token a step. Records the
    K/V tokens per (layer, KV head) and bytes its cache holds: when each layer attends (read by a hook that runs
    before kvpress's, i.e. before the press compresses) and after each step."""

    def __init__(self, model, press=None):
        self.model, self.press, self.cache = model, press, DynamicCache()
        self.seconds = 0.0
        self.attending = {}          # layer -> (tokens per head, K+V bytes) when that layer last attended
        self.peak_attend_tokens = 0  # the most tokens any (layer, KV head) attended over, decode only
        self.peak_attend_bytes = 0   # the most bytes summed over layers as they attended in one step, decode only
        self.peak_step_tokens = 0    # the most tokens a (layer, KV head) held after a decoding step
        self.peak_step_bytes = 0
        self.prefill_peak_tokens = self.prefill_peak_bytes = 0
        self.sizes_after_step = []   # tokens per (layer, head) after each step: (min over layers, max over layers)
        self.hooks = [m.register_forward_hook(self._record, with_kwargs=True) for m in attn_modules(model)]
        self.stack = ExitStack()

    def _record(self, module, args, kwargs, output):
        layer = self.cache.layers[module.layer_idx]
        self.attending[module.layer_idx] = (layer.keys.shape[2], layer.keys.nbytes + layer.values.nbytes)

    def held(self):
        """(tokens per (layer, KV head): min, max over layers; K+V bytes of all layers) read from the tensors."""
        lens = [layer.keys.shape[2] for layer in self.cache.layers]
        assert all(layer.keys.shape[2] == layer.values.shape[2] for layer in self.cache.layers)
        return min(lens), max(lens), sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)

    @torch.inference_mode()
    def prefill(self, prompt):
        """The prompt through model.model (no LM head: its logits are not scored) inside the press, as
        KVPressTextGenerationPipeline does; then the decoding press is entered for the rest of the run."""
        t0 = time.perf_counter()
        with self.press(self.model) if self.press is not None else nullcontext():
            self.model.model(input_ids=prompt, past_key_values=self.cache)
        self.seconds += time.perf_counter() - t0
        self.prefill_peak_tokens = max(n for n, _ in self.attending.values())
        self.prefill_peak_bytes = sum(b for _, b in self.attending.values())
        if self.press is not None:
            self.stack.enter_context(self.press(self.model))
        self.attending.clear()

    @torch.inference_mode()
    def step(self, tokens, position):
        """Feeds tokens (B,) at `position`; returns the next-token log-probs (B, V) in float64."""
        t0 = time.perf_counter()
        pos = torch.full((tokens.shape[0], 1), position, dtype=torch.long)
        out = self.model(input_ids=tokens[:, None], past_key_values=self.cache, position_ids=pos, use_cache=True)
        logp = torch.log_softmax(out.logits[:, -1].double(), dim=-1)
        self.seconds += time.perf_counter() - t0
        self.peak_attend_tokens = max(self.peak_attend_tokens, max(n for n, _ in self.attending.values()))
        self.peak_attend_bytes = max(self.peak_attend_bytes, sum(b for _, b in self.attending.values()))
        lo, hi, nbytes = self.held()
        self.sizes_after_step.append((lo, hi))
        self.peak_step_tokens = max(self.peak_step_tokens, hi)
        self.peak_step_bytes = max(self.peak_step_bytes, nbytes)
        return logp

    def close(self):
        self.stack.close()
        for h in self.hooks:
            h.remove()


def teacher_force(model, rows, prompt_len, n_new, presses, on_step=None):
    """rows (B, prompt_len + n_new + 1) token ids. The full cache and each press (name -> press or None) run in
    lockstep. Returns the reference's and each press's per-token NLL (B, n_new), each press's per-token
    KL(P_full || P_press) (B, n_new), and the Streams (sizes, seconds)."""
    copies = {name: share_weights_copy(model) for name in presses}  # before any hook is registered
    ref = Stream(model)
    streams = {name: Stream(copies[name], press) for name, press in presses.items()}
    prompt = rows[:, :prompt_len]
    B = rows.shape[0]
    nll_ref = torch.zeros(B, n_new, dtype=torch.float64)
    nll = {n: torch.zeros(B, n_new, dtype=torch.float64) for n in streams}
    kl = {n: torch.zeros(B, n_new, dtype=torch.float64) for n in streams}
    try:
        for s in [ref, *streams.values()]:
            s.prefill(prompt)
        for t in range(n_new):
            fed, target = rows[:, prompt_len + t], rows[:, prompt_len + t + 1]
            logp_ref = ref.step(fed, prompt_len + t)
            nll_ref[:, t] = -logp_ref.gather(1, target[:, None])[:, 0]
            p_ref = logp_ref.exp()
            for name, s in streams.items():
                logp = s.step(fed, prompt_len + t)
                nll[name][:, t] = -logp.gather(1, target[:, None])[:, 0]
                kl[name][:, t] = (p_ref * (logp_ref - logp)).sum(-1)
            if on_step is not None:
                on_step(t, ref, streams, nll_ref, nll, kl)
    finally:  # the hooks off the (shared) model, the presses' contexts left
        for s in [ref, *streams.values()]:
            s.close()
    return nll_ref, nll, kl, ref, streams


def mean_se(values):
    """Mean and standard error over segments (values: a list of floats)."""
    n = len(values)
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


def summarize(per_token, block):
    """per_token (S, T): per-segment mean, per-block per-segment means, and mean +- s.e. over segments of both."""
    S, T = per_token.shape
    per_segment = per_token.mean(1).tolist()
    blocks = per_token.view(S, T // block, block).mean(2)  # (S, n_blocks)
    per_block = [mean_se(blocks[:, b].tolist()) for b in range(blocks.shape[1])]
    m, se = mean_se(per_segment)
    return {"per_segment": per_segment, "per_block_per_segment": blocks.tolist(), "mean": m, "se": se,
            "per_block_mean": [p[0] for p in per_block], "per_block_se": [p[1] for p in per_block]}


@torch.inference_mode()
def kept_positions(ref, s, layer=0):
    """The positions whose K/V a press cache holds in `layer` (B, Hkv, n), found by matching each held key to the
    full cache's keys of that layer (nearest; in layer 0 a key depends only on its token and position, so the
    match is exact up to rounding), and the largest match distance. kvpress keeps the tokens in top-k order, not
    position order, so position is read this way."""
    full, held = ref.cache.layers[layer].keys, s.cache.layers[layer].keys
    d = torch.cdist(held, full)
    best = d.min(-1)
    return best.indices, best.values.max().item()


def cache_report(s, batch):
    lo, hi, nbytes = s.held()
    return {"tokens_per_layer_head_end": hi, "tokens_per_layer_head_end_min": lo,
            "bytes_end": nbytes // batch,
            "tokens_per_layer_head_peak_between_steps": s.peak_step_tokens,
            "bytes_peak_between_steps": s.peak_step_bytes // batch,
            "tokens_per_layer_head_peak_attending": s.peak_attend_tokens,
            "bytes_peak_attending": s.peak_attend_bytes // batch,
            "tokens_per_layer_head_prefill_before_compression": s.prefill_peak_tokens,
            "bytes_prefill_before_compression": s.prefill_peak_bytes // batch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="smollm2-135m")
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--target-size", type=int, default=256)
    p.add_argument("--interval", type=int, default=64)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--scorers", default="snapkv,streamingllm,expected_attention")
    p.add_argument("--window", type=int, default=32, help="SnapKV's window_size")
    p.add_argument("--kernel", type=int, default=5, help="SnapKV's kernel_size")
    p.add_argument("--sink", type=int, default=32, help="StreamingLLM's n_sink")
    p.add_argument("--keep-order", action="store_true",
                   help="patch kvpress to keep the cache in position order (see keep_position_order); "
                        "the scorers are then reported as NAME+order")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.new_tokens % args.block:
        p.error("--new-tokens must be a multiple of --block")

    from common import TextCodec, kjv_text, resolve_checkpoint  # the repo root on sys.path (python -m)
    from evaluation.data import segments

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(args.ckpt)
    codec = TextCodec(ckpt)
    rows = torch.tensor(segments(codec, kjv_text(), args.segments, args.prompt + args.new_tokens + 1))
    model = load_model(ckpt)
    cfg = model.config
    scorers = args.scorers.split(",")
    if args.keep_order:
        keep_position_order()
    presses = {name + ("+order" if args.keep_order else ""): make_press(name, args, args.prompt) for name in scorers}
    log(f"{args.ckpt}: {args.segments} segments x ({args.prompt} + {args.new_tokens}) tokens, "
        f"scorers {scorers}, kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}")

    t_start = time.perf_counter()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(t, ref, streams, nll_ref, nll, kl):
        if (t + 1) % 64 == 0 or t + 1 == args.new_tokens:
            el = time.perf_counter() - t_start
            eta = el / (t + 1) * (args.new_tokens - t - 1)
            sizes = ", ".join(f"{n} {s.sizes_after_step[-1][1]}" for n, s in streams.items())
            log(f"  step {t + 1}/{args.new_tokens}  {el:.0f} s elapsed, ETA {eta:.0f} s  (tokens/head: {sizes})")
        if (t + 1) % args.block == 0 and t + 1 < args.new_tokens:  # partial results, whole blocks so far
            write(out, report(args, ckpt, model, presses, rows, t + 1, nll_ref, nll, kl, ref, streams,
                              time.perf_counter() - t_start))

    nll_ref, nll, kl, ref, streams = teacher_force(model, rows, args.prompt, args.new_tokens, presses, progress)
    results = report(args, ckpt, model, presses, rows, args.new_tokens, nll_ref, nll, kl, ref, streams,
                     time.perf_counter() - t_start)
    for name, r in results["scorers"].items():
        log(f"{name}: NLL {r['nll']['mean']:.4f} +- {r['nll']['se']:.4f} (full {results['full']['nll']['mean']:.4f}), "
            f"KL {r['kl']['mean']:.4f} +- {r['kl']['se']:.4f}, {r['cache']['bytes_end']} B at the end, "
            f"{r['seconds']:.0f} s")
    write(out, results)


def write(out, results):
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {out / 'results.json'} ({results['positions_done']}/{results['settings']['new_tokens']} positions, "
        f"{results['wall_seconds']:.0f} s)")


def report(args, ckpt, model, presses, rows, done, nll_ref, nll, kl, ref, streams, wall):
    """results.json's content over the first `done` predicted positions (a whole number of blocks)."""
    cfg = model.config
    B = rows.shape[0]
    from importlib.metadata import version
    results = {
        "settings": {
            "kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__,
            "checkpoint": args.ckpt, "checkpoint_dir": str(ckpt), "model_type": cfg.model_type,
            "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "dtype": "float32", "attn_implementation": model.config._attn_implementation,
            "segments": args.segments, "prompt": args.prompt, "new_tokens": args.new_tokens, "block": args.block,
            "interval": args.interval, "target_size": args.target_size, "threads": args.threads, "seed": args.seed,
            "keep_order": args.keep_order,
            "batch": "all segments in one batch; reference and presses in lockstep",
            "configuration": {name: repr(press) for name, press in presses.items()},
        },
        "positions_done": done,
        "full": {"nll": summarize(nll_ref[:, :done], args.block), "cache": cache_report(ref, B),
                 "seconds": ref.seconds},
        "scorers": {},
        "wall_seconds": wall,
    }
    for name, s in streams.items():
        results["scorers"][name] = {
            "nll": summarize(nll[name][:, :done], args.block), "kl": summarize(kl[name][:, :done], args.block),
            "delta_nll": summarize(nll[name][:, :done] - nll_ref[:, :done], args.block),
            "cache": cache_report(s, B), "seconds": s.seconds,
            "sizes_after_step_first_130": s.sizes_after_step[:130],
        }
        pos, dist = kept_positions(ref, s)
        pos = pos.sort(-1).values
        total = args.prompt + done
        recent = args.target_size - args.sink
        results["scorers"][name]["layer0_kept"] = {
            "positions_segment0": pos[0].tolist(), "match_distance_max": dist,
            f"fraction_in_first_{args.sink}": (pos < args.sink).double().mean().item(),
            f"fraction_in_last_{recent}": (pos >= total - recent).double().mean().item(),
            "fraction_in_prompt": (pos < args.prompt).double().mean().item()}
    return results


if __name__ == "__main__":
    main()
