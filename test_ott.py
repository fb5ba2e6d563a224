"""Tests of ott.py against independent computations (CPU, the tiny random Llama of conftest.py).

What is checked (spec CALIDROP.md, sections 9 and 10, "ott.py" and "Byte counts"):
  - pack/unpack is exact for every code, bit layout included; quantize-dequantize is within half a step;
    a constant channel (keys) or token (values) round-trips exactly; scales live in the model dtype;
  - the outlier rule against a naive loop implementation: pool turnover, the overflow buffer, the freeze,
    the group's stand-ins, layers 0-1 and KIVI without outliers;
  - decode attention through the quantized cache equals float64 attention over the concatenation of the
    dequantized groups (outlier slots left out), the pool, the overflow and the residual;
  - with bits 16 the cache gives the full cache's logits over 300 decode steps (several events);
  - CaliDrop recomputing every step over an int8 / OTT store is exact attention over the *dequantized*
    evicted K/V;
  - byte counts are the sizes of the tensors that hold the cache, against closed forms.
"""
import math
import types

import pytest
import torch

import calidrop
import ott
from model import FullCache, decode_one_token, load_model, prefill

HQ, HKV, D = 4, 2, 16  # the tiny model of conftest.TINY (2 layers)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


pytestmark = pytest.mark.usefixtures("one_thread", "inference_mode")


def shape(n_layers):
    return types.SimpleNamespace(n_layers=n_layers, n_kv_heads=HKV, head_dim=D)


def keys_with_norms(norms, g):
    """Keys (B, H, N, D) pointing in random directions with the given L2 norms (B, H, N)."""
    k = torch.randn(*norms.shape, D, generator=g, dtype=torch.float64)
    return (k / k.norm(dim=-1, keepdim=True) * norms[..., None]).float()


