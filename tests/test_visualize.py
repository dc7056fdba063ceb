"""Overlays: contours by hand-worked masks, blend values by formula, sizes, and the files predict writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cavga.report.visualize import PRED_CONTOUR, TRUE_CONTOUR, colorize, contour, map_image, overlay_image


def test_map_image_is_the_map_in_255_steps():
    values = np.array([[0.0, 0.5, 1.0], [-0.2, 1.7, 0.25]], dtype=np.float32)
    image = map_image(values)
    assert image.mode == "L" and image.size == (3, 2)
    assert np.asarray(image).tolist() == [[0, 128, 255], [0, 255, 64]]  # clipped to [0, 1], rounded
    assert map_image(values, size=(6, 4)).size == (6, 4)


def test_contour_of_a_square_is_its_one_pixel_ring():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    expected = mask.copy()
    expected[2:5, 2:5] = False  # the 3x3 interior survives the erosion
    np.testing.assert_array_equal(contour(mask), expected)


def test_contour_edge_cases():
    assert not contour(np.zeros((4, 4), bool)).any()
    full = np.ones((4, 4), bool)
    ring = contour(full)  # the image border is the outside: border pixels are boundary
    assert ring[0].all() and ring[-1].all() and ring[:, 0].all() and ring[:, -1].all()
    assert not ring[1:3, 1:3].any()
    single = np.zeros((3, 3), bool)
    single[1, 1] = True
    np.testing.assert_array_equal(contour(single), single)


def test_overlay_blends_map_and_draws_both_contours():
    image = np.full((16, 16, 3), 100, np.uint8)
    amap = np.zeros((16, 16), np.float32)
    amap[2:10, 2:10] = 0.9  # predicted region (> 0.5)
    gt = np.zeros((16, 16), bool)
    gt[8:14, 8:14] = True
    out = np.asarray(overlay_image(image, amap, gt, alpha=0.4, max_side=None))
    assert out.shape == (16, 16, 3)
    # Interior pixels away from every contour: (1 - alpha) * image + alpha * colour.
    expected_low = np.round(0.6 * 100 + 0.4 * colorize(np.zeros((1, 1)))[0, 0].astype(float))
    np.testing.assert_array_equal(out[0, 15], expected_low.astype(np.uint8))
    expected_high = np.round(0.6 * 100 + 0.4 * colorize(np.full((1, 1), 0.9))[0, 0].astype(float))
    np.testing.assert_array_equal(out[5, 5], expected_high.astype(np.uint8))
    # The predicted ring is white except where the ground-truth ring (drawn last) crosses it.
    assert tuple(out[2, 5]) == PRED_CONTOUR and tuple(out[9, 3]) == PRED_CONTOUR
    assert tuple(out[13, 11]) == TRUE_CONTOUR and tuple(out[8, 12]) == TRUE_CONTOUR
    assert tuple(out[10, 10]) != TRUE_CONTOUR  # the ground truth's interior keeps the blend


def test_overlay_without_prediction_or_truth_has_no_contour():
    out = np.asarray(overlay_image(np.zeros((8, 8)), np.zeros((8, 8)), None, max_side=None))
    assert not (out == np.array(PRED_CONTOUR, np.uint8)).all(axis=2).any()
    assert not (out == np.array(TRUE_CONTOUR, np.uint8)).all(axis=2).any()


def test_overlay_size_follows_image_and_max_side():
    big = Image.new("RGB", (1000, 500), (50, 60, 70))
    small_map = np.zeros((32, 32), np.float32)
    assert overlay_image(big, small_map, max_side=400).size == (400, 200)
    assert overlay_image(big, small_map, max_side=None).size == (1000, 500)
    # A channels-first float array is accepted as an image (what preprocess returns).
    assert overlay_image(np.zeros((3, 20, 10), np.float32), small_map).size == (10, 20)


def test_overlay_map_resized_to_image():
    # A map whose right half is high, drawn on an image 4x its size: the right half of the overlay is warmer.
    amap = np.zeros((8, 8), np.float32)
    amap[:, 4:] = 1.0
    out = np.asarray(overlay_image(np.full((32, 32), 128, np.uint8), amap, max_side=None)).astype(int)
    assert out[16, 28, 0] > out[16, 3, 0]  # red channel: red end of the ramp on the right


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import cavga
    from tiny_data import write_tiny_mvtec

    root = write_tiny_mvtec(tmp_path_factory.mktemp("mvtec"))
    options = {"image_size": 32, "width": 8, "latent_channels": 8, "epochs": 1, "batch_size": 4, "device": "cpu"}
    return cavga.Cavga("D", "u", **options).fit(root, category="bottle", progress=False), root


@pytest.mark.slow
def test_write_predictions_writes_overlays_at_image_size(tiny_model, tmp_path):
    from cavga.data.io import list_images
    from cavga.report.outputs import write_predictions

    detector, root = tiny_model
    files = list_images([root / "bottle" / "test" / "spot"])
    write_predictions(detector, files, tmp_path / "out")
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for line, pred in zip(lines, detector.predict(files), strict=True):
        # anomalib's field names, and only those, on the file and on Prediction.
        assert line["pred_score"] == pytest.approx(pred.pred_score, abs=1e-12)
        assert line["pred_label"] == pred.pred_label and not {"score", "label", "mask"} & set(line)
        mask = np.asarray(Image.open(tmp_path / "out" / line["pred_mask"])) > 0
        amap = np.asarray(Image.open(tmp_path / "out" / line["anomaly_map"]))
        assert amap.shape == mask.shape == (40, 40) and amap.dtype == np.uint8
        # The grayscale map is the (resized) map in 1/255 steps: where it clearly passes 0.5, so does the mask.
        assert (mask == (amap > 127.5))[np.abs(amap.astype(float) - 127.5) > 2].all()
        np.testing.assert_allclose(amap.mean() / 255, pred.anomaly_map.mean(), atol=0.02)
        overlay = Image.open(tmp_path / "out" / line["overlay"])
        assert overlay.size == (40, 40) and overlay.mode == "RGB"  # the image's own size, not the model's 32
        pixels = np.asarray(overlay)
        ring = (pixels == np.array(PRED_CONTOUR, np.uint8)).all(axis=2)
        assert ring.any() == bool(pred.pred_mask.any())


@pytest.mark.slow
def test_write_evaluation_files_and_curves(tiny_model, tmp_path):
    from cavga import metrics
    from cavga.metrics import curve_area
    from cavga.report.outputs import write_evaluation

    detector, root = tiny_model
    result = detector.evaluate(root, category="bottle")
    write_evaluation(detector.last_outputs_, detector.calibration_, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [x["gt_label"] for x in lines] == [0] * 3 + [1] * 3
    assert {x["defect_type"] for x in lines} == {"good", "spot"}
    for x in lines:
        assert x["correct"] == (x["pred_label"] == x["gt_label"])
        assert x["pred_label"] in (0, 1) and not {"score", "label", "mask"} & set(x)
        assert (tmp_path / x["anomaly_map"]).is_file() and (tmp_path / x["pred_mask"]).is_file()
        overlay = np.asarray(Image.open(tmp_path / x["overlay"]))
        has_truth_ring = (overlay == np.array(TRUE_CONTOUR, np.uint8)).all(axis=2).any()
        assert has_truth_ring == (x["gt_label"] == 1)  # normal images have an empty mask
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert curve_area(curves["image_roc"]["fpr"], curves["image_roc"]["tpr"]) == pytest.approx(result["image_auroc"])
    area = curve_area(curves["pixel_roc"]["fpr"], curves["pixel_roc"]["tpr"])
    assert area == pytest.approx(
        metrics.pixel_auroc(detector.last_outputs_.anomaly_maps, detector.last_outputs_.masks), abs=0.01
    )
