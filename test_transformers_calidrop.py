"""examples/transformers_calidrop.py: calidrop.py inside transformers models, against generate.py's path on the
default model and against transformers' own generate."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import calidrop  # noqa: E402
import calidrop_pages  # noqa: E402
from common import TextCodec, kjv_text, resolve_checkpoint  # noqa: E402
from conftest import TINY, write_checkpoint  # noqa: E402
from model import FullCache, ModelArgs, decode_one_token, load_model, prefill, rope_inv_freq  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "examples"))
import transformers_calidrop as tc  # noqa: E402
import transformers_generate  # noqa: E402

N_NEW = 32
# the default page-sparse recompute: 512 - 64 = 448 evicted tokens per KV head are 28 pages of 16, of which a
# recompute reads 12
# 12 ranked pages: "auto" would read all 448 evicted tokens at this length (cheaper than ranking them)
CONFIGS = {f"{method}-{variant}": calidrop.CaliDropConfig(method=method, budget=64, calibration=variant == "calidrop",
                                                          reload_pages=12)
           for method in ("snapkv", "h2o", "streamingllm") for variant in ("calidrop", "evict")}


@pytest.fixture(scope="module")
def smol():
    """The default model as model.py loads it and as transformers loads it with calidrop attention, and 512
    tokens of KJV text (8 times the budget)."""
    transformers.logging.set_verbosity_error()
    ckpt = resolve_checkpoint(None)
    ids = TextCodec(ckpt).tokenizer.encode(kjv_text()[200_000:203_000], add_special_tokens=False).ids[:512]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation="calidrop").eval()
    return ckpt, torch.tensor([ids]), load_model(ckpt), hf


def greedy(step, tokens, logits, cache, n_new=N_NEW):
    """The prefill's next token, then n_new - 1 decode steps through `cache`: (B, n_new)."""
    new = [logits.argmax(-1, keepdim=True)]
    for i in range(n_new - 1):
        new.append(step(new[-1], torch.tensor([tokens.shape[1] + i]), cache).argmax(-1, keepdim=True))
    return torch.cat(new, 1)


def run_configs(prefill_into, step, tokens):
    """One recorded prefill, then every config compressed from it and decoded: what prefill_and_compress does
    per config, with the prefill shared (from_prefill leaves the keys, values and recorder as they were).
    Returns {name: (new tokens (1, N_NEW), cache)}."""
    (keys, values), logits, recorder, inv_freq = prefill_into(tokens.shape[1])
    runs = {}
    for name, config in CONFIGS.items():
        cache = calidrop.CaliDropCache.from_prefill(config, keys, values, recorder, N_NEW, inv_freq=inv_freq)
        runs[name] = greedy(step, tokens, logits, cache), cache
    return runs


def test_compressed_greedy_tokens_and_decisions_equal_generate_py(smol, one_thread):
    """SnapKV, H2O and StreamingLLM at budget 64, with CaliDrop (0.7 / 0.85) and without: transformers' Llama
    through the adapter gives model.py's 32 greedy tokens and every per-(layer, sequence, head) count of
    calibrate / recompute / none, of reloads and of evicted tokens read back, with the pages chosen by the
    sketch of the keys un-rotated by transformers' RoPE frequencies: 12 of 28 pages per reload."""
    _, tokens, model, hf = smol

    def ours(length):
        full = FullCache(model.args, 1, length)
        recorder = calidrop.PrefillRecorder(full, 32, h2o=True)
        return (full.k, full.v), prefill(model, tokens, recorder), recorder, model.inv_freq

    def theirs(length):
        full = tc.KVCache(length)
        recorder = calidrop.PrefillRecorder(full, 32, h2o=True)
        logits = tc.next_logits(hf, tokens, torch.arange(length), recorder)
        keys, values = full.keys_values()
        return (keys, values), logits, recorder, tc.rope_inv_freq(hf, keys[0].shape[-1])

    with torch.inference_mode():
        expected = run_configs(ours, lambda t, p, c: decode_one_token(model, t, p, c), tokens)
        got = run_configs(theirs, lambda t, p, c: tc.next_logits(hf, t, p, c), tokens)
    for name, (want, reference) in expected.items():
        have, cache = got[name]
        assert torch.equal(have, want), name
        assert torch.equal(cache.counts, reference.counts), name
        assert torch.equal(cache.reloads, reference.reloads), name
        assert torch.equal(cache.reload_tokens, reference.reload_tokens), name
        if CONFIGS[name].calibration:  # both cases happen, and every reload reads 12 pages of 16 of the 448
            assert cache.counts[..., 0].sum() > 0 and cache.counts[..., 1].sum() > 0, name
            assert all(layer.pages is not None and layer.evicted_len == 448 for layer in cache.layers), name
            assert cache.reloads.sum() > 0 and torch.equal(cache.reload_tokens, 12 * 16 * cache.reloads), name


