"""The real default model, SmolLM2-135M-Instruct (prepared on first use): conversion, retrieval, and what
only a working calibration gives. Qwen2.5-Coder-0.5B-Instruct's conversion too, when it is prepared
(python -m scripts.prepare_qwen2_5_coder: 491 MB to download, never in CI)."""
import math

import pytest
import torch

import calidrop
from common import TextCodec, kjv_text, resolve_checkpoint
from generate import prefill_and_compress
import ott
from model import FullCache, decode_one_token, load_model, prefill
from scripts import gguf_to_hf, prepare_qwen2_5_coder

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(scope="module")
def smol():
    ckpt = resolve_checkpoint(None)
    return load_model(ckpt), TextCodec(ckpt)


def passkey_prompt(codec, key, repeats):
    context = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. " + FILLER * repeats + f"The pass key is {key}. Remember it. "
               f"{key} is the pass key. " + FILLER * repeats)
    return codec.encode(context + "\nWhat is the pass key? Answer with the number only.", chat=True)


def greedy(model, ids, config, n_new):
    with torch.inference_mode():
        tokens = torch.tensor([ids])
        logits, cache = prefill_and_compress(model, tokens, config, n_new)
        out = [int(logits.argmax())]
        for i in range(n_new - 1):
            pos = torch.tensor([len(ids) + i])
            out.append(int(decode_one_token(model, torch.tensor([[out[-1]]]), pos, cache).argmax()))
    return out, cache


def kjv_perplexity(model, codec, n=1024):
    """Perplexity of the first n tokens of the KJV text (verses joined with one space)."""
    ids = codec.encode(kjv_text())[:n]
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(n), FullCache(model.args, 1, n))
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])))


def test_perplexity_of_a_kjv_passage(smol):
    """Measured 3.76 on the first 1,024 tokens; with llama.cpp's q/k permutation left in, 94. A bound of
    4.5 leaves room for float differences across machines and catches any broken conversion."""
    assert kjv_perplexity(*smol) < 4.5


def test_passkey_is_retrieved_with_the_full_cache(smol):
    model, codec = smol
    ids = passkey_prompt(codec, 68317, repeats=45)
    assert 1900 < len(ids) < 2300
    out, _ = greedy(model, ids, None, 12)
    assert "68317" in codec.decode(out)


def test_calidrop_snapkv_at_128_retrieves_the_passkey_and_counts_its_bytes(smol):
    """Question-aware: the question is inside the compressed prompt. With SnapKV's default 32-token
    window, 96 selected tokens of ~2,100 lose the key's last digits, calibrated or not (measured on four
    keys: "402" for 40219, "683" for 68317); a 16-token window leaves 112 and retrieves all four."""
    model, codec = smol
    ids = passkey_prompt(codec, 40219, repeats=45)
    out, cache = greedy(model, ids, calidrop.CaliDropConfig(method="snapkv", budget=128, window=16), 12)
    assert "40219" in codec.decode(out)
    a = model.args
    fed = len(out) - 1  # the last sampled token is never fed
    per_token = a.n_layers * 2 * a.n_kv_heads * a.head_dim * 4  # float32
    stats = cache.stats(len(ids) + fed)
    assert stats["kv_bytes_kept"] == (128 + fed) * per_token
    assert stats["kv_bytes_full"] == (len(ids) + fed) * per_token
    assert stats["kv_bytes_offloaded"] == (len(ids) - 128) * per_token


def follow(model, tokens, context, logits, cache):
    """Log-probs (steps, 1, vocab) of the prefill's last logits, then of each teacher-forced token after
    `context` fed through the cache."""
    out = [logits]
    for t in range(context, tokens.shape[1] - 1):
        out.append(decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache))
    return torch.stack(out).log_softmax(-1)


def mean_kl(full, logprobs):
    return float((full.exp() * (full - logprobs)).sum(-1).mean())


