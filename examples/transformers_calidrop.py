"""CaliDrop inside a Hugging Face transformers causal LM: one file to copy beside calidrop.py (torch,
transformers and calidrop only; calidrop_pages.py beside them makes recomputes read ranked pages).

    import calidrop, transformers_calidrop                     # registers attn_implementation="calidrop"
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="calidrop")
    config = calidrop.CaliDropConfig(method="snapkv", budget=256)  # None: the full cache
    cache = transformers_calidrop.GenerationCache(model, config)
    out = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=128, do_sample=True)
    print(cache.kv.decisions(), cache.kv.stats(cache.get_seq_length()))  # rows=slice(b, b + 1): sequence b

How it plugs in. transformers' decoders that route attention through `AttentionInterface` (Llama, Mistral,
Qwen2, ...) project q, k, v, apply RoPE, give k and v to the layer's cache (`cache.update(k, v, layer_idx)`),
and call the function registered under `config._attn_implementation` as f(module, q, k, v, attention_mask,
scaling=..., **kwargs). This file registers "calidrop": it hands the post-RoPE q (B, Hq, T, D), k, v (B, Hkv,
T, D), `module.layer_idx` and the cache slots to calidrop.py's seam `attend(layer, q, k, v, pos)` of a cache
that reaches it one of two ways:

  * `model.generate(..., cache=GenerationCache(model, config))` (`cache` is transformers 5's name for
    `past_key_values`): a transformers `Cache`, so generate() keeps everything it does (sampling, streamers,
    stopping criteria, EOS, max_new_tokens) and only the attention changes. A `Cache` sees k and v in
    `update()` but never q, which the recorder and the calibration need, and the attention function sees q,
    k, v but not the cache; so `update()` returns k tagged with its cache (`k.calidrop_cache`) and the
    attention function hands q, k, v to that cache. The first forward is the prefill, through the full cache
    wrapped in `PrefillRecorder`; its last layer compresses it with `CaliDropCache.from_prefill`; every later
    forward decodes one token. generate() tells a cache it was given nothing of its arguments, so the cache
    makes room for new tokens as they come (`max_new_tokens=` preallocates).
  * `model(..., use_cache=False, calidrop_cache=..., calidrop_slots=...)`: this file's own greedy loop
    (`generate`), the reference the tests hold generate() to.

Prompts of different lengths: a left-padded batch (`tokenizer.padding_side = "left"`, a pad token set, and
its attention_mask). A mask function registered for "calidrop" passes generate()'s 2D mask on as it is, and
the prefill reads each sequence's padding off it (`left_padding`): the pads are never attended, kept, scored,
offloaded or calibrated with (calidrop.py's `pads`), so each row decodes as its prompt alone would (up to
float rounding). Any other mask (right padding, holes) is a ValueError.

A recompute that ranks pages (CaliDropConfig.reload_pages) needs the model's RoPE frequencies, from its
rotary embedding (`rope_inv_freq`). Refused with a ValueError: a model without attn_implementation=
"calidrop", padding other than on the left, beam search and anything else that reorders, crops or
re-prefills the cache (assisted decoding, chunked prefill).
"""
import math

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, AttentionMaskInterface

import calidrop


def calidrop_attention(module, query, key, value, attention_mask, scaling=None, calidrop_cache=None,
                       calidrop_slots=None, **kwargs):
    """transformers' attention-function signature around the cache that `GenerationCache.update` tagged `key`
    with, or else around calidrop.py's `attend` of `calidrop_cache` at the cache slots `calidrop_slots` (T,).

    query (B, Hq, T, D), key, value (B, Hkv, T, D), post-RoPE, each sequence at its own positions ->
    (B, T, Hq, D) and no attention weights. attention_mask is the 2D padding mask (B, tokens so far) that
    generate() holds, or None (`padding_mask` below): the caches mask by slot themselves."""
    if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5):
        raise ValueError(f"{type(module).__name__} scales its scores by {scaling}; calidrop.py by 1/sqrt(head_dim)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{type(module).__name__}: soft-capped logits and attention sinks are not supported")
    cache = getattr(key, "calidrop_cache", None)
    if cache is not None:  # model.generate(): the GenerationCache knows its slots and reads the padding off the mask
        out = cache.attend(module.layer_idx, query, key, value, attention_mask)
    elif calidrop_cache is not None:  # the adapter's own loop
        out = calidrop_cache.attend(module.layer_idx, query, key, value, calidrop_slots)
    else:
        raise ValueError('attn_implementation="calidrop" needs a CaliDrop cache: model.generate(..., '
                         "cache=GenerationCache(model, config)), or "
                         "model(..., use_cache=False, calidrop_cache=..., calidrop_slots=...) as "
                         "prefill_and_compress() does")
    return out.transpose(1, 2), None


