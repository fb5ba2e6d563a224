"""The ruler task: RULER-style synthetic tasks (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654), written here after RULER's task definitions:

  niah_single      one `key: value` needle in the KJV (RULER's niah_single_2, an essay haystack there)
  niah_multikey    four needles with different keys, one asked for (niah_multikey_1)
  niah_multivalue  four values for one key, all asked for
  niah_multiquery  four needles, all four keys asked for
  vt               variable tracking: a chain `VAR A = 12345`, `VAR B = VAR A`, ... (4 hops) in RULER's noise
                   sentences; every variable that holds the value is asked for (one worked example first)
  cwe              common words: a numbered list of KJV words, 10 of them repeated 30 times (6 below 4k
                   tokens), the others 3 (1); the 10 asked for (one worked example first)
  fwe              frequent words: coded words drawn from a Zipf law (alpha 2), the most frequent one `...`
                   to be ignored; the next three asked for

Keys are two KJV words joined by a hyphen (RULER: adjective-noun), values 7-digit numbers, needles at
depths drawn from 40 evenly spaced ones. Each prompt has exactly the asked number of tokens, in the
model's chat format, built by evaluation/data.py's build_prompt as the passkey prompts are: the question
and the answer prefix close the prompt, so the whole prompt is compressed (question-aware, as RULER is).
cwe and fwe fill their lists with whole items and end with up to one item's worth of '.' tokens.
Scored as RULER scores all seven: string_match_all, the share of the expected strings found in the
output (case-insensitive), cut at the first stop token; RULER uses string_match_part (any one found) only
for its QA tasks, which are not here. Generation stops at RULER's tokens_to_generate, or once every row of
a batch has produced a stop token.

One full-cache prefill per prompt serves every method, budget and variant (evaluation/retrieval.py's
answer_all); results.json keeps every prompt's score, per length.
"""
import math
import random
import re
import string
import time

import torch

from common import UsageError, log
from evaluation.data import FILLER, build_prompt, encode, load_text, text_tokens
from evaluation.retrieval import answer_all
from evaluation.variants import BYTES, Progress, fractions, mean_se

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate (an upper bound here)

NIAH_ONE = dict(
    intro="A special magic number is hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the number afterwards.",
    needle=" One of the special magic numbers for {key} is: {value}.",
    question="What is the special magic number for {key} mentioned in the provided text?",
    answer="The special magic number for {key} mentioned in the provided text is")
NIAH_ALL = dict(
    intro="Some special magic numbers are hidden within the following text. Make sure to memorize them. "
          "I will quiz you about the numbers afterwards.",
    needle=NIAH_ONE["needle"],
    question="What are all the special magic numbers for {key} mentioned in the provided text?",
    answer="The special magic numbers for {key} mentioned in the provided text are")
NIAH = {"niah_single": (1, 1, 1, NIAH_ONE), "niah_multikey": (4, 1, 1, NIAH_ONE),  # keys, values per key,
        "niah_multivalue": (1, 4, 1, NIAH_ALL), "niah_multiquery": (4, 1, 4, NIAH_ALL)}  # keys asked for
VT = dict(
    intro="Memorize and track the chain(s) of variable assignment hidden in the following text.",
    needle=" {key} = {value}.",
    question="Question: Find all variables that are assigned the value {key} in the text above.",
    answer="Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
           "assigned the value {key}, they are:")
VT_HOPS = 4
CWE = dict(
    intro="Below is a numbered list of words. In these words, some appear more often than others. "
          "Memorize the ones that appear most often.",
    question="Question: What are the 10 most common words in the above list?",
    answer="Answer: The top 10 words that appear most often in the list are:")
CWE_COMMON = 10
FWE = dict(
    intro="Read the following coded text and track the frequency of each coded word. "
          "Find the three most frequently appeared coded words.",
    question="Question: Do not provide any explanation. Please ignore the dots '....'. "
             "What are the three most frequently appeared words in the above coded text?",
    answer="Answer: According to the coded text above, the three most frequently appeared words are:")
FWE_ALPHA = 2.0
ZETA_2 = math.pi ** 2 / 6  # sum of k^-2: the Zipf law's normalisation at alpha 2
FWE_LEAST = 80  # coded words at least: from 80 on, the 2nd, 3rd, 4th and 5th most frequent counts differ


def family(task):
    return "niah" if task.startswith("niah") else task


def string_match_all(prediction, answers):
    """RULER's score of one output: the share of the expected strings in it, case-insensitive."""
    prediction = prediction.lower()
    return sum(a.lower() in prediction for a in answers) / len(answers)


def judge(codec, ids, answers, stop_ids):
    """{score, output} of generated ids, cut at the first stop token (RULER's outputs end there)."""
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    output = re.sub(r"[\x00-\x1f]", "\n", codec.decode(ids[:cut])).strip()  # as RULER's postprocess_pred
    return {"score": string_match_all(output, answers), "output": output}


