"""OTT: KV-cache quantization with outlier token tracing (Su et al., ACL 2025, arXiv 2505.10938).

The same group's alternative to eviction, and the storage format of CaliDrop's offloaded evicted K/V.
One file, torch only (plus calidrop.py for the (out, lse) merge and calidrop_pages.py's bit packing), to
read top to bottom:
  1. asymmetric uniform quantization to 2, 4 or 8 bits (16: none), codes packed into bytes
  2. the outlier rule: the tokens of smallest key L2 norm stay in full precision
  3. one layer's quantized tokens: groups of G, the outlier pool, the overflow buffer
  4. QuantizedCache, the full-length quantized cache (KIVI with outliers=0, OTT with 3)
  5. offload stores for CaliDrop's evicted K/V: Int8Store, OTTStore
Layout as in KIVI: keys per channel over a group of G tokens, values per token over groups of channels.
Dequantize-then-matmul: right on a CPU; a GPU kernel would read the packed codes instead (README).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import calidrop
from calidrop_pages import pack, unpack  # codes packed into bytes, shared with CaliDrop's key sketch

BITS = (2, 4, 8, 16)  # 16: no quantization (the exactness path)


# ------------------------------------------------------------------------ 1. quantize, pack, dequantize

@dataclass
class Quantized:
    """x ~ codes * scale + zero, one (scale, zero) per slice along the quantized dim, stored in x's dtype
    (the model's); the codes are packed along the last dim, which holds n of them.
    bits 16: codes is x itself, scale and zero are None."""
    codes: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    bits: int
    n: int

    @property
    def nbytes(self):
        return sum(t.nbytes for t in (self.codes, self.scale, self.zero) if t is not None)


def quantize(x, bits, dim):
    """Asymmetric uniform quantization of x, one (scale, zero) per slice along `dim`:
    scale = (max - min) / (2^bits - 1), zero = min, code = round((x - zero) / scale). The codes are
    computed with the stored (model dtype) scale and zero, so dequantize sees what was used; in float32
    the error is at most half a step, and a constant slice (scale 0) round-trips exactly."""
    if bits == 16:
        return Quantized(x.clone(), None, None, 16, x.shape[-1])
    zero, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi.float() - zero.float()) / (2**bits - 1)).to(x.dtype)
    step = scale.float()
    t = (x.float() - zero.float()) / torch.where(step > 0, step, 1.0)  # constant slice: x - zero = 0
    codes = t.round().clamp(0, 2**bits - 1).to(torch.uint8)
    return Quantized(pack(codes, bits), scale, zero, bits, x.shape[-1])


def dequantize(q):
    """codes * scale + zero, computed in float32, returned in the model's dtype."""
    if q.bits == 16:
        return q.codes
    codes = unpack(q.codes, q.bits, q.n)
    return (codes.float() * q.scale.float() + q.zero.float()).to(q.scale.dtype)


def quantize_kv(k, v, bits, value_group):
    """KIVI's layout for k, v (B, H, G, D): keys per channel over the G tokens, values per token over
    groups of `value_group` channels."""
    return quantize(k, bits, dim=-2), quantize(v.unflatten(-1, (-1, value_group)), bits, dim=-1)


def dequantize_kv(qk, qv):
    return dequantize(qk), dequantize(qv).flatten(-2)


# --------------------------------------------------------------------------------- 2. the outlier rule

def pick_outliers(pool_k, group_k, n):
    """The next outlier pool: per (sequence, KV head), the n tokens of smallest key L2 norm among the
    current pool and the group being quantized (ties: the earlier token). L2 because it is what RoPE
    preserves: a post-RoPE key has its pre-RoPE norm, so the choice does not depend on position.

    pool_k (B, H, P, D) with P = 0 (no pool yet) or n; group_k (B, H, G, D).
    Returns (B, H, P + G) bool over cat(pool, group), n True per head: the tokens of the next pool."""
    norms = torch.cat([pool_k, group_k], 2).float().norm(dim=-1)
    chosen = norms.argsort(dim=-1, stable=True)[..., :n]
    return torch.zeros_like(norms, dtype=torch.bool).scatter(-1, chosen, True)


# ------------------------------------------------------------------ 3. one layer's quantized tokens

@dataclass
class Group:
    """G tokens quantized together, and a packed 1-bit mask of the slots whose token is an outlier
    (kept in the pool or the overflow buffer in full precision; in the group, a stand-in)."""
    k: Quantized
    v: Quantized
    outliers: torch.Tensor | None  # pack(mask (B, H, G), 1), or None when no slot is an outlier
    size: int

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes + (0 if self.outliers is None else self.outliers.nbytes)

    def outlier_mask(self):
        """(B, H, G) bool, or None."""
        return None if self.outliers is None else unpack(self.outliers, 1, self.size).bool()


class QuantizedLayer:
    """One layer's quantized tokens, in three sets (each token in exactly one):
      - groups, in position order, each quantized once (keys and values together);
      - the outlier pool: `outliers` full-precision tokens per KV head, the smallest keys seen so far;
      - the overflow buffer: full-precision tokens pushed out of the pool, at most `overflow` per head.
    A head traces (updates its pool) at an event only while its overflow buffer has room for a whole
    turnover (`outliers` tokens); after that its pool is frozen and its groups are quantized as they are."""

    def __init__(self, bits, value_group, outliers, overflow):
        self.bits, self.value_group, self.outliers, self.overflow = bits, value_group, outliers, overflow
        self.groups = []
        self.pool_k = self.pool_v = None  # (B, H, outliers, D) after the first event
        # (B, H, M, D) x 2 and (B, H, M) bool (slot used); M = the fullest head's count, each head's first
        self.over_k = self.over_v = self.over_used = None

    def add(self, k, v):
        """One quantization event: k, v (B, H, G, D), the next G tokens in position order."""
        taken = None
        if self.outliers > 0 and k.shape[2] > self.outliers:
            k, v, taken = self.trace(k, v)
        qk, qv = quantize_kv(k, v, self.bits, self.value_group)
        mask = None if taken is None else pack(taken.to(torch.uint8), 1)
        self.groups.append(Group(qk, qv, mask, k.shape[2]))

    def trace(self, k, v):
        """Update the pool from the group; in the group, replace the tokens that entered the pool by the
        mean key and value of the group's other tokens (so they do not widen the keys' per-channel range).
        Returns the group to quantize and its (B, H, G) mask of outlier slots."""
        B, H, G, D = k.shape
        n = self.outliers
        pool_k = k[:, :, :0] if self.pool_k is None else self.pool_k
        pool_v = v[:, :, :0] if self.pool_v is None else self.pool_v
        P = pool_k.shape[2]
        new_pool = pick_outliers(pool_k, k, n)
        if P > 0:
            # a head traces while its overflow buffer can take a whole turnover; else its pool stays
            tracing = (self.overflow - self.over_used.sum(-1) >= n)[..., None]  # (B, H, 1)
            stay = torch.arange(P + G, device=k.device) < P
            new_pool = torch.where(tracing, new_pool, stay)
        cand_k, cand_v = torch.cat([pool_k, k], 2), torch.cat([pool_v, v], 2)
        self.pool_k, self.pool_v = cand_k[new_pool].view(B, H, n, D), cand_v[new_pool].view(B, H, n, D)
        self.push(pool_k, pool_v, ~new_pool[..., :P])
        taken = new_pool[..., P:]
        rest = (~taken)[..., None].float()
        mean_k = (k.float() * rest).sum(2, keepdim=True) / rest.sum(2, keepdim=True)
        mean_v = (v.float() * rest).sum(2, keepdim=True) / rest.sum(2, keepdim=True)
        k = torch.where(taken[..., None], mean_k.to(k.dtype), k)
        v = torch.where(taken[..., None], mean_v.to(v.dtype), v)
        return k, v, taken

    def push(self, k, v, pushed):
        """Append the tokens pushed out of the pool (pushed (B, H, P) bool over k, v (B, H, P, D)) to the
        overflow buffer; compacted, each head's tokens first, as long as the fullest head needs."""
        if self.over_k is not None:
            k, v = torch.cat([self.over_k, k], 2), torch.cat([self.over_v, v], 2)
            pushed = torch.cat([self.over_used, pushed], 2)
        slots = (~pushed).to(torch.uint8).argsort(dim=-1, stable=True)[..., :int(pushed.sum(-1).max())]
        idx = slots[..., None].expand(-1, -1, -1, k.shape[-1])
        self.over_k, self.over_v, self.over_used = k.gather(2, idx), v.gather(2, idx), pushed.gather(2, slots)

    def blocks(self):
        """(k, v, visible) per set, to attend separately and merge: the dequantized groups (outlier slots
        masked out: those tokens are in the pool or the overflow), the pool, the overflow buffer.
        visible is None (all) or (B, H, 1, S) bool, which attention_with_lse broadcasts."""
        blocks = []
        if self.groups:
            ks, vs = zip(*(dequantize_kv(g.k, g.v) for g in self.groups))
            k, v = torch.cat(ks, 2), torch.cat(vs, 2)
            masks = [g.outlier_mask() for g in self.groups]
            visible = None
            if any(m is not None for m in masks):
                masks = [k.new_zeros(k.shape[:2] + (g.size,), dtype=torch.bool) if m is None else m
                         for m, g in zip(masks, self.groups)]
                visible = ~torch.cat(masks, 2)[:, :, None]
            blocks.append((k, v, visible))
        if self.pool_k is not None:
            blocks.append((self.pool_k, self.pool_v, None))
        if self.over_k is not None and self.over_k.shape[2] > 0:
            blocks.append((self.over_k, self.over_v, self.over_used[:, :, None]))
        return blocks

    def tokens(self):
        """Every token once, (k, v) (B, H, N, D): the dequantized groups in position order (outlier slots
        left out), then the pool, then the overflow. None when nothing was added."""
        blocks = self.blocks()
        if not blocks:
            return None
        k, v = torch.cat([b[0] for b in blocks], 2), torch.cat([b[1] for b in blocks], 2)
        keep = torch.cat([torch.ones(b[0].shape[:3], dtype=torch.bool, device=k.device) if b[2] is None
                          else b[2][:, :, 0] for b in blocks], 2)
        B, H, _, D = k.shape
        return k[keep].view(B, H, -1, D), v[keep].view(B, H, -1, D)  # the same count in every head

    def nbytes(self):
        pools = (self.pool_k, self.pool_v, self.over_k, self.over_v, self.over_used)
        return sum(g.nbytes for g in self.groups) + sum(t.nbytes for t in pools if t is not None)


def attend_block(q, k, v, visible=None):
    """calidrop.attention_with_lse, except that a head that sees none of the block gets (0, -inf), the
    identity of merge (attention_with_lse would give NaN there; it happens in the overflow buffer)."""
    out, lse = calidrop.attention_with_lse(q, k, v, visible)
    return out.masked_fill(lse.isneginf()[..., None], 0), lse


def attend_blocks(q, blocks):
    """Softmax of q (B, Hq, D) over the union of the blocks' keys: one (out, lse) per block, merged."""
    pieces = (attend_block(q, *b) for b in blocks)
    return functools.reduce(lambda a, b: calidrop.merge(*a, *b), pieces)


# ------------------------------------------------------------------------------ 4. the quantized cache

class QuantizedCache:
    """A full-length quantized KV cache behind the model's seam, `attend(layer, q, k, v, pos)`.

    Per layer: the quantized tokens (QuantizedLayer) and a full-precision residual of the most recent
    tokens. Prefill (T > 1, from position 0, once) attends in full precision, then quantizes the prompt in
    groups of G, leaving the last R + (L - R) mod G tokens in the residual. Each decode step appends to the
    residual; when it holds R + G tokens the oldest G are quantized (one event). The first
    `outlier_free_layers` layers keep no outliers; outliers=0 everywhere is KIVI. Shapes grow as tokens
    come (no static buffers, so no torch.compile of the decode step)."""

    def __init__(self, args, batch, bits=2, group=128, residual=32, outliers=3, value_group=None,
                 overflow=32, outlier_free_layers=2, device=None, dtype=None):
        value_group = value_group or args.head_dim
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {bits}")
        if args.head_dim % value_group:
            raise ValueError(f"value_group {value_group} does not divide head_dim {args.head_dim}")
        if group <= outliers:
            raise ValueError(f"group ({group}) must be larger than outliers ({outliers})")
        self.bits, self.group, self.residual = bits, group, residual
        self.layers = [QuantizedLayer(bits, value_group, 0 if i < outlier_free_layers else outliers, overflow)
                       for i in range(args.n_layers)]
        empty = torch.zeros(batch, args.n_kv_heads, 0, args.head_dim, device=device, dtype=dtype)
        self.res_k, self.res_v = [empty] * args.n_layers, [empty] * args.n_layers

    def attend(self, layer, q, k, v, pos):
        """q (B, Hq, T, D), k, v (B, Hkv, T, D) post-RoPE at positions pos (T,) -> (B, Hq, T, D)."""
        if q.shape[2] > 1:
            return self.prefill(layer, q, k, v, pos)
        G, kv = self.group, self.layers[layer]
        res_k, res_v = torch.cat([self.res_k[layer], k], 2), torch.cat([self.res_v[layer], v], 2)
        if res_k.shape[2] == self.residual + G:  # quantize the oldest G
            kv.add(res_k[:, :, :G], res_v[:, :, :G])
            res_k, res_v = res_k[:, :, G:].clone(), res_v[:, :, G:].clone()
        self.res_k[layer], self.res_v[layer] = res_k, res_v
        out, _ = attend_blocks(q[:, :, 0], kv.blocks() + [(res_k, res_v, None)])
        return out[:, :, None]

    def prefill(self, layer, q, k, v, pos):
        assert int(pos[0]) == 0 and self.res_k[layer].shape[2] == 0, "one prefill, from position 0"
        self.store_prompt(layer, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def store_prompt(self, layer, k, v):
        """Quantize a prompt's K/V (B, Hkv, L, D), given once after the full-precision prefill attention
        (also from a full cache's prefill: evaluate.py builds every quantized variant from one prefill)."""
        L, G = k.shape[2], self.group
        n = max(L - self.residual, 0) // G * G  # the last R + (L - R) mod G tokens stay in full precision
        for s in range(0, n, G):
            self.layers[layer].add(k[:, :, s:s + G], v[:, :, s:s + G])
        self.res_k[layer], self.res_v[layer] = k[:, :, n:].clone(), v[:, :, n:].clone()

    def nbytes(self):
        """The real size of every tensor that holds the cache: codes, scales, zero points, outlier masks,
        outlier pools, overflow buffers, residuals."""
        return sum(kv.nbytes() for kv in self.layers) + sum(t.nbytes for t in (*self.res_k, *self.res_v))

    def stats(self, n_tokens):
        """The keys of calidrop.CaliDropCache.stats, for a cache holding n_tokens tokens per sequence."""
        B, H, _, D = self.res_k[0].shape
        full = len(self.layers) * n_tokens * 2 * B * H * D * self.res_k[0].element_size()
        kept = self.nbytes()
        return {"kv_bytes_kept": kept, "kv_bytes_full": full, "kv_bytes_offloaded": 0, "calibration_bytes": 0, "kv_bytes_selection": 0,
                "kv_bytes_allocated": kept, "decisions": {"calibrate": 0.0, "recompute": 0.0, "none": 0.0}}


# ----------------------------------------------------------------- 5. offload stores for CaliDrop

class Int8Store:
    """calidrop.OffloadStore's interface; each evicted token's key and value quantized to 8 bits (uint8
    codes), per token asymmetric: one scale and zero point per token and KV head, in the model's dtype."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.k, self.v = {}, {}

    def put(self, layer, k, v):
        self.k[layer] = quantize(k.to(self.device), 8, dim=-1)
        self.v[layer] = quantize(v.to(self.device), 8, dim=-1)

    def read(self, layer, rows, kv_heads, tokens):
        """Tokens tokens[i] (n, S) of the pairs (rows[i], kv_heads[i]), dequantized: k, v (n, S, D) on rows'
        device; only their codes, scales and zero points are read."""
        def take(q):
            parts = (calidrop.read_tokens(t, rows, kv_heads, tokens) for t in (q.codes, q.scale, q.zero))
            return dequantize(Quantized(*parts, q.bits, q.n))
        return take(self.k[layer]), take(self.v[layer])

    def get(self, layer):
        """Every evicted token of the layer, dequantized: k, v (B, Hkv, E, D)."""
        return dequantize(self.k[layer]), dequantize(self.v[layer])

    def nbytes(self, layer=None):
        layers = self.k if layer is None else [layer]
        return sum(self.k[i].nbytes + self.v[i].nbytes for i in layers)


class OTTStore:
    """calidrop.OffloadStore's interface; the evicted K/V quantized once, as OTT does: in position order,
    in groups of G (the last one may be shorter), no residual, the same outlier rule (the outliers and
    overflow kept in full precision). get returns every evicted token once, dequantized."""

    def __init__(self, device, bits=2, group=128, outliers=3, value_group=None, overflow=32,
                 outlier_free_layers=2):
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {bits}")
        self.device = torch.device(device)
        self.bits, self.group, self.outliers, self.value_group = bits, group, outliers, value_group
        self.overflow, self.outlier_free_layers = overflow, outlier_free_layers
        self.layers, self.empty = {}, {}

    def put(self, layer, k, v):
        k, v = k.to(self.device), v.to(self.device)
        outliers = 0 if layer < self.outlier_free_layers else self.outliers
        stored = QuantizedLayer(self.bits, self.value_group or k.shape[-1], outliers, self.overflow)
        for s in range(0, k.shape[2], self.group):
            stored.add(k[:, :, s:s + self.group], v[:, :, s:s + self.group])
        self.layers[layer], self.empty[layer] = stored, (k[:, :, :0].clone(), v[:, :, :0].clone())

    def read(self, layer, rows, kv_heads, tokens):
        """Tokens tokens[i] (n, S) of the pairs (rows[i], kv_heads[i]), dequantized: k, v (n, S, D). The
        whole layer is dequantized, then the tokens taken: its groups and outlier pools are laid out per
        layer, so a per-token read would need another layout."""
        return tuple(calidrop.read_tokens(x, rows, kv_heads, tokens) for x in self.get(layer))

    def get(self, layer):
        """Every evicted token of the layer once, dequantized: k, v (B, Hkv, E, D)."""
        return self.layers[layer].tokens() or self.empty[layer]

    def nbytes(self, layer=None):
        layers = self.layers if layer is None else [layer]
        return sum(self.layers[i].nbytes() for i in layers)
