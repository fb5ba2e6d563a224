"""bench.py on the tiny model (eager rows, no peer): the byte counts it reports equal what the tensors hold
and what the shapes give, a compressed cache stays budget-sized whatever the prompt length, the timings
are consistent with each other, and the full row's greedy tokens equal greedy decoding by full forward
passes."""
from pathlib import Path

import pytest
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
        # the timed steps (all but the first, a warm-up, and the last token, never fed) within the decode's
        # wall time, after the first step; their median within their total
        assert r["timed_steps"] == 6 - 1 - 1, r["row"]
        timed_s = r["timed_steps"] / r["tokens_per_s"]
        assert r["step_ms"] / 1e3 <= timed_s and r["first_step_s"] + timed_s <= r["decode_wall_s"], r["row"]
        assert r["bytes_check"] == [], r["row"]  # kept slots and the tensors' storages agree with the counts

    # bytes per sequence counted from the shapes: 2 layers x 2 KV heads x K and V x head_dim 16 x fp32
    per_token, fed, room = 2 * 2 * 2 * 16 * 4, 6 - 1, 6
    calibration = 2 * 4 * (2 * 16 + 1) * 4  # per layer: hist_q, hist_out (4 query heads x 16), hist_lse (4)
    for L in (48, 80):
        full = rows[L, "full"]
        assert full["kv_bytes_kept"] == (L + fed) * per_token and full["kv_bytes_allocated"] == (L + room) * per_token
        for m in ("snapkv", "streamingllm"):
            evict, calibrate, calidrop = (rows[L, f"{m} {v}"] for v in ("evict", "calidrop -1", "calidrop 0.7/0.85"))
            for r in (evict, calibrate, calidrop):  # budget-sized whatever the prompt length
                assert r["kv_bytes_kept"] == (16 + fed) * per_token and r["kv_bytes_full"] == (L + fed) * per_token
                assert r["kv_bytes_allocated"] == (16 + room) * per_token
            assert evict["calibration_bytes"] == 0
            assert calibrate["calibration_bytes"] == calidrop["calibration_bytes"] == calibration
            # only a row that can recompute keeps the evicted K/V
            assert evict["kv_bytes_offloaded"] == calibrate["kv_bytes_offloaded"] == 0
            assert calidrop["kv_bytes_offloaded"] == (L - 16) * per_token

    model = load_model(tiny_ckpt)  # the full row's tokens, by a full forward pass per new token
    ids = torch.randint(0, model.args.vocab_size, (80,), generator=torch.Generator().manual_seed(0))
    tokens = ids[None].clone()
    with torch.inference_mode():
        for _ in range(6):
            logits = model(tokens, torch.arange(tokens.shape[1]), FullCache(model.args, 1, tokens.shape[1]))
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], 1)
    assert rows[80, "full"]["tokens"] == tokens[0, 80:].tolist()


def test_without_json_it_writes_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Without --json bench.py prints its table and writes no file: the results where it runs (here a copy of
    the repository's results/bench.json) stay as they were."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    committed = (Path(__file__).parent / "results" / "bench.json").read_bytes()
    (tmp_path / "results" / "bench.json").write_bytes(committed)
    out = bench.run(bench.parse_args(["--ckpt", str(tiny_ckpt), "--prompt", "random", "--lengths", "48",
                                      "--methods", "snapkv", "--budget", "16", "--window", "4", "--sink", "4",
                                      "--no-compile", "--no-peer", "--new-tokens", "3", "--warmup", "1"]))
    assert out["rows"] and "snapkv calidrop 0.7/0.85" in capsys.readouterr().out  # it ran and printed its rows
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("results"), Path("results/bench.json")]
    assert (tmp_path / "results" / "bench.json").read_bytes() == committed


