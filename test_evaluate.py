"""evaluate.py: bad input exits 2 in one line; a --quick run writes complete, well-formed results whose
numbers hold what the method guarantees (the full cache's KL is 0, exact recompute's is ~0, eviction's
is not). The slow test runs --quick on the real default model, as a user would."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import calidrop
import evaluate
import generate
from common import TextCodec, kjv_text, kv_bytes_per_token
from evaluation import report, variants
from evaluation.frontier import FRONTIER_QUICK, point_name
from evaluation.data import segments
from evaluation.ppl import Continuation
from model import FullCache, load_model, read_config

ROOT = Path(__file__).parent


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """A few hundred kilobytes of the KJV: enough for the tiny model's short segments and haystacks."""
    path = tmp_path_factory.mktemp("text") / "kjv.txt"
    path.write_text(kjv_text()[:400_000])
    return path


@pytest.mark.parametrize("flags, message", [
    (["--task", "summarize"], "unknown task"),
    (["--methods", "snapkv,quest"], "unknown method"),
    (["--variants", "evict,magic"], "unknown variant"),
    (["--budgets", "64,lots"], "bad budget"),
    (["--methods", "snapkv", "--budgets", "32"], "--budget > --window"),
    (["--methods", "streamingllm", "--budgets", "16"], "--budget > --sink"),
    (["--segments", "0"], "--segments must be"),
    (["--text-file", "/nonexistent/text.txt"], "text file not found"),
    (["--lengths", "4096"], "do not fit the model's context"),  # the tiny model's is 512
    (["--window", "0"], "--window must be >= 1"),
    (["--window", "-4"], "--window must be >= 1"),
    (["--sink", "-1"], "--sink must be >= 0"),
    (["--methods", "h2o", "--budgets", "0"], "--budget must be >= 1"),
    (["--theta1", "0.9", "--theta2", "0.5"], "--theta1 < --theta2"),
    (["--new-tokens", "0"], "--new-tokens must be"),
    (["--task", "ruler", "--prompts", "0"], "--prompts must be"),
    (["--task", "ruler", "--ruler-tasks", "niah_single,qa"], "unknown ruler task qa"),
    (["--ckpt", "{truncated}", "--lengths", "300", "--context", "192"], "unreadable weight file"),
    (["--task", "passkey", "--lengths", "40", "--context", "192"], "cannot hold"),
])
def test_bad_input_exits_2_with_one_line(flags, message, tiny_ckpt, truncated_ckpt, tmp_path, capsys):
    flags = [f.format(truncated=truncated_ckpt) for f in flags]
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--quick", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path), *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and message in err


