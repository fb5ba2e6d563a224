"""The long task: long generations in a fixed budget. Teacher-forced continuation of --new-tokens tokens after a
--context-token prompt (the KJV), the kept cache held at budget + --interval tokens per (layer, KV head) by
decode-time eviction (CaliDropConfig.interval); NLL and KL(P_full || P_variant) per token, reported per block
of 256 positions, each variant paired to eviction over segments; the bytes held after 1k, 2k and 4k
generated tokens and at the end (kept, their peak, offloaded, calibration, scoring).

Every (method, budget, variant) is its own cache of the S segments, and all of them decode as one batch
beside the full cache (the reference), so that the weights are read once per step and the reference's
distributions are never stored (T x vocabulary floats per segment)."""
import time

import torch

import calidrop
from common import kv_bytes_per_token
from evaluation.data import load_text, segments
from evaluation.ppl import entropy, kl
from evaluation.variants import Progress, estimate, mean_se, prefill_rows, thresholds
from model import decode_one_token

BLOCK = 256  # positions per reported block
CHECKPOINTS = (1024, 2048, 4096)  # generated tokens at which the bytes held are recorded
BYTES = ("kv_bytes_kept", "kv_bytes_kept_peak", "kv_bytes_offloaded", "calibration_bytes", "kv_bytes_scoring",
         "kv_bytes_selection")


class Batch:
    """Several caches as one batch of rows, each owning S consecutive rows."""

    def __init__(self, caches, rows):
        self.caches, self.rows = caches, rows

    def attend(self, layer, q, k, v, pos):
        parts = zip(self.caches, *(x.split(self.rows) for x in (q, k, v)))
        return torch.cat([c.attend(layer, *qkv, pos) for c, *qkv in parts])


def long_config(args, method, budget, variant):
    theta1, theta2 = thresholds(variant, args)
    return calidrop.CaliDropConfig(method=method, budget=budget, window=args.window, sink=args.sink, theta1=theta1,
                                   theta2=theta2, calibration=variant != "evict", interval=args.interval,
                                   estimate=estimate(variant), page_size=args.page_size,
                                   reload_pages=args.reload_pages, reload_capacity=args.reload_capacity)


