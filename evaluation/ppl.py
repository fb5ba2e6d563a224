"""The ppl task: teacher-forced continuation of long text; NLL and KL(P_full || P_variant) per segment, and
per token (with the entropy of P_variant), so that where a variant gains or loses can be read afterwards."""
import math
import time

import torch

from common import cache_stats, kv_bytes_per_token, log
from evaluation.data import load_text, segments
from evaluation.variants import (QUANT_BITS, Progress, batches, build_batch, config_stats, feed, fractions, grid,
                                 mean_se, per_sequence, prefill_rows, quantized_caches)


class Continuation:
    """The ppl task's shared work: S text segments, one full-cache prefill of their first C tokens, and
    the full cache's log-probs at each of the next M teacher-forced tokens (the reference)."""

    def __init__(self, model, codec, args, device, h2o):
        C, M = self.C, self.M = args.context, args.new_tokens
        tokens = torch.tensor(segments(codec, load_text(args), args.segments, C + M + 1), device=device)
        self.S, self.inputs, self.targets = tokens.shape[0], tokens[:, C:-1], tokens[:, C + 1:]
        t0 = time.perf_counter()
        _, self.full, self.recorder = prefill_rows(model, tokens[:, :C], M, args.window, h2o)
        log(f"prefill of {self.S} x {C} tokens {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        self.reference = torch.stack(list(feed(model, self.full, self.inputs, C)), 1)  # (S, M, V)
        self.full_result = {**self.metrics(self.reference), **per_sequence(cache_stats(self.full, C + M), self.S),
                            "decode_s": time.perf_counter() - t0}

    def metrics(self, logp):
        """NLL and KL of log-probs (S, M, V) of the teacher-forced tokens."""
        nll = -logp.gather(-1, self.targets[..., None])[..., 0]
        return ppl_metrics(nll, kl(self.reference, logp), entropy(logp))

    def quantized(self, model, bits=QUANT_BITS):
        """{name: metrics and bytes} of the full-length quantized caches at `bits`."""
        out = {}
        for name, cache in quantized_caches(model, self.full, self.C, bits).items():
            t0 = time.perf_counter()
            logp = torch.stack(list(feed(model, cache, self.inputs, self.C)), 1)
            out[name] = {**self.metrics(logp), "bits": bits, **per_sequence(cache.stats(self.C + self.M), self.S),
                         "decode_s": time.perf_counter() - t0}
            log(f"{name} {bits}-bit cache: KL {out[name]['kl']['mean']:.4f}")
        return out

    def configs(self, model, args, groups, what):
        """Metrics, bytes and decisions of every (method, budget, variant) of the groups, decoded in batches."""
        S, C, M = self.S, self.C, self.M
        per_token = kv_bytes_per_token(model.args, model.embed_tokens.weight.dtype)
        configs, todo = [], batches(groups, S, C, per_token)
        progress = Progress(f"{what}: batch", len(todo))
        for group in todo:
            rows, layout = build_batch(args, group, self.full, self.recorder, C, M, model.inv_freq)
            n = len(layout)
            nll, divergence, spread = (torch.zeros(n * S, M, device=self.inputs.device) for _ in range(3))
            t0 = time.perf_counter()
            for t, logp in enumerate(feed(model, rows, self.inputs.repeat(n, 1), C)):
                nll[:, t] = -logp.gather(-1, self.targets[:, t].repeat(n)[:, None])[:, 0]
                divergence[:, t] = kl(self.reference[:, t].repeat(n, 1), logp)
                spread[:, t] = entropy(logp)
            decode_s = (time.perf_counter() - t0) / n
            for method, budget, variant, cache, in_cache, in_batch in layout:
                stats, counts = config_stats(cache, in_cache, variant, C + M)
                configs.append({"method": method, "budget": budget, "variant": variant,
                                **ppl_metrics(nll[in_batch], divergence[in_batch], spread[in_batch]), **stats,
                                "decisions": fractions(counts), "decode_s": decode_s})
            progress.step(", ".join(sorted({f"{m}@{b}" for m, b, _ in group})))
        return configs


def task_ppl(model, codec, args, device):
    """Teacher-forced continuation: per segment, prefill C tokens, compress, then decode the next M true
    tokens; NLL of each and KL(P_full || P_variant), averaged over the M steps, then over segments."""
    data = Continuation(model, codec, args, device, "h2o" in args.methods)
    return {"full": data.full_result, "quantized": data.quantized(model), "configs": data.configs(model, args, grid(args), "ppl"),
            "segments": data.S, "context": data.C, "new_tokens": data.M}


def kl(logp_full, logp):
    """KL(P_full || P) over the last dimension, from log-probs: exactly 0 for the full cache itself."""
    return (logp_full.exp() * (logp_full - logp)).sum(-1)


def entropy(logp):
    """The entropy of P over the last dimension, from log-probs (nats)."""
    return -(logp.exp() * logp).sum(-1)


def ppl_metrics(nll, divergence, spread):
    """nll, divergence, spread (the entropy) (segments, M) -> mean and standard error over segments of the
    per-segment means, the per-segment means themselves (the report pairs them across variants: same
    segments), and every token's values (6 decimals)."""
    per_segment = nll.mean(1)
    per_token = lambda x: [[round(v, 6) for v in row] for row in x.tolist()]
    return {"nll": mean_se(per_segment), "ppl": math.exp(per_segment.mean().item()),
            "kl": mean_se(divergence.mean(1)),
            "nll_per_segment": per_segment.tolist(), "kl_per_segment": divergence.mean(1).tolist(),
            "nll_per_token": per_token(nll), "kl_per_token": per_token(divergence), "entropy_per_token": per_token(spread)}
