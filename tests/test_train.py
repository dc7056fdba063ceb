"""Training loop: one step lowers the loss, determinism, separate optimizers, NaN guard."""

from __future__ import annotations

import pytest
import torch

from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import Sample, collate_samples
from cavga.engine.train import TrainingError, class_weights_for, make_optimizers, train, training_step
from cavga.model import losses
from cavga.model.networks import build_model
from tiny_data import ListDataset


def tiny_batch(n: int = 6, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    return collate_samples([Sample(img, None, 0, "good", f"img{i}.png") for i, img in enumerate(images)])


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(variant="D", image_size=32, channels=3, width=8, latent_channels=8, **kw))


def generator_objective(model, batch, config):
    """L_final of eq. 4 without L_adv (its D moves too) and without sampling noise (mu), in train mode (batch
    statistics, as the step sees them), for comparing before/after a step."""
    from cavga.model.gradcam import grad_cam, target_score

    out = model(batch.images, sample=False)
    attention = grad_cam(target_score(out), out.features, output_size=(32, 32), create_graph=False)
    w = config.weights
    value = w.w_r * losses.vae_loss(
        out.x_hat_logits, batch.images, out.mu, out.logvar
    ) + w.w_ae * losses.attention_expansion_loss(attention)
    return float(value.detach())


def test_one_step_lowers_the_generator_loss_on_a_fixed_batch():
    model = tiny_model()
    batch = tiny_batch()
    config = TrainConfig(lr=1e-3, batch_size=6)
    opt_g, opt_d = make_optimizers(model, config)
    before = generator_objective(model, batch, config)
    for step in range(3):
        terms = training_step(model, batch, opt_g, opt_d, config, step=step)
    after = generator_objective(model, batch, config)
    assert set(terms) >= {"L", "L_adv", "L_ae", "L_D", "total"}
    assert after < before


def test_optimizers_are_separate_and_cover_disjoint_parameters():
    model = tiny_model()
    opt_g, opt_d = make_optimizers(model, TrainConfig())
    g = {id(p) for group in opt_g.param_groups for p in group["params"]}
    d = {id(p) for group in opt_d.param_groups for p in group["params"]}
    assert g and d and not (g & d)
    assert {id(p) for p in model.discriminator.parameters()} == d


def test_discriminator_step_does_not_touch_the_generator():
    model = tiny_model()
    batch = tiny_batch()
    config = TrainConfig(weights=TrainConfig().weights)
    opt_g, opt_d = make_optimizers(model, config)
    # Freeze the generator update by setting its learning rate to zero: only D may change.
    for group in opt_g.param_groups:
        group["lr"] = 0.0
    g_before = [p.detach().clone() for p in model.generator_parameters()]
    d_before = [p.detach().clone() for p in model.discriminator_parameters()]
    training_step(model, batch, opt_g, opt_d, config)
    assert all(torch.equal(a, b) for a, b in zip(g_before, model.generator_parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, model.discriminator_parameters(), strict=True))


def test_training_is_deterministic_on_cpu_for_a_seed():
    g = torch.Generator().manual_seed(1)
    data = ListDataset([Sample(torch.rand(3, 32, 32, generator=g), None, 0, "good", str(i)) for i in range(10)])
    states = []
    for _ in range(2):
        model = tiny_model()
        train(model, data, TrainConfig(epochs=2, batch_size=4, seed=3, device="cpu"), progress=False)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_nan_loss_stops_with_the_step_and_term_named():
    model = tiny_model()
    batch = tiny_batch()
    batch.images[0, 0, 0, 0] = float("nan")
    opt_g, opt_d = make_optimizers(model, TrainConfig())
    with pytest.raises(TrainingError, match=r"at step 7"):
        training_step(model, batch, opt_g, opt_d, TrainConfig(), step=7)


def test_class_weights_balance_the_classes():
    weights = class_weights_for([0] * 98 + [1] * 2)
    assert weights.tolist() == pytest.approx([100 / 196, 100 / 4])
    with pytest.raises(TrainingError, match="both normal and anomalous"):
        class_weights_for([0, 0, 0])
