"""Which image score the default map should be read with: its maximum (the default, ``map_max``) or a mean of its
top pixels or its coarse maximum.

The default model scores an image by the largest value of its blurred, upsampled trunk_knn map. PatchCore takes
the largest patch distance (re-weighted by how isolated its nearest memory row is); a mean of the top pixels is
less moved by one noisy patch and more by a large defect. This study reads the default map (levels 4+8+16, no
pooling, 8192 rows, the product's 64-dimension coreset and calibration split) once per development set and scores
it four ways:

* ``max``: the blurred map's maximum (the default);
* ``top1``: the mean of the blurred map's top 1 % of pixels;
* ``top01``: the mean of its top 0.1 %;
* ``coarse_max``: the largest distance on the stride-8 grid, before upsampling and blurring.

Balanced accuracy is reported at each score's own threshold: the 95th percentile of the normal images' scores (the
held-out slice, and each training image without its own memory rows), as the product calibrates.

The rule (written down before any figure of this table was read):

1. Development sets: bottle, capsule, Magnetic Tile (split by tile) and the demo data (the mean of its three
   categories counts as one set), as for the default map.
2. A candidate qualifies if on every set its image AuROC is at least ``max``'s less 0.005.
3. A qualifier replaces ``max`` only if its mean image AuROC over the sets is higher than ``max``'s by at least
   0.005; the highest such mean wins. Otherwise ``max`` stays.

    python benchmarks/studies/image_score.py --out runs/image-score

Writes OUT/image_score.json after every set (a rerun skips what it holds) and OUT/image_score.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_map import BATCH, SETS, distance_maps, features, run_study  # noqa: E402

from cavga import metrics  # noqa: E402
from cavga.model.memory import LatentMemory  # noqa: E402

SCORES = ("max", "top1", "top01", "coarse_max")
SEED, ROWS, LOSS, GAIN = 0, 8192, 0.005, 0.005


def coarse_maps(memory: LatentMemory, feats: torch.Tensor, leave_out: bool = False) -> np.ndarray:
    """The distance maps on the memory's own grid (B, h, w), no upsampling or blur."""
    out = []
    with torch.no_grad():
        for start in range(0, feats.shape[0], BATCH):
            own = torch.arange(start, min(start + BATCH, feats.shape[0])) if leave_out else None
            out.append(memory(feats[start : start + BATCH], own)[:, 0])
    return torch.cat(out).numpy()


def image_scores(blurred: np.ndarray, coarse: np.ndarray) -> dict[str, np.ndarray]:
    """Each candidate's score of every image, from its blurred map (N, H, W) and its coarse one (N, h, w)."""
    flat = np.sort(blurred.reshape(len(blurred), -1), axis=1)
    pixels = flat.shape[1]
    return {
        "max": flat[:, -1],
        "top1": flat[:, -max(1, pixels // 100) :].mean(1),
        "top01": flat[:, -max(1, pixels // 1000) :].mean(1),
        "coarse_max": coarse.reshape(len(coarse), -1).max(1),
    }


def run_row(name: str, score: str, parts: dict) -> dict:
    """Every candidate on one set (``score`` is unused: one row holds them all, run once per set)."""
    fit, cal, test = (features(parts[p][0], "4+8+16", 1) for p in ("fit", "cal", "test"))
    memory = LatentMemory(fit.shape[1], ROWS).fit([fit], seed=SEED)
    _, masks, labels, _ = parts["test"]
    size = masks.shape[-2:]
    test_scores = image_scores(distance_maps(memory, test, size), coarse_maps(memory, test))
    normal = [
        image_scores(distance_maps(memory, cal, size), coarse_maps(memory, cal)),
        image_scores(distance_maps(memory, fit, size, True), coarse_maps(memory, fit, True)),
    ]
    row = {"dataset": name, "score": score}
    for candidate in SCORES:
        threshold = float(np.quantile(np.concatenate([n[candidate] for n in normal]), 0.95))
        values = test_scores[candidate]
        row[f"{candidate}_image_auroc"] = metrics.image_auroc(values, labels)
        row[f"{candidate}_balanced_accuracy"] = metrics.balanced_accuracy((values > threshold).astype(int), labels)
    return row


def by_set(rows: list[dict], key: str) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for r in rows:
        per.setdefault(SETS[r["dataset"]], []).append(r[key])
    return {s: float(np.mean(v)) for s, v in per.items()}


def choose(rows: list[dict]) -> dict:
    """The rule of the module docstring applied to ``rows`` (one row per data set, every candidate in it)."""
    if {SETS[r["dataset"]] for r in rows} != set(SETS.values()):
        return {"winner": None, "means": {}, "qualified": []}
    base = by_set(rows, "max_image_auroc")
    means, qualified = {}, []
    for candidate in SCORES:
        figures = by_set(rows, f"{candidate}_image_auroc")
        means[candidate] = float(np.mean(list(figures.values())))
        if all(figures[s] >= base[s] - LOSS for s in base):
            qualified.append(candidate)
    better = [c for c in qualified if c != "max" and means[c] >= means["max"] + GAIN]
    return {"winner": max(better, key=means.get) if better else "max", "means": means, "qualified": qualified}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| set | " + " | ".join(f"{c} image AuROC" for c in SCORES) + " | "
        + " | ".join(f"{c} bal. acc." for c in SCORES) + " |",
        "|---|" + "---|" * (2 * len(SCORES)),
    ]  # fmt: skip
    for r in rows:
        cells = [r[f"{c}_image_auroc"] for c in SCORES] + [r[f"{c}_balanced_accuracy"] for c in SCORES]
        lines.append(f"| {r['dataset']} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    verdict = choose(rows)
    means = ", ".join(f"{c} {m:.4f}" for c, m in verdict["means"].items())
    lines += ["", f"Rule: mean image AuROC over the sets {means}; qualified {verdict['qualified']}; "
              f"winner {verdict['winner']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args(argv)
    run_study(args.out, args.datasets, ["all"], "score", run_row, "image_score", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
