"""Tests of cavga.metrics against scikit-learn, hand-worked cases and a brute-force AUPRO reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from sklearn.metrics import balanced_accuracy_score, jaccard_score, roc_auc_score, roc_curve

from cavga import metrics

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def blob_data(seed: int, n: int = 6, size: int = 24, levels: int | None = None):
    """Smooth random maps in [0, 1] and masks made of a few random blobs (several regions per image)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 2:
            continue  # a normal image: empty mask
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y : y + h, x : x + w] = True
    noise = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.5, 1.5))
    maps = 0.5 * (noise - noise.min()) / (noise.max() - noise.min()) + 0.4 * masks * rng.random((n, 1, 1))
    maps = np.clip(maps, 0.0, 1.0)
    if levels is not None:
        maps = np.round(maps * (levels - 1)) / (levels - 1)
    return maps, masks


def reference_pro_curve(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray):
    """Slow, literal MVTec AD per-region overlap: loop over thresholds, label each image's regions."""
    regions = []  # (image index, boolean region mask)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        regions.extend((i, labelled == k) for k in range(1, count + 1))
    background = ~masks
    fprs, pros = [], []
    for t in np.sort(thresholds)[::-1]:  # highest threshold first gives ascending FPR
        pred = maps >= t
        pros.append(np.mean([pred[i][region].mean() for i, region in regions]))
        fprs.append(pred[background].mean())
    return np.r_[0.0, fprs], np.r_[0.0, pros]