def test_full_cache_equals_transformers_generate(smol, one_thread):
    ckpt, tokens, _, hf = smol
    tokens = tokens[:, :128]
    oracle = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()  # sdpa and its dynamic cache
    with torch.inference_mode():
        expected = oracle.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=N_NEW,
                                   min_new_tokens=N_NEW, do_sample=False)[:, tokens.shape[1]:]
    got, cache = tc.generate(hf, tokens, None, N_NEW)
    assert isinstance(cache, tc.KVCache)
    assert torch.equal(got, expected)


# ------------------------------------------------------------- other architectures, saved by transformers

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2)


def save_random(arch, path, **overrides):
    """A random `arch` (Qwen2, Mistral, Qwen3, Phi3, Gemma2) causal LM, saved by transformers."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**{**SMALL, **overrides})
    getattr(transformers, f"{arch}ForCausalLM")(config).save_pretrained(path)
    return path


ROPES = {"default": {},
         "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64),
         "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128)}  # attention factor 1.14


@pytest.mark.parametrize("rope", ROPES)
def test_rope_frequencies_undo_the_models_rotation(rope):
    """Un-rotating the keys a Llama recorded with rope_inv_freq gives its pre-RoPE keys (k_proj's output) times
    the attention factor, whatever the scaling; llama3's frequencies are model.py's."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, rope_parameters=dict(rope_theta=500000.0, **ROPES[rope]))
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("calidrop")
    recorded = {}
    model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, inputs, out: recorded.update(pre=out))
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 100), generator=torch.Generator().manual_seed(4))
    full = tc.KVCache(100)
    with torch.inference_mode():
        tc.next_logits(model, tokens, torch.arange(100), full)
    inv_freq = tc.rope_inv_freq(model, SMALL["head_dim"])
    keys = full.keys_values()[0][1]  # (1, Hkv, 100, D)
    pre = recorded["pre"].view(1, 100, SMALL["num_key_value_heads"], SMALL["head_dim"]).transpose(1, 2)
    unrotated = calidrop_pages.rotate(keys, torch.arange(100).expand(keys.shape[:3]), inv_freq, inverse=True)
    factor = model.model.rotary_emb.attention_scaling
    assert (factor == 1) == (rope != "yarn")
    torch.testing.assert_close(unrotated, factor * pre, rtol=0, atol=1e-5)
    if rope == "llama3":
        args = ModelArgs.from_config(dict(config.to_dict(), architectures=["LlamaForCausalLM"]))
        torch.testing.assert_close(inv_freq, rope_inv_freq(args), rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral", "Qwen3"])
@pytest.mark.parametrize("method", ["snapkv", "h2o", "streamingllm"])
def test_recompute_every_step_equals_full_generation(tmp_path, arch, method, one_thread):
    """theta1 > 1 recomputes every head at every step: exact attention over kept + evicted tokens, so the greedy
    tokens are those of the model's own generate, for two sequences of 80 tokens compressed to 24 (the 56
    evicted fit in the 12 pages a recompute reads)."""
    path = save_random(arch, tmp_path / arch)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="calidrop").eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = oracle.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=24,
                                   min_new_tokens=24, do_sample=False, pad_token_id=0)[:, 80:]
    config = calidrop.CaliDropConfig(method=method, budget=24, window=8, sink=4, theta1=2.0)
    got, cache = tc.generate(model, tokens, config, 24)
    assert isinstance(cache, calidrop.CaliDropCache) and cache.decisions()["recompute"] == 1.0
    assert torch.equal(got, expected)


