"""The variant grid: what each variant of a (method, budget) is (thresholds, offload format), and how
one full-cache prefill serves all of them: selection and calibration once per (method, budget), the
variants as rows of shared caches, several caches decoded as one batch; their byte counts and decisions."""
import dataclasses
import math
import time

import torch

import calidrop
import calidrop_pages
import ott
from common import UsageError, log
from model import FullCache, decode_one_token, prefill

VARIANTS = ("evict", "calibrate", "recompute", "calidrop", "calidrop+ott-offload", "recompute-all", "calibrate-fo",
            "calidrop-fo")
QUANTIZED = {"kivi": 0, "ott": 3}  # full-length 2-bit caches (ott.py) and their outlier tokens per group
QUANT_BITS = 2
NEVER = 2.0  # a cosine is at most 1: theta2 = NEVER never calibrates, theta1 = NEVER always recomputes
BATCH_KV_BYTES = 4 * 2**30  # prompt K/V bytes over the rows of one decode batch: bounds the copies


# A variant's name: what it does (with "-fo", calibrating with the first-order estimate; with "/t1/t2", at those
# thresholds instead of --theta1 / --theta2), then how its evicted K/V are stored, then how many pages a recompute
# reads: "calidrop+int8-offload@8" is CaliDrop with the int8 store reading 8 pages per recompute; without "@",
# --reload-pages; "@all": every evicted token (the exact rule); "calidrop-fo/0.6/0.8": the first-order estimate
# with theta1 0.6, theta2 0.8.

def what(variant):
    """The variant's decision rule and estimate: ("calidrop-fo", (0.6, 0.8)) of "calidrop-fo/0.6/0.8@12"."""
    name, *theta = variant.split("@")[0].partition("+")[0].split("/")
    return name, tuple(map(float, theta)) or None


def base_name(variant):
    return what(variant)[0].removesuffix("-fo")


def estimate(variant):
    """What the variant's calibrate decisions merge (CaliDropConfig.estimate)."""
    return "first-order" if what(variant)[0].endswith("-fo") else "paper"


def thresholds(variant, args):
    """(theta1, theta2) of a variant; the decision rule's precedence makes these exact (docs/method.md)."""
    theta1, theta2 = what(variant)[1] or (args.theta1, args.theta2)
    return {"evict": (-1.0, NEVER), "calibrate": (-1.0, theta2), "recompute": (theta1, NEVER),
            "calidrop": (theta1, theta2), "recompute-all": (NEVER, NEVER)}[base_name(variant)]


def offload(variant):
    """How a variant stores its evicted K/V: None (as computed), "int8" or "ott" (2-bit): "calidrop+ott-offload"
    is CaliDrop with the OTT store."""
    return variant.split("@")[0].partition("+")[2].removesuffix("-offload") or None


def reload_pages(variant, args):
    """Pages a recompute of the variant reads per KV head: N (exactly N, ranked), "auto" or None (all). The
    OTT store reads a whole layer (its groups and outlier pools span it), so its variants always read every
    page; recompute-all is the exactness check, so it does too."""
    name, _, pages = variant.partition("@")
    pages = pages or args.reload_pages
    exact = offload(variant) == "ott" or name == "recompute-all"
    return None if pages in (None, "all") or exact else pages if pages == "auto" else int(pages)


def check_variant(variant):
    """A UsageError for a name that is not one of VARIANTS, with +int8-offload or +ott-offload on a
    recomputing one, and @N or @all."""
    name, _, pages = variant.partition("@")
    base, _, store = name.partition("+")
    try:
        base, theta = what(variant)
    except ValueError:
        base = None
    if (base not in VARIANTS or store not in ("", "int8-offload", "ott-offload")
            or (pages and pages != "all" and not (pages.isdigit() and int(pages) > 0))
            or theta is not None and (len(theta) != 2 or not base.startswith("calidrop"))):
        raise UsageError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)}, optionally with "
                         f"+int8-offload or +ott-offload, @N or @all pages per recompute, and calidrop's with "
                         f"/theta1/theta2)")


def make_store(kind, device):
    return {None: None, "int8": lambda: ott.Int8Store(device),
            "ott": lambda: ott.OTTStore(device, bits=QUANT_BITS)}[kind]() if kind else None


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
        for layer, new in part.layers.items():
            into = merged.layers.get(layer)
            merged.layers[layer] = new if into is None else calidrop.Recorded(
                torch.cat([into.window_q, new.window_q]),
                None if new.column_sums is None else torch.cat([into.column_sums, new.column_sums]))
    return torch.cat(logits), full, merged


class SharedRows:
    """An offload store holding the evicted K/V of S sequences, read by a cache whose rows are n variants
    of those sequences (variant-major): row r reads sequence r mod S. It counts its bytes n times, what
    the variants would hold apart, so the cache's per-row byte counts are what one sequence costs."""

    def __init__(self, store, S, n):
        self.store, self.S, self.n = store, S, n

    def read(self, layer, rows, kv_heads, tokens):
        return self.store.read(layer, rows % self.S, kv_heads, tokens)

    def get(self, layer):
        """Every evicted token of the layer, for every row: (n x S, Hkv, E, D), copies."""
        return tuple(x.repeat(self.n, 1, 1, 1) for x in self.store.get(layer))

    def nbytes(self, layer=None):
        return self.n * self.store.nbytes(layer)