def test_without_out_it_writes_nothing(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """No default output directory: without --out, evaluate.py stops before any work and leaves the results
    where it runs (here a copy of the repository's results.json) as they were."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    committed = (ROOT / "results" / "results.json").read_bytes()
    (tmp_path / "results" / "results.json").write_bytes(committed)
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--quick", "--ckpt", str(tiny_ckpt)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: give --out DIR: where to write results.json, results.md and the plots\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("results"), Path("results/results.json")]
    assert (tmp_path / "results" / "results.json").read_bytes() == committed


@pytest.mark.parametrize("theta1, theta2", [(2.0, 0.5), (-3.0, 0.5), (0.7, 2.0), (-1.0, -1.0)])
def test_threshold_extremes_are_valid(theta1, theta2, tmp_path):
    """The extremes by which a user checks exactness: recompute every step (theta1 > 1, whatever theta2),
    never recompute (theta1 <= -1), never calibrate (theta2 > 1): the same rule as generate.py's."""
    evaluate.check_args(evaluate.parse_args(["--theta1", str(theta1), "--theta2", str(theta2), "--out", str(tmp_path)]))


@pytest.mark.parametrize("method, capacity", [("snapkv", None), ("h2o", None), ("snapkv", 1)])
def test_variants_as_rows_equal_each_variant_alone(tiny_ckpt, method, capacity):
    """evaluate.py selects and calibrates once per (method, budget) and decodes the variants as rows of
    shared caches: each row's log-probs, decisions and bytes equal those of the variant's own cache, built
    and decoded alone the way generate.py does. With a reload capacity (shared by a batch) each variant is
    a cache of its own, whose batch is the 2 distinct sequences, as generate.py's cache of both would be."""
    model = load_model(tiny_ckpt)
    torch.manual_seed(0)
    L, n = 48, 12
    tokens = torch.randint(3, model.args.vocab_size, (2, L + n))
    # pages of 4 of the 32 evicted tokens: 3 per recompute by default, and variants that read 2 or all
    args = evaluate.parse_args(["--window", "4", "--sink", "4", "--page-size", "4", "--reload-pages", "3",
                                *(["--reload-capacity", str(capacity)] if capacity else [])])
    names = ("evict", "calibrate", "recompute", "calidrop", "calidrop+int8-offload", "recompute-all",
             "calidrop@all", "recompute+int8-offload@2")
    with torch.inference_mode():
        _, full, recorder = variants.prefill_rows(model, tokens[:, :L], n, args.window, h2o=True)
        rows, layout = variants.build_batch(args, [(method, 16, names)], full, recorder, L, n, model.inv_freq)
        batched = torch.stack(list(variants.feed(model, rows, tokens[:, L:].repeat(len(layout), 1), L)), 1)
        for _, _, variant, cache, in_cache, in_batch in layout:
            theta1, theta2 = variants.thresholds(variant, args)
            config = calidrop.CaliDropConfig(method=method, budget=16, window=4, sink=4, theta1=theta1, theta2=theta2,
                                             page_size=4, reload_pages=variants.reload_pages(variant, args),
                                             reload_capacity=capacity)
            if capacity:
                assert cache.counts.shape[1] == 2, variant  # its own cache: the batch of its sequences
            store = variants.make_store(variants.offload(variant), "cpu") or calidrop.OffloadStore("cpu")
            _, alone = generate.prefill_and_compress(model, tokens[:, :L], config, n, store)
            logp = torch.stack(list(variants.feed(model, alone, tokens[:, L:], L)), 1)
            torch.testing.assert_close(batched[in_batch], logp, atol=1e-4, rtol=0, msg=variant)
            assert torch.equal(cache.counts[:, in_cache], alone.counts), variant
            stats, _ = variants.config_stats(cache, in_cache, variant, L + n)
            own = alone.stats(L + n)
            assert stats["kv_bytes_offloaded"] == own["kv_bytes_offloaded"] / 2, variant
            assert stats["reload_bytes_per_token"] == pytest.approx(own["reload_bytes_per_token"] / 2), variant
            if variant != "evict":  # evict needs no calibration state: evaluate counts none
                assert stats["calibration_bytes"] == own["calibration_bytes"] / 2, variant
            assert stats["kv_bytes_selection"] == own["kv_bytes_selection"] / 2, variant


def test_ppl_reference_and_kl_against_independent_computations(tiny_ckpt, small_text, tmp_path):
    """The ppl task's reference is the full model's next-token distribution (one forward pass over each
    segment), its NLL is that of the true next tokens, and a variant's KL is KL(P_full || P_variant) as
    torch's kl_div computes it (the order matters: KL is not symmetric)."""
    model, codec = load_model(tiny_ckpt), TextCodec(tiny_ckpt)
    args = evaluate.parse_args(["--ckpt", str(tiny_ckpt), "--text-file", str(small_text), "--segments", "2",
                                "--context", "64", "--new-tokens", "8", "--out", str(tmp_path)])
    evaluate.check_args(args)
    C, M = 64, 8
    with torch.inference_mode():
        data = Continuation(model, codec, args, torch.device("cpu"), h2o=False)
        tokens = torch.tensor(segments(codec, small_text.read_text(), 2, C + M + 1))
        logits = model(tokens[:, :C + M], torch.arange(C + M), FullCache(model.args, 2, C + M))
    reference = logits[:, C:].log_softmax(-1)  # after token C + t: the distribution of token C + t + 1
    torch.testing.assert_close(data.reference, reference, atol=1e-4, rtol=0)
    nll = -reference.gather(-1, tokens[:, C + 1:, None])[..., 0].mean(1)  # per segment
    assert data.full_result["nll"]["mean"] == pytest.approx(nll.mean().item(), abs=1e-5)
    assert data.full_result["kl"]["mean"] == 0.0  # the full cache against itself

    other = (reference + torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))).log_softmax(-1)
    kl = F.kl_div(other, reference, log_target=True, reduction="none").sum(-1).mean(1)  # KL(P_ref || P_other)
    reverse = F.kl_div(reference, other, log_target=True, reduction="none").sum(-1).mean(1)
    metrics = data.metrics(other)
    assert metrics["kl"]["mean"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert metrics["kl"]["se"] == pytest.approx(kl.std().item() / math.sqrt(2), rel=1e-4)
    assert abs(kl.mean() - reverse.mean()) > 0.01  # so the order is checked
    # every token's values: the same KL per token, the true token's NLL, and the entropy of P_other
    per_token_kl = F.kl_div(other, reference, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(torch.tensor(metrics["kl_per_token"]), per_token_kl, atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(metrics["nll_per_token"]),
                               -other.gather(-1, tokens[:, C + 1:, None])[..., 0], atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(metrics["entropy_per_token"]),
                               torch.distributions.Categorical(logits=other).entropy(), atol=2e-6, rtol=0)
    assert data.full_result["kl_per_token"] == [[0.0] * M] * 2


def check_quick_results(out, settings):
    """Everything --quick promises: every task and config present, the tables and plots written, and the
    numbers that are exact by construction."""
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"settings", *evaluate.TASKS}
    assert results["settings"]["args"]["quick"] is True and results["settings"]["torch"]
    grid = {(m, b, v) for m in settings["methods"] for b in settings["budgets"] for v in settings["variants"]}
    sections = {"ppl": [results["ppl"]], "attention": [results["attention"]],
                **{t: list(results[t]["modes"].values()) for t in ("passkey", "multikey", "needle")}}
    assert set(results["passkey"]["modes"]) == set(results["multikey"]["modes"]) == {"aware", "agnostic"}
    assert set(results["needle"]["modes"]) == {"agnostic"}
    for task, parts in sections.items():
        for part in parts:
            configs = {(c["method"], c["budget"], c["variant"]): c for c in part["configs"]}
            assert set(configs) == grid and len(part["configs"]) == len(grid), task
            for c in part["configs"]:
                assert math.isclose(sum(c["decisions"].values()), 1.0), (task, c)
                if task not in ("ppl", "attention"):
                    assert 0 <= c["accuracy"]["mean"] <= 1
                    assert len(c["correct"]) == len(part["full"]["correct"])
        # a batch's decode time is shared out among its configs: together they took less than the task
        assert 0 < sum(c["decode_s"] for part in parts for c in part["configs"]) < results[task]["run_s"], task

    ppl = results["ppl"]
    # bytes counted from the shapes: every kept slot of every layer holds one token's K and V
    model_args = read_config(Path(results["settings"]["model"]))
    per_token = kv_bytes_per_token(model_args, getattr(torch, results["settings"]["dtype"].removeprefix("torch.")))
    C, M = ppl["context"], ppl["new_tokens"]
    assert ppl["full"]["kv_bytes_kept"] == ppl["full"]["kv_bytes_full"] == (C + M) * per_token
    for c in ppl["configs"]:  # pyramidkv's per-layer budgets sum to the same
        assert c["kv_bytes_kept"] == (c["budget"] + M) * per_token and c["kv_bytes_full"] == (C + M) * per_token
    for name in variants.QUANTIZED:  # 2-bit caches: lossy, and smaller than the full cache
        q = ppl["quantized"][name]
        assert q["kl"]["mean"] > 0 and q["kv_bytes_kept"] < ppl["full"]["kv_bytes_kept"]
        for task in ("passkey", "multikey", "needle"):
            for part in results[task]["modes"].values():
                assert len(part["quantized"][name]["correct"]) == len(part["full"]["correct"])
    for c in ppl["configs"]:
        assert math.isfinite(c["nll"]["mean"]) and math.isfinite(c["kl"]["mean"])
        if c["variant"] == "recompute-all":  # exact attention at every step
            assert abs(c["kl"]["mean"]) < 1e-3 and c["decisions"]["recompute"] == 1.0
        if c["variant"] == "evict":
            assert c["kl"]["mean"] > 0 and c["kv_bytes_offloaded"] == 0 and c["calibration_bytes"] == 0
        if c["variant"] == "calibrate":
            assert c["kv_bytes_offloaded"] == 0 and c["calibration_bytes"] > 0
        if c["variant"] in ("recompute", "calidrop", "calidrop+ott-offload"):
            assert c["kv_bytes_offloaded"] > 0
    offloaded = {(c["method"], c["variant"]): c["kv_bytes_offloaded"] for c in ppl["configs"]}
    for m in settings["methods"]:  # 2 bits plus scales, zero points and outliers: well under a quarter
        assert offloaded[m, "calidrop+ott-offload"] < offloaded[m, "calidrop"] / 4
    for c in results["attention"]["configs"]:
        if c["variant"] == "recompute-all":
            assert c["rel_error"]["mean"] < 1e-3
        if c["variant"] == "evict":
            assert c["rel_error"]["mean"] > 0
    n_layers = len(results["attention"]["configs"][0]["rel_error_by_layer"])
    assert all(len(v) == n_layers for v in results["attention"]["cos_by_layer"].values())

    table = (out / "results.md").read_text()
    for task in evaluate.TASKS:
        assert f"## {task}" in table
        assert (out / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_on_the_tiny_model(tiny_ckpt, small_text, tmp_path, capsys):
    # 448: the longest prompt that leaves the answer room in the tiny model's 512 positions; its byte-level
    # tokenizer spends up to 439 tokens on a prompt's instructions, question and needles
    evaluate.main(["--quick", "--ckpt", str(tiny_ckpt), "--text-file", str(small_text), "--lengths", "448",
                   "--context", "192", "--out", str(tmp_path)])
    check_quick_results(tmp_path, evaluate.QUICK)
    assert "ETA" in capsys.readouterr().err  # progress goes to stderr


def test_quick_on_the_default_model(tmp_path):
    """The real SmolLM2-135M-Instruct (prepared on first use), as a user runs it: a few minutes on 2 cores."""
    run = subprocess.run([sys.executable, "evaluate.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    check_quick_results(tmp_path, evaluate.QUICK)


def test_frontier_quick_on_the_tiny_model(tiny_ckpt, small_text, tmp_path):
    """The frontier's bytes against counts from the shapes (fast: kept slots, plus the calibration state for
    CaliDrop; offloaded: the evicted tokens' K/V, smaller in int8 and smaller again in 2 bits, none in fast
    memory); eviction at 64 loses something; reloads only where something recomputes; and the modelled GPU
    speed falls as fast bytes grow and, at equal fast bytes, as reload traffic grows."""
    evaluate.main(["--task", "frontier", "--quick", "--ckpt", str(tiny_ckpt), "--text-file", str(small_text),
                   "--context", "192", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())["frontier"]
    points = {point_name(p): p for p in result["points"]}
    args = read_config(tiny_ckpt)
    per_token = kv_bytes_per_token(args, torch.float32)
    calibration = args.n_layers * args.n_heads * (2 * args.head_dim + 1) * 4  # hist_q, hist_out, hist_lse
    C, M = result["context"], result["new_tokens"]
    full = points["full"]
    assert full["fast_bytes"] == result["full_kv_bytes"] == (C + M) * per_token and full["offloaded_bytes"] == 0
    evict = [points[f"snapkv {b} evict"] for b in FRONTIER_QUICK["evict_budgets"]]
    assert [p["fast_bytes"] for p in evict] == [(b + M) * per_token for b in FRONTIER_QUICK["evict_budgets"]]
    assert evict[0]["kl"] > 0
    assert all(a["gpu_tokens_per_s"] > b["gpu_tokens_per_s"] for a, b in zip(evict, evict[1:]))
    assert all(p["reload_bytes_per_token"] == 0 for p in evict + [points["snapkv 64 calibrate"]])
    # every page as computed, 2 of the 8 pages in int8 (the key sketch in fast memory), every page in 2 bits
    plain, int8, two_bit = (points[f"snapkv 64 calidrop{o}"] for o in ("@all", "+int8-offload@2", "+ott-offload@all"))
    E, r, D, Hkv = C - 64, args.head_dim, args.head_dim, args.n_kv_heads  # rank 16 = head_dim here
    sketch = args.n_layers * Hkv * (E * r // 2 + r * 4 + r * D * 4 + E * 4 + E // 16 * (r + 1) * 4)
    assert plain["fast_bytes"] == two_bit["fast_bytes"] == (64 + M) * per_token + calibration
    assert int8["selection_bytes"] == sketch and int8["fast_bytes"] == plain["fast_bytes"] + sketch
    assert plain["offloaded_bytes"] == (C - 64) * per_token
    assert two_bit["offloaded_bytes"] < int8["offloaded_bytes"] < plain["offloaded_bytes"]
    assert 0 < int8["reload_bytes_per_token"] < plain["reload_bytes_per_token"]
    assert 0 < two_bit["reload_bytes_per_token"] < plain["reload_bytes_per_token"]
    assert int8["reload_share"] < 2 / 8 * 1.01  # at most 2 of the 8 pages per recompute
    assert {p["theta1"] for p in result["theta1_sweep"]} == set(FRONTIER_QUICK["theta1_sweep"])
    long = {point_name(p): p for p in result["long_context"]["points"]}
    assert set(long) == {"full"} | {f"snapkv 64 {v}" for v in FRONTIER_QUICK["long_variants"]}
    assert long["full"]["kl"] == 0 and long["snapkv 64 evict"]["kl"] > 0
    for p in result["points"]:
        assert {"variant", "method", "budget", "fast_bytes", "offloaded_bytes", "reload_bytes_per_token",
                "kl", "kl_se", "nll", "nll_se", "gpu_tokens_per_s"} <= set(p)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best variant by KL" in (tmp_path / "results.md").read_text()


def test_per_item_values_and_paired_differences_to_evict(tiny_ckpt, small_text, tmp_path):
    """results.json keeps every segment's NLL and KL and every prompt's 0/1 score; the report's difference
    to evict is the mean and paired standard error of the item-by-item differences (computed here again
    from the lists with the standard library), exactly 0 for evict itself, and it is in results.md."""
    evaluate.main(["--quick", "--ckpt", str(tiny_ckpt), "--text-file", str(small_text), "--task", "ppl,passkey",
                   "--methods", "snapkv,streamingllm", "--variants", "evict,calidrop,recompute-all",
                   "--segments", "3", "--keys", "3", "--lengths", "448", "--context", "192", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    parts = [(results["ppl"], ("nll", "kl"))] + [(p, ("accuracy",)) for p in results["passkey"]["modes"].values()]
    for part, metrics in parts:
        by_config = {(c["method"], c["budget"], c["variant"]): c for c in part["configs"]}
        for (m, b, v), c in by_config.items():
            for metric in metrics:
                own, evict = report.items(c, metric), report.items(by_config[m, b, "evict"], metric)
                assert len(own) == (3 if metric != "accuracy" else len(part["full"]["correct"]))
                assert statistics.fmean(own) == pytest.approx(c[metric]["mean"], abs=1e-9)
                d = [x - y for x, y in zip(own, evict)]
                se = statistics.stdev(d) / math.sqrt(len(d))
                got = report.to_evict(by_config, m, b, v, metric)
                if v == "evict":
                    assert got == {"mean": 0.0, "se": 0.0}
                else:
                    assert got["mean"] == pytest.approx(statistics.fmean(d), abs=1e-12)
                    assert got["se"] == pytest.approx(se, rel=1e-9, abs=1e-12)
                if metric != "accuracy":
                    assert report.diff_cell(got) in table
    ppl = {c["variant"]: c for c in results["ppl"]["configs"] if c["method"] == "snapkv"}
    assert report.to_evict({(0, 0, v): c for v, c in ppl.items()}, 0, 0, "recompute-all", "kl")["mean"] < 0
    assert "| snapkv | 64 | evict | " in table and "| Δ NLL | KL | Δ KL |" in table


def test_long_task_on_the_tiny_model(tiny_ckpt, small_text, tmp_path):
    """--task long: decode-time eviction over 300 teacher-forced tokens (cuts every 16): recomputing every step
    over every evicted token stays the full cache (KL ~0 in every block) while eviction does not, the kept bytes
    stay within budget + interval tokens per (layer, KV head) and the store holds the rest; the table and the
    plot are written."""
    evaluate.main(["--task", "long", "--ckpt", str(tiny_ckpt), "--text-file", str(small_text), "--context", "192",
                   "--new-tokens", "300", "--segments", "2", "--budgets", "32", "--window", "8", "--sink", "4",
                   "--interval", "16", "--methods", "snapkv,h2o", "--variants", "evict,recompute-all,calidrop",
                   "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())["long"]
    per_token = kv_bytes_per_token(read_config(tiny_ckpt), torch.float32)
    by = {(c["method"], c["variant"]): c for c in result["configs"]}
    for method in ("snapkv", "h2o"):
        assert max(max(row) for row in by[method, "recompute-all"]["kl_per_block"]) < 1e-6
        assert min(min(row) for row in by[method, "evict"]["kl_per_block"]) > 1e-3
        for variant in ("evict", "recompute-all", "calidrop"):
            c = by[method, variant]
            assert c["kv_bytes_kept"] <= (32 + 16) * per_token and c["kv_bytes_kept_peak"] == (32 + 16) * per_token
            # the last cut came before position 192 + 288 = 480: the 32 kept then, and the 12 fed since
            assert c["kept_tokens_per_head"] == 32 + 12
            if variant != "evict":  # the store holds every token not kept
                assert c["kv_bytes_offloaded"] == (192 + 300) * per_token - c["kv_bytes_kept"]
    assert (tmp_path / "long.png").is_file() and "KL per block" in (tmp_path / "results.md").read_text()
