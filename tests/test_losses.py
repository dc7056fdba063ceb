"""Each loss of cavga.model.losses against a value worked out by hand (math / numpy), paper eq. 1-6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cavga.model.losses import (
    attention_expansion_loss,
    classifier_loss,
    complementary_guided_attention_loss,
    discriminator_loss,
    generator_adversarial_loss,
    kl_divergence,
    reconstruction_loss,
    vae_loss,
)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _bce(logit: float, target: float) -> float:
    p = _sigmoid(logit)
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_reconstruction_loss_hand_value() -> None:
    logits = [[[[0.0, 2.0], [-1.0, 3.0]]]]  # (1, 1, 2, 2)
    x = [[[[0.5, 1.0], [0.0, 0.2]]]]
    expected = np.mean([_bce(0.0, 0.5), _bce(2.0, 1.0), _bce(-1.0, 0.0), _bce(3.0, 0.2)])
    assert reconstruction_loss(t(logits), t(x)).item() == pytest.approx(expected, rel=1e-12)


def test_reconstruction_loss_is_stable_for_saturated_logits() -> None:
    # log(sigmoid(.)) would give log(0) = -inf here; the logits form gives the exact value 200/2 = 100.
    loss = reconstruction_loss(t([[[[200.0, -200.0]]]]), t([[[[0.0, 0.0]]]]))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(100.0, rel=1e-9)


def test_kl_divergence_hand_value() -> None:
    mu = [[0.5, -1.0], [0.0, 2.0]]
    logvar = [[0.0, 1.0], [-0.5, 0.3]]
    per_image = [
        0.5 * sum(m * m + math.exp(lv) - 1.0 - lv for m, lv in zip(mr, lr, strict=True))
        for mr, lr in zip(mu, logvar, strict=True)
    ]
    assert kl_divergence(t(mu), t(logvar)).item() == pytest.approx(sum(per_image) / 2, rel=1e-12)
    # Zero for the prior itself.
    assert kl_divergence(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)).item() == 0.0


def test_kl_sums_over_conv_latent_per_image() -> None:
    mu = torch.full((2, 3, 2, 2), 1.0, dtype=torch.float64)  # each element contributes 0.5 * 1
    assert kl_divergence(mu, torch.zeros_like(mu)).item() == pytest.approx(0.5 * 12, rel=1e-12)


def test_vae_loss_is_reconstruction_plus_kl_per_image_element() -> None:
    logits = t([[[[0.0, 1.0, -2.0]], [[0.5, 0.5, 0.5]]]])  # (1, 2, 1, 3): C*H*W = 6
    x = t([[[[0.0, 1.0, 0.5]], [[1.0, 0.0, 0.3]]]])
    mu, logvar = t([[1.0, 2.0]]), t([[0.0, 0.0]])
    rec = np.mean(
        [_bce(v, y) for v, y in zip([0.0, 1.0, -2.0, 0.5, 0.5, 0.5], [0.0, 1.0, 0.5, 1.0, 0.0, 0.3], strict=True)]
    )
    kl = 0.5 * (1.0 + 4.0)
    assert vae_loss(logits, x, mu, logvar).item() == pytest.approx(rec + kl / 6.0, rel=1e-12)


def test_discriminator_loss_hand_value() -> None:
    real, fake = [0.0, 2.0], [-1.0, 1.0]
    expected = -np.mean([math.log(_sigmoid(v)) for v in real]) - np.mean([math.log(1 - _sigmoid(v)) for v in fake])
    assert discriminator_loss(t(real), t(fake)).item() == pytest.approx(expected, rel=1e-12)


def test_generator_adversarial_loss_is_non_saturating() -> None:
    fake = [-3.0, 0.5]
    expected = -np.mean([math.log(_sigmoid(v)) for v in fake])
    assert generator_adversarial_loss(t(fake)).item() == pytest.approx(expected, rel=1e-12)
    # Non-saturating: a confident D (very negative logits) still gives the generator a strong gradient.
    logits = t([-20.0]).requires_grad_(True)
    generator_adversarial_loss(logits).backward()
    assert logits.grad.item() == pytest.approx(-1.0, abs=1e-6)


def test_attention_expansion_loss_hand_value() -> None:
    a = [[[[1.0, 0.5], [0.0, 0.5]]], [[[1.0, 1.0], [1.0, 0.2]]]]  # (2, 1, 2, 2)
    per_image = [np.mean([0.0, 0.5, 1.0, 0.5]), np.mean([0.0, 0.0, 0.0, 0.8])]
    assert attention_expansion_loss(t(a)).item() == pytest.approx(np.mean(per_image), rel=1e-12)
    assert attention_expansion_loss(torch.ones(3, 1, 4, 4)).item() == 0.0


def _nll(logits: list[float], label: int) -> float:
    log_z = math.log(sum(math.exp(v) for v in logits))
    return log_z - logits[label]


def test_classifier_loss_hand_value_and_equals_bce() -> None:
    logits = [[2.0, -1.0], [0.0, 0.5], [-1.0, 1.5]]
    labels = [0, 1, 0]
    expected = np.mean([_nll(lg, y) for lg, y in zip(logits, labels, strict=True)])
    got = classifier_loss(t(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Two-way cross-entropy is BCE on sigmoid(l1 - l0), the paper's L_bce.
    bce = np.mean([_bce(lg[1] - lg[0], y) for lg, y in zip(logits, labels, strict=True)])
    assert got.item() == pytest.approx(bce, rel=1e-12)


def test_classifier_loss_class_weights() -> None:
    logits = [[2.0, -1.0], [0.0, 0.5], [-1.0, 1.5]]
    labels = [0, 1, 0]
    w = [1.0, 10.0]
    nll = [_nll(lg, y) for lg, y in zip(logits, labels, strict=True)]
    expected = sum(w[y] * v for y, v in zip(labels, nll, strict=True)) / sum(w[y] for y in labels)
    got = classifier_loss(t(logits), torch.tensor(labels), class_weights=w)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def _four_cases() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Images: correct normal, misclassified normal, correct anomalous, misclassified anomalous.
    a_n = t([[[[1.0, 0.5], [0.2, 0.1]]], [[[0.0, 0.0], [0.0, 0.0]]], [[[0.3, 0.3], [0.3, 0.3]]], [[[0.9] * 2] * 2]])
    a_a = t([[[[0.0, 0.5], [0.4, 0.3]]], [[[1.0, 1.0], [1.0, 1.0]]], [[[0.7, 0.7], [0.7, 0.7]]], [[[0.1] * 2] * 2]])
    predictions = torch.tensor([0, 1, 1, 0])
    labels = torch.tensor([0, 0, 1, 1])
    return a_n, a_a, predictions, labels


def test_complementary_guided_attention_loss_indicator_and_average_over_n() -> None:
    a_n, a_a, predictions, labels = _four_cases()
    # Only image 0 satisfies p = y = normal: mean(1 - A_n + A_a) over its 4 pixels, then / N = 4.
    first = np.mean([1 - 1.0 + 0.0, 1 - 0.5 + 0.5, 1 - 0.2 + 0.4, 1 - 0.1 + 0.3])
    got = complementary_guided_attention_loss(a_n, a_a, predictions, labels)
    assert got.item() == pytest.approx(first / 4, rel=1e-12)


def test_complementary_guided_attention_loss_other_images_contribute_zero() -> None:
    a_n, a_a, predictions, labels = _four_cases()
    base = complementary_guided_attention_loss(a_n, a_a, predictions, labels)
    # Changing the maps of the misclassified normal and both anomalous images changes nothing.
    a_n2, a_a2 = a_n.clone(), a_a.clone()
    a_n2[1:] = 0.0
    a_a2[1:] = 1.0
    assert complementary_guided_attention_loss(a_n2, a_a2, predictions, labels).item() == base.item()
    # Nobody correct and normal: zero.
    zero = complementary_guided_attention_loss(a_n, a_a, torch.tensor([1, 1, 1, 0]), labels)
    assert zero.item() == 0.0


def test_complementary_guided_attention_loss_accepts_logits() -> None:
    a_n, a_a, predictions, labels = _four_cases()
    logits = torch.stack([predictions == 0, predictions == 1], dim=1).double() * 3.0
    by_class = complementary_guided_attention_loss(a_n, a_a, predictions, labels)
    assert complementary_guided_attention_loss(a_n, a_a, logits, labels).item() == by_class.item()
