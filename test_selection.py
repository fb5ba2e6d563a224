"""Eviction's selection against independent computations (CPU, fp32, the tiny random Llama of conftest.py):
StreamingLLM, SnapKV and H2O selections against naive loop scorers over queries and keys recomputed from
the weights, and PyramidKV's budget schedule and the per-layer sizes it keeps (spec CALIDROP.md,
section 6)."""
import math

import pytest
import torch

import calidrop
from conftest import build_cache, cfg, kept_positions, layer0_qk, random_tokens, top_set
from model import load_model


# The tiny model of conftest.TINY: 2 layers, 4 query heads, 2 KV heads, head_dim 16.
N_LAYERS, HQ, HKV, D = 2, 4, 2, 16


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


pytestmark = pytest.mark.usefixtures("one_thread", "inference_mode")


# --------------------------------------------------------------------------- 5. selection, naive scorers

def naive_snapkv_scores(window_q, keys, kernel=5):
    """[b][kv head][j] for prefix keys j < L - W, with plain loops (see the test's docstring)."""
    B, Hq, W, Dh = window_q.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    group, P = Hq // Hkv, L - W
    wq, kk = window_q.double().tolist(), keys.double().tolist()
    result = [[[0.0] * P for _ in range(Hkv)] for _ in range(B)]
    for b in range(B):
        for h in range(Hq):
            votes = [0.0] * P
            for i in range(W):
                p = L - W + i  # the window query's absolute position: it sees keys 0..p
                logits = [sum(x * y for x, y in zip(wq[b][h][i], kk[b][h // group][j])) / math.sqrt(Dh)
                          for j in range(p + 1)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                for j in range(P):
                    votes[j] += e[j] / z
            for j in range(P):  # average pooling, zero padding counted: always divide by kernel
                pooled = sum(votes[j + o] for o in range(-(kernel // 2), kernel // 2 + 1) if 0 <= j + o < P)
                result[b][h // group][j] += pooled / kernel / group
    return result


def naive_column_sums(q, k):
    """[b][query head][j]: attention key j receives from every prompt query i >= j, with plain loops."""
    B, Hq, L, Dh = q.shape
    group = Hq // k.shape[1]
    qq, kk = q.double().tolist(), k.double().tolist()
    sums = [[[0.0] * L for _ in range(Hq)] for _ in range(B)]
    for b in range(B):
        for h in range(Hq):
            for i in range(L):
                logits = [sum(x * y for x, y in zip(qq[b][h][i], kk[b][h // group][j])) / math.sqrt(Dh)
                          for j in range(i + 1)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                for j in range(i + 1):
                    sums[b][h][j] += e[j] / z
    return sums


def test_streamingllm_keeps_sinks_and_recent(model):
    L, budget, sink, n_new = 20, 10, 4, 3
    config = cfg("streamingllm", budget=budget, sink=sink)
    _, cache, full, _ = build_cache(model, random_tokens(2, L, seed=5), config, max_new_tokens=n_new)
    expected = torch.tensor(list(range(sink)) + list(range(L - (budget - sink), L)))
    for layer in range(N_LAYERS):
        assert cache.layers[layer].k.shape == (2, HKV, budget + n_new, D)
        pos = kept_positions(cache.layers[layer].k, full.k[layer][:, :, :L], budget)
        assert torch.equal(pos, expected.expand(2, HKV, budget))
        values = full.v[layer][:, :, :L]  # no RoPE on values: compare them by position, not by matching
        assert torch.equal(cache.layers[layer].v[:, :, :budget], values.gather(2, pos[..., None].expand(-1, -1, -1, D)))


def test_snapkv_selection_matches_naive_scorer(model):
    """Naive SnapKV: each window query (absolute position p) softmaxes over keys 0..p; sum its weights
    on prefix keys over the window; average-pool (kernel 5, padding 2, /5); mean over the query heads of
    each KV head; keep the window + the top budget - window of the prefix."""
    L, B, budget, window, n_new = 20, 2, 10, 4, 3
    tokens = random_tokens(B, L, seed=6)
    config = cfg("snapkv", budget=budget, window=window)
    _, cache, full, recorder = build_cache(model, tokens, config, max_new_tokens=n_new)

    # the recorder's window queries and the prefill keys are the model's post-RoPE ones (layer 0)
    q0, k0 = layer0_qk(model, tokens)
    torch.testing.assert_close(recorder.layers[0].window_q.double(), q0[:, :, -window:], atol=1e-5, rtol=0)
    torch.testing.assert_close(full.k[0][:, :, :L].double(), k0, atol=1e-5, rtol=0)

    for layer in range(N_LAYERS):
        assert cache.layers[layer].k.shape == (B, HKV, budget + n_new, D)  # KV-head sized, room for new tokens
        assert cache.layers[layer].kept_len == budget
        keys = full.k[layer][:, :, :L]
        scores = naive_snapkv_scores(recorder.layers[layer].window_q, keys)
        # the implementation's scores themselves, prefix part (the window scores +inf: always kept)
        impl = calidrop.score_snapkv(recorder.layers[layer].window_q, keys)
        torch.testing.assert_close(impl[..., :L - window].double(), torch.tensor(scores, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        assert torch.isinf(impl[..., L - window:]).all()
        pos = kept_positions(cache.layers[layer].k, keys, budget)
        for b in range(B):
            for h in range(HKV):
                kept = set(pos[b, h].tolist())
                assert set(range(L - window, L)) <= kept  # the window is always kept
                assert kept - set(range(L - window, L)) == top_set(scores[b][h], range(L - window),
                                                                   budget - window)


def test_h2o_selection_matches_naive_column_sums(model):
    L, B, budget, n_new = 20, 2, 10, 3
    tokens = random_tokens(B, L, seed=7)
    config = cfg("h2o", budget=budget)
    # record every prompt query (window = L) so the naive scorer can see them all
    _, cache, full, recorder = build_cache(model, tokens, config, max_new_tokens=n_new, record_window=L)
    q0, _ = layer0_qk(model, tokens)
    torch.testing.assert_close(recorder.layers[0].window_q.double(), q0, atol=1e-5, rtol=0)

    recent = budget // 2
    for layer in range(N_LAYERS):
        q, keys = recorder.layers[layer].window_q, full.k[layer][:, :, :L]
        naive = torch.tensor(naive_column_sums(q, keys), dtype=torch.float64)  # (B, Hq, L)
        for chunk in (1, 3, L):
            torch.testing.assert_close(calidrop.h2o_column_sums(q, keys, chunk=chunk).double(), naive,
                                       atol=1e-5, rtol=0)
        torch.testing.assert_close(recorder.layers[layer].column_sums.double(), naive, atol=1e-5, rtol=0)

        assert cache.layers[layer].k.shape == (B, HKV, budget + n_new, D)
        assert cache.layers[layer].kept_len == budget
        per_kv = naive.view(B, HKV, HQ // HKV, L).mean(2).tolist()  # GQA: mean over the group
        pos = kept_positions(cache.layers[layer].k, keys, budget)
        for b in range(B):
            for h in range(HKV):
                kept = set(pos[b, h].tolist())
                assert set(range(L - recent, L)) <= kept  # the recent half
                assert kept - set(range(L - recent, L)) == top_set(per_kv[b][h], range(L - recent),
                                                                   budget - recent)


PYRAMID_CASES = [(64, 32, 2), (64, 32, 30), (128, 32, 24), (256, 32, 32), (512, 32, 80), (16, 4, 2),
                 (16, 4, 7), (100, 8, 13)]
# small spans (budget - window < beta = 20: the schedule's step is under one token) and one layer
FLAT_PYRAMID_CASES = [(16, 4, 26), (8, 4, 11), (64, 32, 1)]


@pytest.mark.parametrize("budget,window,n_layers", PYRAMID_CASES + FLAT_PYRAMID_CASES)
def test_pyramid_budgets_schedule(budget, window, n_layers):
    """PyramidKV's reference schedule: outside the window, 2 x span - low at layer 0 down to low =
    max(span / 20, 1) at the last layer in equal steps, rounded so that the sizes sum to budget x n_layers."""
    sizes = calidrop.pyramid_budgets(budget, n_layers, window)
    assert len(sizes) == n_layers
    assert sum(sizes) == budget * n_layers, sizes  # averages to the budget
    assert all(s > window for s in sizes)
    span = budget - window
    low = max(span / 20, 1.0)
    if n_layers == 1:
        assert sizes == [budget]
        return
    step = 2 * (span - low) / (n_layers - 1)
    for i, s in enumerate(sizes):  # within rounding of the straight line
        assert abs(s - (window + 2 * span - low - step * i)) < 1, (i, sizes)
    if (budget, window, n_layers) in PYRAMID_CASES:  # a step of a token or more: strictly decreasing
        assert step >= 1 and all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    else:
        assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes


def test_pyramidkv_keeps_each_layers_budget(model):
    """from_prefill keeps the schedule's size in each layer: the window plus that layer's top SnapKV
    scores (naive scorer), in buffers of that size plus room for the new tokens."""
    L, B, budget, window, n_new = 48, 2, 16, 4, 3
    sizes = calidrop.pyramid_budgets(budget, N_LAYERS, window)
    assert sizes[0] > budget > sizes[1]  # layer 0 keeps more than the budget, layer 1 less
    _, cache, full, recorder = build_cache(model, random_tokens(B, L, seed=6), cfg("pyramidkv", budget=budget),
                                           max_new_tokens=n_new)
    assert [s.kept_len for s in cache.layers] == sizes
    for layer, size in enumerate(sizes):
        assert cache.layers[layer].k.shape == cache.layers[layer].v.shape == (B, HKV, size + n_new, D)
        keys = full.k[layer][:, :, :L]
        scores = naive_snapkv_scores(recorder.layers[layer].window_q, keys)
        pos = kept_positions(cache.layers[layer].k, keys, size)
        for b in range(B):
            for h in range(HKV):
                window_set = set(range(L - window, L))
                assert set(pos[b, h].tolist()) == window_set | top_set(scores[b][h], range(L - window), size - window)
