"""Files for people and programs: per-image predictions (heat maps, masks, JSON lines) and metric tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cavga.visualize import heatmap_image, mask_image

METRIC_KEYS = ("image_auroc", "pixel_auroc", "iou", "iou_pooled", "aupro", "balanced_accuracy", "n_images")


def write_predictions(detector, files: Sequence[Path], out: Path, batch_size: int = 32) -> Path:
    """Per image: heat map and mask PNGs at the image's own size, and one JSON line in predictions.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "heatmaps").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    lines = []
    used: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        for path, pred in zip(chunk, detector.predict(chunk, batch_size=batch_size), strict=True):
            name = _unique_name(path, used)
            heatmap_image(pred.anomaly_map, pred.original_size).save(out / "heatmaps" / f"{name}.png")
            mask_image(pred.anomaly_map, size=pred.original_size).save(out / "masks" / f"{name}.png")
            lines.append(
                {
                    "path": str(path),
                    "score": pred.score,
                    "label": "anomalous" if pred.label else "normal",
                    "raw_score": pred.raw_score,
                    "heatmap": f"heatmaps/{name}.png",
                    "mask": f"masks/{name}.png",
                    "anomalous_pixel_fraction": float(pred.mask.mean()),
                }
            )
    target = out / "predictions.jsonl"
    target.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return target


def _unique_name(path: Path, used: set[str]) -> str:
    # Images from different folders often share a stem (000.png in every defect folder): prefix the parent.
    base = f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def format_metrics_table(rows: dict[str, dict]) -> str:
    header = "| name | " + " | ".join(METRIC_KEYS) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_KEYS) + 1)]
    for name, metrics in rows.items():
        cells = []
        for key in METRIC_KEYS:
            value = metrics.get(key)
            cells.append("-" if value is None else (str(value) if key == "n_images" else f"{value:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