def naive_attention(q, k, v):
    """Softmax attention of q (B, Hq, D) over k, v (B, Hkv, S, D), GQA by repeating KV heads, float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    w = torch.softmax(torch.einsum("bhd,bhsd->bhs", q.double(), k) / math.sqrt(q.shape[-1]), -1)
    return torch.einsum("bhs,bhsd->bhd", w, v)


def match_rows(x, ref):
    """Index in ref (N, D) of each row of x (M, D), asserting one exact match per row."""
    eq = (x[:, None, :] == ref[None, :, :]).all(-1)
    assert (eq.sum(-1) == 1).all(), "a row matches no (or several) reference rows"
    return eq.float().argmax(-1).tolist()


# ------------------------------------------------------------------------- 1. quantize, pack, unpack

@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_is_exact_for_every_code(bits):
    per = 8 // bits
    g = torch.Generator().manual_seed(bits)
    n = 3 * 2**bits + 1  # every code several times, and a last byte only partly filled (for bits < 8)
    codes = torch.arange(n).remainder(2**bits)[torch.randperm(n, generator=g)].to(torch.uint8).expand(3, 2, n)
    packed = ott.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, math.ceil(n / per))
    assert packed.nbytes == 3 * 2 * math.ceil(n * bits / 8)  # really stored that way
    assert torch.equal(ott.unpack(packed, bits, n), codes)
    # the layout: code i of a byte in bits [bits * i, bits * (i + 1)), the first in the lowest bits
    flat = codes[0, 0].tolist() + [0] * (-n % per)
    expected = [sum(c << (bits * i) for i, c in enumerate(flat[j:j + per])) for j in range(0, len(flat), per)]
    assert packed[0, 0].tolist() == expected


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_error_is_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    B, H, G = 2, 3, 40
    k = torch.randn(B, H, G, D, generator=g) * torch.rand(D, generator=g) * 10 + torch.randn(D, generator=g)
    v = torch.randn(B, H, G, D, generator=g) * torch.rand(1, 1, G, 1, generator=g) * 10
    qk, qv = ott.quantize_kv(k, v, bits, value_group=8)
    assert qk.scale.shape == qk.zero.shape == (B, H, 1, D)       # keys: per channel over the group
    assert qv.scale.shape == qv.zero.shape == (B, H, G, 2, 1)    # values: per token, groups of 8 channels
    dk, dv = ott.dequantize_kv(qk, qv)
    for x, deq, q in ((k, dk, qk), (v.unflatten(-1, (2, 8)), dv.unflatten(-1, (2, 8)), qv)):
        step = q.scale.float()
        # scale = (max - min) / (2^bits - 1), zero = min, over the quantized dim
        dim = -2 if q is qk else -1
        torch.testing.assert_close(q.zero, x.amin(dim, keepdim=True), atol=0, rtol=0)
        torch.testing.assert_close(step, (x.amax(dim, keepdim=True) - q.zero) / (2**bits - 1),
                                   atol=1e-6, rtol=1e-6)
        err = (deq - x).abs()
        assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
        assert (err > step / 4).any()  # not vacuous: the codes really are coarse
        codes = ott.unpack(q.codes, bits, q.n)
        assert codes.min() == 0 and codes.max() == 2**bits - 1  # min and max hit the end codes


def test_constant_channel_and_token_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, HKV, 32, D, generator=g)
    k[:, :, :, 3] = 0.3172  # one key channel constant over the group
    k[1, 0, :, 7] = -2.5
    v = torch.randn(2, HKV, 32, D, generator=g)
    v[:, :, 5, :] = 1.234  # one token's values constant
    v[0, 1, 9, 8:] = -0.75  # one token's second channel group constant
    for bits in (2, 4, 8):
        dk, dv = ott.dequantize_kv(*ott.quantize_kv(k, v, bits, value_group=8))
        assert torch.equal(dk[:, :, :, 3], k[:, :, :, 3]) and torch.equal(dk[1, 0, :, 7], k[1, 0, :, 7])
        assert torch.equal(dv[:, :, 5], v[:, :, 5]) and torch.equal(dv[0, 1, 9, 8:], v[0, 1, 9, 8:])
    dk, dv = ott.dequantize_kv(*ott.quantize_kv(k, v, 16, value_group=8))  # 16: no quantization
    assert torch.equal(dk, k) and torch.equal(dv, v)


def test_scales_and_zeros_in_the_model_dtype():
    x = torch.randn(2, HKV, 8, D, generator=torch.Generator().manual_seed(0)).bfloat16()
    q = ott.quantize(x, 2, dim=-2)
    assert q.scale.dtype == q.zero.dtype == torch.bfloat16 and q.codes.dtype == torch.uint8
    assert q.nbytes == 2 * HKV * 8 * D // 4 + 2 * (2 * HKV * D * 2)
    deq = ott.dequantize(q)
    assert deq.dtype == torch.bfloat16
    # bf16 adds the rounding of the scale and of the output to the half step
    assert ((deq.float() - x.float()).abs() <= q.scale.float() * 0.51 + x.float().abs() * 2**-8).all()


# ---------------------------------------------------------------------------------- 2. the outlier rule

def naive_trace(norms, group, n, capacity):
    """The outlier rule with lists, for one (sequence, KV head); tokens are ids 0..N-1 in position order,
    norms[i] their key norms. Returns, per event, the group's outlier ids, and the final pool and overflow."""
    pool, overflow, entered_per_event, turnovers, frozen_events = [], [], [], [], 0
    for start in range(0, len(norms), group):
        ids = list(range(start, min(start + group, len(norms))))
        if pool and capacity - len(overflow) < n:  # no room for a whole turnover: frozen
            entered_per_event.append([])
            frozen_events += 1
            continue
        candidates = pool + ids
        best = sorted(range(len(candidates)), key=lambda i: (norms[candidates[i]], i))[:n]
        chosen = {candidates[i] for i in best}
        overflow += [t for t in pool if t not in chosen]
        turnovers.append(sum(t not in chosen for t in pool))
        entered_per_event.append([t for t in ids if t in chosen])
        pool = [t for t in candidates if t in chosen]
    return entered_per_event, pool, overflow, turnovers, frozen_events


