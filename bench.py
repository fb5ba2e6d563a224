"""Benchmark: prefill and decode speed, memory and KV bytes of the full cache, eviction and CaliDrop,
with Hugging Face transformers' `generate` on the same checkpoint measured in the same run.

    python bench.py                                    # default model, 1k/1.5k/2k/4k/8k, snapkv + streamingllm @ 256
    python bench.py --lengths 1.5k,8k --methods snapkv --json bench.json   # the table, and every row as JSON
    python bench.py --lengths 1k,8k --methods snapkv --no-compile
    python bench.py --device cuda --random-weights llama3-8b --lengths 1k,8k

For every prompt length, one prefill (full causal attention, through a recorder) serves every row; a
compressed row's prefill time is that prefill plus its own scoring and calibration. Rows: the full cache;
per method, eviction only, CaliDrop with theta1 = -1 (calibrate, never recompute: the evicted K/V are
freed) and CaliDrop theta1/theta2 (0.7/0.85: recompute when the history is stale); and the transformers
peer. Each row of this project decodes greedily a fixed number of tokens (no stop at EOS), eager and
under torch.compile, timing every step with a device sync; the first --warmup steps (and any step that
compiled something) are left out. tokens/s = timed steps / their total time; "step ms" is the median.
"8k" is 8192 minus --new-tokens (8064): the default model's context is 8192. The peer's steps are
timed by a stopping criterion that transformers calls once per new token (its first call ends the prefill).

--compile: one compiled step per kind of row (full, eviction, calibrate-only, CaliDrop), each with
fullgraph=True (calidrop.py's recompute has shapes that do not depend on its decisions: no host sync in a
step), the full cache's length made symbolic, so that each graph is compiled once per run and reused by
every length and method (a cold compile of the 30-layer step takes 1-2 minutes on 2 CPU cores); only
CaliDrop's recomputing step, which holds the evicted store, compiles again per length, statically, as
generate.py --compile does (2-5 minutes each). Compiled rows decode --compile-new-tokens tokens, teacher-forced
on the eager row's tokens: in float32 their greedy tokens must equal eager's; in bfloat16 / float16 their
logits must lie within 8 eps of the dtype x the largest |logit| of eager's (random weights give near-tied
logits). On CUDA compiled rows use mode="reduce-overhead" (CUDA graphs), a recomputing row's where the GPU
reads the offload store itself (offload_gather.py, Triton; else it reads through the host, uncaptured).

CaliDrop's row is the default configuration: the page-sparse recompute (--reload-pages of --page-size
tokens per KV head), unbounded unless --reload-capacity. On random weights the cosine rule means nothing
(almost every head is stale), so with --random-weights the row forces a rate instead: exactly
--recompute-heads KV heads per layer-step recompute (default a quarter of them), printed as the row's name.

--batch 1,8,32 decodes that many distinct prompts together (consecutive stretches of the KJV, or of the
random ids); the paper's throughput setting is
`--lengths 1k --new-tokens 128 --budget 128 --batch 1,8,32`.

Bytes read per token (all sequences of a step) = fast memory: the weights (each parameter tensor once; a
tied embedding is read by the lm_head) + the cache slots the attention reads (the whole preallocated
buffer: future slots are masked, not skipped) + the calibration state + the key sketch of each KV head
that recomputed; and the host link: the evicted K/V reloaded (on CPU the same memory). GB/s = bytes per
token x tokens/s; "% bound" = the time those bytes need at the bandwidths measured at start (a plain
tensor sum; on CUDA pinned host-to-device copies for the link), over the step's time.

Peak memory: on CPU the bytes of the row's tensors (weights + everything its cache holds); on CUDA
torch.cuda.max_memory_allocated over the row's decode, less what other rows hold at that moment.

This file is the command line and the report; the rows are in benchmark/rows.py, the transformers peer in
benchmark/peer.py, the random-weights model in model.py.
"""
import argparse
import json
import logging
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import calidrop
from benchmark.rows import COMPILE_TOLERANCE_EPS, Steps, make_variants, peer_row, run_row, shared_prefill
from common import (CKPT_HELP, HelpFormatter, TextCodec, UsageError, add_reload_args, kjv_verses,
                    kv_bytes_per_token, log, resolve_checkpoint, resolve_device, run_cli, synchronize, weight_bytes)
