"""CAVGA_w's classifiers fitted on the trained latent (``classifier_steps`` > 0; beyond the paper): C refitted, and
the deviation classifier of :class:`cavga.model.gaussian.DeviationClassifier`.

Trained jointly as eq. 6 says, C gets a handful of small steps from a handful of labelled images (L_bce's weight
is 0.001, and the default CAVGA-L trains one epoch): it stays near its random start and calls every image one
class. After training, this fits the same linear C (the paper's architecture, on the flattened z) again on the
mean latents of the same training examples (the normal images, the labelled ones with their augmented copies,
the synthesized anomalies), with the encoder fixed: class-balanced cross-entropy, Adam at a rate a linear model
on standardized inputs takes, weight decay, a fixed number of steps. The standardization (per latent channel,
over the examples) is folded into C's weights afterwards, so the network and its Grad-CAM are unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cavga.data.types import collate_samples
from cavga.engine.train import class_weights_for
from cavga.errors import ConfigError
from cavga.model.gaussian import DeviationClassifier, top_mean_logit
from cavga.model.networks import CavgaNet

REFIT_LR = 1e-2
REFIT_WEIGHT_DECAY = 1e-4
REFIT_BATCH = 64


def _examples(
    model: CavgaNet, dataset: Dataset, batch_size: int, what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean latents (eval mode, no sampling, no decoder), labels and class counts (normal, anomalous) of
    ``dataset``, which must hold both classes (``what`` names the fit in the error)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    zs, labels = [], []
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples):
                zs.append(model(batch.images.to(device), sample=False, decode=False).mu)
                labels.append(batch.labels.to(device))
    finally:
        model.train(was_training)
    labels = torch.cat(labels)
    counts = torch.bincount(labels, minlength=2)
    if int(counts.min()) == 0:
        raise ConfigError(f"{what} needs normal and anomalous examples, got counts {counts.tolist()}")
    return torch.cat(zs), labels, counts


def _adam_steps(
    params, n: int, steps: int, generator: torch.Generator, batch_loss: Callable[[torch.Tensor], torch.Tensor]
) -> dict:
    """``steps`` Adam steps on ``params``, each on a random batch (indices into n examples) of ``batch_loss``."""
    opt = torch.optim.Adam(params, lr=REFIT_LR, weight_decay=REFIT_WEIGHT_DECAY)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            loss = batch_loss(torch.randint(0, n, (min(REFIT_BATCH, n),), generator=generator))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"loss": float(loss.detach()), "steps": steps}


def _counts(counts: torch.Tensor) -> dict:
    return {"n_normal": int(counts[0]), "n_anomalous": int(counts[1])}


def fold_standardization(
    weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer on flatten((z - shift) / scale) as one on flatten(z): V . ((z - m) / s) + c
    = (V / s) . z + (c - (V / s) . m). ``shift`` and ``scale`` are shaped like one z ((1, C, h, w) or (1, D))."""
    folded = weight / scale.flatten(1)
    return folded, bias - (folded * shift.flatten(1)).sum(1)


