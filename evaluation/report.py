"""The outputs: results.json, results.md (the tables) and a PNG per task; the settings that produced them."""
import json
import platform
import subprocess
from pathlib import Path

import torch

from evaluation.frontier import HBM_BYTES_PER_S, LINK_BYTES_PER_S, family, point_name
from evaluation.long import long_tables, plot_long
from evaluation.variants import QUANT_BITS, mean_se, thresholds

METRICS = {  # per task: (result section, metric, label) of each plot row and table column
    "ppl": [("", "nll", "NLL"), ("", "kl", "KL(full || variant)")],
    "passkey": [("aware", "accuracy", "accuracy, question-aware"), ("agnostic", "accuracy", "accuracy, query-agnostic")],
    "multikey": [("aware", "accuracy", "accuracy, question-aware"), ("agnostic", "accuracy", "accuracy, query-agnostic")],
    "needle": [("agnostic", "accuracy", "accuracy, query-agnostic")],
    "attention": [("", "rel_error", "attention output relative error")],
}


COLUMN = {"nll": "NLL", "kl": "KL", "accuracy": "accuracy", "rel_error": "rel. error", "score": "score"}

# Per-item values of a metric, the unit its standard error is over (ppl: segments; passkey, multikey, needle:
# prompts, 0/1; ruler: prompts, 0-1): every variant of a task sees the same items, so a variant is compared
# with eviction item by item.
ITEMS = {"nll": "nll_per_segment", "kl": "kl_per_segment", "accuracy": "correct", "score": "scores"}


def section(result, mode):
    """The part of a task's result that holds 'full' and 'configs'."""
    return result["modes"][mode] if mode else result


def metric_rows(task, result):
    """(section, metric, label) of each plot row and table column; ruler has a section per length."""
    if task == "ruler":
        return [(str(n), "score", f"score at {n} tokens, all tasks") for n in result["lengths"]]
    return METRICS[task]


def cell(value):
    return f"{value['mean']:.3f} ± {value['se']:.3f}" if value["se"] else f"{value['mean']:.3f}"


def items(record, metric):
    """The per-item values of a metric in a config's (or the full cache's) record; None if not kept."""
    key = ITEMS.get(metric)
    return None if key not in record else [float(x) for x in record[key]]


def paired_difference(values, reference):
    """Mean and standard error of values - reference item by item (the same segments or prompts): the
    spread between items, most of an unpaired error, cancels. For 0/1 retrieval scores the same paired
    standard error (of differences in {-1, 0, 1}; 0 when the two agree on every prompt) rather than a
    bootstrap interval: one rule for every table, and with 10-20 prompts a bootstrap adds no information."""
    if len(values) != len(reference):
        raise ValueError(f"{len(values)} items against {len(reference)}: not paired")
    return mean_se([a - b for a, b in zip(values, reference)])


def to_evict(by_config, method, budget, variant, metric, select=None):
    """The paired difference of (method, budget, variant) to evict of the same method and budget (over the
    items whose index `select` keeps, if given); None without evict or without per-item values."""
    evict = by_config.get((method, budget, "evict"))
    own = by_config.get((method, budget, variant))
    if evict is None or own is None or items(own, metric) is None or items(evict, metric) is None:
        return None
    a, b = items(own, metric), items(evict, metric)
    if select is not None:
        a, b = [a[i] for i in select], [b[i] for i in select]
    return paired_difference(a, b)


def diff_cell(d):
    return "" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f}"


