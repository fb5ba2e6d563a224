"""Which estimate of the evicted set's (out, lse) at the current query q should a "calibrate" decision merge?
A screening run for issue 31, before any candidate goes into calidrop.py: each candidate replaces only what a
calibrate decision merges; the decisions are the paper's (theta2 = 0.85, no recompute, every evicted token
kept in memory so that the exact values can be computed beside them).

    python -m scripts.calibration_estimates qwen2.5-coder-0.5b --segments 6 --budget 64 --method snapkv

Candidates, per (sequence, layer, query head), h = hist_q, Δ = q - h, s = 1/sqrt(D), p the softmax of h over
the evicted keys, kbar = Σ p_i k_i, o = hist_out (extra fast memory per query head in brackets):
  stale      (o, lse(h)): the paper                                                     [0]
  lse1       (o, lse(h) + s Δ.kbar): the tangent of lse, a lower bound (lse is convex)  [D: kbar]
  first1     lse1, out o + J Δ with J = s Σ p_i (v_i - o)(k_i - kbar)^T, the full D x D  [D^2: the oracle of
             first order]
  kbar1      lse1, out o + u (ŵ.Δ), u = J ŵ, ŵ = kbar / |kbar|: J along the evicted keys' mean [2D]
  pc1        lse1, out o + u (ŵ.Δ), ŵ the top principal direction of the keys under p       [3D]
  exact      the exact (out_E(q), lse_E(q)): the oracle
For each: the mean NLL and KL(P_full || P) over the teacher-forced tokens, paired to eviction over segments,
and the error of the merged attention output against the full cache's at the calibrate decisions (relative
norm, per layer, averaged).
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import calidrop
from calidrop import CaliDropCache, CaliDropConfig, attention_with_lse, merge
from common import TextCodec, kjv_text, resolve_checkpoint
from evaluation.data import segments
from evaluation.ppl import kl
from evaluation.variants import feed, prefill_rows
from model import load_model

CANDIDATES = ("stale", "lse1", "first1", "kbar1", "pc1", "exact")


def moments(h, k, v):
    """p = softmax(s h.k) over the evicted set (B, Hkv, G, E); kbar, o (B, Hkv, G, D); the centred keys and
    values (B, Hkv, G, E, D)."""
    D = h.shape[-1]
    p = torch.softmax(h @ k.transpose(-1, -2) / math.sqrt(D), -1)
    kbar, o = p @ k, p @ v
    return p, kbar, o, k[:, :, None] - kbar[..., None, :], v[:, :, None] - o[..., None, :]


def estimate(mode, q, h, hist_out, hist_lse, k, v):
    """(out, lse) of the evicted set at q (B, Hq, D) by the candidate `mode`."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    if mode == "stale":
        return hist_out, hist_lse
    if mode == "exact":
        return attention_with_lse(q, k, v)
    s = 1 / math.sqrt(D)
    hg, dq = h.view(B, Hkv, -1, D), (q - h).view(B, Hkv, -1, D)
    p, kbar, o, kc, vc = moments(hg, k, v)
    lse = hist_lse + s * (dq * kbar).sum(-1).view(B, Hq)
    if mode == "lse1":
        return hist_out, lse
    if mode == "first1":
        proj = (kc @ dq[..., None])[..., 0] * s  # (B, Hkv, G, E): (k_i - kbar).Δ s
        return hist_out + ((p * proj)[..., None] * vc).sum(-2).view(B, Hq, D), lse
    if mode == "kbar1":
        w = F.normalize(kbar, dim=-1)
    else:  # pc1: the top eigenvector of Σ p_i kc_i kc_i^T by power iteration
        w = F.normalize(kbar, dim=-1)
        for _ in range(8):
            w = F.normalize(((p * (kc @ w[..., None])[..., 0])[..., None] * kc).sum(-2), dim=-1)
    u = s * ((p * (kc @ w[..., None])[..., 0])[..., None] * vc).sum(-2)  # J w
    return hist_out + (u * (w * dq).sum(-1, keepdim=True)).view(B, Hq, D), lse


