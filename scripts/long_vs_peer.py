"""evaluate.py's long-generation rows, each minus eviction over the whole run (paired per segment), and beside
kvpress's DecodingPress (benchmark/decoding_peer.py) on the same segments: KL(P_full || P) over the generated
positions, and each row minus the peer's, paired per segment.

    python -m scripts.long_vs_peer results/long/smollm2_2k results/long/peer_smollm2 results/long/peer_smollm2_keep_order

The peer may have run on fewer segments (the Qwen peer: 4 of evaluate.py's 8); a segment is matched by the full
cache's NLL over it, the same tokens through the same weights in two implementations (within 2e-3 nats).
"""
import json
import sys

import torch

from evaluation.report import paired_difference
from evaluation.variants import mean_se

SCORERS = {"snapkv": "snapkv", "streamingllm": "streamingllm"}  # evaluate.py's method -> kvpress's scorer


def matched_segments(ours, peer):
    """For each of the peer's segments, the index of ours with the same full-cache NLL."""
    mine = torch.tensor(ours["full"]["nll_per_segment"])
    index = []
    for nll in peer["full"]["nll"]["per_segment"]:
        gap = (mine - nll).abs()
        assert gap.min() < 2e-3, f"no segment of ours has the peer's full-cache NLL {nll:.4f}"
        index.append(int(gap.argmin()))
    return index


def main(ours_dir, *peer_dirs):
    ours = json.load(open(f"{ours_dir}/results.json"))["long"]
    mb = 2**-20
    print(f"{ours_dir}: {ours['segments']} segments of {ours['context']} + {ours['new_tokens']} tokens, "
          f"a cut every {ours['interval']}")
    by = {(c["method"], c["variant"]): c for c in ours["configs"]}
    print("\n| method | row | KL | minus evict (paired) | NLL | minus evict (paired) |")
    print("|---|---|---:|---:|---:|---:|")
    for c in ours["configs"]:
        evict = by[c["method"], "evict"]
        cells = []
        for metric in ("kl", "nll"):
            x = c[f"{metric}_per_segment"]
            s, d = mean_se(x), paired_difference(x, evict[f"{metric}_per_segment"])
            cells += [f"{s['mean']:.3f} ± {s['se']:.3f}", f"{d['mean']:+.3f} ± {d['se']:.3f}"]
        print(f"| {c['method']} | {c['variant']} | " + " | ".join(cells) + " |")
    for peer_dir in peer_dirs:
        peer = json.load(open(f"{peer_dir}/results.json"))
        peer["scorers"] = {name.removesuffix("+order"): p for name, p in peer["scorers"].items()}
        index = matched_segments(ours, peer)
        order = " (kept indices sorted)" if peer["settings"].get("keep_order") else ""
        print(f"\nvs {peer_dir}{order}: segments {index} of ours")
        print("| method | row | KL | minus DecodingPress (paired) | kept MB end / peak |")
        print("|---|---|---:|---:|---:|")
        for c in ours["configs"]:
            scorer = SCORERS.get(c["method"])
            if scorer not in peer["scorers"]:
                continue
            p = peer["scorers"][scorer]
            p_kl = p["kl"]["per_segment"]
            if c["variant"] == "evict":
                s = mean_se(p_kl)
                print(f"| {c['method']} | kvpress DecodingPress{order} | {s['mean']:.3f} ± {s['se']:.3f} | | "
                      f"{p['cache']['bytes_end'] * mb:.2f} / {p['cache']['bytes_peak_attending'] * mb:.2f} |")
            kl = [c["kl_per_segment"][i] for i in index]
            s, d = mean_se(kl), paired_difference(kl, p_kl)
            print(f"| {c['method']} | {c['variant']} | {s['mean']:.3f} ± {s['se']:.3f} | {d['mean']:+.3f} ± {d['se']:.3f} | "
                  f"{c['kv_bytes_kept'] * mb:.2f} / {c['kv_bytes_kept_peak'] * mb:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
