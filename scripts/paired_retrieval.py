"""Each variant minus evict on the retrieval and RULER tasks of a results.json, pooled over its (method,
budget) cells: per prompt, the mean over the cells of variant minus evict (0/1 exact match, or RULER's
share of the expected strings), then the mean and paired standard error over the prompts. The cells share
their prompts, so a prompt is the unit; a cell alone has 9-10 prompts, too few to tell anything apart.

    python scripts/paired_retrieval.py results/results.json results/qwen/retrieval/results.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # evaluation/ is one level up
from evaluation.report import items  # noqa: E402
from evaluation.variants import mean_se  # noqa: E402


def parts(results):
    """(name, section) for every retrieval or RULER section: a task's mode, or a RULER length and task."""
    for task, result in results.items():
        if task in ("passkey", "multikey", "needle"):
            for mode, section in result["modes"].items():
                yield f"{task} {mode}", section, "accuracy", None
        elif task == "ruler":
            for length, section in result["modes"].items():
                tasks = [p["task"] for p in section["prompts"]]
                for name in dict.fromkeys(tasks):
                    yield f"ruler {length} {name}", section, "score", [i for i, t in enumerate(tasks) if t == name]
                yield f"ruler {length} all", section, "score", None


def main(paths):
    print("| results | task | variant | cells | prompts | variant minus evict (mean ± paired s.e.) |")
    print("|---|---|---|---:|---:|---:|")
    for path in paths:
        for name, section, metric, select in parts(json.load(open(path))):
            configs = {(c["method"], c["budget"], c["variant"]): c for c in section["configs"]}
            cells = sorted({(m, b) for m, b, v in configs if v == "evict"})
            for variant in dict.fromkeys(v for _, _, v in configs):
                if variant == "evict":
                    continue
                diffs = [[a - b for a, b in zip(items(configs[m, b, variant], metric), items(configs[m, b, "evict"], metric))]
                         for m, b in cells if (m, b, variant) in configs]
                per_prompt = [sum(d[i] for d in diffs) / len(diffs) for i in (select or range(len(diffs[0])))]
                d = mean_se(per_prompt)
                print(f"| {path} | {name} | {variant} | {len(diffs)} | {len(per_prompt)} | {d['mean']:+.3f} ± {d['se']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
