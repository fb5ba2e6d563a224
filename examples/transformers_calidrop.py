"""CaliDrop inside a Hugging Face transformers causal LM, with calidrop.py as it is.

    python examples/transformers_calidrop.py --method snapkv --budget 64 --window 16 --prompt-file prompts/passkey.txt --chat
    python examples/transformers_calidrop.py --ckpt DIR --method full --prompt "..."

How it plugs in. transformers' decoders that route attention through `AttentionInterface` (Llama, Mistral,
Qwen2, ...) project q, k, v, apply RoPE, give k and v to the layer's cache (`cache.update(k, v, layer_idx)`),
and call the function registered under `config._attn_implementation` as f(module, q, k, v, attention_mask,
scaling=..., **kwargs). This file registers "calidrop": it hands the post-RoPE q (B, Hq, T, D), k, v (B, Hkv,
T, D), `module.layer_idx` and the positions to calidrop.py's seam `attend(layer, q, k, v, pos)` of a cache
that reaches it one of two ways:

  * `model.generate(input_ids, cache=GenerationCache(model, config, max_new_tokens), ...)` (`cache` is
    transformers 5's name for `past_key_values`, which it still takes with a FutureWarning): a transformers
    `Cache`, so generate() keeps everything it does (sampling, streamers, stopping criteria, EOS,
    max_new_tokens) and only the attention changes. A `Cache` sees k and v in `update()` but never q, which
    the recorder and the calibration need, and the attention function sees q, k, v but not the cache; so
    `update()` returns k tagged with its cache (`k.calidrop_cache`) and the attention function hands q, k, v
    to that cache. The first forward is the prefill, through the full cache wrapped in `PrefillRecorder`; its
    last layer compresses it with `CaliDropCache.from_prefill`; every later forward decodes one token. A Cache
    rather than a context manager: generate() takes one already, the convention a kvpress user knows, and it
    needs no patching of the model.
  * `model(..., use_cache=False, calidrop_cache=...)`: this file's own greedy loop (`generate`), the reference
    the tests hold generate() to.

A recompute reads only the evicted pages that a sketch of the pre-RoPE keys ranks first
(CaliDropConfig.reload_pages), so the cache gets the model's RoPE frequencies, from its rotary embedding
(`rope_inv_freq`). Refused with a ValueError: a model without attn_implementation="calidrop", a batch with
padding (every prompt of a batch must have the same length: per-sequence lengths are not there yet), beam
search and anything else that reorders, crops or re-prefills the cache (assisted decoding, chunked prefill).

In your code (what was tested: the main README, "Use it in your transformers model"):

    import calidrop, transformers_calidrop                     # registers attn_implementation="calidrop"
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="calidrop")
    config = calidrop.CaliDropConfig(method="snapkv", budget=256)  # None: the full cache
    cache = transformers_calidrop.GenerationCache(model, config, max_new_tokens=128)
    out = model.generate(input_ids, cache=cache, max_new_tokens=128, do_sample=True, top_p=0.9)
    print(cache.kv.decisions(), cache.kv.stats(cache.get_seq_length()))

The CLI (the second half) takes generate.py's flags, with the same meanings, checks and stats fields.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # in this repository, calidrop.py is one level up
import calidrop  # noqa: E402


# ------------------------------------------------------------------------------------------- the adapter

def calidrop_attention(module, query, key, value, attention_mask, scaling=None, calidrop_cache=None,
                       position_ids=None, **kwargs):
    """transformers' attention-function signature around the `attend` of the cache that `GenerationCache.update`
    tagged `key` with, or else of `calidrop_cache`.

    query (B, Hq, T, D), key, value (B, Hkv, T, D), post-RoPE, at positions position_ids (B or 1, T) ->
    (B, T, Hq, D) and no attention weights. attention_mask is always None here: transformers builds masks
    only for the implementations it knows, and the caches below mask by position themselves."""
    cache = getattr(key, "calidrop_cache", calidrop_cache)
    if cache is None:
        raise ValueError('attn_implementation="calidrop" needs a CaliDrop cache: model.generate(..., '
                         "cache=GenerationCache(model, config, max_new_tokens)), or "
                         "model(..., use_cache=False, calidrop_cache=...) as prefill_and_compress() does")
    if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5):
        raise ValueError(f"{type(module).__name__} scales its scores by {scaling}; calidrop.py by 1/sqrt(head_dim)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{type(module).__name__}: soft-capped logits and attention sinks are not supported")
    T = query.shape[2]
    if T > 1 and module.layer_idx == 0 and not torch.equal(
            position_ids, torch.arange(T, device=position_ids.device).expand_as(position_ids)):
        raise ValueError("padding is not supported yet: every prompt of a batch must have the same length, "
                         "with an attention_mask of ones (prompts of different lengths: one generate() each)")
    out = cache.attend(module.layer_idx, query, key, value, position_ids[0])  # (B, Hq, T, D)
    return out.transpose(1, 2), None


AttentionInterface.register("calidrop", calidrop_attention)


class KVCache:
    """The uncompressed cache, as model.py's FullCache: per layer a static (B, Hkv, max_len, D) buffer written
    in place at `pos`, allocated at the layer's first call (its shape, dtype and device come from k). The prompt
    attends causally from position 0; a decoded token attends to every slot written so far."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.k, self.v = {}, {}  # layer -> (B, Hkv, max_len, D)

    def attend(self, layer, q, k, v, pos):
        """q (B, Hq, T, D), k, v (B, Hkv, T, D) at positions pos (T,) -> (B, Hq, T, D)."""
        if layer not in self.k:
            B, Hkv, _, D = k.shape
            self.k[layer], self.v[layer] = (x.new_zeros(B, Hkv, self.max_len, D) for x in (k, v))
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, pos, k)
        v_all.index_copy_(2, pos, v)
        B, Hq, T, D = q.shape
        if T > 1:  # the prompt, from position 0 (prefill_and_compress makes it so)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # the query heads that share a KV head act as G queries of that head: each K/V is read once
        mask = torch.arange(self.max_len, device=pos.device)[None, :] <= pos[:, None]
        grouped = q.view(B, k_all.shape[1], -1, D)
        out = F.scaled_dot_product_attention(grouped, k_all, v_all, attn_mask=mask)  # (B, Hkv, G, D)
        return out.reshape(B, Hq, 1, D)  # not view: CUDA's float32 kernels return it non-contiguous

    def keys_values(self):
        """Per layer, in order: (B, Hkv, max_len, D) keys and values."""
        return [self.k[i] for i in range(len(self.k))], [self.v[i] for i in range(len(self.v))]

    def kv_bytes(self, n_tokens):
        """Bytes of the filled slots when the cache holds the K/V of n_tokens tokens per sequence."""
        return sum(t[:, :, :n_tokens].nbytes for t in (*self.k.values(), *self.v.values()))

    def nbytes(self):
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()))


