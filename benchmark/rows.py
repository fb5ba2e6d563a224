"""bench.py's rows: what each row is (the full cache, eviction, CaliDrop), the one prefill that every row of a
prompt length starts from, the decode steps (eager or compiled once for every length), the timed decode,
and the bytes a row's cache holds checked against its own counts."""
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import torch

import calidrop
from common import cache_stats, checked_config, offload_store, synchronize
from model import FullCache, decode_one_token, prefill


@dataclass
class Variant:
    name: str
    config: calidrop.CaliDropConfig | None  # None: the full cache

    @property
    def recomputes(self):
        return self.config is not None and self.config.recomputes


def make_variants(args, n_kv_heads):
    """The rows: the full cache, then per method eviction, calibrate-only (theta1 = -1) and CaliDrop with
    the page-sparse recompute. With --recompute-heads N, CaliDrop's cosine rule is replaced by a fixed
    rate (on random weights the cosine means nothing): every head is stale (theta1 = 1, theta2 > 1: nothing
    calibrates) and the reload capacity lets exactly N of the n_kv_heads KV heads per layer-step and sequence
    recompute (run_row scales it to the batch: the capacity is shared by the batch's pairs)."""
    variants = [Variant("full", None)]
    for method in args.methods:
        base = dict(method=method, budget=args.budget, window=args.window, sink=args.sink,
                    page_size=args.page_size, reload_pages=args.reload_pages)
        if args.recompute_heads:
            name, rule = (f"{method} calidrop forced {args.recompute_heads}/{n_kv_heads}",
                          dict(theta1=1.0, theta2=2.0, reload_capacity=args.recompute_heads))
        else:
            name, rule = (f"{method} calidrop {args.theta1:g}/{args.theta2:g}",
                          dict(theta1=args.theta1, theta2=args.theta2, reload_capacity=args.reload_capacity))
        variants += [
            Variant(f"{method} evict", checked_config(**base, calibration=False)),
            Variant(f"{method} calidrop -1", checked_config(**base, theta1=-1.0, theta2=args.theta2)),
            Variant(name, checked_config(**base, **rule)),
        ]
    return variants


@dataclass
class Shared:
    """One prefill of one prompt length: what every row of that length starts from."""
    length: int
    tokens: torch.Tensor     # (batch, length)
    full: FullCache          # L + new_tokens slots; the full rows decode in it
    recorder: calidrop.PrefillRecorder
    first: torch.Tensor      # (1, 1) the greedy token from the prompt's last logits
    prefill_s: float
    room: int                # slots for generated tokens in every cache built from this prefill
    keys: list = field(default_factory=list)    # per layer (B, Hkv, L, D) views of the prompt's K/V
    values: list = field(default_factory=list)


def shared_prefill(model, prompts, new_tokens, h2o, window, device, dtype):
    """prompts: one list of token ids per sequence, all of one length (batch > 1: the paper's throughput
    setting, distinct sequences)."""
    tokens = torch.tensor(prompts, device=device)
    B, L = tokens.shape
    full = FullCache(model.args, B, L + new_tokens, device, dtype)
    recorder = calidrop.PrefillRecorder(full, window, h2o=h2o)
    synchronize(device)
    t0 = time.perf_counter()
    first = prefill(model, tokens, recorder).argmax(-1, keepdim=True)
    synchronize(device)
    s = Shared(L, tokens, full, recorder, first, time.perf_counter() - t0, new_tokens)
    s.keys = [k[:, :, :L] for k in full.k]
    s.values = [v[:, :, :L] for v in full.v]
    return s