from model import CheckpointError, ModelArgs, RANDOM_CONFIGS, load_model, random_model, read_config

MB = 1e6  # decimal, like GB/s


# ------------------------------------------------------------------------------------------- inputs

def parse_length(text, max_len):
    """'1k' -> 1024, '1.5k' -> 1536, '8k' -> 8192, '700' -> 700; clipped to max_len."""
    try:
        n = round(float(text[:-1]) * 1024) if text.lower().endswith("k") else int(text)
    except ValueError:
        raise UsageError(f"bad prompt length {text!r} (e.g. 1k, 1.5k, 8k or 700)") from None
    if n < 2:
        raise UsageError(f"prompt length {text!r} must be >= 2 tokens")
    return min(n, max_len)


def kjv_ids(codec, n_tokens):
    """The first n_tokens tokens of the KJV, verses joined with one space in file order."""
    verses = kjv_verses()
    n_verses = 64
    while True:
        ids = codec.encode(" ".join(verses[:n_verses]))
        if len(ids) >= n_tokens or n_verses >= len(verses):
            break
        n_verses *= 2
    if len(ids) < n_tokens:
        raise UsageError(f"the KJV has only {len(ids)} tokens")
    return ids[:n_tokens]


def random_config(spec):
    if spec in RANDOM_CONFIGS:
        return dict(RANDOM_CONFIGS[spec])
    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--random-weights: {spec!r} is neither a config.json path nor one of "
                         f"{', '.join(RANDOM_CONFIGS)}")
    return json.loads(path.read_text())


