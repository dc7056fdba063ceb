"""benchmarks/studies/memory_window.py: the seeded dev / held halves of a test set, and each half's AuROCs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmark_scripts import load_benchmark


def test_halves_are_a_seeded_partition_of_the_test_set():
    study = load_benchmark("memory_window")
    halves = study.halves(11)
    dev, held = halves["dev"], halves["held"]
    assert len(dev) == 5 and len(held) == 6
    assert not set(dev) & set(held) and sorted([*dev, *held]) == list(range(11))
    again = study.halves(11)  # the same draw every time: the dev half never changes between runs
    np.testing.assert_array_equal(again["dev"], dev)


def test_each_halfs_auroc_is_computed_on_its_own_images_only():
    study = load_benchmark("memory_window")
    rng = np.random.default_rng(3)
    n = 12
    labels = np.array([0, 1] * (n // 2))
    masks = np.zeros((n, 4, 4), dtype=np.uint8)
    masks[labels == 1, :2, :2] = 1
    maps = rng.random((n, 4, 4)).astype(np.float32) * 3.0  # raw maps, not on [0, 1]
    scores = rng.random(n)
    got = study.half_metrics(SimpleNamespace(raw_maps=maps, raw_scores=scores, labels=labels, masks=masks))
    for name, idx in study.halves(n).items():
        assert abs(got[name]["image_auroc"] - roc_auc_score(labels[idx], scores[idx])) < 1e-9
        pixel = roc_auc_score(masks[idx].ravel(), maps[idx].ravel())
        assert abs(got[name]["pixel_auroc"] - pixel) < 1e-6


def test_halves_keep_each_group_on_one_side():
    study = load_benchmark("memory_window")
    # 4 tiles of 3 exposures each, interleaved as a test set lists them, and two images with no group
    groups = ["Free/0", "Crack/1", "Free/2", "Crack/1", "Free/0", "Free/2", "Crack/3", "Crack/1", "Free/0"]
    groups += ["Free/2", "Crack/3", "Crack/3", None, None]
    halves = study.halves(len(groups), groups)
    dev, held = halves["dev"], halves["held"]
    assert sorted([*dev, *held]) == list(range(len(groups)))
    for tile in {g for g in groups if g is not None}:
        members = {i for i, g in enumerate(groups) if g == tile}
        assert members <= set(dev) or members <= set(held), tile
    assert len(dev) >= len(groups) // 2 and len(held) > 0
    again = study.halves(len(groups), groups)
    np.testing.assert_array_equal(again["dev"], dev)
    # no group at all: the halves by image, as before
    np.testing.assert_array_equal(study.halves(11, [None] * 11)["dev"], study.halves(11)["dev"])


def test_half_metrics_read_the_halves_by_group():
    study = load_benchmark("memory_window")
    rng = np.random.default_rng(5)
    groups = [f"T/{i // 3}" for i in range(18)]  # six tiles of three exposures
    labels = np.array([(i // 3) % 2 for i in range(18)])
    masks = np.zeros((18, 4, 4), dtype=np.uint8)
    masks[labels == 1, 1:3, 1:3] = 1
    maps, scores = rng.random((18, 4, 4)).astype(np.float32), rng.random(18)
    got = study.half_metrics(SimpleNamespace(raw_maps=maps, raw_scores=scores, labels=labels, masks=masks), groups)
    for name, idx in study.halves(18, groups).items():
        assert abs(got[name]["image_auroc"] - roc_auc_score(labels[idx], scores[idx])) < 1e-9
