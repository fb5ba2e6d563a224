"""Generate text from a Llama checkpoint with a compressed (CaliDrop) or full KV cache.

    python generate.py --budget 256 --prompt "..."        # the default model, SmolLM2-135M-Instruct
    python generate.py --ckpt DIR --method snapkv --budget 128 --prompt-file long.txt --chat
    python generate.py --budget 64 --prompt "..." --prompt "..."   # several prompts: one left-padded batch

Text streams to stdout (several prompts: each text once the batch is done); a summary (prompt and new tokens, prefill seconds, decode tokens/s, KV bytes,
decision fractions) goes to stderr, and to --stats-json FILE as one JSON object.
"""
import argparse
import json
import time
from pathlib import Path

import torch

import calidrop
import ott
from common import (CKPT_HELP, HelpFormatter, TextCodec, UsageError, add_reload_args, bytes_read_per_token,
                    cache_stats, checked_config, compiled_graphs, log, offload_store, resolve_checkpoint, resolve_device,
                    run_cli, synchronize, weight_bytes)
from model import FullCache, decode_one_token, load_model, prefill, read_config


# -------------------------------------------------------------------------------- caches, sampling

def make_config(args) -> calidrop.CaliDropConfig:
    """The CaliDrop settings of the command line (a UsageError if they are wrong). The OTT store reads a whole
    layer (its groups and outlier pools span it), so with --offload-quant ott a recompute reads every page."""
    return checked_config(
        method=args.method, budget=args.budget, window=args.window, sink=args.sink, theta1=args.theta1,
        theta2=args.theta2, calibration=not args.no_calibration, calibration_size=args.calibration_size,
        page_size=args.page_size, reload_pages=None if args.offload_quant == "ott" else args.reload_pages,
        reload_capacity=args.reload_capacity, interval=args.interval, estimate=args.estimate)


def make_store(args, device):
    """Where CaliDrop keeps the evicted K/V: host memory when the model runs on a GPU, at --offload-quant."""
    host = torch.device("cpu") if device.type == "cuda" else device
    if args.offload_quant == "int8":
        return ott.Int8Store(host)
    if args.offload_quant == "ott":
        return ott.OTTStore(host, bits=args.kv_bits, group=args.group, outliers=args.outliers)
    return offload_store(device)


def prefill_and_compress(model, tokens, config, max_new_tokens, store=None, pads=None):
    """One prefill with the full cache; then, unless config is None (the full cache) or the prompt fits
    in the budget, compress it, offloading the evicted K/V to `store` (default: calidrop.OffloadStore).
    pads (B,): tokens is a left-padded batch (left_pad). Returns (logits of the last prompt token, cache)."""
    B, L = tokens.shape
    dev, dtype = tokens.device, model.embed_tokens.weight.dtype
    if config is None or (L <= config.budget and not config.interval):
        cache = FullCache(model.args, B, L + max_new_tokens, dev, dtype, pads)
        return prefill(model, tokens, cache, pads), cache
    full = FullCache(model.args, B, L, dev, dtype, pads)
    recorder = calidrop.PrefillRecorder(full, config.window, config.method == "h2o", pads)
    logits = prefill(model, tokens, recorder, pads)
    cache = calidrop.CaliDropCache.from_prefill(config, full.k, full.v, recorder, max_new_tokens, store,
                                                model.inv_freq)
    return logits, cache


def left_pad(prompts, device):
    """Prompts of token ids -> tokens (B, longest) with each prompt at the right, pads (B,): the padding
    before each (None for a single prompt). The pad slots hold token 0, which no sequence ever attends."""
    L = max(len(ids) for ids in prompts)
    tokens = torch.tensor([[0] * (L - len(ids)) + ids for ids in prompts], device=device)
    return tokens, None if len(prompts) == 1 else torch.tensor([L - len(ids) for ids in prompts], device=device)


