"""The default model on every MVTec category it is given, in the layout of the paper's Tables 3 and 6.

For each category this fits the DEFAULT detector, ``cavga.Cavga(seed=SEED)`` with nothing else set (so it measures
whatever the default is when it runs; ``--image-size`` and the tests' ``--options`` are the only changes it takes),
times the fit's wall clock, saves the model under OUT/models/CATEGORY and evaluates it on the category's test split:
IoU at the calibrated 0.5 threshold (per-image mean over the defective images), pixel AuROC, AUPRO, image AuROC,
balanced accuracy. Beside them, the same figures of the paper-literal map (``paper_map``) of the same estimator
fitted a second time with that map asked for (OUT/models/CATEGORY-paper): the default map reads no trained weight,
so the default's own fit trains nothing, while the paper's map reads the trained network (one epoch for CAVGA-L).
``paper_model_same_default_map`` records that the trained model's own map gives the default's figures exactly.

Beside them, the **IoU ceiling**: the largest per-image-mean IoU of the raw map over ~100 thresholds (quantiles of
the defective test images' map values, plus the calibrated threshold and the calibrated mask itself), read off the
TEST masks. It is not a method (no threshold can be chosen this way without the test masks); it says how much of the
IoU gap is the threshold and how much is the map. The ratio calibrated / ceiling, and the mean predicted mask area of
the defective images at 0.5 against their mean true defect area (fractions of the image), say which way the
threshold misses.

The Markdown puts the paper's CAVGA-R_u and CAVGA-R_w IoU (Table 3) and balanced accuracy (Table 6) beside each
category the paper has, and the published 15-category means of PatchCore and PaDiM in a reference line. Categories
whose folder comes with a PROVENANCE.md saying its figures are not comparable with published numbers (the shared
capsule folder: its normal test images were moved out of train/good) are flagged.

    python benchmarks/mvtec_table.py --data ../shared/data/mvtec-bottle ../shared/data/mvtec-capsule --out runs/mvtec
    python benchmarks/mvtec_table.py --data /data/mvtec_ad --out runs/mvtec-table-full
    python benchmarks/mvtec_table.py --data /data/mvtec_ad --categories bottle hazelnut --out runs/mvtec-table --seed 1

``--data`` takes MVTec roots (every sub-folder holding train/good is a category) or category folders themselves.
Writes OUT/mvtec_table.json after every category (a rerun skips a category whose row it holds with the same
settings, and reuses a saved model whose fit finished) and OUT/mvtec_table.md; prints the table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cavga
from cavga import metrics
from cavga.benchmark.paper import paper_value

THRESHOLD = 0.5  # the calibrated maps' threshold (evaluate's IoU)
N_QUANTILES = 100
METRICS = ("iou", "iou_pooled", "pixel_auroc", "aupro", "image_auroc", "balanced_accuracy")
PAPER_MODELS = ("CAVGA-R_u", "CAVGA-R_w")
# Published 15-category MVTec AD means (image AuROC, pixel AuROC, PRO / AUPRO).
# PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, WideResNet-50,
# PatchCore-25% (Tables 1, 2 and the PRO table of the paper).
# PaDiM: Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021 workshops, WideResNet-50, as
# quoted in issue 33 (image AuROC 0.953, pixel AuROC 0.975, PRO 0.921).
REFERENCE = {
    "PatchCore (WRN-50, Roth et al. CVPR 2022)": {"image_auroc": 0.992, "pixel_auroc": 0.981, "aupro": 0.944},
    "PaDiM (WRN-50, Defard et al. 2021, as quoted in issue 33)": {
        "image_auroc": 0.953,
        "pixel_auroc": 0.975,
        "aupro": 0.921,
    },
}
ROW_KEYS = (
    "category",
    "root",
    "settings",
    "image_size",
    *METRICS,
    "iou_ceiling",
    "iou_ceiling_threshold",
    "iou_ceiling_source",
    "iou_ratio",
    "mask_area_at_threshold",
    "true_defect_area",
    "n_test",
    "n_defective",
    "fit_seconds",
    "train_seconds",
    "evaluate_seconds",
    "reused_model",
    *(f"paper_map_{m}" for m in METRICS),
    "paper_model_same_default_map",
    "not_comparable",
)


# ---------------------------------------------------------------- the data
def is_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir()


def find_categories(roots: list[Path], wanted: list[str] | None) -> list[tuple[str, Path]]:
    """(category, MVTec root) for every category folder of ``roots`` (a root may be a category folder itself),
    restricted to ``wanted`` in its order when given; a category found under two roots is an error."""
    found: dict[str, Path] = {}
    for root in roots:
        if not root.is_dir():
            raise SystemExit(f"{root}: no such folder")
        folders = [root] if is_category(root) else sorted(p for p in root.iterdir() if p.is_dir() and is_category(p))
        if not folders:
            raise SystemExit(f"{root}: no MVTec category (a folder holding train/good)")
        for folder in folders:
            if folder.name in found:
                raise SystemExit(f"category {folder.name!r} is in both {found[folder.name]} and {folder.parent}")
            found[folder.name] = folder.parent
    if wanted is None:
        return list(found.items())
    missing = [c for c in wanted if c not in found]
    if missing:
        raise SystemExit(f"categories not found: {', '.join(missing)} (found: {', '.join(found)})")
    return [(c, found[c]) for c in wanted]


def not_comparable(root: Path, category: str) -> str | None:
    """The first line of the category's PROVENANCE.md (beside it or in it) where that file says its figures are
    not comparable with published numbers."""
    for path in (root / "PROVENANCE.md", root / category / "PROVENANCE.md"):
        if path.is_file():
            text = path.read_text(errors="replace")
            if "not comparable" in text.lower():
                return text.strip().splitlines()[0].lstrip("# ").strip()
    return None


# ---------------------------------------------------------------- the ceiling
def scan_ious(maps: np.ndarray, masks: np.ndarray, thresholds) -> list[float]:
    """Per-image-mean IoU (:func:`cavga.metrics.iou`) of ``maps > t`` for each t; maps on [0, 1]."""
    return [metrics.iou(maps, masks, float(t), "mean") for t in thresholds]


def to_unit(raw: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``raw`` on [0, 1] (the same order) and the (offset, span) that maps a unit threshold back to raw units."""
    raw = np.asarray(raw, dtype=np.float64)
    lo = min(float(raw.min()), 0.0)
    span = max(float(raw.max()) - lo, 1e-12)
    return np.clip((raw - lo) / span, 0.0, 1.0), lo, span