def cache_tensors(cache):
    """Every tensor a cache holds (for the memory column and the byte-count check)."""
    if isinstance(cache, FullCache):
        return {"kv": [*cache.k, *cache.v], "offloaded": [], "calibration": [], "selection": [], "other": [cache.slots]}
    store, layers = cache.store, cache.layers
    offloaded = [*store.k.values(), *store.v.values()] if hasattr(store, "k") else []
    sketches = [s.pages.sketch for s in layers if s.pages is not None]
    return {"kv": [t for s in layers for t in (s.k, s.v)], "offloaded": offloaded,
            "calibration": [t for s in layers for t in (s.hist_q, s.hist_out, s.hist_lse) if t is not None],
            "selection": [t for s in sketches for t in s.tensors],
            "other": [t for s in layers for t in (s.slots, s.slot_offset)] + [cache.counts, cache.reloads,
                                                                            cache.reload_tokens]}


def nbytes(tensors):
    return sum(t.nbytes for t in tensors)


def storage_bytes(tensors):
    """Bytes the tensors keep alive: each distinct storage once and whole (a view keeps its whole buffer)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def filled_kv_bytes(cache):
    """K/V bytes of the slots that really hold a token, counted from the tensors (a written key is never
    all zeros; unwritten slots are)."""
    keys = cache.k if isinstance(cache, FullCache) else [s.k for s in cache.layers]
    filled = sum(int((k != 0).any(-1).sum()) for k in keys)  # per layer: batch, head, slot
    k0 = keys[0]
    return 2 * filled * k0.shape[-1] * k0.element_size()


def check_bytes(cache, stats):
    """The summary's byte counts against the memory the tensors keep alive; returns a list of mismatches."""
    held = cache_tensors(cache)
    problems = []
    checks = [("kv_bytes_kept", filled_kv_bytes(cache)), ("kv_bytes_allocated", storage_bytes(held["kv"])),
              ("calibration_bytes", storage_bytes(held["calibration"])),
              ("kv_bytes_selection", storage_bytes(held["selection"]))]
    if held["offloaded"] or stats["kv_bytes_offloaded"] == 0:
        checks.append(("kv_bytes_offloaded", storage_bytes(held["offloaded"])))
    for key, actual in checks:
        if stats[key] != actual:
            problems.append(f"{key} {stats[key]} != {actual} held")
    if isinstance(cache, calidrop.CaliDropCache) and not cache.config.recomputes and stats["kv_bytes_offloaded"]:
        problems.append("evicted K/V kept although nothing can recompute")
    return problems


# -------------------------------------------------------------------------------------- compile

class Steps:
    """The decode-step callables: eager, and compiled ones created once and shared by the rows, so that
    one graph serves every prompt length and both methods of a variant (on CPU a cold compile of the
    30-layer step costs minutes: it must not be paid per row). Every step compiles whole (fullgraph):
    calidrop.py's recompute has shapes that do not depend on its decisions.

    The full cache's slot dimension changes with the prompt length: it is marked dynamic, so it is
    symbolic from the first compile; every other size stays static (dynamic=False), the batch size included
    (a second batch size compiles again: a symbolic one makes FlexAttention's decode on CUDA fall back to
    its general kernel). A compressed cache's buffers are budget-sized and its prompt length
    enters the step as a tensor (calidrop.py's slot_offset), so its step compiles once; but a recomputing
    step also holds the evicted store and sketch, whose length changes with the prompt: it compiles
    again per length, statically (dynamic=False), as generate.py --compile does (at 8k, a symbolic
    evicted length made CaliDrop's step 74.2 ms against 69.2 static)."""

    def __init__(self, device, backend="inductor"):
        self.device, self.backend = device, backend  # backend: a test's recorder
        self._compiled = {}
        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.accumulated_cache_size_limit = 4096

    def get(self, mode, variant, cache):
        if mode == "eager":
            return decode_one_token
        full, recomputes = variant.config is None, variant.recomputes
        cuda_graphs = uses_cuda_graphs(self.device, variant, cache)
        key = (full, cuda_graphs, recomputes)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(decode_one_token, mode="reduce-overhead" if cuda_graphs else None,
                                                fullgraph=True, dynamic=False, backend=self.backend)
        compiled = self._compiled[key]
        if not full:
            return compiled
        for t in (*cache.k, *cache.v):
            torch._dynamo.mark_dynamic(t, 2)
        torch._dynamo.mark_dynamic(cache.slots, 0)

        def step(*args):
            with torch._dynamo.config.patch(force_parameter_static_shapes=False):  # let the marks count
                return compiled(*args)
        return step

    @staticmethod
    def graphs():
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]