def sample(logits, temperature, top_k, generator):
    """logits (B, vocab) -> next tokens (B, 1); temperature 0 is greedy. On the logits' device with no host
    sync: argmax of probs / Exp(1) noise draws from probs (the exponential race, as gpt-fast does)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    noise = torch.empty_like(logits).exponential_(1, generator=generator)
    return (logits.softmax(-1) / noise).argmax(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- CLI

def build_parser(description=__doc__, everything=True):
    """generate.py's flags; without `everything`, those that the transformers CLI (examples/transformers_generate.py)
    takes too: no sampling, --compile, --calibration-size, --offload-quant or whole-cache quantization."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", help=CKPT_HELP)
    p.add_argument("--prompt", action="append", default=[],
                   help="the prompt text (several: one batch of prompts of different lengths, left-padded)")
    p.add_argument("--prompt-file", action="append", default=[], help="read a prompt from this file (as --prompt)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat format")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens at most: fewer where a stop token comes")
    if everything:
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
        p.add_argument("--seed", type=int, default=0, help="of the sampling")
        p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--stats-json", help="write the run's numbers to this file as one JSON object")
    g = p.add_argument_group("KV-cache compression")
    g.add_argument("--method", default="snapkv", help="full, " + ", ".join(calidrop.METHODS))
    g.add_argument("--budget", type=int, default=256, help="prompt tokens kept per layer and KV head")
    g.add_argument("--no-calibration", action="store_true", help="plain eviction, no CaliDrop")
    g.add_argument("--theta1", type=float, default=0.7,
                   help="recompute when cos(q, hist_q) < theta1; > 1: at every step, <= -1: never")
    g.add_argument("--theta2", type=float, default=0.85,
                   help="calibrate when cos(q, hist_q) > theta2 (> theta1 unless theta1 is an extreme; > 1: never)")
    g.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    g.add_argument("--sink", type=int, default=32, help="StreamingLLM sink tokens")
    g.add_argument("--estimate", default="paper", choices=calidrop.ESTIMATES,
                   help="what a calibrate decision merges: the history as it is (paper), or its lse followed to the "
                        "current query to first order (first-order: D more values per head)")
    g.add_argument("--interval", type=int, default=None,
                   help="decode-time eviction: every N new tokens the kept cache is cut back to --budget, what it "
                        "evicts calibrated with and offloaded (default: the budget applies to the prompt only)")
    if everything:
        g.add_argument("--calibration-size", type=int, default=None,
                       help="offload and calibrate with only this many evicted tokens (default: all)")
        g.add_argument("--offload-quant", default="none", help="storage of CaliDrop's evicted K/V: none, int8, ott")
    add_reload_args(g)
    if everything:
        q = p.add_argument_group("KV-cache quantization (ott.py)")
        q.add_argument("--kv-quant", default="none", help="none, kivi, ott: quantize the whole cache (--method full)")
        q.add_argument("--kv-bits", default="2", help="2, 4, 8, or 16 / none (no quantization)")
        q.add_argument("--outliers", type=int, default=3, help="OTT's full-precision outlier tokens per KV head")
        q.add_argument("--group", type=int, default=128, help="tokens per quantization group (keys per channel)")
        q.add_argument("--residual", type=int, default=32, help="recent tokens kept in full precision")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    """Everything that can be wrong with the input, before any heavy work. Returns (device, dtype)."""
    if not args.prompt and not args.prompt_file:
        raise UsageError("give a prompt: --prompt or --prompt-file")
    for path in args.prompt_file:
        if not Path(path).is_file():
            raise UsageError(f"prompt file not found: {path}")
    args.prompts = args.prompt + [Path(path).read_text() for path in args.prompt_file]
    if not all(prompt.strip() for prompt in args.prompts):
        raise UsageError("a prompt is empty")
    if args.interval is not None and args.offload_quant != "none":
        raise UsageError("--interval writes the tokens it evicts into the offload store as they come: not with "
                         "--offload-quant")
    if len(args.prompts) > 1 and (args.kv_quant != "none" or args.offload_quant != "none"):
        raise UsageError("several prompts: --kv-quant and --offload-quant take one prompt (their quantization "
                         "groups would span the padding)")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be >= 1 (leave it out to sample from every token)")
    device, dtype = resolve_device(args.device, args.dtype)
    if args.method != "full":
        make_config(args)
    check_quantization(args)
    return device, dtype


