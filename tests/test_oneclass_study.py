"""benchmarks/studies/oneclass_study.py: its development split (training images only), one tiny run, resuming."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from cavga.data import ANOMALOUS, NORMAL
from test_data_oneclass import idx_bytes


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"n_train": 6, "n_dev_normal": 3, "n_dev_other": 2, **kw})


def test_dev_split_holds_training_images_only_disjoint_and_labelled_by_class():
    study = load_benchmark("oneclass_study")
    labels = np.repeat(np.arange(3), 12)
    images = np.arange(36, dtype=np.uint8)[:, None, None] * np.ones((1, 8, 8), dtype=np.uint8)  # pixel = index
    splits = study.dev_splits(images, labels, 1, _args(), 32)
    train_idx = [int(p.split("#")[1]) for p in splits.train.paths]
    dev_idx = [int(p.split("#")[1]) for p in splits.test.paths]
    assert len(train_idx) == 6 and all(labels[i] == 1 for i in train_idx)
    assert not set(train_idx) & set(dev_idx) and len(set(dev_idx)) == len(dev_idx)
    dev_labels = np.array(splits.test.labels)
    assert (dev_labels == NORMAL).sum() == 3 and (dev_labels == ANOMALOUS).sum() == 4  # 2 from each other class
    for i, label in zip(dev_idx, dev_labels, strict=True):
        assert (labels[i] == 1) == (label == NORMAL)
    # The records index a copy of exactly those images.
    for j in (0, 5):
        assert splits.train[j].image.mean().item() * 255 == pytest.approx(train_idx[j], abs=0.5)
    assert splits.test[0].image.mean().item() * 255 == pytest.approx(dev_idx[0], abs=0.5)
    assert all(p.startswith("train#") for p in [*splits.train.paths, *splits.test.paths])


def test_columns_name_a_budget_other_than_the_default():
    study = load_benchmark("oneclass_study")
    record = {"model": "flat100", **study.DEFAULT_BUDGET}
    assert study.column(record) == "flat100"
    assert study.column({**record, "n_train": 4000, "epochs": 1}) == "flat100, n_train 4000, epochs 1"


def test_one_tiny_run_writes_every_score_and_resumes(tmp_path):
    study = load_benchmark("oneclass_study")
    rng = np.random.default_rng(0)
    root = tmp_path / "digits"
    root.mkdir()
    labels = np.repeat(np.arange(3, dtype=np.uint8), 14)
    images = (rng.random((42, 8, 8)) * 80).astype(np.uint8) + (labels[:, None, None] * 60).astype(np.uint8)
    test = np.zeros((3, 8, 8), dtype=np.uint8)  # the test split: never read by the study
    arrays = {"train-images": images, "train-labels": labels, "t10k-images": test, "t10k-labels": labels[:3]}
    for name, array in arrays.items():
        kind = "idx3" if "images" in name else "idx1"
        (root / f"{name}-{kind}-ubyte").write_bytes(idx_bytes(array))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--datasets", "mnist", "--mnist-root", str(root), "--models", "flat32"]
    argv += ["--classes", "0", "--n-train", "8", "--n-dev-normal", "3", "--n-dev-other", "2", "--epochs", "1"]
    argv += ["--batch-size", "4"]
    assert study.main(argv) == 0
    runs = list((out / "runs").rglob("*.json"))
    assert len(runs) == 1
    record = json.loads(runs[0].read_text())
    assert set(record["scores"]) == set(study.SCORES) and record["n_train"] == 8 and record["n_dev"] == 7
    for values in record["scores"].values():
        assert 0.0 <= values["image_auroc"] <= 1.0 and 0.0 <= values["fpr_at_cal"] <= 1.0
    stamp = runs[0].stat().st_mtime_ns
    assert study.main(argv) == 0 and runs[0].stat().st_mtime_ns == stamp  # cached: not trained again
    text = (out / "study.md").read_text()
    assert "## mnist" in text and "| latent_mahalanobis | " in text and "| flat32, n_train 8," in text
