"""What top_pages costs with its token-by-token pass's RoPE cos and sin read from a table, against computing them
as calidrop_pages.top_pages does: one layer at 8k, compiled, 200 interleaved rounds. The table is a variant that
was not kept (it bought nothing: results/pages/layer_costs/output.txt); it is written out here.

    python -m benchmark.layer_costs.ab      # from the repository's root
"""
import math
import statistics
import time

import torch

import calidrop_pages
from benchmark.layer_costs.parts import inv_freq, random_pairs
from calidrop_pages import page_counts, page_tokens, page_weights, rotate, shortlist_size, unpack


def rope_table(n, inv_freq):
    """cos and sin of the RoPE angles of positions 0..n-1: (n, D), cos in the first half, sin in the second."""
    angles = torch.arange(n).float()[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], -1)


def rotate_by(x, cos, sin):
    """calidrop_pages.rotate with the cos and sin given."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def top_pages_with_table(table, sketch, rows, kv_heads, q_grouped, lse_kept, heads, n_pages, page_size, inv_freq):
    """calidrop_pages.top_pages (without left padding) but for the line marked: the token-by-token keys are
    rotated by cos and sin read from the table."""
    D = q_grouped.shape[-1]
    q = q_grouped.float() / math.sqrt(D)
    basis, positions = sketch.basis[rows, kv_heads], sketch.positions[rows, kv_heads]
    E, P = positions.shape[1], sketch.page_positions.shape[-1]
    mean_keys = rotate(sketch.page_coords[rows, kv_heads] @ basis, sketch.page_positions[rows, kv_heads], inv_freq)
    count = page_counts(E, page_size, q.device)
    coarse = q @ mean_keys.transpose(-1, -2) + count.log().unsqueeze(-2)
    shortlist = page_weights(coarse, lse_kept, heads).topk(shortlist_size(n_pages, P), dim=-1).indices

    tokens, visible = page_tokens(shortlist, page_size, E)
    scale = sketch.scale[rows, kv_heads]
    codes = sketch.coords[rows, kv_heads].gather(1, tokens[..., None].expand(-1, -1, sketch.coords.shape[-1]))
    coords = (unpack(codes, 4, scale.shape[-1]).float() - 8) * scale
    keys = rotate_by(coords @ basis, *table[positions.gather(1, tokens)].chunk(2, -1))  # the variant
    logits = (q @ keys.transpose(-1, -2)).masked_fill(~visible[:, None], float("-inf"))
    fine = logits.unflatten(-1, (-1, page_size)).logsumexp(-1)
    best = page_weights(fine, lse_kept, heads).topk(min(n_pages, P), dim=-1).indices
    return page_tokens(shortlist.gather(1, best), page_size, E)


def main(E=7808, N=31, rounds=200):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    table = rope_table(E + 300, inv_freq)
    args = (*random_pairs(1, E), N, 16, inv_freq)
    fa = torch.compile(lambda: top_pages_with_table(table, *args), fullgraph=True)
    fb = torch.compile(lambda: calidrop_pages.top_pages(*args), fullgraph=True)
    ta, tb = [], []
    for f in (fa, fb):
        for _ in range(3):
            f()
    assert torch.equal(fa()[0].sort(-1).values, fb()[0].sort(-1).values)
    for i in range(rounds):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    n = len(args[1])  # the (sequence, KV head) pairs
    print(f"top_pages per pair at E={E}, N={N}: table {1e6*statistics.median(ta)/n:.1f} us, "
          f"computed {1e6*statistics.median(tb)/n:.1f} us")


if __name__ == "__main__":
    main()
