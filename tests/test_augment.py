"""CAVGA_w's extra training examples: augmented copies of the labelled images, synthesized anomalies, and the
promise that neither reaches an evaluation or the calibration."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import cavga
from cavga.data import load_dataset
from cavga.data.augment import AREA_RANGE, AugmentedCopies, SyntheticAnomalies, augment, cut_paste, noise_blob
from cavga.data.dataset import AnomalyDataset
from cavga.data.splits import path_key, split_calibration, weak_training_set
from cavga.data.synthetic import write_demo_dataset
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.errors import ConfigError
from tiny_data import write_tiny_mvtec


def image(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def test_augment_keeps_shape_and_range_and_follows_its_seed():
    x = image()
    a = augment(x, np.random.default_rng(5))
    b = augment(x, np.random.default_rng(5))
    assert a.shape == x.shape and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, augment(x, np.random.default_rng(6)))


def test_augment_of_a_constant_image_is_the_jittered_constant():
    # Flips, turns and reflected shifts leave a constant image as it is; only brightness moves it (contrast
    # around its own mean changes nothing), so every pixel equals x + offset with |offset| <= 0.1.
    x = torch.full((3, 16, 16), 0.5)
    a = augment(x, np.random.default_rng(1))
    assert torch.allclose(a, a.flatten()[0].expand_as(a))
    assert abs(float(a[0, 0, 0]) - 0.5) <= 0.1 + 1e-6


def test_cut_paste_changes_only_its_box_and_copies_the_source_there():
    x, source = image(0), image(1)
    out, mask = cut_paste(x, source, np.random.default_rng(3))
    inside = mask[0].bool()
    area = float(inside.float().mean())
    assert AREA_RANGE[0] * 0.5 <= area <= AREA_RANGE[1] * 2  # rounding of the box on a 32 px image
    torch.testing.assert_close(out[:, ~inside], x[:, ~inside])
    # The pasted block is a block of the source somewhere, shifted by one brightness offset (then clipped).
    rows, cols = inside.nonzero(as_tuple=True)
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    block = out[:, rows.min() : rows.min() + h, cols.min() : cols.min() + w]
    found = False
    for top in range(32 - h + 1):
        for left in range(32 - w + 1):
            diff = block - source[:, top : top + h, left : left + w]
            unclipped = (block > 0) & (block < 1)
            if unclipped.any() and torch.allclose(diff[unclipped], diff[unclipped].flatten()[0], atol=1e-6):
                found = True
    assert found


def test_noise_blob_changes_only_its_box():
    x = image(2)
    out, mask = noise_blob(x, np.random.default_rng(4))
    changed = (out - x).abs().sum(0) > 0
    assert changed.any() and mask.sum() > 0
    rows, cols = changed.nonzero(as_tuple=True)
    box = torch.zeros_like(changed)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert float(box.float().mean()) <= AREA_RANGE[1] * 2
    assert not (mask[0].bool() & ~box).any()


@pytest.fixture
def tiny_splits(tmp_path):
    root = write_tiny_mvtec(tmp_path)
    return load_dataset(root, category="bottle", preprocess=cavga.data.Preprocess(32, 3))


def test_augmented_copies_keep_the_originals_first_then_seeded_variants(tiny_splits):
    spots = tiny_splits.test.subset([i for i, y in enumerate(tiny_splits.test.labels) if y == ANOMALOUS])
    copies = AugmentedCopies(spots, copies=3, seed=7)
    assert len(copies) == 9 and copies.labels == spots.labels * 3 and copies.paths == spots.paths * 3
    for i in range(3):
        torch.testing.assert_close(copies[i].image, spots[i].image)
        assert copies[i + 3].path == spots[i].path and not torch.equal(copies[i + 3].image, spots[i].image)
    again = AugmentedCopies(spots, copies=3, seed=7)
    torch.testing.assert_close(again[5].image, copies[5].image)


def test_synthetic_anomalies_are_anomalous_maskless_and_reproducible(tiny_splits):
    normal = tiny_splits.train
    synthetic = SyntheticAnomalies(normal, count=5, seed=1)
    assert len(synthetic) == 5 and synthetic.labels == [ANOMALOUS] * 5
    for i in range(5):
        s = synthetic[i]
        assert s.label == ANOMALOUS and s.mask is None and s.path == synthetic.paths[i]
        assert s.path.startswith(normal.paths[i % len(normal)]) and "#synthetic" in s.path
        assert not torch.equal(s.image, normal[i % len(normal)].image)
    torch.testing.assert_close(SyntheticAnomalies(normal, 5, 1)[3].image, synthetic[3].image)
    with pytest.raises(IndexError):
        synthetic[5]


def test_weak_training_set_sizes_follow_the_shares(tiny_splits):
    normal = tiny_splits.train  # 12 normal images
    spots = tiny_splits.test.subset([i for i, y in enumerate(tiny_splits.test.labels) if y == ANOMALOUS][:1])
    paper = weak_training_set(normal, spots)
    assert len(paper) == 13 and paper.labels.count(ANOMALOUS) == 1
    # 50 %: 12 anomalous examples wanted -> the one image 12 times; 25 % synthesized: 3 more
    mixed = weak_training_set(normal, spots, anomalous_share=0.5, synthetic_share=0.25, seed=0)
    assert len(mixed) == 12 + 12 + 3 and mixed.labels.count(NORMAL) == 12
    with pytest.raises(ConfigError, match="anomalous_share"):
        weak_training_set(normal, spots, anomalous_share=1.0)


# ------------------------------------------------------------------ nothing reaches evaluation or calibration


@pytest.mark.slow
def test_augmentation_and_calibration_never_read_an_evaluation_image(tmp_path, monkeypatch):
    root = write_tiny_mvtec(tmp_path)
    read: list[str] = []
    augmented: list[str] = []
    original_getitem = AnomalyDataset.__getitem__
    original_augment = AugmentedCopies.__getitem__
    original_synth = SyntheticAnomalies.__getitem__

    def spy(self, index):
        sample = original_getitem(self, index)
        read.append(path_key(sample.path))
        return sample

    def spy_augment(self, index):
        sample = original_augment(self, index)
        augmented.append(path_key(sample.path))
        return sample

    def spy_synth(self, index):
        sample = original_synth(self, index)
        augmented.append(path_key(sample.path.split("#synthetic")[0]))
        return sample

    monkeypatch.setattr(AnomalyDataset, "__getitem__", spy)
    monkeypatch.setattr(AugmentedCopies, "__getitem__", spy_augment)
    monkeypatch.setattr(SyntheticAnomalies, "__getitem__", spy_synth)
    detector = cavga.Cavga(
        "D", "w", anomalous_count=1, image_size=32, width=8, latent_channels=8, epochs=1, batch_size=4,
        device="cpu", anomalous_share=0.3, synthetic_share=0.5,
    )  # fmt: skip
    detector.fit(root, category="bottle", progress=False)
    splits = load_dataset(root, category="bottle")
    test_paths = {path_key(p) for p in splits.test.paths}
    labelled = set(detector.excluded_paths_)
    # During fit the only test images read are the labelled one (training); the calibration read none.
    assert {p for p in read if p in test_paths} == labelled
    _, calibration_set = split_calibration(splits.train, detector.train_config.calibration_fraction, 0)
    held_out = {path_key(p) for p in calibration_set.paths}
    assert held_out & set(read)  # the calibration did read its own slice
    # Augmented copies come from the labelled image, synthesized ones from normal training images only.
    assert augmented and set(augmented) <= labelled | ({path_key(p) for p in splits.train.paths} - held_out)
    # Evaluation reads the files as they are: its scores equal predict()'s on the same paths.
    read.clear()
    augmented.clear()
    detector.evaluate(root, category="bottle")
    assert not augmented and not set(read) & labelled
    outputs = detector.last_outputs_
    predicted = detector.predict(outputs.paths)
    np.testing.assert_allclose([p.raw_score for p in predicted], outputs.raw_scores, rtol=1e-6)
    assert os.path.realpath(outputs.paths[0]) in test_paths


@pytest.mark.slow
def test_one_labelled_image_does_not_make_the_model_call_every_image_one_class(tmp_path):
    root = tmp_path / "demo"
    write_demo_dataset(root, seed=0, categories=["wood"], image_size=64, n_train=40, n_test_good=10, n_test_defect=10)
    detector = cavga.Cavga("L", "w", anomalous_count=1, image_size=64, epochs=1, batch_size=8, device="cpu")
    detector.fit(root, category="wood", progress=False)
    assert detector.data_info_["weak_labels"]["n_anomalous"] == 1
    predictions = detector.predict(detector_test_paths(root, detector))
    labels = {p.pred_label for p in predictions}
    assert labels == {NORMAL, ANOMALOUS}


def detector_test_paths(root, detector) -> list[str]:
    splits = load_dataset(root, category="wood")
    excluded = set(detector.excluded_paths_)
    return [p for p in splits.test.paths if path_key(p) not in excluded]
