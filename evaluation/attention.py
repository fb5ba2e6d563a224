"""The attention task: per layer, cos(q_t, hist_q) before and after RoPE, and each variant's attention
output error against the full cache on the same queries."""
import time

import torch
import torch.nn.functional as F

from common import kv_bytes_per_token
from evaluation.data import load_text, segments
from evaluation.variants import (Progress, batches, build_batch, config_stats, feed, fractions, grid, mean_se,
                                 prefill_rows)
from model import apply_rope

ATTENTION_SEGMENTS, ATTENTION_STEPS = 4, 32  # the per-layer distributions pool segments x steps x heads


def unrotate(model, x, pos):
    """Pre-RoPE vectors from post-RoPE x (B, H, T, D) at positions pos (T,): RoPE is a rotation by
    pos x inv_freq, undone by the opposite angle."""
    angles = pos.float()[:, None] * model.inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return apply_rope(x, angles.cos().to(x.dtype), -angles.sin().to(x.dtype))


class Probe:
    """The model decodes on the full cache; at every layer the same q, k, v also go through the batch's
    compressed caches (as shadows), so each variant's attention output is compared with the full one on
    the same query. Also records cos(q_t, hist_q) with hist_q the last prompt query, post- and pre-RoPE."""

    def __init__(self, model, full, shadows, n_blocks, hist_q, prompt_len):
        self.full, self.shadows, self.n = full, shadows, n_blocks
        self.hist_q = hist_q
        hist_pos = torch.tensor([prompt_len - 1], device=full.slots.device)
        self.hist_q_pre = {layer: unrotate(model, q[:, :, None], hist_pos)[:, :, 0] for layer, q in hist_q.items()}
        self.model = model
        self.errors = {layer: [] for layer in hist_q}  # per layer, per step: (n_blocks x S,)
        self.cos_post = {layer: [] for layer in hist_q}  # per layer, per step: (S, Hq)
        self.cos_pre = {layer: [] for layer in hist_q}

    def attend(self, layer, q, k, v, pos):
        out = self.full.attend(layer, q, k, v, pos)
        ref = out.repeat(self.n, 1, 1, 1)
        shadow = self.shadows.attend(layer, *(x.repeat(self.n, 1, 1, 1) for x in (q, k, v)), pos)
        self.errors[layer].append((shadow - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))
        self.cos_post[layer].append(F.cosine_similarity(q[:, :, 0], self.hist_q[layer], dim=-1))
        q_pre = unrotate(self.model, q, pos)[:, :, 0]
        self.cos_pre[layer].append(F.cosine_similarity(q_pre, self.hist_q_pre[layer], dim=-1))
        return out


def task_attention(model, codec, args, device):
    """Per layer, on the full cache's own decode (teacher-forced text): the distribution of
    cos(q_t, hist_q) post- and pre-RoPE, and each variant's relative attention-output error
    ||o - o_full|| / ||o_full|| (all heads of a token together), before (evict) and after calibration."""
    S, steps, C = min(args.segments, ATTENTION_SEGMENTS), min(args.new_tokens, ATTENTION_STEPS), args.context
    tokens = torch.tensor(segments(codec, load_text(args), S, C + steps), device=device)
    _, full, recorder = prefill_rows(model, tokens[:, :C], steps, args.window, "h2o" in args.methods)
    hist_q = {layer: r.window_q[:, :, -1] for layer, r in recorder.layers.items()}
    per_token = kv_bytes_per_token(model.args, model.embed_tokens.weight.dtype)
    configs, todo = [], batches(grid(args), S, C, per_token)
    progress = Progress("attention: batch", len(todo))
    for groups in todo:
        shadows, layout = build_batch(args, groups, full, recorder, C, steps, model.inv_freq)
        probe = Probe(model, full, shadows, len(layout), hist_q, C)
        t0 = time.perf_counter()
        for _ in feed(model, probe, tokens[:, C:], C):
            pass
        decode_s = (time.perf_counter() - t0) / len(layout)
        errors = torch.stack([torch.stack(e, 1) for e in probe.errors.values()])  # (layers, rows, steps)
        for method, budget, variant, cache, in_cache, in_batch in layout:
            stats, counts = config_stats(cache, in_cache, variant, C + steps)
            e = errors[:, in_batch]
            configs.append({"method": method, "budget": budget, "variant": variant,
                            "rel_error": mean_se(e.mean(dim=(0, 2))),  # se over segments
                            "rel_error_by_layer": e.mean(dim=(1, 2)).tolist(), **stats,
                            "decisions": fractions(counts), "decode_s": decode_s})
        progress.step(", ".join(sorted({f"{m}@{b}" for m, b, _ in groups})))
    cos = {name: [cos_summary(torch.stack(c[layer]), args) for layer in sorted(c)]
           for name, c in (("post_rope", probe.cos_post), ("pre_rope", probe.cos_pre))}
    return {"configs": configs, "full": {"rel_error": {"mean": 0.0, "se": 0.0}}, "cos_by_layer": cos,
            "segments": S, "context": C, "steps": steps}


def cos_summary(cos, args):
    """The distribution of one layer's cosines (steps, S, Hq): quantiles and the shares past each threshold."""
    x = cos.flatten().double()
    q = torch.quantile(x, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64, device=x.device))
    return {"mean": x.mean().item(), **dict(zip(("p10", "p25", "p50", "p75", "p90"), q.tolist())),
            "above_theta2": (x > args.theta2).double().mean().item(),
            "below_theta1": (x < args.theta1).double().mean().item()}