def iou_ceiling(
    raw_maps: np.ndarray,
    masks: np.ndarray,
    calibrated_maps: np.ndarray | None = None,
    raw_threshold: float | None = None,
    n_quantiles: int = N_QUANTILES,
) -> dict[str, Any]:
    """The largest per-image-mean IoU of ``raw_maps > t`` with ``masks`` over t in ``n_quantiles`` quantiles of the
    defective images' map values and ``raw_threshold`` (the calibrated one); ``calibrated_maps > 0.5`` (the model's
    own mask, which may not be a single raw threshold) is a candidate too, so the ceiling is never below the
    calibrated IoU. Read off the test masks: a ceiling, not a method.

    Returns iou, threshold (raw units; None where the calibrated mask won) and source ("quantile", "calibrated
    threshold" or "calibrated mask")."""
    masks = np.asarray(masks, dtype=bool)
    unit, lo, span = to_unit(raw_maps)
    defective = masks.reshape(len(masks), -1).any(axis=1)
    if not defective.any():
        raise ValueError("the IoU ceiling needs at least one mask with foreground pixels")
    quantiles = (np.arange(n_quantiles) + 0.5) / n_quantiles
    candidates = [(float(t), "quantile") for t in np.quantile(unit[defective], quantiles)]
    if raw_threshold is not None and np.isfinite(raw_threshold):
        candidates.append((float(np.clip((raw_threshold - lo) / span, 0.0, 1.0)), "calibrated threshold"))
    ious = scan_ious(unit, masks, [t for t, _ in candidates])
    best = int(np.argmax(ious))
    result = {"iou": ious[best], "threshold": candidates[best][0] * span + lo, "source": candidates[best][1]}
    if calibrated_maps is not None:
        own = metrics.iou(np.asarray(calibrated_maps), masks, THRESHOLD, "mean")
        if own > result["iou"]:
            result = {"iou": own, "threshold": None, "source": "calibrated mask"}
    return result