@pytest.mark.parametrize("bits", [16, 2])
def test_outlier_selection_matches_naive_loops(bits):
    B, G, n, capacity, N = 2, 8, 3, 7, 96  # 12 events
    g = torch.Generator().manual_seed(5)
    # head 0: norms falling over time, so each group takes the whole pool (fast turnover, then the freeze);
    # head 1: random norms, partial turnovers
    f64 = dict(generator=g, dtype=torch.float64)
    falling = torch.linspace(10, 1, N, dtype=torch.float64) + torch.rand(B, N, **f64) * 3
    norms = torch.stack([falling, 1 + torch.rand(B, N, **f64) * 9], 1)  # (B, H, N)
    k = keys_with_norms(norms, g)
    v = torch.randn(B, HKV, N, D, generator=g)
    layer = ott.QuantizedLayer(bits, D, n, capacity)
    for s in range(0, N, G):
        layer.add(k[:, :, s:s + G], v[:, :, s:s + G])

    all_turnovers, all_frozen = [], 0
    for b in range(B):
        for h in range(HKV):
            entered, pool, overflow, turnovers, frozen = naive_trace(k[b, h].double().norm(dim=-1).tolist(),
                                                                     G, n, capacity)
            all_turnovers += turnovers
            all_frozen += frozen
            for e, grp in enumerate(layer.groups):
                mask = grp.outlier_mask()[b, h]
                assert mask.nonzero().flatten().tolist() == [t - e * G for t in entered[e]]
            assert match_rows(layer.pool_k[b, h], k[b, h]) == pool
            used = layer.over_used[b, h]
            assert used.tolist() == [True] * len(overflow) + [False] * (len(used) - len(overflow))
            assert match_rows(layer.over_k[b, h][used], k[b, h]) == overflow
            assert match_rows(layer.pool_v[b, h], v[b, h]) == pool  # values travel with their keys
            assert match_rows(layer.over_v[b, h][used], v[b, h]) == overflow
            assert len(overflow) <= capacity
    # the case exercises what it claims: whole and partial turnovers, and frozen heads
    assert n in all_turnovers and any(0 < t < n for t in all_turnovers) and all_frozen > 0

    for e, grp in enumerate(layer.groups):
        mask = grp.outlier_mask()[..., None]
        k_grp, v_grp = k[:, :, e * G:(e + 1) * G], v[:, :, e * G:(e + 1) * G]
        if bits == 16:  # the stand-ins: the mean key and value of the group's other tokens
            rest = (~mask).double()
            mean_k = (k_grp.double() * rest).sum(2, keepdim=True) / rest.sum(2, keepdim=True)
            mean_v = (v_grp.double() * rest).sum(2, keepdim=True) / rest.sum(2, keepdim=True)
            stored_k, stored_v = ott.dequantize_kv(grp.k, grp.v)
            torch.testing.assert_close(stored_k.double(), torch.where(mask, mean_k, k_grp.double()),
                                       atol=1e-6, rtol=0)
            torch.testing.assert_close(stored_v.double(), torch.where(mask, mean_v, v_grp.double()),
                                       atol=1e-6, rtol=0)
        else:  # the outliers do not stretch the keys' range: scale and zero are those of the other tokens
            lo = k_grp.masked_fill(mask, float("inf")).amin(2, keepdim=True)
            hi = k_grp.masked_fill(mask, -float("inf")).amax(2, keepdim=True)
            torch.testing.assert_close(grp.k.zero, lo, atol=0, rtol=0)
            torch.testing.assert_close(grp.k.scale, (hi - lo) / 3, atol=1e-6, rtol=1e-6)


def test_first_layers_and_kivi_hold_no_outliers():
    g = torch.Generator().manual_seed(6)
    B, L = 2, 100
    q = torch.randn(B, HQ, L, D, generator=g)
    k, v = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    ott_cache = ott.QuantizedCache(shape(4), B, group=16, residual=8)  # outlier_free_layers=2 by default
    kivi = ott.QuantizedCache(shape(4), B, group=16, residual=8, outliers=0)
    for cache in (ott_cache, kivi):
        for layer in range(4):
            cache.attend(layer, q, k, v, torch.arange(L))
        for layer in range(4):
            kv = cache.layers[layer]
            assert len(kv.groups) == (L - 8) // 16
            with_outliers = cache is ott_cache and layer >= 2
            assert (kv.pool_k is not None) == with_outliers
            assert all((grp.outliers is not None) == with_outliers for grp in kv.groups)
            if with_outliers:
                assert kv.pool_k.shape == (B, HKV, 3, D)
            else:
                assert kv.over_k is None


# ----------------------------------------------------------------------- 3. attention through the cache

