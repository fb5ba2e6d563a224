"""evaluate.py: bad input exits 2 in one line; a --quick run writes complete, well-formed results whose
numbers hold what the method guarantees (the full cache's KL is 0, exact recompute's is ~0, eviction's
is not). The slow test runs --quick on the real default model, as a user would."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calidrop
import evaluate
import generate
from common import kjv_text
from evaluation import variants
from evaluation.frontier import FRONTIER_QUICK, point_name
from model import load_model

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
])
def test_bad_input_exits_2_with_one_line(flags, message, tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--quick", "--ckpt", str(tiny_ckpt), *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and message in err


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_variants_as_rows_equal_each_variant_alone(tiny_ckpt, method):
    """evaluate.py selects and calibrates once per (method, budget) and decodes the variants as rows of
    shared caches: each row's log-probs, decisions and bytes equal those of the variant's own cache, built
    and decoded alone the way generate.py does."""
    model = load_model(tiny_ckpt)
    torch.manual_seed(0)
    L, n = 48, 12
    tokens = torch.randint(3, model.args.vocab_size, (2, L + n))
    args = evaluate.parse_args(["--window", "4", "--sink", "4"])
    names = ("evict", "calibrate", "recompute", "calidrop", "calidrop+int8-offload", "recompute-all")
    with torch.inference_mode():
        _, full, recorder = variants.prefill_rows(model, tokens[:, :L], n, args.window, h2o=True)
        rows, layout = variants.build_batch(args, [(method, 16, names)], full, recorder, L, n)
        batched = torch.stack(list(variants.feed(model, rows, tokens[:, L:].repeat(len(layout), 1), L)), 1)
        for _, _, variant, cache, in_cache, in_batch in layout:
            theta1, theta2 = variants.thresholds(variant, args)
            config = calidrop.CaliDropConfig(method=method, budget=16, window=4, sink=4, theta1=theta1, theta2=theta2)
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
                assert c["kv_bytes_kept"] > 0 and c["decode_s"] >= 0
                if task not in ("ppl", "attention"):
                    assert 0 <= c["accuracy"]["mean"] <= 1
                    assert len(c["correct"]) == len(part["full"]["correct"])

    ppl = results["ppl"]
    assert ppl["full"]["kl"]["mean"] == 0.0
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
    evaluate.main(["--quick", "--ckpt", str(tiny_ckpt), "--text-file", str(small_text), "--lengths", "300",
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
    """Issue 9's checks: the full point has KL 0 and the full cache's bytes; eviction at 64 loses something;
    eviction's fast bytes grow with the budget; a 2-bit offload is smaller than the plain one and reloads
    are counted only where something recomputes."""
    evaluate.main(["--task", "frontier", "--quick", "--ckpt", str(tiny_ckpt), "--text-file", str(small_text),
                   "--context", "192", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())["frontier"]
    points = {point_name(p): p for p in result["points"]}
    full = points["full"]
    assert full["kl"] == 0.0 and full["fast_bytes"] == result["full_kv_bytes"] and full["offloaded_bytes"] == 0
    evict = [points[f"snapkv {b} evict"] for b in FRONTIER_QUICK["evict_budgets"]]
    assert evict[0]["kl"] > 0
    assert all(a["fast_bytes"] < b["fast_bytes"] for a, b in zip(evict, evict[1:]))
    assert all(p["reload_bytes_per_token"] == 0 for p in evict + [points["snapkv 64 calibrate"]])
    plain, int8, two_bit = (points[f"snapkv 64 calidrop{o}"] for o in ("", "+int8-offload", "+ott-offload"))
    assert two_bit["offloaded_bytes"] < int8["offloaded_bytes"] < plain["offloaded_bytes"]
    assert plain["fast_bytes"] == int8["fast_bytes"] == two_bit["fast_bytes"]  # the offload is not fast memory
    for p in result["points"]:
        assert {"variant", "method", "budget", "fast_bytes", "offloaded_bytes", "reload_bytes_per_token",
                "kl", "kl_se", "nll", "nll_se"} <= set(p) and p["gpu_tokens_per_s"] > 0
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best variant by KL" in (tmp_path / "results.md").read_text()