def write_table(results, settings, path):
    lines = ["# CaliDrop evaluation", "", f"Model `{settings['model']}`, {settings['device']} {settings['dtype']}, "
             f"seed {settings['seed']}, commit {settings['git_commit']}; "
             f"theta1 {settings['args']['theta1']}, theta2 {settings['args']['theta2']}, "
             f"window {settings['args']['window']}, sink {settings['args']['sink']}.", "",
             "Δ: a variant minus `evict` of the same method and budget, item by item (ppl: per segment; "
             "retrieval and ruler: per prompt), mean ± paired standard error.", ""]
    for task, result in results.items():
        if task == "settings":
            continue
        lines += [f"## {task}", "", f"Run time {result['run_s']:.0f} s.", ""]
        if task == "frontier":
            lines += frontier_table(result)
            continue
        if task == "ruler":
            lines += ruler_tables(result, settings)
            continue
        if task == "long":
            lines += long_tables(result, settings)
            continue
        variants = settings["args"]["variants"]
        modes = {}
        for mode, metric, label in METRICS[task]:  # the metrics of one section side by side (ppl: NLL and KL)
            modes.setdefault(mode, []).append((metric, label))
        for mode, metrics in modes.items():
            part = section(result, mode)
            full = part["full"]
            lines += [f"### {' and '.join(label for _, label in metrics)}", "",
                      "Full cache: " + ", ".join(f"{COLUMN[m]} {cell(full[m])}" for m, _ in metrics)
                      + (f" (by length: {full['accuracy_by_length']})" if "accuracy" in full else "")
                      + (f", {full['kv_bytes_kept'] / 2**20:.1f} MB per sequence" if task != "attention" else ""),
                      "",
                      *[f"- {name.upper()} {QUANT_BITS}-bit full-length cache: "
                        + ", ".join(f"{COLUMN[m]} {cell(q[m])}" for m, _ in metrics)
                        + f", {q['kv_bytes_kept'] / 2**20:.2f} MB per sequence"
                        for name, q in part.get("quantized", {}).items()],
                      "",
                      "| method | budget | variant | "
                      + " | ".join(f"{COLUMN[m]} | Δ {COLUMN[m]}" for m, _ in metrics) + " |",
                      "|---|---:|---|" + "---:|---:|" * len(metrics)]
            by_config = {(c["method"], c["budget"], c["variant"]): c for c in part["configs"]}
            for m in settings["args"]["methods"]:
                for b in settings["args"]["budgets"]:
                    for v in variants:
                        lines.append(f"| {m} | {b} | {v} | " + " | ".join(
                            f"{cell(by_config[m, b, v][metric])} | {diff_cell(to_evict(by_config, m, b, v, metric))}"
                            for metric, _ in metrics) + " |")
            if any(metric == "accuracy" for metric, _ in metrics):
                lines += ["", "Smallest budget from which each variant retrieves everything the full cache "
                          "retrieves (at that budget and every larger one):", ""]
                for v in variants:
                    lines.append(f"- {v}: " + ", ".join(
                        f"{m} {first_retrieving(by_config, m, v, settings['args']['budgets'])}"
                        for m in settings["args"]["methods"]))
            lines.append("")
        if task == "ppl":
            lines += decision_table(result, variants, settings)
        if task == "attention":
            lines += cos_table(result)
    path.write_text("\n".join(lines) + "\n")