def compress(args, method, budget, variants, full, recorder, length, max_new, inv_freq):
    """The variants of one (method, budget) from the prefill. Selection, calibration and the page sketch
    do not depend on the thresholds or on how many pages a recompute reads, so they run once, on the S
    sequences; the variants are then rows of one cache per (offload format, pages) (rows = variants x
    sequences, variant-major; theta1 and theta2 per row), sharing one copy of the evicted K/V.
    Returns [(cache, variant names)]. With a reload capacity each variant is a cache of its own: the capacity
    is shared by the batch of its S sequences."""
    device = full.slots.device
    theta1, theta2 = torch.tensor([thresholds(v, args) for v in variants]).T  # one recomputes: keep the evicted K/V
    ranked = any(reload_pages(v, args) is not None for v in variants)  # one may rank pages: sketch them
    first_order = any(estimate(v) == "first-order" for v in variants)  # one needs kbar in the history
    config = calidrop.CaliDropConfig(method=method, budget=budget, window=args.window, sink=args.sink,
                                     theta1=theta1, theta2=theta2, page_size=args.page_size,
                                     reload_pages=1 if ranked else None, reload_capacity=args.reload_capacity,
                                     estimate="first-order" if first_order else "paper")
    base = calidrop.CaliDropCache.from_prefill(config, [k[:, :, :length] for k in full.k],
                                               [v[:, :, :length] for v in full.v], recorder, max_new,
                                               calidrop.OffloadStore(device), inv_freq)
    by_cache = {}
    for variant in variants:
        alone = variant if args.reload_capacity else None
        by_cache.setdefault((offload(variant), reload_pages(variant, args), estimate(variant), alone), []).append(variant)
    return [(as_rows(base, args, names, kind, pages, est), names) for (kind, pages, est, _), names in by_cache.items()]


def as_rows(base, args, variants, kind, pages, estimate):
    """base's S sequences repeated once per variant (variant-major) with each variant's thresholds, its
    evicted K/V in a store of format `kind` (None: base's own), reading `pages` pages per recompute, calibrating
    with `estimate` (base's history holds kbar when any variant needs it; "paper" rows leave it unused)."""
    n, (S, Hq) = len(variants), base.counts.shape[1:3]
    device = base.layers[0].k.device
    theta1, theta2 = (torch.tensor([thresholds(v, args)[i] for v in variants], device=device)
                      .repeat_interleave(S)[:, None] for i in (0, 1))
    store = base.store
    if kind and base.recomputes:
        store = make_store(kind, device)
        for layer in range(len(base.layers)):
            store.put(layer, *base.store.get(layer))
    repeat = lambda x: None if x is None else x.repeat(n, *(1,) * (x.dim() - 1))
    config = dataclasses.replace(base.config, theta1=theta1, theta2=theta2, reload_pages=pages, estimate=estimate)
    layers = []
    for state in base.layers:
        _, Hkv, _, D = state.k.shape
        read = (calidrop_pages.pages_to_read(config, state.evicted_len, Hq // Hkv, D, offloaded=False)
                if base.recomputes else None)
        hist_out = None if state.hist_out is None else state.hist_out[..., :D if estimate == "paper" else None]
        layers.append(dataclasses.replace(state, k=repeat(state.k), v=repeat(state.v), hist_q=repeat(state.hist_q),
                                          hist_out=repeat(hist_out), hist_lse=repeat(state.hist_lse),
                                          evicted_lens=repeat(state.evicted_lens),
                                          pages=None if read is None else state.pages.repeat(n, read)))
    return calidrop.CaliDropCache(config, base.prompt_len, layers, SharedRows(store, S, n), (n * S, Hq))


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


def build_batch(args, groups, full, recorder, length, max_new, inv_freq):
    """A batch's caches and, per config, where its rows are: [(method, budget, variant, cache, rows in
    the cache, rows in the batch)]."""
    S = full.k[0].shape[0]
    layout, caches, offset = [], [], 0
    for method, budget, variants in groups:
        for cache, names in compress(args, method, budget, variants, full, recorder, length, max_new, inv_freq):
            for i, variant in enumerate(names):
                layout.append((method, budget, variant, cache, slice(i * S, (i + 1) * S),
                               slice(offset + i * S, offset + (i + 1) * S)))
            caches.append(cache)
            offset += len(names) * S
    return Rows(caches), layout


BYTES = ("kv_bytes_kept", "kv_bytes_full", "kv_bytes_offloaded", "calibration_bytes", "kv_bytes_selection",
         "kv_bytes_allocated")


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
        out["kv_bytes_offloaded"] = out["kv_bytes_selection"] = 0
    n_rows, steps = rows.stop - rows.start, n_tokens - cache.prompt_len
    out["reload_bytes_per_token"] = cache.reloaded_bytes(rows) / n_rows / max(steps, 1)  # per sequence
    return out, cache.counts[:, rows].sum(dim=(0, 1, 2)).double()


def fractions(counts):
    return dict(zip(("calibrate", "recompute", "none"), (counts / counts.sum().clamp(min=1)).tolist()))


# ------------------------------------------------------------------------ what every task uses

def feed(model, cache, inputs, start):
    """Decode inputs (B, M) one token at a time from position start; yields the log-probs (B, V) after each."""
    for t in range(inputs.shape[1]):
        pos = torch.tensor([start + t], device=inputs.device)
        yield decode_one_token(model, inputs[:, t:t + 1], pos, cache).log_softmax(-1)


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
