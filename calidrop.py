"""CaliDrop: KV-cache eviction plus calibration of the evicted tokens (Su et al., arXiv 2507.19906).

One file, torch only, to read top to bottom or copy into another project: 1. attention as an (out, lse) pair
and the exact merge of two; 2. the eviction scores (StreamingLLM, H2O, SnapKV, PyramidKV) and one selection;
3. the settings and the prefill; 4. decoding: attend the kept cache, then per head calibrate, recompute or do
nothing, and (interval) evict again while decoding; 5. accounting. A recompute reads every evicted token of its
KV head, the paper's rule; with calidrop_pages.py beside this file (this project's accelerator) only the pages
that hold most of the query's attention, at most reload_capacity pairs a step, in a step that compiles whole.

The cache plugs into a model through one call, `cache.attend(layer, q, k, v, pos)`, with post-RoPE
q (B, Hq, T, D) and k, v (B, Hkv, T, D). It is built from a finished prefill (model.py's names):

    full = FullCache(model.args, batch, prompt_len)                   # the plain cache
    recorder = calidrop.PrefillRecorder(full, window=32, h2o=False)   # records what scoring needs
    logits = prefill(model, tokens, recorder)                         # full causal attention
    cache = calidrop.CaliDropCache.from_prefill(config, full.k, full.v, recorder, max_new_tokens,
                                                inv_freq=model.inv_freq)  # RoPE frequencies: to rank pages
    logits = decode_one_token(model, token, pos, cache)               # then one token at a time

Prompts of different lengths decode as one batch left-padded to the longest: pads (B,), each sequence's
padding, goes to the model, the FullCache and the PrefillRecorder (pads=pads), and the cache skips them.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # the page-sparse recompute, where it sits beside this file
    import calidrop_pages
except ImportError:
    calidrop_pages = None

METHODS = ("streamingllm", "h2o", "snapkv", "pyramidkv")
ESTIMATES = ("paper", "first-order")


# ------------------------------------------------------------------ 1. attention as (out, lse), merge

def attention_with_lse(q, k, v, visible=None):
    """One query per head over a set of keys: q (B, Hq, D); k, v (B, Hkv, S, D); visible None or bool
    broadcastable to (B, Hkv, Hq // Hkv, S) -> out (B, Hq, v.shape[-1]) in v's dtype, lse (B, Hq) in float32 (or
    float64): the log of the softmax denominator. A head that sees no key gets out 0, lse -inf: merge's identity."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    q_grouped = q.view(B, Hkv, Hq // Hkv, D)  # the query heads that share a KV head, side by side
    precision = torch.promote_types(q.dtype, torch.float32)  # float32 at least, float64 stays
    scores = (q_grouped @ k.transpose(-1, -2)).to(precision) / math.sqrt(D)  # (B, Hkv, G, S)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1)
    weights = torch.exp(scores - lse.masked_fill(lse.isneginf(), 0)[..., None])  # all -inf: weights 0
    out = weights.to(v.dtype) @ v
    return out.view(B, Hq, v.shape[-1]), lse.view(B, Hq)


def merge(out_a, lse_a, out_b, lse_b):
    """Attention over A u B from attention over A and over B, exactly (flash attention's block merge):
    attention(A u B) = w * o_A + (1 - w) * o_B,  w = sigmoid(lse_A - lse_B)."""
    diff = (lse_a - lse_b).nan_to_num(0.0)  # NaN: A and B both empty (-inf), whose outputs are both 0
    w_a = torch.sigmoid(diff)[..., None]
    w_b = torch.sigmoid(-diff)[..., None]  # = 1 - w_a, without the cancellation
    out = w_a * out_a + w_b * out_b  # in the lse's precision
    return out.to(out_a.dtype), torch.logaddexp(lse_a, lse_b)


def accumulate(q, k, v, visible=None, chunk=1024):
    """(out, lse) of q over k, v (the keys `visible` allows: None, all), merged chunk by chunk: memory
    O(chunk), not O(S)."""
    pieces = (attention_with_lse(q, k[:, :, s:s + chunk], v[:, :, s:s + chunk],
                                 None if visible is None else visible[..., s:s + chunk])
              for s in range(0, max(k.shape[2], 1), chunk))
    return functools.reduce(lambda a, b: merge(*a, *b), pieces)


# ------------------------------------------------------------------------ 2. eviction scores, select

