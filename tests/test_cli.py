"""The command line, run as a user runs it (a real subprocess), on a tiny MVTec-layout folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tiny_data import write_tiny_mvtec

CAVGA = [sys.executable, "-m", "cavga.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CAVGA, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cavga {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("make-data", "demo", "train", "predict", "evaluate"):
        assert command in out


def test_train_predict_evaluate(tmp_path):
    root = write_tiny_mvtec(tmp_path / "data")
    model = tmp_path / "model"
    run(
        "train",
        str(root),
        "--out",
        str(model),
        "--category",
        "bottle",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--width",
        "8",
        "--latent-channels",
        "8",
        "--device",
        "cpu",
        "--no-progress",
    )
    config = json.loads((model / "config.json").read_text())
    assert config["model"]["variant"] == "D" and config["model"]["setting"] == "u"

    preds = tmp_path / "preds"
    run("predict", str(model), str(root / "bottle" / "test"), "--out", str(preds))
    lines = [json.loads(line) for line in (preds / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for line in lines:
        assert 0.0 <= line["score"] <= 1.0 and line["label"] in ("normal", "anomalous")
        heat = Image.open(preds / line["heatmap"])
        mask = Image.open(preds / line["mask"])
        assert heat.size == mask.size == (40, 40)  # written at the input image's own size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert len({line["heatmap"] for line in lines}) == 6  # same stems in two folders do not overwrite

    out = tmp_path / "eval"
    run("evaluate", str(model), str(root), "--category", "bottle", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"image_auroc", "pixel_auroc", "iou", "iou_pooled", "aupro", "balanced_accuracy", "n_images"}


def test_bad_input_gives_a_clear_error_and_exit_code(tmp_path):
    proc = run("predict", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_make_data_writes_a_readable_mvtec_dataset(tmp_path):
    run("make-data", str(tmp_path / "demo"), "--seed", "1")
    from cavga.data import list_mvtec_categories, read_mvtec

    categories = list_mvtec_categories(tmp_path / "demo")
    assert len(categories) >= 2
    splits = read_mvtec(tmp_path / "demo", categories[0])
    assert len(splits.train) > 0 and any(label == 1 for label in splits.test.labels)
    assert Path(tmp_path / "demo" / "README.txt").is_file()
