"""CAVGA-D and CAVGA-R networks: shapes of every variant, sampling, parameter groups, encoder weights loading."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from cavga.config import ModelConfig
from cavga.errors import ConfigError, ModelFileError
from cavga.model.networks import CavgaNet, build_model, load_encoder_weights

WIDTH = 8
C_Z = 4
BATCH = 2


def _config(**kwargs) -> ModelConfig:
    return ModelConfig(width=WIDTH, latent_channels=C_Z, **kwargs)


def _check_shapes(model: CavgaNet, cfg: ModelConfig, feature_shape: tuple[int, int, int]) -> None:
    k, h, w = feature_shape
    x = torch.rand(BATCH, cfg.channels, cfg.image_size, cfg.image_size)
    out = model(x)
    assert out.features.shape == (BATCH, k, h, w)
    latent = (BATCH, cfg.flat_latent_dim) if cfg.flatten_latent else (BATCH, C_Z, h, w)
    assert out.mu.shape == out.logvar.shape == out.z.shape == latent
    assert out.x_hat_logits.shape == x.shape
    assert model.discriminator(x).shape == (BATCH,)
    if cfg.setting == "w":
        assert model.classifier is not None
        z_numel = cfg.flat_latent_dim if cfg.flatten_latent else C_Z * h * w
        assert model.classifier.in_features == z_numel
        assert model.classify(out.z).shape == (BATCH, 2)
    else:
        assert model.classifier is None


D_CASES = list(itertools.product((32, 64), (1, 3), (False, True), (False, True)))


@pytest.mark.parametrize(("size", "channels", "flat", "weak"), D_CASES)
def test_cavga_d_shapes(size: int, channels: int, flat: bool, weak: bool) -> None:
    cfg = _config(variant="D", image_size=size, channels=channels, flatten_latent=flat, setting="w" if weak else "u")
    # Encoder channels w, 2w, 4w down to size / 8.
    _check_shapes(build_model(cfg), cfg, (4 * WIDTH, size // 8, size // 8))


def test_cavga_d_latent_stride_16() -> None:
    cfg = _config(variant="D", image_size=64, latent_stride=16)
    _check_shapes(build_model(cfg), cfg, (8 * WIDTH, 4, 4))


R_CASES = list(itertools.product((1, 3), (False, True), (False, True)))


@pytest.mark.parametrize(("channels", "flat", "weak"), R_CASES)
def test_cavga_r_shapes_128(channels: int, flat: bool, weak: bool) -> None:
    cfg = _config(variant="R", image_size=128, channels=channels, flatten_latent=flat, setting="w" if weak else "u")
    _check_shapes(build_model(cfg), cfg, (512, 4, 4))


@pytest.mark.parametrize("size", [96, 256])
def test_cavga_r_other_sizes(size: int) -> None:
    cfg = _config(variant="R", image_size=size, setting="w")
    _check_shapes(build_model(cfg), cfg, (512, size // 32, size // 32))


@pytest.mark.parametrize(("variant", "size", "mid_shape"), [("D", 64, (2 * WIDTH, 16, 16)), ("R", 128, (256, 8, 8))])
def test_encoder_mid_features_lead_to_mu(variant: str, size: int, mid_shape: tuple[int, int, int]) -> None:
    model = build_model(_config(variant=variant, image_size=size, gradcam_layer="encoder_mid"))
    out = model(torch.rand(BATCH, 3, size, size))
    assert out.features.shape == (BATCH, *mid_shape)
    (grad,) = torch.autograd.grad(out.mu.sum(), out.features)
    assert grad.abs().sum() > 0


def test_latent_input_features_feed_the_heads() -> None:
    model = build_model(_config(variant="D", image_size=32)).eval()
    out = model(torch.rand(BATCH, 3, 32, 32))
    torch.testing.assert_close(out.mu, model.mu_head(out.features))
    torch.testing.assert_close(out.logvar, model.logvar_head(out.features))


def test_sampling_in_training_mu_otherwise() -> None:
    torch.manual_seed(0)
    model = build_model(_config(variant="D", image_size=32))
    x = torch.rand(BATCH, 3, 32, 32)
    train_out = model.train()(x)
    assert not torch.equal(train_out.z, train_out.mu)
    assert torch.equal(model(x, sample=False).z, model(x, sample=False).mu)
    eval_out = model.eval()(x)
    assert torch.equal(eval_out.z, eval_out.mu)
    assert not torch.equal(model(x, sample=True).z, eval_out.mu)


def test_reparameterization_uses_logvar() -> None:
    torch.manual_seed(0)
    model = build_model(_config(variant="D", image_size=32)).eval()
    with torch.no_grad():
        model.logvar_head.weight.zero_()
        model.logvar_head.bias.fill_(2 * torch.log(torch.tensor(3.0)).item())  # std 3
        out = model(torch.rand(64, 3, 32, 32), sample=True)
    noise_std = (out.z - out.mu).std().item()
    assert noise_std == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("variant", ["D", "R"])
def test_parameter_groups_split_generator_and_discriminator(variant: str) -> None:
    size = 32 if variant == "D" else 64
    model = build_model(_config(variant=variant, image_size=size, setting="w"))
    gen = {id(p) for p in model.generator_parameters()}
    disc = {id(p) for p in model.discriminator_parameters()}
    assert gen.isdisjoint(disc)
    # The deviation classifier is fitted after training (cavga.engine.classifier), outside both optimizers.
    after = {id(p) for p in model.deviation_classifier.parameters()}
    assert after and after.isdisjoint(gen | disc)
    assert gen | disc | after == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.classifier.parameters()} <= gen
    assert {id(p) for p in model.encoder.parameters()} <= gen


def test_dcgan_init_on_d_parts() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="D", image_size=64))  # full width for enough samples
    conv = model.encoder.blocks[2][0].weight
    assert conv.mean().abs() < 0.002 and conv.std().item() == pytest.approx(0.02, rel=0.05)
    bn = model.encoder.blocks[2][1].weight
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01) and bn.std().item() == pytest.approx(0.02, rel=0.2)


def test_r_trunk_keeps_torchvision_init() -> None:
    torch.manual_seed(0)
    model = build_model(_config(variant="R", image_size=64))
    # torchvision's kaiming normal (fan_out) for conv1: std = sqrt(2 / (64 * 7 * 7)), not DCGAN's 0.02.
    std = model.encoder.conv1.weight.std().item()
    assert std == pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.1)
    assert torch.all(model.encoder.bn1.weight == 1)


def test_classify_without_classifier_is_a_config_error() -> None:
    model = build_model(_config(variant="D", image_size=32))
    with pytest.raises(ConfigError, match="setting=.w."):
        model.classify(torch.zeros(1, C_Z, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(variant="D", image_size=48), "image_size"),
        (dict(variant="R", image_size=100), "multiple of 32"),
        (dict(variant="X"), "variant"),
        (dict(variant="D", latent_stride=6), "latent_stride"),
        (dict(variant="D", latent_stride=2), "latent_stride"),
        (dict(gradcam_target="max_mu"), "gradcam_target"),
        (dict(gradcam_layer="layer9"), "gradcam_layer"),
        (dict(variant="D", encoder_weights="w.pth"), "CAVGA-R and CAVGA-L only"),
    ],
)
def test_build_model_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(_config(**kwargs))


# --------------------------------------------------------------------------- encoder weights


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return resnet18(weights=None).state_dict()


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_weights_round_trip(tmp_path: Path, torchvision_state: dict, suffix: str) -> None:
    path = _save(torchvision_state, tmp_path / f"resnet18{suffix}")  # includes fc.*, which is ignored
    model = build_model(_config(variant="R", image_size=64, encoder_weights=str(path)))
    assert torch.equal(model.encoder.conv1.weight, torchvision_state["conv1.weight"])
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, torchvision_state["layer4.1.bn2.running_var"])


def test_encoder_weights_grayscale_sums_conv1(tmp_path: Path, torchvision_state: dict) -> None:
    path = _save(torchvision_state, tmp_path / "resnet18.pt")
    model = build_model(_config(variant="R", image_size=64, channels=1, encoder_weights=str(path)))
    expected = torchvision_state["conv1.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.encoder.conv1.weight.detach(), expected)
    assert torch.equal(model.encoder.layer1[0].conv1.weight, torchvision_state["layer1.0.conv1.weight"])


def test_encoder_weights_missing_and_unexpected_keys_are_named(tmp_path: Path, torchvision_state: dict) -> None:
    state = dict(torchvision_state)
    del state["layer2.0.downsample.0.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = _save(state, tmp_path / "broken.pth")
    model = build_model(_config(variant="R", image_size=64))
    with pytest.raises(ModelFileError) as info:
        load_encoder_weights(model, path)
    message = str(info.value)
    assert "broken.pth" in message
    assert "layer2.0.downsample.0.weight" in message and "layer5.0.conv1.weight" in message


def test_encoder_weights_misshaped_key_is_named(tmp_path: Path, torchvision_state: dict) -> None:
    state = dict(torchvision_state)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = _save(state, tmp_path / "shape.pth")
    with pytest.raises(ModelFileError, match=r"shape\.pth.*layer1\.0\.conv1\.weight"):
        build_model(_config(variant="R", image_size=64, encoder_weights=str(path)))


def test_encoder_weights_bad_files(tmp_path: Path) -> None:
    model = build_model(_config(variant="R", image_size=64))
    with pytest.raises(ModelFileError, match="not found"):
        load_encoder_weights(model, tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="garbage.pth"):
        load_encoder_weights(model, garbage)
    not_a_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state)
    with pytest.raises(ModelFileError, match="list.pth"):
        load_encoder_weights(model, not_a_state)