def refit_classifier(model: CavgaNet, dataset: Dataset, steps: int, seed: int, batch_size: int = 32) -> dict:
    """Fit ``model.classifier`` anew on the mean latents of ``dataset`` (NORMAL and ANOMALOUS examples) for
    ``steps`` Adam steps; returns the final training loss and the examples' counts."""
    if model.classifier is None:
        raise ConfigError("refit_classifier needs CAVGA_w's classifier (setting 'w')")
    z, labels, counts = _examples(model, dataset, batch_size, "the classifier refit")
    # Per-channel standardization, over every example and position (the flattened latent: per value).
    dims = (0, 2, 3) if z.dim() == 4 else (0,)
    shift = z.mean(dim=dims, keepdim=True)
    scale = z.std(dim=dims, keepdim=True).clamp_min(1e-6)
    x = ((z - shift) / scale).flatten(1)
    weights = class_weights_for(labels.tolist()).to(x)  # n / (2 n_class), as the joint training weighs L_bce
    head = torch.nn.Linear(x.shape[1], 2).to(x.device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    info = _adam_steps(
        head.parameters(),
        x.shape[0],
        steps,
        generator,
        lambda idx: F.cross_entropy(head(x[idx.to(x.device)]), labels[idx.to(x.device)], weight=weights),
    )
    with torch.no_grad():
        weight, bias = fold_standardization(head.weight, head.bias, shift.expand_as(z[:1]), scale.expand_as(z[:1]))
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    return {**info, **_counts(counts)}


def _deviation_inputs(model: CavgaNet, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The deviation classifier's raw inputs (N, 2 C + 1, h, w) and labels of ``dataset``."""
    head, gaussian = model.deviation_classifier, model.latent_gaussian
    if head is None or gaussian is None or not gaussian.fitted:
        raise ConfigError("the deviation classifier needs CAVGA_w's conv latent and its fitted latent Gaussian")
    z, labels, _ = _examples(model, dataset, batch_size, "the deviation classifier")
    with torch.no_grad():
        return head.inputs(z, gaussian), labels


def _fit_deviation_head(
    head: DeviationClassifier, inputs: torch.Tensor, labels: torch.Tensor, steps: int, seed: int
) -> dict:
    """Standardize ``head``'s inputs over ``inputs`` and fit its 1 x 1 convolution: ``steps`` Adam steps of
    class-balanced cross-entropy on the image logit (the top-mean of the position logits)."""
    counts = torch.bincount(labels, minlength=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.shift.copy_(inputs.mean(dim=(0, 2, 3), keepdim=True))
        head.scale.copy_(inputs.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        head.conv.weight.normal_(0.0, 0.01, generator=generator)
        head.conv.bias.zero_()
    pos_weight = (counts[0].double() / counts[1].double()).to(inputs.dtype)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(inputs.device)
        logits = top_mean_logit(head.position_logits(inputs[idx]))
        return F.binary_cross_entropy_with_logits(logits, labels[idx].to(logits.dtype), pos_weight=pos_weight)

    info = _adam_steps(head.conv.parameters(), inputs.shape[0], steps, generator, batch_loss)
    head.n_examples.fill_(int(labels.numel()))
    return {**info, **_counts(counts)}


def fit_deviation_classifier(model: CavgaNet, dataset: Dataset, steps: int, seed: int, batch_size: int = 32) -> dict:
    """Fit ``model.deviation_classifier`` (:class:`cavga.model.gaussian.DeviationClassifier`) on the mean latents
    of ``dataset`` (NORMAL and ANOMALOUS examples) after the latent Gaussian is fitted: its inputs standardized
    over every example and position, then ``steps`` Adam steps of class-balanced cross-entropy on the image
    logit (the top-mean of the position logits). Returns the final loss and the examples' counts."""
    inputs, labels = _deviation_inputs(model, dataset, batch_size)
    return _fit_deviation_head(model.deviation_classifier, inputs, labels, steps, seed)


CLASSIFIER_FOLDS = 5  # cross-fitting of the classifier's weights for knn_classifier's calibration


def cross_fitted_classifier_weights(
    model: CavgaNet, dataset: Dataset, n_normal: int, steps: int, seed: int, batch_size: int = 32
) -> torch.Tensor | None:
    """knn_classifier's weight, (1 + the deviation classifier's probability) / 2 at each position (n_normal, 1, h,
    w), of the first ``n_normal`` examples of ``dataset`` (CAVGA_w's training set: its normal images come first,
    in the memory's order), each from a classifier fitted as :func:`fit_deviation_classifier` fits the model's,
    on every example but the normal images of its fold (fold = i mod CLASSIFIER_FOLDS). A classifier weighs the
    normal images it was fitted on lower than new ones, so their in-sample weights would set the threshold low.
    The model's own classifier is left as it is. None with fewer than two normal images a fold."""
    if n_normal < 2 * CLASSIFIER_FOLDS:
        return None
    inputs, labels = _deviation_inputs(model, dataset, batch_size)
    if bool((labels[:n_normal] != 0).any()):
        raise ConfigError(f"cross-fitting the classifier needs the first {n_normal} examples normal")
    fold = torch.arange(labels.numel()) % CLASSIFIER_FOLDS
    fold[n_normal:] = -1  # the anomalous examples are in every fit
    weights = torch.empty(n_normal, 1, *inputs.shape[-2:], dtype=inputs.dtype)
    for k in range(CLASSIFIER_FOLDS):
        head = copy.deepcopy(model.deviation_classifier)
        kept = (fold != k).nonzero()[:, 0].to(inputs.device)
        _fit_deviation_head(head, inputs[kept], labels[kept], steps, seed)
        held = (fold == k).nonzero()[:, 0]
        with torch.no_grad():
            weights[held] = head.memory_weight(inputs[held.to(inputs.device)]).cpu()
    return weights
