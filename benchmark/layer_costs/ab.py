# A/B: the fine pass with the cos/sin table vs computing them, one layer's top_pages at 8k, compiled, interleaved
import sys, time, math, statistics, torch
sys.path.insert(0, '/work/main')
import calidrop
torch.set_num_threads(1)
torch.manual_seed(0)
Hkv, G, D, E, N = 3, 3, 64, 7808, 31
inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
B = 1
k = torch.randn(B, Hkv, E, D); pos = torch.arange(E).expand(B, Hkv, E)
sk = calidrop.sketch_keys(k, pos, inv_freq, 16)
n = B * Hkv
rows = torch.arange(B).repeat_interleave(Hkv); kvh = torch.arange(Hkv).repeat(B)
qg = torch.randn(n, G, D); lse = torch.randn(n, G); heads = torch.ones(n, G, dtype=torch.bool)
table = calidrop.rope_table(E + 300, inv_freq)
def with_table(): return calidrop.top_pages(sk, rows, kvh, qg, lse, heads, N, 16, inv_freq, table)
orig_rotate_by = calidrop.rotate_by
import inspect, textwrap
src = inspect.getsource(calidrop.top_pages).replace("keys = rotate_by(coords @ basis, *table[positions.gather(1, tokens)].chunk(2, -1))",
                                                     "keys = rotate(coords @ basis, positions.gather(1, tokens), inv_freq)").replace("def top_pages(", "def top_pages_b(")
assert "rotate(coords" in src
ns = dict(vars(calidrop)); exec(src, ns); top_pages_b = ns["top_pages_b"]
def computed(): return top_pages_b(sk, rows, kvh, qg, lse, heads, N, 16, inv_freq, table)
fa = torch.compile(with_table, fullgraph=True)
fb = torch.compile(computed, fullgraph=True)
ta, tb = [], []
for f in (fa, fb):
    for _ in range(3): f()
assert torch.equal(fa()[0].sort(-1).values, fb()[0].sort(-1).values)
for i in range(200):
    for f, ts in ((fa, ta), (fb, tb)):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
print(f"top_pages per pair at E={E}, N={N}: table {1e6*statistics.median(ta)/n:.1f} us, computed {1e6*statistics.median(tb)/n:.1f} us")
