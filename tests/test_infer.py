"""Inference pieces: score aggregation, residual map, calibration (hand-worked cases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cavga.config import ModelConfig
from cavga.engine.calibration import CalibrationConstants
from cavga.engine.infer import Calibration, aggregate_score, fit_calibration, residual_map
from cavga.errors import ConfigError


def test_residual_map_is_the_channel_mean_box_blurred():
    images = torch.zeros(1, 3, 32, 32)
    x_hat = torch.zeros(1, 3, 32, 32)
    images[0, :, 10, 10] = 0.9  # one bad pixel in every channel -> channel mean 0.9
    res = residual_map(images, x_hat)
    assert res.shape == (1, 1, 32, 32)
    # 32 px images use a 3x3 box: the pixel's 0.9 spreads as 0.1 over its 3x3 neighbourhood.
    assert res[0, 0, 9:12, 9:12].numpy() == pytest.approx(np.full((3, 3), 0.1), abs=1e-6)
    assert float(res.sum()) == pytest.approx(0.9, abs=1e-5)
    assert float(res[0, 0, 20, 20]) == 0.0


def test_top_mean_score_averages_the_largest_fraction():
    residual = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10) / 100.0
    images = torch.zeros(1, 1, 10, 10)
    config = ModelConfig(score="top_mean", score_top_fraction=0.05)
    # Top 5 of 0.00 .. 0.99 are 0.95 .. 0.99, mean 0.97.
    assert float(aggregate_score(images, images, residual, config)) == pytest.approx(0.97)
    x_hat = torch.full((1, 1, 10, 10), 0.25)
    assert float(aggregate_score(images, x_hat, residual, ModelConfig(score="mean"))) == pytest.approx(0.25)


def test_calibration_maps_min_to_zero_and_quantile_to_half():
    raw = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    cal = fit_calibration(raw, quantile=0.5)
    assert cal.score_min == 1.0 and cal.score_threshold == 3.0
    np.testing.assert_allclose(cal.normalize(np.array([1.0, 3.0, 4.0, 5.0, 9.0, 0.0])), [0, 0.5, 0.75, 1, 1, 0])
    with pytest.raises(ConfigError, match="at least one normal image"):
        fit_calibration(np.array([]))


def test_residual_map_normalization_needs_a_map_threshold():
    cal = Calibration(0.0, 1.0, 0.95, 3, map_threshold=0.2)
    out = cal.normalize_map(torch.tensor([0.0, 0.1, 0.2, 0.5]))
    assert out.tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    with pytest.raises(ConfigError, match="no map threshold"):
        Calibration(0.0, 1.0, 0.95, 3).normalize_map(torch.zeros(2))


def test_peak_fraction_keeps_the_region_around_each_images_peak():
    cal = Calibration(0.0, 0.2, 0.95, 3, map_threshold=0.2, map_peak_fraction=0.5)
    raw = torch.tensor(
        [
            [[0.1, 0.3], [0.15, 0.05]],  # peak 0.3: divided by max(0.2, 0.15) = 0.2
            [[1.0, 0.6], [0.4, 0.3]],  # peak 1.0: divided by 0.5, so only pixels >= half the peak pass
            [[0.1, 0.15], [0.05, 0.0]],  # below the threshold everywhere: nothing passes
        ]
    )
    expected = [[[0.25, 0.75], [0.375, 0.125]], [[1.0, 0.6], [0.4, 0.3]], [[0.25, 0.375], [0.125, 0.0]]]
    out = cal.normalize_map(raw)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    assert (out > 0.5).tolist() == [[[False, True], [False, False]], [[True, True], [False, False]], [[False] * 2] * 2]
    # the tensor constants of the inference core and the exported graphs compute the same
    np.testing.assert_allclose(CalibrationConstants(cal).normalize_map(raw).numpy(), expected, rtol=1e-6)
    # a calibration written before the peak fraction existed reads as the plain threshold
    old = Calibration.from_dict({k: v for k, v in cal.to_dict().items() if k != "map_peak_fraction"})
    np.testing.assert_allclose(old.normalize_map(raw[1]).numpy(), [[1.0, 1.0], [1.0, 0.75]])
