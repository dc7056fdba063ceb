"""AE-L2 / AE-SSIM baselines: SSIM against hand-worked and brute-force values, calibration on normal images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from cavga.baselines import AutoencoderBaseline, ConvAutoencoder, gaussian_window, residual, ssim_map, top_mean
from cavga.data import AnomalyDataset, DatasetSplits, Preprocess, Record
from cavga.engine.infer import MAP_QUANTILE
from cavga.errors import ConfigError


def test_gaussian_window_sums_to_one_and_is_symmetric():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11, 11)
    assert float(w.sum()) == pytest.approx(1.0)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    # ratio of centre to a neighbour one step away: exp(1 / (2 sigma^2))
    assert float(w[5, 5] / w[5, 6]) == pytest.approx(np.exp(1 / (2 * 1.5**2)))


def test_ssim_of_constant_images_by_hand():
    # Constant images a and b: means a and b, no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere.
    a, b = 0.2, 0.7
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert torch.allclose(ssim_map(x, y), torch.full_like(x, expected))
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x))


def test_ssim_matches_brute_force_at_interior_pixels():
    rng = np.random.default_rng(0)
    x = rng.random((20, 20))
    y = np.clip(x + 0.2 * rng.standard_normal((20, 20)), 0, 1)
    got = ssim_map(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None])[0, 0].numpy()
    # Independent: Gaussian weights written out, weighted moments of the 11 x 11 patch around (i, j).
    r = np.arange(11) - 5
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = 0.01**2, 0.03**2
    for i, j in [(5, 5), (9, 12), (14, 14)]:
        px, py = x[i - 5 : i + 6, j - 5 : j + 6], y[i - 5 : i + 6, j - 5 : j + 6]
        mx, my = (g * px).sum(), (g * py).sum()
        vx, vy = (g * (px - mx) ** 2).sum(), (g * (py - my) ** 2).sum()
        cov = (g * (px - mx) * (py - my)).sum()
        want = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        assert got[i, j] == pytest.approx(want, rel=1e-9)


def test_l2_residual_and_top_mean_by_hand():
    x = torch.zeros(1, 3, 10, 10)
    x_hat = torch.zeros(1, 3, 10, 10)
    x_hat[0, :, 0, 0] = 0.5  # 3 channels * 0.25 = 0.75 at one pixel
    x_hat[0, 0, 1, 1] = 1.0  # 1.0 at another
    res = residual("l2", x, x_hat)
    assert res.shape == (1, 1, 10, 10)
    assert float(res[0, 0, 0, 0]) == pytest.approx(0.75) and float(res[0, 0, 1, 1]) == pytest.approx(1.0)
    assert float(res.sum()) == pytest.approx(1.75)
    assert float(top_mean(res, 0.01)) == pytest.approx(1.0)  # top 1 % of 100 pixels = the largest one
    assert float(top_mean(res, 0.02)) == pytest.approx(0.875)
    with pytest.raises(ConfigError):
        residual("l1", x, x_hat)


@pytest.mark.parametrize("size", [32, 64])
def test_autoencoder_shapes(size):
    model = ConvAutoencoder(channels=1, image_size=size, width=4, latent_dim=10)
    out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 1, size, size) and float(out.detach().min()) >= 0 and float(out.detach().max()) <= 1


def test_bad_config():
    with pytest.raises(ConfigError):
        AutoencoderBaseline("l1")
    with pytest.raises(ConfigError):
        AutoencoderBaseline("l2", image_size=48)


def _toy_splits(folder, seed: int = 0) -> DatasetSplits:
    """Normal images: a smooth gradient plus noise; anomalous: a bright square (masked) on it."""
    rng = np.random.default_rng(seed)
    n_train, n_good, n_bad, s = 40, 8, 8, 32
    base = np.tile(np.linspace(60, 120, s), (s, 1))
    images = []
    for _ in range(n_train + n_good + n_bad):
        images.append(np.clip(base + rng.normal(0, 3, (s, s)), 0, 255))
    masks = []
    for k in range(n_bad):
        img = images[n_train + n_good + k]
        r, c = rng.integers(2, s - 12, size=2)
        img[r : r + 10, c : c + 10] = 250
        m = np.zeros((s, s), bool)
        m[r : r + 10, c : c + 10] = True
        masks.append(folder / f"m{k}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(masks[-1])
    array = np.stack(images).astype(np.uint8)
    train = [Record(image=i, label=0, defect_type="good", path=f"t{i}") for i in range(n_train)]
    test = [Record(image=n_train + i, label=0, defect_type="good", path=f"g{i}", zero_mask=True) for i in range(n_good)]
    test += [
        Record(image=n_train + n_good + i, label=1, defect_type="square", path=f"b{i}", mask=masks[i])
        for i in range(n_bad)
    ]
    pre = Preprocess(s, 1)
    return DatasetSplits(AnomalyDataset(train, pre, array), AnomalyDataset(test, pre, array), {})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["l2", "ssim"])
def test_fit_calibrates_on_normal_images_and_finds_squares(kind, tmp_path):
    splits = _toy_splits(tmp_path)
    model = AutoencoderBaseline(kind, image_size=32, channels=1, width=8, epochs=15, batch_size=8, lr=2e-3)
    model.fit(splits)
    cal = model.calibration_
    assert cal.n_images == 4  # 10 % of the 40 normal training images, none from the test split
    assert all(p.startswith("t") for p in cal.paths)
    # Map threshold = MAP_QUANTILE of the calibration images' raw maps, recomputed here independently.
    subset = splits.train.subset([int(p[1:]) for p in cal.paths])
    x = torch.stack([subset[i].image for i in range(len(subset))])
    with torch.no_grad():
        model.model_.eval()
        raw = residual(kind, x, model.model_(x))
    assert cal.map_threshold == pytest.approx(float(np.quantile(raw.numpy(), MAP_QUANTILE)), rel=1e-5)
    assert cal.score_min == pytest.approx(float(top_mean(raw, 0.01).min()), rel=1e-5)
    metrics = model.evaluate(splits)
    assert metrics["n_images"] == 16
    # A bright 10 x 10 square on a smooth gradient is an easy anomaly for both residuals.
    assert metrics["image_auroc"] > 0.9
    assert metrics["pixel_auroc"] > 0.8
    # The same images as 8 objects of two images each: per_group scores an object by the max of its images.
    assert "per_group" not in metrics
    test = splits.test
    objects = [dataclasses.replace(r, group=f"o{i // 2}") for i, r in enumerate(test.records)]
    grouped = DatasetSplits(splits.train, AnomalyDataset(objects, test.preprocess, test.array), {})
    by_object = model.evaluate(grouped)["per_group"]
    top = model.last_outputs_.raw_scores.reshape(8, 2).max(1)
    assert by_object["n_groups"] == 8 and by_object["n_anomalous_groups"] == 4
    assert by_object["image_auroc"] == pytest.approx(roc_auc_score([0] * 4 + [1] * 4, top))
