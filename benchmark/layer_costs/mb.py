import sys, time, torch, statistics
sys.path.insert(0, '/work/main')
import calidrop
torch.set_num_threads(1)
torch.manual_seed(0)
Hq, Hkv, D = 9, 3, 64
inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))

def build(B, L, budget, pages, theta1=2.0, cap=None):
    k = torch.randn(B, Hkv, L, D); v = torch.randn(B, Hkv, L, D)
    rec = calidrop.PrefillRecorder(None)
    rec.layers = {0: calidrop.Recorded(torch.randn(B, Hq, 32, D))}
    cfg = calidrop.CaliDropConfig(budget=budget, theta1=theta1, theta2=2.0 if theta1 > 1 else 0.85, reload_pages=pages, reload_capacity=cap)
    return calidrop.CaliDropCache.from_prefill(cfg, [k], [v], rec, 64, inv_freq=inv_freq)

def bench(B, L, budget, pages, compiled=True, n=40, **kw):
    cache = build(B, L, budget, pages, **kw)
    def step(q, k, v, pos):
        return cache.attend(0, q, k, v, pos)
    f = torch.compile(step, fullgraph=True, dynamic=False) if compiled else step
    q = torch.randn(B, Hq, 1, D); kk = torch.randn(B, Hkv, 1, D)
    pos = torch.tensor([L])
    for _ in range(3): f(q, kk, kk, pos)
    ts = []
    for i in range(n):
        q = torch.randn(B, Hq, 1, D)
        t0 = time.perf_counter(); f(q, kk, kk, pos); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

if __name__ == "__main__":
    for L, budget in [(1024, 128), (1536, 256), (8064, 256)]:
        for B in [1, 8]:
            r = {p: bench(B, L, budget, p) for p in (12, None)}
            print(f"L={L} B={B} E={L-budget}: pages12 {r[12]:.3f} ms  all {r[None]:.3f} ms  (per pair {r[12]/(B*Hkv):.3f} / {r[None]/(B*Hkv):.3f})", flush=True)
