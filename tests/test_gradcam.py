"""Differentiable Grad-CAM: hand-computed cases, per-image normalization, gradient flow, inference use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cavga.config import ModelConfig
from cavga.errors import ConfigError
from cavga.model.gradcam import attention_map, class_attention, grad_cam, target_score
from cavga.model.losses import attention_expansion_loss, complementary_guided_attention_loss
from cavga.model.networks import build_model

EPS = 1e-8


def _tiny(**kwargs) -> ModelConfig:
    base = dict(variant="D", image_size=32, width=8, latent_channels=4)
    base.update(kwargs)
    return ModelConfig(**base)


def _hand_cam(features: np.ndarray, grads: np.ndarray, normalization: str) -> np.ndarray:
    """Grad-CAM by hand: alpha = spatial mean of the gradient, relu of the weighted sum, per-image scaling."""
    out = np.empty((features.shape[0], 1, *features.shape[2:]))
    for b in range(features.shape[0]):
        alpha = grads[b].mean(axis=(1, 2))
        cam = np.maximum(np.tensordot(alpha, features[b], axes=1), 0.0)
        if normalization == "max":
            cam = cam / (cam.max() + EPS)
        else:
            cam = (cam - cam.min()) / (cam.max() - cam.min() + EPS)
        out[b, 0] = cam
    return out


@pytest.mark.parametrize("normalization", ["max", "minmax"])
def test_grad_cam_linear_score_hand_computed(normalization: str) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2, 3, 2, 3))
    weight = rng.normal(size=(3, 2, 3))  # score_b = sum(weight * F_b): d score / d F = weight
    features = torch.tensor(feats, requires_grad=True)
    score = (torch.tensor(weight) * features).flatten(1).sum(1)
    got = grad_cam(score, features, normalization=normalization).detach().numpy()
    expected = _hand_cam(feats, np.broadcast_to(weight, feats.shape), normalization)
    assert (expected == 0).any() and (expected > 0).any(), "the case should exercise the relu"
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_grad_cam_nonlinear_score_uses_each_images_own_gradient() -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(3, 2, 3, 3))
    weight = rng.normal(size=(2, 3, 3))
    features = torch.tensor(feats, requires_grad=True)
    # score_b = 0.5 * sum(weight * F_b^2): d score_b / d F_b = weight * F_b (input dependent).
    score = 0.5 * (torch.tensor(weight) * features**2).flatten(1).sum(1)
    got = grad_cam(score, features).detach().numpy()
    np.testing.assert_allclose(got, _hand_cam(feats, weight * feats, "max"), rtol=1e-10, atol=1e-12)


def test_grad_cam_bilinear_upsampling_by_hand() -> None:
    features = torch.tensor([[[[0.2, 0.8]]]], dtype=torch.float64, requires_grad=True)
    cam = grad_cam(features.flatten(1).sum(1), features, output_size=(1, 4), eps=0.0)
    # alpha = 1, cam = [0.25, 1] after /max; align_corners=False samples at -0.25, 0.25, 0.75, 1.25 (clamped).
    a, b = 0.25, 1.0
    expected = [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]
    np.testing.assert_allclose(cam.detach().numpy().ravel(), expected, rtol=1e-12)
    assert cam.shape == (1, 1, 1, 4)


def test_grad_cam_normalizes_per_image_not_per_batch() -> None:
    rng = np.random.default_rng(2)
    feats = torch.tensor(rng.normal(size=(2, 3, 4, 4)))
    weight = torch.tensor(rng.normal(size=(3, 4, 4)))

    def maps(f: torch.Tensor, size: tuple[int, int] | None = (8, 8)) -> torch.Tensor:
        f = f.clone().requires_grad_(True)
        return grad_cam((weight * f).flatten(1).sum(1), f, output_size=size).detach()

    before = maps(feats)
    scaled = feats.clone()
    scaled[1] *= 10.0
    after = maps(scaled)
    torch.testing.assert_close(after[0], before[0])  # a batch maximum would shrink image 0's map 10x
    torch.testing.assert_close(after[1], before[1])
    assert before.min() >= 0 and before.max() <= 1
    # Each image reaches 1 at its own maximum (before resizing, which may blur the peak).
    peaks = maps(scaled, None).flatten(1).amax(1)
    torch.testing.assert_close(peaks, torch.ones(2, dtype=torch.float64))


def test_grad_cam_rejects_unknown_normalization() -> None:
    f = torch.rand(1, 2, 2, 2, requires_grad=True)
    with pytest.raises(ConfigError, match="normalization"):
        grad_cam(f.sum().view(1), f, normalization="softmax")


def test_target_score() -> None:
    model = build_model(_tiny())
    out = model.train()(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(target_score(out), out.mu.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(target_score(out, "sum_z"), out.z.sum(dim=(1, 2, 3)))
    with pytest.raises(ConfigError, match="target"):
        target_score(out, "max_mu")


def test_default_layer_has_closed_form_channel_weights() -> None:
    # Linear 1x1 head + sum(mu): alpha_k = sum_c W[c, k], independent of the input (export relies on it).
    torch.manual_seed(0)
    model = build_model(_tiny()).eval()
    x = torch.rand(3, 3, 32, 32)
    attention, out = attention_map(model, x)
    alpha = model.mu_head.weight.detach().sum(dim=0).view(1, -1, 1, 1)
    cam = F.relu((alpha * out.features).sum(1, keepdim=True))
    cam = cam / (cam.flatten(1).amax(1).view(-1, 1, 1, 1) + EPS)
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(attention, expected)


def test_model_maps_are_per_image_in_eval() -> None:
    torch.manual_seed(0)
    for layer in ("latent_input", "encoder_mid"):
        model = build_model(_tiny(gradcam_layer=layer)).eval()
        x = torch.rand(3, 3, 32, 32)
        together, _ = attention_map(model, x)
        alone, _ = attention_map(model, x[1:2])
        torch.testing.assert_close(together[1:2], alone)


def _ae_grads(w_ae: float, layer: str = "latent_input") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(_tiny(gradcam_layer=layer)).train()
    out = model(torch.rand(4, 3, 32, 32), sample=False)
    attention = grad_cam(target_score(out), out.features, output_size=(32, 32), create_graph=True)
    (w_ae * attention_expansion_loss(attention)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layer", ["latent_input", "encoder_mid"])
def test_attention_expansion_gradient_flows_and_scales_with_w_ae(layer: str) -> None:
    small, large = _ae_grads(0.01, layer), _ae_grads(0.03, layer)
    first_conv = "encoder.blocks.0.0.weight"
    assert small[first_conv].abs().sum() > 0
    # The mu head is reached only through alpha, i.e. through the double backward of create_graph=True.
    assert small["mu_head.weight"].abs().sum() > 0
    assert not torch.allclose(small[first_conv], large[first_conv])
    torch.testing.assert_close(large[first_conv], 3 * small[first_conv])
    assert "decoder.net.0.weight" not in small  # L_ae does not reach the decoder


def test_without_create_graph_alpha_is_constant() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny()).train()
    out = model(torch.rand(2, 3, 32, 32), sample=False)
    attention = grad_cam(target_score(out), out.features, create_graph=False)
    attention_expansion_loss(attention).backward()
    assert model.mu_head.weight.grad is None
    assert model.encoder.blocks[0][0].weight.grad.abs().sum() > 0


def test_attention_map_inside_no_grad() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny()).eval()
    x = torch.rand(2, 3, 32, 32)
    reference, _ = attention_map(model, x)
    with torch.no_grad():
        attention, out = attention_map(model, x)
    assert attention.shape == (2, 1, 32, 32)
    assert not attention.requires_grad and not out.mu.requires_grad
    assert torch.equal(out.z, out.mu)
    torch.testing.assert_close(attention, reference)
    assert attention.min() >= 0 and attention.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_attention_map_with_frozen_parameters() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny()).eval()
    x = torch.rand(2, 3, 32, 32)
    reference, _ = attention_map(model, x)
    model.requires_grad_(False)
    with torch.inference_mode(False), torch.no_grad():
        attention, _ = attention_map(model, x)
    torch.testing.assert_close(attention, reference)


def test_attention_map_create_graph_is_differentiable() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny()).train()
    attention, _ = attention_map(model, torch.rand(2, 3, 32, 32), create_graph=True)
    attention_expansion_loss(attention).backward()
    assert model.mu_head.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- CAVGA_w class attention


def test_class_attention_hand_computed() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny(setting="w")).eval()
    with torch.no_grad():  # inference: z from a graph-free pass still works
        out = model(torch.rand(2, 3, 32, 32))
        maps = [class_attention(model, out, cls, create_graph=False) for cls in (0, 1)]
    z = out.z.numpy()
    weight = model.classifier.weight.detach().numpy()
    for cls, got in enumerate(maps):
        grads = np.broadcast_to(weight[cls].reshape(z.shape[1:]), z.shape)  # d logit / d z, flatten order
        cam = torch.tensor(_hand_cam(z, grads, "max"), dtype=torch.float32)
        expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
        assert got.shape == (2, 1, 32, 32)
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(maps[0], maps[1])


def test_class_attention_flattened_latent_uses_encoder_features() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny(setting="w", flatten_latent=True)).eval()
    out = model(torch.rand(2, 3, 32, 32))
    attention = class_attention(model, out, 1, create_graph=False)
    assert attention.shape == (2, 1, 32, 32)
    assert attention.min() >= 0 and attention.max() <= 1


def test_cga_gradient_flows_into_encoder_through_both_maps() -> None:
    def grads(which: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(_tiny(setting="w")).train()
        out = model(torch.rand(4, 3, 32, 32))
        a_n = class_attention(model, out, 0, create_graph=True)
        a_a = class_attention(model, out, 1, create_graph=True)
        if which == "normal":
            a_a = a_a.detach()
        elif which == "anomalous":
            a_n = a_n.detach()
        normal = torch.zeros(4, dtype=torch.long)
        complementary_guided_attention_loss(a_n, a_a, normal, normal).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    for which in ("normal", "anomalous", "both"):
        g = grads(which)
        assert g["encoder.blocks.0.0.weight"].abs().sum() > 0, which
        assert g["classifier.weight"].abs().sum() > 0, which
