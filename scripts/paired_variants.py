"""Two variants of evaluate.py's ppl task compared cell by cell: variant a minus variant b per segment (paired),
mean ± standard error, for NLL and KL; and the count of cells where a is above b by more than one s.e.

    python -m scripts.paired_variants results/calibration/qwen_ppl12 calidrop-fo calidrop
    python -m scripts.paired_variants results/calibration/qwen_sweep --sweep   # every variant minus evict, with
                                                                                # its decisions and reads
"""
import json
import sys

from evaluation.report import paired_difference


def main(run_dir, a, b):
    configs = json.load(open(f"{run_dir}/results.json"))["ppl"]["configs"]
    by = {(c["method"], c["budget"], c["variant"]): c for c in configs}
    print(f"{run_dir}: {a} minus {b}, paired over segments")
    print("| method | budget | Δ NLL | Δ KL |")
    print("|---|---:|---:|---:|")
    above = {"nll": 0, "kl": 0}
    cells = sorted({(m, n) for m, n, _ in by}, key=lambda c: (c[1], c[0]))
    for method, budget in cells:
        if (method, budget, a) not in by or (method, budget, b) not in by:
            continue
        row = []
        for metric in ("nll", "kl"):
            d = paired_difference(by[method, budget, a][f"{metric}_per_segment"],
                                  by[method, budget, b][f"{metric}_per_segment"])
            above[metric] += d["mean"] > d["se"]
            row.append(f"{d['mean']:+.3f} ± {d['se']:.3f}")
        print(f"| {method} | {budget} | " + " | ".join(row) + " |")
    print(f"cells with {a} above {b} by more than one s.e.: NLL {above['nll']}, KL {above['kl']}")


def sweep(run_dir):
    """Every variant of every cell minus evict, with its decisions and the bytes its recomputes read."""
    configs = json.load(open(f"{run_dir}/results.json"))["ppl"]["configs"]
    evict = {(c["method"], c["budget"]): c for c in configs if c["variant"] == "evict"}
    print(f"{run_dir}: each variant minus evict, paired over segments")
    print("| cell | variant | calibrate / recompute / none | read MB per token | Δ NLL | Δ KL |")
    print("|---|---|---|---:|---:|---:|")
    for c in configs:
        e = evict[c["method"], c["budget"]]
        d = {m: paired_difference(c[f"{m}_per_segment"], e[f"{m}_per_segment"]) for m in ("nll", "kl")}
        fractions = " / ".join(f"{c['decisions'][k]:.2f}" for k in ("calibrate", "recompute", "none"))
        print(f"| {c['method']} {c['budget']} | {c['variant']} | {fractions} | {c['reload_bytes_per_token'] / 2**20:.1f} | "
              f"{d['nll']['mean']:+.3f} ± {d['nll']['se']:.3f} | {d['kl']['mean']:+.3f} ± {d['kl']['se']:.3f} |")


if __name__ == "__main__":
    sweep(sys.argv[1]) if sys.argv[2:] == ["--sweep"] else main(*sys.argv[1:])
