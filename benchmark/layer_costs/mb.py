"""One layer's compiled CaliDrop attend step on random tensors at the default model's shape, every head
recomputing: reading 12 ranked pages against every evicted token, at three prompt lengths, batch 1 and 8.
`build` makes dyn2.py's caches too.

    python -m benchmark.layer_costs.mb      # from the repository's root
"""
import statistics
import time

import torch

import calidrop

Hq, Hkv, D = 9, 3, 64  # the default model's attention
inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def build(B, L, budget, pages, theta1=1.0, cap=None):
    """A one-layer CaliDropCache of a random prompt of L tokens. theta1 = 1 (the default): every head of a
    random query recomputes (its cosine is below 1) and reads `pages`; theta1 > 1 would be the exactness check,
    which reads every evicted token whatever `pages`."""
    k = torch.randn(B, Hkv, L, D)
    v = torch.randn(B, Hkv, L, D)
    rec = calidrop.PrefillRecorder(None)
    rec.layers = {0: calidrop.Recorded(torch.randn(B, Hq, 32, D))}
    cfg = calidrop.CaliDropConfig(budget=budget, theta1=theta1, theta2=2.0 if theta1 >= 1 else 0.85,
                                  reload_pages=pages, reload_capacity=cap)
    return calidrop.CaliDropCache.from_prefill(cfg, [k], [v], rec, 64, inv_freq=inv_freq)


def bench(B, L, budget, pages, compiled=True, n=40, **kw):
    cache = build(B, L, budget, pages, **kw)

    def step(q, k, v, pos):
        return cache.attend(0, q, k, v, pos)
    f = torch.compile(step, fullgraph=True, dynamic=False) if compiled else step
    q = torch.randn(B, Hq, 1, D)
    kk = torch.randn(B, Hkv, 1, D)
    pos = torch.tensor([L])
    for _ in range(3):
        f(q, kk, kk, pos)
    ts = []
    for i in range(n):
        q = torch.randn(B, Hq, 1, D)
        t0 = time.perf_counter()
        f(q, kk, kk, pos)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(sizes=((1024, 128), (1536, 256), (8064, 256)), batches=(1, 8)):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for L, budget in sizes:
        for B in batches:
            r = {p: bench(B, L, budget, p) for p in (12, None)}
            print(f"L={L} B={B} E={L-budget}: pages12 {r[12]:.3f} ms  all {r[None]:.3f} ms  "
                  f"(per pair {r[12]/(B*Hkv):.3f} / {r[None]/(B*Hkv):.3f})", flush=True)


if __name__ == "__main__":
    main()