def reference_area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Area up to ``limit`` with the trapezoid rule, the last segment interpolated at ``limit``."""
    keep = fpr <= limit
    xs, ys = fpr[keep], pro[keep]
    if xs[-1] < limit:
        xs = np.r_[xs, limit]
        ys = np.r_[ys, np.interp(limit, fpr, pro)]
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs))) / limit


# ------------------------------------------------------------------------------------------------------------
# AuROC
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes many ties
    assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_accepts_bool_labels_and_unbounded_scores():
    labels = np.array([False, True, False, True])
    scores = np.array([-3.0, 10.0, 2.0, 2.0])
    # Positives: 10 beats both negatives; 2 beats -3 and ties 2 -> (2 + 1.5) / 4.
    assert metrics.image_auroc(scores, labels) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn_over_all_pixels(seed):
    maps, masks = blob_data(seed, levels=30 if seed else None)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert metrics.pixel_auroc(maps[:, None], masks[:, None].astype(np.uint8)) == pytest.approx(expected, abs=1e-12)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        metrics.image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="both classes"):
        metrics.pixel_auroc(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))


@settings(max_examples=25, deadline=None)
@given(
    # Multiples of 1/64 keep the transforms strictly monotone in floating point (no underflow into ties).
    maps=hnp.arrays(np.float64, (2, 4, 5), elements=st.integers(0, 64).map(lambda k: k / 64)),
    masks=hnp.arrays(np.bool_, (2, 4, 5)),
)
def test_pixel_auroc_invariant_under_monotone_transforms(maps, masks):
    if masks.all() or not masks.any():
        return
    base = metrics.pixel_auroc(maps, masks)
    assert 0.0 <= base <= 1.0
    assert metrics.pixel_auroc(maps**3, masks) == pytest.approx(base, abs=1e-12)
    assert metrics.pixel_auroc(np.sqrt(maps) * 0.5, masks) == pytest.approx(base, abs=1e-12)
    assert metrics.pixel_auroc(1.0 - maps, masks) == pytest.approx(1.0 - base, abs=1e-12)


# ------------------------------------------------------------------------------------------------------------
# IoU
# ------------------------------------------------------------------------------------------------------------

# Two 2x3 images worked by hand (threshold 0.5, strict):
#   image 0: pred [[1,1,0],[0,0,0]] (0.5 is not > 0.5), mask [[1,0,0],[1,0,0]] -> inter 1, union 3 -> 1/3
#   image 1: pred [[0,0,0],[0,1,1]], mask [[0,0,0],[0,1,0]] -> inter 1, union 2 -> 1/2
#   mean = (1/3 + 1/2) / 2 = 5/12; pooled = (1 + 1) / (3 + 2) = 2/5
HAND_MAPS = np.array(
    [
        [[0.9, 0.6, 0.5], [0.2, 0.0, 0.1]],
        [[0.1, 0.2, 0.3], [0.5, 0.8, 1.0]],
    ]
)
HAND_MASKS = np.array(
    [
        [[1, 0, 0], [1, 0, 0]],
        [[0, 0, 0], [0, 1, 0]],
    ]
)


def test_iou_hand_worked_both_reductions():
    assert metrics.iou(HAND_MAPS, HAND_MASKS) == pytest.approx(5 / 12)
    assert metrics.iou(HAND_MAPS, HAND_MASKS, reduction="pooled") == pytest.approx(2 / 5)


def test_iou_mean_skips_normal_images_but_pooled_counts_their_false_positives():
    maps = np.concatenate([HAND_MAPS, np.full((1, 2, 3), 0.9)])
    masks = np.concatenate([HAND_MASKS, np.zeros((1, 2, 3), dtype=int)])
    assert metrics.iou(maps, masks) == pytest.approx(5 / 12)
    assert metrics.iou(maps, masks, reduction="pooled") == pytest.approx(2 / 11)


def test_iou_threshold_is_strict_and_configurable():
    maps = np.array([[[0.5, 0.3]]])
    masks = np.array([[[1, 0]]])
    assert metrics.iou(maps, masks) == 0.0
    assert metrics.iou(maps, masks, threshold=0.4) == 1.0
    assert metrics.iou(maps, masks, threshold=0.2) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_pooled_matches_sklearn_jaccard(seed):
    maps, masks = blob_data(seed)
    expected = jaccard_score(masks.ravel(), (maps > 0.5).ravel())
    assert metrics.iou(maps, masks, reduction="pooled") == pytest.approx(expected, abs=1e-12)


def test_iou_mean_matches_per_image_sklearn_jaccard():
    maps, masks = blob_data(3)
    per_image = [
        jaccard_score(mask.ravel(), (m > 0.5).ravel(), zero_division=0.0)
        for m, mask in zip(maps, masks, strict=True)
        if mask.any()
    ]
    assert metrics.iou(maps, masks) == pytest.approx(np.mean(per_image), abs=1e-12)


def test_iou_undefined_cases():
    with pytest.raises(ValueError, match="at least one mask"):
        metrics.iou(np.full((2, 3, 3), 0.9), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="pooled iou is undefined"):
        metrics.iou(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), reduction="pooled")
    assert metrics.iou(np.full((2, 3, 3), 0.9), np.zeros((2, 3, 3)), reduction="pooled") == 0.0
    with pytest.raises(ValueError, match="reduction"):
        metrics.iou(HAND_MAPS, HAND_MASKS, reduction="sum")


@settings(max_examples=25, deadline=None)
@given(
    maps=hnp.arrays(np.float64, (3, 3, 4), elements=st.floats(0, 1, allow_nan=False)),
    masks=hnp.arrays(np.bool_, (3, 3, 4)),
    threshold=st.floats(0, 1),
)
def test_iou_is_the_count_of_pixels_in_both_over_pixels_in_either(maps, masks, threshold):
    pred = maps > threshold
    inter, union = (pred & masks).sum(axis=(1, 2)), (pred | masks).sum(axis=(1, 2))
    shown = masks.any(axis=(1, 2))  # the mean runs over the images with a defect
    if masks.any():
        assert metrics.iou(maps, masks, threshold) == pytest.approx(np.mean(inter[shown] / union[shown]))
    if masks.any() or pred.any():
        assert metrics.iou(maps, masks, threshold, reduction="pooled") == pytest.approx(inter.sum() / union.sum())


# ------------------------------------------------------------------------------------------------------------
# AUPRO
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_single_region_equals_normalized_partial_roc_area(seed):
    # With one region, PRO is the TPR, so AUPRO is the ROC curve's area up to FPR 0.3 divided by 0.3.
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, 20, 20), dtype=bool)
    mask[0, 5:11, 7:15] = True
    maps = np.clip(rng.random((1, 20, 20)) * 0.7 + 0.3 * mask, 0, 1)
    fpr, tpr, _ = roc_curve(mask.ravel(), maps.ravel(), drop_intermediate=False)
    keep = fpr <= 0.3
    xs = np.r_[fpr[keep], 0.3]
    ys = np.r_[tpr[keep], np.interp(0.3, fpr, tpr)]
    expected = np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)) / 0.3
    assert 0.05 < expected < 0.95  # a case where the answer is neither trivial end
    assert metrics.aupro(maps, mask) == pytest.approx(expected, abs=1e-12)


def test_aupro_hand_worked_eight_connectivity():
    # Regions (8-connectivity): A = {(0,0), (1,1)} (diagonal neighbours), B = {(3,3)}; 13 background pixels,
    # one of them at 0.85. Curve: (0,0) -> (0, 1/4) at t=0.9 [A half found] -> (1/13, 1/4) at t=0.85
    # -> (1/13, 3/4) at t=0.8 -> (1/13, 1) at t=0.1 -> (1, 1).
    # Area to 0.3: (1/4)(1/13) + (0.3 - 1/13) -> normalized 1 - 2.5/13.
    # (4-connectivity would split A and give 1 - (2/3)/(13 * 0.3).)
    maps = np.zeros((1, 4, 4))
    mask = np.zeros((1, 4, 4), dtype=int)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3], maps[0, 2, 0] = 0.9, 0.1, 0.8, 0.85
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 3, 3] = 1
    assert metrics.aupro(maps, mask) == pytest.approx(1 - 2.5 / 13, abs=1e-12)


def test_aupro_does_not_join_regions_across_images():
    # Same pixel is foreground in both images: two regions, not one. At t=0.9 image 0's region is fully found
    # and image 1's half found: PRO = 3/4 at FPR 0 (a single joined region would give 2/3).
    maps = np.zeros((2, 3, 3))
    mask = np.zeros((2, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 0, 0] = mask[1, 0, 1] = True
    maps[0, 0, 0] = maps[1, 0, 0] = 0.9
    # Curve: (0,0) -> (0, 3/4) -> (1, 1); area to 0.3 = 0.3 * (3/4 + (3/4 + 0.3/4)) / 2.
    expected = (0.75 + 0.75 + 0.25 * 0.3) / 2
    assert metrics.aupro(maps, mask) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force_exactly_on_quantized_maps(seed):
    # With few distinct values the brute force can use every one of them as a threshold: same curve.
    maps, masks = blob_data(seed, levels=25)
    fpr, pro = reference_pro_curve(maps, masks, np.unique(maps))
    for limit in (0.3, 0.05, 1.0):
        expected = reference_area(fpr, pro, limit)
        assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("seed", [3, 4])
def test_aupro_close_to_brute_force_on_continuous_maps(seed):
    maps, masks = blob_data(seed)
    fpr, pro = reference_pro_curve(maps, masks, np.linspace(0, 1, 201))
    expected = reference_area(fpr, pro, 0.3)
    assert metrics.aupro(maps, masks) == pytest.approx(expected, abs=1e-2)
    assert metrics.aupro(maps, masks, num_thresholds=500) == pytest.approx(expected, abs=1e-2)


def test_aupro_binned_thresholds_approach_exact_curve():
    maps, masks = blob_data(5, n=9, size=32)
    exact = metrics.aupro(maps, masks)
    assert metrics.aupro(maps, masks, num_thresholds=2000) == pytest.approx(exact, abs=5e-3)
    # On quantized maps whose levels are all among the evenly spaced thresholds, binning is exact.
    q_maps, q_masks = blob_data(5, levels=9)
    q_maps[0, 0, 0], q_maps[0, 0, 1] = 0.0, 1.0  # make the thresholds 0, 1/8, ..., 1 (exact in binary)
    assert metrics.aupro(q_maps, q_masks, num_thresholds=9) == pytest.approx(metrics.aupro(q_maps, q_masks), abs=1e-12)


def test_aupro_perfect_and_inverted_maps():
    _, masks = blob_data(0)
    perfect = masks.astype(float)
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    assert metrics.aupro(1.0 - perfect, masks) == pytest.approx(0.0, abs=1e-12)
    assert metrics.aupro(perfect, masks, num_thresholds=10) == pytest.approx(1.0)
    assert metrics.aupro(1.0 - perfect, masks, num_thresholds=10) == pytest.approx(0.0, abs=1e-12)


def test_aupro_argument_checks():
    maps, masks = blob_data(0)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        metrics.aupro(maps, masks, num_thresholds=1)
    with pytest.raises(ValueError, match="both classes"):
        metrics.aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="both classes"):
        metrics.aupro(maps, np.ones_like(masks))


# ------------------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    pred = np.where(rng.random(50) < 0.7, labels, 1 - labels)
    expected = balanced_accuracy_score(labels, pred)
    assert metrics.balanced_accuracy(pred, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.balanced_accuracy(pred.astype(bool), labels.astype(float)) == pytest.approx(expected)


def test_balanced_accuracy_hand_worked_and_single_class():
    # anomalous: 2 of 3 right; normal: 1 of 2 right -> (2/3 + 1/2) / 2
    assert metrics.balanced_accuracy([1, 1, 0, 0, 1], [1, 1, 1, 0, 0]) == pytest.approx(7 / 12)
    with pytest.raises(ValueError, match="both classes"):
        metrics.balanced_accuracy([1, 0], [0, 0])


def test_threshold_predictions_is_strict():
    out = metrics.threshold_predictions([0.2, 0.5, 0.51, 3.0])
    assert out.tolist() == [0, 0, 1, 1]
    assert out.dtype == np.int64
    assert metrics.threshold_predictions([0.2, 0.5], threshold=0.1).tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------------------
# compute_all
# ------------------------------------------------------------------------------------------------------------


def test_compute_all_matches_individual_metrics_on_masked_subset():
    maps, masks = blob_data(1, n=6)
    labels = masks.reshape(6, -1).any(axis=1).astype(int)
    scores = np.array([0.2, 0.7, 0.4, 0.9, 0.6, 0.1])
    has_mask = np.array([True, True, True, True, False, False])
    out = metrics.compute_all(scores, None, labels, maps, masks, has_mask)
    sub_maps, sub_masks = maps[:4], masks[:4]
    assert set(out) == {
        "image_auroc",
        "pixel_auroc",
        "iou",
        "iou_pooled",
        "aupro",
        "balanced_accuracy",
        "n_images",
    }
    assert out["n_images"] == 6
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, scores > 0.5))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(sub_masks.ravel(), sub_maps.ravel()))
    assert out["iou"] == pytest.approx(metrics.iou(sub_maps, sub_masks))
    assert out["iou_pooled"] == pytest.approx(jaccard_score(sub_masks.ravel(), (sub_maps > 0.5).ravel()))
    assert out["aupro"] == pytest.approx(metrics.aupro(sub_maps, sub_masks))
    for key, value in out.items():
        assert type(value) is (int if key == "n_images" else float), key


def test_compute_all_undefined_metrics_are_none():
    out = metrics.compute_all([0.1, 0.9], [0, 1], [1, 1])
    assert out["image_auroc"] is None and out["balanced_accuracy"] is None
    assert out["pixel_auroc"] is None and out["aupro"] is None and out["iou"] is None
    assert out["n_images"] == 2
    # Masks present but all empty: pixel metrics undefined, pooled IoU still counts false positives.
    maps = np.full((2, 2, 2), 0.8)
    out = metrics.compute_all([0.1, 0.9], [0, 1], [0, 1], maps, np.zeros((2, 2, 2)))
    assert out["image_auroc"] == 1.0 and out["balanced_accuracy"] == 1.0
    assert out["pixel_auroc"] is None and out["aupro"] is None and out["iou"] is None
    assert out["iou_pooled"] == 0.0
    out = metrics.compute_all([0.1, 0.9], [0, 1], [0, 1], maps, np.zeros((2, 2, 2)), has_mask=[False, False])
    assert out["iou_pooled"] is None


def test_compute_all_validates_its_inputs():
    with pytest.raises(ValueError, match="together"):
        metrics.compute_all([0.1, 0.9], [0, 1], [0, 1], anomaly_maps=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="differ in length"):
        metrics.compute_all([0.1, 0.9], [0, 1], [0, 1], np.zeros((3, 2, 2)), np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="has_mask"):
        metrics.compute_all([0.1, 0.9], [0, 1], [0, 1], np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), [1, 2])


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def test_shape_errors():
    with pytest.raises(ValueError, match=r"differ in shape: \(2, 2, 3\) vs \(2, 3, 2\)"):
        metrics.iou(HAND_MAPS, np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="3 channels"):
        metrics.pixel_auroc(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="anomaly_maps must be N x H x W"):
        metrics.pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="anomaly_maps is empty"):
        metrics.aupro(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    with pytest.raises(ValueError, match="scores is empty"):
        metrics.image_auroc([], [])
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        metrics.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="one-dimensional"):
        metrics.balanced_accuracy([[0, 1]], [[0, 1]])


def test_value_errors_name_argument_and_value():
    bad = HAND_MAPS.copy()
    bad[1, 0, 2] = 1.7
    with pytest.raises(ValueError, match=r"anomaly_maps must lie in \[0, 1\]; found .*1\.7.* \(1, 0, 2\)"):
        metrics.iou(bad, HAND_MASKS)
    bad[1, 0, 2] = -0.25
    with pytest.raises(ValueError, match=r"anomaly_maps .*-0\.25"):
        metrics.aupro(bad, HAND_MASKS)
    bad[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="anomaly_maps contains NaN"):
        metrics.pixel_auroc(bad, HAND_MASKS)
    bad_mask = HAND_MASKS.copy()
    bad_mask[0, 1, 1] = 2
    with pytest.raises(ValueError, match=r"masks must contain only 0 and 1.*2"):
        metrics.iou(HAND_MAPS, bad_mask)
    with pytest.raises(ValueError, match=r"masks must contain only 0 and 1.*0\.5"):
        metrics.pixel_auroc(HAND_MAPS, HAND_MASKS * 0.5)
    with pytest.raises(ValueError, match="labels must contain only 0 and 1"):
        metrics.image_auroc([0.1, 0.2], [0, -1])
    with pytest.raises(ValueError, match="scores must be finite"):
        metrics.image_auroc([np.inf, 0.2], [0, 1])
    with pytest.raises(ValueError, match="threshold"):
        metrics.iou(HAND_MAPS, HAND_MASKS, threshold=float("nan"))
    with pytest.raises(ValueError, match="numbers"):
        metrics.image_auroc(["a", "b"], [0, 1])


def test_integer_and_float32_maps_are_accepted():
    maps = HAND_MAPS.astype(np.float32)
    assert metrics.iou(maps, HAND_MASKS.astype(bool)) == pytest.approx(5 / 12)
    assert metrics.iou(HAND_MASKS, HAND_MASKS) == 1.0  # integer 0/1 maps


# ---------------------------------------------------------------- ROC curves for plots


def test_roc_curve_hand_worked_with_a_tie():
    # Sorted: 0.9 P | 0.8 P, 0.8 N (one tie group) | 0.3 N
    fpr, tpr = metrics.roc_curve(np.array([0.8, 0.3, 0.9, 0.8]), np.array([1, 0, 1, 0], bool))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    # Mann-Whitney by hand: (1 + 1 + 0.5 + 1) / 4 pairs.
    assert metrics.curve_area(fpr, tpr) == pytest.approx(0.875)


def test_roc_area_equals_metrics_auroc_on_random_data():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 2)  # many ties
    labels = rng.random(300) < 0.3
    fpr, tpr = metrics.roc_curve(scores, labels)
    assert metrics.curve_area(fpr, tpr) == pytest.approx(metrics.image_auroc(scores, labels.astype(int)))
    with pytest.raises(ValueError, match="both"):
        metrics.roc_curve(scores, np.zeros(300, bool))


def test_thin_curve_keeps_ends_and_shape():
    rng = np.random.default_rng(1)
    fpr, tpr = metrics.roc_curve(rng.random(20000), rng.random(20000) < 0.5)
    small_f, small_t = metrics.thin_curve(fpr, tpr, 200)
    assert len(small_f) <= 200 and (small_f[0], small_t[0]) == (0, 0) and (small_f[-1], small_t[-1]) == (1, 1)
    assert np.all(np.diff(small_f) >= 0)
    assert metrics.curve_area(small_f, small_t) == pytest.approx(metrics.curve_area(fpr, tpr), abs=0.01)


def test_per_group_hand_worked():
    """Tiles a (normal, 2 images), b (defective), c (defective, one image flagged) and two ungrouped images."""
    scores = [0.1, 0.6, 0.3, 0.5, 0.2, 0.9, 0.4]
    labels = [0, 0, 1, 1, 1, 0, 1]
    pred = [0, 1, 0, 0, 0, 1, 0]
    groups = ["a", "a", "b", "c", "c", None, None]
    out = metrics.per_group(scores, pred, labels, groups)
    # Objects: a (0.6, normal), b (0.3), c (0.5), image 5 (0.9, normal), image 6 (0.4). Anomalous b, c, 6
    # against normal a and 5: by the max no anomalous object beats a's 0.6, nor 5's 0.9 -> AuROC 0.
    assert out["n_groups"] == 5 and out["n_anomalous_groups"] == 3
    assert out["image_auroc"] == pytest.approx(roc_auc_score([0, 1, 1, 0, 1], [0.6, 0.3, 0.5, 0.9, 0.4]))
    assert out["image_auroc"] == 0.0
    # By the mean: a 0.35, c 0.35, b 0.3, 6 0.4. Of the 3 x 2 pairs, c ties a (half) and 6 beats a: 1.5 / 6.
    assert out["image_auroc_mean"] == pytest.approx(roc_auc_score([0, 1, 1, 0, 1], [0.35, 0.3, 0.35, 0.9, 0.4]))
    assert out["image_auroc_mean"] == pytest.approx((0.5 + 0 + 1 + 0 + 0 + 0) / 6)
    # Predicted anomalous: a (one image flagged) and 5; none of the anomalous: 0.5 * (0/3 + 0/2) = 0.
    assert out["balanced_accuracy"] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_per_group_matches_sklearn_on_grouped_data(seed):
    rng = np.random.default_rng(seed)
    n = 60
    groups = [f"t{g}" if g < 15 else None for g in rng.integers(0, 20, n)]
    tile_label = {f"t{g}": int(rng.random() < 0.5) for g in range(15)}
    labels = np.array([tile_label[g] if g else int(rng.random() < 0.5) for g in groups])
    scores = rng.random(n) + 0.3 * labels
    pred = (scores > 0.7).astype(int)
    out = metrics.per_group(scores, pred, labels, groups)
    objects: dict = {}
    for i, g in enumerate(groups):
        objects.setdefault(g if g is not None else ("image", i), []).append(i)
    members = list(objects.values())
    truth = [labels[m].max() for m in members]
    assert out["n_groups"] == len(members) and out["n_anomalous_groups"] == sum(truth)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(truth, [scores[m].max() for m in members]))
    assert out["image_auroc_mean"] == pytest.approx(roc_auc_score(truth, [scores[m].mean() for m in members]))
    called = [pred[m].max() for m in members]
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, called))


def test_per_group_checks_lengths_and_one_class():
    with pytest.raises(ValueError, match="groups and labels differ in length: 2 vs 3"):
        metrics.per_group([0.1, 0.2, 0.3], [0, 0, 1], [0, 0, 1], ["a", "b"])
    out = metrics.per_group([0.1, 0.2], [0, 0], [0, 0], ["a", "a"])
    assert out["image_auroc"] is None and out["balanced_accuracy"] is None and out["n_groups"] == 1
