"""The image-score registry: each score against a hand-worked case, the flattened latent's Gaussian, and the
calibration of a score on normal images only."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from cavga.config import SCORES, ModelConfig
from cavga.data import ANOMALOUS, NORMAL, AnomalyDataset, DatasetSplits, Preprocess, Record
from cavga.engine import scores
from cavga.engine.infer import MapChoice, calibrate, fit_latent_gaussian, infer_batch
from cavga.errors import ConfigError
from cavga.model.gaussian import PositionGaussian
from cavga.model.networks import CavgaOutput, build_model


def _out(mu=None, logvar=None, logits=None) -> CavgaOutput:
    mu = torch.zeros(1, 2) if mu is None else mu
    logvar = torch.zeros_like(mu) if logvar is None else logvar
    logits = torch.zeros(1, 1, 2, 2) if logits is None else logits
    return CavgaOutput(features=torch.zeros(1, 1, 1, 1), mu=mu, logvar=logvar, z=mu, x_hat_logits=logits)


def test_every_registered_score_is_a_config_choice():
    assert set(scores.IMAGE_SCORES) <= set(SCORES)
    assert set(SCORES) - set(scores.IMAGE_SCORES) == {"top_mean", "map_max", "map_top1", "probability"}
    with pytest.raises(ConfigError, match="unknown image score"):
        scores.image_score("loudness")
    with pytest.raises(ConfigError, match="score must be one of"):
        ModelConfig(variant="D", score="loudness").validate()


def test_residual_aggregates_by_hand():
    x = torch.zeros(1, 1, 2, 2)
    x_hat = torch.tensor([[[[0.5, 0.0], [0.0, 0.1]]]])
    assert scores.residual_mean(None, _out(), x, x_hat).item() == pytest.approx(0.6 / 4)
    assert scores.residual_squared(None, _out(), x, x_hat).item() == pytest.approx((0.25 + 0.01) / 4)


def test_ssim_score_is_zero_for_a_perfect_reconstruction_and_positive_otherwise():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert scores.ssim_score(None, _out(), x, x).abs().max().item() < 1e-5
    # A constant reconstruction of a textured image keeps no structure: SSIM's structure term is 0, so by hand
    # 1 - SSIM is well above 0.5 for this noise.
    assert (scores.ssim_score(None, _out(), x, torch.full_like(x, 0.5)) > 0.5).all()


def test_kl_and_elbo_by_hand():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 (mu^2 + e^logvar - 1 - logvar) summed: 0.5 (1 + 1 - 1 - 0) + 0.5 (0 + 2 - 1 - ln 2)
    kl = 0.5 + 0.5 * (1.0 - math.log(2.0))
    out = _out(mu, logvar, torch.zeros(1, 1, 2, 2))
    x = torch.tensor([[[[0.0, 1.0], [1.0, 0.25]]]])
    assert scores.kl_score(None, out, x, None).item() == pytest.approx(kl)
    # Logits 0 predict 0.5 everywhere: BCE is ln 2 per element whatever x is; plus KL over the 4 elements.
    assert scores.elbo_score(None, out, x, None).item() == pytest.approx(math.log(2.0) + kl / 4)


def test_latent_mahalanobis_by_hand_for_the_flattened_latent():
    gaussian = PositionGaussian(1, 1, 1)
    gaussian.fit([torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(4, 1, 1, 1)])
    model = SimpleNamespace(latent_gaussian=gaussian)
    # Mean 0, unbiased variance 4/3, shrunk by 1 % of itself: d(2) = 2 / sqrt(4/3 * 1.01).
    got = scores.latent_mahalanobis(model, _out(mu=torch.tensor([[2.0]])), None, None)
    assert got.item() == pytest.approx(2.0 / math.sqrt(4 / 3 * 1.01), rel=1e-5)
    with pytest.raises(ConfigError, match="fitted on normal images"):
        scores.latent_mahalanobis(SimpleNamespace(latent_gaussian=PositionGaussian(1, 1, 1)), _out(), None, None)


def test_latent_mahalanobis_averages_the_positions_of_a_conv_latent():
    gaussian = PositionGaussian(1, 1, 2)
    gaussian.fit([torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-1.0, 2.0], [1.0, 2.0]]).view(4, 1, 1, 2)])
    model = SimpleNamespace(latent_gaussian=gaussian)
    mu = torch.tensor([3.0, 1.0]).view(1, 1, 1, 2)  # position 0: mean 0; position 1: mean 1, both variance 4/3
    sd = math.sqrt(4 / 3 * 1.01)
    assert scores.latent_mahalanobis(model, _out(mu=mu), None, None).item() == pytest.approx((3 / sd + 0) / 2)


def test_discriminator_scores_by_hand():
    # D = identity features, then a sum "logit": feature matching is the squared residual, the score -sum(x).
    class SumLogit(nn.Module):
        def forward(self, f):
            return f.flatten(1).sum(1, keepdim=True)

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Identity(), SumLogit())

        def forward(self, x):
            return self.net(x).flatten(1).squeeze(1)

    model = SimpleNamespace(discriminator=Discriminator())
    x = torch.tensor([[[[0.2, 0.4], [0.0, 1.0]]]])
    x_hat = torch.tensor([[[[0.2, 0.0], [0.0, 0.5]]]])
    assert scores.discriminator_score(model, _out(), x, x_hat).item() == pytest.approx(-1.6)
    assert scores.feature_matching(model, _out(), x, x_hat).item() == pytest.approx((0.16 + 0.25) / 4)


def _tiny_d(**kw):
    torch.manual_seed(0)
    config = ModelConfig(variant="D", image_size=32, channels=1, width=4, latent_channels=4, **kw)
    return build_model(config).eval()


def test_attention_mass_is_the_mean_of_the_papers_map():
    model = _tiny_d()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(x, sample=False)
    got = scores.attention_mass(model, out, x, torch.sigmoid(out.x_hat_logits))
    attention = infer_batch(model, x, choice=MapChoice("attention", "top_mean")).anomaly_maps  # 1 - A
    assert np.allclose(got.detach().numpy(), attention.reshape(3, -1).mean(1), atol=1e-5)
    assert ((got >= 0) & (got <= 1)).all()


def _dataset(n_normal: int, n_anomalous: int, seed: int = 0) -> AnomalyDataset:
    rng = np.random.default_rng(seed)
    normal = (rng.random((n_normal, 32, 32)) * 60).astype(np.uint8)  # dark images
    anomalous = (255 - rng.random((n_anomalous, 32, 32)) * 60).astype(np.uint8)  # bright images
    array = np.concatenate([normal, anomalous])
    labels = [NORMAL] * n_normal + [ANOMALOUS] * n_anomalous
    records = [Record(image=i, label=lab, defect_type=str(lab), path=f"#{i}") for i, lab in enumerate(labels)]
    return AnomalyDataset(records, Preprocess(32, 1), array)


def test_flattened_latent_has_a_one_position_gaussian_fitted_on_normal_images_only():
    model = _tiny_d(flatten_latent=True, flat_latent_dim=3)
    gaussian = model.latent_gaussian
    assert gaussian is not None and (gaussian.channels, gaussian.height, gaussian.width) == (3, 1, 1)
    with pytest.raises(ConfigError, match="normal images only"):
        fit_latent_gaussian(model, _dataset(8, 1))
    fit_latent_gaussian(model, _dataset(8, 0))
    assert model.latent_gaussian.fitted and int(model.latent_gaussian.n_images) == 8


@pytest.mark.parametrize("score", ["latent_mahalanobis", "squared", "elbo", "discriminator"])
def test_score_calibration_uses_normal_images_only_and_puts_their_quantile_at_one_half(score):
    model = _tiny_d(flatten_latent=True, flat_latent_dim=3)
    fit_latent_gaussian(model, _dataset(20, 0, seed=1))
    choice = MapChoice("residual", score)
    with pytest.raises(ConfigError, match="normal images only"):
        calibrate(model, _dataset(20, 2), choice=choice)
    normal = _dataset(40, 0, seed=2)
    calibration = calibrate(model, normal, quantile=0.9, choice=choice)
    batch = infer_batch(model, torch.stack([normal[i].image for i in range(40)]), calibration, choice)
    # Calibrated on these 40 normal images: the smallest maps to 0, their 0.9 quantile to 0.5 (computed here
    # independently from the raw scores), so the images above 0.5 are those above that quantile: 4 without ties.
    raw = batch.raw_scores
    assert batch.scores.min() == pytest.approx(0.0, abs=1e-9)
    assert calibration.normalize(np.array([np.quantile(raw, 0.9)]))[0] == pytest.approx(0.5)
    assert int((batch.scores > 0.5).sum()) == int((raw > np.quantile(raw, 0.9)).sum()) <= 4


def test_cavga_fits_and_evaluates_a_flattened_latent_with_a_new_score(tmp_path):
    import cavga

    train, test = _dataset(24, 0, seed=3), _dataset(8, 8, seed=4)
    model = cavga.Cavga(
        "D", image_size=32, channels=1, width=4, flatten_latent=True, flat_latent_dim=4, epochs=1, batch_size=8,
        score="latent_mahalanobis", anomaly_map="latent_gaussian", device="cpu",
    )  # fmt: skip
    model.fit(DatasetSplits(train, test), progress=False, paper_map=True)
    result = model.evaluate(DatasetSplits(train, test))
    # The image AuROC of the Mahalanobis scores themselves (sklearn's), with the paper's map beside
    from sklearn.metrics import roc_auc_score

    outputs = model.last_outputs_
    assert result["image_auroc"] == pytest.approx(roc_auc_score(outputs.labels, outputs.raw_scores))
    assert "paper_map" in result
    loaded = cavga.load(model.save(tmp_path / "m"), device="cpu")
    x = torch.stack([test[i].image for i in range(4)])
    before = infer_batch(model.model_, x, model.calibration_).raw_scores
    after = infer_batch(loaded.model_, x, loaded.calibration_).raw_scores
    assert np.allclose(before, after)