def concatenated_tokens(cache, layer):
    """Per (sequence, KV head): the dequantized group tokens that are not outliers, the pool, the used
    overflow slots and the residual, built by hand. Returns [b][h] -> (k (S, D), v (S, D))."""
    kv = cache.layers[layer]
    B = cache.res_k[layer].shape[0]
    result = [[None] * HKV for _ in range(B)]
    for b in range(B):
        for h in range(HKV):
            ks, vs = [], []
            for grp in kv.groups:
                dk, dv = ott.dequantize_kv(grp.k, grp.v)
                mask = grp.outlier_mask()
                keep = torch.ones(grp.size, dtype=torch.bool) if mask is None else ~mask[b, h]
                ks.append(dk[b, h][keep])
                vs.append(dv[b, h][keep])
            if kv.pool_k is not None:
                ks.append(kv.pool_k[b, h])
                vs.append(kv.pool_v[b, h])
                used = kv.over_used[b, h]
                ks.append(kv.over_k[b, h][used])
                vs.append(kv.over_v[b, h][used])
            ks.append(cache.res_k[layer][b, h])
            vs.append(cache.res_v[layer][b, h])
            result[b][h] = torch.cat(ks), torch.cat(vs)
    return result


def test_attention_equals_attention_over_the_concatenation():
    g = torch.Generator().manual_seed(7)
    B, L, steps, G, R = 2, 30, 60, 8, 4
    cache = ott.QuantizedCache(shape(3), B, bits=2, group=G, residual=R, overflow=5, outlier_free_layers=1)

    def kv(T):  # keys with widely spread norms, so the pools turn over
        return (torch.randn(B, HKV, T, D, generator=g) * torch.randn(B, HKV, T, 1, generator=g).exp(),
                torch.randn(B, HKV, T, D, generator=g))
    k, v = kv(L)
    for layer in range(3):
        cache.attend(layer, torch.randn(B, HQ, L, D, generator=g), k, v, torch.arange(L))
    saw_masked_overflow = False
    for t in range(L, L + steps):
        for layer in range(3):
            q = torch.randn(B, HQ, 1, D, generator=g) * 2
            out = cache.attend(layer, q, *kv(1), torch.tensor([t]))
            tokens = concatenated_tokens(cache, layer)
            for b in range(B):
                for h in range(HKV):
                    k_all, v_all = tokens[b][h]
                    assert k_all.shape[0] == t + 1  # every token once
                    ref = naive_attention(q[b:b + 1, 2 * h:2 * h + 2, 0], k_all[None, None], v_all[None, None])
                    torch.testing.assert_close(out[b, 2 * h:2 * h + 2, 0].double(), ref[0], atol=1e-5, rtol=0)
            used = cache.layers[layer].over_used
            saw_masked_overflow |= used is not None and not used.all()
            res = cache.res_k[layer].shape[2]
            assert R <= res < R + G and (t + 1 - res) == G * len(cache.layers[layer].groups)
    assert saw_masked_overflow  # heads with different overflow counts: the masked block was exercised


def teacher_forced(model, cache, tokens, prompt_len):
    logits = [prefill(model, tokens[:, :prompt_len], cache)]
    for t in range(prompt_len, tokens.shape[1]):
        logits.append(decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache))
    return torch.stack(logits, 1)


@pytest.mark.parametrize("L,kw", [(200, dict()),  # the defaults: G 128, R 32, overflow 32
                                  (40, dict(group=16, residual=8, overflow=6))])
def test_bits16_equals_full_cache_over_300_steps(model, L, kw):
    n = 300
    tokens = torch.randint(0, 256, (2, L + n), generator=torch.Generator().manual_seed(8))
    reference = model(tokens, torch.arange(L + n), FullCache(model.args, 2, L + n))[:, L - 1:]
    cache = ott.QuantizedCache(model.args, 2, bits=16, outlier_free_layers=0, **kw)
    torch.testing.assert_close(teacher_forced(model, cache, tokens, L), reference, atol=1e-4, rtol=0)
    G, R = kw.get("group", 128), kw.get("residual", 32)
    for kv in cache.layers:
        events_in_prefill = (L - R) // G
        assert len(kv.groups) - events_in_prefill >= 2  # quantization events while decoding
        assert kv.pool_k.shape == (2, HKV, 3, D) and kv.over_used.any()  # the pools turned over
        if "overflow" in kw:  # and some head froze: its overflow cannot take a whole turnover
            assert (kv.over_used.sum(-1) > kw["overflow"] - 3).any()


