"""Anomaly detection and localization metrics: pure functions of numpy arrays.

Conventions (SPEC section 3):

- ``anomaly_maps`` are ``N x H x W`` (or ``N x 1 x H x W``) floats in [0, 1], higher = more anomalous.
- ``masks`` are ground-truth maps of the same shape, bool or numbers that are exactly 0 or 1 (1 = anomalous).
- ``scores`` are per-image anomaly scores (any finite numbers) and ``labels`` per-image labels, 1 = anomalous
  (``cavga.data.types.ANOMALOUS``), 0 = normal.
- A pixel or image is predicted anomalous when its value is strictly greater than the threshold (the paper:
  "pixels > 0.5 are anomalous", "anomalous when the normalized score > 0.5").

A metric that is undefined for the data it is given (e.g. an AuROC with only one class present) raises
``ValueError`` saying why; ``compute_all`` turns those cases into ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "THRESHOLD",
    "aupro",
    "balanced_accuracy",
    "compute_all",
    "curve_area",
    "image_auroc",
    "iou",
    "per_group",
    "pixel_auroc",
    "roc_curve",
    "thin_curve",
    "threshold_predictions",
]

THRESHOLD = 0.5  # the paper's decision threshold on normalized scores and on anomaly maps

# 8-connectivity inside each image, no connection between images (axis 0) when labelling a stack at once.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _as_stack(array: Any, name: str) -> np.ndarray:
    """Return ``array`` as ``N x H x W`` (squeezing a channel axis of size 1); reject other shapes."""
    arr = np.asarray(array)
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(
                f"{name} must be N x H x W or N x 1 x H x W; got shape {arr.shape} with {arr.shape[1]} channels"
            )
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be N x H x W or N x 1 x H x W; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr


def _check_numeric(arr: np.ndarray, name: str) -> None:
    if arr.dtype == bool:
        return
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must hold numbers; got dtype {arr.dtype}")


def _first_bad(arr: np.ndarray, bad: np.ndarray) -> str:
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{arr[index]!r} at index {index}"


def _validate_maps(anomaly_maps: Any, name: str = "anomaly_maps") -> np.ndarray:
    arr = _as_stack(anomaly_maps, name)
    _check_numeric(arr, name)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    nan = np.isnan(arr)
    if nan.any():
        raise ValueError(f"{name} contains NaN (first at index {tuple(int(i) for i in np.argwhere(nan)[0])})")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 1:
        bad = (arr < 0) | (arr > 1)
        raise ValueError(f"{name} must lie in [0, 1]; found {_first_bad(arr, bad)} (min {lo}, max {hi})")
    return arr


def _validate_binary(array: Any, name: str, *, stack: bool) -> np.ndarray:
    """Return a bool array from bool or 0/1 numbers; ``stack`` selects N x H x W vs. 1-D validation."""
    arr = _as_stack(array, name) if stack else _as_vector(array, name)
    _check_numeric(arr, name)
    if arr.dtype == bool:
        return arr
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise ValueError(f"{name} must contain only 0 and 1 (or bool); found {_first_bad(arr, bad)}")
    return arr == 1


def _as_vector(array: Any, name: str) -> np.ndarray:
    """One value per image: a non-empty 1-D array."""
    arr = np.asarray(array)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per image); got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _validate_scores(scores: Any, name: str = "scores") -> np.ndarray:
    arr = _as_vector(scores, name)
    _check_numeric(arr, name)
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must be finite; found {_first_bad(arr, bad)}")
    return arr


def _validate_threshold(threshold: float, name: str = "threshold") -> float:
    value = float(threshold)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {threshold!r}")
    return value


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} differ in length: {a.shape[0]} vs {b.shape[0]}")


def _maps_and_masks(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps = _validate_maps(anomaly_maps)
    gt = _validate_binary(masks, "masks", stack=True)
    if maps.shape != gt.shape:
        raise ValueError(f"anomaly_maps and masks differ in shape: {maps.shape} vs {gt.shape}")
    return maps, gt


# ----------------------------------------------------------------------------------------------------------
# Core computations on validated arrays: return None where the metric is undefined.
# ----------------------------------------------------------------------------------------------------------


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney statistic, ties counted one half."""
    scores = scores.ravel()
    positive = positive.ravel()
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores)
    sorted_scores = scores[order]
    sorted_pos = positive[order]
    del order
    starts = np.concatenate(([0], np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]) + 1))
    del sorted_scores
    pos_per_group = np.add.reduceat(sorted_pos.astype(np.int64), starts)
    sizes = np.diff(np.concatenate((starts, [positive.size])))
    neg_per_group = sizes - pos_per_group
    neg_below = np.cumsum(neg_per_group) - neg_per_group
    # A positive beats every negative in a lower tie group and half of those in its own group.
    wins = np.sum(pos_per_group * (neg_below + 0.5 * neg_per_group), dtype=np.float64)
    return float(wins / (float(n_pos) * float(n_neg)))