def group_mean(scores, n_kv_heads):
    """(B, Hq, L) per query head -> (B, Hkv, L): the cache stays KV-head sized under GQA."""
    B, Hq, L = scores.shape
    return scores.view(B, n_kv_heads, Hq // n_kv_heads, L).mean(2)


def own_positions(length, pads, device=None):
    """(B, L) each slot's position in its sequence, negative on the left padding pads (B,); (1, L) if None."""
    slots = torch.arange(length, device=device)[None]
    return slots if pads is None else slots - pads[:, None]


def score_streamingllm(positions, sink):
    """positions (..., L) -> scores (..., L): the first `sink` tokens (attention sinks) always, then the latest."""
    return positions.float().masked_fill(positions < sink, float("inf"))


def h2o_column_sums(q, k, pads=None, chunk=256):
    """Attention each key receives, summed over the queries (causal): H2O's heavy-hitter score. q (B, Hq, Lq, D),
    the queries of the last Lq of the keys k (B, Hkv, L, D) (the prompt's: all) -> (B, Hq, L) float32; pads (B,)
    left padding, which neither gives nor receives attention. Chunks of queries bound the memory."""
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    q_grouped = q.view(B, Hkv, Hq // Hkv, Lq, D)
    sums = torch.zeros(B, Hkv, Hq // Hkv, L, device=q.device)
    for s in range(0, Lq, chunk):
        e = L - Lq + min(s + chunk, Lq)  # queries s.. (positions L - Lq + s..e-1) see keys 0..e-1 at most
        scores = (q_grouped[:, :, :, s:s + chunk] @ k[:, :, None, :e].transpose(-1, -2)).float() / math.sqrt(D)
        visible = torch.arange(e, device=q.device)[None, :] <= torch.arange(e - scores.shape[-2], e, device=q.device)[:, None]
        if pads is not None:  # a pad query sees no key: its softmax row is NaN, and counts 0
            visible = visible & (torch.arange(e, device=q.device) >= pads[:, None])[:, None, None, None]
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        sums[..., :e] += (weights if pads is None else weights.nan_to_num(0)).sum(-2)
    return sums.view(B, Hq, L)


def score_h2o(column_sums, n_kv_heads, recent):
    """(B, Hkv, L): the `recent` last tokens always, then the heaviest hitters of the rest."""
    scores = group_mean(column_sums, n_kv_heads)
    scores[..., scores.shape[-1] - recent:] = float("inf")
    return scores


def score_snapkv(window_q, k, pool_kernel=5, pads=None):
    """(B, Hkv, L): the observation window always; earlier keys by the attention the window pays them.
    window_q (B, Hq, W, D): the queries of the last W keys of k (B, Hkv, L, D), post-RoPE, each attending causally
    (not the left padding pads (B,)); the votes summed over the window, pooled (average, kernel 5, same padding)."""
    B, Hq, W, D = window_q.shape
    Hkv, L = k.shape[1], k.shape[2]
    q_grouped = window_q.view(B, Hkv, Hq // Hkv, W, D)
    scores = (q_grouped @ k[:, :, None].transpose(-1, -2)).float() / math.sqrt(D)  # (B, Hkv, G, W, L)
    query_pos = torch.arange(L - W, L, device=k.device)
    visible = torch.arange(L, device=k.device)[None, :] <= query_pos[:, None]
    if pads is not None:
        visible = visible & (torch.arange(L, device=k.device) >= pads[:, None])[:, None, None, None]
    votes = scores.masked_fill(~visible, float("-inf")).softmax(-1)[..., :L - W].sum(-2)  # (B, Hkv, G, L-W)
    votes = F.avg_pool1d(votes.reshape(-1, 1, L - W), pool_kernel, stride=1, padding=pool_kernel // 2)
    votes = votes.view(B, Hkv, Hq // Hkv, L - W).mean(2)
    return torch.cat([votes, torch.full((B, Hkv, W), float("inf"), device=k.device)], dim=-1)


# Every method's scores of one layer's keys k (B, Hkv, L, D) -> (B, Hkv, L), from the config, what was recorded
# for that layer and the left padding (None or (B,)). PyramidKV scores as SnapKV; only its budgets differ.
SCORERS = {
    "streamingllm": lambda config, k, recorded, pads: score_streamingllm(own_positions(k.shape[2], pads, k.device),
                                                                         config.sink)[:, None].expand(k.shape[:3]),
    "h2o": lambda config, k, recorded, pads: score_h2o(recorded.column_sums, k.shape[1], recent=config.budget // 2),
    "snapkv": lambda config, k, recorded, pads: score_snapkv(recorded.window_q[:, :, -config.window:], k,
                                                             config.pool_kernel, pads),
}
SCORERS["pyramidkv"] = SCORERS["snapkv"]


def score(config, k, recorded, pads=None):
    """The config's method's scores (B, Hkv, L); the left padding scores -inf, so it is never kept."""
    scores = SCORERS[config.method](config, k, recorded, pads)
    return scores if pads is None else scores.masked_fill(own_positions(k.shape[2], pads, k.device)[:, None] < 0,
                                                          float("-inf"))


def pyramid_budgets(budget, n_layers, window, beta=20):
    """PyramidKV: per-layer budgets decreasing linearly with depth, summing to budget x n_layers. The part outside
    the window goes from 2 x span - low (layer 0) to low = span / beta (the last, at least 1), span = budget -
    window, as in PyramidKV's reference code; rounding by largest remainders keeps the sum exact."""
    if n_layers == 1:
        return [budget]
    span = budget - window
    low = max(span / beta, 1.0)
    high = 2 * span - low
    raw = [high - (high - low) * i / (n_layers - 1) for i in range(n_layers)]
    sizes = [math.floor(x) for x in raw]
    for i in sorted(range(n_layers), key=lambda i: sizes[i] - raw[i])[:span * n_layers - sum(sizes)]:
        sizes[i] += 1
    return [window + s for s in sizes]


def select(scores, budget, calibration_size=None):
    """Keep the `budget` highest scores per (sequence, KV head); the next `calibration_size` (default: all the
    rest) form the evicted set, offloaded and calibrated with; beyond that, dropped. scores (B, Hkv, L) ->
    keep (B, Hkv, budget), evicted (B, Hkv, E), both in position order."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    end = None if calibration_size is None else budget + calibration_size
    return order[..., :budget].sort(-1).values, order[..., budget:end].sort(-1).values


def pads_last(evicted, pad):
    """evicted (B, Hkv, E) in position order, pad (B, 1, 1) each sequence's left padding -> evicted with the pad
    slots moved last (each sequence's own evicted tokens first), and visible (B, Hkv, 1, E): False on them."""
    evicted = evicted.gather(-1, (evicted < pad).long().argsort(dim=-1, stable=True))
    return evicted, (evicted >= pad)[:, :, None]


def gather_tokens(x, idx):
    """x (B, H, L, D), idx (B, H, N) -> (B, H, N, D)."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


# ------------------------------------------------------------------------ 3. the settings, the prefill

@dataclass
class CaliDropConfig:
    """The settings; checked when built (ValueError)."""
    method: str = "snapkv"
    budget: int = 256             # prompt tokens kept per (layer, KV head), sinks and window included
    window: int = 32              # SnapKV's observation window
    sink: int = 32                # StreamingLLM's attention sinks
    theta1: float = 0.7           # rho < theta1: recompute (<= -1: never, and the evicted K/V are freed)
    theta2: float = 0.85          # rho > theta2: calibrate
    calibration: bool = True      # False: plain eviction
    calibration_size: int | None = None  # evicted tokens offloaded and calibrated with (None: all)
    estimate: str = "paper"       # what a calibrate merges: "paper" (the history as it is) or "first-order" (its
                                  # lse followed to the query: the evicted keys' mean kbar, D more per head)
    pool_kernel: int = 5
    reload_pages: int | str | None = "auto"  # what a recompute reads (calidrop_pages.py): "auto" (ranked pages where
                                             # that costs less), a number of pages, None (every evicted token)
    page_size: int = 16           # evicted tokens per page: the unit a recompute reads
    reload_capacity: int | None = None  # (sequence, KV head) pairs per layer-step that may recompute (None: all)
    interval: int | None = None   # decode-time eviction: every `interval` new tokens the kept cache is cut back to
                                  # the budget, the evicted ones calibrated with and offloaded (None: only the prompt)

    def __post_init__(self):
        self.check()

    def check(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"unknown estimate {self.estimate!r} (choose from {', '.join(ESTIMATES)})")
        # window >= 1 for every method: the recorder's last window query is the historical query
        for name, low in (("window", 1), ("budget", 1), ("sink", 0), ("calibration_size", 0), ("page_size", 1),
                          ("reload_capacity", 1), ("interval", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low} ({name}={getattr(self, name)})")
        if self.method in ("snapkv", "pyramidkv") and self.budget <= self.window:
            raise ValueError(f"{self.method} needs budget > window (budget={self.budget}, window={self.window})")
        if self.method == "streamingllm" and self.budget <= self.sink:
            raise ValueError(f"streamingllm needs budget > sink (budget={self.budget}, sink={self.sink})")
        if self.method == "h2o" and self.budget < 2:
            raise ValueError("h2o needs budget >= 2 (half recent, half heavy hitters)")
        if self.interval is not None and self.calibration_size is not None:
            raise ValueError("calibration_size keeps the prompt's best evicted tokens: not with interval")
        theta1, theta2 = torch.as_tensor(self.theta1), torch.as_tensor(self.theta2)
        if theta1.isnan().any() or theta2.isnan().any():
            raise ValueError("theta1 and theta2 must be numbers")
        # the extremes are how a user checks exactness: theta1 > 1 recomputes at every step whatever theta2,
        # theta1 <= -1 never recomputes, theta2 > 1 never calibrates; in between, theta1 < theta2
        if ((theta1 > -1) & (theta1 <= 1) & (theta1 >= theta2)).any():
            raise ValueError("need theta1 < theta2, unless theta1 > 1 (recompute at every step) "
                             "or <= -1 (never recompute)")
        if not (self.reload_pages in (None, "auto") or isinstance(self.reload_pages, int) and self.reload_pages >= 1):
            raise ValueError(f"reload_pages must be >= 1, 'auto', or None for every evicted token "
                             f"(reload_pages={self.reload_pages!r})")
        if (isinstance(self.reload_pages, int) or self.reload_capacity is not None) and calidrop_pages is None:
            raise ValueError("reload_pages (a number) and reload_capacity need calidrop_pages.py beside calidrop.py "
                             "(without it, a recompute reads every evicted token)")

    @property
    def exact(self):
        """theta1 > 1 for every sequence: recompute every step over every evicted token (the full cache's output)."""
        return bool(torch.as_tensor(self.theta1).min() > 1)

    @property
    def recomputes(self):
        """Whether any sequence may recompute: only then are the evicted K/V kept. (theta1 and theta2 may be
        (B, 1) tensors, one per sequence: evaluate.py decodes the variants of a config as rows.)"""
        return self.calibration and bool(torch.as_tensor(self.theta1).max() > -1)


@dataclass
class Recorded:
    """What one layer's prefill leaves for scoring and calibration."""
    window_q: torch.Tensor                    # (B, Hq, W, D): the last W prompt queries; the last is hist_q
    column_sums: torch.Tensor | None = None   # (B, Hq, L): H2O's attention received by each key


class PrefillRecorder:
    """Wraps the full cache during a one-shot prefill and records per layer what scoring and calibration need:
    the last `window` queries (SnapKV's window; the last is hist_q) and, with h2o=True, the attention each key
    received from all prompt queries. pads (B,): left-padded prompts (sequence b's first pads[b] slots)."""

    def __init__(self, cache, window=32, h2o=False, pads=None):
        self.cache, self.window, self.h2o, self.pads = cache, window, h2o, pads
        self.layers = {}  # layer -> Recorded

    def attend(self, layer, q, k, v, pos):
        out = self.cache.attend(layer, q, k, v, pos)
        # contiguous: a plain clone would keep q's strides, which depend on the prompt length
        window_q = q[:, :, -self.window:].clone(memory_format=torch.contiguous_format)
        self.layers[layer] = Recorded(window_q, h2o_column_sums(q, k, self.pads) if self.h2o else None)
        return out


# -------------------------------------------------------------------------------------- 4. decoding

def history_values(config, k, v):
    """The values a history attends: v, and with the "first-order" estimate the keys too (their mean under the
    weights is lse's gradient in q), which every merge then keeps exact."""
    return v if config.estimate == "paper" else torch.cat([v, k], -1)


@dataclass
class Layer:
    """One layer of the compressed cache."""
    k: torch.Tensor            # (B, Hkv, kept + new, D): the kept prompt tokens, then the generated ones
    v: torch.Tensor
    kept_len: int              # tokens kept per KV head at the last cut (the prefill's: prompt tokens)
    slot_offset: torch.Tensor  # (1,): position pos goes to slot pos + slot_offset (a tensor, so that a
                               # compiled step does not depend on the prompt length)
    slots: torch.Tensor        # (kept + new,) slot numbers, to mask the slots not yet written
    evicted_len: int           # evicted tokens per (sequence, KV head) the store holds room for
    evicted_lens: torch.Tensor # (B,) each sequence's evicted tokens, the store's first ones (then pads, or room)
    kept_visible: torch.Tensor | None = None  # left padding: (B, 1, 1, kept + new), False on kept pads
    hist_q: torch.Tensor | None = None    # (B, Hq, D): the query the history was computed with
    hist_out: torch.Tensor | None = None  # (B, Hq, D): o_E(hist_q) ("first-order": (B, Hq, 2D), then kbar)
    hist_lse: torch.Tensor | None = None  # (B, Hq) float32: lse_E(hist_q)
    pages: "calidrop_pages.LayerPages | None" = None  # the pages a recompute reads (None: every evicted token)
    # decode-time eviction (config.interval): the kept buffers hold budget + interval tokens
    budget: int = 0            # tokens a cut keeps
    cut_pos: int = 0           # the position of the last cut (the prompt's length, before any)
    positions: torch.Tensor | None = None  # (B, Hkv, budget + interval): each kept token's position in its sequence
    recent_q: torch.Tensor | None = None   # (B, Hq, R, D): the queries of the last R slots (SnapKV's window, H2O)
    received: torch.Tensor | None = None   # (B, Hq, budget + interval): H2O's attention received by each kept token


class OffloadStore:
    """Each layer's evicted K/V, off the fast path: host memory when the model runs on a GPU, pinned, so that
    a reload copies at the host link's speed (measured on an H100: 47-54 GB/s pinned, 6-7 pageable). Tokens
    lie in position order per (sequence, KV head). Any object with put / read / get / nbytes can replace it:
    ott.py's quantized stores, offload_gather.py's, which the GPU reads without a host sync."""

    def __init__(self, device):
        self.device, self.k, self.v = torch.device(device), {}, {}

    def put(self, layer, k, v):
        """k, v (B, Hkv, E, D): one layer's evicted tokens."""
        pin = self.device.type == "cpu" and k.device.type == "cuda"
        self.k[layer], self.v[layer] = (torch.empty(x.shape, dtype=x.dtype, pin_memory=pin).copy_(x)
                                        for x in (k, v))

    def read(self, layer, rows, kv_heads, tokens):
        """Tokens tokens[i] (n, S) of the pairs (rows[i], kv_heads[i]) -> k, v (n, S, D) on rows' device;
        only those tokens are read (a token -1 is none: what its row holds is not to be used)."""
        return tuple(read_tokens(x[layer], rows, kv_heads, tokens) for x in (self.k, self.v))

    def get(self, layer):
        """Every evicted token of the layer: k, v (B, Hkv, E, D)."""
        return self.k[layer], self.v[layer]

    def write(self, layer, at, k, v):
        """k, v (B, Hkv, n, D) evicted while decoding, to each sequence b's tokens at[b].. (room put there)."""
        index = (at[:, None, None, None] + torch.arange(k.shape[2], device=at.device)[:, None]).expand(k.shape)
        for x, new in ((self.k[layer], k), (self.v[layer], v)):
            x.scatter_(2, index.to(x.device), new.to(x.device))

    def nbytes(self, layer=None):
        layers = self.k if layer is None else [layer]
        return sum(self.k[i].nbytes + self.v[i].nbytes for i in layers)


def read_tokens(x, rows, kv_heads, tokens):
    """x (B, Hkv, E, D) -> x[rows[i], kv_heads[i], tokens[i]] (n, S, D), on rows' device: one gather."""
    B, Hkv, E, D = x.shape
    flat = ((rows * Hkv + kv_heads)[:, None] * E + tokens.clamp(min=0)).to(x.device)  # (n, S) rows of x (-1, D)
    return x.reshape(-1, D).index_select(0, flat.flatten()).view(*tokens.shape, D).to(rows.device)


class CaliDropCache:
    """The compressed cache: per layer the kept K/V and the calibration state (Layer); the evicted K/V of every
    layer in an offload store."""

    def __init__(self, config, prompt_len, layers, store, batch_heads, pads=None):
        self.config, self.prompt_len, self.layers, self.store = config, prompt_len, layers, store
        self.pads = pads  # (B,) left padding, or None
        self.recomputes = config.recomputes  # once: with per-sequence theta1 tensors it costs a host sync
        (B, Hq), Hkv = batch_heads, layers[0].k.shape[1]
        zeros = functools.partial(torch.zeros, dtype=torch.long, device=layers[0].k.device)
        self.counts = zeros(len(layers), B, Hq, 3)  # each case (calibrate, recompute, none) per query head
        self.reloads = zeros(len(layers), B, Hkv)  # recomputes that read the KV head's evicted tokens
        self.reload_tokens = zeros(len(layers), B, Hkv)  # evicted tokens they read

    @classmethod
    def from_prefill(cls, config, keys, values, recorder, max_new_tokens, store=None, inv_freq=None):
        """Compress a finished prefill. keys, values: per layer (B, Hkv, L, D) for the L prompt tokens, e.g. the
        buffers of a full cache sized to the prompt; recorder: the PrefillRecorder that watched it; inv_freq
        (D/2,): the model's RoPE frequencies, to rank pages. A left-padded batch (recorder.pads): each sequence
        is compressed as it would be alone ("auto" pages follow the longest evicted set)."""
        n_layers = len(keys)
        B, Hkv, L, D = keys[0].shape
        Hq = recorder.layers[0].window_q.shape[1]
        pads = recorder.pads
        if store is None:
            store = OffloadStore("cpu" if keys[0].device.type == "cuda" else keys[0].device)
        budgets = (pyramid_budgets(config.budget, n_layers, config.window) if config.method == "pyramidkv"
                   else [config.budget] * n_layers)
        layers = []
        for i in range(n_layers):
            k, v, recorded = keys[i], values[i], recorder.layers[i]
            kept = min(budgets[i], L)
            if kept == L:  # a prompt within the budget is kept whole
                keep, evicted = torch.arange(L, device=k.device).expand(B, Hkv, L), k.new_zeros(B, Hkv, 0).long()
            else:
                keep, evicted = select(score(config, k, recorded, pads), kept, config.calibration_size)
            # the kept slots: the kept tokens and every new one (interval: budget + interval); room in the store
            # for what decoding may evict
            size = budgets[i] + config.interval if config.interval else kept + max_new_tokens
            store_room = max(kept + max_new_tokens - budgets[i], 0) if config.interval else 0
            k_kept, v_kept = (F.pad(gather_tokens(x, keep), (0, 0, 0, size - kept)) for x in (k, v))
            layer = Layer(k_kept, v_kept, kept, torch.tensor([kept - L], device=k.device), torch.arange(size, device=k.device),
                          evicted.shape[2] + store_room, torch.full((B,), evicted.shape[2], device=k.device),
                          budget=budgets[i], cut_pos=L)
            evicted_visible, pad = None, 0  # (B, Hkv, 1, E)
            if pads is not None:
                pad = pads[:, None, None]
                layer.kept_visible = F.pad(keep >= pad, (0, size - kept), value=True)[:, :1, None]
                evicted, evicted_visible = pads_last(evicted, pad)
                layer.evicted_lens = evicted_visible[:, 0, 0].sum(-1)
            if config.interval:
                layer.positions = F.pad(keep - pad, (0, size - kept))
                window = {"streamingllm": 0, "h2o": config.interval}.get(config.method, min(config.window, config.interval))
                layer.recent_q = recorded.window_q.new_zeros(B, Hq, window, D) if window else None
                if config.method == "h2o":
                    layer.received = F.pad(recorded.column_sums.gather(2, keep.repeat_interleave(Hq // Hkv, 1)),
                                           (0, size - kept))
            if config.calibration:
                # the history: the last prompt query (a copy: the recorder's window is not kept alive)
                layer.hist_q = recorded.window_q[:, :, -1].clone()
                k_evicted, v_evicted = gather_tokens(k, evicted), gather_tokens(v, evicted)
                layer.hist_out, layer.hist_lse = accumulate(layer.hist_q, k_evicted, history_values(config, k_evicted, v_evicted),
                                                            evicted_visible)
                if config.recomputes:  # only a recompute ever reads them again; otherwise they are freed
                    k_evicted, v_evicted = (F.pad(x, (0, 0, 0, store_room)) for x in (k_evicted, v_evicted))
                    store.put(i, k_evicted, v_evicted)
                    if calidrop_pages is not None:
                        layer.pages = calidrop_pages.for_layer(config, k_evicted, F.pad(evicted - pad, (0, store_room)),
                                                               layer.evicted_lens, Hq // Hkv,
                                                               getattr(store, "device", k.device) != k.device, inv_freq)
            layers.append(layer)
        if config.interval and config.recomputes and not hasattr(store, "write"):
            raise ValueError(f"{type(store).__name__} cannot take the tokens evicted while decoding (interval)")
        return cls(config, L, layers, store, (B, Hq), pads)

    def attend(self, layer, q, k, v, pos):
        """Decode one token: q (B, Hq, 1, D), k, v (B, Hkv, 1, D) at position pos (1,) -> (B, Hq, 1, D)."""
        assert q.shape[2] == 1, "a CaliDropCache decodes one token at a time; prefill with the full cache"
        if layer == 0 and self.config.interval and not torch.compiler.is_compiling():
            self.make_room(int(pos))  # compiled, the caller makes room between steps
        state = self.layers[layer]
        slot = pos + state.slot_offset
        state.k.index_copy_(2, slot, k)
        state.v.index_copy_(2, slot, v)
        if state.recent_q is not None:  # the queries of the last R slots, for the next cut's scores
            state.recent_q.index_copy_(2, (slot - state.k.shape[2] + state.recent_q.shape[2]).clamp(min=0), q)
        q = q[:, :, 0]
        visible = state.slots <= slot
        out_kept, lse_kept = attention_with_lse(q, state.k, state.v,
                                                visible if state.kept_visible is None else visible & state.kept_visible)
        return self.calibrated(layer, q, out_kept, lse_kept)[:, :, None]

    def calibrated(self, layer, q, out_kept, lse_kept):
        """Per (sequence, query head), rho = cos(q, hist_q): recompute if rho < theta1, else calibrate if rho >
        theta2, else nothing (the kept cache's output). A recompute first makes q the history; both cases then
        merge the history into the kept output. q, out_kept (B, Hq, D)."""
        if not self.config.calibration:
            none = torch.ones_like(lse_kept, dtype=torch.bool)
            self.count(layer, calibrate=~none, recompute=~none)
            return out_kept
        state = self.layers[layer]
        rho = F.cosine_similarity(q.float(), state.hist_q.float(), dim=-1)  # (B, Hq)
        recompute = self.stale_heads(rho) if self.recomputes else torch.zeros_like(rho, dtype=torch.bool)
        calibrate = ~recompute & (rho > self.config.theta2)
        if self.recomputes:
            self.refresh_history(layer, q, lse_kept, recompute)  # the recomputing heads' history is now q's
        merged, _ = merge(out_kept, lse_kept, *self.evicted_at(state, q))
        self.count(layer, calibrate, recompute)
        return torch.where((calibrate | recompute)[..., None], merged, out_kept)

    def evicted_at(self, state, q):
        """What a calibrate merges for q (B, Hq, D): the history as it is ("paper": the speculation), or its lse to
        first order in q ("first-order"): lse_E(q) ~ hist_lse + (q - hist_q).kbar / sqrt(D), kbar = sum_i p_i k_i
        under hist_q's weights: lse's tangent, never above it (lse is convex), exact at q = hist_q."""
        D = q.shape[-1]
        if self.config.estimate == "paper":
            return state.hist_out, state.hist_lse
        kbar = state.hist_out[..., D:].float()
        return state.hist_out[..., :D], state.hist_lse + ((q.float() - state.hist_q.float()) * kbar).sum(-1) / math.sqrt(D)

    def stale_heads(self, rho):
        """(B, Hq) bool: the heads to recompute now, rho < theta1 (at most reload_capacity pairs: calidrop_pages.py)."""
        stale = rho < self.config.theta1
        return stale if self.config.reload_capacity is None else calidrop_pages.within_capacity(
            stale, rho, self.layers[0].k.shape[1], self.config.reload_capacity)

    def refresh_history(self, layer, q, lse_kept, recompute):
        """For the heads in recompute (B, Hq): hist_q <- q and (hist_out, hist_lse) <- exact attention of q over the
        evicted tokens read back: all, or the pages that hold most of its attention (calidrop_pages.py); only
        the KV heads with a recomputing query head read."""
        state = self.layers[layer]
        B, Hq, D = q.shape
        Hkv = state.k.shape[1]
        reload = recompute.view(B, Hkv, Hq // Hkv).any(-1)  # (B, Hkv): KV heads with a recomputing query head
        if state.evicted_len == 0:  # nothing evicted (a prompt within this layer's budget): the empty set
            out, lse = torch.zeros_like(state.hist_out), torch.full_like(state.hist_lse, float("-inf"))
        else:
            if calidrop_pages is None:  # the pairs with a recomputing query head (a host sync)
                rows, kv_heads = reload.nonzero(as_tuple=True)
                needed = torch.ones_like(rows, dtype=torch.bool)
            else:  # compiled: as many pairs whatever the decisions, so that the step is one graph
                rows, kv_heads, needed = calidrop_pages.reading_pairs(reload, self.config.reload_capacity)  # (n,) each
            q_grouped = q.view(B, Hkv, Hq // Hkv, D)[rows, kv_heads]  # (n, G, D): one KV head's query heads
            lens = state.evicted_lens[rows, None]  # (n, 1)
            if state.pages is None:  # every evicted token (the paper's rule)
                tokens = torch.arange(state.evicted_len, device=q.device).expand(len(rows), -1)  # (n, E)
                visible = tokens < lens
            else:
                tokens, visible = state.pages.tokens(rows, kv_heads, q_grouped, lse_kept.view(B, Hkv, -1)[rows, kv_heads],
                                                     recompute.view(B, Hkv, -1)[rows, kv_heads], lens)
            visible = visible & needed[:, None]
            if state.pages is None and len(rows) == B * Hkv and self.store_is_local(q):  # every pair, in order
                k, v = (x.view(B * Hkv, -1, D) for x in self.store.get(layer))  # the store as it lies: no gather
            else:
                k, v = self.store.read(layer, rows, kv_heads, tokens.masked_fill(~visible, -1))  # (n, S, D) each
            out, lse = attention_with_lse(q_grouped, k[:, None], history_values(self.config, k, v)[:, None],
                                          visible[:, None, None])  # (n, G, D or 2D), (n, G)
            out = state.hist_out.view(B, Hkv, Hq // Hkv, -1).index_put((rows, kv_heads), out).view(B, Hq, -1)
            lse = state.hist_lse.view(B, Hkv, -1).index_put((rows, kv_heads), lse).view(B, Hq)
            self.reload_tokens[layer].view(-1)[rows * Hkv + kv_heads] += visible.sum(-1)  # the pairs are distinct
        # in place: a CUDA graph replays into the buffers it was recorded with
        state.hist_q.copy_(torch.where(recompute[..., None], q, state.hist_q))
        state.hist_out.copy_(torch.where(recompute[..., None], out, state.hist_out))
        state.hist_lse.copy_(torch.where(recompute, lse, state.hist_lse))
        self.reloads[layer] += reload

    def store_is_local(self, q):
        """Whether the offload store sits in the compute's memory (a CPU's), where reading it costs no link."""
        return getattr(self.store, "device", q.device) == q.device

    def make_room(self, pos):
        """Decode-time eviction (config.interval), before the token at position pos (an int): each layer whose
        kept buffers are full (budget + interval tokens) is cut back to its budget."""
        for i, state in enumerate(self.layers):
            if state.kept_len + pos - state.cut_pos == state.k.shape[2]:
                self.cut(i, pos)

    def cut(self, layer, pos):
        """The kept tokens scored as the prompt was (the last decode queries as SnapKV's window and H2O's new
        queries), the budget kept, the rest evicted as the prompt's were: merged into the history (exact: the same
        hist_q, a disjoint set), written to the store and the page sketch."""
        state, config = self.layers[layer], self.config
        pads = None if state.kept_visible is None else (~state.kept_visible[:, 0, 0]).sum(-1)  # kept pads lead
        state.positions[:, :, state.kept_len:] = torch.arange(state.cut_pos, pos, device=state.k.device) - (
            0 if self.pads is None else self.pads[:, None, None])
        if state.received is not None:
            state.received += h2o_column_sums(state.recent_q, state.k, pads)
        keep, evicted = select(score(config, state.k, Recorded(state.recent_q, state.received), pads), state.budget)
        visible = None  # (B, Hkv, 1, n)
        if pads is not None:  # pads score -inf: evicted, and sorted last, never stored or calibrated with
            evicted, visible = pads_last(evicted, pads[:, None, None])
        if config.calibration:
            k_evicted, v_evicted = gather_tokens(state.k, evicted), gather_tokens(state.v, evicted)
            new = accumulate(state.hist_q, k_evicted, history_values(config, k_evicted, v_evicted), visible)
            out, lse = merge(state.hist_out, state.hist_lse, *new)
            state.hist_out.copy_(out)
            state.hist_lse.copy_(lse)
            if self.recomputes:
                at = state.evicted_lens.clone()
                self.store.write(layer, at, k_evicted, v_evicted)
                n = torch.full_like(at, evicted.shape[2]) if visible is None else visible[:, 0, 0].sum(-1)
                if state.pages is not None:
                    state.pages.write(at, n, k_evicted, state.positions.gather(2, evicted))
                state.evicted_lens += n
        for x in (state.k, state.v):  # the kept tokens to the front, in position order
            x[:, :, :state.budget] = gather_tokens(x, keep)
        state.positions[:, :, :state.budget] = state.positions.gather(2, keep)
        if state.received is not None:
            G = state.received.shape[1] // keep.shape[1]
            state.received[..., :state.budget] = state.received.gather(2, keep.repeat_interleave(G, 1))
            state.received[..., state.budget:] = 0
        if state.kept_visible is not None:  # pads, if any, are kept alike in every KV head
            state.kept_visible[..., :state.budget] = state.kept_visible[:, :, 0].gather(2, keep[:, :1])[:, :, None]
            state.kept_visible[..., state.budget:] = True
        state.kept_len, state.cut_pos = state.budget, pos
        state.slot_offset.fill_(state.budget - pos)

    # -------------------------------------------------------------------------------- 5. accounting

    def count(self, layer, calibrate, recompute):
        """One decision per (sequence, query head) and step: calibrate, recompute or none."""
        self.counts[layer] += torch.stack([calibrate, recompute, ~(calibrate | recompute)], -1)

    def decisions(self, rows=slice(None)):
        """Fractions of (sequence, layer, query head, step) cases of the sequences `rows`: calibrate, recompute, none."""
        total = self.counts[:, rows].sum(dim=(0, 1, 2)).double()
        fractions = (total / total.sum().clamp(min=1)).tolist()
        return dict(zip(("calibrate", "recompute", "none"), fractions))

    def reloaded_bytes(self, rows=slice(None)):
        """Bytes read back from the offload store so far by the sequences `rows`: the tokens read, at what
        one stored token (K and V of one sequence and KV head) costs in the store."""
        pairs = self.reloads[0].numel()
        return sum(n * self.store.nbytes(i) / (pairs * self.layers[i].evicted_len)
                   for i, n in enumerate(self.reload_tokens[:, rows].sum((1, 2)).tolist()) if n)

    def stats(self, n_tokens, rows=slice(None)):
        """Byte counts of the sequences `rows` (a slice) when the cache holds the K/V of n_tokens tokens per
        sequence (prompt + fed). With left padding kept, full and offloaded bytes count each sequence's own
        tokens; the buffers, the calibration state and the page sketch are a share of the batch's."""
        B, Hkv, _, D = self.layers[0].k.shape
        lengths = torch.full((B,), self.prompt_len) if self.pads is None else self.prompt_len - self.pads.cpu()
        lengths = lengths[rows]  # (b,) the prompts' own lengths
        b = lengths.numel()
        per_token = 2 * Hkv * D * self.layers[0].k.element_size()  # K and V, one sequence, one layer
        generated = n_tokens - self.prompt_len
        # per layer: the tokens kept at its last cut (the prefill, before any), then every one fed since; at the
        # peak, with decode-time eviction, the buffers full before a cut
        kept = [int((lengths + s.cut_pos - self.prompt_len).clamp(max=s.kept_len).sum()) + b * (n_tokens - s.cut_pos)
                for s in self.layers]
        peak = sum(b * s.k.shape[2] if s.cut_pos > self.prompt_len else n for s, n in zip(self.layers, kept))
        kept = sum(kept)
        offloaded = sum(self.store.nbytes(i) * int(s.evicted_lens.cpu()[rows].sum()) / (B * s.evicted_len)
                        for i, s in enumerate(self.layers) if s.evicted_len) if self.store.nbytes() else 0.0
        history = [t for s in self.layers for t in (s.hist_q, s.hist_out, s.hist_lse) if t is not None]
        scoring = [t for s in self.layers for t in (s.recent_q, s.received) if t is not None]
        steps = max(generated, 1)
        return {
            "kv_bytes_kept": kept * per_token,
            "kv_bytes_kept_peak": peak * per_token,
            "kv_bytes_full": len(self.layers) * (int(lengths.sum()) + b * generated) * per_token,
            "kv_bytes_offloaded": offloaded,
            "calibration_bytes": sum(t.nbytes for t in history) * b / B,
            "kv_bytes_selection": sum(s.pages.nbytes for s in self.layers if s.pages) * b / B,  # ranks the pages
            "kv_bytes_scoring": sum(t.nbytes for t in scoring) * b / B,  # what decode-time eviction scores with
            "kv_bytes_allocated": sum(s.k.nbytes + s.v.nbytes for s in self.layers) * b / B,
            "reload_bytes_per_token": self.reloaded_bytes(rows) / steps,  # all sequences `rows`
            "reload_fraction": self.reloads[:, rows].sum().item() / (self.reloads[:, rows].numel() * steps),
            "decisions": self.decisions(rows),
        }