def test_error_falls_with_bits(model):
    L, n = 100, 40
    tokens = torch.randint(0, 256, (1, L + n), generator=torch.Generator().manual_seed(9))
    reference = model(tokens, torch.arange(L + n), FullCache(model.args, 1, L + n))[:, L - 1:]
    errors = []
    for bits in (2, 4, 8):
        cache = ott.QuantizedCache(model.args, 1, bits=bits, group=16, residual=8, outlier_free_layers=0)
        errors.append((teacher_forced(model, cache, tokens, L) - reference).abs().max().item())
    assert errors[0] > errors[1] > errors[2] > 0, errors


# --------------------------------------------------------- 4. CaliDrop over a quantized offload store

STORES = {"int8": lambda: ott.Int8Store("cpu"),
          "ott": lambda: ott.OTTStore("cpu", bits=2, group=12, outlier_free_layers=0, overflow=4),
          "ott4": lambda: ott.OTTStore("cpu", bits=4, group=12, outlier_free_layers=1),
          "ott16": lambda: ott.OTTStore("cpu", bits=16, group=12, outlier_free_layers=0, overflow=4)}


def calidrop_caches(model, store, L=48, B=2):
    """One prefill, two CaliDrop caches (budget 16, recompute every step): the given store, the exact one."""
    tokens = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(10))
    full = FullCache(model.args, B, L)
    recorder = calidrop.PrefillRecorder(full, 4)
    prefill(model, tokens, recorder)
    config = calidrop.CaliDropConfig(method="snapkv", budget=16, window=4, theta1=2.0, theta2=-1.0)
    make = lambda s: calidrop.CaliDropCache.from_prefill(config, full.k, full.v, recorder, 4, store=s)
    return make(store), make(None)


@pytest.mark.parametrize("kind", list(STORES))
def test_calidrop_recompute_is_exact_over_the_dequantized_evicted_kv(model, kind):
    cache, exact = calidrop_caches(model, STORES[kind]())
    L, B, E = 48, 2, 32
    g = torch.Generator().manual_seed(11)
    for layer in range(2):
        k_ev, v_ev = cache.store.get(layer)
        k_true, v_true = exact.store.get(layer)
        assert k_ev.shape == v_ev.shape == (B, HKV, E, D)  # every evicted token once
        # the same tokens, each key with its value: match rows by the first key channel (distinct post-RoPE)
        for b in range(B):
            for h in range(HKV):
                o, o_true = k_ev[b, h, :, 0].argsort(), k_true[b, h, :, 0].argsort()
                if kind == "ott16":
                    assert torch.equal(k_ev[b, h, o], k_true[b, h, o_true])
                    assert torch.equal(v_ev[b, h, o], v_true[b, h, o_true])
        if kind != "ott16":
            assert not torch.allclose(k_ev, k_true, atol=1e-3)  # the stored values really changed

        q = torch.randn(B, HQ, 1, D, generator=g) * 3
        k_new, v_new = torch.randn(B, HKV, 1, D, generator=g), torch.randn(B, HKV, 1, D, generator=g)
        out = cache.attend(layer, q, k_new, v_new, torch.tensor([L]))
        n = cache.layers[layer].kept_len
        keys = torch.cat([cache.layers[layer].k[:, :, :n], k_new, k_ev], 2)
        values = torch.cat([cache.layers[layer].v[:, :, :n], v_new, v_ev], 2)
        torch.testing.assert_close(out[:, :, 0].double(), naive_attention(q[:, :, 0], keys, values),
                                   atol=1e-5, rtol=0)
        exact_keys = torch.cat([cache.layers[layer].k[:, :, :n], k_new, k_true], 2)
        exact_values = torch.cat([cache.layers[layer].v[:, :, :n], v_new, v_true], 2)
        exact_out = naive_attention(q[:, :, 0], exact_keys, exact_values)
        if kind in ("ott", "int8"):  # and attention over the exact evicted K/V is not what it computes
            assert not torch.allclose(out[:, :, 0].double(), exact_out, atol=1e-5)
    assert cache.decisions()["recompute"] == 1.0


# ------------------------------------------------------------------------------------- 5. byte counts