def check_model(model, max_len):
    """What this adapter needs from a model that runs max_len positions; ValueError otherwise."""
    if model.config._attn_implementation != "calidrop":
        raise ValueError('load the model with attn_implementation="calidrop" '
                         '(or call model.set_attn_implementation("calidrop"))')
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if window is not None and max_len > window:
        raise ValueError(f"sliding-window attention is not supported: the prompt and the new tokens ({max_len}) "
                         f"must fit in the window ({window})")


def rope_inv_freq(model, head_dim):
    """The RoPE inverse frequencies (head_dim/2,) the model rotated its prompt keys with, as its rotary
    embedding holds them: transformers applies llama3, linear, YaRN and other scalings to inv_freq itself.
    CaliDropCache's key sketch un-rotates the evicted keys with them to rank pages. YaRN's and LongRoPE's
    attention factor (cos and sin times a constant) scales each key as a whole, which the un-rotation keeps,
    so it needs no care; and frequencies other than the model's would only rank worse pages: a recompute
    attends exactly over the tokens it reads. A copy: LongRoPE rewrites its buffer in place once the sequence
    outgrows its original context."""
    inv_freq = getattr(getattr(model.get_decoder(), "rotary_emb", None), "inv_freq", None)
    if inv_freq is None or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"{type(model).__name__} has no RoPE over all {head_dim} head dimensions "
                         "(rotary_emb.inv_freq) to rank the evicted pages with: use reload_pages=None "
                         "(--reload-pages all)")
    return inv_freq.clone()


def next_logits(model, tokens, pos, cache):
    """tokens (B, T) at positions pos (T,), attention by `cache` -> logits (B, vocab) after the last, float32."""
    out = model(tokens, position_ids=pos[None], use_cache=False, logits_to_keep=1, calidrop_cache=cache)
    return out.logits[:, -1].float()


def prefill_cache(model, config, prompt_len, max_new_tokens):
    """The full cache a prefill of prompt_len tokens runs through, and the PrefillRecorder that wraps it when
    config (None: the full cache) will compress it (None when the prompt fits in the budget): (full, recorder)."""
    check_model(model, prompt_len + max_new_tokens)
    compress = config is not None and prompt_len > config.budget
    full = KVCache(prompt_len if compress else prompt_len + max_new_tokens)
    return full, calidrop.PrefillRecorder(full, config.window, h2o=config.method == "h2o") if compress else None


