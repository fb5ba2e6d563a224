"""The frontier task: one point per variant on the ppl task, with its measured bytes (fast, offloaded,
reloaded per token), its KL and NLL, and a modelled H100 decode speed."""
from common import weight_bytes
from evaluation.ppl import Continuation

FRONTIER = dict(  # --task frontier: its own grid of ppl points (the context, segments and tokens of ppl)
    evict_methods=("snapkv", "streamingllm", "h2o"), evict_budgets=(64, 128, 256, 512, 1024),
    calidrop_budgets=(64, 128, 256), quant_bits=(2, 4),
    calidrop_variants=tuple(f"{v}{o}" for v in ("recompute", "calidrop") for o in ("", "+int8-offload", "+ott-offload"))
    + ("calibrate",))
FRONTIER_QUICK = dict(FRONTIER, evict_methods=("snapkv",), evict_budgets=(64, 128), calidrop_budgets=(64,),
                      quant_bits=(2,))
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, NVIDIA's datasheet
LINK_BYTES_PER_S = 64e9  # PCIe 5.0 x16, one direction (the H100's host link), nominal


def task_frontier(model, codec, args, device):
    """The memory-accuracy frontier on the ppl task: one point per variant with its measured bytes
    (fast: next to the compute; offloaded: CaliDrop's evicted store; reload traffic per token), its KL and
    NLL, and a modelled H100 decode speed (batch 1): (weights + fast bytes) / HBM + reload / host link."""
    spec = FRONTIER_QUICK if args.quick else FRONTIER
    data = Continuation(model, codec, args, device, h2o="h2o" in spec["evict_methods"])
    groups = ([(m, b, ("evict",)) for b in spec["evict_budgets"] for m in spec["evict_methods"]]
              + [("snapkv", b, spec["calidrop_variants"]) for b in spec["calidrop_budgets"]])
    weights = weight_bytes(model)
    points = [frontier_point("full", None, None, data.full_result, data.full_result["kv_bytes_kept"], weights)]
    for bits in spec["quant_bits"]:
        for name, r in data.quantized(model, bits).items():
            points.append(frontier_point(f"{name}-{bits}bit", None, None, r, r["kv_bytes_kept"], weights))
    for c in data.configs(model, args, groups, "frontier"):
        points.append(frontier_point(c["variant"], c["method"], c["budget"], c,
                                     c["kv_bytes_kept"] + c["calibration_bytes"], weights))
    return {"points": points, "weight_bytes": weights, "full_kv_bytes": data.full_result["kv_bytes_kept"],
            "hbm_bytes_per_s": HBM_BYTES_PER_S, "link_bytes_per_s": LINK_BYTES_PER_S,
            "segments": data.S, "context": data.C, "new_tokens": data.M}


def gpu_tokens_per_s(weights, fast, reload):
    return 1 / ((weights + fast) / HBM_BYTES_PER_S + reload / LINK_BYTES_PER_S)


def frontier_point(variant, method, budget, r, fast, weights):
    """One point of the frontier; bytes per sequence."""
    reload = r.get("reload_bytes_per_token", 0.0)
    offloaded = r.get("kv_bytes_offloaded", 0)
    return {"variant": variant, "method": method, "budget": budget, "fast_bytes": fast,
            "offloaded_bytes": offloaded, "total_bytes": fast + offloaded, "reload_bytes_per_token": reload,
            "kl": r["kl"]["mean"], "kl_se": r["kl"]["se"], "nll": r["nll"]["mean"], "nll_se": r["nll"]["se"],
            "decisions": r.get("decisions"), "gpu_tokens_per_s": gpu_tokens_per_s(weights, fast, reload)}


def family(p):
    """The line a frontier point belongs to: eviction per method, each CaliDrop variant, each quantizer."""
    if p["variant"] == "evict":
        return f"evict {p['method']}"
    return p["variant"].rsplit("-", 1)[0] if p["method"] is None else p["variant"]


def point_name(p):
    return p["variant"] if p["method"] is None else f"{p['method']} {p['budget']} {p['variant']}"
