"""One layer's compiled attend step, theta1 = 0 (most heads stale on random queries), with the recomputing
pairs in a fixed shape (calidrop.reading_pairs) or found by nonzero (dynamic output shapes, the variant not kept).

    python -m benchmark.layer_costs.dyn2 fixed      # from the repository's root; or: ... dyn2 dyn
"""
import statistics
import sys
import time

import torch

import calidrop
from benchmark.layer_costs.mb import D, Hkv, Hq, build

SIZES = ((8064, 256, 1, "auto"), (8064, 256, 8, "auto"), (1024, 128, 8, "auto"), (1024, 128, 8, 12))


def pairs(reload, capacity=None):
    """reading_pairs with the pairs found by nonzero: a shape that depends on the decisions."""
    B, Hkv = reload.shape
    # (u0 + 1,): the reloading pairs, then a dummy
    flat = torch.cat([reload.flatten().nonzero()[:, 0], reload.new_zeros(1, dtype=torch.long)])
    needed = torch.cat([torch.ones_like(flat[1:], dtype=torch.bool), reload.new_zeros(1)])
    return flat // Hkv, flat % Hkv, needed


def main(variant, sizes=SIZES):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    if variant == "dyn":
        calidrop.reading_pairs = pairs
    for L, budget, B, pages in sizes:
        cache = build(B, L, budget, pages, theta1=0.0)  # theta1=0: about half the heads stale (random q)
        f = torch.compile(lambda q, k, v, pos: cache.attend(0, q, k, v, pos), fullgraph=True, dynamic=False)
        kk = torch.randn(B, Hkv, 1, D)
        pos = torch.tensor([L])
        ts = []
        for i in range(40):
            q = torch.randn(B, Hq, 1, D)
            t0 = time.perf_counter()
            f(q, kk, kk, pos)
            ts.append(time.perf_counter() - t0)
        read = cache.layers[0].pages
        print(variant, L, B, pages, read and read.pages, f"{statistics.median(ts[5:])*1e3:.3f} ms", "reload share",
              cache.reloads.sum().item() / (40 * B * Hkv), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] not in (["fixed"], ["dyn"]):
        print("usage: python -m benchmark.layer_costs.dyn2 fixed|dyn", file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