def compress(model, config, full, recorder, max_new_tokens, store=None):
    """CaliDropCache.from_prefill on the finished prefill of `full`, recorded by `recorder`."""
    keys, values = full.keys_values()
    ranks_pages = config.recomputes and config.reload_pages is not None and not config.exact
    inv_freq = rope_inv_freq(model, keys[0].shape[-1]) if ranks_pages else None
    return calidrop.CaliDropCache.from_prefill(config, keys, values, recorder, max_new_tokens, store, inv_freq)


def prefill_and_compress(model, tokens, config, max_new_tokens, store=None):
    """generate.py's function of the same name on a transformers model: one prefill with the full cache; then,
    unless config is None (the full cache) or the prompt fits in the budget, compress it with
    CaliDropCache.from_prefill. tokens (B, L): one prompt length, no padding. Returns (logits, cache)."""
    B, L = tokens.shape
    full, recorder = prefill_cache(model, config, L, max_new_tokens)
    logits = next_logits(model, tokens, torch.arange(L, device=tokens.device), recorder or full)
    if not full.k:
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                         "AttentionInterface")
    if recorder is None:
        return logits, full
    return logits, compress(model, config, full, recorder, max_new_tokens, store)


@torch.inference_mode()
def generate(model, input_ids, config, max_new_tokens, stop_ids=(), store=None):
    """Greedy: input_ids (B, L) -> (new ids (B, N), cache), N <= max_new_tokens: it stops once every sequence
    has produced one of stop_ids (cut each sequence after its own). The last new token is never fed, so the
    cache holds the K/V of L + N - 1 tokens."""
    logits, cache = prefill_and_compress(model, input_ids, config, max_new_tokens, store)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    new_ids = [logits.argmax(-1, keepdim=True)]
    done = torch.isin(new_ids[-1][:, 0], stop)
    for i in range(max_new_tokens - 1):
        if done.all():
            break
        pos = torch.tensor([input_ids.shape[1] + i], device=input_ids.device)
        new_ids.append(next_logits(model, new_ids[-1], pos, cache).argmax(-1, keepdim=True))
        done |= torch.isin(new_ids[-1][:, 0], stop)
    return torch.cat(new_ids, 1), cache


