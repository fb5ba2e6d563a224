"""scripts/: a tiny Qwen2 written as a GGUF the way llama.cpp names it converts back to a checkpoint that
gives transformers' logits, with ChatML's special tokens whole. The real models' conversions are checked
against transformers reading their GGUF (scripts/check_conversion.py, test_real_model.py)."""
import gguf
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from tokenizers import pre_tokenizers

from common import TextCodec
from model import FullCache, load_model
from scripts import prepare_qwen2_5_coder

transformers = pytest.importorskip("transformers")

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# a Jinja string with "\n" escapes, as Qwen's template spells its default system turn
CHAT_TEMPLATE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] "
                 "+ '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a tiny model.<|im_end|>\\n' }}"
                 "{%- endif %}")


def write_gguf(path, model):
    """The model's tensors in float32 under llama.cpp's names (gguf's own map), its config as qwen2 keys,
    a byte-level vocabulary: the 256 bytes, one merge (" t"), three control tokens and one user-defined."""
    c = model.config
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"] + CONTROL + ["<tool_call>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3] * len(CONTROL) + [4])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(259)
    writer.add_pad_token_id(257)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_qwen2_gguf_converts_to_transformers_logits(tmp_path):
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=261,
                                      max_position_embeddings=512, rope_theta=50000.0, rms_norm_eps=1e-6,
                                      initializer_range=0.1)
    torch.manual_seed(0)
    theirs = transformers.Qwen2ForCausalLM(config).eval()
    for name, p in theirs.named_parameters():
        if name.endswith("bias"):  # zero at init: random, so that a lost bias shows
            torch.nn.init.normal_(p, std=0.1)
    write_gguf(tmp_path / "tiny.gguf", theirs)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    prepare_qwen2_5_coder.convert(GGUFReader(tmp_path / "tiny.gguf"), ckpt, lambda message: None)

    ours = load_model(ckpt)
    assert (ours.args.rope_theta, ours.args.n_kv_heads, ours.args.max_position_embeddings) == (50000.0, 2, 512)
    tokens = torch.randint(0, 261, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = ours(tokens, torch.arange(200), FullCache(ours.args, 1, 200))
        torch.testing.assert_close(logits, theirs(tokens).logits, atol=1e-4, rtol=1e-4)

    codec = TextCodec(ckpt)
    assert codec.stop_ids == [257, 259]  # <|endoftext|> and <|im_end|> (eos)
    assert codec.system_prompt == "You are a tiny model."
    assert codec.encode(" to") == [256, codec.tokenizer.token_to_id("o")]  # the merge " t"
    ids = codec.encode("hi<tool_call>", chat=True)
    assert ids[0] == 258 and ids.count(260) == 1  # control and user-defined tokens stay whole
    assert codec.decode(ids) == "system\nYou are a tiny model.\nuser\nhi<tool_call>\nassistant\n"