# ------------------------------------------------------------------------------------------ the prompts

def kjv_words(text):
    """The text's lowercase words of 4-9 letters, each once, in a fixed order: keys and cwe's words."""
    return sorted(set(re.findall(r"\b[a-z]{4,9}\b", text)))


def fill(codec, n, text_of, least, most=math.inf):
    """Exactly n ids: the text_of(k) of the largest k in [least, most] whose tokens fit in n (text_of grows
    with k), then '.' tokens up to n. None if not even text_of(least) fits, or text_of(most) does."""
    size = lambda k: len(encode(codec, text_of(k)))
    if size(least) > n:
        return None
    lo, hi = least, max(2 * least, 1)
    while size(hi) <= n:
        if hi >= most:
            return None
        lo, hi = hi, min(2 * hi, most)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= n else (lo, mid)
    ids = encode(codec, text_of(lo))
    return ids + encode(codec, ".")[:1] * (n - len(ids))


def numbered(words):
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_list(words, n_words, repeats, seed):
    """RULER's common-words list: the first CWE_COMMON of words `repeats[0]` times, the next n_words
    `repeats[1]` times, shuffled; returns (text, the common words)."""
    common, rare = words[:CWE_COMMON], words[CWE_COMMON:CWE_COMMON + n_words]
    items = common * repeats[0] + rare * repeats[1]
    random.Random(seed).shuffle(items)
    return numbered(items), common


def niah_prompt(codec, rng, task, length, text, words):
    n_keys, n_values, n_asked, template = NIAH[task]
    keys = []
    while len(keys) < n_keys:
        key = "-".join(rng.sample(words, 2))
        keys += [key] if key not in keys else []
    values = rng.sample(range(1000000, 10000000), n_keys * n_values)  # distinct
    needles = [(k, str(values.pop())) for k in keys for _ in range(n_values)]
    rng.shuffle(needles)
    asked = rng.sample(keys, n_asked)
    answers = [v for k in asked for v in (v for key, v in needles if key == k)]
    query = asked[0] if n_asked == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    depths = sorted(d / 39 for d in rng.sample(range(40), len(needles)))
    if len(text) < 16 * length:  # ~4 characters a token, and room to move
        raise UsageError(f"the text ({len(text)} characters) is too short for {length}-token haystacks")
    start = rng.randrange(len(text) - 8 * length)
    context, tail = build_prompt(codec, length, lambda n: text_tokens(codec, text, start, n), template,
                                 needles, depths, query)
    return context + tail, answers


def variables(rng, n, taken=()):
    names = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names and name not in taken else []
    return names


def vt_chain(rng, names):
    """[(VAR name, what it is assigned)] of one chain, and its value."""
    value = str(rng.randint(10000, 99999))
    return [(f"VAR {names[0]}", value)] + [(f"VAR {b}", f"VAR {a}") for a, b in zip(names, names[1:])], value


