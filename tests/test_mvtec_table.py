"""benchmarks/mvtec_table.py: the IoU ceiling by hand, the category search, and one tiny run that resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from cavga.data.synthetic import write_demo_dataset

TINY = '{"epochs": 1, "image_size": 64, "batch_size": 8}'


def _two_images():
    # Image A: defect on its top row; image B: on its top-left pixel.
    raw = np.array([[[0.8, 0.4], [0.2, 0.0]], [[0.6, 0.5], [0.3, 0.1]]])
    masks = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]], dtype=bool)
    return raw, masks


def test_iou_scan_and_ceiling_worked_by_hand():
    table = load_benchmark("mvtec_table")
    raw, masks = _two_images()
    # t = 0.7: A predicts {0.8} -> 1/2, B nothing -> 0/1: mean 0.25. t = 0.45: A 1/2, B {0.6, 0.5} -> 1/2: 0.5.
    # t = 0.1: A {0.8, 0.4, 0.2} -> 2/3, B {0.6, 0.5, 0.3} -> 1/3: 0.5.
    assert table.scan_ious(raw, masks, [0.7, 0.45, 0.1]) == pytest.approx([0.25, 0.5, 0.5])
    # The best thresholds: t in [0.5, 0.6) gives A 1/2 and B 1/1; t in [0.3, 0.4) gives A 2/2 and B 1/2: both 0.75.
    best = table.iou_ceiling(raw, masks)
    assert best["iou"] == pytest.approx(0.75) and best["source"] == "quantile"
    assert 0.3 <= best["threshold"] < 0.4 or 0.5 <= best["threshold"] < 0.6
    # Raw units: the same maps on another scale give the same IoU at the scaled threshold.
    scaled = table.iou_ceiling(raw * 10.0, masks)
    assert scaled["iou"] == pytest.approx(0.75) and scaled["threshold"] == pytest.approx(10.0 * best["threshold"])
    # Four quantiles of the eight values (0.0875, 0.2625, 0.4375, 0.625) miss both best intervals; the best of them,
    # t = 0.2625: A {0.8, 0.4} -> 2/2, B {0.6, 0.5, 0.3} -> 1/3: 2/3. A calibrated threshold given is scanned too.
    four = table.iou_ceiling(raw, masks, n_quantiles=4)
    assert four["iou"] == pytest.approx(2 / 3) and four["threshold"] == pytest.approx(0.2625)
    calibrated = table.iou_ceiling(raw, masks, raw_threshold=0.55, n_quantiles=4)
    assert calibrated["iou"] == pytest.approx(0.75) and calibrated["threshold"] == pytest.approx(0.55)
    assert calibrated["source"] == "calibrated threshold"
    # A calibrated mask better than every raw threshold scanned wins, so the ceiling is never below it.
    perfect = masks.astype(float)
    own = table.iou_ceiling(raw, masks, calibrated_maps=perfect, n_quantiles=1)
    assert own == {"iou": 1.0, "threshold": None, "source": "calibrated mask"}
    with pytest.raises(ValueError, match="foreground"):
        table.iou_ceiling(raw, np.zeros_like(masks))


def _category(folder):
    (folder / "train" / "good").mkdir(parents=True)
    (folder / "test" / "good").mkdir(parents=True)


def test_categories_of_roots_and_of_category_folders(tmp_path):
    table = load_benchmark("mvtec_table")
    for name in ("zipper", "bottle"):
        _category(tmp_path / "a" / name)
    (tmp_path / "a" / "notes").mkdir()  # no train/good: not a category
    _category(tmp_path / "b" / "capsule")
    a, b = tmp_path / "a", tmp_path / "b"
    assert table.find_categories([a], None) == [("bottle", a), ("zipper", a)]
    assert table.find_categories([a, b / "capsule"], None) == [("bottle", a), ("zipper", a), ("capsule", b)]
    assert table.find_categories([a, b], ["capsule", "zipper"]) == [("capsule", b), ("zipper", a)]
    with pytest.raises(SystemExit, match="not found: screw"):
        table.find_categories([a], ["screw"])
    _category(tmp_path / "c" / "bottle")
    with pytest.raises(SystemExit, match="in both"):
        table.find_categories([a, tmp_path / "c"], None)
    (b / "PROVENANCE.md").write_text("# capsule, with a derived normal test split\n\nNot comparable with X.\n")
    assert table.not_comparable(b, "capsule") == "capsule, with a derived normal test split"
    assert table.not_comparable(a, "bottle") is None


@pytest.mark.slow
def test_tiny_run_rows_markdown_and_resume(tmp_path, monkeypatch):
    table = load_benchmark("mvtec_table")
    data = tmp_path / "data"
    write_demo_dataset(data, seed=0, categories=["pill", "wood"], image_size=64, n_train=8, n_test_good=2,
                       n_test_defect=2)  # fmt: skip
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--options", TINY]
    assert table.main(args) == 0

    saved = json.loads((out / "mvtec_table.json").read_text())
    assert set(saved) >= {"command", "machine", "reference", "rows"}
    assert {"processor", "cpu_count", "torch_threads", "cavga_version", "date"} <= set(saved["machine"])
    rows = saved["rows"]
    assert [r["category"] for r in rows] == ["pill", "wood"]
    for row in rows:
        assert set(row) == set(table.ROW_KEYS)
        assert row["image_size"] == 64  # the default variant L at 64 px
        assert row["settings"] == {"epochs": 1, "image_size": 64, "batch_size": 8, "seed": 0}
        for key in ("iou", "iou_ceiling", "pixel_auroc", "aupro", "image_auroc", "balanced_accuracy"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["iou_ceiling"] >= row["iou"]  # a max over thresholds that include the calibrated mask
        assert row["iou_ratio"] == pytest.approx(row["iou"] / row["iou_ceiling"])
        assert 0.0 < row["true_defect_area"] < 1.0 and 0.0 <= row["mask_area_at_threshold"] <= 1.0
        assert row["n_defective"] == 2 and row["n_test"] == 4
        assert row["fit_seconds"] > 0 and row["evaluate_seconds"] > 0 and row["reused_model"] is False
        assert row["paper_map_pixel_auroc"] is not None  # the default's own map is not the paper's
        assert row["paper_map_pixel_auroc"] != row["pixel_auroc"]
        assert row["paper_model_same_default_map"] is True  # the paper's fit draws the default's map alike
        assert (out / "models" / row["category"] / "config.json").is_file()
        assert (out / "models" / f"{row['category']}-paper" / "config.json").is_file()

    md = (out / "mvtec_table.md").read_text()
    lines = md.splitlines()
    assert sum(line.startswith("| pill | ") for line in lines) == 2  # the main table and the masks table
    assert sum(line.startswith("| wood | ") for line in lines) == 2
    assert any(line.startswith("| **mean (2)** |") for line in lines)
    assert "reference, PatchCore" in md and "image AuROC 0.992, pixel AuROC 0.981, AUPRO/PRO 0.944" in md
    assert "image AuROC 0.953, pixel AuROC 0.975, AUPRO/PRO 0.921" in md
    # The paper's R_u / R_w IoU and accuracy of pill (Tables 3 and 6) beside our row.
    assert next(line for line in lines if line.startswith("| pill | ")).endswith("| 0.40 | 0.53 | 0.91 | 0.97 |")

    # A rerun holds every category: nothing is fitted or evaluated again.
    monkeypatch.setattr(table, "run_category", lambda *a, **k: pytest.fail("a finished category was run again"))
    assert table.main(args) == 0
    assert json.loads((out / "mvtec_table.json").read_text())["rows"] == rows

    # A row lost after its fit finished: the saved model is evaluated again, not refitted.
    monkeypatch.undo()
    saved["rows"] = rows[:1]
    (out / "mvtec_table.json").write_text(json.dumps(saved))
    monkeypatch.setattr(table.cavga.Cavga, "fit", lambda *a, **k: pytest.fail("a saved model was fitted again"))
    assert table.main(args) == 0
    again = json.loads((out / "mvtec_table.json").read_text())["rows"]
    assert [r["category"] for r in again] == ["pill", "wood"] and again[0] == rows[0]
    assert again[1]["reused_model"] is True and again[1]["fit_seconds"] == rows[1]["fit_seconds"]
    assert again[1]["iou"] == pytest.approx(rows[1]["iou"]) and again[1]["iou_ceiling"] == pytest.approx(
        rows[1]["iou_ceiling"]
    )
