"""The benchmark's summaries (mean and spread over seeds, the paper's number beside ours) and its Markdown."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cavga.benchmark.paper import PAPER_SOURCES, paper_value
from cavga.benchmark.specs import METRIC_TITLES, METRICS, ModelSpec


def suite_metrics(suite: str) -> tuple[str, ...]:
    return {"oneclass": ("image_auroc",), "ablation": ("iou",)}.get(suite, METRICS)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return float(np.mean(vals)), std


def summarize(
    suite: str, table: str | None, specs: Sequence[ModelSpec], categories: Sequence[str], records: Sequence[dict]
) -> dict:
    """``summary[metric][model][row]`` = mean, sd (sample, over seeds), n, the values, and the paper's number.

    Row "mean": per seed, the mean over the categories that have that seed; then mean and sd over seeds."""
    summary: dict[str, dict[str, dict[str, dict]]] = {}
    for metric in METRICS:
        per_model: dict[str, dict[str, dict]] = {}
        for spec in specs:
            paper_name = spec.paper_name or spec.name
            rows: dict[str, dict] = {}
            by_seed: dict[int, list[float]] = {}
            for category in categories:
                hits = [r for r in records if r["model"] == spec.name and r["category"] == category]
                values = [r["metrics"].get(metric) for r in hits]
                mean, std = _mean_std(values)
                rows[category] = {"mean": mean, "std": std, "n": len(hits), "values": values,
                                  "paper": paper_value(table, metric, paper_name, category)}  # fmt: skip
                for r in hits:
                    if r["metrics"].get(metric) is not None:
                        by_seed.setdefault(r["seed"], []).append(r["metrics"][metric])
            seed_means = [float(np.mean(v)) for _, v in sorted(by_seed.items())]
            mean, std = _mean_std(seed_means)
            rows["mean"] = {"mean": mean, "std": std, "n": len(seed_means), "values": seed_means,
                            "paper": paper_value(table, metric, paper_name, "mean")}  # fmt: skip
            per_model[spec.name] = rows
        summary[metric] = per_model
    return summary


PAPER_SCORE_COLUMN = " (paper score)"


def with_paper_score_columns(specs: Sequence[ModelSpec], records: Sequence[dict]) -> tuple[list[ModelSpec], list[dict]]:
    """The columns and records of a table, with the paper-literal map and score of a model (its records'
    ``paper_map``, from the same trained model) as a column of its own right after that model's."""
    columns: list[ModelSpec] = []
    out = list(records)
    for spec in specs:
        columns.append(spec)
        hits = [r for r in records if r["model"] == spec.name and r.get("paper_map")]
        if not hits:
            continue
        name = spec.name + PAPER_SCORE_COLUMN
        title = "the same model, the paper's map 1 - A and top_mean score" if spec.title else ""
        columns.append(dataclasses.replace(spec, name=name, title=title, paper_name="-"))
        out += [{**r, "model": name, "metrics": r["paper_map"]} for r in hits]
    return columns, out


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(entry: dict) -> str:
    text = fmt(entry["mean"])
    if entry.get("std") is not None:
        text += f" ± {entry['std']:.3f}"
    if entry.get("paper") is not None:
        paper = entry["paper"]
        text += f" ({paper:.2f})" if round(paper, 2) == paper else f" ({paper:.3f})"
    return text


def metric_table(metric: str, specs: Sequence[ModelSpec], categories: Sequence[str], summary: dict) -> str:
    """Rows = categories and "mean", columns = models; cells "ours ± sd (paper)"."""
    header = "| category | " + " | ".join(s.title or s.name for s in specs) + " |"
    if any(s.title for s in specs):
        header = "| category | " + " | ".join(f"{s.name}: {s.title}" if s.title else s.name for s in specs) + " |"
    lines = [header, "|---" * (len(specs) + 1) + "|"]
    for row in [*categories, "mean"]:
        cells = [_cell(summary[metric][s.name][row]) for s in specs]
        lines.append(f"| {'**mean**' if row == 'mean' else row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_object_table(records: Sequence[dict]) -> list[str]:
    """The records' per-object metrics (an object shown in several images counted once: Magnetic Tile's tiles,
    :func:`cavga.metrics.per_group`), a row per run; nothing where no record has them."""
    grouped = [r for r in records if r.get("per_group")]
    if not grouped:
        return []
    lines = [
        "## Per object (a tile's exposures counted once)",
        "",
        "| model | category | seed | objects (anomalous) | image AuROC | image AuROC, mean score | balanced acc. |",
        "|---" * 7 + "|",
    ]
    for r in grouped:
        g = r["per_group"]
        lines.append(
            f"| {r['model']} | {r['category']} | {r['seed']} | {g['n_groups']:.0f} ({g['n_anomalous_groups']:.0f}) "
            f"| {fmt(g['image_auroc'])} | {fmt(g['image_auroc_mean'])} | {fmt(g['balanced_accuracy'])} |"
        )
    note = (
        "An object is anomalous if any of its images is, scores the maximum of its images' scores (beside: their "
        "mean) and is called anomalous if any of its images is."
    )
    return [*lines, "", note, ""]


def markdown_report(
    meta: dict, specs: Sequence[ModelSpec], categories: Sequence[str], records: Sequence[dict], summary: dict
) -> str:
    suite, table = meta["suite"], meta.get("paper_table")
    b = meta["budget"]
    seeds = meta["seeds"]
    lines = [
        f"# cavga benchmark: {suite}",
        "",
        f"- command: `{meta.get('command') or 'n/a'}`",
        f"- data: `{meta['data']}`; categories: {', '.join(categories)}",
        f"- budget: {b['epochs']} epochs, batch {b['batch_size']}, image size D {b['image_size_d']} / "
        f"R {b['image_size_r']} / AE {b['image_size_ae']}, width {b['width'] or 'default'}, "
        f"max train {b['max_train'] or 'all'}, max test {b['max_test'] or 'all'}, "
        f"weak labels {b['anomalous_fraction']:.0%} of the anomalous test images"
        + (" (quick)" if meta.get("quick") else ""),
        f"- seeds: {', '.join(map(str, seeds))}" + (" (cells: mean ± sample sd over seeds)" if len(seeds) > 1 else ""),
        f"- git commit: {meta.get('git_commit') or 'n/a'}; cavga {meta['cavga_version']}; torch {meta['torch']}, "
        + (
            f"{meta['jobs']} jobs at once, {meta['threads']} thread(s) each"
            if meta.get("jobs", 1) > 1
            else f"{meta['threads']} threads"
        )
        + f"; this run {meta.get('total_seconds', 0):.0f} s, the models' own wall time "
        f"{sum(r['wall_seconds'] for r in records):.0f} s (cached ones included; devices in the Runs table)",
        "- paper: "
        + (
            f"numbers in parentheses are the paper's ({PAPER_SOURCES[table]}), where it has that row"
            if table
            else "no row of the paper matches this data"
        ),
        "",
    ]
    for metric in suite_metrics(suite):
        lines += [f"## {METRIC_TITLES[metric]}", "", metric_table(metric, specs, categories, summary), ""]
    if suite == "ablation":
        lines += ["Columns: " + "; ".join(f"{s.name} = {s.title}" for s in specs), ""]
    lines += per_object_table(records)
    lines += [
        "## Runs",
        "",
        "| model | category | seed | device | train s | eval s | wall s | cached |",
        "|---" * 8 + "|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['category']} | {r['seed']} | {r.get('device', 'n/a')} | {r['train_seconds']:.1f} "
            f"| {r['eval_seconds']:.1f} | {r['wall_seconds']:.1f} | {'yes' if r['cached'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"
