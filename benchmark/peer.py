"""Hugging Face transformers' `generate` on the same checkpoint and prompt: bench.py's peer. The only module
outside the tests and examples that imports transformers."""
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from common import synchronize, weight_bytes


class Stamps(StoppingCriteria):
    """Called once per new token, right after it is sampled: a timestamp per step."""

    def __init__(self, device):
        self.device, self.t = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Peer:
    """transformers' generate with its default (dynamic) cache."""

    def __init__(self, ckpt, device, dtype):
        transformers.logging.set_verbosity_error()
        self.version = transformers.__version__
        self.model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
        self.device = device
        self.weight_bytes = weight_bytes(self.model)
        x = torch.arange(64, device=device)[None]
        self.generate(x, 4)  # warm-up: first-call costs are not the peer's decode speed

    def generate(self, x, n_new):
        """Greedy decoding of exactly n_new tokens after x (1, L). Returns the new tokens, the prefill's
        seconds, each decode step's seconds (n_new - 1), the total seconds and the KV cache's bytes."""
        stamps = Stamps(self.device)
        synchronize(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                  stopping_criteria=StoppingCriteriaList([stamps]), return_dict_in_generate=True)
        synchronize(self.device)
        total = time.perf_counter() - t0
        steps = [b - a for a, b in zip(stamps.t, stamps.t[1:])]
        return out.sequences[0, x.shape[1]:].tolist(), stamps.t[0] - t0, steps, total, cache_bytes(out.past_key_values)


def cache_bytes(pkv):
    """Bytes of the K/V tensors of a transformers cache (a Cache object with layers, or legacy tuples)."""
    layers = getattr(pkv, "layers", None)
    if layers is not None:
        return sum(t.nbytes for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))
    return sum(t.nbytes for kv in pkv for t in kv)
