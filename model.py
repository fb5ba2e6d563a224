"""A Llama-family decoder in one file, with the KV cache as an explicit object.

Every attention layer computes q, k, v (after RoPE) and hands them to `cache.attend(layer, q, k, v, pos)`,
which stores k and v and returns the attention output. `FullCache` below is the plain cache; a
compressing cache (calidrop.py) is a drop-in replacement that this file never imports.

Loads Hugging Face checkpoint directories as they are: LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM (Llama plus q/k/v biases), from config.json, model.safetensors or a sharded
model.safetensors.index.json, HF weight names and the HF rotate-half RoPE layout. RoPE is the default or
Llama-3.1's `llama3` scaling, read from either config layout (transformers 4's `rope_theta` /
`rope_scaling`, transformers 5's `rope_parameters`); any other RoPE type is a CheckpointError. A sliding
attention window (Mistral, Qwen2's `use_sliding_window`) caps the context at the window's length.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.nn.attention.flex_attention import flex_attention

# architecture -> model_type; Qwen2 is Llama with biases on the q, k and v projections
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or not a Llama-family decoder."""


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        archs = config.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), config.get("model_type"))
        if family not in ARCHITECTURES.values():
            raise CheckpointError(f"not a Llama-family decoder: architectures={archs}, "
                                  f"model_type={config.get('model_type')!r} (supported: {', '.join(ARCHITECTURES)})")
        rope_theta, rope_scaling = rope_settings(config)
        # Sliding-window attention (Mistral's, 4096 when unset; Qwen2's only with use_sliding_window) is
        # full attention on sequences no longer than the window, so the context ends there.
        context = config.get("max_position_embeddings", 2048)
        if family == "mistral" or (family == "qwen2" and config.get("use_sliding_window", False)):
            context = min(context, config.get("sliding_window", 4096) or context)
        n_heads = config["num_attention_heads"]
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=config.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            max_position_embeddings=context,
            qkv_bias=family == "qwen2",
        )


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(theta, the llama3 scaling or None) from either layout: transformers 5 writes `rope_parameters`
    {"rope_theta", "rope_type", ...}, transformers 4 a top-level `rope_theta` and `rope_scaling` (which,
    as in transformers, wins when both are present). Other RoPE types are refused rather than run wrong."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError("unsupported RoPE settings: one per layer type")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":  # transformers' default for the pre-scaling context
        return theta, {"original_max_position_embeddings": config.get("max_position_embeddings", 2048), **rope}
    raise CheckpointError(f"unsupported RoPE type {kind!r} (supported: default, llama3)")


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.1's long-context rescaling when configured."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_len = s["original_max_position_embeddings"]
    low_wavelen = old_len / s["low_freq_factor"]
    high_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    interpolated = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_mid, interpolated, scaled).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos, sin (B or 1, 1, T, D)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, pos, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = cache.attend(self.layer, q, k, v, pos)  # (B, n_heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, pos, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, cache, last_only: bool = False,
                pads: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) in cache slots pos (T,) -> logits (B, T, vocab), float32; with last_only, (B, 1, vocab)
        for the last position (a prefill needs no more: T x vocab logits cost time and memory). pads (B,): a
        left-padded batch, sequence b's first pads[b] slots padding, so its tokens sit at positions pos - pads[b]
        (the cache was made with the same pads, and masks them); None: positions are the slots."""
        positions = pos[None] if pads is None else pos[None] - pads[:, None]  # (B or 1, T)
        angles = positions.float()[..., None] * self.inv_freq  # (B or 1, T, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        x = self.embed_tokens(tokens)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, pos, cache)
        return self.lm_head(self.norm(x[:, -1:] if last_only else x)).float()


class FullCache:
    """The uncompressed cache: static (B, n_kv_heads, max_len, head_dim) tensors, one per layer, written in
    place at `pos`, so decode shapes never change (torch.compile) and nothing is repeated per query head.
    One tensor per layer, not one stacked buffer: a compiled step that writes a slice of a stacked buffer
    copies the whole buffer. pads (B,): a left-padded batch (the model's `pads`), whose pad slots no query
    attends, except each pad its own (a query that sees nothing would be NaN, and NaN times a zero weight
    is NaN)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device=None, dtype=None, pads=None):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.slots = torch.arange(max_len, device=device)
        self.pads = pads

    def attend(self, layer: int, q, k, v, pos):
        """q (B, Hq, T, D), k, v (B, Hkv, T, D) post-RoPE in slots pos (T,) -> (B, Hq, T, D)."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, pos, k)
        v_all.index_copy_(2, pos, v)
        B, Hq, T, D = q.shape
        if T == 1 and k_all.is_cuda and torch.compiler.is_compiling():
            return flex_decode(q, k_all, v_all, pos, self.pads)  # one thread block per (sequence, KV head) is too few
        if T == 1:  # decode: the whole static buffer, future slots masked
            # the query heads sharing a KV head act as G queries of that head: each K/V is read once
            grouped = q.view(B, k_all.shape[1], -1, D)
            out = F.scaled_dot_product_attention(grouped, k_all, v_all, attn_mask=self.visible(pos, len(self.slots)))
            return out.reshape(B, Hq, 1, D)  # not view: CUDA's float32 kernels return it non-contiguous
        if int(pos[0]) == 0 and self.pads is None:  # prefill from the start: the causal kernel, no mask materialised
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        n = int(pos[-1]) + 1  # causal over everything written so far
        return F.scaled_dot_product_attention(q, k_all[:, :, :n], v_all[:, :, :n], attn_mask=self.visible(pos, n),
                                              enable_gqa=True)

    def visible(self, pos, n):
        """The slots 0..n-1 that queries in slots pos (T,) attend: (T, n), or (B, 1, T, n) with pads."""
        causal = self.slots[None, :n] <= pos[:, None]
        if self.pads is None:
            return causal
        own = self.slots[None, :n] == pos[:, None]
        return causal & ((self.slots[:n] >= self.pads[:, None])[:, None, None] | own)

    def kv_bytes(self, n_tokens: int) -> int:
        """Bytes of the filled slots when the cache holds the K/V of n_tokens tokens per sequence."""
        B, H, _, D = self.k[0].shape
        return 2 * len(self.k) * B * H * n_tokens * D * self.k[0].element_size()

    def nbytes(self) -> int:
        """Bytes allocated for K and V (every slot, filled or not)."""
        return sum(t.nbytes for t in (*self.k, *self.v))


def flex_decode(q, k, v, pos, pads=None):
    """FullCache's decode on a GPU, compiled: FlexAttention's decoding kernel splits the keys of each
    (sequence, KV head) over many thread blocks (flash-decoding). SDPA with a mask parallelizes over
    sequences, heads and query blocks only: 8 thread blocks for the grouped query of the 8-layer shape at
    batch 1, the likely reason it read a 32k cache at 23 % of an H200's bandwidth (issue 25; this path is not
    measured on a GPU yet). Slots after pos, and pads (B,) (left padding), score -inf. q (B, Hq, 1, D), k, v
    (B, Hkv, S, D) -> (B, Hq, 1, D)."""
    def future_masked(score, b, h, q_idx, kv_idx):
        visible = kv_idx <= pos[0] if pads is None else (kv_idx <= pos[0]) & (kv_idx >= pads[b])
        return torch.where(visible, score, -float("inf"))
    return flex_attention(q, k, v, score_mod=future_masked, enable_gqa=True)


def prefill(model: Llama, tokens: torch.Tensor, cache, pads=None) -> torch.Tensor:
    """Run the prompt tokens (B, T) from slot 0 (left-padded by pads (B,), if given); returns the last
    position's logits (B, vocab)."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    return model(tokens, pos, cache, last_only=True, pads=pads)[:, -1]