def continuation_kl(model, ids, context, configs):
    """Mean KL(P_full || P_config) over the teacher-forced tokens after `context`, for each config."""
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        logprobs = [follow(model, tokens, context, *prefill_and_compress(model, tokens[:, :context], config,
                                                                           len(ids) - context))
                    for config in [None, *configs]]
    return [mean_kl(logprobs[0], lp) for lp in logprobs[1:]]


def test_calibration_brings_snapkv_at_64_closer_to_the_full_cache(smol):
    """Section 10 of the spec: SnapKV at 64 on a 2k KJV context; CaliDrop's KL to the full cache is
    below eviction's, and the exact recompute of every step is the full cache itself."""
    model, codec = smol
    ids = codec.encode(kjv_text())[100_000:100_000 + 2048 + 48]
    evict, cali, exact = continuation_kl(model, ids, 2048, [
        calidrop.CaliDropConfig(method="snapkv", budget=64, calibration=False),
        calidrop.CaliDropConfig(method="snapkv", budget=64),
        calidrop.CaliDropConfig(method="snapkv", budget=64, theta1=2.0, reload_pages=None)])
    assert exact < 1e-4
    assert cali < evict


def test_ott_is_closer_to_the_full_cache_than_kivi_at_2_bits(smol):
    """OTT's claim (ott.py) on the default model: outlier tokens (3 per group and KV head, in full
    precision, kept out of the scales) lower the 2-bit cache's KL to the full cache. 1,024 KJV tokens
    of context (896 quantized at prefill) and 48 teacher-forced ones (one more quantization event)."""
    model, codec = smol
    ids = codec.encode(kjv_text())[300_000:300_000 + 1024 + 48]
    tokens, context = torch.tensor([ids]), 1024
    caches = [FullCache(model.args, 1, len(ids)), ott.QuantizedCache(model.args, 1, bits=2, outliers=0),
              ott.QuantizedCache(model.args, 1, bits=2, outliers=3)]
    with torch.inference_mode():
        full, kivi, with_outliers = (follow(model, tokens, context, prefill(model, tokens[:, :context], c), c)
                                     for c in caches)
    kl_kivi, kl_ott = mean_kl(full, kivi), mean_kl(full, with_outliers)
    assert 0 < kl_ott < kl_kivi


needs_qwen = pytest.mark.skipif(not gguf_to_hf.is_prepared(prepare_qwen2_5_coder.DEFAULT_DIR),
                                reason="Qwen2.5-Coder-0.5B-Instruct is not prepared "
                                       "(python -m scripts.prepare_qwen2_5_coder: 491 MB)")


@pytest.fixture(scope="module")
def qwen():
    ckpt = prepare_qwen2_5_coder.DEFAULT_DIR
    return load_model(ckpt), TextCodec(ckpt)


@needs_qwen
def test_qwen_perplexity_of_a_kjv_passage(qwen):
    """transformers reading the GGUF itself gives 8.669 on the first 1,024 tokens, and our conversion the
    same (logits within 4e-5: scripts/check_conversion.py); undoing llama's q/k row permutation, which
    llama.cpp applies to the llama architecture only, would give 77.6."""
    assert kjv_perplexity(*qwen) == pytest.approx(8.669, abs=0.02)


@needs_qwen
def test_qwen_chat_prompt_is_its_chat_template():
    """TextCodec's ChatML, with the default system prompt read from the GGUF, is what the model's own chat
    template (rendered by transformers) makes of one user turn."""
    codec = TextCodec(prepare_qwen2_5_coder.DEFAULT_DIR)
    transformers = pytest.importorskip("transformers")
    template = transformers.AutoTokenizer.from_pretrained(str(prepare_qwen2_5_coder.DEFAULT_DIR))
    question = "What is the capital of France?"
    assert codec.chat(question) == template.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


@needs_qwen
def test_qwen_answers_through_the_chat_format(qwen):
    model, codec = qwen
    out, _ = greedy(model, codec.encode("What is the capital of France?", chat=True), None, 8)
    assert codec.decode(out).startswith("The capital of France is Paris.")