def localization_row(outputs, calibration) -> dict[str, Any]:
    """The ceiling, the ratio and the mask areas of ``detector.last_outputs_`` (the images that have masks)."""
    has = np.asarray(outputs.has_mask, dtype=bool)
    if not has.any():
        return {k: None for k in ("iou_ceiling", "iou_ceiling_threshold", "iou_ceiling_source")} | {
            "mask_area_at_threshold": None,
            "true_defect_area": None,
            "n_defective": 0,
        }
    raw = outputs.anomaly_maps if outputs.raw_maps is None else outputs.raw_maps
    maps, masks, labels = outputs.anomaly_maps[has], outputs.masks[has].astype(bool), outputs.labels[has]
    ceiling = iou_ceiling(raw[has], masks, maps, getattr(calibration, "map_threshold", None))
    defective = labels == 1
    area = (maps[defective] > THRESHOLD).reshape(int(defective.sum()), -1).mean(axis=1)
    true = masks[defective].reshape(int(defective.sum()), -1).mean(axis=1)
    return {
        "iou_ceiling": ceiling["iou"],
        "iou_ceiling_threshold": ceiling["threshold"],
        "iou_ceiling_source": ceiling["source"],
        "mask_area_at_threshold": float(area.mean()) if area.size else None,
        "true_defect_area": float(true.mean()) if true.size else None,
        "n_defective": int(defective.sum()),
    }


# ---------------------------------------------------------------- one category
def estimator_args(args: argparse.Namespace) -> dict[str, Any]:
    """What ``Cavga(...)`` is given: the seed, and only what the command line sets beside it."""
    kwargs = {**args.options, "seed": args.seed}
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    return kwargs


def fitted_model(
    category: str, root: Path, args: argparse.Namespace, settings: dict, paper: bool = False
) -> tuple[Any, float, bool]:
    """The category's model, its fit seconds and whether it was reused: a saved model whose fit finished with the
    same settings is loaded, otherwise a default one is fitted, timed and saved. ``paper``: the same estimator
    fitted with the paper's map beside (``paper_map=True``, which trains the network the paper's map reads where
    the default's own fit does not), kept under models/CATEGORY-paper."""
    model_dir = args.out / "models" / (f"{category}-paper" if paper else category)
    record = model_dir / "fit.json"
    if record.is_file():
        info = json.loads(record.read_text())
        if info.get("settings") == settings:
            print(f"{category}: reusing the model in {model_dir}", flush=True)
            return cavga.load(model_dir), info["fit_seconds"], True
    detector = cavga.Cavga(**estimator_args(args))
    start = time.perf_counter()
    detector.fit(root, format="mvtec", category=category, progress=False, paper_map=paper)
    fit_seconds = time.perf_counter() - start
    detector.save(model_dir)
    record.write_text(json.dumps({"settings": settings, "fit_seconds": fit_seconds}, indent=1) + "\n")
    return detector, fit_seconds, False


def run_category(category: str, root: Path, args: argparse.Namespace, settings: dict) -> dict[str, Any]:
    detector, fit_seconds, reused = fitted_model(category, root, args, settings)
    start = time.perf_counter()
    result = detector.evaluate(root, format="mvtec", category=category)
    evaluate_seconds = time.perf_counter() - start
    # The paper's column: the paper-literal map of the same estimator fitted with it beside (its network trained;
    # its own map is the default's, which the check below records).
    beside, _, _ = fitted_model(category, root, args, settings, paper=True)
    paper_result = beside.evaluate(root, format="mvtec", category=category, paper_map=True)
    row: dict[str, Any] = {"category": category, "root": str(root), "settings": settings}
    row["image_size"] = detector.model_config.image_size
    row |= {m: result.get(m) for m in METRICS}
    row |= localization_row(detector.last_outputs_, detector.calibration_)
    iou, ceiling = row["iou"], row["iou_ceiling"]
    row["iou_ratio"] = iou / ceiling if iou is not None and ceiling else None
    row["n_test"] = result.get("n_images")
    row |= {"fit_seconds": fit_seconds, "train_seconds": getattr(detector, "train_seconds_", None)}
    row |= {"evaluate_seconds": evaluate_seconds, "reused_model": reused}
    paper = paper_result.get("paper_map") or {}
    row |= {f"paper_map_{m}": paper.get(m) for m in METRICS}
    row["paper_model_same_default_map"] = all(paper_result.get(m) == result.get(m) for m in METRICS)
    row["not_comparable"] = not_comparable(root, category)
    return {k: row.get(k) for k in ROW_KEYS}


