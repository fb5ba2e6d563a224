"""generate.py as a user runs it: a subprocess on the tiny checkpoint; and the --help of every command line."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, write_checkpoint

HERE = Path(__file__).parent


def run_cli(*args):
    return subprocess.run([sys.executable, str(HERE / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=HERE)


def test_generates_and_writes_stats(tiny_ckpt, tmp_path):
    stats_file = tmp_path / "stats.json"
    prompt = "the quick brown fox jumps over the lazy dog " * 2  # 88 byte tokens
    result = run_cli("--ckpt", tiny_ckpt, "--prompt", prompt, "--budget", 24, "--window", 8, "--sink", 4,
                     "--max-new-tokens", 12, "--theta1", 2.0, "--stats-json", stats_file)
    assert result.returncode == 0, result.stderr
    stats = json.loads(stats_file.read_text())
    assert stats["prompt_tokens"] == 88 and 1 <= stats["new_tokens"] <= 12
    assert result.stdout.strip() == stats["text"].strip()  # the text streamed to stdout
    assert "decode" in result.stderr and "tokens/s" in result.stderr
    fed = stats["new_tokens"] - 1  # the last sampled token is never fed
    per_token = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * TINY["head_dim"] * 4
    assert stats["kv_bytes_full"] == (88 + fed) * per_token
    assert stats["kv_bytes_kept"] == (24 + fed) * per_token
    assert stats["kv_bytes_offloaded"] == (88 - 24) * per_token
    assert stats["decisions"] == {"calibrate": 0.0, "recompute": 1.0, "none": 0.0}  # theta1 > 1
    assert stats["compression_ratio"] == pytest.approx(stats["kv_bytes_full"] / stats["kv_bytes_kept"])


def test_full_and_compressed_greedy_agree_when_recomputing_every_step(tiny_ckpt, tmp_path):
    texts = []
    for method in ("full", "snapkv"):
        out = tmp_path / f"{method}.json"
        result = run_cli("--ckpt", tiny_ckpt, "--prompt", "abcdefghij" * 6, "--method", method, "--budget", 20,
                         "--window", 8, "--theta1", 2.0, "--max-new-tokens", 16, "--stats-json", out)
        assert result.returncode == 0, result.stderr
        texts.append(json.loads(out.read_text())["text"])
    assert texts[0] == texts[1]


def test_short_prompt_runs_uncompressed(tiny_ckpt, tmp_path):
    out = tmp_path / "s.json"
    result = run_cli("--ckpt", tiny_ckpt, "--prompt", "short", "--budget", 64, "--max-new-tokens", 3,
                     "--stats-json", out)
    assert result.returncode == 0, result.stderr
    assert "not compressed" in result.stderr
    stats = json.loads(out.read_text())
    assert not stats["compressed"] and stats["kv_bytes_kept"] == stats["kv_bytes_full"]


def test_stops_at_end_of_sequence(tmp_path):
    """A model whose output head can only prefer one of two EOS tokens stops after one token."""
    from safetensors.torch import load_file, save_file
    path = write_checkpoint(tmp_path / "eos", dict(TINY, eos_token_id=[257, 258]))
    state = load_file(str(path / "model.safetensors"))
    # the final norm keeps only channel 0; EOS 257 scores +10 x h0 and EOS 258 -10 x h0, the rest 0
    state["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])
    state["model.norm.weight"][0] = 1.0
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    state["lm_head.weight"][257, 0], state["lm_head.weight"][258, 0] = 10.0, -10.0
    save_file(state, str(path / "model.safetensors"))
    out = tmp_path / "s.json"
    result = run_cli("--ckpt", path, "--prompt", "hello", "--method", "full", "--max-new-tokens", 20,
                     "--stats-json", out)
    assert result.returncode == 0, result.stderr
    stats = json.loads(out.read_text())
    assert stats["new_tokens"] == 1 and stats["text"] == ""


BAD_INPUTS = {
    "missing directory": (["--ckpt", "{tmp}/nowhere", "--prompt", "hi"], "not found"),
    "unknown model name": (["--ckpt", "smollm2", "--prompt", "hi"],
                           "checkpoint directory not found: smollm2 (known models: smollm2-135m, qwen2.5-coder-0.5b)"),
    "missing tokenizer": (["--ckpt", "{no_tok}", "--prompt", "hi"], "tokenizer.json"),
    "not a llama": (["--ckpt", "{gpt2}", "--prompt", "hi"], "not a Llama-family decoder"),
    "prompt too long": (["--ckpt", "{ckpt}", "--prompt", "x" * 600], "longer than the model's context"),
    "unknown method": (["--ckpt", "{ckpt}", "--prompt", "hi", "--method", "magic"], "unknown method"),
    "unknown dtype": (["--ckpt", "{ckpt}", "--prompt", "hi", "--dtype", "int3"], "unknown dtype"),
    "empty prompt": (["--ckpt", "{ckpt}", "--prompt", "  "], "empty"),
    "missing prompt file": (["--ckpt", "{ckpt}", "--prompt-file", "{tmp}/none.txt"], "not found"),
    "budget within window": (["--ckpt", "{ckpt}", "--prompt", "hi", "--budget", "32"], "--budget > --window"),
    "budget within sinks": (["--ckpt", "{ckpt}", "--prompt", "hi", "--method", "streamingllm", "--budget", "16",
                             "--sink", "16"], "--budget > --sink"),
    "no observation window": (["--ckpt", "{ckpt}", "--prompt", "hi", "--window", "0"], "--window must be >= 1"),
    "negative window": (["--ckpt", "{ckpt}", "--prompt", "hi", "--window", "-4"], "--window must be >= 1"),
    "negative sinks": (["--ckpt", "{ckpt}", "--prompt", "hi", "--method", "streamingllm", "--sink", "-1"],
                       "--sink must be >= 0"),
    "no budget": (["--ckpt", "{ckpt}", "--prompt", "hi", "--method", "h2o", "--budget", "0"], "--budget must be >= 1"),
    "thresholds crossed": (["--ckpt", "{ckpt}", "--prompt", "hi", "--theta1", "0.9", "--theta2", "0.5"],
                           "--theta1 < --theta2"),
    "no new tokens": (["--ckpt", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    "negative calibration size": (["--ckpt", "{ckpt}", "--prompt", "hi", "--calibration-size", "-1"],
                                  "--calibration-size must be"),
    "top-k below 1": (["--ckpt", "{ckpt}", "--prompt", "hi", "--top-k", "-2", "--temperature", "1"], "--top-k must be"),
    "truncated weights": (["--ckpt", "{truncated}", "--prompt", "hi", "--method", "full"], "unreadable weight file"),
}
if not torch.cuda.is_available():
    BAD_INPUTS["cuda without cuda"] = (["--ckpt", "{ckpt}", "--prompt", "hi", "--device", "cuda"], "CUDA")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, tiny_ckpt, truncated_ckpt, tmp_path):
    no_tok = write_checkpoint(tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    gpt2 = write_checkpoint(tmp_path / "gpt2", dict(TINY, architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    args, message = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path, ckpt=tiny_ckpt, no_tok=no_tok, gpt2=gpt2, truncated=truncated_ckpt) for a in args]
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, quantization", [
    ([], {}),
    (["--method", "full", "--kv-quant", "kivi"], {"kv_quant": "kivi", "kv_bits": 2}),
    (["--offload-quant", "int8"], {"offload_quant": "int8"}),
    (["--offload-quant", "ott", "--kv-bits", "4"], {"offload_quant": "ott", "kv_bits": 4}),
])
def test_stats_carry_quantization_settings_only_when_quantizing(flags, quantization, tiny_ckpt, tmp_path):
    out = tmp_path / "stats.json"
    result = run_cli("--ckpt", tiny_ckpt, "--prompt", "the quick brown fox jumps over the lazy dog " * 2,
                     "--budget", 24, "--window", 8, "--sink", 4, "--max-new-tokens", 3, *flags, "--stats-json", out)
    assert result.returncode == 0, result.stderr
    stats = json.loads(out.read_text())
    assert {k: stats[k] for k in ("kv_quant", "kv_bits", "offload_quant") if k in stats} == quantization


@pytest.mark.parametrize("script, flag", [
    ("generate.py", "--budget BUDGET prompt tokens kept per layer and KV head (default: 256)"),
    ("examples/transformers_generate.py", "--budget BUDGET prompt tokens kept per layer and KV head (default: 256)"),
    ("bench.py", "--budget BUDGET prompt tokens kept per layer and KV head (default: 256)"),
    ("evaluate.py", "--window WINDOW SnapKV observation window (default: 32)"),
])
def test_help_shows_the_defaults(script, flag):
    """--help gives each flag's default once, after its help, and nothing for the flags with none (None, False, [])."""
    result = subprocess.run([sys.executable, str(HERE / script), "--help"], capture_output=True, text=True,
                            timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # as argparse wraps it at any width
    assert flag in text
    assert "--reload-pages RELOAD_PAGES" in text and text.count("(default: auto)") == 2  # with --device's
    for noise in ("(default: None)", "(default: False)", "(default: [])"):
        assert noise not in text, noise
    assert not re.search(r"\(default[^)]*\) \(default", text)  # a hand-written default and argparse's


def test_several_prompts_are_one_padded_batch(tiny_ckpt, tmp_path):
    """Three prompts of different lengths (one within the budget) in one left-padded batch: each sequence's
    text, new tokens, decisions and byte counts are those of its prompt alone."""
    prompts = ["the quick brown fox jumps over the lazy dog " * 2, "judge my vow", "pack my box with five dozen liquor jugs"]
    flags = ["--budget", 24, "--window", 8, "--theta1", 0.3, "--theta2", 0.6, "--max-new-tokens", 8,
             "--page-size", 4, "--reload-pages", 2]
    batch_file = tmp_path / "batch.json"
    result = run_cli("--ckpt", tiny_ckpt, *[x for p in prompts for x in ("--prompt", p)], *flags,
                     "--stats-json", batch_file)
    assert result.returncode == 0, result.stderr
    batch = json.loads(batch_file.read_text())
    assert batch["batch"] == 3 and batch["compressed"]
    for prompt, seq in zip(prompts, batch["sequences"]):
        lone_file = tmp_path / "lone.json"
        result = run_cli("--ckpt", tiny_ckpt, "--prompt", prompt, *flags, "--stats-json", lone_file)
        assert result.returncode == 0, result.stderr
        lone = json.loads(lone_file.read_text())
        assert (seq["prompt_tokens"], seq["text"]) == (lone["prompt_tokens"], lone["text"])
        assert seq["new_tokens"] == lone["new_tokens"]
        if not lone["compressed"]:  # 12 tokens: alone, a full cache
            continue
        for key in ("kv_bytes_kept", "kv_bytes_offloaded", "decisions"):
            assert seq[key] == lone[key], key