def patched(mode, theta2, errors):
    """CaliDropCache.calibrated with the paper's decisions (calibrate if rho > theta2, never recompute) and the
    candidate's estimate; records the merged output's relative error against full attention per layer."""
    def calibrated(self, layer, q, out_kept, lse_kept):
        state = self.layers[layer]
        rho = F.cosine_similarity(q.float(), state.hist_q.float(), dim=-1)
        calibrate = rho > theta2
        k, v = (x.to(q.device) for x in self.store.get(layer))
        out, lse = estimate(mode, q.float(), state.hist_q.float(), state.hist_out.float(), state.hist_lse, k.float(),
                            v.float())
        merged, _ = merge(out_kept, lse_kept, out.to(out_kept.dtype), lse)
        exact, _ = merge(out_kept, lse_kept, *attention_with_lse(q, k, v))
        err = (merged - exact).norm(dim=-1) / exact.norm(dim=-1)  # (B, Hq): exact = full attention
        errors.setdefault(layer, []).append((err[calibrate].sum().item(), int(calibrate.sum())))
        self.count(layer, calibrate, torch.zeros_like(calibrate))
        return torch.where(calibrate[..., None], merged, out_kept)
    return calibrated


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--segments", type=int, default=6)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--method", default="snapkv")
    p.add_argument("--theta2", type=float, default=0.85)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--out", help="write the per-segment numbers here (JSON)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    ckpt = resolve_checkpoint(args.ckpt)
    model, codec = load_model(ckpt), TextCodec(ckpt)
    S, C, M = args.segments, args.context, args.new_tokens
    tokens = torch.tensor(segments(codec, kjv_text(), S, C + M + 1))
    inputs, targets = tokens[:, C:-1], tokens[:, C + 1:]
    _, full, recorder = prefill_rows(model, tokens[:, :C], M, 32, args.method == "h2o")
    reference = torch.stack(list(feed(model, full, inputs, C)), 1)
    keys, values = [k[:, :, :C].clone() for k in full.k], [v[:, :, :C].clone() for v in full.v]
    original, results = CaliDropCache.calibrated, {}
    for mode in ["evict"] + args.candidates.split(","):
        t0, errors = time.perf_counter(), {}
        calibrate = mode != "evict"
        config = CaliDropConfig(method=args.method, budget=args.budget, calibration=calibrate,
                                theta1=-0.99999 if calibrate else 0.7, reload_pages=None)
        CaliDropCache.calibrated = patched(mode, args.theta2, errors) if calibrate else original
        cache = CaliDropCache.from_prefill(config, keys, values, recorder, M, calidrop.OffloadStore("cpu"),
                                           model.inv_freq)
        logp = torch.stack(list(feed(model, cache, inputs, C)), 1)
        nll = (-logp.gather(-1, targets[..., None])[..., 0]).mean(1)
        divergence = kl(reference, logp).mean(1)
        by_layer = [sum(e for e, _ in errors[i]) / max(sum(n for _, n in errors[i]), 1) for i in sorted(errors)]
        results[mode] = {"nll": nll.tolist(), "kl": divergence.tolist(), "rel_error_by_layer": by_layer,
                         "calibrate": cache.decisions()["calibrate"] if calibrate else 0.0}
        print(f"{mode:8s} NLL {nll.mean():.4f} KL {divergence.mean():.4f} calibrate {results[mode]['calibrate']:.3f} "
              f"merged-output error at calibrate decisions {sum(by_layer) / max(len(by_layer), 1):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    CaliDropCache.calibrated = original
    base = results["evict"]
    print(f"paired to evict over {S} segments (mean ± s.e.): {args.method} {args.budget}")
    for mode, r in results.items():
        dn, dk = (torch.tensor(r[m]) - torch.tensor(base[m]) for m in ("nll", "kl"))
        se = lambda x: x.std().item() / math.sqrt(len(x)) if len(x) > 1 else 0.0
        print(f"  {mode:8s} dNLL {dn.mean():+.4f} ± {se(dn):.4f}  dKL {dk.mean():+.4f} ± {se(dk):.4f}")
    if args.out:
        json.dump({"settings": vars(args), "results": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
