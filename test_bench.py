"""bench.py on the tiny model (eager rows, no peer): the byte counts it reports equal what the tensors hold,
a compressed cache stays budget-sized whatever the prompt length, and the full row's greedy tokens equal
greedy decoding by full forward passes."""
import torch

import bench
from model import FullCache, load_model


def test_bench_rows_on_the_tiny_model(tiny_ckpt, tmp_path):
    out = bench.run(bench.parse_args(["--ckpt", str(tiny_ckpt), "--prompt", "random", "--lengths", "48,80",
                                      "--budget", "16", "--window", "4", "--sink", "4", "--no-compile",
                                      "--no-peer", "--new-tokens", "6", "--warmup", "1",
                                      "--json", str(tmp_path / "bench.json")]))
    rows = {(r["length"], r["row"]): r for r in out["rows"]}
    names = ["full"] + [f"{m} {v}" for m in ("snapkv", "streamingllm") for v in ("evict", "calidrop -1", "calidrop 0.7/0.85")]
    assert set(rows) == {(L, n) for L in (48, 80) for n in names}
    for r in out["rows"]:
        assert r["bytes_check"] == [], r["row"]  # kept, allocated, calibration, offloaded: as held
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == 6 - 1 - 1
    for name in names[1:]:  # budget-sized: the same bytes at both prompt lengths
        assert rows[48, name]["kv_bytes_kept"] == rows[80, name]["kv_bytes_kept"], name
    assert rows[80, "full"]["kv_bytes_kept"] > rows[48, "full"]["kv_bytes_kept"]
    for m in ("snapkv", "streamingllm"):  # only a row that can recompute keeps the evicted K/V
        assert rows[80, f"{m} calidrop -1"]["kv_bytes_offloaded"] == 0 == rows[80, f"{m} evict"]["kv_bytes_offloaded"]
        assert rows[80, f"{m} calidrop 0.7/0.85"]["kv_bytes_offloaded"] > 0

    model = load_model(tiny_ckpt)  # the full row's tokens, by a full forward pass per new token
    ids = torch.randint(0, model.args.vocab_size, (80,), generator=torch.Generator().manual_seed(0))
    tokens = ids[None].clone()
    with torch.inference_mode():
        for _ in range(6):
            logits = model(tokens, torch.arange(tokens.shape[1]), FullCache(model.args, 1, tokens.shape[1]))
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], 1)
    assert rows[80, "full"]["tokens"] == tokens[0, 80:].tolist()