@pytest.mark.parametrize("flags, message", [
    (["--budget", "0"], "--budget must be >= 1"),
    (["--window", "0"], "--window must be >= 1"),
    (["--window", "-4"], "--window must be >= 1"),
    (["--sink", "-1"], "--sink must be >= 0"),
    (["--theta1", "0.9", "--theta2", "0.5"], "--theta1 < --theta2"),
    (["--new-tokens", "1"], "--new-tokens and --compile-new-tokens must be >= 2"),
    (["--ckpt", "{truncated}"], "unreadable weight file"),
])
def test_bad_input_exits_2_with_one_line(flags, message, tiny_ckpt, truncated_ckpt, tmp_path, capsys):
    flags = [f.format(truncated=truncated_ckpt) for f in flags]
    with pytest.raises(SystemExit) as exit:
        bench.main(["--ckpt", str(tiny_ckpt), "--prompt", "random", "--lengths", "48", "--budget", "16",
                    "--window", "4", "--sink", "4", "--no-compile", "--no-peer", "--json", str(tmp_path / "b.json"),
                    *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and message in err


def test_forced_recompute_rate_batch_and_compile(tiny_ckpt, tmp_path):
    """--recompute-heads 1: exactly one of the 2 KV heads per layer-step recomputes, and with 2 pages of 8
    tokens each it reads back 2 layers x 16 tokens x K and V x 16 x fp32 per sequence and step. Batched rows
    decode distinct prompts, the first of them the batch-1 prompt, so the first sequence decodes the batch-1
    tokens in every row but the forced one (its capacity of 1 x 2 pairs is shared by the batch: the 2 stalest
    pairs may both be the second sequence's). Compiled rows (fullgraph, the recompute included) decode the
    eager tokens, teacher-forced for 16 steps, and compile nothing after their first step (a forced token fed
    with other strides than an argmax's recompiled every row at its second step)."""
    out = bench.run(bench.parse_args(["--ckpt", str(tiny_ckpt), "--prompt", "random", "--lengths", "48",
                                      "--methods", "snapkv", "--budget", "16", "--window", "4", "--sink", "4",
                                      "--recompute-heads", "1", "--reload-pages", "2", "--page-size", "8",
                                      "--batch", "1,2", "--no-peer", "--new-tokens", "16", "--compile-new-tokens", "16",
                                      "--warmup", "1", "--json", str(tmp_path / "bench.json")]))
    rows = {(r["batch"], r["row"], r["mode"]): r for r in out["rows"]}
    assert all(r["bytes_check"] == [] for r in out["rows"])  # the key sketch's bytes included
    forced = "snapkv calidrop forced 1/2"
    for B in (1, 2):
        r = rows[B, forced, "eager"]
        assert r["reload_fraction"] == 0.5 and r["recompute_layer_rate"] == 1.0
        assert r["link_bytes_per_token"] == B * 2 * 16 * 2 * 16 * 4
        assert r["fast_bytes_per_token"] > rows[B, "snapkv calidrop -1", "eager"]["fast_bytes_per_token"]  # the sketch
        for name in ("full", "snapkv evict", "snapkv calidrop -1", forced):
            assert rows[B, name, "compile"]["tokens"] == rows[B, name, "eager"]["tokens"]
            if name != forced:
                assert rows[B, name, "eager"]["tokens"] == rows[1, name, "eager"]["tokens"]
    assert all(c["identical"] for c in out["targets"]["compile"])
    assert all(r["recompiles"] == 0 for r in out["rows"] if r["mode"] == "compile")


def test_compiled_equals_eager_in_bf16_within_a_stated_tolerance():
    """Issue 25: in bf16 on random weights a compiled row's greedy tokens may differ from eager's at near-tied
    logits; there the check is the logits' largest difference over the teacher-forced steps, held to
    8 eps x the largest |logit|. In float32 it stays exact token identity."""
    from benchmark.rows import Variant, compare_logits

    eager = torch.tensor([[3.0, -1.0, 2.99], [0.5, 4.0, -2.0]])
    compiled = eager + torch.tensor([[0.0, 0.0, 0.02], [0.01, 0.0, 0.0]])  # the first step's argmax flips: 2, not 0
    bf16 = compare_logits(compiled, eager, torch.bfloat16)
    assert bf16["logits_max_diff_vs_eager"] == pytest.approx(0.02)
    assert bf16["logits_tolerance"] == pytest.approx(8 * 2 ** -7 * 4.0)
    assert compare_logits(compiled, eager, torch.float32)["logits_tolerance"] is None

    def rows(check):
        common = dict(length=100, row="full", batch=1, tokens_per_s=1.0, bytes_check=[])
        return [dict(common, mode="eager", tokens=[7, 0, 1]), dict(common, mode="compile", tokens=[7, 2, 1], **check)]
    args = bench.parse_args(["--methods", ""])
    args.methods = []
    for dtype, ok in ((torch.bfloat16, True), (torch.float32, False)):
        _, result = bench.targets(rows(compare_logits(compiled, eager, dtype)), args, [Variant("full", None)], [100])
        (pair,) = result["compile"]
        assert not pair["identical"] and pair["within_tolerance"] == ok


def test_the_full_caches_compiled_step_keeps_the_batch_size_static(tiny_ckpt):
    """bench.py's compiled full-cache step: the slot dimension symbolic from the first compile (one graph for
    every prompt length), every other size static, the batch size too when a second one comes (a symbolic
    batch size makes FlexAttention's decode on CUDA fall back to its general kernel)."""
    from benchmark.rows import Steps, Variant
    from model import FullCache, load_model

    graphs = []

    def record(gm, example_inputs):
        graphs.append([tuple(n.meta["example_value"].shape) for n in gm.graph.nodes if n.op == "placeholder"
                       and isinstance(n.meta.get("example_value"), torch.Tensor) and n.meta["example_value"].dim() == 4])
        return gm
    torch._dynamo.reset()
    model = load_model(tiny_ckpt)
    steps = Steps(torch.device("cpu"), backend=record)
    with torch.inference_mode():
        for B, L in ((1, 20), (1, 30), (2, 30)):
            cache = FullCache(model.args, B, L)
            steps.get("compile", Variant("full", None), cache)(model, torch.zeros(B, 1, dtype=torch.long),
                                                              torch.tensor([L - 1]), cache)
    assert len(graphs) == 2  # a new prompt length compiles nothing; a new batch size compiles once
    for B, shapes in zip((1, 2), graphs):
        buffers = [s for s in shapes if s[1] == model.args.n_kv_heads and s[3] == model.args.head_dim]  # K/V
        assert len(buffers) == 2 * model.args.n_layers
        assert all(isinstance(s[0], int) and s[0] == B and not isinstance(s[2], int) for s in buffers)
