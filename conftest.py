"""Shared test fixtures and helpers: a tiny random Llama written to disk as a real checkpoint, configs that
really compress its prompts, random tokens, teacher forcing."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from tokenizers import AddedToken

import calidrop
from model import FullCache, decode_one_token, prefill

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=10000.0, rms_norm_eps=1e-5, vocab_size=260, max_position_embeddings=512,
            tie_word_embeddings=False, eos_token_id=257)


def tiny_weights(config, seed=0):
    """Random HF-named weights for a config; tied checkpoints carry no lm_head."""
    g = torch.Generator().manual_seed(seed)
    d, f, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    hq, hkv = config["num_attention_heads"], config["num_key_value_heads"]

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    state = {"model.embed_tokens.weight": w(config["vocab_size"], d), "model.norm.weight": 1 + w(d)}
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = w(config["vocab_size"], d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(hq * hd, d), p + "self_attn.k_proj.weight": w(hkv * hd, d),
            p + "self_attn.v_proj.weight": w(hkv * hd, d), p + "self_attn.o_proj.weight": w(d, hq * hd),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": 1 + w(d), p + "post_attention_layernorm.weight": 1 + w(d),
        })
    return state


def byte_tokenizer():
    """Byte-level tokenizer without merges: 256 byte tokens, then <s>, </s> and two chat markers."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")])
    return tok


def write_checkpoint(path, config=TINY, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tiny_weights(config, seed), str(path / "model.safetensors"))
    byte_tokenizer().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (on a busy 2-core machine, ~100x per step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def truncated_ckpt(tmp_path_factory):
    """The tiny checkpoint with its model.safetensors cut in half, as an interrupted copy leaves it."""
    path = write_checkpoint(tmp_path_factory.mktemp("truncated"))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return path


# ------------------------------------------------------------------------------- helpers of the tests

def random_tokens(batch, length, seed):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def cfg(method, **kw):
    """A config that really compresses a 48-token prompt: budget 16, window 4, sink 4."""
    base = dict(method=method, budget=16, window=4, sink=4)
    base.update(kw)
    return calidrop.CaliDropConfig(**base)


def teacher_force(model, cache, tokens, prompt_len):
    """Feed tokens[:, prompt_len:] one by one into a prefilled cache -> (B, n, vocab) logits."""
    steps = [decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t], device=tokens.device), cache)
             for t in range(prompt_len, tokens.shape[1])]
    return torch.stack(steps, 1)


def query_at_cosine(h, rho, g):
    """A random-norm vector whose cosine with h (D,) is exactly rho (up to rounding)."""
    u = torch.randn(h.shape, generator=g, dtype=torch.float64)
    h = h.double() / h.norm()
    u = u - (u @ h) * h
    u = u / u.norm()
    scale = 1 + torch.rand(1, generator=g, dtype=torch.float64)
    return ((rho * h + math.sqrt(1 - rho * rho) * u) * scale).float()


def build_cache(model, prompt, config, max_new_tokens, record_window=None):
    """Prefill with a recorder, then CaliDropCache.from_prefill directly (no 'fits in budget' shortcut).
    Returns (last logits, cache, the full prefill cache, the recorder)."""
    full = FullCache(model.args, prompt.shape[0], prompt.shape[1])
    recorder = calidrop.PrefillRecorder(full, record_window or config.window, h2o=config.method == "h2o")
    logits = prefill(model, prompt, recorder)
    cache = calidrop.CaliDropCache.from_prefill(config, full.k, full.v, recorder, max_new_tokens,
                                                inv_freq=model.inv_freq)
    return logits, cache, full, recorder


def kept_positions(cache_k, prompt_k, n):
    """Prompt positions of the first n kept slots, found by matching keys exactly: (B, H, n) long.
    gather copies keys bit for bit, and post-RoPE prompt keys are pairwise distinct (values are not)."""
    eq = (cache_k[:, :, :n, None, :] == prompt_k[:, :, None, :, :]).all(-1)  # (B, H, n, L)
    assert (eq.sum(-1) == 1).all(), "a kept key matches no (or several) prompt keys"
    return eq.float().argmax(-1)


def top_set(scores, candidates, k):
    """The k best candidates by score, asserting the k-th and (k+1)-th are clearly apart (no tie)."""
    ranked = sorted(candidates, key=lambda j: -scores[j])
    if len(ranked) > k:
        assert scores[ranked[k - 1]] - scores[ranked[k]] > 1e-5, "near tie: choose another seed"
    return set(ranked[:k])


def layer0_qk(model, tokens):
    """Post-RoPE queries and keys of layer 0, recomputed from the weights: (B, Hq, L, D), (B, Hkv, L, D)."""
    B, L = tokens.shape
    HQ, HKV, D = model.args.n_heads, model.args.n_kv_heads, model.args.head_dim
    attn, norm = model.layers[0].self_attn, model.layers[0].input_layernorm
    x = model.embed_tokens.weight[tokens].double()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
    q = (x @ attn.q_proj.weight.double().T).view(B, L, HQ, D).transpose(1, 2)
    k = (x @ attn.k_proj.weight.double().T).view(B, L, HKV, D).transpose(1, 2)
    theta = model.args.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * theta  # (L, D/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(t):  # HF rotate-half layout: pairs (i, i + D/2)
        a, b = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return rope(q), rope(k)
