"""The page-sparse recompute: which evicted tokens a CaliDrop recompute reads, when not every one of them.

calidrop.py's recompute reads every evicted token of a KV head, the paper's rule: exact, and at long context
most of the offload store at every recompute. This module is this project's accelerator for it. The evicted
K/V of each (layer, sequence, KV head) lie in position order in pages of `page_size` tokens, and a recompute
reads the N pages that hold the most of its query's attention, ranked without reading them:

  1. the key sketch (built once, after the prefill; kept in fast memory): keys before RoPE are low-rank
     (ShadowKV's observation), so each evicted key is kept as 4-bit coordinates on its layer and KV head's
     top `rank` principal directions, and each page as its mean coordinates and mean position;
  2. two passes per recompute, so that the cost does not grow with the evicted set: every page by its mean
     key, then the tokens of a shortlist of the best pages one by one; the N heaviest are read;
  3. how many: N = max(12, 1/16 of the pages), or every token where that costs less than ranking
     (`pages_to_read`).

A recompute then attends exactly over the pages it reads, and the history becomes that. Which (sequence, KV
head) pairs read at a step is this file's too: eagerly those with a recomputing query head; compiled, as
many pairs whatever the decisions (every pair, or a reload capacity shared by the batch), so that the decode
step is one graph without a host sync.

The seam with calidrop.py: one object per layer, `LayerPages`, whose `tokens(...)` are the tokens a recompute
reads, and `reading_pairs` / `within_capacity`, the pairs that read. calidrop.py imports this file where it
sits beside it; without it every recompute reads every evicted token of the pairs that need them. Torch only.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

AUTO_PAGES, AUTO_SHARE = 12, 1 / 16  # reload_pages "auto": 1/16 of the evicted pages, at least 12
SKETCH_RANK = 16  # principal directions of the pre-RoPE keys that the key sketch keeps


# ------------------------------------------------------------------------------- how many pages

def pages_to_read(config, evicted_len, group, head_dim, offloaded, rank=SKETCH_RANK):
    """Pages a recompute reads per KV head, or None: every evicted token (the dense recompute, exact). A
    number N: N pages ranked by the key sketch. "auto": N = max(12, 1/16 of the P pages), or every token
    where that costs no more than ranking, counted in multiply-adds per (sequence, KV head) with its G query
    heads, the keys rebuilt from their rank-r sketch:
        every token:  E x 2GD                       (q.k and the weighted values)
        ranking:      (P + M x page_size) x (r + G)D + N x page_size x 2GD
    (every page's mean key, the M shortlisted pages token by token, then the N pages read). A store
    offloaded to host memory is read over the host link, whose bytes cost more than this arithmetic: there
    it ranks."""
    P = -(-evicted_len // config.page_size)
    if config.reload_pages is None or config.exact:
        return None
    if config.reload_pages != "auto":
        return config.reload_pages if config.reload_pages < P else None
    n = max(AUTO_PAGES, math.ceil(P * AUTO_SHARE))
    if n >= P:
        return None
    every = evicted_len * 2 * group * head_dim
    ranked = ((P + shortlist_size(n, P) * config.page_size) * (rank + group) * head_dim
              + n * config.page_size * 2 * group * head_dim)
    return n if offloaded or ranked < every else None


def shortlist_size(n_pages, P):
    """Pages the token-by-token pass ranks to read n_pages: 4 x n_pages up to 12 read, then 36 more than read
    (the coarse pass errs at its margin, which does not grow with the read)."""
    return min(n_pages + 3 * min(n_pages, AUTO_PAGES), P)


def for_layer(config, k_evicted, positions, lens, group, offloaded, inv_freq):
    """The LayerPages of one layer's evicted keys k_evicted (B, Hkv, E, D), post-RoPE, at their positions
    (B, Hkv, E) in their sequences (lens (B,): a left-padded batch's evicted tokens per sequence, the store's
    first ones; None: all); None where a recompute reads every evicted token (pages_to_read)."""
    n = pages_to_read(config, k_evicted.shape[2], group, k_evicted.shape[-1], offloaded)
    if n is None:
        return None
    if inv_freq is None:
        raise ValueError("reload_pages: choosing pages needs the model's RoPE frequencies (inv_freq)")
    return LayerPages(sketch_keys(k_evicted, positions, inv_freq, config.page_size, lens), n, config.page_size,
                      inv_freq)


# --------------------------------------------------------------------------------------- the sketch

def rotate(x, positions, inv_freq, inverse=False):
    """RoPE, the rotate-half layout (Llama's in Hugging Face): x (..., E, D) at positions (..., E); with
    inverse, the rotation back to pre-RoPE vectors (RoPE is orthogonal)."""
    angles = positions.float()[..., None] * inv_freq  # (..., E, D/2)
    cos, sin = angles.cos(), angles.sin() * (-1 if inverse else 1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def pack(codes, bits):
    """codes (..., n) uint8 in [0, 2^bits) -> (..., ceil(n * bits / 8)) uint8: 8 // bits codes a byte,
    the first in the lowest bits. bits 1 packs masks."""
    per = 8 // bits
    grouped = F.pad(codes, (0, -codes.shape[-1] % per)).unflatten(-1, (-1, per))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)  # the bit fields do not overlap: sum = or


def unpack(packed, bits, n):
    """The inverse of pack: (..., m) uint8 -> the first n codes (..., n) uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & (2**bits - 1)).flatten(-2)[..., :n]


@dataclass
class KeySketch:
    """What ranks one layer's evicted pages, kept in fast memory: per (sequence, KV head), the pre-RoPE
    evicted keys projected on their top `rank` principal directions, each token's coordinates in 4 bits,
    each page's mean coordinates and position in float32. A key is approximated as RoPE(coords @ basis) at
    its position, a page as page_size copies of RoPE(mean coords @ basis) at its mean position."""
    coords: torch.Tensor          # (B, Hkv, E, rank // 2) uint8: 4-bit symmetric codes, two a byte
    scale: torch.Tensor           # (B, Hkv, 1, rank): one per coordinate, code 8 + c / scale in [1, 15]
    basis: torch.Tensor           # (B, Hkv, rank, D): orthonormal rows
    positions: torch.Tensor       # (B, Hkv, E) int32: each evicted token's position (int16 would halve it,
                                  # but inductor's CPU kernels do not vectorize int16 -> float: 4x slower)
    page_coords: torch.Tensor     # (B, Hkv, P, rank): the mean coordinates of each page's tokens
    page_positions: torch.Tensor  # (B, Hkv, P): their mean position

    @property
    def tensors(self):
        return [getattr(self, f.name) for f in fields(self)]

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.tensors)

    def repeat(self, n):
        """The sketch of the batch repeated n times (rows n x B, batch-major), as a cache of n variants of
        the same sequences holds it."""
        return KeySketch(*(t.repeat(n, *(1,) * (t.dim() - 1)) for t in self.tensors))


