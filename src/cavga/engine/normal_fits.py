"""What is fitted on normal images after training: the latent Gaussian, the latent and trunk memories, and the
normal scores that calibrate them (cross-fitted, or each memory image measured without its own rows).

:func:`cavga.engine.infer.calibrate` reads these scores; the fitting steps of :meth:`cavga.Cavga.fit`
(:mod:`cavga.engine.fitting`) call the ``fit_*`` functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from cavga.data.types import NORMAL, collate_samples
from cavga.engine.maps import map_score, upsampled_blur
from cavga.engine.progress import advance
from cavga.errors import ConfigError
from cavga.model.gaussian import cross_fitted_scores, latent_positions
from cavga.model.memory import patch_features, two_memory_distance
from cavga.model.networks import CavgaNet


@torch.no_grad()
def _normal_latents(
    model: CavgaNet, normal_dataset: Dataset, batch_size: int, trunk: bool = False
) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """``mu`` (as positions, :func:`cavga.model.gaussian.latent_positions`) of every batch of NORMAL images, in
    eval mode and without sampling, as inference computes it; and the images' size. ``trunk=True``: the trunk's
    patch features instead (:func:`cavga.model.memory.patch_features`, the trunk_knn map's vectors)."""
    _require_normal(normal_dataset)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vectors, size, pool = [], (0, 0), model.config.trunk_pool
    try:
        with torch.no_grad():
            for batch in DataLoader(normal_dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples):
                images = batch.images.to(device)
                if trunk:  # the trunk alone: the latent heads' work would be thrown away
                    vectors.append(patch_features(model.encoder.forward_levels(images), pool))
                else:
                    vectors.append(latent_positions(model(images, sample=False, decode=False).mu))
                size = tuple(batch.images.shape[-2:])
                advance(batch.images.shape[0])
    finally:
        model.train(was_training)
    return vectors, size


def fit_latent_gaussian(model: CavgaNet, normal_dataset: Dataset, batch_size: int = 32) -> None:
    """Fit the model's per-position Gaussian of ``mu`` (the ``latent_gaussian`` map) on NORMAL images."""
    if model.latent_gaussian is None:
        return
    mus, _ = _normal_latents(model, normal_dataset, batch_size)
    model.latent_gaussian.fit(mus, neighbourhood=model.config.gaussian_neighbourhood)


MEMORY_UNIT_QUANTILE = 0.95  # two memories: each distance's unit, this quantile of its left-out normal scores


def fit_latent_memory(model: CavgaNet, normal_dataset: Dataset, seed: int = 0, batch_size: int = 32) -> None:
    """Fill the model's memory of normal ``mu`` vectors (the ``latent_knn`` map) from NORMAL images."""
    mus, size = _normal_latents(model, normal_dataset, batch_size)
    model.latent_memory.fit(mus, seed=seed)
    coarse = model.latent_memory_coarse
    if coarse is not None:  # two memories: each distance's unit, from its own images scored without their rows
        coarse.fit(mus, seed=seed)
        for memory in (model.latent_memory, coarse) if len(normal_dataset) > 1 else ():  # one image: units 1
            scores = _left_out_scores(lambda mu, own, memory=memory: memory(mu, leave_out=own), mus, size)
            memory.unit.fill_(max(float(np.quantile(scores, MEMORY_UNIT_QUANTILE)), 1e-12))


@dataclass(frozen=True)
class NormalVectors:
    """The vectors a memory was filled from, batch by batch in the dataset's order (``batches``, each (B, C, h,
    w)), the images' size, and whether they are the trunk's patch features (else mu's positions): what the
    calibration's left-out scores read again (:func:`left_out_memory_scores`), kept so that it need not run the
    network over the same images a second time."""

    batches: list[torch.Tensor]
    size: tuple[int, int]
    trunk: bool


def fit_trunk_memory(model: CavgaNet, normal_dataset: Dataset, seed: int = 0, batch_size: int = 32) -> NormalVectors:
    """Fill CAVGA-L's memory of the trunk's normal patch features (the ``trunk_knn`` map) from NORMAL images;
    returns the features it was filled from."""
    if model.trunk_memory is None:
        raise ConfigError("the trunk_knn map needs CAVGA-L's ImageNet trunk (variant 'L')")
    features, size = _normal_latents(model, normal_dataset, batch_size, trunk=True)
    model.trunk_memory.fit(features, seed=seed)
    return NormalVectors(features, size, trunk=True)


def _blurred_max(distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ``map_max`` score (B,) of coarse distance maps (B, 1, h, w), as the deviation maps draw them."""
    return map_score(upsampled_blur(distances, size), "map_max")


GAUSSIAN_FOLDS = 5  # cross-fitting of the latent Gaussian's calibration scores (calibrate)


def cross_fitted_latent_scores(model: CavgaNet, normal_dataset: Dataset, batch_size: int = 32) -> np.ndarray:
    """The ``latent_gaussian`` / ``map_max`` raw score of every image of ``normal_dataset``, each from a Gaussian
    of mu fitted on the other folds (:func:`cavga.model.gaussian.cross_fitted_scores`), as
    :func:`fit_latent_gaussian` fits the model's own."""
    mus, size = _normal_latents(model, normal_dataset, batch_size)
    scores = cross_fitted_scores(
        torch.cat(mus),
        lambda d: _blurred_max(d, size),
        GAUSSIAN_FOLDS,
        batch_size=batch_size,
        neighbourhood=model.config.gaussian_neighbourhood,
    )
    return scores.numpy()


def left_out_memory_scores(
    model: CavgaNet,
    training_normals: Dataset,
    batch_size: int = 32,
    weights: torch.Tensor | None = None,
    anomaly_map: str = "latent_knn",
    pixels: list[torch.Tensor] | None = None,
    vectors: NormalVectors | None = None,
    score: str = "map_max",
) -> np.ndarray:
    """The raw ``score`` (``map_max`` or ``map_top1``) of the memory's map (``latent_knn``, ``knn_classifier`` or
    ``trunk_knn``) of every image the memory was filled from (:func:`fit_latent_memory` / :func:`fit_trunk_memory`,
    the same dataset in the same order), each measured without that image's own rows: the score it would get were
    it a new normal image.
    ``weights`` (N, 1, h, w), one per image in that order: ``knn_classifier``'s, each distance multiplied by them
    (:func:`cavga.engine.classifier.cross_fitted_classifier_weights`). ``pixels``: a list that receives the
    left-out maps (B, 1, H, W) batch by batch. ``vectors``: those the memory was filled from, where the fit kept
    them (:func:`fit_trunk_memory`'s), instead of running the network over ``training_normals`` again."""
    trunk = anomaly_map == "trunk_knn"
    if vectors is not None and vectors.trunk == trunk:
        batches, size = vectors.batches, vectors.size
    else:
        batches, size = _normal_latents(model, training_normals, batch_size, trunk=trunk)

    def distance(v: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        if trunk:
            return model.trunk_memory(v, leave_out=own)
        d = two_memory_distance(model.latent_memory, model.latent_memory_coarse, v, leave_out=own)
        return d if weights is None else d * weights[own.cpu()].to(d)

    return _left_out_scores(distance, batches, size, pixels, score)


def _left_out_scores(
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mus: list[torch.Tensor],
    size: tuple[int, int],
    pixels: list[torch.Tensor] | None = None,
    score: str = "map_max",
) -> np.ndarray:
    """The ``score`` (a score of the map alone, :func:`cavga.engine.maps.map_score`) of each image of ``mus``
    (batches, in the memory's fill order) from ``distance``(mu, the indices of the batch's images), which leaves
    those images' own rows out (``pixels``: receives the maps)."""
    scores, seen = [], 0
    with torch.no_grad():
        for mu in mus:
            own = torch.arange(seen, seen + mu.shape[0], device=mu.device)
            maps = upsampled_blur(distance(mu, own), size)
            scores.append(map_score(maps, score))
            if pixels is not None:
                pixels.append(maps.cpu())
            seen += mu.shape[0]
    return torch.cat(scores).double().cpu().numpy()


def can_cross_fit(*datasets: Dataset) -> bool:
    """Enough normal images for two per fold; fewer calibrate on the held-out slice alone."""
    return sum(len(d) for d in datasets) >= 2 * GAUSSIAN_FOLDS


def _require_normal(dataset: Dataset, what: str = "the normal-image statistics") -> None:
    """Refuse a dataset with an anomalous image before any work is done on it, naming the image."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _require_normal(part, what)
        return
    labels = getattr(dataset, "labels", None)
    if labels is None:  # a dataset without the labels attribute: read each sample's
        labels = [dataset[i].label for i in range(len(dataset))]
    bad = [i for i, label in enumerate(labels) if label != NORMAL]
    if bad:
        paths = getattr(dataset, "paths", None)
        name = paths[bad[0]] if paths is not None else f"image {bad[0]}"
        raise ConfigError(f"{what} must use normal images only; got anomalous ones such as {name}")