def task_long(model, codec, args, device):
    S, C, T = args.segments, args.context, args.new_tokens
    tokens = torch.tensor(segments(codec, load_text(args), S, C + T + 1), device=device)
    inputs, targets = tokens[:, C:-1], tokens[:, C + 1:]
    _, full, recorder = prefill_rows(model, tokens[:, :C], T, args.window, "h2o" in args.methods)
    keys, values = [k[:, :, :C] for k in full.k], [v[:, :, :C] for v in full.v]
    names = [(m, b, v) for m in args.methods for b in args.budgets for v in args.variants]
    caches = [calidrop.CaliDropCache.from_prefill(long_config(args, m, b, v), keys, values, recorder, T,
                                                  calidrop.OffloadStore(device), model.inv_freq) for m, b, v in names]
    batch = Batch([full, *caches], [S] * (1 + len(caches)))
    n = len(caches)
    nll, divergence, spread = (torch.zeros(n + 1, S, T) for _ in range(3))
    held = {c: [] for c in CHECKPOINTS if c <= T}
    progress, t0 = Progress("long: step", T // BLOCK), time.perf_counter()
    for t in range(T):
        pos = torch.tensor([C + t], device=device)
        logp = decode_one_token(model, inputs[:, t:t + 1].repeat(n + 1, 1), pos, batch).log_softmax(-1).view(n + 1, S, -1)
        nll[:, :, t] = -logp.gather(-1, targets[:, t].expand(n + 1, S)[..., None])[..., 0].cpu()
        divergence[:, :, t] = kl(logp[:1].expand_as(logp), logp).cpu()
        spread[:, :, t] = entropy(logp).cpu()
        if t + 1 in held:  # t + 1 tokens generated and fed
            held[t + 1] = [per_sequence(c.stats(C + t + 1), S) for c in caches]
        if (t + 1) % BLOCK == 0:
            progress.step(f"{t + 1} of {T} tokens")
    decode_s = time.perf_counter() - t0
    per_token = kv_bytes_per_token(model.args, model.embed_tokens.weight.dtype)
    configs = []
    for i, ((method, budget, variant), cache) in enumerate(zip(names, caches), start=1):
        stats = per_sequence(cache.stats(C + T), S)
        configs.append({"method": method, "budget": budget, "variant": variant,
                        **block_metrics(nll[i], divergence[i], spread[i]), **stats,
                        "bytes_at": {c: held[c][i - 1] for c in held}, "decisions": cache.decisions(),
                        "kept_tokens_per_head": stats["kv_bytes_kept"] / per_token})  # per (layer, KV head)
    return {"full": {**block_metrics(nll[0], divergence[0], spread[0]), "kv_bytes_kept": full.kv_bytes(C + T) / S},
            "configs": configs, "segments": S, "context": C, "new_tokens": T, "interval": args.interval,
            "block": BLOCK, "decode_s": decode_s}


def per_sequence(stats, S):
    return {key: stats[key] / S for key in BYTES}


def block_metrics(nll, divergence, spread):
    """(S, T) per token -> per segment and block of BLOCK positions (S, T / BLOCK), their means over segments,
    and the whole run's mean per segment."""
    S, T = nll.shape
    blocks = lambda x: x[:, :T // BLOCK * BLOCK].view(S, -1, BLOCK).mean(-1)
    out = {}
    for name, x in (("nll", nll), ("kl", divergence), ("entropy", spread)):
        out[name] = mean_se(x.mean(1))
        out[f"{name}_per_segment"] = x.mean(1).tolist()
        out[f"{name}_per_block"] = blocks(x).tolist()  # [segment][block]
    return out


def paired_blocks(variant, reference, metric):
    """Per block: the variant minus the reference, mean and paired standard error over segments."""
    v, r = (torch.tensor(x[f"{metric}_per_block"]) for x in (variant, reference))
    return [mean_se(d) for d in (v - r).T]


def long_tables(result, settings):
    """results.md: per (method, budget), KL per block for each variant and its paired difference to eviction;
    NLL over the whole run; the bytes held."""
    by = {(c["method"], c["budget"], c["variant"]): c for c in result["configs"]}
    B = result["block"]
    n_blocks = result["new_tokens"] // B
    lines = [f"{result['segments']} segments of {result['context']} + {result['new_tokens']} tokens, decode-time "
             f"eviction every {result['interval']} tokens; full cache NLL {result['full']['nll']['mean']:.3f}, "
             f"{result['full']['kv_bytes_kept'] / 2**20:.1f} MB per sequence at the end.", ""]
    for m in settings["args"]["methods"]:
        for b in settings["args"]["budgets"]:
            evict = by[m, b, "evict"]
            lines += [f"### {m} {b}: KL per block of {B} positions (Δ: minus evict, paired)", "",
                      "| variant | " + " | ".join(f"{i * B}-{(i + 1) * B - 1}" for i in range(n_blocks)) + " | NLL | Δ NLL |",
                      "|---|" + "---:|" * (n_blocks + 2)]
            for v in settings["args"]["variants"]:
                c = by[m, b, v]
                means = torch.tensor(c["kl_per_block"]).mean(0).tolist()
                cells = [f"{x:.3f}" for x in means] if v == "evict" else [
                    f"{x:.3f} ({d['mean']:+.3f} ± {d['se']:.3f})" for x, d in zip(means, paired_blocks(c, evict, "kl"))]
                dn = mean_se(torch.tensor(c["nll_per_segment"]) - torch.tensor(evict["nll_per_segment"]))
                lines.append(f"| {v} | " + " | ".join(cells) + f" | {c['nll']['mean']:.3f} | "
                             f"{dn['mean']:+.3f} ± {dn['se']:.3f} |")
            lines += ["", "| variant | kept MB (end / peak) | offloaded MB | calibration + scoring MB | "
                      + " | ".join(f"kept / offloaded MB at {k}" for k in evict["bytes_at"]) + " | decisions (cal/rec/none) |",
                      "|---|---:|---:|---:|" + "---:|" * len(evict["bytes_at"]) + "---|"]
            mb = 2**-20
            for v in settings["args"]["variants"]:
                c = by[m, b, v]
                d = c["decisions"]
                lines.append(f"| {v} | {c['kv_bytes_kept'] * mb:.2f} / {c['kv_bytes_kept_peak'] * mb:.2f} | "
                             f"{c['kv_bytes_offloaded'] * mb:.2f} | "
                             f"{(c['calibration_bytes'] + c['kv_bytes_scoring']) * mb:.2f} | "
                             + " | ".join(f"{x['kv_bytes_kept'] * mb:.2f} / {x['kv_bytes_offloaded'] * mb:.2f}"
                                          for x in c["bytes_at"].values())
                             + f" | {d['calibrate']:.2f}/{d['recompute']:.2f}/{d['none']:.2f} |")
            lines.append("")
    return lines


def plot_long(result, settings, path):
    """KL against position (per block), one panel per (method, budget), a line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = [(m, b) for m in settings["args"]["methods"] for b in settings["args"]["budgets"]]
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 3.6), squeeze=False)
    by = {(c["method"], c["budget"], c["variant"]): c for c in result["configs"]}
    B = result["block"]
    for ax, (m, b) in zip(axes[0], cells):
        for v in settings["args"]["variants"]:
            kl = torch.tensor(by[m, b, v]["kl_per_block"])
            x = [(i + 0.5) * B for i in range(kl.shape[1])]
            ax.errorbar(x, kl.mean(0), yerr=kl.std(0) / kl.shape[0] ** 0.5, label=v, capsize=2, marker="o", ms=3)
        ax.set(title=f"{m} {b} (+{result['interval']})", xlabel="generated tokens", ylabel="KL(full || variant)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
