"""Decode-time eviction (CaliDropConfig.interval, issue 32), against independent computations (CPU, fp32, the
tiny random Llama of conftest.py): every `interval` new tokens the kept cache is cut back to the budget,
the evicted tokens join the history (the merge is exact), the offload store and the page sketch.
  - recomputing at every step over every evicted token is the full cache, over a generation of many cuts;
  - without calibration the kept set after a cut is a direct re-scoring of the kept tokens (naive scorers on
    layer 0's queries and keys, recomputed from the weights);
  - the accumulated history is the history of the whole evicted set under hist_q, and the store holds exactly
    the evicted tokens;
  - the kept bytes stay flat; compiled equals eager, with no recompile at a cut.
Padded batches with decode-time eviction: test_padding.py."""
import math

import pytest
import torch

import calidrop
import generate
import ott
from conftest import cfg, kept_positions, layer0_qk, random_tokens, top_set
from model import FullCache, decode_one_token, load_model
from test_selection import naive_column_sums, naive_snapkv_scores

N_LAYERS, HQ, HKV, D = 2, 4, 2, 16  # conftest.TINY
L, BUDGET, INTERVAL = 48, 16, 8

pytestmark = pytest.mark.usefixtures("one_thread", "inference_mode")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def decode(model, tokens, config, fn=decode_one_token):
    """Prefill tokens[:, :L], then teacher-force the rest one token at a time, making room before each step as a
    compiled step's caller does: (logits (B, n, V), cache)."""
    n = tokens.shape[1] - L
    _, cache = generate.prefill_and_compress(model, tokens[:, :L], config, n)
    logits = []
    for t in range(L, L + n):
        cache.make_room(t)
        logits.append(fn(model, tokens[:, t:t + 1].clone(), torch.tensor([t]), cache))
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("method", calidrop.METHODS)
def test_recompute_every_step_over_many_cuts_is_the_full_cache(model, method):
    """theta1 > 1: each step recomputes over every evicted token, the prompt's and the generated ones the cuts
    evicted: the full cache's logits over 72 new tokens (8 cuts), while the kept buffers hold budget + interval
    tokens per KV head and the store the rest."""
    n = 72
    tokens = random_tokens(2, L + n, seed=2)
    logits, cache = decode(model, tokens, cfg(method, theta1=2.0, interval=INTERVAL))
    full = model(tokens, torch.arange(L + n), FullCache(model.args, 2, L + n))[:, L:]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)
    budgets = calidrop.pyramid_budgets(BUDGET, N_LAYERS, 4) if method == "pyramidkv" else [BUDGET] * N_LAYERS
    for state, budget in zip(cache.layers, budgets):
        held = state.kept_len + (L + n) - state.cut_pos  # every token is fed, the last at position L + n - 1
        assert state.k.shape[2] == budget + INTERVAL and held <= budget + INTERVAL
        assert (state.evicted_lens == L + n - held).all()  # every other token is in the store


