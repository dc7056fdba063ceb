"""The CAVGA training loop (paper eq. 4 and 6): a generator side (encoder, latent heads, decoder, classifier) and a
discriminator, each with its own optimizer; the generator is trained to fool the discriminator."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cavga import losses
from cavga.config import TrainConfig
from cavga.data.types import ANOMALOUS, NORMAL, Batch, collate_samples
from cavga.errors import CavgaError
from cavga.gradcam import class_attention, grad_cam, target_score
from cavga.models import CavgaNet

log = logging.getLogger(__name__)


class TrainingError(CavgaError):
    """Training cannot go on (a loss became NaN/Inf, the data holds no usable image)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may draw from the legacy global RNG
    torch.manual_seed(seed)


@dataclass
class StepLosses:
    """The loss terms of one step, as floats (what the progress bar and the history show)."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, other: dict[str, float]) -> None:
        for key, value in other.items():
            self.values[key] = self.values.get(key, 0.0) + value


def _check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise TrainingError(f"loss term {name!r} became {value.item()} at step {step}; training stopped")


def class_weights_for(labels: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights ``n / (2 n_class)`` for the classifier's BCE (CAVGA_w).

    With ~2 % anomalous images an unweighted BCE is minimized by calling everything normal. We weight the loss
    rather than oversample the few anomalous images: oversampling would repeat a handful of images many times
    per epoch (memorized at once) and take batch slots from the normal images the VAE and GAN learn from.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2).astype(np.float64)
    if (counts == 0).any():
        raise TrainingError(
            f"weakly supervised training needs both normal and anomalous images, got counts {counts.tolist()}"
        )
    return torch.tensor(counts.sum() / (2.0 * counts), dtype=torch.float32)


def training_step(
    model: CavgaNet,
    batch: Batch,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    config: TrainConfig,
    class_weights: torch.Tensor | None = None,
    step: int = 0,
) -> dict[str, float]:
    """One update of the discriminator, then one of the generator side. Returns the loss terms."""
    w = config.weights
    x = batch.images
    labels = batch.labels
    normal = labels == NORMAL
    out = model(x, sample=True)
    x_hat = torch.sigmoid(out.x_hat_logits)

    # Discriminator step on real images vs detached reconstructions (SPEC 1.4: x_hat detached for D).
    real = x[normal] if config.setting == "w" else x
    fake = x_hat[normal] if config.setting == "w" else x_hat
    opt_d.zero_grad(set_to_none=True)
    loss_d = losses.discriminator_loss(model.discriminator(real), model.discriminator(fake.detach()))
    _check_finite({"L_D": loss_d}, step)
    loss_d.backward()
    opt_d.step()

    # Generator side: eq. 4 (u) or eq. 6 (w).
    terms: dict[str, torch.Tensor] = {}
    if config.setting == "u":
        terms["L"] = losses.vae_loss(out.x_hat_logits, x, out.mu, out.logvar)
        terms["L_adv"] = losses.generator_adversarial_loss(model.discriminator(fake))
        attention = grad_cam(
            target_score(out, model.config.gradcam_target),
            out.features,
            output_size=tuple(x.shape[-2:]),
            normalization=model.config.gradcam_normalization,
            create_graph=True,
        )
        terms["L_ae"] = losses.attention_expansion_loss(attention)
        total = w.w_r * terms["L"] + w.w_adv * terms["L_adv"] + w.w_ae * terms["L_ae"]
    else:
        # The VAE and the adversarial game model the normal images only; the few labelled anomalous images train
        # the classifier C and, through it, the attention (paper 3.2).
        terms["L"] = losses.vae_loss(out.x_hat_logits[normal], x[normal], out.mu[normal], out.logvar[normal])
        terms["L_adv"] = losses.generator_adversarial_loss(model.discriminator(fake))
        logits = model.classify(out.z)
        terms["L_bce"] = losses.classifier_loss(logits, labels, class_weights)
        if class_weights is not None:
            # cross_entropy's weighted mean divides by the batch's own weight sum, which balances only batches
            # that hold both classes (most hold none of the rare anomalous images). Rescaling to
            # sum_i w_{y_i} CE_i / B makes the epoch's expected loss the class-balanced BCE.
            weight_sum = class_weights.to(logits.dtype)[labels].sum()
            terms["L_bce"] = terms["L_bce"] * weight_sum / labels.shape[0]
        a_normal = class_attention(model, out, NORMAL, create_graph=True)
        a_anomalous = class_attention(model, out, ANOMALOUS, create_graph=True)
        predictions = logits.argmax(dim=1)
        terms["L_cga"] = losses.complementary_guided_attention_loss(a_normal, a_anomalous, predictions, labels)
        total = w.w_r * terms["L"] + w.w_adv * terms["L_adv"] + w.w_c * terms["L_bce"] + w.w_cga * terms["L_cga"]
    terms["total"] = total
    _check_finite(terms, step)
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    result = {k: float(v.detach()) for k, v in terms.items()}
    result["L_D"] = float(loss_d.detach())
    return result


def make_optimizers(model: CavgaNet, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=config.lr, betas=betas)
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=config.lr, betas=betas)
    return opt_g, opt_d


def train(
    model: CavgaNet,
    dataset: Dataset,
    config: TrainConfig,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``dataset`` (Samples; for setting "w" with some ANOMALOUS labels).

    Returns the per-epoch mean of every loss term. Deterministic on CPU for a given ``config.seed``.
    """
    config.validate()
    if len(dataset) == 0:
        raise TrainingError("the training set is empty")
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model.to(device).train()
    opt_g, opt_d = make_optimizers(model, config)
    class_weights = None
    if config.setting == "w":
        class_weights = class_weights_for(dataset.labels).to(device)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(config.seed)
    # drop_last keeps BatchNorm away from batches of one image (a lone last image would make BN statistics undefined).
    drop_last = len(dataset) > config.batch_size
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate_samples,
        num_workers=config.num_workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
    )
    history: list[dict[str, float]] = []
    step = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs * len(loader), desc="train", unit="step", dynamic_ncols=True)
    try:
        for epoch in range(config.epochs):
            sums = StepLosses()
            n = 0
            for batch in loader:
                batch = batch.to(device)
                if config.setting == "w" and not bool((batch.labels == NORMAL).any()):
                    continue  # a batch of anomalous images only has nothing for the VAE/GAN terms
                terms = training_step(model, batch, opt_g, opt_d, config, class_weights, step)
                sums.add(terms)
                n += 1
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items() if k != "total"}, refresh=False)
            means = {k: v / max(n, 1) for k, v in sums.values.items()}
            means["epoch"] = epoch + 1
            history.append(means)
            log.info("epoch %d/%d %s", epoch + 1, config.epochs, _fmt(means))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, means)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "epoch" and math.isfinite(v))
