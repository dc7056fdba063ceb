"""Image anomaly scores of one CAVGA_u forward pass, by name: :data:`IMAGE_SCORES` (higher = more anomalous).

The paper scores an image by "the pixel-wise difference" between x and x_hat (``top_mean``, kept in
:mod:`cavga.engine.infer`). The others answer the same question from other parts of the model; which of them
separates one class from the rest is measured by ``benchmarks/studies/oneclass_study.py`` (README, "One-class"):

* residual aggregates: ``mean`` |x - x_hat| and ``squared`` (x - x_hat)^2 over all elements, ``ssim`` 1 - mean
  local SSIM;
* the VAE's own likelihood: ``elbo`` (the negative ELBO per element, as the training loss L of eq. 1 computes it,
  with x_hat decoded from mu) and its ``kl`` term alone;
* ``latent_mahalanobis``: the mean over latent positions of the Mahalanobis distance of mu from the normal
  training images' per-position Gaussian (for the flattened latent, one position: the distance of mu itself);
* the discriminator: ``discriminator`` -D(x) (D's logit says "real" for the normal class it has seen) and
  ``feature_matching`` the squared distance of D's last hidden features of x and of x_hat;
* ``attention_mass``: the mean of the paper's map 1 - A.

Each is a function of (model, forward output, images in [0, 1], x_hat in [0, 1]) returning (B,) raw values in
its own units; calibration on normal images puts them on the 0.5 scale (:func:`cavga.engine.infer.calibrate`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cavga.errors import ConfigError
from cavga.model.gaussian import latent_positions
from cavga.model.gradcam import output_attention
from cavga.model.networks import CavgaNet, CavgaOutput
from cavga.model.ssim import ssim_map

ScoreFunction = Callable[[CavgaNet, CavgaOutput, torch.Tensor, torch.Tensor], torch.Tensor]


def residual_mean(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (images - x_hat).abs().flatten(1).mean(1)


def residual_squared(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (images - x_hat).pow(2).flatten(1).mean(1)


def ssim_score(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return 1.0 - ssim_map(images, x_hat).flatten(1).mean(1)


def kl_score(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of each image, summed over its latent (the training loss's KL term)."""
    return 0.5 * (out.mu.pow(2) + out.logvar.exp() - 1.0 - out.logvar).flatten(1).sum(1)


def elbo_score(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """-ELBO / (C*H*W) per image: the BCE of x under x_hat's logits (decoded from mu) plus KL, per element
    (the per-image version of :func:`cavga.model.losses.vae_loss`)."""
    bce = F.binary_cross_entropy_with_logits(out.x_hat_logits, images, reduction="none").flatten(1).mean(1)
    return bce + kl_score(model, out, images, x_hat) / images[0].numel()


def latent_mahalanobis(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    gaussian = model.latent_gaussian
    if gaussian is None or not gaussian.fitted:
        raise ConfigError("the latent_mahalanobis score needs the latent Gaussian fitted on normal images (fit())")
    return gaussian(latent_positions(out.mu)).flatten(1).mean(1)


def discriminator_score(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return -model.discriminator(images)


def discriminator_features(model: CavgaNet, images: torch.Tensor) -> torch.Tensor:
    """D's last hidden feature map (everything but its final logit convolution)."""
    return model.discriminator.net[:-1](images)


def feature_matching(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    diff = discriminator_features(model, images) - discriminator_features(model, x_hat)
    return diff.pow(2).flatten(1).mean(1)


def attention_mass(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    attention = output_attention(model, out, (images.shape[-2], images.shape[-1]), create_graph=False)
    return (1.0 - attention).flatten(1).mean(1)


IMAGE_SCORES: dict[str, ScoreFunction] = {
    "mean": residual_mean,
    "squared": residual_squared,
    "ssim": ssim_score,
    "elbo": elbo_score,
    "kl": kl_score,
    "latent_mahalanobis": latent_mahalanobis,
    "discriminator": discriminator_score,
    "feature_matching": feature_matching,
    "attention_mass": attention_mass,
}


def image_score(name: str) -> ScoreFunction:
    if name not in IMAGE_SCORES:
        raise ConfigError(f"unknown image score {name!r}; known: {', '.join(IMAGE_SCORES)}")
    return IMAGE_SCORES[name]