def measure_bandwidth(device, nbytes):
    """Read bandwidth of a plain tensor sum (GB/s, median of 5) and a copy (read + write); on CUDA also
    host-to-device copies from pageable and from pinned memory: the link an offloaded cache is read over."""
    x = torch.ones(int(nbytes) // 4, device=device)
    y = torch.empty_like(x)
    tests = [("sum", lambda: x.sum(), x.nbytes), ("copy", lambda: y.copy_(x), 2 * x.nbytes)]
    if device.type == "cuda":
        pageable = torch.ones(x.numel())
        pinned = pageable.pin_memory()
        tests += [("h2d_pageable", lambda: y.copy_(pageable), x.nbytes),
                  ("h2d_pinned", lambda: y.copy_(pinned, non_blocking=True), x.nbytes)]
    result = {}
    for name, fn, moved in tests:
        fn()
        times = []
        for _ in range(5):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        result[f"{name}_gb_s"] = moved / statistics.median(times) / 1e9
    return result


# ------------------------------------------------------------------------------------------ report

COLUMNS = ("row", "mode", "prefill s", "step ms", "tok/s", "x full", "fast MB", "link MB", "GB/s", "% bound",
           "peak MB", "kept MB", "offl MB", "calib KB", "recompute")
WIDTHS = (32, 7, 9, 8, 7, 6, 7, 7, 6, 7, 8, 8, 8, 8, 20)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_row(r, full_tps):
    tps = r.get("tokens_per_s")
    ratio = tps / full_tps if tps and full_tps else None
    recompute = ""
    if "recompute_step_rate" in r:
        extra = r.get("recompute_cost_ms")
        recompute = f"{100 * r['recompute_step_rate']:.0f}%" + (f" {extra:+.0f}ms" if extra is not None else "")
    cells = (r["row"], r["mode"], fmt(r["prefill_s"], ".2f"), fmt(r["step_ms"], ".1f"), fmt(tps, ".2f"),
             fmt(ratio, ".2f"), fmt(r["fast_bytes_per_token"] / MB, ".0f"), fmt(r["link_bytes_per_token"] / MB, ".2f"),
             fmt(r.get("gb_per_s"), ".1f"),
             fmt(r.get("bound_fraction") and 100 * r["bound_fraction"], ".0f"),
             fmt(r["peak_memory_bytes"] / MB, ".0f"), fmt(r["kv_bytes_kept"] / MB, ".2f"),
             fmt(r["kv_bytes_offloaded"] / MB, ".1f"), fmt(r["calibration_bytes"] / 1e3, ".1f"), recompute)
    return " ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def header():
    return " ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(COLUMNS, WIDTHS)))


def best(rows, length, name, batch=1):
    """The faster of a row's eager and compiled runs: (tokens/s, mode, row)."""
    cands = [r for r in rows if r["length"] == length and r["row"] == name and r.get("tokens_per_s")
             and r.get("batch", 1) == batch]
    if not cands:
        return None
    r = max(cands, key=lambda r: r["tokens_per_s"])
    return r["tokens_per_s"], r["mode"], r


def targets(rows, args, variants, lengths):
    """The project's speed and memory targets (README, Performance), from this run's numbers (the faster of
    eager and compile counts)."""
    lines, result = [], {}
    # 1. full cache vs transformers
    ratios = {}
    for L in lengths:
        f, p = best(rows, L, "full"), best(rows, L, "transformers generate")
        if f and p:
            ratios[L] = (f[0] / p[0], f[1])
    if ratios:
        near = [L for L in ratios if L == 1536] or [L for L in ratios if 1024 <= L <= 2048] or [min(ratios)]
        longest = max(ratios)
        ok_short = all(ratios[L][0] >= 1.2 for L in near)
        ok_long = ratios[longest][0] >= 1.5
        lines.append("full cache vs transformers generate (tokens/s ratio): " +
                     ", ".join(f"{L}: {r:.2f}x [{m}]" for L, (r, m) in sorted(ratios.items())) +
                     f"  -- target >= 1.2x at 1.5k (checked at {', '.join(map(str, near))}): "
                     f"{'met' if ok_short else 'NOT met'}; >= 1.5x at {longest}: {'met' if ok_long else 'NOT met'}")
        result["full_vs_transformers"] = {str(L): r for L, (r, _) in ratios.items()}
    # 2. calibrate-only and CaliDrop vs full and vs eviction: at the longest prompt and near 1.5k
    L = max(lengths)
    full = best(rows, L, "full")
    short = min(lengths, key=lambda n: abs(n - 1536))
    for method in args.methods:
        ev, cal = best(rows, L, f"{method} evict"), best(rows, L, f"{method} calidrop -1")
        if full and ev and cal:
            vs_full, vs_ev = cal[0] / full[0], cal[0] / ev[0]
            lines.append(f"{method} @ {L}: calibrate-only (theta1=-1) {cal[0]:.2f} tok/s [{cal[1]}] = "
                         f"{vs_full:.2f}x full (target >= 1.5x: {'met' if vs_full >= 1.5 else 'NOT met'}), "
                         f"{vs_ev:.2f}x eviction {ev[0]:.2f} tok/s [{ev[1]}] "
                         f"(target >= 0.90x: {'met' if vs_ev >= 0.9 else 'NOT met'})")
            result[f"{method}_calibrate_vs_full"] = vs_full
            result[f"{method}_calibrate_vs_evict"] = vs_ev
        v = next((v for v in variants if v.recomputes and v.config.method == method), None)
        c = v and best(rows, L, v.name)
        if full and ev and c:
            vs_full, vs_ev = c[0] / full[0], c[0] / ev[0]
            lines.append(f"{v.name} @ {L}: {c[0]:.2f} tok/s [{c[1]}] = {vs_full:.2f}x full (target >= 1.3x: "
                         f"{'met' if vs_full >= 1.3 else 'NOT met'}), {vs_ev:.2f}x eviction (target >= 0.8x: "
                         f"{'met' if vs_ev >= 0.8 else 'NOT met'})")
            result[f"{method}_calidrop_vs_full"], result[f"{method}_calidrop_vs_evict"] = vs_full, vs_ev
        c, f = (v and best(rows, short, v.name)), best(rows, short, "full")
        if c and f and short != L:
            lines.append(f"{v.name} @ {short}: {c[0] / f[0]:.2f}x full (target >= 1.0x: "
                         f"{'met' if c[0] >= f[0] else 'NOT met'})")
            result[f"{method}_calidrop_vs_full_{short}"] = c[0] / f[0]
    # 3. CaliDrop's recompute: how often, and what a recompute step costs
    for v in variants:
        if not v.recomputes:
            continue
        for L in lengths:
            c, f = best(rows, L, v.name), best(rows, L, "full")
            if not (c and f):
                continue
            r = c[2]
            cost = r.get("recompute_cost_ms")
            lines.append(f"{v.name} @ {L} [{c[1]}]: recompute on {100 * r['recompute_step_rate']:.0f}% of steps "
                         f"({100 * r['recompute_layer_rate']:.0f}% of layer-steps, "
                         f"{100 * r['decisions']['recompute']:.1f}% of head decisions, KV heads reloading in "
                         f"{100 * r['reload_fraction']:.1f}% of layer-steps), "
                         f"{'%+.1f ms' % cost if cost is not None else 'n/a'} per recompute step, "
                         f"{r['link_bytes_per_token'] / MB:.2f} MB read back per token")
    # batched decoding (the paper's throughput setting): tokens/s side by side
    batches = sorted({r.get("batch", 1) for r in rows})
    for B in batches if len(batches) > 1 else ():
        for L in lengths:
            cells = [(v.name, best(rows, L, v.name, B)) for v in variants]
            lines.append(f"batch {B} @ {L}: " + ", ".join(f"{n} {b[0]:.1f} tok/s [{b[1]}]" for n, b in cells if b))
    # 4. compile: the same tokens (float32) or logits within a stated tolerance (16-bit), and the speedup; the
    # compiled row is teacher-forced on the eager row's tokens (benchmark/rows.py: compare_logits)
    pairs = []
    for L in lengths:
        for v in variants:
            e = [r for r in rows if r["length"] == L and r["row"] == v.name and r["mode"] == "eager"]
            c = [r for r in rows if r["length"] == L and r["row"] == v.name and r["mode"] == "compile"]
            for e, c in zip(e, c):  # per batch size
                n = min(len(e["tokens"]), len(c["tokens"]))
                same = e["tokens"][:n] == c["tokens"][:n]
                tol = c.get("logits_tolerance")
                ok = same if tol is None else c["logits_max_diff_vs_eager"] <= tol
                speed = c["tokens_per_s"] / e["tokens_per_s"] if c["tokens_per_s"] and e["tokens_per_s"] else None
                pairs.append((L, v.name, same, n, speed, ok, c))
    if pairs:
        n_same, n_ok = sum(p[2] for p in pairs), sum(p[5] for p in pairs)
        fast = [s for L, n, _, _, s, *_ in pairs if " calidrop " in n and "-1" not in n and s is not None]
        if fast:
            lines.append(f"compiled CaliDrop vs eager: {min(fast):.2f}x at worst (target >= 1.2x: "
                         f"{'met' if min(fast) >= 1.2 else 'NOT met'})")
        lines.append(f"--compile (teacher-forced on the eager tokens): greedy tokens identical to eager in "
                     f"{n_same}/{len(pairs)} rows (over the first {pairs[0][3]} tokens)" +
                     "".join(f"; DIFFERS: {n} @ {L}" for L, n, same, *_ in pairs if not same))
        if any(p[6].get("logits_tolerance") is not None for p in pairs):  # 16-bit: the tolerance is the check
            worst = max(pairs, key=lambda p: p[6]["logits_max_diff_vs_eager"] / max(p[6]["logits_tolerance"], 1e-30))
            lines.append(f"--compile (16-bit): logits within {COMPILE_TOLERANCE_EPS} eps x the largest |eager logit| "
                         f"of eager's in {n_ok}/{len(pairs)} rows; closest to the bound: {worst[1]} @ {worst[0]} "
                         f"max |diff| {worst[6]['logits_max_diff_vs_eager']:.4f} against "
                         f"{worst[6]['logits_tolerance']:.4f}" +
                         "".join(f"; OUTSIDE: {n} @ {L}" for L, n, _, _, _, ok, _ in pairs if not ok))
        lines.append("--compile speedup (compile tok/s / eager tok/s): " +
                     ", ".join(f"{n} @ {L} {s:.2f}x" for L, n, _, _, s, *_ in pairs if s is not None))
        result["compile"] = [{"length": L, "row": n, "identical": same, "within_tolerance": ok, "speedup": s,
                              "logits_max_diff": c.get("logits_max_diff_vs_eager"),
                              "logits_tolerance": c.get("logits_tolerance")}
                             for L, n, same, _, s, ok, c in pairs]
    # 5. memory: the kept cache is budget-sized; the byte counts match the tensors
    for v in variants:
        if v.config is None:
            continue
        kept = {r["length"]: r["kv_bytes_kept"] for r in rows if r["row"] == v.name and r["mode"] == "eager"
                and r["batch"] == batches[0]}
        if len(set(kept.values())) == 1:
            lines.append(f"{v.name}: kept cache {next(iter(kept.values())) / MB:.2f} MB at every prompt length "
                         f"({', '.join(map(str, sorted(kept)))}): budget-sized")
        elif kept:
            lines.append(f"{v.name}: kept cache differs across lengths: " +
                         ", ".join(f"{L}: {b / MB:.2f} MB" for L, b in sorted(kept.items())))
    bad = [(r["length"], r["row"], r["mode"], r["bytes_check"]) for r in rows if r.get("bytes_check")]
    checked = sum("bytes_check" in r for r in rows)
    lines.append(f"byte counts vs tensors: {'match in all %d rows' % checked if not bad else 'MISMATCH: %s' % bad}")
    result["byte_count_mismatches"] = bad
    return lines, result


# --------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", help=CKPT_HELP)
    p.add_argument("--random-weights", metavar="CONFIG",
                   help=f"random weights at a real shape: a config.json path or {', '.join(RANDOM_CONFIGS)}")
    p.add_argument("--prompt", choices=("kjv", "random"), default=None,
                   help="KJV text (default with a checkpoint) or random token ids (default with --random-weights)")
    p.add_argument("--lengths", default="1k,1.5k,2k,4k,8k", help="prompt lengths, e.g. 1k,1.5k,8k or 700")
    p.add_argument("--methods", default="snapkv,streamingllm", help="comma-separated: " + ", ".join(calidrop.METHODS))
    p.add_argument("--budget", type=int, default=256, help="prompt tokens kept per layer and KV head")
    p.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    p.add_argument("--sink", type=int, default=32, help="StreamingLLM sink tokens")
    p.add_argument("--theta1", type=float, default=0.7, help="CaliDrop's row: recompute when cos(q, hist_q) < theta1")
    p.add_argument("--theta2", type=float, default=0.85, help="CaliDrop's row: calibrate when cos(q, hist_q) > theta2")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per eager row (fixed count)")
    p.add_argument("--compile-new-tokens", type=int, default=32,
                   help="tokens generated per compiled row (the compile costs are paid in warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="decode steps left out of the timings")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-compile", action="store_true", help="eager rows only")
    g.add_argument("--compile-only", action="store_true", help="compiled rows only")
    p.add_argument("--compile", action="store_true", help="accepted for symmetry: compile rows run by default")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (distinct prompts), e.g. 1,8,32")
    add_reload_args(p)
    p.add_argument("--recompute-heads", type=int, default=None,
                   help="force exactly N KV heads per layer-step to recompute (default with --random-weights: a "
                        "quarter of them; with a checkpoint: the cosine rule)")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers generate row")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, for every row (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="of the random prompts and weights")
    p.add_argument("--json", metavar="FILE", help="write every row to FILE as JSON (without it: only the table, "
                                                  "on stdout)")
    return p.parse_args(argv)


def check_args(args):
    device, dtype = resolve_device(args.device, args.dtype)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in calidrop.METHODS:
            raise UsageError(f"unknown method {m!r} (choose from {', '.join(calidrop.METHODS)})")
    if args.new_tokens < 2 or args.compile_new_tokens < 2:
        raise UsageError("--new-tokens and --compile-new-tokens must be >= 2")
    if args.warmup < 0 or args.warmup >= min(args.new_tokens, args.compile_new_tokens) - 1:
        raise UsageError("--warmup must leave at least one timed step")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.random_weights and args.ckpt:
        raise UsageError("give --ckpt or --random-weights, not both")
    args.modes = ["eager"] * (not args.compile_only) + ["compile"] * (not args.no_compile)
    try:
        args.batches = sorted({int(b) for b in args.batch.split(",") if b})
    except ValueError:
        raise UsageError(f"bad --batch {args.batch!r} (e.g. 1,8,32)") from None
    if not args.batches or min(args.batches) < 1:
        raise UsageError("--batch sizes must be >= 1")
    if args.recompute_heads is not None and args.recompute_heads < 1:
        raise UsageError("--recompute-heads must be >= 1")
    return device, dtype


def run(args):
    device, dtype = check_args(args)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break warnings: counted, not printed
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    if args.random_weights:
        config = random_config(args.random_weights)
        try:
            model_args = ModelArgs.from_config(config)
        except (KeyError, CheckpointError) as e:
            raise UsageError(f"--random-weights: bad config: {e!r}") from None
        ckpt, codec = None, None
        prompt = args.prompt or "random"
        if prompt == "kjv":
            raise UsageError("--prompt kjv needs a checkpoint's tokenizer")
    else:
        ckpt = resolve_checkpoint(args.ckpt)
        model_args = read_config(ckpt)
        codec = TextCodec(ckpt)
        prompt = args.prompt or "kjv"
    if args.random_weights and args.recompute_heads is None:
        args.recompute_heads = max(1, round(model_args.n_kv_heads / 4))
    if args.recompute_heads and args.recompute_heads > model_args.n_kv_heads:
        raise UsageError(f"--recompute-heads must be <= the model's {model_args.n_kv_heads} KV heads")
    variants = make_variants(args, model_args.n_kv_heads)
    max_prompt = model_args.max_position_embeddings - args.new_tokens
    if max_prompt < 2:
        raise UsageError("--new-tokens leaves no room for a prompt in the model's context")
    lengths = sorted({parse_length(s, max_prompt) for s in args.lengths.split(",") if s})
    if not lengths:
        raise UsageError("no prompt lengths")
    n_ids = max(lengths) * max(args.batches)  # a batch of B sequences of L tokens: the first B x L of them
    if prompt == "kjv":
        ids_all = kjv_ids(codec, n_ids)
    else:
        ids_all = torch.randint(0, model_args.vocab_size, (n_ids,),
                                generator=torch.Generator().manual_seed(args.seed)).tolist()

    model = (random_model(config, device, dtype, args.seed) if args.random_weights
             else load_model(ckpt, device, dtype))
    wbytes = weight_bytes(model)
    bw = measure_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 29)
    peer = None
    if not args.no_peer:
        if ckpt is None:
            log("note: no transformers peer with --random-weights (it needs a checkpoint)")
        else:
            try:
                from benchmark.peer import Peer  # transformers: imported only when the peer runs
            except ImportError:
                log("note: transformers is not installed: no peer row")
            else:
                peer = Peer(ckpt, device, dtype)
    steps = Steps(device)
    threads = torch.get_num_threads()
    print(f"model {ckpt or args.random_weights} ({'random weights, ' if args.random_weights else ''}"
          f"{wbytes / MB:.0f} MB of weights), {device.type} {str(dtype).removeprefix('torch.')}, "
          f"{threads} threads; prompt: {'KJV text' if prompt == 'kjv' else 'random token ids'}; "
          f"{args.new_tokens} new tokens per eager row, {args.compile_new_tokens} per compiled row, "
          f"{args.warmup} warm-up steps; budget {args.budget}")
    print(f"memory bandwidth (plain tensor sum): {bw['sum_gb_s']:.1f} GB/s (copy: {bw['copy_gb_s']:.1f} GB/s "
          f"read + write); '% bound' below is the time the bytes need at that rate over the step's", flush=True)
    if "h2d_pinned_gb_s" in bw:
        print(f"host to device: {bw['h2d_pageable_gb_s']:.1f} GB/s from pageable memory, "
              f"{bw['h2d_pinned_gb_s']:.1f} GB/s from pinned memory (where OffloadStore keeps the evicted K/V)",
              flush=True)

    bounds = {"fast": bw["sum_gb_s"], "link": bw.get("h2d_pinned_gb_s", bw["sum_gb_s"])}
    rows = []
    h2o = "h2o" in args.methods
    max_new = max(args.new_tokens if "eager" in args.modes else 0,
                  args.compile_new_tokens if "compile" in args.modes else 0)
    with torch.inference_mode():
        for L in lengths:
            for B in args.batches:
                t_length = time.perf_counter()
                prompts = [ids_all[b * L:(b + 1) * L] for b in range(B)]
                shared = shared_prefill(model, prompts, max_new, h2o, args.window, device, dtype)
                print(f"\nprompt {L} tokens x batch {B}: prefill {shared.prefill_s:.2f} s "
                      f"({B * L / shared.prefill_s:.0f} tokens/s)")
                print(header(), flush=True)
                full_tps = {}
                for variant in variants:
                    reference = None  # the eager row's tokens and logits: the compiled row is checked against them
                    for mode in args.modes:
                        row, produced = run_row(variant, mode, shared, model, steps, args, device, wbytes, bounds,
                                                reference)
                        reference = produced if mode == "eager" else None
                        if variant.config is None:
                            full_tps[mode] = row["tokens_per_s"]
                        if variant.recomputes:
                            base = [r for r in rows if r["length"] == L and r["batch"] == B and r["mode"] == mode
                                    and r["row"] == f"{variant.config.method} calidrop -1"]
                            ref = base[0]["step_ms"] if base else row.get("plain_step_ms")
                            if row.get("recompute_step_ms") is not None and ref is not None:
                                row["recompute_cost_ms"] = row["recompute_step_ms"] - ref
                        rows.append(row)
                        print(format_row(row, full_tps.get(mode)), flush=True)
                del shared
                if peer is not None and B == 1:
                    row = peer_row(peer, torch.tensor([ids_all[:L]], device=device), args, bounds,
                                   kv_bytes_per_token(model_args, dtype))
                    full = [r for r in rows if r["length"] == L and r["batch"] == 1 and r["row"] == "full"
                            and r["mode"] == "eager"]
                    if full:
                        n = min(len(full[0]["tokens"]), len(row["tokens"]))
                        agree = next((i for i in range(n) if full[0]["tokens"][i] != row["tokens"][i]), n)
                        row["tokens_agree_with_full_eager"] = agree
                    rows.append(row)
                    print(format_row(row, full_tps.get("eager")), flush=True)
                firsts = [f"{r['row']} {r['first_step_s']:.1f} s" for r in rows
                          if r["length"] == L and r["batch"] == B and r["mode"] == "compile" and "first_step_s" in r]
                if firsts:
                    print("first compiled step (compile time included): " + ", ".join(firsts))
                    again = [f"{r['row']} {r['recompiles']}" for r in rows if r["length"] == L and r["batch"] == B
                             and r["mode"] == "compile" and r.get("recompiles")]
                    print("steps that compiled again after the first: " + (", ".join(again) if again else "none"))
                print(f"({time.perf_counter() - t_length:.0f} s for this length, {time.perf_counter() - t_start:.0f} s "
                      f"so far)", flush=True)
                if args.json:  # the rows so far, should a time limit stop the run (the whole file at the end)
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps({"partial": True, "rows": rows}, indent=1) + "\n")

    lines, result = targets(rows, args, variants, lengths)
    wall = time.perf_counter() - t_start
    print("\ntargets (the faster of eager and compile for each row; ratios from this run):")
    for line in lines:
        print("  " + line)
    for r in rows:
        if r.get("variant") == "peer" and "tokens_agree_with_full_eager" in r:
            print(f"  transformers greedy tokens agree with the full cache's for the first "
                  f"{r['tokens_agree_with_full_eager']} of {args.new_tokens} at {r['length']}")
    print(f"wall time {wall:.0f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    out = {"meta": {"ckpt": str(ckpt) if ckpt else None, "random_weights": args.random_weights,
                    "device": str(device), "dtype": str(dtype), "threads": threads, "prompt": prompt,
                    "lengths": lengths, "batches": args.batches, "methods": args.methods, "budget": args.budget,
                    "theta1": args.theta1, "reload_pages": args.reload_pages, "page_size": args.page_size,
                    "reload_capacity": args.reload_capacity, "recompute_heads": args.recompute_heads,
                    "theta2": args.theta2, "new_tokens": args.new_tokens,
                    "compile_new_tokens": args.compile_new_tokens, "warmup": args.warmup, "modes": args.modes,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "machine": platform.machine(), "cpu_count": os.cpu_count(),
                    "weight_bytes": wbytes, "bandwidth": bw, "wall_s": wall,
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
           "rows": rows, "targets": result, "target_lines": lines}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return out


def main(argv=None):
    run_cli(run, parse_args(argv))


if __name__ == "__main__":
    main()
