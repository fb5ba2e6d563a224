"""What top_pages' parts cost per (sequence, KV head) pair, compiled, one thread, batch 8: ranking (its coarse
pass alone), reading and attending the N pages it picks, and a dense recompute gathered or attended in place.

    python -m benchmark.layer_costs.parts      # from the repository's root
"""
import math
import statistics
import time

import torch

from calidrop import attention_with_lse, read_tokens
from calidrop_pages import page_tokens, page_weights, rotate, sketch_keys, top_pages

Hq, Hkv, D, G = 9, 3, 64, 3  # the default model's attention: 9 query heads, 3 KV heads
inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
SIZES = ((896, 12), (1792, 12), (7808, 12), (7808, 30))  # (evicted tokens E, pages read N)


def coarse_only(sketch, rows, kv_heads, q_grouped, lse_kept, heads, n_pages, page_size, inv_freq):
    q = q_grouped.float() / math.sqrt(D)
    basis = sketch.basis[rows, kv_heads]
    P = sketch.page_positions.shape[-1]
    E = sketch.positions.shape[-1]
    mean_keys = rotate(sketch.page_coords[rows, kv_heads] @ basis, sketch.page_positions[rows, kv_heads], inv_freq)
    count = (torch.arange(P * page_size) < E).view(P, page_size).sum(-1)
    coarse = q @ mean_keys.transpose(-1, -2) + count.log()
    best = page_weights(coarse, lse_kept, heads).topk(min(n_pages, P), dim=-1).indices
    return page_tokens(best, page_size, E)


def random_pairs(B, E):
    """A random key sketch of E evicted tokens for every (sequence, KV head) pair of B sequences, and each pair's
    rows, KV heads, G queries, kept-cache lse and recomputing heads (all of them)."""
    sketch = sketch_keys(torch.randn(B, Hkv, E, D), torch.arange(E).expand(B, Hkv, E), inv_freq, 16)
    n = B * Hkv
    return (sketch, torch.arange(B).repeat_interleave(Hkv), torch.arange(Hkv).repeat(B), torch.randn(n, G, D),
            torch.randn(n, G), torch.ones(n, G, dtype=torch.bool))


def t(fn, *a, n=30):
    for _ in range(3):
        fn(*a)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*a)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(sizes=SIZES, B=8):
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)
    for E, N in sizes:
        sk, rows, kvh, qg, lse, heads = random_pairs(B, E)
        n = B * Hkv
        store = torch.randn(B, Hkv, E, D)
        full = torch.compile(lambda *a: top_pages(*a), fullgraph=True, dynamic=False)
        co = torch.compile(lambda *a: coarse_only(*a), fullgraph=True, dynamic=False)

        def rd(tokens, vis):
            kk = read_tokens(store, rows, kvh, tokens)
            vv = read_tokens(store, rows, kvh, tokens)
            return attention_with_lse(qg, kk[:, None], vv[:, None], vis[:, None, None])
        rdc = torch.compile(rd, fullgraph=True, dynamic=False)

        def dense():
            return attention_with_lse(qg.view(B, Hkv, G, D).reshape(B, Hq, D), store, store)
        dc = torch.compile(dense, fullgraph=True, dynamic=False)
        args = (sk, rows, kvh, qg, lse, heads, N, 16, inv_freq)
        tok, vis = full(*args)
        tf, tc, tr, td = t(full, *args), t(co, *args), t(rdc, tok, vis), t(dc)
        ta = t(rdc, torch.arange(E).expand(n, E).contiguous(), torch.ones(n, E, dtype=torch.bool))
        print(f"E={E} N={N}: per pair us: rank {1e3*tf/n:.1f} (coarse {1e3*tc/n:.1f}, fine {1e3*(tf-tc)/n:.1f}), "
              f"read+attend N pages {1e3*tr/n:.1f}; all tokens gathered {1e3*ta/n:.1f}, all tokens in place "
              f"{1e3*td/n:.1f}", flush=True)


if __name__ == "__main__":
    main()