def ruler_tables(result, settings):
    """Per length: a row per (task, method, budget) and for all tasks together (every prompt of the length
    one item: the mean over tasks, as RULER averages them), the full cache's score and each variant's with
    its paired difference to evict."""
    variants, lines = settings["args"]["variants"], []
    for length in result["lengths"]:
        part = result["modes"][str(length)]
        tasks = [p["task"] for p in part["prompts"]]
        by_config = {(c["method"], c["budget"], c["variant"]): c for c in part["configs"]}
        lines += [f"### {length} tokens: score (string_match_all), Δ to evict", "",
                  "| task | method | budget | full | " + " | ".join(f"{v} | Δ" for v in variants) + " |",
                  "|---|---|---:|---:|" + "---:|---:|" * len(variants)]
        for task in result["tasks"] + ["all tasks"]:
            select = [i for i, t in enumerate(tasks) if t == task or task == "all tasks"]
            full = mean_se([part["full"]["scores"][i] for i in select])
            for m in settings["args"]["methods"]:
                for b in settings["args"]["budgets"]:
                    cells = []
                    for v in variants:
                        scores = by_config[m, b, v]["scores"]
                        cells += [cell(mean_se([scores[i] for i in select])),
                                  diff_cell(to_evict(by_config, m, b, v, "score", select))]
                    lines.append(f"| {task} | {m} | {b} | {cell(full)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def first_retrieving(by_config, method, variant, budgets):
    ok = [by_config[method, b, variant]["retrieves_what_full_does"] for b in budgets]
    for i, b in enumerate(budgets):
        if all(ok[i:]):
            return str(b)
    return "never"


def decision_table(result, variants, settings):
    """Decision fractions (calibrate / recompute / none) and MB per sequence kept / offloaded / calibration."""
    mb = 2 ** -20
    lines = ["### decisions (calibrate / recompute / none) and MB per sequence (kept / offloaded / calibration)", "",
             "| method | budget | " + " | ".join(variants) + " |", "|---|---:|" + "---|" * len(variants)]
    by_config = {(c["method"], c["budget"], c["variant"]): c for c in result["configs"]}
    for m in settings["args"]["methods"]:
        for b in settings["args"]["budgets"]:
            cells = []
            for v in variants:
                c = by_config[m, b, v]
                d = c["decisions"]
                cells.append(f"{d['calibrate']:.2f}/{d['recompute']:.2f}/{d['none']:.2f}; "
                             f"{c['kv_bytes_kept'] * mb:.1f}/{c['kv_bytes_offloaded'] * mb:.1f}/"
                             f"{c['calibration_bytes'] * mb:.2f}")
            lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    f = result["full"]
    return lines + ["", f"Full cache: {f['kv_bytes_kept'] * mb:.1f} MB per sequence.", ""]


def cos_table(result):
    lines = ["### cos(q_t, hist_q) per layer: median [p10, p90], share > theta2, share < theta1", "",
             "| layer | post-RoPE | pre-RoPE |", "|---:|---|---|"]
    for layer, (post, pre) in enumerate(zip(result["cos_by_layer"]["post_rope"], result["cos_by_layer"]["pre_rope"])):
        lines.append(f"| {layer} | " + " | ".join(
            f"{c['p50']:.2f} [{c['p10']:.2f}, {c['p90']:.2f}], {c['above_theta2']:.2f}, {c['below_theta1']:.2f}"
            for c in (post, pre)) + " |")
    return lines + [""]


def frontier_table(result):
    """The best point by KL within 5 %, 12.5 % and 25 % of the full cache's bytes, then every point."""
    mb, full = 2 ** -20, result["full_kv_bytes"]
    lines = ["### the best variant by KL within a fast-memory budget", "",
             f"Full cache {full * mb:.1f} MB per sequence at {result['context']} + {result['new_tokens']} tokens; "
             f"GPU tokens/s modelled for one H100 (HBM {HBM_BYTES_PER_S / 1e12:.2f} TB/s, host link "
             f"{LINK_BYTES_PER_S / 1e9:.0f} GB/s), batch 1, the weights and bytes as measured here.", "",
             "| fast memory | best variant | KL | fast MB | offloaded MB | reload MB/token | GPU tok/s (model) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for share in (0.05, 0.125, 0.25):
        fits = [p for p in result["points"] if p["fast_bytes"] <= share * full]
        if not fits:
            lines.append(f"| {share:.1%} | none fits | | | | | |")
            continue
        p = min(fits, key=lambda p: p["kl"])
        lines.append(f"| {share:.1%} ({share * full * mb:.1f} MB) | {point_name(p)} | {p['kl']:.3f} | "
                     f"{p['fast_bytes'] * mb:.2f} | {p['offloaded_bytes'] * mb:.1f} | "
                     f"{p['reload_bytes_per_token'] * mb:.2f} | {p['gpu_tokens_per_s']:.0f} |")
    lines += pages_table(result["points"], "### pages a recompute reads (SnapKV): KL, reload per token as a share of "
                         "the offloaded bytes")
    sweep = result["theta1_sweep"]
    if sweep:  # the swept thresholds beside the grid's own (theta1 of the command line)
        budget, names = sweep[0]["budget"], {p["variant"] for p in sweep}
        sweep = sweep + [p for p in result["points"] if p["budget"] == budget and p["variant"] in names]
        lines += ["", f"### theta1 at budget {budget} (SnapKV; theta2 as given)", "",
                  "| theta1 | variant | KL | NLL | decisions cal/rec/none | reload MB/token |", "|---:|---|---:|---:|---|---:|"]
        for p in sorted(sweep, key=lambda p: (p["variant"], p["theta1"])):
            d = p["decisions"]
            lines.append(f"| {p['theta1']} | {p['variant']} | {p['kl']:.3f} ± {p['kl_se']:.3f} | {p['nll']:.3f} | "
                         f"{d['calibrate']:.2f}/{d['recompute']:.2f}/{d['none']:.2f} | "
                         f"{p['reload_bytes_per_token'] * mb:.2f} |")
    long = result["long_context"]
    lines += ["", f"### a {long['context']}-token context ({long['segments']} segments, full cache "
              f"{long['full_kv_bytes'] * mb:.1f} MB)", ""]
    lines += pages_table(long["points"], "")
    lines += ["", "### every point", "", "| variant | KL | NLL | fast MB | offloaded MB | reload MB/token | GPU tok/s (model) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(result["points"], key=lambda p: p["fast_bytes"]):
        lines.append(f"| {point_name(p)} | {p['kl']:.3f} ± {p['kl_se']:.3f} | {p['nll']:.3f} | "
                     f"{p['fast_bytes'] * mb:.2f} | {p['offloaded_bytes'] * mb:.1f} | "
                     f"{p['reload_bytes_per_token'] * mb:.2f} | {p['gpu_tokens_per_s']:.0f} |")
    return lines + [""]


def pages_table(points, title):
    """A row per (budget, variant without its pages), a column per page count: KL and reload share."""
    rows = {}
    for p in points:
        if p["method"] is not None and "@" in p["variant"]:
            name, _, pages = p["variant"].partition("@")
            rows.setdefault((p["budget"], name), {})[pages] = p
    columns = sorted({c for r in rows.values() for c in r}, key=lambda c: (c == "all", int(c) if c != "all" else 0))
    lines = [title, ""] if title else []
    lines += ["| budget | variant | evict | " + " | ".join(f"{c} pages" for c in columns) + " | sketch MB |",
              "|---:|---|---:|" + "---:|" * len(columns) + "---:|"]
    evict = {p["budget"]: f"{p['kl']:.3f}" for p in points if p["variant"] == "evict" and p["method"] == "snapkv"}
    for (budget, name), by_pages in sorted(rows.items()):
        cells = [f"{by_pages[c]['kl']:.3f} ({100 * by_pages[c]['reload_share']:.1f} %)" if c in by_pages else ""
                 for c in columns]
        sketch = max(p["selection_bytes"] for p in by_pages.values()) * 2**-20
        lines.append(f"| {budget} | {name} | {evict.get(budget, '')} | " + " | ".join(cells) + f" | {sketch:.2f} |")
    return lines


def plot(task, result, settings, path):
    """A panel per method (columns) and metric (rows): metric vs budget (log2), a line per variant, the
    full cache as a horizontal reference; for attention, a last row with cos(q_t, hist_q) per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods, budgets = settings["args"]["methods"], settings["args"]["budgets"]
    rows = metric_rows(task, result)
    n_rows = len(rows) + (task == "attention")
    fig = plt.figure(figsize=(3.6 * len(methods), 3 * n_rows), layout="constrained")
    grid = fig.add_gridspec(n_rows, len(methods))
    for r, (mode, metric, label) in enumerate(rows):
        part = section(result, mode)
        for c, method in enumerate(methods):
            ax = fig.add_subplot(grid[r, c])
            for variant in settings["args"]["variants"]:
                points = sorted((x["budget"], x[metric]) for x in part["configs"]
                                if x["method"] == method and x["variant"] == variant)
                ax.errorbar([b for b, _ in points], [v["mean"] for _, v in points],
                            yerr=[v["se"] for _, v in points], marker="o", capsize=2, label=variant)
            ax.axhline(part["full"][metric]["mean"], color="black", linestyle="--", label="full")
            for (name, q), style in zip(part.get("quantized", {}).items(), (":", "-.")):
                ax.axhline(q[metric]["mean"], color="gray", linestyle=style, label=f"{name} {QUANT_BITS}-bit")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_title(method if r == 0 else "")
            ax.set_xlabel("budget")
            ax.set_ylabel(label if c == 0 else "")
        if r == 0:
            ax.legend(fontsize="small")
    if task == "attention":
        ax = fig.add_subplot(grid[-1, :])
        for name, color in (("post_rope", "C0"), ("pre_rope", "C1")):
            cos = result["cos_by_layer"][name]
            layers = range(len(cos))
            ax.plot(layers, [c["p50"] for c in cos], color=color, label=f"{name} median")
            ax.fill_between(layers, [c["p10"] for c in cos], [c["p90"] for c in cos], color=color, alpha=0.2)
        ax.axhline(settings["args"]["theta1"], color="gray", linestyle=":")
        ax.axhline(settings["args"]["theta2"], color="gray", linestyle=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("cos(q_t, hist_q), p10-p90")
        ax.legend(fontsize="small")
    fig.suptitle(task)
    fig.savefig(path, dpi=100)
    plt.close(fig)


BYTES_PANEL_FAMILIES = ("calibrate", "calidrop@12", "calidrop+int8-offload@12", "calidrop@all",
                        "calidrop+ott-offload@all")  # besides eviction, the quantized caches and the full cache


def plot_frontier(result, path):
    """KL against fast bytes and against total bytes (eviction, the quantized caches and the main CaliDrop
    variants), and the CaliDrop variants against their reload traffic, one line per budget and store as
    the pages read grow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), layout="constrained")
    families = {}
    for p in result["points"]:
        families.setdefault(family(p), []).append(p)
    shown = [n for n in families if n.startswith("evict") or n in ("full", "kivi", "ott") or n in BYTES_PANEL_FAMILIES]
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(shown)}
    mb = 2 ** -20
    for ax, key, label in ((axes[0], "fast_bytes", "fast bytes per sequence (MB)"),
                           (axes[1], "total_bytes", "fast + offloaded bytes per sequence (MB)")):
        for name in shown:
            ps = sorted(families[name], key=lambda p: p[key])
            style = "*" if name == "full" else "s--" if ps[0]["method"] is None else "o-"
            ax.plot([p[key] * mb for p in ps], [p["kl"] for p in ps], style, color=colors[name], label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("KL(full || variant)")
    axes[0].legend(fontsize="small")
    lines = {}
    for p in result["points"]:
        if p["reload_bytes_per_token"] > 0 and "ott" not in p["variant"]:
            base = p["variant"].split("@")[0]
            lines.setdefault((base, p["budget"]), []).append(p)
    budgets = sorted({b for _, b in lines})
    for (base, budget), ps in sorted(lines.items()):
        ps = sorted(ps, key=lambda p: p["reload_bytes_per_token"])
        style = ("-" if base.startswith("calidrop") else ":") + ("o" if "int8" not in base else "^")
        axes[2].plot([p["reload_bytes_per_token"] * mb for p in ps], [p["kl"] for p in ps], style,
                     color=plt.get_cmap("tab10")(budgets.index(budget)), label=f"{base} @ {budget}")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("reload traffic (MB per token; 4, 8, 12, 16, 32, all pages)")
    axes[2].set_ylabel("KL(full || variant)")
    axes[2].legend(fontsize="x-small", ncol=2)
    fig.suptitle(f"frontier: {result['context']}-token contexts, {result['segments']} segments")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, results["settings"], out / "results.md")
    for task in results:
        if task == "frontier":
            plot_frontier(results[task], out / "frontier.png")
        elif task == "long":
            plot_long(results[task], results["settings"], out / "long.png")
        elif task != "settings":
            plot(task, results[task], results["settings"], out / f"{task}.png")


def settings_record(args, ckpt, device, dtype):
    """Everything that produced the numbers: the arguments, versions, commit, model, thresholds."""
    def git(*cmd):
        run = subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else None
    return {"args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
            "seed": args.seed, "model": str(ckpt), "device": str(device), "dtype": str(dtype),
            "thresholds": {v: thresholds(v, args) for v in args.variants},
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