def test_partial_rope_needs_every_page(tmp_path, one_thread):
    """Phi-3 with RoPE over half of each head: no frequencies to rank pages with, so 12 ranked pages are
    refused; theta1 > 1 reads every page whatever reload_pages says, and is exact again."""
    path = save_random("Phi3", tmp_path / "p", partial_rotary_factor=0.5, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="calidrop").eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(3))
    config = calidrop.CaliDropConfig(method="snapkv", budget=24, window=8, reload_pages=12)  # 276 evicted: 18 pages
    with pytest.raises(ValueError, match="no RoPE over all 16 head dimensions"):
        tc.generate(model, tokens, config, 8)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        expected = oracle.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False, pad_token_id=0)[:, 300:]
    config.theta1 = 2.0
    got, _ = tc.generate(model, tokens, config, 8)
    assert torch.equal(got, expected)


def test_generation_stops_once_every_sequence_has_a_stop_token(tmp_path, one_thread):
    model = transformers.AutoModelForCausalLM.from_pretrained(save_random("Qwen2", tmp_path / "q"),
                                                              attn_implementation="calidrop").eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    unstopped, _ = tc.generate(model, tokens, None, 24)
    stop_ids = [int(unstopped[0, 5]), int(unstopped[1, 9])]
    last = max(min(j for j in range(24) if int(row[j]) in stop_ids) for row in unstopped)
    stopped, cache = tc.generate(model, tokens, None, 24, stop_ids=stop_ids)
    assert last <= 9 and torch.equal(stopped, unstopped[:, :last + 1])


def test_unsupported_models_are_refused(tmp_path):
    path = save_random("Mistral", tmp_path / "m", sliding_window=64)
    tokens = torch.zeros(1, 80, dtype=torch.long)
    sdpa = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with pytest.raises(ValueError, match='attn_implementation="calidrop"'):
        tc.generate(sdpa, tokens, None, 4)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="calidrop").eval()
    with pytest.raises(ValueError, match="sliding-window attention"):
        tc.generate(model, tokens, None, 4)
    with pytest.raises(ValueError, match="calidrop_cache"):
        model(tokens)
    gemma = transformers.AutoModelForCausalLM.from_pretrained(  # attention logits soft-capped at 50
        save_random("Gemma2", tmp_path / "g", query_pre_attn_scalar=SMALL["head_dim"]),
        attn_implementation="calidrop").eval()
    with pytest.raises(ValueError, match="soft-capped"):
        tc.generate(gemma, tokens, None, 4)
    with pytest.raises(ValueError, match="1/sqrt"):  # Gemma 2 scales by query_pre_attn_scalar
        tc.generate(transformers.AutoModelForCausalLM.from_pretrained(
            save_random("Gemma2", tmp_path / "g2", query_pre_attn_scalar=4 * SMALL["head_dim"]),
            attn_implementation="calidrop").eval(), tokens, None, 4)


# ------------------------------------------------------------------ transformers' own generate() through the cache

def load_pair(arch, path):
    """A random `arch` saved by transformers, loaded with its sdpa attention (the oracle) and with calidrop's."""
    path = save_random(arch, path)
    return (transformers.AutoModelForCausalLM.from_pretrained(path).eval(),
            transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="calidrop").eval())


def hf_generate(model, tokens, cache=None, attention_mask=None, **kwargs):
    """model.generate(): the new tokens (B, N), pad_token_id 0 after a sequence stops; attention_mask None: ones
    (prompts of one length)."""
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    with torch.inference_mode():
        out = model.generate(tokens, attention_mask=mask, cache=cache, pad_token_id=0, **kwargs)
    return out[:, tokens.shape[1]:]


@pytest.mark.parametrize("arch, method", [("Llama", "snapkv"), ("Mistral", "h2o"), ("Qwen2", "streamingllm")])
def test_generate_recompute_every_step_equals_full_cache_generate(tmp_path, arch, method, one_thread):
    """theta1 > 1 recomputes every head at every step over every evicted token: model.generate() through the
    cache gives the tokens of the model's own generate() with its full cache, greedy and sampled (temperature,
    top-k, top-p) from the same seed; two sequences of 80 tokens compressed to 24."""
    oracle, model = load_pair(arch, tmp_path / arch)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 80), generator=torch.Generator().manual_seed(1))
    config = calidrop.CaliDropConfig(method=method, budget=24, window=8, sink=4, theta1=2.0)
    runs = []
    for settings in (dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9)):
        torch.manual_seed(5)
        expected = hf_generate(oracle, tokens, max_new_tokens=24, **settings)
        torch.manual_seed(5)
        cache = tc.GenerationCache(model, config, 24)
        got = hf_generate(model, tokens, cache, max_new_tokens=24, **settings)
        assert expected.shape[1] > 8 and torch.equal(got, expected), settings
        assert isinstance(cache.kv, calidrop.CaliDropCache) and cache.kv.decisions()["recompute"] == 1.0
        assert cache.get_seq_length() == 80 + got.shape[1] - 1  # the last new token is never fed
        runs.append(got)
    assert not torch.equal(runs[0][:, :8], runs[1][:, :8])  # the sampled tokens are not the greedy ones


