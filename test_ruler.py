"""evaluation/ruler.py: every prompt has the asked number of tokens and holds its answers in the form its
task promises (the needles, the chain in order, the repeat counts, the Zipf order); RULER's scorer; the
prompts are a function of --seed; and a tiny end-to-end `evaluate.py --task ruler` run keeps every
prompt's score. Seconds on one core: the tiny model's byte-level tokenizer, a 4k-position copy of it for
the end-to-end run."""
import argparse
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import evaluate
from common import TextCodec, kjv_text
from conftest import TINY, write_checkpoint
from evaluation import report, ruler

SMOLLM2 = Path.home() / ".cache/calidrop/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "kjv.txt"
    path.write_text(kjv_text()[:400_000])
    return path


def prompts(codec, text, length, n=3, seed=0, tasks=ruler.TASKS):
    args = argparse.Namespace(seed=seed, lengths=(length,), ruler_tasks=tasks, prompts=n)
    return ruler.ruler_prompts(codec, args, text)


def user_text(codec, task, ids):
    """The prompt as text, and its part after the worked example (vt, cwe) if any."""
    text = codec.tokenizer.decode(ids, skip_special_tokens=False)
    example = {"vt": ruler.VT, "cwe": ruler.CWE}.get(task)
    return text, text.rsplit(example["intro"], 1)[1] if example else text


@pytest.mark.parametrize("which, length", [("tiny", 2048), ("smollm2", 4096)])
def test_prompts_have_the_length_and_hold_the_answers(which, length, tiny_ckpt, small_text):
    if which == "smollm2" and not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip("SmolLM2-135M-Instruct not prepared (python -m scripts.models smollm2-135m)")
    codec = TextCodec(tiny_ckpt if which == "tiny" else SMOLLM2)
    built = prompts(codec, small_text.read_text(), length)
    assert Counter(task for task, *_ in built) == {task: 3 for task in ruler.TASKS}
    for task, n, ids, answers in built:
        assert n == length and len(ids) == length, task  # exactly: the haystack fills what is left
        text, main = user_text(codec, task, ids)
        *_, user, prefix = text.split("<|im_end|>")
        question = user.rsplit("\n\n", 1)[1]
        assert all(a in main for a in answers), (task, answers)
        assert prefix.rstrip().endswith(("is", "are", "are:")), task  # the answer prefix closes the prompt
        if task.startswith("niah"):
            needles = re.findall(r"special magic numbers for ([\w-]+) is: (\d+)\.", text)
            keys, values, asked = ruler.NIAH[task][:3]
            assert len(needles) == keys * values and len({k for k, _ in needles}) == keys
            assert sorted(answers) == sorted(v for k, v in needles if k in question)
            assert len(answers) == values * asked
        if task == "vt":  # the chain in order: each variable assigned after the one it copies
            chain = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", main)
            assert [k for k, _ in chain] == answers and chain[0][1] in question
            assert all(v == prev for (_, v), (prev, _) in zip(chain[1:], chain))
        if task == "cwe":  # below 4k tokens: the 10 common words 6 times, the rest once (30 and 3 from 4k)
            common, rare = (30, 3) if length >= 4096 else (6, 1)
            counts = Counter(re.findall(r"\d+\. (\w+)", main.split("Question:")[0]))
            assert len(answers) == 10 and all(counts[a] == common for a in answers)
            assert {c for w, c in counts.items() if w not in answers} == {rare}
        if task == "fwe":  # the three after the ignored '...' are the most frequent, in order
            counts = Counter(main.split("Question:")[0].split("\n", 1)[1].split())
            ranked = [w for w, _ in counts.most_common() if w != "..."]
            assert ranked[:3] == answers and counts[answers[2]] > counts[ranked[3]]


def test_prompts_follow_the_seed(tiny_ckpt, small_text):
    codec, text = TextCodec(tiny_ckpt), small_text.read_text()
    a, b = prompts(codec, text, 2048, n=2), prompts(codec, text, 2048, n=2)
    assert a == b
    other = prompts(codec, text, 2048, n=2, seed=1)
    assert all(x[2] != y[2] and x[3] != y[3] for x, y in zip(a, other))
    # a task's prompts do not depend on which other tasks run
    assert prompts(codec, text, 2048, n=2, tasks=("fwe",)) == [p for p in a if p[0] == "fwe"]


