"""CaliDrop: KV-cache eviction plus calibration of the evicted tokens (Su et al., arXiv 2507.19906).

One file, torch only, to read top to bottom or copy into another project. It follows the method:
  1. attention as an (out, lse) pair and the exact merge of two such pairs       (spec section 3)
  2. eviction scores for StreamingLLM, H2O, SnapKV, PyramidKV and one selection  (section 6)
  3. the calibration state of the evicted set under a historical query           (section 4)
  4. decoding: attend the kept cache, then calibrate, recompute or do nothing    (section 5)
     A recompute reads back only the KV heads that have a recomputing query head (the spec reloads the
     whole layer); `reloads` counts what was read.
The cache plugs into a model through one call, `cache.attend(layer, q, k, v, pos)`, with post-RoPE
q (B, Hq, T, D) and k, v (B, Hkv, T, D). It is built from a finished prefill: the full K/V plus what
`PrefillRecorder` saw (the last `window` queries of each layer and, for H2O, the attention each key got).
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("streamingllm", "h2o", "snapkv", "pyramidkv")


# ------------------------------------------------------------------ 1. attention as (out, lse), merge

def attention_with_lse(q, k, v, visible=None):
    """One query per head over a set of keys.

    q (B, Hq, D); k, v (B, Hkv, S, D); visible (S,) bool or None.
    Returns out (B, Hq, D) in v's dtype and lse (B, Hq) in float32 (or float64), the log of the softmax denominator.
    An empty set (S = 0) gives out 0 and lse -inf, the identity of `merge`.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    q_grouped = q.view(B, Hkv, Hq // Hkv, D)  # the query heads that share a KV head, side by side
    precision = torch.promote_types(q.dtype, torch.float32)  # float32 at least, float64 stays
    scores = (q_grouped @ k.transpose(-1, -2)).to(precision) / math.sqrt(D)  # (B, Hkv, G, S)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.exp(scores - lse[..., None]).to(v.dtype) @ v
    return out.view(B, Hq, D), lse.view(B, Hq)


def merge(out_a, lse_a, out_b, lse_b):
    """Attention over A u B from attention over A and over B: exact (flash attention's block merge).

    attention(A u B) = w * o_A + (1 - w) * o_B,  w = sigmoid(lse_A - lse_B).
    """
    w_a = torch.sigmoid(lse_a - lse_b)[..., None]
    w_b = torch.sigmoid(lse_b - lse_a)[..., None]  # = 1 - w_a, without the cancellation
    out = w_a * out_a + w_b * out_b  # in the lse's precision
    return out.to(out_a.dtype), torch.logaddexp(lse_a, lse_b)


def accumulate(q, k, v, chunk=1024):
    """(out, lse) of q over all of k, v, merged chunk by chunk: memory O(chunk), not O(S).

    k, v may live on another device (offloaded to the host): each chunk is moved to q's device."""
    pieces = (attention_with_lse(q, k[:, :, s:s + chunk].to(q.device), v[:, :, s:s + chunk].to(q.device))
              for s in range(0, max(k.shape[2], 1), chunk))
    return functools.reduce(lambda a, b: merge(*a, *b), pieces)


# ------------------------------------------------------------------------ 2. eviction scores, select

def group_mean(scores, n_kv_heads):
    """(B, Hq, L) per query head -> (B, Hkv, L): the cache stays KV-head sized under GQA."""
    B, Hq, L = scores.shape
    return scores.view(B, n_kv_heads, Hq // n_kv_heads, L).mean(2)


def score_streamingllm(length, sink, device=None):
    """(L,): the first `sink` tokens (attention sinks) always, then the most recent ones."""
    scores = torch.arange(length, device=device, dtype=torch.float32)
    scores[:sink] = float("inf")
    return scores


def h2o_column_sums(q, k, chunk=256):
    """Attention each key receives, summed over all prompt queries (causal): H2O's heavy-hitter score.

    q (B, Hq, L, D), k (B, Hkv, L, D) -> (B, Hq, L) float32. Query chunks bound the memory to
    Hq x chunk x L scores at a time instead of Hq x L x L."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    q_grouped = q.view(B, Hkv, Hq // Hkv, L, D)
    sums = torch.zeros(B, Hkv, Hq // Hkv, L, device=q.device)
    for s in range(0, L, chunk):
        e = min(s + chunk, L)  # queries s..e-1 see keys 0..e-1 at most
        scores = (q_grouped[:, :, :, s:e] @ k[:, :, None, :e].transpose(-1, -2)).float() / math.sqrt(D)
        causal = torch.arange(e, device=q.device)[None, :] <= torch.arange(s, e, device=q.device)[:, None]
        sums[..., :e] += scores.masked_fill(~causal, float("-inf")).softmax(-1).sum(-2)
    return sums.view(B, Hq, L)


def score_h2o(column_sums, n_kv_heads, recent):
    """(B, Hkv, L): the `recent` last tokens always, then the heaviest hitters of the rest."""
    scores = group_mean(column_sums, n_kv_heads)
    scores[..., scores.shape[-1] - recent:] = float("inf")
    return scores


def score_snapkv(window_q, k, pool_kernel=5):
    """(B, Hkv, L): the observation window always; earlier keys by the attention the window pays them.

    window_q (B, Hq, W, D): the last W prompt queries, post-RoPE; k (B, Hkv, L, D). Each window query
    attends causally over every key it can see, as in the prefill; the votes are summed over the window
    and smoothed by 1-D average pooling (kernel 5, same padding), as in SnapKV."""
    B, Hq, W, D = window_q.shape
    Hkv, L = k.shape[1], k.shape[2]
    q_grouped = window_q.view(B, Hkv, Hq // Hkv, W, D)
    scores = (q_grouped @ k[:, :, None].transpose(-1, -2)).float() / math.sqrt(D)  # (B, Hkv, G, W, L)
    query_pos = torch.arange(L - W, L, device=k.device)
    causal = torch.arange(L, device=k.device)[None, :] <= query_pos[:, None]
    votes = scores.masked_fill(~causal, float("-inf")).softmax(-1)[..., :L - W].sum(-2)  # (B, Hkv, G, L-W)
    votes = F.avg_pool1d(votes.reshape(-1, 1, L - W), pool_kernel, stride=1, padding=pool_kernel // 2)
    votes = votes.view(B, Hkv, Hq // Hkv, L - W).mean(2)
    return torch.cat([votes, torch.full((B, Hkv, W), float("inf"), device=k.device)], dim=-1)


def pyramid_budgets(budget, n_layers, window, beta=20):
    """PyramidKV: per-layer budgets decreasing linearly with depth, summing to budget x n_layers.

    The part outside the window goes from 2 x span - low (layer 0) down to low = span / beta (the last
    layer, at least 1), span = budget - window, as in PyramidKV's reference code; rounding by largest
    remainders keeps the sum exact."""
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
    """Keep the `budget` highest scores per (sequence, KV head); the next `calibration_size` (default:
    all the rest) form the evicted set that is offloaded and calibrated with; beyond that, dropped.

    scores (B, Hkv, L) -> keep (B, Hkv, budget), evicted (B, Hkv, E), both in position order."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    end = None if calibration_size is None else budget + calibration_size
    return order[..., :budget].sort(-1).values, order[..., budget:end].sort(-1).values


def gather_tokens(x, idx):
    """x (B, H, L, D), idx (B, H, N) -> (B, H, N, D)."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


# ------------------------------------------------------------------------------------ the prefill side

class PrefillRecorder:
    """Wraps the full cache during a one-shot prefill and records what scoring and calibration need:
    the last `window` queries of each layer (SnapKV's observation window; the last one is hist_q) and,
    with h2o=True, the attention each key received from all prompt queries."""

    def __init__(self, cache, window=32, h2o=False):
        self.cache, self.window, self.h2o = cache, window, h2o
        self.window_q, self.column_sums = {}, {}

    def attend(self, layer, q, k, v, pos):
        out = self.cache.attend(layer, q, k, v, pos)
        # contiguous: a plain clone would keep q's strides, which depend on the prompt length (and a
        # compiled decode step guards on the strides of hist_q, a view of this)
        self.window_q[layer] = q[:, :, -self.window:].clone(memory_format=torch.contiguous_format)
        if self.h2o:
            self.column_sums[layer] = h2o_column_sums(q, k)
        return out


@dataclass
class CaliDropConfig:
    method: str = "snapkv"
    budget: int = 256             # prompt tokens kept per (layer, KV head), sinks and window included
    window: int = 32              # SnapKV's observation window
    sink: int = 32                # StreamingLLM's attention sinks
    # theta1, theta2: floats, or (B, 1) tensors, one per sequence (they broadcast against rho (B, Hq))
    theta1: float = 0.7           # rho < theta1: recompute (<= -1: never, and the evicted K/V are freed)
    theta2: float = 0.85          # rho > theta2: calibrate
    calibration: bool = True      # False: plain eviction
    calibration_size: int | None = None  # evicted tokens offloaded and calibrated with (None: all)
    pool_kernel: int = 5

    def check(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.window < 1:  # the recorder's last window query is the historical query, whatever the method
            raise ValueError(f"--window must be >= 1 ({self.window})")
        if self.budget < 1:
            raise ValueError(f"--budget must be >= 1 ({self.budget})")
        if self.sink < 0:
            raise ValueError(f"--sink must be >= 0 ({self.sink})")
        if self.method in ("snapkv", "pyramidkv") and self.budget <= self.window:
            raise ValueError(f"{self.method} needs --budget > --window ({self.budget} <= {self.window})")
        if self.method == "streamingllm" and self.budget <= self.sink:
            raise ValueError(f"streamingllm needs --budget > --sink ({self.budget} <= {self.sink})")
        if self.method == "h2o" and self.budget < 2:
            raise ValueError("h2o needs --budget >= 2 (half recent, half heavy hitters)")
        if self.calibration_size is not None and self.calibration_size < 0:
            raise ValueError("--calibration-size must be >= 0")
        theta1, theta2 = torch.as_tensor(self.theta1), torch.as_tensor(self.theta2)
        if theta1.isnan().any() or theta2.isnan().any():
            raise ValueError("--theta1 and --theta2 must be numbers")
        # the extremes are how a user checks exactness: theta1 > 1 recomputes at every step whatever theta2,
        # theta1 <= -1 never recomputes, theta2 > 1 never calibrates; in between, theta1 < theta2
        if ((theta1 > -1) & (theta1 <= 1) & (theta1 >= theta2)).any():
            raise ValueError("need --theta1 < --theta2, unless --theta1 > 1 (recompute at every step) "
                             "or <= -1 (never recompute)")

    @property
    def recomputes(self):
        """Whether any sequence may recompute: only then are the evicted K/V kept."""
        return self.calibration and bool(torch.as_tensor(self.theta1).max() > -1)


def layer_scores(config, layer, k, recorder):
    """(B, Hkv, L) eviction scores of one layer's prompt keys k (B, Hkv, L, D)."""
    B, Hkv, L, _ = k.shape
    if config.method == "streamingllm":
        return score_streamingllm(L, config.sink, k.device).expand(B, Hkv, L)
    if config.method == "h2o":
        return score_h2o(recorder.column_sums[layer], Hkv, recent=config.budget // 2)
    return score_snapkv(recorder.window_q[layer][:, :, -config.window:], k, config.pool_kernel)


class OffloadStore:
    """Holds each layer's evicted K/V off the fast path: host memory when the model runs on a GPU, pinned,
    so that a reload copies at the host link's speed (measured on an H100: 47-54 GB/s pinned, 6-7 pageable).

    Any object with put / get / nbytes can replace it (generate.py passes a quantized one)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.k, self.v = {}, {}
        self.home = None  # the device put's tensors came from: get returns there

    def put(self, layer, k, v):
        self.home = k.device
        pin = self.device.type == "cpu" and k.device.type == "cuda"
        self.k[layer], self.v[layer] = (torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x) if pin
                                        else x.to(self.device) for x in (k, v))

    def get(self, layer, rows=None, kv_heads=None):
        """The evicted K/V of the (sequence, KV head) pairs rows[i], kv_heads[i]: (n, E, D) each on the
        device they came from, and only those are read; without pairs, all of them as held: (B, Hkv, E, D)."""
        if rows is None:
            return self.k[layer], self.v[layer]
        if self.home.type == self.device.type:
            return self.k[layer][rows, kv_heads], self.v[layer][rows, kv_heads]
        # from pinned host memory: each pair's (E, D) slab is contiguous, one direct copy each
        pairs = list(zip(rows.tolist(), kv_heads.tolist()))
        return tuple(torch.stack([x[layer][b, h].to(self.home, non_blocking=True) for b, h in pairs])
                     for x in (self.k, self.v))

    def nbytes(self, layer=None):
        layers = self.k if layer is None else [layer]
        return sum(self.k[i].nbytes + self.v[i].nbytes for i in layers)


class CaliDropCache:
    """The compressed cache: per layer, the kept K/V (budget prompt tokens + room for max_new_tokens),
    the calibration state (hist_q, hist_out, hist_lse) and the evicted K/V in an offload store."""

    def __init__(self, config, prompt_len, k, v, kept_len, hist_q, hist_out, hist_lse, store, batch_heads):
        self.config, self.prompt_len = config, prompt_len
        self.k, self.v, self.kept_len = k, v, kept_len  # per layer: (B, Hkv, kept + new, D); int
        self.hist_q, self.hist_out, self.hist_lse = hist_q, hist_out, hist_lse  # per layer: (B, Hq, D)x2, (B, Hq)
        self.store = store
        self.recomputes = config.recomputes  # once: with per-sequence theta1 tensors it costs a host sync
        self.slots = [torch.arange(t.shape[2], device=t.device) for t in k]
        # the token at position pos goes to slot pos - prompt_len + kept_len: the offset is a tensor so that
        # a compiled decode step does not depend on the prompt length (one graph for every prompt)
        self.slot_offset = [torch.tensor([n - prompt_len], device=k[0].device) for n in kept_len]
        B, Hq = batch_heads
        # per (layer, sequence, query head): how often each case happened (calibrate, recompute, none)
        self.counts = torch.zeros(len(k), B, Hq, 3, dtype=torch.long, device=k[0].device)
        # per (layer, sequence, KV head): how often its evicted K/V were read back from the store
        self.reloads = torch.zeros(len(k), B, k[0].shape[1], dtype=torch.long, device=k[0].device)
        # per (layer, sequence): steps that read anything, i.e. what reloading whole layers would cost
        self.layer_reloads = torch.zeros(len(k), B, dtype=torch.long, device=k[0].device)

    @classmethod
    def from_prefill(cls, config, keys, values, recorder, max_new_tokens, store=None):
        """Compress a finished prefill. keys, values: per layer (B, Hkv, L, D) for the L prompt tokens, e.g.
        the buffers of a full cache sized to the prompt; recorder: the PrefillRecorder that watched it."""
        config.check()
        n_layers = len(keys)
        B, Hkv, L, D = keys[0].shape
        if store is None:
            store = OffloadStore("cpu" if keys[0].device.type == "cuda" else keys[0].device)
        budgets = (pyramid_budgets(config.budget, n_layers, config.window) if config.method == "pyramidkv"
                   else [config.budget] * n_layers)
        k_kept, v_kept, kept_len, hist_q, hist_out, hist_lse = [], [], [], [], [], []
        for layer in range(n_layers):
            k, v = keys[layer], values[layer]
            budget = min(budgets[layer], L)
            if budget == L:  # a prompt within the budget is kept whole
                keep, evicted = torch.arange(L, device=k.device).expand(B, Hkv, L), k.new_zeros(B, Hkv, 0).long()
            else:
                keep, evicted = select(layer_scores(config, layer, k, recorder), budget, config.calibration_size)
            k_kept.append(torch.cat([gather_tokens(k, keep), k.new_zeros(B, Hkv, max_new_tokens, D)], 2))
            v_kept.append(torch.cat([gather_tokens(v, keep), v.new_zeros(B, Hkv, max_new_tokens, D)], 2))
            kept_len.append(budget)
            if not config.calibration:
                continue
            # the last prompt query: the historical query; a clone, a view would keep the whole window alive
            q = recorder.window_q[layer][:, :, -1].clone()
            k_evicted, v_evicted = gather_tokens(k, evicted), gather_tokens(v, evicted)
            out, lse = accumulate(q, k_evicted, v_evicted)
            hist_q.append(q)
            hist_out.append(out)
            hist_lse.append(lse)
            if config.recomputes:  # only a recompute ever reads them again; otherwise they are freed
                store.put(layer, k_evicted, v_evicted)
        batch_heads = recorder.window_q[0].shape[:2]  # (B, Hq)
        return cls(config, L, k_kept, v_kept, kept_len, hist_q, hist_out, hist_lse, store, batch_heads)

    def attend(self, layer, q, k, v, pos):
        """Decode one token: q (B, Hq, 1, D), k, v (B, Hkv, 1, D) at position pos (1,) -> (B, Hq, 1, D)."""
        assert q.shape[2] == 1, "a CaliDropCache decodes one token at a time; prefill with the full cache"
        slot = pos + self.slot_offset[layer]
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        q = q[:, :, 0]
        out, lse = attention_with_lse(q, self.k[layer], self.v[layer], self.slots[layer] <= slot)
        if not self.config.calibration:
            self.counts[layer, ..., 2] += 1
            return out[:, :, None]
        out = self.calibrated(layer, q, out, lse)
        return out[:, :, None]

    def calibrated(self, layer, q, out_kept, lse_kept):
        """Section 5: per (sequence, query head), recompute if rho < theta1, else calibrate if
        rho > theta2, else nothing; rho = cos(q, hist_q)."""
        rho = F.cosine_similarity(q.float(), self.hist_q[layer].float(), dim=-1)  # (B, Hq)
        recompute = rho < self.config.theta1 if self.recomputes else torch.zeros_like(rho, dtype=torch.bool)
        if self.recomputes and bool(recompute.any()):  # the one host sync: reload only when needed
            self.recompute(layer, q, recompute)
        calibrate = ~recompute & (rho > self.config.theta2)
        merged, _ = merge(out_kept, lse_kept, self.hist_out[layer], self.hist_lse[layer])
        self.counts[layer] += torch.stack([calibrate, recompute, ~(calibrate | recompute)], -1)
        return torch.where((calibrate | recompute)[..., None], merged, out_kept)

    def recompute(self, layer, q, heads):
        """The history is stale for `heads` (B, Hq): attend the evicted K/V with the current query,
        exactly, and make it the new history. Only the KV heads with a recomputing query head are read
        from the store."""
        B, Hq, D = q.shape
        Hkv = self.k[layer].shape[1]
        reload = heads.view(B, Hkv, Hq // Hkv).any(-1)  # (B, Hkv)
        rows, kv_heads = reload.nonzero(as_tuple=True)
        k, v = self.store.get(layer, rows, kv_heads)  # (n, E, D) each
        q_grouped = q.view(B, Hkv, Hq // Hkv, D)[rows, kv_heads]  # (n, G, D): one KV head's queries
        out, lse = accumulate(q_grouped, k[:, None], v[:, None])  # (n, G, D), (n, G)
        self.reloads[layer] += reload
        self.layer_reloads[layer] += reload.any(-1)
        fresh_out = self.hist_out[layer].view(B, Hkv, -1, D).index_put((rows, kv_heads), out).view(B, Hq, D)
        fresh_lse = self.hist_lse[layer].view(B, Hkv, -1).index_put((rows, kv_heads), lse).view(B, Hq)
        self.hist_q[layer] = torch.where(heads[..., None], q, self.hist_q[layer])
        self.hist_out[layer] = torch.where(heads[..., None], fresh_out, self.hist_out[layer])
        self.hist_lse[layer] = torch.where(heads, fresh_lse, self.hist_lse[layer])

    def decisions(self):
        """Fractions of (sequence, layer, query head, step) cases: calibrate, recompute, none."""
        total = self.counts.sum(dim=(0, 1, 2)).double()
        fractions = (total / total.sum().clamp(min=1)).tolist()
        return dict(zip(("calibrate", "recompute", "none"), fractions))

    def reloaded_bytes(self, rows=slice(None), whole_layers=False):
        """Bytes read back from the offload store so far by the sequences `rows`; with whole_layers, what
        reading all KV heads of a layer for each of those reloads would have cost. Every (sequence, KV head)
        of a layer holds the same number of evicted tokens, so each read is an equal share."""
        counts = self.layer_reloads[:, rows] * self.reloads.shape[2] if whole_layers else self.reloads[:, rows]
        pairs = counts.flatten(1).sum(1).tolist()  # per layer
        shares = self.reloads.shape[1] * self.reloads.shape[2]
        return sum(n * self.store.nbytes(layer) / shares for layer, n in enumerate(pairs) if n)

    def stats(self, n_tokens):
        """Byte counts when the cache holds the K/V of n_tokens tokens per sequence (prompt + fed)."""
        B, Hkv, _, D = self.k[0].shape
        per_token = 2 * B * Hkv * D * self.k[0].element_size()  # K and V, all sequences, one layer
        generated = n_tokens - self.prompt_len
        calibration = sum(t.nbytes for t in (*self.hist_q, *self.hist_out, *self.hist_lse))
        steps = max(generated, 1)
        return {
            "kv_bytes_kept": sum(n + generated for n in self.kept_len) * per_token,
            "kv_bytes_full": len(self.k) * n_tokens * per_token,
            "kv_bytes_offloaded": self.store.nbytes(),
            "calibration_bytes": calibration,
            "kv_bytes_allocated": sum(t.nbytes for t in (*self.k, *self.v)),
            "reload_bytes_per_token": self.reloaded_bytes() / steps,  # all sequences of the batch
            "reload_bytes_per_token_whole_layers": self.reloaded_bytes(whole_layers=True) / steps,
            "reload_fraction": self.reloads.sum().item() / (self.reloads.numel() * steps),
            "decisions": self.decisions(),
        }
