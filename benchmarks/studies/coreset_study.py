"""How few dimensions the trunk memory's greedy coreset can select on without losing accuracy.

Filling the default map's memory (trunk_knn: 8192 rows chosen by greedy k-center selection from every normal
training position's 176-channel patch feature) was the largest share of a default fit on bottle once training
was no longer part of it: the selection reads every candidate once per row chosen, and reads them on a seeded
Gaussian random projection (PatchCore's trick) to ``PROJECTION_DIM`` dimensions, 128 before this study. Fewer
dimensions make each pass cheaper (32 dimensions of 190,000 candidates fit this machine's 32 MB L3 cache, 128 do
not); they also make the selection's distances coarser, which may keep worse rows. Only the selection reads the
projection: the memory keeps the original 176-channel rows and the map compares them exactly.

Everything else is the default model's (levels 4+8+16, no pooling, 8192 rows, the product's calibration split);
the figures are computed as ``benchmarks/studies/default_map.py`` computes them (its functions), so its 8192-row row of
each set is this study's 128-dimension row.

The rule (written down before any figure of this table was read):

1. Development sets: bottle, capsule, Magnetic Tile (split by tile) and the demo data (the mean of its three
   categories counts as one set), as for the default map.
2. The reference is the projection to 128 dimensions (the default before).
3. A candidate qualifies if on every set each of its image AuROC, pixel AuROC and AUPRO is at least the
   reference's less 0.005.
4. Among the qualifiers the fewest dimensions wins (the selection's cost falls with them; the seconds are
   reported, not ranked, on this shared machine); if none qualifies, the reference stays.

    python benchmarks/studies/coreset_study.py --out runs/coreset-study
    python benchmarks/studies/coreset_study.py --out runs/coreset-study --datasets bottle --projections 128 32

Writes OUT/coreset_study.json after every (set, projection) row (a rerun skips what it holds) and
OUT/coreset_study.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_map import SETS, features, run_study, score_memory  # noqa: E402

from cavga import metrics  # noqa: E402
from cavga.model.memory import LatentMemory  # noqa: E402

PROJECTIONS = (128, 64, 32, 16)
REFERENCE_PROJECTION, TOLERANCE, SEED, ROWS, MASK_QUANTILE = 128, 0.005, 0, 8192, 0.999
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_row(name: str, projection: int, parts: dict) -> dict:
    """One projection on one set: the memory filled on it, the test maps and the normal images' (the held-out
    slice's, and each training image's without its own rows) for the thresholds."""
    fit, cal, test = (features(parts[p][0], "4+8+16", 1) for p in ("fit", "cal", "test"))
    start = time.perf_counter()
    memory = LatentMemory(fit.shape[1], ROWS).fit([fit], seed=SEED, projection=projection)
    fill_seconds = time.perf_counter() - start
    scored = score_memory(memory, fit, cal, test, parts["test"])
    mask_threshold = float(np.quantile(scored.normal_maps, MASK_QUANTILE))
    return {
        "dataset": name,
        "projection": projection,
        "candidates": int(fit.shape[0] * fit.shape[-2] * fit.shape[-1]),
        **scored.figures,
        "iou_mask": metrics.iou(scored.maps, scored.masks, mask_threshold),
        "memory_seconds": round(fill_seconds, 1),
    }


def by_set(rows: list[dict], projection: int) -> dict[str, dict[str, float]]:
    """Each set's figures of one projection (the demo categories averaged into one set)."""
    per: dict[str, list[dict]] = {}
    for r in rows:
        if r["projection"] == projection:
            per.setdefault(SETS[r["dataset"]], []).append(r)
    return {s: {m: float(np.mean([r[m] for r in rs])) for m in METRICS} for s, rs in per.items()}


def choose(rows: list[dict]) -> dict:
    """The rule of the module docstring applied to ``rows``."""
    sets = set(SETS.values())
    reference = by_set(rows, REFERENCE_PROJECTION)
    if set(reference) != sets:
        return {"qualified": [], "winner": None, "worst_loss": {}}
    qualified, worst = [], {}
    for projection in sorted({r["projection"] for r in rows}):
        figures = by_set(rows, projection)
        if set(figures) != sets:
            continue
        worst[projection] = max(reference[s][m] - figures[s][m] for s in sets for m in METRICS)
        if worst[projection] <= TOLERANCE:
            qualified.append(projection)
    return {"qualified": qualified, "winner": min(qualified, default=REFERENCE_PROJECTION), "worst_loss": worst}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| set | projection dims | image AuROC | pixel AuROC | AUPRO | bal. acc. | IoU q0.999 | IoU ceiling | "
        "memory fill s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r["image_auroc"], r["pixel_auroc"], r["aupro"], r["balanced_accuracy"], r["iou_mask"])
        lines.append(
            f"| {r['dataset']} | {r['projection']} | "
            + " | ".join(f"{v:.3f}" for v in (*cells, r["iou_ceiling"]))
            + f" | {r['memory_seconds']} |"
        )
    verdict = choose(rows)
    losses = ", ".join(f"{p}: {v:+.4f}" for p, v in sorted(verdict["worst_loss"].items(), reverse=True))
    lines += ["", f"Rule: the largest loss against {REFERENCE_PROJECTION} dimensions on any set and metric "
              f"({losses}); qualified {verdict['qualified']}; winner {verdict['winner']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--projections", nargs="+", type=int, default=list(PROJECTIONS))
    args = parser.parse_args(argv)
    run_study(args.out, args.datasets, args.projections, "projection", run_row, "coreset_study", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