def page_counts(E, page_size, device, lens=None):
    """Tokens in each page of an evicted set of E: (P,), the last page may hold fewer; with lens (..., 1),
    the first lens tokens only (a left-padded batch: the pads follow them), (..., P)."""
    P = -(-E // page_size)
    valid = torch.arange(P * page_size, device=device) < (E if lens is None else lens)
    return valid.unflatten(-1, (P, page_size)).sum(-1)


def page_means(x, page_size, lens=None):
    """x (..., E, c) -> (..., P, c): the mean over each page of its tokens (page_counts; with lens (..., 1),
    the tokens past them are zero)."""
    E = x.shape[-2]
    count = page_counts(E, page_size, x.device, lens)
    P = count.shape[-1]
    return F.pad(x, (0, 0, 0, P * page_size - E)).unflatten(-2, (P, page_size)).sum(-2) / count.clamp(min=1)[..., None]


def sketch_keys(k, positions, inv_freq, page_size, lens=None, rank=SKETCH_RANK):
    """KeySketch of the evicted keys k (B, Hkv, E, D) (post-RoPE) at positions (B, Hkv, E); with lens (B,),
    each sequence's first lens tokens only (the others are left padding, zeroed: they count nowhere)."""
    pre = rotate(k, positions, inv_freq, inverse=True).double()
    if lens is not None:
        valid = torch.arange(k.shape[2], device=k.device) < lens[:, None, None]  # (B, 1, E)
        pre, positions, lens = pre * valid[..., None], positions * valid, lens[:, None, None]
    _, vectors = torch.linalg.eigh(pre.transpose(-1, -2) @ pre)  # ascending eigenvalues of the Gram matrix
    basis = vectors.flip(-1)[..., :rank].transpose(-1, -2)  # (B, Hkv, r, D): the top principal directions
    coords = (pre @ basis.transpose(-1, -2)).float()  # (B, Hkv, E, r)
    scale = coords.abs().amax(-2, keepdim=True).clamp(min=1e-30) / 7
    codes = (coords / scale).round().clamp(-7, 7).to(torch.uint8) + 8
    return KeySketch(pack(codes, 4), scale, basis.float(), positions.to(torch.int32),
                     page_means(coords, page_size, lens), page_means(positions.float()[..., None], page_size, lens)[..., 0])


# ---------------------------------------------------------------------------------------- the ranking

def page_tokens(pages, page_size, evicted_len, lens=None):
    """pages (n, M) -> their tokens (n, M x page_size), clamped to the evicted set, and visible (same
    shape): False on the last page's empty slots (with lens (n, 1): past each pair's first lens tokens)."""
    tokens = (pages[..., None] * page_size + torch.arange(page_size, device=pages.device)).flatten(1)
    return tokens.clamp(max=evicted_len - 1), tokens < (evicted_len if lens is None else lens)


def page_weights(page_lse, lse_kept, heads):
    """(n, P): each page's estimated share of each recomputing head's whole attention (kept + the pages
    scored), summed over the heads. page_lse (n, G, P) estimated log-mass; lse_kept, heads (n, G)."""
    total = torch.logaddexp(lse_kept, page_lse.logsumexp(-1))  # (n, G)
    return (torch.exp(page_lse - total[..., None]) * heads[..., None]).sum(1)


def top_pages(sketch, rows, kv_heads, q_grouped, lse_kept, heads, n_pages, page_size, inv_freq, lens=None):
    """The n_pages pages of page_size evicted tokens that hold the most estimated attention, per pair
    (rows[i], kv_heads[i]), in two passes so that the cost does not grow with the evicted set: every page
    by its mean key, then the tokens of the shortlist_size best pages one by one.

    q_grouped (n, G, D): the query heads of each pair's KV head; lse_kept (n, G): each head's lse over the
    kept cache; heads (n, G): the heads that recompute; lens (n, 1): a left-padded batch's evicted tokens
    per pair (None: all). -> tokens (n, n_pages x page_size) and visible, as page_tokens gives them, the
    pages in no particular order (attention does not care)."""
    D = q_grouped.shape[-1]
    q = q_grouped.float() / math.sqrt(D)
    basis, positions = sketch.basis[rows, kv_heads], sketch.positions[rows, kv_heads]  # (n, r, D), (n, E)
    E, P = positions.shape[1], sketch.page_positions.shape[-1]
    mean_keys = rotate(sketch.page_coords[rows, kv_heads] @ basis, sketch.page_positions[rows, kv_heads], inv_freq)
    count = page_counts(E, page_size, q.device, lens)  # (P,) or (n, P): 0 for a padded pair's empty pages
    coarse = q @ mean_keys.transpose(-1, -2) + count.log().unsqueeze(-2)  # (n, G, P): estimated log-mass of each page
    shortlist = page_weights(coarse, lse_kept, heads).topk(shortlist_size(n_pages, P), sorted=False).indices  # (n, M)

    tokens, visible = page_tokens(shortlist, page_size, E, lens)  # (n, M x page_size)
    scale = sketch.scale[rows, kv_heads]  # (n, 1, r)
    codes = sketch.coords[rows, kv_heads].gather(1, tokens[..., None].expand(-1, -1, sketch.coords.shape[-1]))
    coords = (unpack(codes, 4, scale.shape[-1]).float() - 8) * scale  # (n, M x page_size, r)
    keys = rotate(coords @ basis, positions.gather(1, tokens), inv_freq)
    logits = (q @ keys.transpose(-1, -2)).masked_fill(~visible[:, None], float("-inf"))
    fine = logits.unflatten(-1, (-1, page_size)).logsumexp(-1)  # (n, G, M): the shortlist, token by token
    best = page_weights(fine, lse_kept, heads).topk(min(n_pages, P), sorted=False).indices  # (n, N) of the M
    return page_tokens(shortlist.gather(1, best), page_size, E, lens)


@dataclass
class LayerPages:
    """One layer's page-sparse recompute: calidrop.py's seam. `tokens` says which evicted tokens a recompute
    of the pairs (rows[i], kv_heads[i]) reads."""
    sketch: KeySketch
    pages: int                # pages a recompute reads per KV head
    page_size: int
    inv_freq: torch.Tensor    # (D/2,) the RoPE frequencies the keys were rotated with

    def tokens(self, rows, kv_heads, q_grouped, lse_kept, heads, lens=None):
        """-> tokens (n, pages x page_size) and visible (same shape): see top_pages."""
        return top_pages(self.sketch, rows, kv_heads, q_grouped, lse_kept, heads, self.pages, self.page_size,
                         self.inv_freq, lens)

    @property
    def nbytes(self):
        return self.sketch.nbytes

    def write(self, at, n, k, positions):
        """Keys evicted while decoding into the sketch: k (B, Hkv, m, D) post-RoPE at their positions (B, Hkv, m),
        each sequence b's first n[b] (B,) of them to its tokens at[b].. (B,): on the prefill's basis and 4-bit
        scale (a coordinate past the scale is clipped), and into their pages' means."""
        sketch = self.sketch
        B, Hkv, m, _ = k.shape
        coords = rotate(k, positions, self.inv_freq, inverse=True).float() @ sketch.basis.transpose(-1, -2)
        codes = (coords / sketch.scale).round().clamp(-7, 7).to(torch.uint8) + 8
        rows = (at[:, None] + torch.arange(m, device=at.device))[:, None, :].expand(B, Hkv, m)  # (B, Hkv, m)
        valid = (torch.arange(m, device=at.device) < n[:, None])[:, None, :, None]  # (B, 1, m, 1)
        sketch.coords.scatter_(2, rows[..., None].expand(-1, -1, -1, sketch.coords.shape[-1]), pack(codes, 4))
        sketch.positions.scatter_(2, rows, positions.to(torch.int32))
        E = sketch.positions.shape[-1]
        before, after = (page_counts(E, self.page_size, at.device, x[:, None, None]) for x in (at, at + n))
        sums = torch.cat([sketch.page_coords, sketch.page_positions[..., None]], -1) * before[..., None]
        new = torch.cat([coords, positions[..., None].float()], -1) * valid  # (B, Hkv, m, r + 1)
        sums.scatter_add_(2, (rows // self.page_size)[..., None].expand_as(new), new)
        means = sums / after.clamp(min=1)[..., None]
        sketch.page_coords.copy_(means[..., :-1])
        sketch.page_positions.copy_(means[..., -1])

    def repeat(self, n, pages=None):
        """These pages for a cache of n variants of the batch (see KeySketch.repeat), reading `pages` pages."""
        return replace(self, sketch=self.sketch.repeat(n), pages=pages or self.pages)


# ------------------------------------------------------- how many pairs read: a capacity, one compiled graph

def within_capacity(stale, rho, n_kv_heads, capacity):
    """A reload capacity shared by the batch: of the stale query heads (B, Hq), those of at most `capacity`
    (sequence, KV head) pairs, the pairs whose stalest query head has the lowest cosine; the rest wait for a
    later step (their heads do nothing now). It bounds what one layer-step reads, which a compiled step needs."""
    B, Hq = rho.shape
    if capacity >= B * n_kv_heads:
        return stale
    stalest = rho.masked_fill(~stale, float("inf")).view(B, n_kv_heads, -1).amin(-1).flatten()  # (B x Hkv)
    allowed = torch.zeros_like(stalest, dtype=torch.bool).scatter(0, stalest.topk(capacity, largest=False).indices, True)
    return stale & allowed.view(B, n_kv_heads).repeat_interleave(Hq // n_kv_heads, 1)


def reading_pairs(reload, capacity=None):
    """The (sequence, KV head) pairs that read evicted tokens this step: rows, kv_heads, needed (n,) each.

    reload (B, Hkv) bool. Eager: the reloading pairs themselves. Compiled (torch.compile): shapes that do not
    depend on the decisions, so that the step is one graph with no host sync: every pair in order, or with a
    capacity, `capacity` pairs of the batch, the reloading ones first; a pair that does not need it has
    needed False and reads a dummy token."""
    if not torch.compiler.is_compiling():
        rows, kv_heads = reload.nonzero(as_tuple=True)
        return rows, kv_heads, torch.ones_like(rows, dtype=torch.bool)
    B, Hkv = reload.shape
    pairs = torch.arange(B * Hkv, device=reload.device)
    if capacity is not None and capacity < B * Hkv:
        pairs = reload.flatten().float().topk(capacity, sorted=False).indices  # (C,)
    return pairs // Hkv, pairs % Hkv, reload.flatten()[pairs]


