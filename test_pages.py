"""The page-sparse recompute and the decode step without host syncs (calidrop.py sections 4 and 5), against
independent computations (CPU, fp32, the tiny random Llama of conftest.py):
  - the key sketch recovers low-rank pre-RoPE keys within its 4-bit rounding, at the bytes it reports;
  - the two-pass page ranking equals a naive loop over pages, tokens and heads;
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
import calidrop_pages
import generate
from conftest import cfg, query_at_cosine, random_tokens, teacher_force
from model import FullCache, decode_one_token, load_model

N_LAYERS, HQ, HKV, D = 2, 4, 2, 16  # conftest.TINY
L, BUDGET = 48, 16  # the prompt and what cfg keeps: 32 evicted tokens per (layer, sequence, KV head)

pytestmark = pytest.mark.usefixtures("one_thread", "inference_mode")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def rope(x, positions, theta=10000.0):
    """RoPE written out pair by pair (channel i with i + D/2), independently of calidrop_pages.rotate."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = positions.double() * theta ** (-2 * i / d)
        a, b = x[..., i].double(), x[..., i + d // 2].double()
        out[..., i] = (a * angle.cos() - b * angle.sin()).to(x.dtype)
        out[..., i + d // 2] = (b * angle.cos() + a * angle.sin()).to(x.dtype)
    return out


def naive_weights(log_mass, lse_kept, heads):
    """[page]: for each recomputing head, the page's share of the head's whole attention (kept + the pages
    given), summed over the heads; log_mass [head][page]. Plain loops."""
    weights = [0.0] * len(log_mass[0])
    for g, masses in enumerate(log_mass):
        if heads[g]:
            total = math.exp(lse_kept[g]) + sum(math.exp(m) for m in masses)
            weights = [w + math.exp(m) / total for w, m in zip(weights, masses)]
    return weights


def top(weights, k, among=None):
    """The k best of `among` (default: all) by weight, asserting no near tie at the cut."""
    ranked = sorted(among if among is not None else range(len(weights)), key=lambda p: -weights[p])
    if len(ranked) > k:
        assert weights[ranked[k - 1]] - weights[ranked[k]] > 1e-7, "near tie: choose another seed"
    return ranked[:k]


def naive_top_pages(sketch, b, h, q, lse_kept, heads, n_pages, page_size):
    """calidrop_pages.top_pages for one pair, from the sketch's tensors with plain loops and this file's rope:
    every page by its mean key (page_size copies), then the 4 x n_pages best token by token."""
    d = q.shape[-1]
    basis = sketch.basis[b, h].double()
    coords = (calidrop_pages.unpack(sketch.coords[b, h], 4, basis.shape[0]).double() - 8) * sketch.scale[b, h, 0].double()
    positions = sketch.positions[b, h]
    E = len(positions)
    pages = [list(range(s, min(s + page_size, E))) for s in range(0, E, page_size)]
    mean_keys = rope(sketch.page_coords[b, h].double() @ basis, sketch.page_positions[b, h])
    coarse = [[float(q[g].double() @ mean_keys[p]) / math.sqrt(d) + math.log(len(pages[p])) for p in range(len(pages))]
              for g in range(len(q))]
    shortlist = top(naive_weights(coarse, lse_kept, heads), min(4 * n_pages, len(pages)))
    keys = rope(coords @ basis, positions)
    fine = [[math.log(sum(math.exp(float(q[g].double() @ keys[t]) / math.sqrt(d)) for t in pages[p]))
             for p in shortlist] for g in range(len(q))]
    weights = naive_weights(fine, lse_kept, heads)
    return sorted(shortlist[i] for i in top(weights, n_pages))


def test_key_sketch_recovers_low_rank_pre_rope_keys():
    g = torch.Generator().manual_seed(0)
    B, H, E, d, r, page_size = 2, 2, 40, 16, 4, 16  # 3 pages, the last of 8 tokens
    pre = torch.randn(B, H, E, r, generator=g) @ torch.randn(B, H, r, d, generator=g)  # rank 4 before RoPE
    positions = torch.stack([torch.randperm(300, generator=g)[:E].sort().values for _ in range(B * H)]).view(B, H, E)
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    sketch = calidrop_pages.sketch_keys(rope(pre, positions), positions, inv_freq, page_size, rank=r)
    basis = sketch.basis.double()
    assert torch.allclose(basis @ basis.transpose(-1, -2), torch.eye(r, dtype=torch.float64), atol=1e-6)
    exact = pre.double() @ basis.transpose(-1, -2)  # the keys' true coordinates: they span the basis
    assert torch.allclose(exact @ basis, pre.double(), atol=1e-4)
    coords = (calidrop_pages.unpack(sketch.coords, 4, r).double() - 8) * sketch.scale.double()
    assert ((coords - exact).abs() <= sketch.scale / 2 + 1e-5).all()  # half a 4-bit step at most
    assert (coords - exact).abs().mean() > 1e-3  # and they really are 4 bits
    for p, s in enumerate(range(0, E, page_size)):  # each page's mean coordinates and position, unrounded
        assert torch.allclose(sketch.page_coords[:, :, p].double(), exact[:, :, s:s + page_size].mean(2), atol=1e-5)
        assert torch.allclose(sketch.page_positions[:, :, p].double(), positions[:, :, s:s + page_size].double().mean(2))
    # what it holds: 4 bits a coordinate, a scale a coordinate, the basis, an int32 position a token, and
    # each page's mean coordinates and position in float32
    assert sketch.nbytes == B * H * (E * r // 2 + r * 4 + r * d * 4 + E * 4 + 3 * (r + 1) * 4)


def test_top_pages_matches_a_naive_two_pass_ranking():
    g = torch.Generator().manual_seed(1)
    B, H, G, d, E, page_size, n_pages = 1, 3, 2, 16, 157, 4, 3  # 40 pages, the last of 1 token; 12 shortlisted
    keys = torch.randn(B, H, E, d, generator=g)
    positions = torch.stack([torch.randperm(400, generator=g)[:E].sort().values for _ in range(H)])[None]
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    sketch = calidrop_pages.sketch_keys(keys, positions, inv_freq, page_size, rank=8)
    rows, kv_heads = torch.zeros(H, dtype=torch.long), torch.arange(H)
    q, lse_kept = torch.randn(H, G, d, generator=g) * 2, torch.randn(H, G, generator=g) + 3
    heads = torch.tensor([[True, True], [True, False], [False, True]])
    tokens, visible = calidrop_pages.top_pages(sketch, rows, kv_heads, q, lse_kept, heads, n_pages, page_size, inv_freq)
    for i in range(H):
        pages = naive_top_pages(sketch, 0, i, q[i], lse_kept[i].tolist(), heads[i].tolist(), n_pages, page_size)
        expected = [t for p in pages for t in range(p * page_size, (p + 1) * page_size)]
        # the pages in any order; each slot's token (clamped to the evicted set) and visibility as expected
        assert sorted(zip(tokens[i].tolist(), visible[i].tolist())) == sorted((min(t, E - 1), t < E) for t in expected)


def test_paged_recompute_attends_exactly_the_pages_it_reads(model):
    """Every head recomputes (theta1 > 1); pages of 4 of the 32 evicted tokens, 2 read per recompute. The new
    history of each head is attention over some 2 pages: trying all 28 pairs of pages finds which, and they
    are the 2 that the ranking puts first under the sketch's keys."""
    page_size, n_pages = 4, 2
    config = cfg("snapkv", theta1=1.0, theta2=2.0, page_size=page_size, reload_pages=n_pages)
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
                chosen = naive_top_pages(state.pages.sketch, b, h, q, lse_kept[layer][b, heads].tolist(),
                                         [True] * (HQ // HKV), n_pages, page_size)
                assert tuple(chosen) == matches[0]
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


def test_capacity_of_every_pair_of_the_batch_is_the_unbounded_rule(model):
    tokens = random_tokens(2, L + 12, seed=5)
    runs = []
    for capacity in (None, 2 * HKV, 7):  # 2 sequences: every pair of the batch, or more
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


def compiled_equals_eager(model, step, config, tokens, length, store=lambda: None):
    """Decode tokens[:, length:] from a prefill of tokens[:, :length], eagerly and with the compiled step
    (store(): the offload store of each run, None for the default): the logits within 1e-5, the decisions and
    the tokens read equal. Returns the decision counts."""
    runs = {}
    for name, fn in (("eager", decode_one_token), ("compiled", step)):
        _, cache = generate.prefill_and_compress(model, tokens[:, :length], config, tokens.shape[1] - length, store())
        logits = torch.stack([fn(model, tokens[:, t:t + 1].clone(), torch.tensor([t]), cache)
                              for t in range(length, tokens.shape[1])], 1)
        runs[name] = logits, cache.counts, cache.reload_tokens
    torch.testing.assert_close(runs["compiled"][0], runs["eager"][0], atol=1e-5, rtol=0)
    assert torch.equal(runs["compiled"][1], runs["eager"][1]) and torch.equal(runs["compiled"][2], runs["eager"][2])
    return runs["eager"][1]


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
        counts = compiled_equals_eager(model, step, config, random_tokens(2, length + 6, seed=length), length)
        if theta1 > -1:
            assert counts[..., 1].sum() > 0  # it did recompute
    assert counters["stats"]["unique_graphs"] - graphs == (1 if theta1 <= -1 else 2)


# ----------------------------------------------------------------- how many pages, and a shared budget

def ranking_cost(E, G, d, page_size, n, rank=16):
    """Multiply-adds of ranking (every page's mean key, the shortlist token by token, keys rebuilt from a
    rank-r sketch) and reading n pages, for one (sequence, KV head), written out from CALIDROP's rule."""
    P = -(-E // page_size)
    M = min(n + 3 * min(n, 12), P)
    return P * (rank * d + G * d) + M * page_size * (rank * d + G * d) + n * page_size * 2 * G * d


def test_auto_pages_follow_the_evicted_set():
    """reload_pages "auto" with an offloaded store (the host store of a GPU): 1/16 of the evicted pages, at
    least 12, never decreasing with the evicted set; every token once that is all pages."""
    config = calidrop.CaliDropConfig()
    last = 0
    for E in range(1, 20000, 37):
        P = -(-E // 16)
        n = calidrop_pages.pages_to_read(config, E, 3, 64, offloaded=True)
        expected = max(12, math.ceil(P / 16))
        assert n == (expected if expected < P else None)
        pages = P if n is None else n
        assert pages >= last
        last = pages
    assert calidrop_pages.pages_to_read(config, 16128, 7, 64, offloaded=True) == 63  # Qwen at 16k, budget 256


def test_read_all_switch_is_the_stated_cost_rule():
    """In the compute's memory (CPU), "auto" reads every token exactly when that costs no more multiply-adds
    than ranking and reading its pages; an explicit count always ranks; theta1 > 1 always reads all."""
    config = calidrop.CaliDropConfig()
    switched = {}
    for G, d in ((3, 64), (7, 64), (4, 128)):
        for E in range(200, 12000, 53):
            n = max(12, math.ceil(-(-E // 16) / 16))
            dense = E * 2 * G * d <= ranking_cost(E, G, d, 16, n)
            assert calidrop_pages.pages_to_read(config, E, G, d, offloaded=False) == (None if dense else n)
            switched.setdefault((G, d), []).append(dense)
            assert calidrop_pages.pages_to_read(calidrop.CaliDropConfig(reload_pages=12), E, G, d, offloaded=False) == 12
            assert calidrop_pages.pages_to_read(calidrop.CaliDropConfig(theta1=1.5), E, G, d, offloaded=False) is None
    for flags in switched.values():  # one crossover: short evicted sets read everything, long ones rank
        assert flags[0] and not flags[-1] and flags == sorted(flags, reverse=True)
    # the default model's shape (3 query heads per KV head, head_dim 64): 1.5k at budget 256 reads every
    # token, 8k ranks 31 pages
    assert calidrop_pages.pages_to_read(config, 1536 - 256, 3, 64, offloaded=False) is None
    assert calidrop_pages.pages_to_read(config, 8064 - 256, 3, 64, offloaded=False) == 31


def test_auto_that_reads_everything_is_the_dense_recompute(model):
    """Pages of 4 tokens: 8 evicted pages per pair, fewer than auto's 12, and with 2 pages the ranking's cost
    (the shortlist is every page) is more than reading them all: both give the dense recompute, bit for bit."""
    tokens = random_tokens(2, L + 8, seed=8)
    logits = {}
    for pages in (None, "auto"):
        first, cache = generate.prefill_and_compress(model, tokens[:, :L], cfg("snapkv", theta1=0.0, theta2=0.2,
                                                                              page_size=4, reload_pages=pages), 8)
        assert all(s.pages is None for s in cache.layers)
        logits[pages] = torch.cat([first[:, None], teacher_force(model, cache, tokens, L)], 1)
    assert torch.equal(logits[None], logits["auto"])


def test_shared_capacity_recomputes_the_stalest_pairs_of_the_batch(model):
    """A capacity of 2 (sequence, KV head) pairs for a batch of 3 sequences x 2 KV heads: the 2 stale pairs
    with the lowest cosine over the whole batch recompute, whichever sequences they belong to; checked
    against a sort of every pair, on random cosines."""
    config = cfg("snapkv", theta1=0.6, theta2=0.85, page_size=4, reload_pages=3, reload_capacity=2)
    _, cache = generate.prefill_and_compress(model, random_tokens(3, L, seed=9), config, 2)
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        rho = torch.rand(3, HQ, generator=g) * 2 - 1
        stale = rho < 0.6
        pairs = sorted(((float(rho[b, h * 2:h * 2 + 2][stale[b, h * 2:h * 2 + 2]].min()), b, h)
                        for b in range(3) for h in range(HKV) if stale[b, h * 2:h * 2 + 2].any()))
        expected = torch.zeros(3, HQ, dtype=torch.bool)
        for _, b, h in pairs[:2]:
            expected[b, h * 2:h * 2 + 2] = stale[b, h * 2:h * 2 + 2]
        assert torch.equal(cache.stale_heads(rho), expected)


@pytest.mark.parametrize("compiled", [False, True])
def test_shared_capacity_never_exceeds_its_size(model, compiled):
    """Decoding a batch of 3 with a capacity of 2 pairs: at every layer-step at most 2 pairs of the batch
    reload (and read pages), eager and compiled alike; without a capacity more would."""
    tokens = random_tokens(3, L + 8, seed=10)
    step = torch.compile(decode_one_token, fullgraph=True) if compiled else decode_one_token
    reloading = {}
    for capacity in (None, 2):
        config = cfg("snapkv", theta1=0.3, theta2=0.85, page_size=4, reload_pages=3, reload_capacity=capacity)
        _, cache = generate.prefill_and_compress(model, tokens[:, :L], config, 8)
        per_step = []
        for t in range(L, L + 8):
            before = cache.reloads.clone(), cache.reload_tokens.clone()
            step(model, tokens[:, t:t + 1].clone(), torch.tensor([t]), cache)
            per_step.append((cache.reloads - before[0]).sum((1, 2)))  # (layers,) pairs reloading this step
            assert ((cache.reload_tokens - before[1] > 0) == (cache.reloads - before[0] > 0)).all()
        reloading[capacity] = torch.stack(per_step)
    assert reloading[2].max() <= 2 and reloading[2].sum() > 0
    assert reloading[None].max() > 2


def test_compiled_dense_recompute_reads_the_store_in_place(model):
    """Compiled without a capacity, a recompute that reads every token attends the store as it lies (no
    gather): the logits, decisions and tokens read equal the eager step's, which gathers the reloading pairs."""
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True)
    config = cfg("snapkv", theta1=0.0, theta2=0.2, reload_pages=None)
    counts = compiled_equals_eager(model, step, config, random_tokens(2, L + 6, seed=11), L)
    assert counts[..., 1].sum() > 0


class OffloadedStore(calidrop.OffloadStore):
    """A store that says it lives off the compute's device (as the GPU's pinned host memory does) and counts
    what is asked of it; getting a whole layer (every evicted token of every pair) is an error."""

    def __init__(self):
        super().__init__("cpu")
        self.device, self.tokens_asked = torch.device("meta"), 0

    def read(self, layer, rows, kv_heads, tokens):
        self.tokens_asked += int((tokens >= 0).sum())
        return super().read(layer, rows, kv_heads, tokens)

    def get(self, layer):
        raise AssertionError("the whole offloaded store was read")


def test_a_dense_recompute_reads_only_the_recomputing_pairs_of_an_offloaded_store(model):
    """Compiled without a capacity, every pair is processed at every layer-step (static shapes); from an
    offloaded store a dense recompute then asks only for the evicted tokens of the pairs that recompute (the
    others' are -1: not read, no link bytes), never the whole store, and equals the eager step."""
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager")
    stores = []
    config = cfg("snapkv", theta1=0.0, theta2=0.2, reload_pages=None)
    counts = compiled_equals_eager(model, step, config, random_tokens(2, L + 6, seed=11), L,
                                   lambda: stores.append(OffloadedStore()) or stores[-1])
    eager, compiled = stores
    assert counts[..., 1].sum() > 0 and compiled.tokens_asked == eager.tokens_asked > 0


class EmptyNeverRead(calidrop.OffloadStore):
    """A store whose empty layers (nothing evicted) must never be read: on a GPU their 0 pinned bytes have no
    pointer to view."""

    def read(self, layer, *args):
        assert self.k[layer].shape[2] > 0, "an empty evicted set was read"
        return super().read(layer, *args)

    def get(self, layer):
        assert self.k[layer].shape[2] > 0, "an empty evicted set was read"
        return super().get(layer)


@pytest.mark.parametrize("method, kw, length", [("pyramidkv", {}, 24), ("snapkv", dict(calibration_size=0), L)])
def test_an_empty_evicted_set_is_never_read(model, method, kw, length):
    """PyramidKV at budget 16 keeps all 24 prompt tokens in layer 0 (its budget is 27) and compresses layer 1;
    calibration_size 0 offloads nothing in any layer. Recomputing at every step, eager and compiled, a layer
    with nothing evicted reads nothing and merges the empty set: the full cache's logits (PyramidKV, whose
    layer 1 reads its evicted tokens) or plain eviction's (calibration_size 0)."""
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager")
    tokens = random_tokens(2, length + 6, seed=3)
    config = cfg(method, theta1=2.0, **kw)
    compiled_equals_eager(model, step, config, tokens, length, lambda: EmptyNeverRead("cpu"))
    _, cache = generate.prefill_and_compress(model, tokens[:, :length], config, 6, EmptyNeverRead("cpu"))
    assert [s.evicted_len for s in cache.layers] == ([0, 24 - 5] if method == "pyramidkv" else [0, 0])
    logits = teacher_force(model, cache, tokens, length)
    if method == "pyramidkv":
        expected = model(tokens, torch.arange(length + 6), FullCache(model.args, 2, length + 6))[:, length:]
    else:
        _, evict = generate.prefill_and_compress(model, tokens[:, :length], cfg(method, calibration=False), 6)
        expected = teacher_force(model, evict, tokens, length)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