def check_quantization(args):
    args.kv_bits = 16 if args.kv_bits == "none" else int(args.kv_bits) if args.kv_bits.isdigit() else args.kv_bits
    if args.kv_bits not in ott.BITS:
        raise UsageError(f"unknown --kv-bits {args.kv_bits!r} (2, 4, 8, 16 or none)")
    if args.kv_quant not in ("none", "kivi", "ott"):
        raise UsageError(f"unknown --kv-quant {args.kv_quant!r} (none, kivi or ott)")
    if args.offload_quant not in ("none", "int8", "ott"):
        raise UsageError(f"unknown --offload-quant {args.offload_quant!r} (none, int8 or ott)")
    if args.kv_quant != "none" and args.method != "full":
        raise UsageError("--kv-quant quantizes the full-length cache: use it with --method full")
    if args.kv_quant != "none" and args.compile:
        raise UsageError("--kv-quant grows its tensors as tokens come: it cannot be used with --compile")
    if args.group <= args.outliers or args.residual < 0:
        raise UsageError("--group must be larger than --outliers, and --residual >= 0")


def run(args):
    device, dtype = check_args(args)
    ckpt = resolve_checkpoint(args.ckpt)
    model_args = read_config(ckpt)
    codec = TextCodec(ckpt)
    prompts = [codec.encode(prompt, chat=args.chat) for prompt in args.prompts]
    longest = max(len(ids) for ids in prompts)
    max_len = model_args.max_position_embeddings
    if longest > max_len:
        raise UsageError(f"the prompt is {longest} tokens, longer than the model's context ({max_len})")
    max_new = min(args.max_new_tokens, max_len - longest)
    if max_new < args.max_new_tokens:
        log(f"note: the context has room for {max_new} new tokens only")
    config = None if args.method == "full" else make_config(args)  # already checked
    if config is not None and longest <= config.budget and not config.interval:
        log(f"note: the prompt ({longest} tokens) fits in the budget ({config.budget}): not compressed")

    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    model = load_model(ckpt, device, dtype)
    step = torch.compile(decode_one_token) if args.compile else decode_one_token

    with torch.inference_mode():
        tokens, pads = left_pad(prompts, device)
        synchronize(device)
        t0 = time.perf_counter()
        if args.kv_quant != "none":
            cache = ott.QuantizedCache(model.args, 1, bits=args.kv_bits, group=args.group, residual=args.residual,
                                       outliers=args.outliers if args.kv_quant == "ott" else 0,
                                       device=device, dtype=dtype)
            logits = prefill(model, tokens, cache)
        else:
            logits, cache = prefill_and_compress(model, tokens, config, max_new, make_store(args, device), pads)
        token = sample(logits, args.temperature, args.top_k, generator)
        synchronize(device)
        prefill_s = time.perf_counter() - t0

        def next_token(token, pos):
            if args.interval:  # decode-time eviction cuts between steps, outside a compiled one
                cache.make_room(int(pos))
            return sample(step(model, token, pos, cache, pads), args.temperature, args.top_k, generator)
        if pads is not None:
            decoded = decode_batch(next_token, token, tokens.shape[1], max_new, codec, device)
            return finish_batch(args, ckpt, config, model, cache, device, dtype, prompts, prefill_s, *decoded)
        decoded = stream(next_token, token, longest, max_new, codec, device)
    return finish(args, ckpt, config, model, cache, device, dtype, longest, prefill_s, *decoded)


def stream(step, token, prompt_len, max_new, codec, device):
    """Decode up to max_new tokens from `token` (sampled from the prompt's last logits), printing the text as
    it comes; step(token, pos) -> the next token. Returns the new ids, their text and the seconds of each
    step, split into the steady ones and those that compiled something."""
    new_ids, text, step_s, compiling_s = [], "", [], []
    for i in range(max_new):
        new_ids.append(int(token))
        if new_ids[-1] in codec.stop_ids:
            break
        piece = codec.decode(new_ids)
        print(piece[len(text):], end="", flush=True)
        text = piece
        if i == max_new - 1:  # the last sampled token is never fed
            break
        token = timed_step(step, token, prompt_len + i, device, step_s, compiling_s)
    print(flush=True)
    return new_ids, text, step_s, compiling_s