def padding_mask(attention_mask=None, **kwargs):
    """transformers' mask creation for "calidrop": the 2D padding mask as generate() gives it (None without
    padding), untouched. Without a registered mask function the attention function would get None, and
    position_ids alone cannot tell left padding from a mask with a hole after the first token."""
    return attention_mask


AttentionInterface.register("calidrop", calidrop_attention)
AttentionMaskInterface.register("calidrop", padding_mask)


def left_padding(attention_mask):
    """The left padding pads (B,) of a prompt's 2D attention mask (B, L), sequence b's first pads[b] tokens;
    None without a mask or padding. ValueError for any other mask (right padding, holes, an empty prompt)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    pads = (~mask).sum(-1)
    if (mask.ndim != 2 or (pads == mask.shape[-1]).any()
            or not torch.equal(mask, torch.arange(mask.shape[-1], device=mask.device) >= pads[:, None])):
        raise ValueError("only left padding is supported: each row of the attention mask must be zeros, then "
                         "ones, with at least one 1 (tokenizer.padding_side = 'left')")
    return pads if pads.any() else None


class KVCache:
    """The uncompressed cache, as model.py's FullCache: per layer a static (B, Hkv, max_len, D) buffer written
    in place at `pos`, allocated at the layer's first call (its shape, dtype and device come from k). The prompt
    attends causally from slot 0; a decoded token attends to every slot written so far. pads (B,): a
    left-padded batch, whose pad slots no query attends, except each pad its own (a query that sees nothing
    would be NaN, and NaN times a zero weight is NaN)."""

    def __init__(self, max_len, pads=None):
        self.max_len, self.pads = max_len, pads
        self.k, self.v = {}, {}  # layer -> (B, Hkv, max_len, D)

    def attend(self, layer, q, k, v, pos):
        """q (B, Hq, T, D), k, v (B, Hkv, T, D) in slots pos (T,) -> (B, Hq, T, D)."""
        if layer not in self.k:
            B, Hkv, _, D = k.shape
            self.k[layer], self.v[layer] = (x.new_zeros(B, Hkv, self.max_len, D) for x in (k, v))
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, pos, k)
        v_all.index_copy_(2, pos, v)
        B, Hq, T, D = q.shape
        if T > 1 and self.pads is None:  # the prompt, from slot 0 (prefill_and_compress makes it so)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if T > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.visible(pos, T), enable_gqa=True)
        # the query heads that share a KV head act as G queries of that head: each K/V is read once
        grouped = q.view(B, k_all.shape[1], -1, D)
        out = F.scaled_dot_product_attention(grouped, k_all, v_all, attn_mask=self.visible(pos, self.max_len))
        return out.reshape(B, Hq, 1, D)  # not view: CUDA's float32 kernels return it non-contiguous

    def visible(self, pos, n):
        """The slots 0..n-1 that queries in slots pos (T,) attend: (T, n), or (B, 1, T, n) with pads."""
        slots = torch.arange(n, device=pos.device)
        causal = slots[None] <= pos[:, None]
        if self.pads is None:
            return causal
        return causal & ((slots >= self.pads[:, None])[:, None, None] | (slots[None] == pos[:, None]))

    def make_room(self, extra):
        """extra more slots at the end of every layer's buffers."""
        self.max_len += extra
        for buffers in (self.k, self.v):
            for layer, x in buffers.items():
                buffers[layer] = F.pad(x, (0, 0, 0, extra))

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


