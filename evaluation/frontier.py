"""The frontier task: one point per variant on the ppl task, with its measured bytes (fast, offloaded,
reloaded per token), its KL and NLL, and a modelled H100 decode speed."""
import argparse

from common import weight_bytes
from evaluation.ppl import Continuation

PAGES = (4, 8, 12, 16, 32, "all")  # pages a recompute reads per KV head
FRONTIER = dict(  # --task frontier: its own grid of ppl points (the context, segments and tokens of ppl)
    evict_methods=("snapkv", "streamingllm", "h2o"), evict_budgets=(64, 128, 256, 512, 1024),
    calidrop_budgets=(64, 128, 256), quant_bits=(2, 4),
    calidrop_variants=tuple(f"{v}{o}@{p}" for v in ("recompute", "calidrop") for o in ("", "+int8-offload")
                            for p in PAGES) + ("calidrop+ott-offload@all", "calibrate"),
    # the paper's sensitivity study at budget 64, and one slice past the 2k contexts: how the pages a
    # recompute needs scale with the evicted set
    theta1_sweep=(0.5, 0.6, 0.8), sweep_budget=64, sweep_variants=("calidrop", "calidrop@all"),
    long_context=7936, long_segments=3, long_budget=256,
    long_variants=("evict",) + tuple(f"calidrop@{p}" for p in PAGES))
FRONTIER_QUICK = dict(FRONTIER, evict_methods=("snapkv",), evict_budgets=(64, 128), calidrop_budgets=(64,),
                      quant_bits=(2,), calidrop_variants=("calidrop@2", "calidrop@all", "calidrop+int8-offload@2",
                                                          "calidrop+ott-offload@all", "calibrate"),
                      theta1_sweep=(0.5,), sweep_variants=("calidrop",), long_context=384, long_segments=2,
                      long_budget=64, long_variants=("evict", "calidrop@2", "calidrop@all"))
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, NVIDIA's datasheet
LINK_BYTES_PER_S = 64e9  # PCIe 5.0 x16, one direction (the H100's host link), nominal


def task_frontier(model, codec, args, device):
    """The memory-accuracy frontier on the ppl task: one point per variant with its measured bytes
    (fast: next to the compute, the key sketch included; offloaded: CaliDrop's evicted store; reload
    traffic per token), its KL and NLL, and a modelled H100 decode speed (batch 1): (weights + fast bytes)
    / HBM + reload / host link. Then the theta1 sweep at one budget and the long-context slice."""
    spec = FRONTIER_QUICK if args.quick else FRONTIER
    data = Continuation(model, codec, args, device, h2o="h2o" in spec["evict_methods"])
    groups = ([(m, b, ("evict",)) for b in spec["evict_budgets"] for m in spec["evict_methods"]]
              + [("snapkv", b, spec["calidrop_variants"]) for b in spec["calidrop_budgets"]])
    weights = weight_bytes(model)
    points = [frontier_point("full", None, None, data.full_result, weights)]
    for bits in spec["quant_bits"]:
        for name, r in data.quantized(model, bits).items():
            points.append(frontier_point(f"{name}-{bits}bit", None, None, r, weights))
    points += config_points(data, model, args, groups, "frontier", weights)
    sweep = []
    for theta1 in spec["theta1_sweep"]:
        swept = argparse.Namespace(**{**vars(args), "theta1": theta1})
        group = [("snapkv", spec["sweep_budget"], spec["sweep_variants"])]
        sweep += config_points(data, model, swept, group, f"theta1 {theta1}", weights)
    del data  # the long slice's prefill needs the memory
    long = argparse.Namespace(**{**vars(args), "context": spec["long_context"], "segments": spec["long_segments"]})
    long_data = Continuation(model, codec, long, device, h2o=False)
    group = [("snapkv", spec["long_budget"], spec["long_variants"])]
    long_points = [frontier_point("full", None, None, long_data.full_result, weights)]
    long_points += config_points(long_data, model, long, group, "long context", weights)
    return {"points": points, "theta1_sweep": sweep, "long_context": {
                "points": long_points, "context": long.context, "segments": long_data.S,
                "full_kv_bytes": long_data.full_result["kv_bytes_kept"]},
            "weight_bytes": weights, "full_kv_bytes": points[0]["fast_bytes"],
            "hbm_bytes_per_s": HBM_BYTES_PER_S, "link_bytes_per_s": LINK_BYTES_PER_S,
            "segments": args.segments, "context": args.context, "new_tokens": args.new_tokens}


def config_points(data, model, args, groups, label, weights):
    """The frontier points of the (method, budget, variants) groups, decoded on data with args' thresholds."""
    return [frontier_point(c["variant"], c["method"], c["budget"], c, weights, theta1=args.theta1)
            for c in data.configs(model, args, groups, label)]


def gpu_tokens_per_s(weights, fast, reload):
    return 1 / ((weights + fast) / HBM_BYTES_PER_S + reload / LINK_BYTES_PER_S)


def frontier_point(variant, method, budget, r, weights, theta1=None):
    """One point of the frontier; bytes per sequence. Fast bytes: the kept cache (or a quantized cache),
    the calibration state and the key sketch."""
    fast = r["kv_bytes_kept"] + r.get("calibration_bytes", 0) + r.get("kv_bytes_selection", 0)
    reload = r.get("reload_bytes_per_token", 0.0)
    offloaded = r.get("kv_bytes_offloaded", 0)
    return {"variant": variant, "method": method, "budget": budget, "theta1": theta1, "fast_bytes": fast,
            "selection_bytes": r.get("kv_bytes_selection", 0), "offloaded_bytes": offloaded,
            "total_bytes": fast + offloaded, "reload_bytes_per_token": reload,
            "reload_share": reload / offloaded if offloaded else 0.0,
            "kl": r["kl"]["mean"], "kl_se": r["kl"]["se"], "nll": r["nll"]["mean"], "nll_se": r["nll"]["se"],
            "decisions": r.get("decisions"), "gpu_tokens_per_s": gpu_tokens_per_s(weights, fast, reload)}


def family(p):
    """The line a frontier point belongs to: eviction per method, each CaliDrop variant, each quantizer."""
    if p["variant"] == "evict":
        return f"evict {p['method']}"
    return p["variant"].rsplit("-", 1)[0] if p["method"] is None else p["variant"]


def point_name(p):
    return p["variant"] if p["method"] is None else f"{p['method']} {p['budget']} {p['variant']}"
