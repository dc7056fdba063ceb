"""The DEFAULT detector, ``cavga.Cavga()`` with only a small image size, finds the defects of a small generated
category: image and pixel AuROC above bounds that a broken map (a constant, seeded noise) does not reach.

The bounds sit well under what the default measures here (image AuROC 0.96 with latent_knn, 0.93 with trunk_knn;
pixel AuROC 0.87 and 0.92) and well over chance (0.5), which is where the broken maps below land."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cavga
from cavga.data.synthetic import write_demo_dataset
from cavga.engine import maps

IMAGE_AUROC_BOUND = 0.85
PIXEL_AUROC_BOUND = 0.8


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    write_demo_dataset(root, seed=0, categories=["pill"], image_size=64, n_train=40, n_test_good=10, n_test_defect=12)
    detector = cavga.Cavga(image_size=64).fit(root, category="pill", progress=False)
    return root, detector


def detects(result: dict) -> bool:
    return result["image_auroc"] > IMAGE_AUROC_BOUND and result["pixel_auroc"] > PIXEL_AUROC_BOUND


def test_the_default_detector_finds_the_defects_of_a_generated_category(fitted):
    root, detector = fitted
    assert detector.model_config.variant == "L" and detector.model_config.setting == "u"
    result = detector.evaluate(root, category="pill")
    assert result["n_images"] == 22
    assert result["image_auroc"] > IMAGE_AUROC_BOUND, result
    assert result["pixel_auroc"] > PIXEL_AUROC_BOUND, result


def constant_map(model, out, images, x_hat):
    return torch.ones(images.shape[0], 1, *images.shape[-2:])


def noise_map(model, out, images, x_hat):
    generator = torch.Generator().manual_seed(images.shape[0])
    return torch.rand(images.shape[0], 1, *images.shape[-2:], generator=generator)


@pytest.mark.parametrize("broken", [constant_map, noise_map])
def test_a_broken_default_map_does_not_meet_the_bounds(fitted, monkeypatch, broken):
    """The same model with its map function replaced in the registry: the bounds above then fail."""
    root, detector = fitted
    name = detector.model_config.anomaly_map
    monkeypatch.setitem(maps.ANOMALY_MAPS, name, dataclasses.replace(maps.ANOMALY_MAPS[name], function=broken))
    result = detector.evaluate(root, category="pill")
    assert not detects(result), result
    assert result["image_auroc"] < 0.75 and result["pixel_auroc"] < 0.6
