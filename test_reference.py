"""What a newcomer copies: calidrop.py alone (the paper's rule), with calidrop_pages.py beside it (ranked pages),
the README's transformers snippet as written, and `pip install .`. Each runs in a directory that holds only
the files it names, in its own process."""
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# Decodes a 96-token prompt of the tiny checkpoint kept to 16 tokens per KV head, with model.py loaded from the
# repository by its path (so that no other module of the repository is importable) and calidrop from the
# working directory; prints what the cache did as JSON.
DECODE = """
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("model", sys.argv[1])
model_py = importlib.util.module_from_spec(spec); spec.loader.exec_module(model_py)
import calidrop
model = model_py.load_model(sys.argv[2])
tokens = torch.randint(0, 256, (1, 112), generator=torch.Generator().manual_seed(0))
out = {"pages_module": calidrop.calidrop_pages is not None}
for name, settings in json.loads(sys.argv[3]).items():
    try:
        config = calidrop.CaliDropConfig(budget=16, window=4, **settings)
    except ValueError as e:
        out[name] = {"error": str(e)}
        continue
    full = model_py.FullCache(model.args, 1, 96)
    recorder = calidrop.PrefillRecorder(full, config.window)
    first = model_py.prefill(model, tokens[:, :96], recorder)
    cache = calidrop.CaliDropCache.from_prefill(config, full.k, full.v, recorder, 16, inv_freq=model.inv_freq)
    logits = [first] + [model_py.decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache)
                        for t in range(96, 111)]
    reference = model(tokens[:, :111], torch.arange(111), model_py.FullCache(model.args, 1, 111))[:, 95:]
    out[name] = {"error_to_full": (torch.stack(logits, 1) - reference).abs().max().item(),
                 "paged_layers": sum(s.pages is not None for s in cache.layers),
                 "tokens_read_per_reload": (cache.reload_tokens.sum() / cache.reloads.sum().clamp(min=1)).item(),
                 "recompute": cache.decisions()["recompute"]}
print(json.dumps(out))
"""
SETTINGS = {"exact": dict(theta1=2.0), "default": dict(theta1=0.3, theta2=0.6), "two pages": dict(reload_pages=2, page_size=8)}


def decode_beside(tmp_path, tiny_ckpt, files):
    for name in files:
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "decode.py").write_text(DECODE)
    run = subprocess.run([sys.executable, "decode.py", str(HERE / "model.py"), str(tiny_ckpt), json.dumps(SETTINGS)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_calidrop_py_alone_decodes_with_the_papers_rule(tmp_path, tiny_ckpt):
    """Copied alone, calidrop.py decodes: every recompute reads all 80 evicted tokens of its KV head, recomputing
    at every step is the full cache's output, and asking for ranked pages says what file that needs."""
    out = decode_beside(tmp_path, tiny_ckpt, ["calidrop.py"])
    assert not out["pages_module"]
    assert out["exact"]["error_to_full"] < 1e-4 and out["exact"]["recompute"] == 1.0
    assert out["default"]["paged_layers"] == 0 and 0 < out["default"]["recompute"] < 1
    assert out["default"]["tokens_read_per_reload"] == 80  # 96 - 16
    assert "calidrop_pages.py" in out["two pages"]["error"]
    assert out["default"]["recompute"] > 0


def test_with_calidrop_pages_py_beside_it_a_recompute_ranks_pages(tmp_path, tiny_ckpt):
    """With calidrop_pages.py beside it, reload_pages=2 reads 2 ranked pages of 8 (16 of the 80 evicted tokens);
    the exact rule is unchanged."""
    out = decode_beside(tmp_path, tiny_ckpt, ["calidrop.py", "calidrop_pages.py"])
    assert out["pages_module"]
    assert out["exact"]["error_to_full"] < 1e-4
    assert out["two pages"]["paged_layers"] == 2 and out["two pages"]["recompute"] > 0
    assert out["two pages"]["tokens_read_per_reload"] == 16


# ------------------------------------------------------------------------------- the README's snippet

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def readme_snippet():
    """The python block under the README's heading "Use it in your transformers model"."""
    readme = (HERE / "README.md").read_text()
    section = readme.split("## Use it in your transformers model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_transformers_snippet_runs_as_written(tmp_path):
    """The snippet, its checkpoint line pointed at a tiny random Llama saved by transformers (a byte-level
    tokenizer with a chat template and no pad token), run from a directory holding only the files the README
    names: it streams its answer, prints the decisions, then the batch's two answers."""
    transformers = pytest.importorskip("transformers")
    from conftest import byte_tokenizer
    snippet = readme_snippet()
    ckpt_line = re.search(r"^ckpt = .*$", snippet, re.M)
    assert ckpt_line, "the snippet defines its checkpoint on one line"
    ckpt = tmp_path / "tiny"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, eos_token_id=257)).save_pretrained(ckpt)
    transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), eos_token="</s>",
                                         chat_template=CHAT_TEMPLATE).save_pretrained(ckpt)
    work = tmp_path / "work"
    work.mkdir()
    for source, name in (("calidrop.py", "calidrop.py"), ("calidrop_pages.py", "calidrop_pages.py"),
                         ("examples/transformers_calidrop.py", "transformers_calidrop.py"),
                         ("prompts/passkey.txt", "passkey.txt")):
        shutil.copy(HERE / source, work / name)
    (work / "snippet.py").write_text(snippet.replace(ckpt_line.group(0), f"ckpt = {str(ckpt)!r}"))
    run = subprocess.run([sys.executable, "snippet.py"], cwd=work, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    decisions, answers = eval(lines[-2]), eval(lines[-1])  # noqa: S307 (our own snippet's printed dict and list)
    assert set(decisions) == {"calibrate", "recompute", "none"} and abs(sum(decisions.values()) - 1) < 1e-9
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)


# --------------------------------------------------------------------------------------- pip install .

def test_pip_install_gives_the_modules(tmp_path):
    """The wheel holds calidrop, calidrop_pages, offload_gather and the adapter as top-level modules, and
    installed into a fresh environment (torch from the one running the tests) they import from elsewhere."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(HERE)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("calidrop-*.whl"))
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("calidrop-")}
    assert names == {"calidrop.py", "calidrop_pages.py", "offload_gather.py", "transformers_calidrop.py"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    check = subprocess.run([python, "-c", "import calidrop, calidrop_pages, transformers_calidrop; "
                            "print(calidrop.__file__, calidrop.calidrop_pages is not None)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    where, pages = check.stdout.split()
    assert Path(where).is_relative_to(venv) and pages == "True"
