"""benchmarks/studies/feature_depth.py: the split of the pooled pixel AuROC's negatives, and the trunk features it
reads."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmark_scripts import load_benchmark
from cavga.model.encoders import LiteEncoder


def _maps_masks_labels():
    rng = np.random.default_rng(5)
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    masks = np.zeros((7, 6, 6), dtype=np.float32)
    masks[3:, :2, :3] = 1.0
    maps = rng.random((7, 6, 6))
    maps[3:] += 0.2  # the background of an anomalous image above the normal images
    maps[masks > 0] += 0.3
    return maps, masks, labels


def test_pixel_split_against_sklearn_on_each_pair_of_groups():
    study = load_benchmark("feature_depth")
    maps, masks, labels = _maps_masks_labels()
    got = study.pixel_split(maps, masks, labels)
    defect = maps[masks > 0]
    normal = maps[labels == 0].ravel()
    background = maps[labels == 1][masks[labels == 1] == 0]

    def auroc(positive, negative):
        truth = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
        return roc_auc_score(truth, np.r_[positive, negative])

    assert abs(got["defect_vs_normal_images"] - auroc(defect, normal)) < 1e-9
    assert abs(got["defect_vs_background"] - auroc(defect, background)) < 1e-9
    assert abs(got["background_vs_normal_images"] - auroc(background, normal)) < 1e-9
    # The README's reading: the pooled pixel AuROC is the mixture of the first two, weighted by the negatives' shares.
    pooled = roc_auc_score(masks.ravel(), maps.ravel())
    share = len(normal) / (len(normal) + len(background))
    mixture = share * got["defect_vs_normal_images"] + (1 - share) * got["defect_vs_background"]
    assert abs(pooled - mixture) < 1e-9


def test_pixel_split_samples_each_group_to_its_limit_with_a_seed():
    study = load_benchmark("feature_depth")
    maps, masks, labels = _maps_masks_labels()
    small = study.pixel_split(maps, masks, labels, limit=20)
    assert small == study.pixel_split(maps, masks, labels, limit=20)  # seeded: the same sample each time
    assert small != study.pixel_split(maps, masks, labels)


def test_trunk_features_at_8_and_16_are_cavga_ls_encoder_features():
    study = load_benchmark("feature_depth")
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 64)
    features = study.TrunkFeatures(1, study.LEVELS["8+16"])
    encoder = LiteEncoder(1, 8, pretrained=True, frozen=True)
    encoder.load_imagenet()
    encoder.eval()
    with torch.no_grad():
        expected, _ = encoder(images)
    got = features(images)
    assert features.channels == encoder.out_channels == got.shape[1]
    torch.testing.assert_close(got, expected)
    deep = study.TrunkFeatures(1, study.LEVELS["8+16+32"])
    assert deep(images).shape == (2, 40 + 112 + 320, 8, 8)