def next_logits(model, tokens, pos, cache, pads=None):
    """tokens (B, T) in cache slots pos (T,), attention by `cache` -> logits (B, vocab) after the last, float32.
    pads (B,): a left-padded batch, so sequence b's tokens sit at positions pos - pads[b] (its pads at 0, as
    generate() puts them)."""
    positions = pos[None] if pads is None else (pos[None] - pads[:, None]).clamp(min=0)
    out = model(tokens, position_ids=positions, use_cache=False, logits_to_keep=1, calidrop_cache=cache,
                calidrop_slots=pos)
    return out.logits[:, -1].float()


def prefill_cache(model, config, prompt_len, max_new_tokens, pads=None):
    """The full cache a prefill of prompt_len tokens (left-padded by pads (B,), if given) runs through, and the
    PrefillRecorder that wraps it when config (None: the full cache) will compress it (None when the prompt
    fits in the budget): (full, recorder)."""
    check_model(model, prompt_len + max_new_tokens)
    compress = config is not None and (prompt_len > config.budget or config.interval is not None)
    full = KVCache(prompt_len if compress else prompt_len + max_new_tokens, pads)
    return full, (calidrop.PrefillRecorder(full, config.window, h2o=config.method == "h2o", pads=pads)
                  if compress else None)


def compress(model, config, full, recorder, max_new_tokens, store=None):
    """CaliDropCache.from_prefill on the finished prefill of `full`, recorded by `recorder`."""
    keys, values = full.keys_values()
    ranks_pages = (calidrop.calidrop_pages is not None and config.recomputes and config.reload_pages is not None
                   and not config.exact)
    inv_freq = rope_inv_freq(model, keys[0].shape[-1]) if ranks_pages else None
    return calidrop.CaliDropCache.from_prefill(config, keys, values, recorder, max_new_tokens, store, inv_freq)


def prefill_and_compress(model, tokens, config, max_new_tokens, store=None, pads=None):
    """generate.py's function of the same name on a transformers model: one prefill with the full cache; then,
    unless config is None (the full cache) or the prompt fits in the budget, compress it with
    CaliDropCache.from_prefill. tokens (B, L), left-padded by pads (B,) if given: sequence b's first pads[b]
    tokens are padding, never attended, kept, scored, offloaded or calibrated with. Returns (logits, cache)."""
    B, L = tokens.shape
    full, recorder = prefill_cache(model, config, L, max_new_tokens, pads)
    logits = next_logits(model, tokens, torch.arange(L, device=tokens.device), recorder or full, pads)
    if not full.k:
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                         "AttentionInterface")
    if recorder is None:
        return logits, full
    return logits, compress(model, config, full, recorder, max_new_tokens, store)


@torch.inference_mode()
def generate(model, input_ids, config, max_new_tokens, stop_ids=(), store=None, pads=None):
    """Greedy: input_ids (B, L), left-padded by pads (B,) if given -> (new ids (B, N), cache), N <=
    max_new_tokens: it stops once every sequence has produced one of stop_ids (cut each sequence after its
    own). The last new token is never fed, so the cache holds the K/V of L + N - 1 slots."""
    logits, cache = prefill_and_compress(model, input_ids, config, max_new_tokens, store, pads)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    new_ids = [logits.argmax(-1, keepdim=True)]
    done = torch.isin(new_ids[-1][:, 0], stop)
    for i in range(max_new_tokens - 1):
        if done.all():
            break
        pos = torch.tensor([input_ids.shape[1] + i], device=input_ids.device)
        new_ids.append(next_logits(model, new_ids[-1], pos, cache, pads).argmax(-1, keepdim=True))
        done |= torch.isin(new_ids[-1][:, 0], stop)
    return torch.cat(new_ids, 1), cache