# ---------------------------------------------------------------- writing
def machine() -> dict[str, Any]:
    return {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cavga_version": cavga.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def paper_cells(category: str) -> list[float | None]:
    """The paper's R_u and R_w IoU (Table 3), then their balanced accuracy (Table 6); None where it lacks the row."""
    return [paper_value("mvtec", m, model, category) for m in ("iou", "balanced_accuracy") for model in PAPER_MODELS]


def markdown(rows: list[dict], reference: dict = REFERENCE) -> str:
    head = (
        "| category | IoU (0.5) | IoU ceiling† | ratio | pixel AuROC | AUPRO | image AuROC | bal. acc. | fit s "
        "| paper R_u IoU | paper R_w IoU | paper R_u acc. | paper R_w acc. |"
    )
    lines = [
        "## The default model on MVTec (layout of the paper's Tables 3 and 6)",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    ours = ("iou", "iou_ceiling", "iou_ratio", "pixel_auroc", "aupro", "image_auroc", "balanced_accuracy")
    for row in rows:
        mark = " ‡" if row["not_comparable"] else ""
        cells = [_fmt(row[k]) for k in ours] + [_fmt(row["fit_seconds"], 1)]
        cells += [_fmt(v, 2) for v in paper_cells(row["category"])]
        lines.append(f"| {row['category']}{mark} | " + " | ".join(cells) + " |")
    if rows:
        means = [_fmt(_mean(r[k] for r in rows)) for k in ours] + [_fmt(_mean(r["fit_seconds"] for r in rows), 1)]
        paper = [[*paper_cells(r["category"])] for r in rows]
        means += [_fmt(_mean(p[j] for p in paper), 2) for j in range(4)]
        lines.append(f"| **mean ({len(rows)})** | " + " | ".join(means) + " |")
    lines.append("")
    for name, values in reference.items():
        lines.append(
            f"reference, {name}, 15-category means: image AuROC {values['image_auroc']:.3f}, "
            f"pixel AuROC {values['pixel_auroc']:.3f}, AUPRO/PRO {values['aupro']:.3f}"
        )
    lines += [
        "",
        "† IoU ceiling: the best per-image-mean IoU of the raw map over ~100 thresholds, READ OFF THE TEST MASKS: "
        "a ceiling, not a method. ratio = IoU (0.5) / ceiling.",
        "Paper columns: CAVGA-R_u / CAVGA-R_w, Table 3 (IoU) and Table 6 (balanced accuracy); their mean row is "
        "over the categories above that the paper has (the paper's own means cover all 15).",
    ]
    settings = {json.dumps(r["settings"], sort_keys=True) for r in rows}
    lines.append(f"Cavga(...) given: {' / '.join(sorted(settings))} (anything else: the default model's own).")
    flagged = [r for r in rows if r["not_comparable"]]
    if flagged:
        lines.append(
            "‡ not comparable with published numbers: "
            + "; ".join(f"{r['category']} ({r['not_comparable']}, see its PROVENANCE.md)" for r in flagged)
            + ". The shared capsule folder's normal test images were moved out of train/good."
        )
    lines += [
        "",
        "### Masks and the paper-literal map",
        "",
        "| category | mask area at 0.5 | true defect area | ceiling threshold (raw) | IoU pooled | eval s "
        "| paper-map IoU | paper-map pixel AuROC | paper-map AUPRO | paper-map image AuROC | paper-map bal. acc. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            _fmt(row["mask_area_at_threshold"]),
            _fmt(row["true_defect_area"]),
            "calibrated mask" if row["iou_ceiling_threshold"] is None else f"{row['iou_ceiling_threshold']:.4g}",
            _fmt(row["iou_pooled"]),
            _fmt(row["evaluate_seconds"], 1),
        ]
        cells += [_fmt(row[f"paper_map_{m}"]) for m in ("iou", "pixel_auroc", "aupro", "image_auroc")]
        cells.append(_fmt(row["paper_map_balanced_accuracy"]))
        lines.append(f"| {row['category']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save(path: Path, document: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    path.with_suffix(".md").write_text(markdown(document["rows"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="MVTec roots or category folders")
    parser.add_argument("--categories", nargs="+", default=None, help="default: every category found")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=None, help="default: the default model's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--options", type=json.loads, default={}, help="JSON of further Cavga(...) options: for tests only"
    )
    args = parser.parse_args(argv)
    categories = find_categories(args.data, args.categories)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "mvtec_table.json"
    settings = estimator_args(args)
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    command = [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
    document = {"command": command, "machine": machine(), "reference": REFERENCE, "rows": old}
    for category, root in categories:
        if any(r["category"] == category and r["settings"] == settings for r in document["rows"]):
            print(f"{category}: done already (in {path})", flush=True)
            continue
        print(f"{category} ({root}) ...", flush=True)
        row = run_category(category, root, args, settings)
        document["rows"] = [r for r in document["rows"] if r["category"] != category] + [row]
        save(path, document)
    if not path.exists():
        save(path, document)
    print(markdown(document["rows"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