def vt_prompt(codec, rng, length):
    """One chain of VT_HOPS hops in the noise sentences, after one worked example of the same form."""
    example_names = variables(rng, VT_HOPS + 1)
    chain, value = vt_chain(rng, example_names)
    noise = FILLER.strip().split(". ")
    sentences = [s.rstrip(".") + "." for s in noise]
    example = " ".join(f"{s} {k} = {v}." for s, (k, v) in zip(sentences, chain))
    n = VT_HOPS + 1
    example = (f"{VT['intro']}\n\n{example}\n\n{VT['question'].format(key=value)}\n"
               f"{VT['answer'].format(key=value, n=n)} {' '.join(example_names)}\n\n")
    names = variables(rng, n, example_names)
    chain, value = vt_chain(rng, names)
    template = {**VT, "intro": example + VT["intro"], "answer": VT["answer"].format(key="{key}", n=n)}
    filler = encode(codec, FILLER)
    depths = sorted(rng.random() for _ in chain)  # in chain order: build_prompt keeps it on ties
    context, tail = build_prompt(codec, length, lambda k: (filler * (k // len(filler) + 1))[:k], template,
                                 chain, depths, value)
    return context + tail, names


def cwe_prompt(codec, rng, length, words, seed):
    """RULER's cwe: 30 and 3 repeats from 4k tokens, 6 and 1 below; one worked example (40 words at 10 and 3,
    or 20 at 3 and 1) first; as many rare words as fill the length."""
    repeats, example_words, example_repeats = ((30, 3), 40, (10, 3)) if length >= 4096 else ((6, 1), 20, (3, 1))
    pool = rng.sample(words, len(words))
    example, common = cwe_list(pool, example_words - CWE_COMMON, example_repeats, f"{seed}-example")
    example = (f"{CWE['intro']}\n{example}\n{CWE['question']}\n{CWE['answer']} {numbered(common)}\n\n")
    pool = pool[example_words:]
    _, answers = cwe_list(pool, 0, repeats, seed)
    ids = lambda n: (fill(codec, n, lambda k: cwe_list(pool, k, repeats, seed)[0], 0, len(pool) - CWE_COMMON)
                     or too_short("cwe", length, " (or the text has too few distinct words to fill it)"))
    context, tail = build_prompt(codec, length, ids, {**CWE, "intro": example + CWE["intro"]}, [], [], None)
    return context + tail, answers


def fwe_text(vocab, n_words, seed):
    """n_words coded words with RULER's Zipf counts (the k-th word of vocab int(n k^-alpha / zeta) times), shuffled."""
    items = [w for k, w in enumerate(vocab, 1) for _ in range(int(n_words * k ** -FWE_ALPHA / ZETA_2))]
    random.Random(seed).shuffle(items)
    return " ".join(items)


def fwe_prompt(codec, rng, length, seed):
    size = max(length // 50, 8)  # RULER's vocabulary size
    vocab = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent: the noise the question says to ignore
    ids = lambda n: fill(codec, n, lambda k: fwe_text(vocab, k, seed), FWE_LEAST) or too_short("fwe", length)
    context, tail = build_prompt(codec, length, ids, FWE, [], [], None)
    return context + tail, vocab[1:4]


def too_short(task, length, why=""):
    raise UsageError(f"a {length}-token prompt cannot hold {task}'s instructions, example and list{why}")


def ruler_prompts(codec, args, text):
    """[(task, length, prompt ids, expected strings)]: args.prompts per (task, length), each (task, length)
    from its own random stream (seeded by --seed), so that adding a task changes no other's prompts."""
    words = kjv_words(text)
    prompts = []
    for length in args.lengths:
        for task in args.ruler_tasks:
            seed = f"{args.seed}-ruler-{task}-{length}"
            rng = random.Random(seed)
            for i in range(args.prompts):
                if task in NIAH:
                    ids, answers = niah_prompt(codec, rng, task, length, text, words)
                elif task == "vt":
                    ids, answers = vt_prompt(codec, rng, length)
                elif task == "cwe":
                    ids, answers = cwe_prompt(codec, rng, length, words, f"{seed}-{i}")
                else:
                    ids, answers = fwe_prompt(codec, rng, length, f"{seed}-{i}")
                prompts.append((task, length, ids, answers))
    return prompts


# ------------------------------------------------------------------------------------------ the task

def task_ruler(model, codec, args, device):
    """Every prompt through the full cache and every (method, budget, variant), from one prefill each;
    per length: the prompts' tasks and answers, and per cache every prompt's score and output."""
    t0 = time.perf_counter()
    prompts = ruler_prompts(codec, args, load_text(args))
    log(f"ruler: {len(prompts)} prompts built in {time.perf_counter() - t0:.1f} s")
    stop = torch.tensor(codec.stop_ids, device=device) if codec.stop_ids else None
    empty = torch.zeros(1, 0, dtype=torch.long, device=device)
    progress = Progress("ruler: prompt", len(prompts))
    records = {}  # length -> (prompts, full records, {config: records})
    for task, length, ids, answers in prompts:
        score = lambda out: judge(codec, out, answers, set(codec.stop_ids))
        reference, _, results = answer_all(model, args, torch.tensor([ids], device=device), empty,
                                           NEW_TOKENS[family(task)], score, quantized=False, stop=stop)
        meta, full, per_config = records.setdefault(length, ([], [], {}))
        meta.append({"task": task, "answers": answers, "tokens": len(ids)})
        full.append(reference)
        for config, record in results.items():
            per_config.setdefault(config, []).append(record)
        progress.step(f"{task} {length} tokens: full cache {reference['score']:.2f}, configs "
                      f"{sum(r['score'] for r in results.values()) / max(len(results), 1):.2f} on average")
    modes = {str(length): {"prompts": meta, "full": summary(full),
                           "configs": [{"method": m, "budget": b, "variant": v, **summary(rs, True)}
                                       for (m, b, v), rs in per_config.items()]}
             for length, (meta, full, per_config) in records.items()}
    return {"tasks": list(args.ruler_tasks), "lengths": list(args.lengths), "prompts": args.prompts,
            "metric": "string_match_all", "modes": modes}


def summary(records, config=False):
    """Score (mean, se over the prompts), every prompt's score and output, bytes per sequence averaged;
    for a config also its decisions and decode time."""
    out = {"score": mean_se([r["score"] for r in records]), "scores": [r["score"] for r in records],
           "outputs": [r["output"] for r in records],
           **{k: sum(r["stats"][k] for r in records) / len(records) for k in BYTES}}
    if config:
        out["decisions"] = fractions(sum(r["counts"] for r in records))
        out["decode_s"] = sum(r["decode_s"] for r in records)
    return out