def test_generate_without_compression_equals_full_cache_generate(tmp_path, one_thread):
    """config None, and a prompt within the budget: the cache stays calidrop's full KVCache, and generate()
    gives the model's own tokens."""
    oracle, model = load_pair("Qwen2", tmp_path / "q")
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(4))
    expected = hf_generate(oracle, tokens, max_new_tokens=16)
    for config in (None, calidrop.CaliDropConfig(budget=64, window=8)):
        cache = tc.GenerationCache(model, config, 16)
        assert torch.equal(hf_generate(model, tokens, cache, max_new_tokens=16), expected)
        assert isinstance(cache.kv, tc.KVCache) and cache.recorder is None

@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2"])
def test_generate_equals_the_adapters_loop(tmp_path, arch, one_thread):
    """CaliDropConfig's defaults (SnapKV, calibrate / recompute at 0.85 / 0.7, pages read as "auto" chooses)
    at budget 48 on two prompts of 200 tokens: model.generate() gives the adapter's greedy loop's tokens, and
    its cache every per-(layer, sequence, head) decision count, reload and evicted token read."""
    _, model = load_pair(arch, tmp_path / arch)
    model.generation_config.eos_token_id = None  # the loop stops only on stop_ids
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 200), generator=torch.Generator().manual_seed(7))
    config = calidrop.CaliDropConfig(budget=48)
    want, reference = tc.generate(model, tokens, config, 24)
    cache = tc.GenerationCache(model, config, 24)
    got = hf_generate(model, tokens, cache, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, want)
    assert torch.equal(cache.kv.counts, reference.counts)
    assert torch.equal(cache.kv.reloads, reference.reloads)
    assert torch.equal(cache.kv.reload_tokens, reference.reload_tokens)
    assert cache.kv.counts[..., 0].sum() > 0 and cache.kv.counts[..., 1].sum() > 0  # both cases happen
    assert all(layer.evicted_len == 152 for layer in cache.kv.layers)


PADDED_LENGTHS = (60, 45, 20)  # the last fits in the budget (24): nothing of it is evicted
PADDED_CONFIGS = {
    "full cache": None,
    "snapkv dense": calidrop.CaliDropConfig(method="snapkv", budget=24, window=8, theta1=0.3, theta2=0.6,
                                            reload_pages=None),
    "h2o pages": calidrop.CaliDropConfig(method="h2o", budget=24, window=8, theta1=0.3, theta2=0.6,
                                         reload_pages=2, page_size=4),  # 2 of the 9 or 6 evicted pages
}


