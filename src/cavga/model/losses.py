"""CAVGA's losses (paper eq. 1-6; SPEC 1.1-1.2) as pure functions of tensors, each returning a scalar.

Every probability-based loss takes logits (``*_with_logits``), never ``log(sigmoid(.))`` (SPEC 1.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cavga.data.types import NORMAL


def reconstruction_loss(x_hat_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_R of eq. 1: binary cross-entropy between images ``x`` in [0, 1] and the decoder's logits, mean over all
    elements."""
    return F.binary_cross_entropy_with_logits(x_hat_logits, x, reduction="mean")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over each image's latent, mean over the batch."""
    per_image = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    return per_image.mean()


def vae_loss(x_hat_logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L of eq. 1 on a per-pixel scale: ``reconstruction_loss + kl_divergence / (C*H*W)``.

    The paper writes L_R as a mean and KL without a scale. A VAE's ELBO sums the reconstruction over the image
    elements; dividing that per-image ELBO by C*H*W keeps the VAE's own balance between the two terms while
    putting L on the same per-element scale as L_adv and L_ae, so the paper's weights 1, 1, 0.01 stay meaningful.
    """
    n_elements = x[0].numel()
    return reconstruction_loss(x_hat_logits, x) + kl_divergence(mu, logvar) / n_elements


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's side of eq. 2: -mean log D(x) - mean log(1 - D(x_hat)), real -> 1 and fake -> 0."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_adv for the generator, non-saturating form: -mean log D(x_hat) (x_hat labelled real)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def attention_expansion_loss(attention: torch.Tensor) -> torch.Tensor:
    """L_ae of eq. 3: per image the mean of 1 - A over its pixels, averaged over the N images."""
    return (1.0 - attention).flatten(1).mean(1).mean()


def classifier_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """L_bce of classifier C: cross-entropy on its 2 logits (the same as BCE on the anomalous probability).

    ``class_weights`` (weight of class 0 normal, class 1 anomalous) counters the imbalance of CAVGA_w's few
    anomalous images; as in ``torch.nn.functional.cross_entropy`` the weighted mean divides by the sum of the
    weights of the batch's labels.
    """
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    return F.cross_entropy(logits, labels.long(), weight=weight)


def balanced_classifier_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | Sequence[float] | None
) -> torch.Tensor:
    """L_bce of one batch such that the epoch's expected loss is the class-balanced BCE: sum_i w_{y_i} CE_i / B.

    :func:`classifier_loss`'s weighted mean divides by the batch's own weight sum, which balances only batches
    that hold both classes (most hold none of CAVGA_w's rare anomalous images); this rescales it by that sum / B.
    """
    loss = classifier_loss(logits, labels, class_weights)
    if class_weights is None:
        return loss
    weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    return loss * weight[labels].sum() / labels.shape[0]


def complementary_guided_attention_loss(
    attention_normal: torch.Tensor,
    attention_anomalous: torch.Tensor,
    predictions: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """L_cga of eq. 5: per image 1(p = y = normal) * mean(1 - A^normal + A^anomalous), averaged over all N images.

    ``predictions`` are C's classes (B,) or its logits (B, 2) (argmax taken). Misclassified normal images and
    every anomalous image contribute zero but still count in N (the paper averages L_cga,1 over the N images).
    """
    if predictions.dim() == 2:
        predictions = predictions.argmax(dim=1)
    indicator = ((predictions == NORMAL) & (labels == NORMAL)).to(attention_normal.dtype)
    per_image = (1.0 - attention_normal + attention_anomalous).flatten(1).mean(1)
    return (indicator * per_image).sum() / attention_normal.shape[0]
