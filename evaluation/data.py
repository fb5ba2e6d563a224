"""The evaluation's inputs: long text (the KJV Bible or a file) cut into segments, and the retrieval
prompts (passkey, multikey, needle) built as RULER does: a haystack with needles at chosen depths, the
question and the answer prefix at the end."""
import random
from pathlib import Path

from common import UsageError, kjv_text


def load_text(args):
    return Path(args.text_file).read_text() if args.text_file else kjv_text()


def text_tokens(codec, text, start, n):
    """n token ids of text from character `start` (moved to the next word); tokenizes only what it needs."""
    start = text.find(" ", start) + 1 if start > 0 else 0
    ids = codec.tokenizer.encode(text[start:start + 8 * n], add_special_tokens=False).ids
    return ids[:n] if len(ids) >= n else None


def segments(codec, text, n, length):
    """n sequences of `length` tokens starting at evenly spaced places of the text: well separated."""
    rows = [text_tokens(codec, text, i * len(text) // n, length) for i in range(n)]
    if any(r is None for r in rows) or n * length * 4 > len(text):  # ~4 characters a token
        raise UsageError(f"the text ({len(text)} characters) is too short for {n} segments of {length} tokens")
    return rows


FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY = dict(
    intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.",
    needle=" The pass key is: {value}. Remember it. {value} is the pass key.",
    question="What is the pass key?", answer="The pass key is:")  # the colons: else the answer is words
MULTIKEY = dict(
    intro="Some special magic numbers are hidden within the following text. Make sure to memorize them. "
          "I will quiz you about the numbers afterwards.",
    needle=" The special magic number for {key} is: {value}.",
    question="What is the special magic number for {key}?", answer="The special magic number for {key} is:")
NEEDLES = {"multikey": 4, "needle": 1}  # the asked one plus distractors; in the Bible the default model's
                                        # full cache finds a lone needle, not one among four
SYLLABLES = ("ka", "lo", "mi", "ra", "zu", "te", "vo", "ni", "sa", "pe", "do", "ri", "fa", "gu", "bel",
             "tor", "wen", "xi", "qua", "mor")


def made_up_names(rng, n):
    """n names of 2-3 syllables, each with its own first syllable: a small model mixes up look-alikes."""
    return [(first + "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 2)))).capitalize()
            for first in rng.sample(SYLLABLES, n)]


def encode(codec, text):
    return codec.tokenizer.encode(text, add_special_tokens=False).ids


def build_prompt(codec, length, haystack, template, needles, depths, key):
    """(context ids, tail ids) with len(context + tail) = length: the chat's user turn holds the intro
    and the haystack with each needle inserted at its depth (moved to the next sentence end); the tail is
    the question, the end of the turn and the assistant's answer prefix (as RULER does), so that the
    answer starts at the next token. haystack(n) gives n filler ids."""
    head_text, end_text = codec.chat("\0").split("\0")
    head = encode(codec, head_text + template["intro"] + "\n")
    tail = encode(codec, "\n\n" + template["question"].format(key=key) + end_text
                  + template["answer"].format(key=key))
    pieces = [encode(codec, template["needle"].format(key=k, value=v)) for k, v in needles]
    text = len(head) + len(tail) + sum(map(len, pieces))
    if text > length:
        raise UsageError(f"a {length}-token prompt cannot hold its {text} tokens of instructions, question and needles")
    hay = haystack(length - text)
    ends = [i + 1 for i, t in enumerate(hay) if codec.tokenizer.id_to_token(t).endswith(".")]
    cuts = [next((e for e in ends if e >= d * len(hay)), len(hay)) for d in depths]
    context, last = list(head), 0
    for cut, piece in sorted(zip(cuts, pieces), key=lambda x: x[0]):
        context += hay[last:cut] + piece
        last = cut
    return context + hay[last:], tail


def retrieval_prompts(task, codec, args, text):
    """[(length, depth, context ids, tail ids, answer)]: len(depths) x keys prompts per context length."""
    rng = random.Random(f"{args.seed}-{task}")
    filler = encode(codec, FILLER)
    prompts = []
    for length in args.lengths if task == "passkey" else args.needle_lengths:
        for depth in args.depths:
            for _ in range(args.keys):
                if task == "passkey":
                    value = str(rng.randint(10000, 99999))
                    needles, depths, key, template = [(None, value)], [depth], None, PASSKEY
                else:
                    names = made_up_names(rng, NEEDLES[task])
                    needles = [(name, str(rng.randint(1000000, 9999999))) for name in names]
                    depths = [depth] + [rng.uniform(0.05, 0.95) for _ in names[1:]]
                    key, value, template = names[0], needles[0][1], MULTIKEY
                if task == "needle":  # natural text: a slice of the Bible at a random place
                    if len(text) < 16 * length:  # ~4 characters a token, and room to move
                        raise UsageError(f"the text ({len(text)} characters) is too short for {length}-token haystacks")
                    start = rng.randrange(len(text) - 8 * length)
                    haystack = lambda n, start=start: text_tokens(codec, text, start, n)
                else:
                    haystack = lambda n: (filler * (n // len(filler) + 1))[:n]
                context, tail = build_prompt(codec, length, haystack, template, needles, depths, key)
                prompts.append((length, depth, context, tail, value))
    return prompts