def left_padded(prompts):
    """[(L_b,)] -> tokens (B, max L) left-padded with token 0, the attention mask (B, max L), pads (B,)."""
    L = max(len(p) for p in prompts)
    pads = torch.tensor([L - len(p) for p in prompts])
    mask = (torch.arange(L) >= pads[:, None]).long()
    return torch.stack([torch.cat([torch.zeros(L - len(p), dtype=torch.long), p]) for p in prompts]), mask, pads


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2"])
def test_generate_padded_rows_equal_lone_runs(tmp_path, arch, one_thread):
    """A left-padded batch of prompts of 60, 45 and 20 tokens through model.generate(), greedy: each row's 12
    new tokens are its prompt's alone, with the full cache, SnapKV (dense recompute) and H2O (2 ranked pages
    per recompute) at budget 24; and each compressed row has its lone run's decision, reload and read-back
    counts and byte counts (kept, full, offloaded, reloaded per token). The 20-token row fits in the budget:
    alone it is never compressed, in the batch it keeps all its tokens and evicts only pads. The adapter's
    loop with pads gives the same tokens and counts."""
    _, model = load_pair(arch, tmp_path / arch)
    model.generation_config.eos_token_id = None  # every row makes its 12 tokens
    prompts = [torch.randint(1, SMALL["vocab_size"], (n,), generator=torch.Generator().manual_seed(n))
               for n in PADDED_LENGTHS]
    tokens, mask, pads = left_padded(prompts)
    n_tokens = tokens.shape[1] + 11  # the last new token is never fed
    for name, config in PADDED_CONFIGS.items():
        batch = tc.GenerationCache(model, config, 12)
        got = hf_generate(model, tokens, batch, mask, max_new_tokens=12, do_sample=False)
        assert got.shape == (3, 12) and torch.equal(batch.pads, pads), name
        loop, reference = tc.generate(model, tokens, config, 12, pads=pads)
        assert torch.equal(got, loop), name
        for b, prompt in enumerate(prompts):
            lone = tc.GenerationCache(model, config, 12)
            assert torch.equal(got[b], hf_generate(model, prompt[None], lone, max_new_tokens=12)[0]), (name, b)
            if config is None:
                continue
            mine, n_lone = batch.kv.stats(n_tokens, slice(b, b + 1)), len(prompt) + 11
            if isinstance(lone.kv, tc.KVCache):  # within the budget: every token kept, none offloaded
                assert b == 2 and all(int(layer.evicted_lens[b]) == 0 for layer in batch.kv.layers), name
                assert mine["kv_bytes_kept"] == mine["kv_bytes_full"] == lone.kv.kv_bytes(n_lone), name
                assert mine["kv_bytes_offloaded"] == mine["reload_bytes_per_token"] == 0, name
                continue
            assert torch.equal(batch.kv.counts[:, b], lone.kv.counts[:, 0]), (name, b)
            assert torch.equal(batch.kv.reloads[:, b], lone.kv.reloads[:, 0]), (name, b)
            assert torch.equal(batch.kv.reload_tokens[:, b], lone.kv.reload_tokens[:, 0]), (name, b)
            alone = lone.kv.stats(n_lone)
            for key in ("kv_bytes_kept", "kv_bytes_full", "kv_bytes_offloaded", "reload_bytes_per_token",
                        "reload_fraction", "decisions"):
                assert mine[key] == alone[key], (name, b, key)
        if config is not None:
            assert torch.equal(batch.kv.counts, reference.counts), name
            assert torch.equal(batch.kv.reload_tokens, reference.reload_tokens), name
            counts = batch.kv.counts[:, :2].sum((0, 1, 2))  # the compressed rows: both cases happen
            assert counts[0] > 0 and counts[1] > 0, name
            if config.reload_pages is not None:  # ranked: each recompute reads 2 pages of 4 (the 45-token row's
                # last page of its 21 evicted tokens holds 1)
                assert all(layer.pages.pages == 2 for layer in batch.kv.layers) and batch.kv.reloads.sum() > 0, name
                assert torch.equal(batch.kv.reload_tokens[:, 0], 8 * batch.kv.reloads[:, 0]), name
                assert (batch.kv.reload_tokens[:, 1] <= 8 * batch.kv.reloads[:, 1]).all(), name