def test_byte_counts_kivi_closed_form():
    B, L, steps, G, R, gv = 2, 70, 30, 16, 8, 8
    g = torch.Generator().manual_seed(12)
    for dtype, es in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = ott.QuantizedCache(shape(2), B, bits=2, group=G, residual=R, outliers=0, value_group=gv,
                                   dtype=dtype)
        for layer in range(2):
            cache.attend(layer, torch.randn(B, HQ, L, D, generator=g, dtype=dtype),
                         torch.randn(B, HKV, L, D, generator=g, dtype=dtype),
                         torch.randn(B, HKV, L, D, generator=g, dtype=dtype), torch.arange(L))
        for t in range(L, L + steps):
            for layer in range(2):
                cache.attend(layer, *(torch.randn(B, h, 1, D, generator=g, dtype=dtype) for h in (HQ, HKV, HKV)),
                             torch.tensor([t]))
        n_groups = len(cache.layers[0].groups)
        res = L + steps - n_groups * G
        assert n_groups == 5 and res == 20  # 3 groups in prefill (70 - 8 = 62 -> 48), 2 while decoding
        per_group = B * HKV * (G * D // 4 * 2          # K and V codes: four 2-bit codes a byte
                               + 2 * D * es            # K: a scale and a zero point per channel
                               + 2 * G * (D // gv) * es)  # V: a scale and a zero point per token and channel group
        expected = 2 * (n_groups * per_group + res * B * HKV * D * 2 * es)
        s = cache.stats(L + steps)
        assert s["kv_bytes_kept"] == expected == s["kv_bytes_allocated"]
        assert s["kv_bytes_full"] == 2 * (L + steps) * B * HKV * D * 2 * es
        assert set(s) == {"kv_bytes_kept", "kv_bytes_full", "kv_bytes_offloaded", "calibration_bytes",
                          "kv_bytes_selection", "kv_bytes_allocated", "decisions"}
        assert s["kv_bytes_offloaded"] == s["calibration_bytes"] == 0


def test_byte_counts_ott_are_the_holding_tensors():
    B, L, G, R = 2, 100, 16, 8
    g = torch.Generator().manual_seed(13)
    cache = ott.QuantizedCache(shape(3), B, bits=2, group=G, residual=R, outlier_free_layers=1)
    for layer in range(3):
        cache.attend(layer, torch.randn(B, HQ, L, D, generator=g),
                     torch.randn(B, HKV, L, D, generator=g) * torch.randn(B, HKV, L, 1, generator=g).exp(),
                     torch.randn(B, HKV, L, D, generator=g), torch.arange(L))
    total = 0
    for layer, kv in enumerate(cache.layers):
        for grp in kv.groups:
            held = [grp.k.codes, grp.k.scale, grp.k.zero, grp.v.codes, grp.v.scale, grp.v.zero]
            assert grp.k.codes.dtype == grp.v.codes.dtype == torch.uint8
            assert grp.k.codes.nbytes == grp.v.codes.nbytes == B * HKV * G * D // 4
            if layer >= 1:  # the outlier mask: one bit per slot
                assert grp.outliers.nbytes == B * HKV * G // 8
                held.append(grp.outliers)
            total += sum(t.nbytes for t in held)
        if layer >= 1:
            assert kv.pool_k.shape == (B, HKV, 3, D)
            total += sum(t.nbytes for t in (kv.pool_k, kv.pool_v, kv.over_k, kv.over_v, kv.over_used))
        total += cache.res_k[layer].nbytes + cache.res_v[layer].nbytes
    assert cache.stats(L)["kv_bytes_kept"] == total


def test_store_byte_counts():
    B, E, G = 2, 40, 16
    g = torch.Generator().manual_seed(14)
    k, v = torch.randn(B, HKV, E, D, generator=g), torch.randn(B, HKV, E, D, generator=g)
    int8 = ott.Int8Store("cpu")
    kivi = ott.OTTStore("cpu", bits=2, group=G, outliers=0)
    for store in (int8, kivi):
        for layer in range(2):
            store.put(layer, k, v)
    assert int8.nbytes() == 2 * 2 * B * HKV * E * (D + 2 * 4)  # layers x (K, V) x tokens x (codes + scale, zero)
    groups = [16, 16, 8]  # the last group is shorter; no residual
    assert kivi.nbytes() == 2 * sum(B * HKV * (n * D // 4 * 2 + 2 * D * 4 + 2 * n * 4) for n in groups)
    # an empty evicted set (calibration_size 0)
    empty = ott.OTTStore("cpu")
    empty.put(0, k[:, :, :0], v[:, :, :0])
    assert [t.shape for t in empty.get(0)] == [(B, HKV, 0, D)] * 2 and empty.nbytes() == 0
