"""Files for people and programs: per-image predictions (heat maps, masks, overlays, JSON lines), the files of
an evaluation run that ``cavga report`` reads, and metric tables."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cavga.metrics import THRESHOLD, roc_curve, thin_curve
from cavga.report.visualize import heatmap_image, mask_image, overlay_image

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.jsonl"
CURVES_FILE = "curves.json"

METRIC_KEYS = ("image_auroc", "pixel_auroc", "iou", "iou_pooled", "aupro", "balanced_accuracy", "n_images")


def write_predictions(detector, files: Sequence[Path], out: Path, batch_size: int = 32) -> Path:
    """Per image: heat map and mask PNGs at the image's own size, an overlay PNG (the input with the map in
    colour and the predicted mask's contour), and one JSON line in predictions.jsonl."""
    out = Path(out)
    for sub in ("heatmaps", "masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    used: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        for path, pred in zip(chunk, detector.predict(chunk, batch_size=batch_size), strict=True):
            name = _unique_name(path, used)
            heatmap_image(pred.anomaly_map, pred.original_size).save(out / "heatmaps" / f"{name}.png")
            mask_image(pred.anomaly_map, size=pred.original_size).save(out / "masks" / f"{name}.png")
            _overlay_for(path, pred.anomaly_map, None).save(out / "overlays" / f"{name}.png")
            lines.append(
                {
                    "path": str(path),
                    "score": pred.score,
                    "label": "anomalous" if pred.label else "normal",
                    "raw_score": pred.raw_score,
                    "heatmap": f"heatmaps/{name}.png",
                    "mask": f"masks/{name}.png",
                    "overlay": f"overlays/{name}.png",
                    "anomalous_pixel_fraction": float(pred.mask.mean()),
                }
            )
    target = out / PREDICTIONS_FILE
    target.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return target


def write_evaluation(outputs, calibration, out: str | Path, threshold: float = THRESHOLD) -> Path:
    """The per-image files of an evaluation (``Cavga.evaluate``'s ``last_outputs_``) and the curves of its report.

    Per test image: heat map, mask and overlay PNGs (the overlay also shows the ground-truth contour where the
    image has a mask) and one line in predictions.jsonl with the true label, defect type and whether the decision
    was correct. ``curves.json`` holds the image and pixel ROC curves and the scores, so that ``cavga report``
    needs no model. Images that are not files (array datasets) get their overlay on a grey background.
    """
    out = Path(out)
    for sub in ("heatmaps", "masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    scores = calibration.normalize(outputs.raw_scores)
    lines = []
    used: set[str] = set()
    for i, path_text in enumerate(outputs.paths):
        path = Path(path_text)
        name = _unique_name(path, used)
        amap = outputs.anomaly_maps[i]
        true_mask = outputs.masks[i] if outputs.has_mask[i] else None
        overlay = _overlay_for(path, amap, true_mask)
        heatmap_image(amap, overlay.size).save(out / "heatmaps" / f"{name}.png")
        mask_image(amap, threshold, size=overlay.size).save(out / "masks" / f"{name}.png")
        overlay.save(out / "overlays" / f"{name}.png")
        predicted, truth = int(scores[i] > threshold), int(outputs.labels[i])
        lines.append(
            {
                "path": path_text,
                "score": float(scores[i]),
                "label": "anomalous" if predicted else "normal",
                "raw_score": float(outputs.raw_scores[i]),
                "true_label": "anomalous" if truth else "normal",
                "defect_type": outputs.defect_types[i],
                "correct": predicted == truth,
                "has_mask": bool(outputs.has_mask[i]),
                "heatmap": f"heatmaps/{name}.png",
                "mask": f"masks/{name}.png",
                "overlay": f"overlays/{name}.png",
                "anomalous_pixel_fraction": float((amap > threshold).mean()),
            }
        )
    (out / PREDICTIONS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    labels = np.asarray(outputs.labels).astype(bool)
    curves: dict = {"threshold": threshold, "image_roc": None, "pixel_roc": None}
    if labels.any() and not labels.all():
        curves["image_roc"] = dict(zip(("fpr", "tpr"), (a.tolist() for a in roc_curve(scores, labels)), strict=True))
    selected = np.asarray(outputs.has_mask, dtype=bool)
    if selected.any():
        gt = np.asarray(outputs.masks)[selected]
        if gt.any() and not gt.all():
            fpr, tpr = thin_curve(*roc_curve(np.asarray(outputs.anomaly_maps)[selected], gt))
            curves["pixel_roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    (out / CURVES_FILE).write_text(json.dumps(curves) + "\n")
    return out / PREDICTIONS_FILE


def _overlay_for(path: Path, anomaly_map: np.ndarray, true_mask: np.ndarray | None) -> Image.Image:
    from cavga.data import load_image

    try:
        image = load_image(path) if Path(path).is_file() else None
    except Exception as exc:  # an unreadable image must not stop the other files
        log.warning("no overlay background for %s: %s", path, exc)
        image = None
    if image is None:
        h, w = anomaly_map.shape
        image = Image.new("RGB", (w, h), (128, 128, 128))
    return overlay_image(image, anomaly_map, true_mask)


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