def test_generate_padded_batch_samples_as_transformers_does(tmp_path, one_thread):
    """Sampling (temperature 0.7, top-k 40, top-p 0.9) a left-padded batch from one seed: the model's own
    full-cache generate()'s tokens, through the full cache and through SnapKV at budget 24 with recompute at
    every step (theta1 > 1, exact). A row is not compared with its prompt sampled alone: the batch's rows
    draw from one random stream, so a row's draws depend on the batch."""
    oracle, model = load_pair("Qwen2", tmp_path / "q")
    prompts = [torch.randint(1, SMALL["vocab_size"], (n,), generator=torch.Generator().manual_seed(n))
               for n in PADDED_LENGTHS]
    tokens, mask, _ = left_padded(prompts)
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=0.7, top_k=40, top_p=0.9)
    torch.manual_seed(5)
    expected = hf_generate(oracle, tokens, None, mask, **settings)
    greedy = hf_generate(oracle, tokens, None, mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert not torch.equal(expected, greedy)  # really sampled
    for config in (None, calidrop.CaliDropConfig(method="snapkv", budget=24, window=8, theta1=2.0)):
        torch.manual_seed(5)
        assert torch.equal(hf_generate(model, tokens, tc.GenerationCache(model, config, 12), mask, **settings),
                           expected), config


class Recorder(transformers.generation.BaseStreamer):
    """Every put() and the number of end() calls."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


class StopOn(transformers.StoppingCriteria):
    """Stops each sequence once it has produced `token`."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_generate_streams_and_stops_as_transformers_does(tmp_path, one_thread):
    """A streamer gets the prompt, then each new token once, then one end(); an eos_token_id and a
    StoppingCriteria each stop one of two sequences at their own step, and generation ends once both are
    done, padding the first: the full-cache generate()'s tokens, with the cache's exact config."""
    oracle, model = load_pair("Qwen2", tmp_path / "q")
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 60), generator=torch.Generator().manual_seed(2))
    config = calidrop.CaliDropConfig(budget=24, window=8, theta1=2.0)
    unstopped = hf_generate(model, tokens, tc.GenerationCache(model, config, 24), max_new_tokens=24)
    eos, stop = int(unstopped[0, 4]), int(unstopped[1, 9])
    first = [min(j for j in range(24) if int(row[j]) in (eos, stop)) for row in unstopped]
    stops = dict(max_new_tokens=24, eos_token_id=eos,
                 stopping_criteria=transformers.StoppingCriteriaList([StopOn(stop)]))
    expected = hf_generate(oracle, tokens, **stops)
    streamer = Recorder()
    got = hf_generate(model, tokens, tc.GenerationCache(model, config, 24), streamer=streamer, **stops)
    assert torch.equal(got, expected) and got.shape[1] == max(first) + 1 < 24
    assert torch.equal(got[:, :min(first) + 1], unstopped[:, :min(first) + 1])
    assert torch.equal(streamer.puts[0], tokens) and streamer.ends == 1
    assert torch.equal(torch.stack([p.view(-1) for p in streamer.puts[1:]], 1), got)


def test_generate_refuses_what_the_cache_cannot_serve(tmp_path, one_thread):
    """One ValueError each: a model without calidrop attention, a mask that is not left padding (right
    padding, a hole, a hole after the first token, which position_ids alone would take for left padding, an
    empty row), beam search, a second generate() on a used cache, and calidrop attention without the cache."""
    oracle, model = load_pair("Llama", tmp_path / "l")
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3))
    config = calidrop.CaliDropConfig(budget=24, window=8)
    with pytest.raises(ValueError, match='attn_implementation="calidrop"'):
        tc.GenerationCache(oracle, config, 8)
    for zeros in ([39], [38, 39], [20], [1], range(40)):  # right, right, a hole, after the first token, all
        mask = torch.ones_like(tokens)
        mask[0, list(zeros)] = 0
        with pytest.raises(ValueError, match="only left padding is supported"):
            hf_generate(model, tokens, tc.GenerationCache(model, config, 8), mask, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"beam search \(num_beams > 1\) is not supported"):
        hf_generate(model, tokens, tc.GenerationCache(model, config, 8), max_new_tokens=8, num_beams=2)
    cache = tc.GenerationCache(model, config, 8)
    hf_generate(model, tokens, cache, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"serves one generate\(\) call"):
        hf_generate(model, tokens, cache, max_new_tokens=8)
    with pytest.raises(ValueError, match="needs a CaliDrop cache"):
        hf_generate(model, tokens, max_new_tokens=8)