def timed_step(step, token, slot, device, step_s, compiling_s):
    """step(token, pos) at slot -> the next token; its seconds go to step_s, or to compiling_s if it compiled
    something."""
    graphs = compiled_graphs()
    t0 = time.perf_counter()
    token = step(token, torch.tensor([slot], device=device))
    synchronize(device)
    (step_s if compiled_graphs() == graphs else compiling_s).append(time.perf_counter() - t0)
    return token


def decode_batch(step, token, prompt_len, max_new, codec, device):
    """stream() for a batch (B, 1) of first tokens: decode until every sequence has produced a stop token or
    max_new tokens, then print each text. Returns each sequence's new ids (cut after its first stop token)
    and text, the steps fed, and the seconds of each step as stream() splits them."""
    rows, step_s, compiling_s = [token], [], []
    stop = torch.tensor(sorted(codec.stop_ids), device=device, dtype=torch.long)
    done = torch.isin(token[:, 0], stop)
    for i in range(max_new - 1):  # the last sampled token is never fed
        if bool(done.all()):
            break
        token = timed_step(step, token, prompt_len + i, device, step_s, compiling_s)
        rows.append(token)
        done |= torch.isin(token[:, 0], stop)
    new_ids = []
    for row in torch.cat(rows, 1).tolist():
        ends = [j for j, t in enumerate(row) if t in codec.stop_ids]
        new_ids.append(row[:ends[0] + 1] if ends else row)
    texts = [codec.decode([t for t in ids if t not in codec.stop_ids]) for ids in new_ids]
    for b, text in enumerate(texts):
        print(f"--- prompt {b + 1}\n{text}", flush=True)
    return new_ids, texts, len(rows) - 1, step_s, compiling_s


def finish_batch(args, ckpt, config, model, cache, device, dtype, prompts, prefill_s, new_ids, texts, fed, step_s,
                 compiling_s):
    """finish() for a batch: the batch's stats (the cache's byte counts over every sequence and its padding,
    decode tokens/s over all sequences), and per sequence its prompt and new tokens, text and, compressed,
    its byte counts and decisions as alone."""
    L = max(len(ids) for ids in prompts)
    decode_s = sum(step_s)
    stats = {
        **run_settings(args, ckpt, config, cache, device, dtype), "batch": len(prompts),
        "prefill_s": prefill_s, "compile_s": sum(compiling_s), "decode_s": decode_s, "decode_tokens_per_s": len(step_s) * len(prompts) / decode_s if step_s else None,
        **cache_stats(cache, L + fed),
        "sequences": [{"prompt_tokens": len(ids), "new_tokens": len(new), "text": text,
                       **(cache.stats(L + fed, slice(b, b + 1)) if isinstance(cache, calidrop.CaliDropCache) else {})}
                      for b, (ids, new, text) in enumerate(zip(prompts, new_ids, texts))],
    }
    mb = 1 / 2**20
    tps = "n/a" if stats["decode_tokens_per_s"] is None else f"{stats['decode_tokens_per_s']:.1f}"
    log(f"{len(prompts)} prompts, prefill {prefill_s:.2f} s, decode {tps} tokens/s (all sequences)")
    for b, seq in enumerate(stats["sequences"]):
        kept = f", KV kept {seq['kv_bytes_kept'] * mb:.2f} of {seq['kv_bytes_full'] * mb:.2f} MB" if "kv_bytes_kept" in seq else ""
        d = seq.get("decisions")
        decisions = (f", calibrate {d['calibrate']:.3f} recompute {d['recompute']:.3f} none {d['none']:.3f}"
                     if d else "")
        log(f"prompt {b + 1}: {seq['prompt_tokens']} tokens, {seq['new_tokens']} new{kept}{decisions}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def finish(args, ckpt, config, model, cache, device, dtype, prompt_len, prefill_s, new_ids, text, step_s,
           compiling_s):
    """The run's stats: printed as the summary, written to --stats-json, returned."""
    fed = len(new_ids) - 1  # tokens whose K/V went into the cache during decoding
    decode_s = sum(step_s)  # the steady state: the steps that compiled something are in compile_s
    stats = {
        **run_settings(args, ckpt, config, cache, device, dtype), "prompt_tokens": prompt_len, "new_tokens": len(new_ids), "text": text,
        "prefill_s": prefill_s, "compile_s": sum(compiling_s), "decode_s": decode_s,
        "decode_tokens_per_s": len(step_s) / decode_s if step_s else None,
        **cache_stats(cache, prompt_len + fed),
    }
    add_derived(stats, model, device)
    report(stats)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def run_settings(args, ckpt, config, cache, device, dtype):
    """What a run was asked for, as every stats file records it; the quantization settings only where they
    quantize (--kv-bits counts only for --kv-quant and --offload-quant ott)."""
    quantization = {}
    if args.kv_quant != "none":
        quantization.update(kv_quant=args.kv_quant, kv_bits=args.kv_bits)
    if args.offload_quant != "none":
        quantization["offload_quant"] = args.offload_quant
        if args.offload_quant == "ott":
            quantization["kv_bits"] = args.kv_bits
    return {"ckpt": str(ckpt), "method": args.method, "budget": None if config is None else config.budget,
            "compressed": isinstance(cache, calidrop.CaliDropCache), **quantization,
            "calibration": config is not None and config.calibration, "theta1": args.theta1, "theta2": args.theta2,
            **({"interval": args.interval} if args.interval else {}), "estimate": args.estimate,
            "device": str(device), "dtype": str(dtype), "compile": args.compile}


