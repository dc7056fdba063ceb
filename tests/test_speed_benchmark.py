"""benchmarks/speed.py --quick (JSON schema and table) and the speed optimizations keeping results equal.

The optimizations: closed-form Grad-CAM weights at inference and in training (no double backward), inference
mode for the whole batch, and no discriminator weight gradients in the generator's backward. Each is checked
against the autograd path it replaces (``closed_form_weights`` forced to None, ``_frozen`` a no-op).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from cavga import gradcam, infer, train
from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import Batch
from cavga.gradcam import attention_map, class_attention, grad_cam, target_score
from cavga.infer import infer_batch
from cavga.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _config(**kw) -> ModelConfig:
    base = {"variant": "D", "image_size": 32, "width": 8, "latent_channels": 8, "latent_stride": 8}
    return ModelConfig(**{**base, **kw})


@contextlib.contextmanager
def _autograd_gradcam():
    """The code paths before the optimizations: autograd Grad-CAM everywhere, D weight gradients computed."""
    saved = gradcam.closed_form_weights, gradcam.has_closed_form, infer.has_closed_form, train._frozen
    gradcam.closed_form_weights = lambda *a, **k: None
    gradcam.has_closed_form = infer.has_closed_form = lambda *a, **k: False
    train._frozen = lambda module: contextlib.nullcontext()
    try:
        yield
    finally:
        gradcam.closed_form_weights, gradcam.has_closed_form, infer.has_closed_form, train._frozen = saved


# --------------------------------------------------------------------------- results equal


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("target", ["sum_mu", "sum_z"])
@pytest.mark.parametrize("normalization", ["max", "minmax"])
def test_closed_form_attention_equals_autograd_gradcam(flat: bool, target: str, normalization: str) -> None:
    torch.manual_seed(0)
    cfg = _config(flatten_latent=flat, gradcam_target=target, gradcam_normalization=normalization)
    model = build_model(cfg).eval()
    x = torch.rand(3, 3, 32, 32)
    got, out = attention_map(model, x)
    assert not out.features.requires_grad  # one forward without autograd
    # Independent reference: hooks-free autograd Grad-CAM on a forward with gradients.
    ref_out = model(x, sample=False)
    expected = grad_cam(
        target_score(ref_out, target), ref_out.features, (32, 32), normalization, create_graph=False
    ).detach()
    assert got.shape == expected.shape == (3, 1, 32, 32)
    assert (got - expected).abs().max() <= 1e-5
    assert expected.amax() > 0.99  # a non-trivial map (max-normalized)


@pytest.mark.parametrize("flat", [False, True])
def test_closed_form_class_attention_equals_autograd(flat: bool) -> None:
    torch.manual_seed(0)
    model = build_model(_config(flatten_latent=flat, weakly_supervised=True)).eval()
    x = torch.rand(3, 3, 32, 32)
    for cls in (0, 1):
        got = class_attention(model, model(x, sample=False), cls, create_graph=False)
        with _autograd_gradcam():
            expected = class_attention(model, model(x, sample=False), cls, create_graph=False)
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("setting", ["u", "w"])
def test_infer_batch_equals_autograd_path(setting: str) -> None:
    torch.manual_seed(0)
    model = build_model(_config(weakly_supervised=setting == "w"))
    x = torch.rand(4, 3, 32, 32)
    fast = infer_batch(model, x, setting)
    with _autograd_gradcam():
        slow = infer_batch(model, x, setting)
    for name in ("raw_scores", "anomaly_maps", "reconstructions", "residual_maps"):
        assert abs(getattr(fast, name) - getattr(slow, name)).max() <= 1e-5, name


@pytest.mark.parametrize("setting", ["u", "w"])
@pytest.mark.parametrize("flat", [False, True])
def test_training_step_equals_double_backward_step(setting: str, flat: bool) -> None:
    torch.manual_seed(0)
    model = build_model(_config(flatten_latent=flat, weakly_supervised=setting == "w")).train()
    config = TrainConfig(setting=setting)
    config.weights.w_ae = config.weights.w_cga = 1.0  # make the attention terms weigh in the update
    labels = torch.tensor([0, 0, 0, 1] if setting == "w" else [0, 0, 0, 0])
    images, masks, has_mask = torch.rand(4, 3, 32, 32), torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.bool)
    batch = Batch(images, masks, has_mask, labels, ["good"] * 4, [f"{i}.png" for i in range(4)])
    weights = torch.tensor([0.6, 2.0]) if setting == "w" else None
    results = []
    for optimized in (True, False):
        twin = copy.deepcopy(model)
        opt_g, opt_d = train.make_optimizers(twin, config)
        torch.manual_seed(1)
        with contextlib.nullcontext() if optimized else _autograd_gradcam():
            terms = [train.training_step(twin, batch, opt_g, opt_d, config, weights, s) for s in range(2)]
        results.append((terms, twin.state_dict()))
    (fast_terms, fast_state), (slow_terms, slow_state) = results
    for a, b in zip(fast_terms, slow_terms, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    moved = 0
    for name, value in fast_state.items():
        torch.testing.assert_close(value, slow_state[name], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(value, model.state_dict()[name]))
    assert moved > 0