class GenerationCache(transformers.Cache):
    """The cache `model.generate(input_ids, attention_mask=..., cache=GenerationCache(model, config))` decodes
    through, on a model loaded with attn_implementation="calidrop"; one per generate() call.

    The first forward is the prefill: through a KVCache, wrapped in a PrefillRecorder when config compresses
    the prompt (config None: the full cache), as prefill_and_compress does; its last layer compresses it with
    CaliDropCache.from_prefill. Every later forward is one token, routed to `kv.attend`. `kv` is calidrop.py's
    side of it: the KVCache, or after compression the CaliDropCache (decisions(), stats(), counts, reloads).
    A left-padded batch (zeros at the start of attention_mask's rows): `pads` (B,), read off the mask at the
    prefill; each sequence's stats are `kv.stats(n, rows=slice(b, b + 1))`. max_new_tokens: the room for new
    tokens made at the prefill (generate() does not tell its cache its own); more is made when it fills, except
    with decode-time eviction (config.interval), whose kept cache stays within budget + interval tokens and whose
    offload store is sized for max_new_tokens at the prefill: then give generate()'s."""

    def __init__(self, model, config, max_new_tokens=64, store=None):
        check_model(model, 1)
        super().__init__(layers=[])  # no transformers layers: calidrop.py holds the K/V
        self.model, self.config, self.room, self.store = model, config, max_new_tokens, store
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self.kv = self.recorder = self.pads = None  # the recorder only during a compressing prefill
        self.prompt_len = self.length = 0  # length: slots per sequence fed so far, this forward's included

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by each attention layer before its attention function: starts a forward at layer 0, and
        returns k and v as they are, k tagged with this cache for `calidrop_attention`."""
        if layer_idx == 0:
            self.start_forward(key_states.shape[2])
        key_states.calidrop_cache = self
        return key_states, value_states

    def start_forward(self, n_tokens):
        if self.length == 0:  # the prefill: its first attention call makes the caches, once it sees the mask
            self.prompt_len = n_tokens
        elif n_tokens != 1:
            raise ValueError("a GenerationCache serves one generate() call: one prefill, then one token per "
                             "forward (no chunked prefill, assisted decoding or second call: make a new cache)")
        elif self.length - self.prompt_len >= self.room:  # full: twice the room (a copy of the kept buffers)
            if self.config is not None and self.config.interval:
                raise ValueError(f"with decode-time eviction (interval) the offload store makes room for "
                                 f"max_new_tokens={self.room} evicted tokens: give GenerationCache generate()'s")
            check_model(self.model, self.length + self.room)
            make_room(self.kv, self.room)
            self.room *= 2
        self.length += n_tokens

    def attend(self, layer, q, k, v, attention_mask):
        """calidrop.py's attend at this forward's slots: the same for every sequence (prompt_len + tokens
        fed), whatever positions transformers gave a left-padded sequence's RoPE."""
        pos = torch.arange(self.length - q.shape[2], self.length, device=q.device)
        if self.kv is None:
            self.pads = left_padding(attention_mask)
            self.kv, self.recorder = prefill_cache(self.model, self.config, self.prompt_len, self.room, self.pads)
        if self.recorder is None:
            return self.kv.attend(layer, q, k, v, pos)
        out = self.recorder.attend(layer, q, k, v, pos)
        if layer == self.n_layers - 1:  # the end of the prefill
            self.kv = compress(self.model, self.config, self.kv, self.recorder, self.room, self.store)
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


def make_room(kv, extra):
    """extra more slots for generated tokens in a KVCache or a CaliDropCache (every layer's kept buffers)."""
    if isinstance(kv, KVCache):
        return kv.make_room(extra)
    for state in kv.layers:
        state.k, state.v = (F.pad(x, (0, 0, 0, extra)) for x in (state.k, state.v))
        state.slots = torch.arange(state.k.shape[2], device=state.k.device)
        if state.kept_visible is not None:
            state.kept_visible = F.pad(state.kept_visible, (0, extra), value=True)