def add_derived(stats, model, device):
    """What follows from the measured stats: bytes read per token (fast memory and host link), the bandwidth
    achieved, the compression ratio and, on CUDA, the peak memory."""
    read = bytes_read_per_token(stats, weight_bytes(model))
    stats["bytes_read_per_token"] = read["fast"] + read["link"]
    stats["link_bytes_per_token"] = read["link"]
    stats["bandwidth_gb_s"] = (stats["bytes_read_per_token"] * stats["decode_tokens_per_s"] / 1e9
                               if stats["decode_tokens_per_s"] else None)
    stats["compression_ratio"] = stats["kv_bytes_full"] / stats["kv_bytes_kept"]
    if device.type == "cuda":
        stats["peak_memory_bytes"] = torch.cuda.max_memory_allocated()


def report(s):
    mb = 1 / 2**20
    tps = "n/a" if s["decode_tokens_per_s"] is None else f"{s['decode_tokens_per_s']:.1f}"
    d = s["decisions"]
    compiling = f", compile {s['compile_s']:.1f} s" if s["compile_s"] else ""
    log(f"prompt tokens {s['prompt_tokens']}, new tokens {s['new_tokens']}, prefill {s['prefill_s']:.2f} s"
        f"{compiling}, decode {tps} tokens/s")
    if s["bandwidth_gb_s"] is not None:
        link = f", {s['link_bytes_per_token'] * mb:.2f} MB of it over the host link" if s["link_bytes_per_token"] else ""
        log(f"bandwidth achieved {s['bandwidth_gb_s']:.1f} GB/s ({s['bytes_read_per_token'] * mb:.1f} MB read per "
            f"token{link})")
    peak = f" (at most {s['kv_bytes_kept_peak'] * mb:.2f})" if s.get("kv_bytes_kept_peak", 0) > s["kv_bytes_kept"] else ""
    log(f"KV cache: kept {s['kv_bytes_kept'] * mb:.2f}{peak} MB of {s['kv_bytes_full'] * mb:.2f} MB full "
        f"({s['compression_ratio']:.1f}x), offloaded {s['kv_bytes_offloaded'] * mb:.2f} MB, "
        f"calibration {s['calibration_bytes'] * mb:.3f} MB")
    log(f"decisions: calibrate {d['calibrate']:.3f}, recompute {d['recompute']:.3f}, none {d['none']:.3f}")
    if s.get("reload_fraction"):
        log(f"reloads: {s['reload_bytes_per_token'] * mb:.2f} MB read from the offload store per token, "
            f"{s['reload_fraction']:.3f} of (layer, KV head, step)")
    if "peak_memory_bytes" in s:
        log(f"peak memory {s['peak_memory_bytes'] * mb:.0f} MB")


def main(argv=None):
    run_cli(run, parse_args(argv))


if __name__ == "__main__":
    main()