def test_scorer_is_rulers_string_match_all(tiny_ckpt):
    values = ["1234567", "2345678", "3456789", "4567890"]
    assert ruler.string_match_all("The numbers are 1234567, 2345678, 3456789 and 4567890.", values) == 1.0
    assert ruler.string_match_all("The numbers are 7654321 and 8765432.", values) == 0.0
    assert ruler.string_match_all("1234567 and 3456789, I think", values) == 0.5  # partly right: partly scored
    assert ruler.string_match_all("MOSES, aaron", ["moses", "Aaron", "miriam"]) == pytest.approx(2 / 3)
    codec = TextCodec(tiny_ckpt)
    stop = set(codec.stop_ids)
    ids = codec.tokenizer.encode(" 1234567.", add_special_tokens=False).ids
    after = codec.tokenizer.encode(" 2345678", add_special_tokens=False).ids
    judged = ruler.judge(codec, ids + [min(stop)] + after, values[:2], stop)
    assert judged == {"score": 0.5, "output": "1234567."}  # what follows the stop token does not count


def test_too_short_a_prompt_exits_2(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--task", "ruler", "--ruler-tasks", "cwe", "--lengths", "300", "--context", "192",
                       "--ckpt", str(tiny_ckpt), "--out", str(tmp_path)])
    assert exit.value.code == 2 and "cannot hold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--task", "ruler", "--ruler-tasks", "niah_single,sudoku", "--ckpt", str(tiny_ckpt),
                       "--out", str(tmp_path)])
    assert exit.value.code == 2 and "unknown ruler task sudoku" in capsys.readouterr().err


def test_ruler_end_to_end_on_a_tiny_model(tmp_path, small_text):
    """Every task at 2,048 tokens, two prompts each: results.json holds every prompt's task, answers,
    length, and per cache its score (RULER's, of the output kept beside it) and output; results.md a table
    per length with the paired difference to evict (0 for evict itself); and the plot."""
    ckpt = write_checkpoint(tmp_path / "tiny4k", {**TINY, "max_position_embeddings": 4096})
    out = tmp_path / "out"
    evaluate.main(["--task", "ruler", "--ckpt", str(ckpt), "--text-file", str(small_text), "--lengths", "2048",
                   "--prompts", "2", "--methods", "snapkv", "--budgets", "64", "--variants", "evict,calidrop",
                   "--out", str(out)])
    result = json.loads((out / "results.json").read_text())["ruler"]
    assert result["tasks"] == list(ruler.TASKS) and result["lengths"] == [2048]
    part = result["modes"]["2048"]
    assert [p["task"] for p in part["prompts"]] == [t for t in ruler.TASKS for _ in range(2)]
    assert all(p["tokens"] == 2048 for p in part["prompts"])
    assert {(c["method"], c["budget"], c["variant"]) for c in part["configs"]} == {("snapkv", 64, "evict"),
                                                                                 ("snapkv", 64, "calidrop")}
    for record in [part["full"]] + part["configs"]:
        assert len(record["scores"]) == len(record["outputs"]) == 14
        for score, output, prompt in zip(record["scores"], record["outputs"], part["prompts"]):
            assert score == ruler.string_match_all(output, prompt["answers"])
        assert record["score"]["mean"] == pytest.approx(sum(record["scores"]) / 14)
    by_config = {(c["method"], c["budget"], c["variant"]): c for c in part["configs"]}
    assert report.to_evict(by_config, "snapkv", 64, "evict", "score") == {"mean": 0.0, "se": 0.0}
    table = (out / "results.md").read_text()
    assert "### 2048 tokens" in table and "| all tasks | snapkv | 64 |" in table
    assert all(f"| {task} | snapkv | 64 |" in table for task in ruler.TASKS)
    assert (out / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fill_gives_exactly_n_ids_or_none(tiny_ckpt):
    """cwe's and fwe's lists: as many whole items as fit, then '.' tokens; None when not even the least
    fits, or when the items run out (a text with too few distinct words for cwe) before the length is full."""
    codec = TextCodec(tiny_ckpt)
    items = lambda k: " ".join(f"w{i}" for i in range(k))  # 3-4 bytes an item
    ids = ruler.fill(codec, 100, items, 1)
    text = codec.decode(ids)
    assert len(ids) == 100 and text.rstrip(".") == items(len(text.rstrip(".").split()))
    assert len(text) - len(text.rstrip(".")) < 5  # less than one more item
    assert ruler.fill(codec, 100, items, 40) is None
    assert ruler.fill(codec, 100, items, 1, most=10) is None
