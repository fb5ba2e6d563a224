"""model.py against independent computations: itself run in one shot, and transformers' Llama."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import TINY, tiny_weights, write_checkpoint
from model import CheckpointError, FullCache, decode_one_token, flex_decode, load_model, prefill

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def full_forward(model, tokens):
    cache = FullCache(model.args, tokens.shape[0], tokens.shape[1], dtype=model.embed_tokens.weight.dtype)
    return model(tokens, torch.arange(tokens.shape[1]), cache)


@pytest.mark.parametrize("batch", [1, 2])
def test_token_by_token_decode_equals_one_forward(tiny_ckpt, batch):
    model = load_model(tiny_ckpt)
    tokens = torch.randint(0, 256, (batch, 40), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        reference = full_forward(model, tokens)
        cache = FullCache(model.args, batch, 40)
        logits = [prefill(model, tokens[:, :8], cache)]
        for t in range(8, 39):
            logits.append(decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache))
    torch.testing.assert_close(torch.stack(logits, 1), reference[:, 7:39], atol=1e-5, rtol=1e-5)


def cuda_layout(monkeypatch):
    """Make F.scaled_dot_product_attention return its output as CUDA's float32 kernels lay it out: (B, T, H, D)
    in memory, transposed to (B, H, T, D). The same values; a view that merges H and T then fails."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *args, **kw: sdpa(*args, **kw).transpose(1, 2).contiguous().transpose(1, 2))