def _iou(maps: np.ndarray, gt: np.ndarray, threshold: float, reduction: str) -> float | None:
    pred = maps > threshold
    if reduction == "pooled":
        union = np.count_nonzero(pred | gt)
        if union == 0:
            return None
        return float(np.count_nonzero(pred & gt) / union)
    anomalous = gt.reshape(gt.shape[0], -1).any(axis=1)
    if not anomalous.any():
        return None
    pred, gt = pred[anomalous], gt[anomalous]
    inter = np.count_nonzero(pred & gt, axis=(1, 2))
    union = np.count_nonzero(pred | gt, axis=(1, 2))
    return float(np.mean(inter / union))


def _pro_curve(maps: np.ndarray, gt: np.ndarray, num_thresholds: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """FPR and PRO for decreasing thresholds (both ascending), starting at (0, 0) and ending at (1, 1)."""
    n_bg = gt.size - int(np.count_nonzero(gt))
    regions, n_regions = ndimage.label(gt, structure=_REGION_STRUCTURE)
    if n_regions == 0 or n_bg == 0:
        return None
    # Every pixel carries its share of the curve: a background pixel adds 1/n_bg to the FPR once predicted,
    # a pixel of region r adds 1/(|r| n_regions) to the PRO (the mean over regions of the overlap fraction).
    region_sizes = np.bincount(regions.ravel())
    pixel_weight_pro = 1.0 / (region_sizes * float(n_regions))
    pixel_weight_pro[0] = 0.0
    values = maps.ravel()
    labels = regions.ravel()
    del regions
    if num_thresholds is None:
        # Exact curve: one point per distinct value, predicted = value >= threshold (MVTec AD's convention;
        # with all distinct values as thresholds this is the same curve as value > threshold).
        order = np.argsort(values)[::-1]
        sorted_values = values[order]
        sorted_labels = labels[order]
        del order
        fpr = np.cumsum(sorted_labels == 0, dtype=np.float64) / n_bg
        pro = np.cumsum(pixel_weight_pro[sorted_labels])
        del sorted_labels
        last_of_tie = np.concatenate(
            (np.flatnonzero(sorted_values[1:] != sorted_values[:-1]), [sorted_values.size - 1])
        )
        fpr, pro = fpr[last_of_tie], pro[last_of_tie]
    else:
        # Approximate curve: thresholds evenly spaced between the smallest and largest value; a pixel is
        # predicted at threshold j when value >= t_j, i.e. when it passes at least j + 1 thresholds.
        lo, hi = float(values.min()), float(values.max())
        thresholds = np.linspace(lo, hi, num_thresholds)
        passed = np.searchsorted(thresholds, values, side="right")
        bg_hits = np.bincount(passed, weights=(labels == 0), minlength=num_thresholds + 1)
        pro_hits = np.bincount(passed, weights=pixel_weight_pro[labels], minlength=num_thresholds + 1)
        # Cumulative from the highest threshold down: predicted at j <=> passed >= j + 1.
        fpr = np.cumsum(bg_hits[::-1])[:-1] / n_bg
        pro = np.cumsum(pro_hits[::-1])[:-1]
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ascending (x, y) from x[0] to x_max, the curve interpolated linearly at x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:inside], y[:inside]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < x_max and inside < x.size:
        x0, y0, x1, y1 = xs[-1], ys[-1], x[inside], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def _aupro(maps: np.ndarray, gt: np.ndarray, fpr_limit: float, num_thresholds: int | None) -> float | None:
    curve = _pro_curve(maps, gt, num_thresholds)
    if curve is None:
        return None
    fpr, pro = curve
    return float(min(max(_area_to(fpr, pro, fpr_limit) / fpr_limit, 0.0), 1.0))


def _balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float | None:
    n_pos = int(np.count_nonzero(truth))
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    acc_anomalous = np.count_nonzero(pred & truth) / n_pos
    acc_normal = np.count_nonzero(~pred & ~truth) / n_neg
    return float(0.5 * (acc_anomalous + acc_normal))


# ----------------------------------------------------------------------------------------------------------
# Public metrics
# ----------------------------------------------------------------------------------------------------------