def decode_one_token(model: Llama, token: torch.Tensor, pos: torch.Tensor, cache, pads=None) -> torch.Tensor:
    """One decode step: token (B, 1) in slot pos (1,) -> logits (B, vocab). What --compile wraps."""
    return model(token, pos, cache, pads=pads)[:, -1]


# ---------------------------------------------------------------------------------------------- loading

def read_config(ckpt: Path) -> ModelArgs:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"no config.json in {ckpt}")
    try:
        config = json.loads((ckpt / "config.json").read_text())
        return ModelArgs.from_config(config)
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"bad config.json in {ckpt}: {e!r}") from None


def weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"bad {index}: {e!r}") from None
        files = [ckpt / s for s in shards]
    else:
        files = [ckpt / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"missing weight file(s): {', '.join(missing)}")
    return files


def load_model(ckpt, device="cpu", dtype=torch.float32) -> Llama:
    """Build the model on the meta device, then assign the checkpoint's tensors (no double allocation)."""
    ckpt = Path(ckpt)
    args = read_config(ckpt)
    with torch.device("meta"):
        model = Llama(args)
    state = {}
    for f in weight_files(ckpt):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    state[name.removeprefix("model.")] = sf.get_tensor(name).to(device=device, dtype=dtype)
        except SafetensorError as e:  # truncated or not a safetensors file
            raise CheckpointError(f"unreadable weight file {f}: {e}") from None
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {n for n, _ in model.named_parameters()}  # tied: the shared tensor is listed once
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config: missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]}")
    model.load_state_dict(state, assign=True, strict=False)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval()


# ------------------------------------------------------------------------------ random weights, real shapes

RANDOM_CONFIGS = {  # bench.py --random-weights NAME: real shapes, random values (no checkpoint needed)
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


def random_model(config, device, dtype, seed):
    """A Llama at the config's real shape with random weights, built in place on the device."""
    args = ModelArgs.from_config(config)
    with torch.device("meta"):
        model = Llama(args).to(dtype)
    model = model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval()
