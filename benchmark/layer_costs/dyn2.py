import sys, time, statistics, torch
sys.path.insert(0, '/work/main')
import calidrop
torch.set_num_threads(1)
torch._dynamo.config.capture_dynamic_output_shape_ops = True
def pairs(reload, capacity=None):
    B, Hkv = reload.shape
    flat = torch.cat([reload.flatten().nonzero()[:, 0], reload.new_zeros(1, dtype=torch.long)])  # (u0 + 1,): a dummy last
    needed = torch.cat([torch.ones_like(flat[1:], dtype=torch.bool), reload.new_zeros(1)])
    return flat // Hkv, flat % Hkv, needed
if sys.argv[1] == "dyn":
    calidrop.reading_pairs = pairs
sys.path.insert(0, '/tmp/mb')
from mb import build, Hq, Hkv, D
for L, budget, B, pages in [(8064, 256, 1, "auto"), (8064, 256, 8, "auto"), (1024, 128, 8, "auto"), (1024, 128, 8, 12)]:
    cache = build(B, L, budget, pages, theta1=0.0)  # theta1=0: about half the heads stale (random q)
    f = torch.compile(lambda q, k, v, pos: cache.attend(0, q, k, v, pos), fullgraph=True, dynamic=False)
    kk = torch.randn(B, Hkv, 1, D); pos = torch.tensor([L])
    ts = []
    for i in range(40):
        q = torch.randn(B, Hq, 1, D)
        t0 = time.perf_counter(); out = f(q, kk, kk, pos); ts.append(time.perf_counter() - t0)
    print(sys.argv[1], L, B, pages, cache.layers[0].pages, f"{statistics.median(ts[5:])*1e3:.3f} ms", "reload share", cache.reloads.sum().item() / (40 * B * Hkv), flush=True)
