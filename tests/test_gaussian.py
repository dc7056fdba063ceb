"""PositionGaussian against an independent computation (numpy covariance and scipy's Mahalanobis distance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from cavga.errors import ConfigError
from cavga.model.gaussian import PositionGaussian, cross_fitted_scores


def _reference_distance(train: np.ndarray, test: np.ndarray, shrinkage: float) -> np.ndarray:
    """Per position: numpy's unbiased covariance, shrunk by shrinkage * trace / C, then scipy's distance."""
    n, c, h, w = train.shape
    out = np.zeros((test.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            x = train[:, :, i, j]
            cov = np.cov(x, rowvar=False) + shrinkage * np.trace(np.cov(x, rowvar=False)) / c * np.eye(c)
            inv = np.linalg.inv(cov)
            for b in range(test.shape[0]):
                out[b, i, j] = mahalanobis(test[b, :, i, j], x.mean(0), inv)
    return out


def test_distance_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 4, 3, 2)) * np.array([1.0, 2.0, 0.5, 3.0])[None, :, None, None]
    test = rng.normal(size=(5, 4, 3, 2))
    g = PositionGaussian(4, 3, 2).fit([torch.from_numpy(train[:13]).float(), torch.from_numpy(train[13:]).float()])
    got = g(torch.from_numpy(test).float())[:, 0].numpy()
    np.testing.assert_allclose(got, _reference_distance(train, test, 0.01), rtol=1e-4, atol=1e-5)
    assert int(g.n_images) == 30 and g.fitted


def test_fewer_images_than_channels_still_gives_finite_distances():
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.normal(size=(3, 16, 2, 2))).float()
    g = PositionGaussian(16, 2, 2).fit([train])
    d = g(torch.from_numpy(rng.normal(size=(2, 16, 2, 2))).float())
    assert torch.isfinite(d).all() and (d > 0).all()


def test_the_mean_itself_is_at_distance_zero_and_a_shift_is_far():
    rng = np.random.default_rng(2)
    train = torch.from_numpy(rng.normal(size=(50, 3, 2, 2))).float()
    g = PositionGaussian(3, 2, 2).fit([train])
    mean = train.mean(0, keepdim=True)
    assert g(mean).max() < 1e-3
    assert g(mean + 10.0).min() > 5.0


def test_errors_name_the_problem():
    g = PositionGaussian(3, 2, 2)
    with pytest.raises(ConfigError, match="at least 2 normal images"):
        g.fit([torch.zeros(1, 3, 2, 2)])
    with pytest.raises(ConfigError, match=r"expects features \(B, \(3, 2, 2\)\)"):
        g(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ConfigError, match="shrinkage must be positive"):
        g.fit([torch.zeros(4, 3, 2, 2)], shrinkage=0.0)


def test_cross_fitted_scores_use_the_gaussian_of_the_other_folds():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(12, 3, 2, 2)) * np.array([1.0, 2.0, 0.5])[None, :, None, None]
    got = cross_fitted_scores(torch.from_numpy(feats).float(), lambda d: d.flatten(1).amax(1), folds=3, batch_size=2)
    for i in range(12):  # image i is in fold i % 3; its Gaussian is fitted on the images of the other two folds
        others = feats[[j for j in range(12) if j % 3 != i % 3]]
        expected = _reference_distance(others, feats[i : i + 1], 0.01).max()
        assert got[i].item() == pytest.approx(expected, rel=1e-4), i
    # an image far from the others scores high only when it is held out, never because it was fitted
    feats[5] += 10.0
    far = cross_fitted_scores(torch.from_numpy(feats).float(), lambda d: d.flatten(1).amax(1), folds=3)
    assert far[5] > 5 * far[[i for i in range(12) if i != 5]].max()


def test_cross_fitting_needs_enough_images():
    with pytest.raises(ConfigError, match="at least 10 images, got 9"):
        cross_fitted_scores(torch.zeros(9, 2, 1, 1), lambda d: d.flatten(1).amax(1), folds=5)


def test_a_neighbourhood_fits_each_position_on_its_replicated_window():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(6, 2, 3, 4))
    test = rng.normal(size=(2, 2, 3, 4))
    batches = [torch.from_numpy(train[:4]).float(), torch.from_numpy(train[4:]).float()]
    g = PositionGaussian(2, 3, 4).fit(batches, neighbourhood=1)
    padded = np.pad(train, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    got = g(torch.from_numpy(test).float())[:, 0].numpy()
    for i in range(3):
        for j in range(4):
            window = padded[:, :, i : i + 3, j : j + 3].transpose(0, 2, 3, 1).reshape(-1, 2)  # 6 images x 9 cells
            cov = np.cov(window, rowvar=False)
            inv = np.linalg.inv(cov + 0.01 * np.trace(cov) / 2 * np.eye(2))
            for b in range(2):
                assert got[b, i, j] == pytest.approx(mahalanobis(test[b, :, i, j], window.mean(0), inv), rel=1e-4)
    assert int(g.n_images) == 6  # images, not window samples
    with pytest.raises(ConfigError, match="neighbourhood must be >= 0"):
        PositionGaussian(2, 3, 4).fit([torch.zeros(2, 2, 3, 4)], neighbourhood=-1)