class GenerationCache(transformers.Cache):
    """The cache `model.generate(input_ids, cache=GenerationCache(model, config, max_new_tokens))`
    decodes through, on a model loaded with attn_implementation="calidrop"; one per generate() call.

    The first forward is the prefill: through a KVCache, wrapped in a PrefillRecorder when config compresses
    the prompt (config None: the full cache), as prefill_and_compress does; its last layer compresses it with
    CaliDropCache.from_prefill. Every later forward is one token, routed to `kv.attend`. `kv` is calidrop.py's
    side of it: the KVCache, or after compression the CaliDropCache (decisions(), stats(), counts, reloads).
    max_new_tokens: at most generate()'s, the room the cache keeps for the new tokens."""

    def __init__(self, model, config, max_new_tokens, store=None):
        check_model(model, max_new_tokens)
        super().__init__(layers=[])  # no transformers layers: calidrop.py holds the K/V
        self.model, self.config, self.max_new_tokens, self.store = model, config, max_new_tokens, store
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self.kv = self.recorder = None  # the recorder only during a compressing prefill
        self.prompt_len = self.length = 0  # length: tokens per sequence fed so far, this forward's included

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by each attention layer before its attention function: starts a forward at layer 0, and
        returns k and v as they are, k tagged with this cache for `calidrop_attention`."""
        if layer_idx == 0:
            self.start_forward(key_states.shape[2])
        key_states.calidrop_cache = self
        return key_states, value_states

    def start_forward(self, n_tokens):
        if self.kv is None:  # the prefill
            self.kv, self.recorder = prefill_cache(self.model, self.config, n_tokens, self.max_new_tokens)
            self.prompt_len = n_tokens
        elif n_tokens != 1:
            raise ValueError("a GenerationCache serves one generate() call: one prefill, then one token per "
                             "forward (no chunked prefill, assisted decoding or second call: make a new cache)")
        elif self.length - self.prompt_len >= self.max_new_tokens:
            raise ValueError(f"this GenerationCache has room for max_new_tokens={self.max_new_tokens}: "
                             "make it with generate()'s max_new_tokens")
        self.length += n_tokens

    def attend(self, layer, q, k, v, pos):
        if self.recorder is None:
            return self.kv.attend(layer, q, k, v, pos)
        out = self.recorder.attend(layer, q, k, v, pos)
        if layer == self.n_layers - 1:  # the end of the prefill
            self.kv = compress(self.model, self.config, self.kv, self.recorder, self.max_new_tokens, self.store)
            self.recorder = None
        return out

    def get_seq_length(self, layer_idx=0):
        return self.length

    def get_max_length(self, layer_idx=None):
        return -1

    @property
    def is_compileable(self):
        return False

    @property
    def is_croppable(self):
        return False

    def reorder_cache(self, beam_idx):
        raise ValueError("beam search (num_beams > 1) is not supported: it reorders the cache's sequences at "
                         "every step, which calidrop.py's cache does not do; use greedy or sampling")

    def batch_repeat_interleave(self, repeats):
        raise ValueError("a GenerationCache cannot repeat its sequences (contrastive search, beam search)")

    def batch_select_indices(self, indices):
        raise ValueError("a GenerationCache cannot select sequences (contrastive search, beam search)")

    def crop(self, tokens_to_remove):
        raise ValueError("a GenerationCache cannot be cropped (assisted or speculative decoding)")


# ---------------------------------------------------------------------------------------------- the CLI
# Everything above is the adapter: torch, transformers and calidrop.py, to copy into another project. The CLI
# reuses this repository's generate.py (its input checks and summary) and common.py (TextCodec, byte counts),
# so it runs from here.

import generate as cli  # noqa: E402
from common import (CKPT_HELP, TextCodec, UsageError, add_reload_args, log, resolve_checkpoint,  # noqa: E402
                    run_cli, synchronize)
from model import CheckpointError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help=CKPT_HELP)
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat format")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--stats-json", help="write the run's numbers to this file as one JSON object")
    g = p.add_argument_group("KV-cache compression")
    g.add_argument("--method", default="snapkv", help="full, " + ", ".join(calidrop.METHODS))
    g.add_argument("--budget", type=int, default=256, help="prompt tokens kept per layer and KV head")
    g.add_argument("--no-calibration", action="store_true", help="plain eviction, no CaliDrop")
    g.add_argument("--theta1", type=float, default=0.7, help="recompute when cos(q, hist_q) < theta1")
    g.add_argument("--theta2", type=float, default=0.85, help="calibrate when cos(q, hist_q) > theta2")
    g.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    g.add_argument("--sink", type=int, default=32, help="StreamingLLM sink tokens")
    add_reload_args(g)
    # generate.py's options that this CLI lacks (sampling, quantization, offload storage, calibration size,
    # compile) at their defaults, so that its checks and stats apply as they are
    return argparse.Namespace(**{**vars(cli.parse_args([])), **vars(p.parse_args(argv))})


def context_length(ckpt):
    """The checkpoint's context length, from its config.json, read by transformers."""
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"no config.json in {ckpt}")
    try:
        return AutoConfig.from_pretrained(str(ckpt)).get_text_config().max_position_embeddings
    except (OSError, ValueError, KeyError, AttributeError) as e:  # transformers' messages span lines
        raise CheckpointError(f"bad config.json in {ckpt}: {str(e).splitlines()[0]}") from None


def load(ckpt, device, dtype):
    """The checkpoint as a transformers causal LM with calidrop attention, in eval mode on `device`."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype,
                                                    attn_implementation="calidrop").to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt} does not load as a transformers causal LM: {str(e).splitlines()[0]}") from None


def run(args):
    device, dtype = cli.check_args(args)
    ckpt = resolve_checkpoint(args.ckpt)
    max_len = context_length(ckpt)
    codec = TextCodec(ckpt)
    ids = codec.encode(args.prompt, chat=args.chat)
    if len(ids) > max_len:
        raise UsageError(f"the prompt is {len(ids)} tokens, longer than the model's context ({max_len})")
    max_new = min(args.max_new_tokens, max_len - len(ids))
    if max_new < args.max_new_tokens:
        log(f"note: the context has room for {max_new} new tokens only")
    config = None if args.method == "full" else cli.make_config(args)  # already checked
    if config is not None and len(ids) <= config.budget:
        log(f"note: the prompt ({len(ids)} tokens) fits in the budget ({config.budget}): not compressed")
    model = load(ckpt, device, dtype)

    with torch.inference_mode():
        tokens = torch.tensor([ids], device=device)
        synchronize(device)
        t0 = time.perf_counter()
        try:
            logits, cache = prefill_and_compress(model, tokens, config, max_new)
        except ValueError as e:  # a model this adapter does not support
            raise CheckpointError(str(e)) from None
        token = logits.argmax(-1, keepdim=True)
        synchronize(device)
        prefill_s = time.perf_counter() - t0

        decoded = cli.stream(lambda token, pos: next_logits(model, token, pos, cache).argmax(-1, keepdim=True),
                             token, len(ids), max_new, codec, device)
    return cli.finish(args, ckpt, config, model, cache, device, dtype, len(ids), prefill_s, *decoded)


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # stderr holds the summary, or one line of error
    transformers.logging.disable_progress_bar()
    run_cli(run, args)


if __name__ == "__main__":
    main()
