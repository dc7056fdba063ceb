"""Files for people and programs: per-image predictions (heat maps, masks, overlays, JSON lines), the files of
an evaluation run that ``cavga report`` reads, and metric tables."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cavga.metrics import THRESHOLD, roc_curve, thin_curve
from cavga.report.visualize import heatmap_image, map_image, mask_image, overlay_image

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.jsonl"
ERRORS_FILE = "errors.jsonl"
CURVES_FILE = "curves.json"
OUTPUT_DIRS = ("heatmaps", "anomaly_maps", "masks", "overlays")

METRIC_KEYS = ("image_auroc", "pixel_auroc", "iou", "iou_pooled", "aupro", "balanced_accuracy", "n_images")


@dataclass
class PredictRun:
    """What one streamed prediction run did (``cavga predict``)."""

    n_images: int  # files given
    n_written: int  # predicted and appended by this run
    n_skipped: int  # already in predictions.jsonl (resumed)
    n_failed: int  # unreadable files, one line each in errors.jsonl
    predictions: Path
    errors: Path


def output_names(files: Sequence[Path]) -> list[str]:
    """The output file stem of each input, a function of the whole list only, so that a resumed run, or a
    torchrun rank that sees a shard, names each image as an uninterrupted single process does."""
    used: set[str] = set()
    return [_unique_name(Path(path), used) for path in files]


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The records of a JSON-lines file that is only ever appended to (missing file: none).

    A last line torn by a crash (no newline, or not JSON) is dropped, and with ``repair`` cut off the file so
    that the next append starts on a fresh line. A bad line before the last is not a crash's doing: ValueError.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    good_end = 0
    pieces = data.split(b"\n")
    terminated = pieces[:-1]  # the piece after the last newline is a torn tail (b"" when there is none)
    for index, piece in enumerate(terminated):
        try:
            record = json.loads(piece)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            if index == len(terminated) - 1:
                break  # a torn last line whose newline made it to disk
            raise ValueError(f"{path}: line {index + 1} is not a JSON object ({exc})") from exc
        records.append(record)
        good_end += len(piece) + 1
    if good_end != len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - good_end)
        if repair:
            with open(path, "rb+") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
    return records


def clear_predictions(out: Path) -> None:
    """Remove what a prediction run writes into ``out`` (``--overwrite``), and nothing else."""
    for name in (PREDICTIONS_FILE, ERRORS_FILE):
        (out / name).unlink(missing_ok=True)
    for sub in OUTPUT_DIRS:
        shutil.rmtree(out / sub, ignore_errors=True)


def stream_predictions(
    detector,
    files: Sequence[Path],
    out: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    resume: bool = True,
    done: Iterable[str] = (),
    progress: bool = False,
) -> PredictRun:
    """Predict ``files`` batch by batch into ``out``: per image a heat map, a mask and an overlay PNG (at the
    image's own size) and one line in predictions.jsonl, appended (one write per batch, fsynced) once its PNGs
    are on disk. Memory holds one batch of images.

    ``resume``: images already in predictions.jsonl (or in ``done``) are skipped, after dropping a torn last
    line; otherwise the outputs of an earlier run are removed first. A file that cannot be read is one line
    ``{"path", "reason"}`` in errors.jsonl (rewritten each run: what failed is tried again) and the run goes on.
    Batches are the fixed slices ``files[k*batch_size : (k+1)*batch_size]``, so each image is scored in the same
    batch however often the run was interrupted, and a resumed run writes the very same lines.
    """
    from cavga.data import load_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(files) if names is None else list(names)
    target, errors_path = out / PREDICTIONS_FILE, out / ERRORS_FILE
    if not resume:
        clear_predictions(out)
    finished = {str(record.get("path")) for record in read_jsonl(target, repair=True)} | set(map(str, done))
    for sub in OUTPUT_DIRS:
        (out / sub).mkdir(exist_ok=True)
    n_skipped = sum(str(path) in finished for path in files)
    n_written = n_failed = 0
    bar = _progress_bar(len(files), n_skipped, progress)
    with open(target, "a", encoding="utf-8") as predictions, open(errors_path, "w", encoding="utf-8") as errors:
        for start in range(0, len(files), batch_size):
            batch = list(zip(files[start : start + batch_size], names[start : start + batch_size], strict=True))
            if all(str(path) in finished for path, _ in batch):
                continue
            images, readable = [], []
            for path, name in batch:
                try:
                    images.append(load_image(path))
                    readable.append((path, name))
                except Exception as exc:  # an unreadable file is reported, the others go on
                    if str(path) not in finished:
                        errors.write(json.dumps({"path": str(path), "reason": str(exc)}) + "\n")
                        n_failed += 1
            errors.flush()
            lines = []
            for (path, name), image, pred in _predict_each(detector, readable, images, errors):
                if pred is None:
                    n_failed += str(path) not in finished
                    continue
                if str(path) in finished:
                    continue
                heatmap_image(pred.anomaly_map, image.size).save(out / "heatmaps" / f"{name}.png")
                map_image(pred.anomaly_map, image.size).save(out / "anomaly_maps" / f"{name}.png")
                mask_image(pred.anomaly_map, size=image.size).save(out / "masks" / f"{name}.png")
                overlay_image(image, pred.anomaly_map, None).save(out / "overlays" / f"{name}.png")
                lines.append(_prediction_line(path, name, pred))
            if lines:
                predictions.write("".join(json.dumps(line) + "\n" for line in lines))
                predictions.flush()
                os.fsync(predictions.fileno())
                n_written += len(lines)
            bar.update(sum(str(path) not in finished for path, _ in batch))
    bar.close()
    return PredictRun(len(files), n_written, n_skipped, n_failed, target, errors_path)


def _predict_each(detector, readable: list, images: list, errors):
    """(item, image, prediction) for each readable file: one forward pass for the batch; if that fails on a
    file (its preprocessing), each image alone, and the failing ones are reported with prediction None."""
    if not images:
        return []
    try:
        return list(zip(readable, images, detector.predict(images, batch_size=len(images)), strict=True))
    except Exception:
        log.debug("batch failed; predicting its images one by one", exc_info=True)
    results = []
    for item, image in zip(readable, images, strict=True):
        try:
            results.append((item, image, detector.predict(image)[0]))
        except Exception as exc:
            errors.write(json.dumps({"path": str(item[0]), "reason": f"cannot be predicted: {exc}"}) + "\n")
            results.append((item, image, None))
    errors.flush()
    return results


def _prediction_line(path: Path, name: str, pred) -> dict:
    return {
        "path": str(path),
        **prediction_fields(pred.pred_score, pred.pred_label, name),
        "raw_score": pred.raw_score,
        "heatmap": f"heatmaps/{name}.png",
        "overlay": f"overlays/{name}.png",
        "anomalous_pixel_fraction": float(pred.pred_mask.mean()),
    }


def prediction_fields(score: float, label: int, name: str) -> dict:
    """The decision fields of a predictions.jsonl line, under anomalib's names: ``pred_score``, ``pred_label``
    (0/1), ``pred_mask`` and ``anomaly_map`` (paths of the mask PNG and of the 8-bit grayscale map PNG)."""
    return {
        "pred_score": float(score),
        "pred_label": int(label),
        "pred_mask": f"masks/{name}.png",
        "anomaly_map": f"anomaly_maps/{name}.png",
    }


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: shown only on a terminal, so logs and pipes get no bar.
    return tqdm(total=total, initial=initial, unit="img", desc="predict", disable=None if enabled else True)


def write_predictions(detector, files: Sequence[Path], out: Path, batch_size: int = 32) -> Path:
    """Per image: heat map and mask PNGs at the image's own size, an overlay PNG (the input with the map in
    colour and the predicted mask's contour), and one JSON line in predictions.jsonl (a fresh run; see
    :func:`stream_predictions`)."""
    return stream_predictions(detector, files, out, batch_size=batch_size, resume=False).predictions


def write_evaluation(outputs, calibration, out: str | Path, threshold: float = THRESHOLD) -> Path:
    """The per-image files of an evaluation (``Cavga.evaluate``'s ``last_outputs_``) and the curves of its report.

    Per test image: heat map, mask and overlay PNGs (the overlay also shows the ground-truth contour where the
    image has a mask) and one line in predictions.jsonl with the true label, defect type and whether the decision
    was correct. ``curves.json`` holds the image and pixel ROC curves and the scores, so that ``cavga report``
    needs no model. Images that are not files (array datasets) get their overlay on a grey background.
    """
    out = Path(out)
    for sub in OUTPUT_DIRS:
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
        map_image(amap, overlay.size).save(out / "anomaly_maps" / f"{name}.png")
        mask_image(amap, threshold, size=overlay.size).save(out / "masks" / f"{name}.png")
        overlay.save(out / "overlays" / f"{name}.png")
        predicted, truth = int(scores[i] > threshold), int(outputs.labels[i])
        lines.append(
            {
                "path": path_text,
                **prediction_fields(scores[i], predicted, name),
                "raw_score": float(outputs.raw_scores[i]),
                "gt_label": truth,
                "defect_type": outputs.defect_types[i],
                "correct": predicted == truth,
                "has_mask": bool(outputs.has_mask[i]),
                "heatmap": f"heatmaps/{name}.png",
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
    for name, metrics in rows.items():
        group = metrics.get("per_group")
        if group:
            lines.append(f"{name}, per object: {per_object_summary(group)}")
    return "\n".join(lines)


def per_object_summary(group: dict) -> str:
    """One line for :func:`cavga.metrics.per_group`'s metrics (an object scored by the max of its images)."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (
        f"{group['n_groups']} objects ({group['n_anomalous_groups']} anomalous), each scored by the maximum of its "
        f"images: image_auroc {cell(group['image_auroc'])} (by the mean {cell(group['image_auroc_mean'])}), "
        f"balanced_accuracy {cell(group['balanced_accuracy'])}"
    )
