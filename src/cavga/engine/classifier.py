"""CAVGA_w's classifier C refitted on the trained latent (``classifier_steps`` > 0; beyond the paper).

Trained jointly as eq. 6 says, C gets a handful of small steps from a handful of labelled images (L_bce's weight
is 0.001, and the default CAVGA-L trains one epoch): it stays near its random start and calls every image one
class. After training, this fits the same linear C (the paper's architecture, on the flattened z) again on the
mean latents of the same training examples (the normal images, the labelled ones with their augmented copies,
the synthesized anomalies), with the encoder fixed: class-balanced cross-entropy, Adam at a rate a linear model
on standardized inputs takes, weight decay, a fixed number of steps. The standardization (per latent channel,
over the examples) is folded into C's weights afterwards, so the network and its Grad-CAM are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cavga.data.types import collate_samples
from cavga.errors import ConfigError
from cavga.model.networks import CavgaNet

REFIT_LR = 1e-2
REFIT_WEIGHT_DECAY = 1e-4
REFIT_BATCH = 64


def _latents(model: CavgaNet, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    zs, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples):
        zs.append(model(batch.images.to(device), sample=False, decode=False).mu.detach())
        labels.append(batch.labels.to(device))
    return torch.cat(zs), torch.cat(labels)


def fold_standardization(
    weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer on flatten((z - shift) / scale) as one on flatten(z): V . ((z - m) / s) + c
    = (V / s) . z + (c - (V / s) . m). ``shift`` and ``scale`` are shaped like one z (1, C, h, w)."""
    folded = weight / scale.flatten(1)
    return folded, bias - (folded * shift.flatten(1)).sum(1)


def refit_classifier(model: CavgaNet, dataset: Dataset, steps: int, seed: int, batch_size: int = 32) -> dict:
    """Fit ``model.classifier`` anew on the mean latents of ``dataset`` (NORMAL and ANOMALOUS examples) for
    ``steps`` Adam steps; returns the final training loss and the examples' counts."""
    if model.classifier is None:
        raise ConfigError("refit_classifier needs CAVGA_w's classifier (setting 'w')")
    if model.config.flatten_latent:
        raise ConfigError("the classifier refit works on the conv latent z (flatten_latent=False)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            z, labels = _latents(model, dataset, batch_size)
    finally:
        model.train(was_training)
    counts = torch.bincount(labels, minlength=2)
    if int(counts.min()) == 0:
        raise ConfigError(f"the classifier refit needs normal and anomalous examples, got counts {counts.tolist()}")
    # Per-channel standardization, over every example and position.
    shift = z.mean(dim=(0, 2, 3), keepdim=True)
    scale = z.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x = ((z - shift) / scale).flatten(1)
    weights = (labels.numel() / (2.0 * counts.double())).to(x.dtype)
    head = torch.nn.Linear(x.shape[1], 2).to(x.device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=REFIT_LR, weight_decay=REFIT_WEIGHT_DECAY)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(REFIT_BATCH, x.shape[0]),), generator=generator).to(x.device)
            loss = F.cross_entropy(head(x[idx]), labels[idx], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        weight, bias = fold_standardization(head.weight, head.bias, shift.expand_as(z[:1]), scale.expand_as(z[:1]))
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    return {"loss": float(loss.detach()), "n_normal": int(counts[0]), "n_anomalous": int(counts[1]), "steps": steps}
