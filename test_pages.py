"""The page-sparse recompute and the decode step without host syncs (calidrop.py sections 4 and 5), against
independent computations (CPU, fp32, the tiny random Llama of conftest.py):
  - the key sketch recovers low-rank pre-RoPE keys within its 4-bit rounding, at the bytes it reports;
  - the page ranking equals a naive loop over pages and heads;
  - a page-sparse recompute is exact attention over the pages it reads (found by trying every page set),
    and those are the pages the ranking picks; reading every page is the dense recompute, bit for bit;
  - a reload capacity of every KV head is the unbounded rule, bit for bit; a smaller one recomputes the
    stalest KV heads first and the others wait;
  - the compiled step (fullgraph=True: no graph break, no host sync) equals the eager one.
"""
import itertools
import math

import pytest
import torch

import calidrop
import generate
from conftest import cfg, query_at_cosine, random_tokens, teacher_force
from model import decode_one_token, load_model

N_LAYERS, HQ, HKV, D = 2, 4, 2, 16  # conftest.TINY
L, BUDGET = 48, 16  # the prompt and what cfg keeps: 32 evicted tokens per (layer, sequence, KV head)

pytestmark = pytest.mark.usefixtures("one_thread", "inference_mode")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def rope(x, positions, theta=10000.0):
    """RoPE written out pair by pair (channel i with i + D/2), independently of calidrop.rotate."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = positions.double() * theta ** (-2 * i / d)
        a, b = x[..., i].double(), x[..., i + d // 2].double()
        out[..., i] = (a * angle.cos() - b * angle.sin()).to(x.dtype)
        out[..., i + d // 2] = (b * angle.cos() + a * angle.sin()).to(x.dtype)
    return out


def naive_page_weights(q, keys, lse_kept, heads, page_size):
    """[pair][page]: for each recomputing head, the page's exp-score mass over the head's whole attention
    (kept + every evicted page), summed over the heads; plain loops."""
    n, G, d = q.shape
    E = keys.shape[1]
    weights = []
    for i in range(n):
        pages = [range(s, min(s + page_size, E)) for s in range(0, E, page_size)]
        per_page = [0.0] * len(pages)
        for g in range(G):
            if not heads[i, g]:
                continue
            mass = [sum(math.exp(float(q[i, g] @ keys[i, t]) / math.sqrt(d)) for t in page) for page in pages]
            total = math.exp(float(lse_kept[i, g])) + sum(mass)
            per_page = [w + m / total for w, m in zip(per_page, mass)]
        weights.append(per_page)
    return weights


def test_key_sketch_recovers_low_rank_pre_rope_keys():
    g = torch.Generator().manual_seed(0)
    B, H, E, d, r = 2, 2, 40, 16, 4
    pre = torch.randn(B, H, E, r, generator=g) @ torch.randn(B, H, r, d, generator=g)  # rank 4 before RoPE
    positions = torch.stack([torch.randperm(300, generator=g)[:E].sort().values for _ in range(B * H)]).view(B, H, E)
    keys = rope(pre, positions)
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    sketch = calidrop.sketch_keys(keys, positions, inv_freq, rank=r)
    rows, kv_heads = torch.arange(B).repeat_interleave(H), torch.arange(H).repeat(B)
    approx = calidrop.sketched_keys(sketch, rows, kv_heads, inv_freq).view(B, H, E, d)
    # each coordinate is off by at most half its 4-bit step and the basis is orthonormal
    bound = math.sqrt(r) * sketch.scale.amax(-1) / 2  # (B, H, 1)
    assert ((approx - keys).norm(dim=-1) <= bound + 1e-4).all()
    assert (approx - keys).norm(dim=-1).mean() > 1e-3  # the codes really are 4 bits
    # what it holds: 4 bits per coordinate, a scale per coordinate, the basis, an int32 position per token
    assert sketch.nbytes == B * H * (E * r // 2 + r * 4 + r * d * 4 + E * 4)


def test_top_pages_matches_a_naive_page_ranking():
    g = torch.Generator().manual_seed(1)
    n, G, d, E, page_size, n_pages = 3, 2, 16, 37, 8, 2  # 5 pages, the last one of 5 tokens
    q, keys = torch.randn(n, G, d, generator=g), torch.randn(n, E, d, generator=g)
    lse_kept = torch.randn(n, G, generator=g) + 3
    heads = torch.tensor([[True, True], [True, False], [False, True]])
    tokens, visible = calidrop.top_pages(q, keys, lse_kept, heads, n_pages, page_size, E)
    for i, weights in enumerate(naive_page_weights(q, keys, lse_kept, heads, page_size)):
        ranked = sorted(range(len(weights)), key=lambda p: -weights[p])
        assert weights[ranked[1]] - weights[ranked[2]] > 1e-6  # no near tie
        expected = [t for p in sorted(ranked[:n_pages]) for t in range(p * page_size, (p + 1) * page_size)]
        assert visible[i].tolist() == [t < E for t in expected]
        assert tokens[i][visible[i]].tolist() == [t for t in expected if t < E]


def test_paged_recompute_attends_exactly_the_pages_it_reads(model):
    """Every head recomputes (theta1 > 1); pages of 4 of the 32 evicted tokens, 2 read per recompute. The new
    history of each head is attention over some 2 pages: trying all 28 pairs of pages finds which, and they
    are the 2 that the ranking puts first under the sketch's keys."""
    page_size, n_pages = 4, 2
    config = cfg("snapkv", theta1=2.0, theta2=-1.0, page_size=page_size, reload_pages=n_pages)
    tokens = random_tokens(2, L + 1, seed=3)
    _, cache = generate.prefill_and_compress(model, tokens[:, :L], config, 1)
    lse_kept = {}
    original = cache.calibrated
    cache.calibrated = lambda layer, q, out, lse: (lse_kept.__setitem__(layer, lse), original(layer, q, out, lse))[1]
    decode_one_token(model, tokens[:, L:], torch.tensor([L]), cache)
    E, P = L - BUDGET, (L - BUDGET) // page_size
    for layer, state in enumerate(cache.layers):
        k_ev, v_ev = cache.store.get(layer)
        for b in range(2):
            for h in range(HKV):
                heads = slice(h * HQ // HKV, (h + 1) * HQ // HKV)
                q = state.hist_q[b, heads]  # (G, D): the step's query, now the history's
                matches = []
                for pages in itertools.combinations(range(P), n_pages):
                    idx = torch.tensor([t for p in pages for t in range(p * page_size, (p + 1) * page_size)])
                    scores = q.double() @ k_ev[b, h, idx].double().T / math.sqrt(D)
                    out = scores.softmax(-1) @ v_ev[b, h, idx].double()
                    if (torch.allclose(out, state.hist_out[b, heads].double(), atol=1e-5)
                            and torch.allclose(scores.logsumexp(-1), state.hist_lse[b, heads].double(), atol=1e-5)):
                        matches.append(pages)
                assert len(matches) == 1, (layer, b, h, matches)
                keys = calidrop.sketched_keys(state.sketch, torch.tensor([b]), torch.tensor([h]), cache.inv_freq)
                weights = naive_page_weights(q[None], keys, lse_kept[layer][b, heads][None],
                                             torch.ones(1, HQ // HKV, dtype=torch.bool), page_size)[0]
                assert tuple(sorted(sorted(range(P), key=lambda p: -weights[p])[:n_pages])) == matches[0]
    assert (cache.reload_tokens == n_pages * page_size).all()  # one recompute per pair, its pages' tokens
    assert cache.stats(L + 1)["reload_bytes_per_token"] == N_LAYERS * 2 * HKV * n_pages * page_size * 2 * D * 4
    assert E > n_pages * page_size


@pytest.mark.parametrize("page_size", [4, 5])
def test_reading_every_page_is_the_dense_recompute(model, page_size):
    """reload_pages x page_size >= the evicted tokens (5: the last page holds 2) is the dense rule, bit for
    bit, and holds no sketch."""
    tokens = random_tokens(2, L + 12, seed=4)
    every = -(-(L - BUDGET) // page_size)
    logits = {}
    for pages in (None, every):
        config = cfg("snapkv", theta1=0.0, theta2=0.2, page_size=page_size, reload_pages=pages)
        first, cache = generate.prefill_and_compress(model, tokens[:, :L], config, 12)
        logits[pages] = torch.cat([first[:, None], teacher_force(model, cache, tokens, L)], 1)
        assert cache.stats(L + 12)["kv_bytes_selection"] == 0
    assert torch.equal(logits[None], logits[every])


def test_capacity_of_every_kv_head_is_the_unbounded_rule(model):
    tokens = random_tokens(2, L + 12, seed=5)
    runs = []
    for capacity in (None, HKV, 7):
        config = cfg("snapkv", theta1=0.0, theta2=0.2, page_size=4, reload_pages=3, reload_capacity=capacity)
        first, cache = generate.prefill_and_compress(model, tokens[:, :L], config, 12)
        runs.append((torch.cat([first[:, None], teacher_force(model, cache, tokens, L)], 1), cache.counts))
    for logits, counts in runs[1:]:
        assert torch.equal(logits, runs[0][0]) and torch.equal(counts, runs[0][1])


def test_capacity_recomputes_the_stalest_kv_heads_first(model):
    """Capacity 1 of 2 KV heads, theta1 0.6, theta2 0.85. KV head 0's query heads have cosines 0.3 and 0.9,
    KV head 1's 0.5 and 0.2: both KV heads are stale, KV head 1 is the stalest (0.2) and recomputes both its
    heads (0.5 and 0.2, both below theta1); KV head 0 waits: its 0.3 head does nothing, its 0.9 head
    calibrates with the old history."""
    config = cfg("snapkv", theta1=0.6, theta2=0.85, page_size=4, reload_pages=3, reload_capacity=1)
    _, cache = generate.prefill_and_compress(model, random_tokens(1, L, seed=6), config, 2)
    layer, g = 0, torch.Generator().manual_seed(6)
    state = cache.layers[layer]
    old = [t.clone() for t in (state.hist_q, state.hist_out, state.hist_lse)]
    q = torch.stack([query_at_cosine(old[0][0, h], r, g) for h, r in enumerate([0.3, 0.9, 0.5, 0.2])])[None]
    kept = state.kept_len
    out_kept, lse_kept = calidrop.attention_with_lse(q, state.k[:, :, :kept], state.v[:, :, :kept])
    cache.calibrated(layer, q, out_kept, lse_kept)
    expected = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 0]])  # (calibrate, recompute, none)
    assert torch.equal(cache.counts[layer, 0], expected)
    assert cache.reloads[layer, 0].tolist() == [0, 1]
    assert torch.equal(state.hist_q[0, 2:], q[0, 2:]) and torch.equal(state.hist_q[0, :2], old[0][0, :2])


@pytest.mark.parametrize("theta1, theta2", [(-1.0, 0.0), (0.0, 0.2)])
def test_compiled_step_is_one_graph_and_equals_eager(model, theta1, theta2):
    """torch.compile(fullgraph=True) of the decode step (generate.py --compile, bench.py), calibrate-only and
    with page-sparse recomputes under a reload capacity: no graph break (a host sync would be one), the
    logits, decisions and tokens read equal the eager step's, and prompts of two lengths share one graph
    (the prompt length enters the step as a tensor) or, when the evicted tokens are kept for recomputes (their
    count is the prompt's length less the budget), two graphs: the second length makes that count symbolic
    and its graph serves every later length."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    step = torch.compile(decode_one_token, fullgraph=True)
    config = cfg("snapkv", theta1=theta1, theta2=theta2, page_size=4, reload_pages=2, reload_capacity=1)
    for length in (40, 56, 64):
        tokens = random_tokens(2, length + 6, seed=length)
        runs = {}
        for name, fn in (("eager", decode_one_token), ("compiled", step)):
            _, cache = generate.prefill_and_compress(model, tokens[:, :length], config, 6)
            logits = torch.stack([fn(model, tokens[:, t:t + 1].clone(), torch.tensor([t]), cache)
                                  for t in range(length, length + 6)], 1)
            runs[name] = logits, cache.counts, cache.reload_tokens
        torch.testing.assert_close(runs["compiled"][0], runs["eager"][0], atol=1e-5, rtol=0)
        assert torch.equal(runs["compiled"][1], runs["eager"][1]) and torch.equal(runs["compiled"][2], runs["eager"][2])
        if theta1 > -1:
            assert runs["eager"][1][..., 1].sum() > 0  # it did recompute
    assert counters["stats"]["unique_graphs"] - graphs == (1 if theta1 <= -1 else 2)