def iou(anomaly_maps: Any, masks: Any, threshold: float = THRESHOLD, reduction: str = "mean") -> float:
    """Intersection over union of ``anomaly_maps > threshold`` with ``masks``.

    ``reduction="mean"``: IoU of each image whose mask has any foreground (the anomalous images), averaged
    over those images; normal images are left out because their IoU is 0 or undefined.
    ``reduction="pooled"``: intersection and union summed over all pixels of all images, then divided.
    """
    if reduction not in ("mean", "pooled"):
        raise ValueError(f"reduction must be 'mean' or 'pooled'; got {reduction!r}")
    maps, gt = _maps_and_masks(anomaly_maps, masks)
    value = _iou(maps, gt, _validate_threshold(threshold), reduction)
    if value is None:
        if reduction == "mean":
            raise ValueError("iou with reduction='mean' needs at least one mask with foreground pixels")
        raise ValueError("pooled iou is undefined: no pixel is anomalous in either the masks or the prediction")
    return value


def pixel_auroc(anomaly_maps: Any, masks: Any) -> float:
    """Area under the pixel-level ROC curve over all pixels of all images (MVTec AD / anomalib convention)."""
    maps, gt = _maps_and_masks(anomaly_maps, masks)
    value = _auroc(maps, gt)
    if value is None:
        raise ValueError("pixel_auroc needs both classes: masks must contain anomalous and normal pixels")
    return value


def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the image-level ROC curve of ``scores`` against ``labels`` (1 = anomalous)."""
    values = _validate_scores(scores)
    truth = _validate_binary(labels, "labels", stack=False)
    _same_length(values, truth, "scores", "labels")
    value = _auroc(values, truth)
    if value is None:
        raise ValueError("image_auroc needs both classes: labels must contain anomalous (1) and normal (0) images")
    return value


def aupro(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalized area under MVTec AD's per-region-overlap curve up to ``fpr_limit``, in [0, 1].

    At each threshold, PRO is the mean over every connected ground-truth region (8-connectivity, each image
    labelled on its own) of the fraction of the region's pixels predicted anomalous, and FPR the fraction of
    all ground-truth background pixels predicted anomalous. PRO is integrated over FPR from 0 to
    ``fpr_limit`` (trapezoids, the curve interpolated at ``fpr_limit``) and divided by ``fpr_limit``.

    ``num_thresholds=None`` evaluates the exact curve (every distinct map value is a threshold, one sort of
    all pixels); an integer uses that many thresholds evenly spaced between the smallest and largest map
    value, faster and lighter on memory for very large sets, at some loss of accuracy.
    """
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1]; got {fpr_limit!r}")
    if num_thresholds is not None and (isinstance(num_thresholds, bool) or int(num_thresholds) < 2):
        raise ValueError(f"num_thresholds must be None or an integer >= 2; got {num_thresholds!r}")
    maps, gt = _maps_and_masks(anomaly_maps, masks)
    value = _aupro(maps, gt, limit, None if num_thresholds is None else int(num_thresholds))
    if value is None:
        raise ValueError("aupro needs both classes: masks must contain anomalous regions and normal pixels")
    return value


def balanced_accuracy(pred_labels: Any, labels: Any) -> float:
    """The paper's "mean of the accuracy on anomalous and on normal images" (1 = anomalous)."""
    pred = _validate_binary(pred_labels, "pred_labels", stack=False)
    truth = _validate_binary(labels, "labels", stack=False)
    _same_length(pred, truth, "pred_labels", "labels")
    value = _balanced_accuracy(pred, truth)
    if value is None:
        raise ValueError(
            "balanced_accuracy needs both classes: labels must contain anomalous (1) and normal (0) images"
        )
    return value


def threshold_predictions(scores: Any, threshold: float = THRESHOLD) -> np.ndarray:
    """Predicted labels as an int64 array: 1 (anomalous) where ``scores > threshold``, else 0."""
    return (_validate_scores(scores) > _validate_threshold(threshold)).astype(np.int64)