def test_decode_takes_attention_output_in_any_layout(tiny_ckpt, monkeypatch):
    """The decode step's grouped attention (B, Hkv, G, D) -> (B, Hq, 1, D) on a non-contiguous output (issue 25:
    "view size is not compatible with input tensor's size and stride" on CUDA float32)."""
    model = load_model(tiny_ckpt)
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = full_forward(model, tokens)
        cuda_layout(monkeypatch)
        cache = FullCache(model.args, 2, 20)
        logits = [prefill(model, tokens[:, :8], cache)]
        for t in range(8, 19):
            logits.append(decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache))
    torch.testing.assert_close(torch.stack(logits, 1), reference[:, 7:19], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (scripts/gpu_check.sh runs it on one)"))])
def test_flex_decode_equals_the_masked_sdpa_decode(device):
    """The full cache's compiled decode on a GPU (FlexAttention, split over the keys) against its decode
    elsewhere (SDPA over the masked buffer), compiled with the buffer's length dynamic, as bench.py compiles
    the full row: GQA, lengths not a multiple of a block, slots after pos masked."""
    step = torch.compile(flex_decode, fullgraph=True)
    g = torch.Generator().manual_seed(7)
    for S in (300, 517):
        q = torch.randn(2, 8, 1, 64, generator=g).to(device)
        k, v = (torch.randn(2, 2, S, 64, generator=g).to(device) for _ in range(2))
        torch._dynamo.mark_dynamic(k, 2), torch._dynamo.mark_dynamic(v, 2)
        pos = torch.tensor([S - 7], device=device)
        mask = torch.arange(S, device=device) <= pos[:, None]
        masked = F.scaled_dot_product_attention(q.view(2, 2, 4, 64), k, v, attn_mask=mask)
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            torch.testing.assert_close(step(q, k, v, pos), masked.reshape(2, 8, 1, 64), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_one_forward(tiny_ckpt):
    model = load_model(tiny_ckpt)
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = full_forward(model, tokens)
        cache = FullCache(model.args, 1, 30)
        first = model(tokens[:, :17], torch.arange(17), cache)
        second = model(tokens[:, 17:], torch.arange(17, 30), cache)
    torch.testing.assert_close(torch.cat([first, second], 1), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["untied", "tied", "llama3_rope", "mistral_sharded"])
def test_logits_match_transformers(tmp_path, variant):
    config = dict(TINY)
    if variant == "tied":
        config["tie_word_embeddings"] = True
    if variant == "llama3_rope":
        config["rope_scaling"] = LLAMA3_SCALING
        config["max_position_embeddings"] = 512
    if variant == "mistral_sharded":
        config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    path = write_checkpoint(tmp_path / variant, config)
    if variant == "mistral_sharded":
        shard(path)
    tokens = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = full_forward(load_model(path), tokens)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def hf_checkpoint(path, model_class, config, layout="new", **save_options):
    """A random model built and saved by transformers itself; returns the model that wrote it. Weights at
    std 0.1 and random biases: at transformers' init (std 0.02, zero biases) attention is near uniform and
    neither RoPE nor biases would change the logits enough for a test to see."""
    torch.manual_seed(0)
    config.initializer_range = 0.1
    model = model_class(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(str(path), **save_options)
    if layout == "old":  # transformers 5 writes only the new layout: rewrite it as transformers 4 wrote it
        written = json.loads((path / "config.json").read_text())
        rope = written.pop("rope_parameters")
        written["rope_theta"] = rope.pop("rope_theta")
        written["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        (path / "config.json").write_text(json.dumps(written))
    return model


LLAMA_SAVES = {
    "mha_untied": dict(num_key_value_heads=4),
    "gqa_llama3": dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3_SCALING, rope_theta=50000.0)),
    "gqa_tied_sharded": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("variant", LLAMA_SAVES)
def test_checkpoints_saved_by_transformers_give_its_logits(tmp_path, variant, layout):
    """transformers 5 writes RoPE as `rope_parameters` {rope_theta, rope_type, ...}, transformers 4 as
    top-level `rope_theta` and `rope_scaling`; theta 50,000 is not the 10,000 a loader falls back to."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=260, max_position_embeddings=512,
                                      rope_theta=50000.0, **LLAMA_SAVES[variant])
    shards = dict(max_shard_size="100KB") if "sharded" in variant else {}
    theirs = hf_checkpoint(tmp_path, transformers.LlamaForCausalLM, config, layout, **shards)
    if shards:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    tokens = torch.randint(0, 260, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = load_model(tmp_path)
        assert ours.args.rope_theta == 50000.0
        torch.testing.assert_close(full_forward(ours, tokens), theirs(tokens).logits, atol=1e-4, rtol=1e-4)


def tiny_qwen2(**overrides):
    return transformers.Qwen2Config(**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=260,
                                           max_position_embeddings=512, rope_theta=50000.0) | overrides)


@pytest.mark.parametrize("heads", ["mha_tied", "gqa_untied"])
def test_qwen2_saved_by_transformers_gives_its_logits(tmp_path, heads):
    config = tiny_qwen2(num_key_value_heads=4, tie_word_embeddings=True) if heads == "mha_tied" else tiny_qwen2()
    theirs = hf_checkpoint(tmp_path, transformers.Qwen2ForCausalLM, config)
    tokens = torch.randint(0, 260, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = load_model(tmp_path)
        assert ours.layers[0].self_attn.q_proj.bias.abs().min() > 0  # the random biases, loaded
        torch.testing.assert_close(full_forward(ours, tokens), theirs(tokens).logits, atol=1e-4, rtol=1e-4)


SLIDING = {
    "qwen2": lambda: (transformers.Qwen2ForCausalLM,
                      tiny_qwen2(use_sliding_window=True, sliding_window=48, max_window_layers=1)),
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=260, max_position_embeddings=512, rope_theta=50000.0, sliding_window=48)),
}


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_caps_the_context(tmp_path, family):
    """Mistral's window, and Qwen2's with use_sliding_window (from layer max_window_layers on): identical
    to full attention up to the window, different past it, so the window is the context model.py offers."""
    theirs = hf_checkpoint(tmp_path, *SLIDING[family]())
    tokens = torch.randint(0, 260, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = load_model(tmp_path)
        assert ours.args.max_position_embeddings == 48
        torch.testing.assert_close(full_forward(ours, tokens[:, :48]), theirs(tokens[:, :48]).logits,
                                   atol=1e-4, rtol=1e-4)
        beyond = (full_forward(ours, tokens) - theirs(tokens).logits)[:, 48:].abs().max()
    assert beyond > 1e-2


def test_unknown_rope_type_is_one_line_error(tmp_path):
    config = dict(TINY, rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0})
    with pytest.raises(CheckpointError, match="unsupported RoPE type 'yarn'") as error:
        load_model(write_checkpoint(tmp_path, config))
    assert "\n" not in str(error.value)


def shard(path):
    """Split model.safetensors into two shards with an index, as large HF checkpoints come."""
    from safetensors.torch import load_file
    state = load_file(str(path / "model.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(path / file))
    weight_map = {n: file for file, part in halves.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "model.safetensors").unlink()


def test_tied_head_shares_the_embedding(tmp_path):
    path = write_checkpoint(tmp_path / "tied", dict(TINY, tie_word_embeddings=True))
    model = load_model(path)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_loader_rejects_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    gpt2 = write_checkpoint(tmp_path / "gpt2", dict(TINY, architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    with pytest.raises(CheckpointError, match="not a Llama-family decoder"):
        load_model(gpt2)
    no_weights = write_checkpoint(tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weight file"):
        load_model(no_weights)
    wrong_shape = write_checkpoint(tmp_path / "wrong")
    state = tiny_weights(TINY)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(wrong_shape / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(wrong_shape)


def test_bfloat16_runs_close_to_float32(tiny_ckpt):
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        fp32 = full_forward(load_model(tiny_ckpt), tokens)
        bf16 = full_forward(load_model(tiny_ckpt, dtype=torch.bfloat16), tokens)
    assert bf16.dtype == torch.float32  # logits come back in float32 whatever the weights
    assert (bf16.softmax(-1) - fp32.softmax(-1)).abs().max() < 0.05