def uses_cuda_graphs(device, variant, cache):
    """CUDA graphs (reduce-overhead) for every compiled row on CUDA; a recomputing row's only where the GPU
    reads the offload store itself (offload_gather.py, Triton): otherwise its reads go through the host,
    which a graph cannot capture."""
    return device.type == "cuda" and (not variant.recomputes or bool(getattr(cache.store, "on_gpu", None)))


def prepare_for_cuda_graphs(cache):
    """Cache tensors are mutated in place every step: tell the compiler their addresses never change."""
    held = cache_tensors(cache)
    for t in (*held["kv"], *held["calibration"], *held["selection"], *held["other"]):
        torch._dynamo.mark_static_address(t, guard=False)


def decode(step, model, shared, cache, n_new, device, warmup, track_reloads=False, cuda_graphs=False, forced=None):
    """Greedy decode of n_new tokens (the first from the prefill; n_new - 1 steps); with `forced` (another
    row's tokens, (B, n_new)), teacher-forced: each step is fed forced's tokens, so that both rows see the
    same inputs (every sequence: with a reload capacity shared by the batch, one sequence's inputs move
    the others' decisions).
    Returns the tokens (each step's argmax), per step its time, whether something compiled in it and the
    layers that reloaded, and the first sequence's logits (n_new - 1, vocab) on the CPU."""
    token = shared.first.clone()  # (B, 1)
    pos = torch.tensor([shared.length], device=device)
    tokens, times, compiled, reloads, seen = [token], [], [], [], []
    counts = cache.counts[..., 1].sum((1, 2)).cpu() if track_reloads else None
    for i in range(n_new - 1):
        graphs = Steps.graphs()
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        synchronize(device)
        t0 = time.perf_counter()
        logits = step(model, token, pos, cache)
        token = logits.argmax(-1, keepdim=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        compiled.append(Steps.graphs() != graphs)
        seen.append(logits[0].cpu())  # outside the timed region; a copy (a CUDA graph reuses its output)
        tokens.append(token)
        if forced is not None and i + 1 < forced.shape[1]:
            # the strides of an argmax's (B, 1): a column of forced has forced's, and a compiled step guards on them
            token = forced[:, i + 1:i + 2].to(device).clone(memory_format=torch.contiguous_format)
        pos += 1
        if track_reloads:  # outside the timed region: which layers recomputed (and reloaded) this step
            now = cache.counts[..., 1].sum((1, 2)).cpu()
            reloads.append([i for i in range(len(now)) if now[i] > counts[i]])
            counts = now
    return torch.cat(tokens, 1), times, compiled, reloads, torch.stack(seen)


def timing_summary(times, compiled, warmup):
    """Steps after warm-up that compiled nothing; median and mean-based tokens/s."""
    kept = [t for i, (t, c) in enumerate(zip(times, compiled)) if i >= warmup and not c]
    if not kept:
        return {"timed_steps": 0, "step_ms": None, "tokens_per_s": None}
    return {"timed_steps": len(kept), "step_ms": 1e3 * statistics.median(kept),
            "tokens_per_s": len(kept) / sum(kept), "excluded_compile_steps": sum(compiled[warmup:])}


def run_row(variant, mode, shared, model, steps, args, device, wbytes, bw, reference=None):
    """Build the row's cache from the shared prefill, decode, and measure. reference: the eager row's tokens
    (B, n) and first sequence's logits, which a compiled row is teacher-forced on and compared with. Returns
    the row and its own (tokens, logits), the reference for a compiled row of the same variant."""
    n_new = args.new_tokens if mode == "eager" else args.compile_new_tokens
    recomputes = variant.recomputes
    other_bytes = 0
    if variant.config is None:
        cache, compress_s = shared.full, 0.0
        for buf in (*cache.k, *cache.v):  # a previous row's generated K/V: unwritten slots must read as empty
            buf[:, :, shared.length:].zero_()
    else:
        config = variant.config
        if args.recompute_heads:  # the forced rate: N KV heads per layer-step of each sequence
            config = dataclasses.replace(config, reload_capacity=args.recompute_heads * shared.tokens.shape[0])
        synchronize(device)
        t0 = time.perf_counter()
        # eager and compiled rows: the same room, so the same shapes
        cache = calidrop.CaliDropCache.from_prefill(config, shared.keys, shared.values, shared.recorder,
                                                    shared.room, offload_store(device), model.inv_freq)
        synchronize(device)
        compress_s = time.perf_counter() - t0
    cuda_graphs = mode == "compile" and uses_cuda_graphs(device, variant, cache)
    if cuda_graphs:
        prepare_for_cuda_graphs(cache)
    held = cache_tensors(cache)
    held_bytes = sum(storage_bytes(v) for v in held.values())
    if device.type == "cuda":
        synchronize(device)
        other_bytes = torch.cuda.memory_allocated(device) - wbytes - held_bytes
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    every, times, compiled, reloads, logits = decode(steps.get(mode, variant, cache), model, shared, cache, n_new,
                                                     device, args.warmup, recomputes, cuda_graphs,
                                                     None if reference is None else reference[0])
    tokens = every[0].tolist()  # the first sequence's
    decode_s = time.perf_counter() - t0
    timing = timing_summary(times, compiled, args.warmup)
    fed = n_new - 1  # the last sampled token is never fed
    stats = cache_stats(cache, shared.length + fed)
    peak = (torch.cuda.max_memory_allocated(device) - other_bytes if device.type == "cuda"
            else wbytes + held_bytes)

    B = shared.tokens.shape[0]
    kv_read = nbytes(held["kv"]) + nbytes(held["calibration"])  # whole buffers: masked slots are read too
    row = {"length": shared.length, "batch": B, "row": variant.name, "mode": mode, "method": None,
           "variant": "full", "new_tokens": n_new, "prefill_s": shared.prefill_s + compress_s,
           "compress_s": compress_s, **timing, "first_step_s": times[0], "recompiles": sum(compiled[1:]),
           "decode_wall_s": decode_s,
           "peak_memory_bytes": peak, "weight_bytes": wbytes,
           **{k: v for k, v in stats.items() if k != "decisions"}, "decisions": stats["decisions"],
           "bytes_check": check_bytes(cache, stats), "tokens": tokens}
    if reference is not None:
        row.update(compare_logits(logits, reference[1], model.embed_tokens.weight.dtype))
    if variant.config is not None:
        c = variant.config
        row.update(method=c.method, budget=c.budget, theta1=c.theta1 if c.calibration else None,
                   theta2=c.theta2 if c.calibration else None, reload_pages=c.reload_pages,
                   reload_capacity=c.reload_capacity,
                   variant="evict" if not c.calibration else "calibrate" if not c.recomputes else "calidrop")
    link = sketch_read = 0.0
    if recomputes:
        valid = [i for i, c in enumerate(compiled) if i >= args.warmup and not c]
        steps_r = [i for i in valid if reloads[i]]
        steps_p = [i for i in valid if not reloads[i]]
        row["recompute_step_rate"] = len(steps_r) / max(len(valid), 1)
        row["recompute_layer_rate"] = sum(len(reloads[i]) for i in valid) / max(len(valid), 1) / model.args.n_layers
        row["recompute_step_ms"] = 1e3 * statistics.median([times[i] for i in steps_r]) if steps_r else None
        row["plain_step_ms"] = 1e3 * statistics.median([times[i] for i in steps_p]) if steps_p else None
        link = cache.reloaded_bytes() / len(times)  # KV-head granular: what was really read
        # the sketch of each KV head that recomputed (at most: the second pass reads 4N of its pages)
        sketch_read = stats["kv_bytes_selection"] * stats["reload_fraction"]
        row["reload_bytes_per_token"] = link
    # bytes per step, all sequences: fast memory (weights once, the cache buffers, the sketch read) and the
    # host link (the evicted K/V a recompute reads back; on CPU the same memory)
    row["fast_bytes_per_token"] = wbytes + kv_read + sketch_read
    row["link_bytes_per_token"] = link
    row["bytes_per_token"] = row["fast_bytes_per_token"] + link
    if row["tokens_per_s"]:
        steps_per_s = row["tokens_per_s"]
        row["tokens_per_s"] = B * steps_per_s  # one token per sequence and step
        row["gb_per_s"] = row["bytes_per_token"] * steps_per_s / 1e9
        bound_s = row["fast_bytes_per_token"] / (bw["fast"] * 1e9) + link / (bw["link"] * 1e9)
        row["bound_fraction"] = bound_s * steps_per_s  # the time the bytes alone need, over the step's
    if variant.config is not None:
        del cache
    return row, (every, logits)


COMPILE_TOLERANCE_EPS = 8  # in 16-bit dtypes: compiled logits within 8 eps x the largest |logit| of eager's


def compare_logits(logits, eager, dtype):
    """A compiled row's logits (teacher-forced on the eager tokens) against the eager row's, step by step: the
    largest difference, and where the dtype is 16-bit the tolerance it is held to. In float32 the check is
    exact greedy token identity; in bfloat16 / float16 the step rounds its activations at every layer and
    compiled kernels round in other places (random weights give near-tied logits), so the check is
    max |compiled - eager| <= COMPILE_TOLERANCE_EPS x eps(dtype) x max |eager logit|."""
    n = min(len(logits), len(eager))
    diff = (logits[:n] - eager[:n]).abs().max().item() if n else 0.0
    exact = dtype in (torch.float32, torch.float64)
    scale = eager[:n].abs().max().item() if n else 0.0
    return {"logits_max_diff_vs_eager": diff, "logits_max_abs": scale,
            "logits_tolerance": None if exact else COMPILE_TOLERANCE_EPS * torch.finfo(dtype).eps * scale}



def peer_row(peer, tokens, args, bw, kv_per_token):  # bw: {"fast": GB/s, "link": GB/s}
    """The transformers peer's row, measured as this project's rows are (kv_per_token: K/V bytes per token)."""
    device = peer.device
    if device.type == "cuda":
        synchronize(device)
        other_bytes = torch.cuda.memory_allocated(device) - peer.weight_bytes
        torch.cuda.reset_peak_memory_stats(device)
    new_tokens, prefill_s, steps, total, cache_bytes = peer.generate(tokens, args.new_tokens)
    timing = timing_summary(steps, [False] * len(steps), args.warmup)
    L = tokens.shape[1]
    mean_ctx = L + (args.warmup + len(steps)) / 2  # attended tokens, averaged over the timed steps
    row = {"length": L, "row": "transformers generate", "mode": "eager", "method": None, "variant": "peer",
           "new_tokens": args.new_tokens, "prefill_s": prefill_s, "generate_s": total,
           "decode_tokens_per_s_total_minus_prefill": len(steps) / (total - prefill_s),
           **timing, "weight_bytes": peer.weight_bytes, "kv_bytes_kept": cache_bytes,
           "kv_bytes_full": cache_bytes, "kv_bytes_offloaded": 0, "calibration_bytes": 0,
           "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) - other_bytes
                                 if device.type == "cuda" else peer.weight_bytes + cache_bytes),
           "bytes_per_token": peer.weight_bytes + kv_per_token * mean_ctx, "link_bytes_per_token": 0.0,
           "tokens": new_tokens, "transformers": peer.version, "batch": 1}
    row["fast_bytes_per_token"] = row["bytes_per_token"]
    if row["tokens_per_s"]:
        row["gb_per_s"] = row["bytes_per_token"] * row["tokens_per_s"] / 1e9
        row["bound_fraction"] = row["gb_per_s"] / bw["fast"]
    return row