def scores_at_cut(method, q, k, slots, received):
    """Naive scores of layer 0's kept tokens at a cut, for one sequence: q, k (Hq or Hkv, positions, D) for every
    position, slots [kv head][slot] the kept positions in order; received [query head] {position: attention
    received so far} (H2O). -> [kv head][slot]: StreamingLLM's order, SnapKV's votes of the last 4 queries, the
    mean over the group of H2O's attention received."""
    S, G = len(slots[0]), HQ // HKV
    if method == "streamingllm":
        return [[math.inf if slots[h][s] < 4 else s for s in range(S)] for h in range(HKV)]
    if method == "snapkv":
        return [naive_snapkv_scores(q[h * G:(h + 1) * G, slots[h][-4:]][None], k[h:h + 1, slots[h]][None])[0][0]
                + [math.inf] * 4 for h in range(HKV)]
    mean = [[sum(received[g][p] for g in range(h * G, (h + 1) * G)) / G for p in slots[h]] for h in range(HKV)]
    return [row[:S - BUDGET // 2] + [math.inf] * (BUDGET // 2) for row in mean]


def attend_received(q, k, slots, received, p):
    """H2O: the query at position p pays each kept token (slots [kv head][...], every one <= p) its softmax."""
    G = HQ // HKV
    for g in range(HQ):
        keys = slots[g // G]
        w = torch.softmax(k[g // G, keys].double() @ q[g, p].double() / math.sqrt(D), 0).tolist()
        for position, x in zip(keys, w):
            received[g][position] = received[g].get(position, 0.0) + x


@pytest.mark.parametrize("method", ["streamingllm", "snapkv", "h2o"])
def test_a_cut_keeps_what_a_direct_rescoring_keeps(model, method):
    """Plain eviction while decoding: right after each of three cuts, layer 0 keeps exactly the budget that the
    method's naive scorer picks among the kept tokens of the moment (queries and keys recomputed from the
    weights; H2O's attention received replayed from the prompt's queries on), in position order."""
    n = 3 * INTERVAL + 1
    tokens = random_tokens(2, L + n, seed=7)
    q, k = layer0_qk(model, tokens)  # (B, Hq / Hkv, L + n, D), float64
    _, cache = generate.prefill_and_compress(model, tokens[:, :L], cfg(method, calibration=False, interval=INTERVAL), n)
    state = cache.layers[0]
    prefill = state.positions[:, :, :BUDGET].tolist()  # the prefill's selection (test_selection.py checks it)
    for t in range(L, L + n):
        decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache)
    assert state.cut_pos == L + 3 * INTERVAL
    G = HQ // HKV
    for b in range(2):
        slots = prefill[b]
        sums = naive_column_sums(q[b:b + 1, :, :L], k[b:b + 1, :, :L])[0]
        received = [{p: sums[g][p] for p in slots[g // G]} for g in range(HQ)]
        for p in range(L, L + n):
            if (p - L) % INTERVAL == 0 and p > L:  # a cut, before the token at p
                scores = scores_at_cut(method, q[b], k[b], slots, received)
                slots = [sorted(slots[h][s] for s in top_set(scores[h], range(len(slots[h])), BUDGET)) for h in range(HKV)]
                received = [{x: r[x] for x in slots[g // G]} for g, r in enumerate(received)]
            slots = [row + [p] for row in slots]
            attend_received(q[b], k[b], slots, received, p)
        assert state.positions[b, :, :BUDGET].tolist() == [row[:BUDGET] for row in slots], b  # then the last token


@pytest.mark.parametrize("estimate", ["paper", "first-order"])
def test_the_history_is_that_of_the_whole_evicted_set(model, estimate):
    """Never recompute (theta1 -0.99: the store is kept) nor calibrate (theta2 > 1): after 4 cuts each head's
    history is attention of hist_q, the last prompt query, over every evicted token, the prompt's and the
    generated ones (float64, computed apart), kbar included; the store holds exactly those K/V, in the order they
    were evicted (layer 0's keys matched to the full cache's)."""
    n = 4 * INTERVAL + 1
    tokens = random_tokens(2, L + n, seed=5)
    _, cache = decode(model, tokens, cfg("snapkv", theta1=-0.99, theta2=2.0, interval=INTERVAL, estimate=estimate))
    full = FullCache(model.args, 2, L + n)  # the same keys as the compressed cache's: its prefill, then one by one
    model(tokens[:, :L], torch.arange(L), full)
    for t in range(L, L + n):
        decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), full)
    for layer, state in enumerate(cache.layers):
        E = state.evicted_lens
        assert (E == L + n - 1 - (state.kept_len + (L + n - 1) - state.cut_pos)).all()
        k_ev, v_ev = (x[:, :, :int(E[0])] for x in cache.store.get(layer))
        if layer == 0:  # its keys are the full cache's (a later layer's new keys follow the compressed attention)
            ev_positions = kept_positions(k_ev, full.k[layer], int(E[0]))  # the evicted keys, matched exactly
            kept = state.positions[:, :, :state.kept_len]
            assert torch.equal(torch.cat([ev_positions, kept], -1).sort(-1).values,
                               torch.arange(state.cut_pos).expand(2, HKV, -1))  # every token is kept or stored
        values = k_ev.double().repeat_interleave(HQ // HKV, 1)
        w = torch.softmax(torch.einsum("bhd,bhsd->bhs", state.hist_q.double(), values) / math.sqrt(D), -1)
        out = torch.einsum("bhs,bhsd->bhd", w, v_ev.double().repeat_interleave(HQ // HKV, 1))
        lse = torch.logsumexp(torch.einsum("bhd,bhsd->bhs", state.hist_q.double(), values) / math.sqrt(D), -1)
        torch.testing.assert_close(state.hist_out[..., :D].double(), out, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.hist_lse.double(), lse, atol=1e-5, rtol=0)
        if estimate == "first-order":
            kbar = torch.einsum("bhs,bhsd->bhd", w, values)
            torch.testing.assert_close(state.hist_out[..., D:].double(), kbar, atol=1e-5, rtol=0)


def test_kept_bytes_stay_flat_and_the_store_grows(model):
    """After the first cut the kept bytes stay within budget + interval tokens per (layer, KV head), their peak
    is the full buffers, while the offloaded bytes grow by the tokens evicted."""
    n = 6 * INTERVAL + 1
    tokens = random_tokens(1, L + n, seed=3)
    config = cfg("snapkv", theta1=0.3, theta2=0.6, interval=INTERVAL)
    _, cache = generate.prefill_and_compress(model, tokens[:, :L], config, n)
    per_token = 2 * N_LAYERS * HKV * D * 4
    seen = []
    for t in range(L, L + n):
        decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache)
        seen.append(cache.stats(t + 1))
    for t, s in zip(range(L, L + n), seen):
        assert s["kv_bytes_kept"] <= (BUDGET + INTERVAL) * per_token
        assert s["kv_bytes_offloaded"] == (t + 1 - s["kv_bytes_kept"] / per_token) * per_token
    assert seen[-1]["kv_bytes_kept_peak"] == (BUDGET + INTERVAL) * per_token
    assert seen[-1]["kv_bytes_scoring"] == N_LAYERS * 4 * HQ * D * 4  # the last 4 queries (SnapKV's window)


def test_compiled_step_equals_eager_and_a_cut_compiles_nothing(model):
    """The decode step compiled whole (fullgraph) with decode-time eviction, ranked pages and the first-order
    estimate: cuts happen between steps (make_room), in place, so after the first step nothing compiles again;
    the logits, decisions and tokens read equal eager decoding."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager")
    n = 4 * INTERVAL
    tokens = random_tokens(2, L + n, seed=11)
    config = cfg("h2o", theta1=0.3, theta2=0.6, interval=INTERVAL, reload_pages=2, page_size=4, estimate="first-order")
    eager, cache_e = decode(model, tokens, config)
    graphs = counters["stats"]["unique_graphs"]
    compiled, cache_c = decode(model, tokens, config, lambda *a: step(*a))
    assert counters["stats"]["unique_graphs"] == graphs + 1
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert torch.equal(cache_c.counts, cache_e.counts) and torch.equal(cache_c.reload_tokens, cache_e.reload_tokens)
    assert cache_e.counts[..., 1].sum() > 0 and cache_e.layers[0].cut_pos == L + 3 * INTERVAL


def test_what_decode_time_eviction_refuses():
    with pytest.raises(ValueError, match="calibration_size"):
        cfg("snapkv", interval=8, calibration_size=4)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        cfg("snapkv", interval=0)


def test_a_quantized_store_is_refused(model):
    tokens = random_tokens(1, L, seed=1)
    with pytest.raises(ValueError, match="OTTStore cannot take the tokens evicted while decoding"):
        generate.prefill_and_compress(model, tokens, cfg("snapkv", interval=8), 4, ott.OTTStore("cpu", bits=2))


def test_the_page_sketch_takes_the_evicted_tokens(model):
    """With ranked pages, after 4 cuts each valid token of the store is in the key sketch: its position, its
    coordinates on the prefill's basis (4-bit, within half a step unless past the scale, where they clip),
    and each page's mean coordinates and position are the means over its tokens (computed apart, from the
    store's keys rotated back with rope written out pair by pair)."""
    import calidrop_pages
    from test_pages import rope
    n = 4 * INTERVAL + 1
    tokens = random_tokens(2, L + n, seed=12)
    _, cache = decode(model, tokens, cfg("snapkv", theta1=0.3, theta2=0.6, interval=INTERVAL, reload_pages=2, page_size=4))
    for layer, state in enumerate(cache.layers):
        sketch, E = state.pages.sketch, int(state.evicted_lens[0])
        assert (state.evicted_lens == E).all() and E == L - BUDGET + 4 * INTERVAL
        k = cache.store.get(layer)[0][:, :, :E].double()
        positions = sketch.positions[:, :, :E].long()
        assert torch.equal(torch.cat([positions, state.positions[:, :, :BUDGET]], -1).sort(-1).values,
                           torch.arange(L + 4 * INTERVAL).expand(2, HKV, -1))
        coords = rope(k, -positions) @ sketch.basis.double().transpose(-1, -2)  # (B, Hkv, E, r)
        codes = (calidrop_pages.unpack(sketch.coords[:, :, :E], 4, coords.shape[-1]).double() - 8) * sketch.scale
        inside = coords.abs() <= 7 * sketch.scale
        assert ((codes - coords).abs()[inside] <= sketch.scale.expand_as(coords)[inside] / 2 + 1e-4).all()
        for p in range(E // 4):
            torch.testing.assert_close(sketch.page_coords[:, :, p].double(), coords[:, :, 4 * p:4 * p + 4].mean(2),
                                       atol=1e-4, rtol=0)
            torch.testing.assert_close(sketch.page_positions[:, :, p].double(),
                                       positions[:, :, 4 * p:4 * p + 4].double().mean(2), atol=1e-4, rtol=0)
