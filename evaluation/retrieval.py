"""The retrieval tasks (passkey, multikey, needle): exact match of the generated key, question-aware
(the question is compressed with the rest) and query-agnostic (the question is decoded after compression).
answer_all (one prefill, then every cache answers) serves evaluation/ruler.py too."""
import re
import time

import torch

from common import cache_stats, kv_bytes_per_token
from evaluation.data import encode, load_text, retrieval_prompts
from evaluation.variants import (BYTES, Progress, batches, build_batch, config_stats, feed, fractions, grid, mean_se,
                                 per_sequence, prefill_rows, quantized_caches)
from model import decode_one_token

ANSWER_EXTRA = 2  # answer tokens generated beyond the key's own (its leading space, a full stop)


def greedy(model, cache, logp, start, n, stop=None):
    """n greedy tokens per row (B, n) after log-probs logp (B, V), feeding all but the last; with stop (token
    ids), fewer once every row has produced one of them (one host sync per step)."""
    tokens = [logp.argmax(-1, keepdim=True)]
    done = None if stop is None else torch.isin(tokens[0][:, 0], stop)
    for t in range(n - 1):
        if done is not None and bool(done.all()):
            break
        pos = torch.tensor([start + t], device=logp.device)
        tokens.append(decode_one_token(model, tokens[-1], pos, cache).argmax(-1, keepdim=True))
        if done is not None:
            done |= torch.isin(tokens[-1][:, 0], stop)
    return torch.cat(tokens, 1)


def answered(codec, ids, value):
    """Exact match: the first number in the generated text is the key's value."""
    numbers = re.findall(r"\d+", codec.decode(ids))
    return bool(numbers) and numbers[0] == value


def run_prompt(model, codec, args, ids, tail, value):
    """One passkey, multikey or needle prompt (see answer_all): {correct} per cache."""
    n_new = len(encode(codec, " " + value)) + ANSWER_EXTRA
    return answer_all(model, args, ids, tail, n_new, lambda out: {"correct": answered(codec, out, value)})


def answer_all(model, args, ids, tail, n_new, judge, quantized=True, stop=None):
    """One prompt through the full cache, the quantized caches (unless quantized is False) and every config
    of the grid, from one prefill: aware, ids already hold the tail (it is compressed with the rest);
    agnostic, the tail is decoded after compression; then up to n_new greedy tokens (fewer once every row
    of a batch has produced a stop id), and judge(generated ids) -> the record's scores. Returns a record
    {scores, stats} for the full cache, {name: {scores, stats}} for the quantized caches and
    {(method, budget, variant): {scores, stats, counts, decode_s}}; the bytes are counted at n_new generated
    tokens, early stop or not."""
    L = ids.shape[1]
    logits, full, recorder = prefill_rows(model, ids, tail.shape[1] + n_new, args.window, "h2o" in args.methods)

    def answer(cache, rows):
        logp = logits.log_softmax(-1).repeat(rows, 1)
        for logp in feed(model, cache, tail.repeat(rows, 1), L):
            pass  # only the log-probs after the last tail token matter: they give the first answer token
        out = greedy(model, cache, logp, L + tail.shape[1], n_new, stop)
        return [judge(row.tolist()) for row in out]

    n_tokens = L + tail.shape[1] + n_new - 1  # the last generated token is never fed
    reference = {**answer(full, 1)[0], "stats": per_sequence(cache_stats(full, n_tokens), 1)}
    quantized = {name: {**answer(cache, 1)[0], "stats": per_sequence(cache.stats(n_tokens), 1)}
                 for name, cache in (quantized_caches(model, full, L) if quantized else {}).items()}
    results = {}
    per_token = kv_bytes_per_token(model.args, model.embed_tokens.weight.dtype)
    for groups in batches(grid(args), 1, L, per_token):
        rows, layout = build_batch(args, groups, full, recorder, L, tail.shape[1] + n_new, model.inv_freq)
        t0 = time.perf_counter()
        judged = answer(rows, len(layout))
        decode_s = (time.perf_counter() - t0) / len(layout)
        for method, budget, variant, cache, in_cache, in_batch in layout:
            stats, counts = config_stats(cache, in_cache, variant, n_tokens)
            results[method, budget, variant] = {**judged[in_batch.start], "stats": stats,
                                                "counts": counts, "decode_s": decode_s}
    return reference, quantized, results


def task_retrieval(task, model, codec, args, device):
    """passkey / multikey: question-aware and query-agnostic; needle: query-agnostic only. Accuracy is
    exact match over depths x keys x lengths; per length too."""
    modes = ("agnostic",) if task == "needle" else ("aware", "agnostic")
    prompts = retrieval_prompts(task, codec, args, load_text(args) if task == "needle" else None)
    progress = Progress(f"{task}: prompt", len(prompts) * len(modes))
    out = {"modes": {}, "lengths": list(args.lengths if task == "passkey" else args.needle_lengths), "depths": list(args.depths), "keys": args.keys}
    for mode in modes:
        full, per_quantized, per_config = [], {}, {}
        for length, depth, context, question, value in prompts:
            ids, tail = (context + question, []) if mode == "aware" else (context, question)
            reference, quantized, results = run_prompt(model, codec, args, torch.tensor([ids], device=device),
                                                       torch.tensor([tail], device=device, dtype=torch.long), value)
            full.append({**reference, "length": length})
            for name, record in quantized.items():
                per_quantized.setdefault(name, []).append({**record, "length": length})
            for config, record in results.items():
                per_config.setdefault(config, []).append({**record, "length": length})
            progress.step(f"{mode} {length} tokens, depth {depth:.0%}: full cache "
                          f"{'right' if reference['correct'] else 'wrong'}, "
                          f"{sum(r['correct'] for r in results.values())}/{len(results)} configs right")
        out["modes"][mode] = {"full": summary(full),
                              "quantized": {name: summary(records) for name, records in per_quantized.items()},
                              "configs": [{"method": m, "budget": b, "variant": v, **summary(records, full)}
                                          for (m, b, v), records in per_config.items()]}
    return out


def summary(records, full=None):
    """Accuracy (mean, se; per length; every answer) and bytes per sequence averaged over the prompts;
    for a config also whether it retrieves every key the full cache does, its decisions and decode time."""
    by_length = {}
    for r in records:
        by_length.setdefault(str(r["length"]), []).append(r["correct"])
    out = {"accuracy": mean_se([float(r["correct"]) for r in records]),
           "accuracy_by_length": {n: sum(c) / len(c) for n, c in by_length.items()},
           "correct": [r["correct"] for r in records],
           **{k: sum(r["stats"][k] for r in records) / len(records) for k in BYTES}}
    if full is not None:
        out["retrieves_what_full_does"] = all(r["correct"] for r, f in zip(records, full) if f["correct"])
        out["decisions"] = fractions(sum(r["counts"] for r in records))
        out["decode_s"] = sum(r["decode_s"] for r in records)
    return out
