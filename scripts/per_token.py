"""Where a variant's NLL and KL move, token by token: a ppl run's results.json (evaluate.py --task ppl keeps
every token's NLL, KL and entropy) -> each variant minus evict of its (method, budget), paired on the same
tokens, split by where the token is (quarters of the teacher-forced span), by how hard it is (quartiles of
the full cache's NLL) and by how much eviction hurt it (quartiles of evict's KL), with the entropy of the
predicted distribution beside it.

    python scripts/per_token.py results/qwen/per_token/results.json > results/qwen/per_token/analysis.md

A bin's difference is the mean over segments of each segment's mean over the bin's tokens, with the paired
standard error over segments (tokens of one segment are not independent)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # evaluation/ is one level up
from evaluation.variants import mean_se  # noqa: E402


def paired(delta, mask):
    """delta (S, M), mask (S, M) bool -> 'mean ± se' over the segments that have tokens in the bin."""
    diff = mean_se([row[m].mean().item() for row, m in zip(delta, mask) if m.any()])
    return f"{diff['mean']:+.3f} ± {diff['se']:.3f}"


def main(path):
    ppl = json.load(open(path))["ppl"]
    full_nll = torch.tensor(ppl["full"]["nll_per_token"], dtype=torch.float64)
    S, M = full_nll.shape
    cuts = full_nll.flatten().quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    hardness = torch.bucketize(full_nll, cuts)  # 0 easiest quarter .. 3 hardest
    position = (torch.arange(M) * 4 // M).expand(S, M)
    bins = {**{f"tokens {q * M // 4}-{(q + 1) * M // 4 - 1}": position == q for q in range(4)},
            **{f"full NLL Q{q + 1}": hardness == q for q in range(4)}}
    configs = {(c["method"], c["budget"], c["variant"]): c for c in ppl["configs"]}
    t = lambda c, key: torch.tensor(c[key], dtype=torch.float64)
    print(f"# Per-token differences to evict ({path})\n")
    print(f"{S} segments x {M} tokens. Full cache: NLL {full_nll.mean():.3f}, entropy "
          f"{t(ppl['full'], 'entropy_per_token').mean():.3f}; full-NLL quartile cuts "
          f"{', '.join(f'{c:.2f}' for c in cuts.tolist())}.\n")
    for (method, budget, variant), c in configs.items():
        if variant == "evict":
            continue
        evict = configs[method, budget, "evict"]
        d_nll, d_kl = t(c, "nll_per_token") - t(evict, "nll_per_token"), t(c, "kl_per_token") - t(evict, "kl_per_token")
        d_ent = t(c, "entropy_per_token") - t(evict, "entropy_per_token")
        evict_kl = t(evict, "kl_per_token")
        hurt = torch.bucketize(evict_kl, evict_kl.flatten().quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
        every = torch.ones(S, M, dtype=torch.bool)
        up = d_nll.flatten().clamp(min=0).sort(descending=True).values
        top = up[:max(1, len(up) // 20)].sum() / up.sum().clamp(min=1e-12)
        print(f"## {method} {budget}: {variant} minus evict\n")
        print(f"All tokens: NLL {paired(d_nll, every)}, KL {paired(d_kl, every)}, entropy {paired(d_ent, every)}; "
              f"NLL up on {(d_nll > 0).double().mean():.0%} of tokens, down on {(d_nll < 0).double().mean():.0%}; "
              f"the 5 % of tokens with the largest rise carry {top:.0%} of all the rise; tokens where KL falls "
              f"and NLL rises: {((d_kl < 0) & (d_nll > 0)).double().mean():.0%}; per-token correlation of the NLL "
              f"and KL differences {torch.corrcoef(torch.stack([d_nll.flatten(), d_kl.flatten()]))[0, 1]:.2f}.\n")
        print("| tokens | ΔNLL | ΔKL | Δentropy |\n|---|---|---|---|")
        for name, mask in {**bins, **{f"evict KL Q{q + 1}": hurt == q for q in range(4)}}.items():
            print(f"| {name} | {paired(d_nll, mask)} | {paired(d_kl, mask)} | {paired(d_ent, mask)} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