def compute_all(
    scores: Any,
    pred_labels: Any,
    labels: Any,
    anomaly_maps: Any = None,
    masks: Any = None,
    has_mask: Any = None,
    threshold: float = THRESHOLD,
) -> dict[str, float | int | None]:
    """Every evaluation metric at once, as a JSON-ready dict.

    Keys: ``image_auroc``, ``pixel_auroc``, ``iou`` (per-image mean), ``iou_pooled``, ``aupro``,
    ``balanced_accuracy``, ``n_images``. ``pred_labels=None`` derives them as ``scores > threshold``; the
    maps are thresholded at ``threshold`` for the IoUs. ``anomaly_maps`` and ``masks`` hold one map per
    image, in the order of ``labels``. Pixel metrics use only the images whose ``has_mask`` is true (all
    images when ``has_mask`` is None); AUPRO uses its default 30 % FPR limit. A metric is None when it
    cannot be computed: no maps or masks given, no image with a mask, or only one class present.
    """
    thr = _validate_threshold(threshold)
    values = _validate_scores(scores)
    truth = _validate_binary(labels, "labels", stack=False)
    _same_length(values, truth, "scores", "labels")
    if pred_labels is None:
        pred = values > thr
    else:
        pred = _validate_binary(pred_labels, "pred_labels", stack=False)
        _same_length(pred, truth, "pred_labels", "labels")

    result: dict[str, float | int | None] = {
        "image_auroc": _auroc(values, truth),
        "pixel_auroc": None,
        "iou": None,
        "iou_pooled": None,
        "aupro": None,
        "balanced_accuracy": _balanced_accuracy(pred, truth),
        "n_images": int(truth.size),
    }
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("anomaly_maps and masks must be given together (or both left out)")
    if anomaly_maps is None:
        return result
    maps, gt = _maps_and_masks(anomaly_maps, masks)
    _same_length(maps, truth, "anomaly_maps", "labels")
    if has_mask is not None:
        selected = _validate_binary(has_mask, "has_mask", stack=False)
        _same_length(selected, truth, "has_mask", "labels")
        maps, gt = maps[selected], gt[selected]
    if maps.shape[0] == 0:
        return result
    result["pixel_auroc"] = _auroc(maps, gt)
    result["iou"] = _iou(maps, gt, thr, "mean")
    result["iou_pooled"] = _iou(maps, gt, thr, "pooled")
    result["aupro"] = _aupro(maps, gt, 0.3, None)
    return result


def per_group(scores: Any, pred_labels: Any, labels: Any, groups: list[str | None]) -> dict[str, float | int | None]:
    """Image-level metrics of the objects that ``groups`` names, where a dataset shows one object in several
    images (Magnetic Tile: a tile under six exposures). ``groups[i]``: the object of image i, or None (an
    object of its own). An object is anomalous if any of its images is; it scores the maximum of its images'
    scores (``image_auroc``; the mean of them in ``image_auroc_mean``) and is predicted anomalous if any of its
    images is (``balanced_accuracy``). Keys also ``n_groups``, ``n_anomalous_groups``; None as in compute_all."""
    values = _validate_scores(scores)
    pred = _validate_binary(pred_labels, "pred_labels", stack=False)
    truth = _validate_binary(labels, "labels", stack=False)
    _same_length(values, truth, "scores", "labels")
    _same_length(pred, truth, "pred_labels", "labels")
    _same_length(np.asarray(groups, dtype=object), truth, "groups", "labels")
    keys = [("group", g) if g is not None else ("image", i) for i, g in enumerate(groups)]
    index = {key: k for k, key in enumerate(dict.fromkeys(keys))}
    ids, n = np.array([index[key] for key in keys], dtype=np.int64), len(index)
    top = np.full(n, -np.inf)
    np.maximum.at(top, ids, values)  # _validate_scores gives float64
    mean = np.bincount(ids, weights=values, minlength=n) / np.bincount(ids, minlength=n)
    any_truth = np.bincount(ids, weights=truth.astype(np.float64), minlength=n) > 0
    any_pred = np.bincount(ids, weights=pred.astype(np.float64), minlength=n) > 0
    return {
        "image_auroc": _auroc(top, any_truth),
        "image_auroc_mean": _auroc(mean, any_truth),
        "balanced_accuracy": _balanced_accuracy(any_pred, any_truth),
        "n_groups": n,
        "n_anomalous_groups": int(any_truth.sum()),
    }


# ----------------------------------------------------------------------------------------------------------
# Curves (for plots)
# ----------------------------------------------------------------------------------------------------------


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr) of ``scores`` against boolean ``positive``: one point per distinct score, from
    (0, 0) (threshold above every score) to (1, 1). Ties move the curve diagonally, so its trapezoid area is
    the AuROC with ties counted one half."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {positive.size}")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both positive and negative examples")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_pos = scores[order], positive[order]
    # The last index of each run of equal scores: the curve's points lie after whole tie groups.
    ends = np.concatenate((np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), [scores.size - 1]))
    tps = np.cumsum(sorted_pos, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    fpr = np.concatenate(([0.0], fps / n_neg))
    tpr = np.concatenate(([0.0], tps / n_pos))
    return fpr, tpr


def curve_area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoid area under a curve given by increasing ``fpr``."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a curve, spread evenly along its length (so corners survive), ends kept."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    if fpr.size <= max_points:
        return fpr, tpr
    length = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(fpr)) + np.abs(np.diff(tpr)))))
    targets = np.linspace(0.0, length[-1], max_points)
    keep = np.unique(np.concatenate(([0, fpr.size - 1], np.searchsorted(length, targets).clip(0, fpr.size - 1))))
    return fpr[keep], tpr[keep]