def test_generation_cache_makes_room_as_tokens_come(tmp_path, one_thread):
    """generate() tells a cache it is handed nothing of its max_new_tokens: a GenerationCache that made room
    for 3 new tokens (or the default) grows, and gives the tokens, decisions and reads of one made with room
    for all 20, for the full cache, recompute at every step, and the default rule (the growth copies the kept
    buffers: the slots, the masks of a left-padded batch and the history carry over)."""
    oracle, model = load_pair("Llama", tmp_path / "l")
    prompts = [torch.randint(0, SMALL["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)) for n in (70, 50)]
    tokens, mask, _ = left_padded(prompts)
    for config in (None, calidrop.CaliDropConfig(budget=24, window=8, theta1=2.0),
                   calidrop.CaliDropConfig(budget=24, window=8, theta1=0.3, theta2=0.6)):
        runs = []
        for room in (20, 3, None):
            cache = tc.GenerationCache(model, config) if room is None else tc.GenerationCache(model, config, room)
            runs.append((hf_generate(model, tokens, cache, mask, max_new_tokens=20, eos_token_id=None), cache.kv))
        (want, reference), grown = runs[0], runs[1:]
        assert want.shape[1] == 20
        if config is None or config.exact:
            assert torch.equal(want, hf_generate(oracle, tokens, attention_mask=mask, max_new_tokens=20, eos_token_id=None))
        for got, kv in grown:
            assert torch.equal(got, want)
            if config is not None:
                assert torch.equal(kv.counts, reference.counts) and torch.equal(kv.reload_tokens, reference.reload_tokens)
    assert grown[0][1].layers[0].k.shape[2] >= 24 + 19 > 24 + 3  # it really grew


def test_generate_with_decode_time_eviction(tmp_path, one_thread):
    """config.interval through model.generate(): recomputing every step over every evicted token, the model's own
    full-cache tokens over 40 new tokens (4 cuts every 8), its kept cache within budget + interval tokens; more
    new tokens than the store was sized for is one ValueError."""
    oracle, model = load_pair("Llama", tmp_path / "l")
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 50), generator=torch.Generator().manual_seed(6))
    config = calidrop.CaliDropConfig(budget=24, window=8, theta1=2.0, interval=8)
    expected = hf_generate(oracle, tokens, max_new_tokens=40, eos_token_id=None)
    cache = tc.GenerationCache(model, config, 40)
    assert torch.equal(hf_generate(model, tokens, cache, max_new_tokens=40, eos_token_id=None), expected)
    assert all(s.cut_pos == 50 + 32 and s.k.shape[2] == 24 + 8 for s in cache.kv.layers)
    per_token = 2 * SMALL["num_hidden_layers"] * SMALL["num_key_value_heads"] * SMALL["head_dim"] * 4
    assert cache.kv.stats(50 + 39)["kv_bytes_kept"] == 2 * (24 + 7) * per_token
    with pytest.raises(ValueError, match="max_new_tokens=8 evicted tokens"):
        hf_generate(model, tokens, tc.GenerationCache(model, config, 8), max_new_tokens=12, eos_token_id=None)


# ------------------------------------------------------------------------------------------------- the CLI

def run_cli(script, *args):
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=HERE)


def test_cli_stats_equal_generate_py(tiny_ckpt, tmp_path):
    """The same flags through both CLIs on the tiny Llama: the same text and the same stats, timings aside. The 64
    evicted tokens are 8 pages of 8, of which a recompute reads 2."""
    stats = []
    for script in ("examples/transformers_generate.py", "generate.py"):
        out = tmp_path / f"{Path(script).stem}.json"
        result = run_cli(script, "--ckpt", tiny_ckpt, "--prompt", "the quick brown fox jumps over the lazy dog " * 2,
                         "--method", "h2o", "--budget", 24, "--window", 8, "--max-new-tokens", 12,
                         "--reload-pages", 2, "--page-size", 8, "--stats-json", out)
        assert result.returncode == 0, result.stderr
        assert "decisions: calibrate" in result.stderr
        stats.append(json.loads(out.read_text()))
        assert result.stdout.strip() == stats[-1]["text"].strip()
    for s in stats:
        for timing in ("prefill_s", "compile_s", "decode_s", "decode_tokens_per_s", "bandwidth_gb_s"):
            s.pop(timing)
    assert stats[0] == stats[1]
    assert stats[0]["compressed"] and stats[0]["prompt_tokens"] == 88
    assert stats[0]["kv_bytes_selection"] > 0 and stats[0]["reload_fraction"] > 0  # pages were ranked and read


def test_cli_several_prompts_equal_generate_py(tiny_ckpt, tmp_path):
    """Three prompts of different lengths (one within the budget) through both CLIs: one left-padded batch
    each, the same texts and the same batch and per-sequence stats (byte counts, decisions), timings aside."""
    prompts = ["the quick brown fox jumps over the lazy dog " * 2, "judge my vow", "pack my box with five dozen liquor jugs"]
    stats = []
    for script in ("examples/transformers_generate.py", "generate.py"):
        out = tmp_path / f"{Path(script).stem}.json"
        result = run_cli(script, "--ckpt", tiny_ckpt, *[x for p in prompts for x in ("--prompt", p)], "--budget", 24,
                         "--window", 8, "--theta1", 0.3, "--theta2", 0.6, "--max-new-tokens", 8, "--page-size", 4,
                         "--reload-pages", 2, "--stats-json", out)
        assert result.returncode == 0, result.stderr
        stats.append(json.loads(out.read_text()))
        for timing in ("prefill_s", "compile_s", "decode_s", "decode_tokens_per_s"):
            stats[-1].pop(timing)
    assert stats[0] == stats[1]
    assert stats[0]["batch"] == 3 and stats[0]["compressed"]
    assert [s["prompt_tokens"] for s in stats[0]["sequences"]] == [88, 12, 39]


BAD_INPUTS = {  # test_cli.py's cases, for this CLI
    "missing directory": (["--ckpt", "{tmp}/nowhere", "--prompt", "hi"], "not found"),
    "unknown model name": (["--ckpt", "smollm2", "--prompt", "hi"],
                           "checkpoint directory not found: smollm2 (known models: smollm2-135m, qwen2.5-coder-0.5b)"),
    "missing tokenizer": (["--ckpt", "{no_tok}", "--prompt", "hi"], "tokenizer.json"),
    "not a transformers model": (["--ckpt", "{unknown}", "--prompt", "hi"], "bad config.json"),
    "sliding window": (["--ckpt", "{sliding}", "--prompt", "hi", "--method", "full", "--max-new-tokens", "20"],
                       "sliding-window attention"),
    "prompt too long": (["--ckpt", "{ckpt}", "--prompt", "x" * 600], "longer than the model's context"),
    "unknown method": (["--ckpt", "{ckpt}", "--prompt", "hi", "--method", "magic"], "unknown method"),
    "unknown dtype": (["--ckpt", "{ckpt}", "--prompt", "hi", "--dtype", "int3"], "unknown dtype"),
    "empty prompt": (["--ckpt", "{ckpt}", "--prompt", "  "], "empty"),
    "missing prompt file": (["--ckpt", "{ckpt}", "--prompt-file", "{tmp}/none.txt"], "not found"),
    "budget within window": (["--ckpt", "{ckpt}", "--prompt", "hi", "--budget", "32"], "--budget > --window"),
    "budget within sinks": (["--ckpt", "{ckpt}", "--prompt", "hi", "--method", "streamingllm", "--budget", "16",
                             "--sink", "16"], "--budget > --sink"),
    "no pages": (["--ckpt", "{ckpt}", "--prompt", "hi", "--reload-pages", "0"], "--reload-pages must be >= 1"),
    "no reload capacity": (["--ckpt", "{ckpt}", "--prompt", "hi", "--reload-capacity", "0"],
                           "--reload-capacity must be >= 1"),
}
if not torch.cuda.is_available():
    BAD_INPUTS["cuda without cuda"] = (["--ckpt", "{ckpt}", "--prompt", "hi", "--device", "cuda"], "CUDA")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, tiny_ckpt, tmp_path, capsys):
    """In-process (main(), as the script calls it): a subprocess per case would spend its time importing."""
    no_tok = write_checkpoint(tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    unknown = write_checkpoint(tmp_path / "unknown", dict(TINY, architectures=["Nope"], model_type="nope"))
    sliding = write_checkpoint(tmp_path / "sliding", dict(TINY, architectures=["MistralForCausalLM"],
                                                          model_type="mistral", sliding_window=8))
    args, message = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path, ckpt=tiny_ckpt, no_tok=no_tok, unknown=unknown, sliding=sliding) for a in args]
    with pytest.raises(SystemExit) as exit_:
        transformers_generate.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_kv_cache_decode_takes_attention_output_in_any_layout(monkeypatch):
    """KVCache's decode on an attention output laid out as CUDA's float32 kernels return it, (B, T, H, D) in
    memory (issue 25: "view size is not compatible" there): the same result as from a contiguous one."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k, v = torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    outs = []
    for layout in ("contiguous", "cuda"):
        if layout == "cuda":
            sdpa = torch.nn.functional.scaled_dot_product_attention
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                                lambda *args, **kw: sdpa(*args, **kw).transpose(1, 2).contiguous().transpose(1, 2))
        cache = tc.KVCache(12)
        cache.attend(0, q[:, :, :8], k[:, :, :8], v[:, :, :8], torch.arange(8))
        outs.append(cache.attend(0, q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], torch.tensor([8])))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
