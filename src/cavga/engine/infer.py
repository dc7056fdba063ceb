"""Inference: one tensor-level core that turns a model and a preprocessed batch into scores, anomaly maps and
masks (SPEC 1.1), and the numpy edges around it (a batch, a dataset, the calibration fit, the metrics).

:func:`infer_tensors` reads the setting and the map choice from ``model.config``. It is a plain tensor computation
(with closed-form Grad-CAM weights it has no backward pass), so the exported graphs trace it as it is; the
TensorBoard images and ``Cavga.predict`` / ``evaluate`` call it too. An anomaly map is one entry of
:data:`ANOMALY_MAPS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from cavga import metrics
from cavga.config import MAP_ONLY_SCORES
from cavga.data.types import collate_samples
from cavga.engine.calibration import (
    MAP_PEAK_FRACTION,
    MAP_QUANTILE,
    Calibration,
    CalibrationConstants,
    fit_calibration,
    normalize_map,
)
from cavga.engine.maps import PAPER_MAP, PAPER_SCORE, anomalous_probability, map_score, map_spec, residual_map

# The fits on normal images live in normal_fits; their names stay importable from here, where they were.
from cavga.engine.normal_fits import (  # noqa: F401
    GAUSSIAN_FOLDS,
    MEMORY_UNIT_QUANTILE,
    NormalVectors,
    _require_normal,
    can_cross_fit,
    cross_fitted_latent_scores,
    fit_latent_gaussian,
    fit_latent_memory,
    fit_trunk_memory,
    left_out_memory_scores,
)
from cavga.engine.progress import advance
from cavga.engine.scores import image_score
from cavga.errors import ConfigError
from cavga.metrics import THRESHOLD
from cavga.model.gradcam import has_closed_form
from cavga.model.networks import CavgaNet


def top_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per image, the mean of the largest ``fraction`` of the map's pixels (at least one)."""
    flat = maps.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def aggregate_score(images: torch.Tensor, x_hat: torch.Tensor, residual: torch.Tensor, config) -> torch.Tensor:
    """s_a of paper 3.1 per image from the residual, aggregated as ``config.score`` says ("top_mean", "mean")."""
    if config.score == "mean":
        return (images - x_hat).abs().flatten(1).mean(1)
    return top_mean(residual, config.score_top_fraction)


@dataclass(frozen=True)
class MapChoice:
    """Which anomaly map and which image score inference computes (by default the model config's own)."""

    anomaly_map: str
    score: str

    @classmethod
    def of(cls, config) -> MapChoice:
        return cls(config.anomaly_map, config.score)


PAPER_CHOICE = MapChoice(PAPER_MAP, PAPER_SCORE)  # the paper-literal map 1 - A and its residual score
WEAK_PAPER_CHOICE = MapChoice(PAPER_MAP, "probability")  # CAVGA_w's: the anomalous class's Grad-CAM, C's probability


def paper_choice(setting: str) -> MapChoice:
    """The paper-literal map and score of ``setting`` "u" or "w"."""
    return WEAK_PAPER_CHOICE if setting == "w" else PAPER_CHOICE


def check_anomaly_map(name: str) -> None:
    map_spec(name)


# ---------------------------------------------------------------------------------------------- the core


@dataclass
class Inference:
    """What :func:`infer_tensors` computes for a batch (tensors on the model's device, detached)."""

    raw_score: torch.Tensor  # (B,) the image score before calibration (u: residual or map max; w: P(anomalous))
    score: torch.Tensor  # (B,) float64, normalized with the calibration; > THRESHOLD is anomalous
    anomaly_map: torch.Tensor  # (B, H, W) in [0, 1]
    mask: torch.Tensor  # (B, H, W) bool, anomaly_map > THRESHOLD
    x_hat: torch.Tensor | None  # (B, C, H, W) reconstruction in [0, 1] (None: not reconstructed)
    residual: torch.Tensor | None  # (B, H, W) blurred |x - x_hat|, not normalized (None: not reconstructed)
    raw_map: torch.Tensor  # (B, H, W) the anomaly map before calibration (its own units)


# Image scores that read no x_hat: with them (and a map that reads none) inference skips the decoder.
SCORES_WITHOUT_RECONSTRUCTION = ("map_max", "map_top1", "probability", "latent_mahalanobis", "kl")


def infer_tensors(
    model: CavgaNet,
    images: torch.Tensor,
    calibration: CalibrationConstants,
    choice: MapChoice | None = None,
    reconstruct: bool = True,
) -> Inference:
    """Score and localize a preprocessed batch (B, C, H, W) in [0, 1] with ``model`` (in eval mode).

    ``choice`` (default: the model config's map and score) picks an entry of
    :data:`cavga.engine.maps.ANOMALY_MAPS`. Uses ``mu`` (no sampling). Where the Grad-CAM weights have no closed
    form (``gradcam_layer="encoder_mid"``) gradients are enabled locally (SPEC 1.4: Grad-CAM needs them at
    inference too), so this also works inside ``torch.no_grad()``; otherwise no backward pass is taken and the
    computation traces as a plain graph.

    ``reconstruct=False`` skips the decoder where neither the map nor the score needs ``x_hat`` (the latent
    Gaussian scored by its maximum: ``Cavga.predict``'s default path); ``x_hat`` and ``residual`` are then None.
    """
    cfg = model.config
    choice = choice or MapChoice.of(cfg)
    spec = map_spec(choice.anomaly_map)
    autograd = not has_closed_form(model)
    decode = reconstruct or spec.needs_reconstruction or choice.score not in SCORES_WITHOUT_RECONSTRUCTION
    with torch.enable_grad() if autograd else nullcontext():
        out = model(images, sample=False, decode=decode)
        if autograd and cfg.setting == "u" and not out.features.requires_grad:
            # Frozen parameters: make the input a leaf so the features are part of a graph again.
            out = model(images.detach().requires_grad_(True), sample=False, decode=decode)
        x_hat = torch.sigmoid(out.x_hat_logits.detach()) if decode else None
        residual = residual_map(images, x_hat) if decode else None
        raw_map = spec.function(model, out, images, x_hat).detach()
        if choice.score == "probability":
            raw = anomalous_probability(model, out)
        elif choice.score in MAP_ONLY_SCORES:
            raw = map_score(raw_map, choice.score)
        elif choice.score == "top_mean":
            raw = aggregate_score(images, x_hat, residual, dataclasses.replace(cfg, score=choice.score))
        else:
            raw = image_score(choice.score)(model, out, images, x_hat)
        anomaly = calibration.normalize_map(raw_map) if spec.calibrated else raw_map
    raw = raw.detach()
    score = calibration.normalize(raw)
    if cfg.setting == "w":
        # Paper 3.2: the decision comes first and the anomalous map "is computed when y = c_a". Where the image is
        # called normal the map is scaled by its score (< 0.5): the mask is empty, the pixel ranking kept.
        gate = score.to(anomaly.dtype).view(-1, 1, 1, 1)
        anomaly = torch.where(gate > THRESHOLD, anomaly, anomaly * gate)
    anomaly = anomaly.detach()[:, 0]
    return Inference(
        raw_score=raw,
        score=score,
        anomaly_map=anomaly,
        mask=anomaly > THRESHOLD,
        x_hat=x_hat,
        residual=None if residual is None else residual.detach()[:, 0],
        raw_map=raw_map[:, 0],
    )


# ---------------------------------------------------------------------------------------------- numpy edges


@dataclass
class BatchOutputs:
    """Raw per-image results of one batch (numpy, on the CPU)."""

    raw_scores: np.ndarray  # (B,) aggregated |x - x_hat| (u) or P(anomalous) from C (w)
    anomaly_maps: np.ndarray  # (B, H, W) in [0, 1]
    reconstructions: np.ndarray | None  # (B, C, H, W) in [0, 1] (None: infer_batch(reconstruct=False))
    residual_maps: np.ndarray | None  # (B, H, W) blurred |x - x_hat|, not normalized (None: the same)
    scores: np.ndarray | None = None  # (B,) normalized with the calibration given to infer_batch
    masks: np.ndarray | None = None  # (B, H, W) bool, anomaly_maps > THRESHOLD
    raw_maps: np.ndarray | None = None  # (B, H, W) the anomaly maps before calibration (None: the same)


def infer_batch(
    model: CavgaNet,
    images: torch.Tensor,
    calibration: Calibration | None = None,
    choice: MapChoice | None = None,
    reconstruct: bool = True,
) -> BatchOutputs:
    """:func:`infer_tensors` on a preprocessed batch, as numpy. With closed-form Grad-CAM weights (the default
    layer) the whole batch runs in inference mode.

    Without ``calibration`` the scores are the raw ones and a ``anomaly_map="residual"`` map is only clipped."""
    model.eval()
    device = next(model.parameters()).device
    constants = CalibrationConstants(calibration).to(device)
    with torch.inference_mode() if has_closed_form(model) else nullcontext():
        result = infer_tensors(model, images, constants, choice, reconstruct)
    return BatchOutputs(
        raw_scores=result.raw_score.cpu().double().numpy(),
        anomaly_maps=result.anomaly_map.cpu().float().numpy(),
        reconstructions=None if result.x_hat is None else result.x_hat.cpu().float().numpy(),
        residual_maps=None if result.residual is None else result.residual.cpu().float().numpy(),
        scores=result.score.cpu().numpy(),
        masks=result.mask.cpu().numpy(),
        raw_maps=result.raw_map.cpu().float().numpy(),
    )


@dataclass
class DatasetOutputs:
    raw_scores: np.ndarray
    anomaly_maps: np.ndarray
    residual_maps: np.ndarray | None  # None: inferred without the decoder (infer_dataset(reconstruct=False))
    masks: np.ndarray
    has_mask: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    paths: list[str]
    raw_maps: np.ndarray | None = None


def collect_outputs(
    dataset: Dataset, run_batch: Callable[[torch.Tensor], BatchOutputs], batch_size: int = 32, device=None
) -> DatasetOutputs:
    """Run ``run_batch`` over ``dataset`` in order and gather its outputs with the ground truth of every image."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    keys = ("raw", "maps", "res", "raw_maps", "masks", "has", "labels", "defects", "paths")
    parts: dict[str, list] = {k: [] for k in keys}
    for batch in loader:
        outputs = run_batch(batch.images.to(device) if device is not None else batch.images)
        parts["raw"].append(outputs.raw_scores)
        parts["maps"].append(outputs.anomaly_maps)
        parts["res"].append(outputs.residual_maps)
        parts["raw_maps"].append(outputs.anomaly_maps if outputs.raw_maps is None else outputs.raw_maps)
        parts["masks"].append(batch.masks[:, 0].numpy() > 0.5)
        parts["has"].append(batch.has_mask.numpy())
        parts["labels"].append(batch.labels.numpy())
        parts["defects"].extend(batch.defect_types)
        parts["paths"].extend(batch.paths)
        advance(len(batch.paths))
    if not parts["raw"]:
        raise ConfigError("no images to run inference on")
    return DatasetOutputs(
        raw_scores=np.concatenate(parts["raw"]),
        anomaly_maps=np.concatenate(parts["maps"]),
        residual_maps=None if any(r is None for r in parts["res"]) else np.concatenate(parts["res"]),
        masks=np.concatenate(parts["masks"]),
        has_mask=np.concatenate(parts["has"]),
        labels=np.concatenate(parts["labels"]),
        defect_types=parts["defects"],
        paths=parts["paths"],
        raw_maps=np.concatenate(parts["raw_maps"]),
    )


def infer_dataset(
    model: CavgaNet,
    dataset: Dataset,
    batch_size: int = 32,
    device: torch.device | None = None,
    calibration: Calibration | None = None,
    choice: MapChoice | None = None,
    reconstruct: bool = True,
) -> DatasetOutputs:
    """:func:`infer_batch` over ``dataset``. ``reconstruct=False``: the decoder runs only where the map or the score
    needs x_hat, and ``residual_maps`` is then None unless it ran."""
    device = device or next(model.parameters()).device

    def run(images: torch.Tensor) -> BatchOutputs:
        return infer_batch(model, images, calibration, choice, reconstruct)

    return collect_outputs(dataset, run, batch_size, device)


CROSS_FITTED = MapChoice("latent_gaussian", "map_max")  # the choice whose scores calibrate cross-fitted
# The choices calibrated on leave-one-image-out scores of the memory's own images.
MEMORY_LEFT_OUT = tuple(
    MapChoice(m, s) for m in ("latent_knn", "knn_classifier", "trunk_knn") for s in ("map_max", "map_top1")
)
# Maps whose mask threshold is a high quantile of normal images' pixels (their own, left-out where the memory holds
# them), apart from the image threshold: the masks of a map tied to the image threshold (and to half its peak)
# cover a fifth of the defects (docs/research/2026-12-06-default-map.md).
PIXEL_QUANTILE_MAPS = ("trunk_knn",)
MASK_QUANTILE = 0.999  # chosen over 0.99-0.9999 and the image threshold (docs/research/2026-12-06-default-map.md)


def calibrate(
    model: CavgaNet,
    normal_dataset: Dataset,
    quantile: float = 0.95,
    batch_size: int = 32,
    choice: MapChoice | None = None,
    training_normals: Dataset | None = None,
    memory_weights: torch.Tensor | None = None,
    training_vectors: NormalVectors | None = None,
) -> Calibration:
    """Fit the calibration of ``choice`` (default: the model's own map and score) on NORMAL images only (a
    held-out slice of the training folder).

    Scores: their smallest raw value -> 0, their ``quantile`` -> 0.5. For the latent Gaussian scored by its
    maximum, given ``training_normals`` (the normal images the Gaussian was fitted on), the scores are instead
    the cross-fitted ones of those images and ``normal_dataset`` together (:func:`cross_fitted_latent_scores`);
    for the latent memory's map, those images scored without their own rows (:func:`left_out_memory_scores`)
    beside the held-out slice's; for ``knn_classifier`` so only given ``memory_weights``, its classifier's weights
    of those images cross-fitted (a classifier weighs the images it was fitted on low; without them: the slice).
    A calibrated map: where the score is the map's maximum ("map_max"), the same threshold, so that a pixel
    passes 0.5 only where its image passes (the mask is empty on every image called normal), and only where it
    reaches MAP_PEAK_FRACTION of its image's peak; otherwise the MAP_QUANTILE of the normal pixels.
    ``training_vectors``: the vectors the memory was filled from (:func:`fit_trunk_memory`'s), which the left-out
    scores then read instead of running the network over ``training_normals`` again."""
    choice = choice or MapChoice.of(model.config)
    _require_normal(normal_dataset, "calibration")
    outputs = infer_dataset(model, normal_dataset, batch_size, choice=choice)
    residual_threshold = float(np.quantile(outputs.residual_maps, MAP_QUANTILE))
    # C's probability too: its 0.5 would mean whatever few labels made it mean; the normal quantile means what it
    # means in setting u (the share of held-out normal images called anomalous).
    raw = outputs.raw_scores
    normal_maps: list[torch.Tensor] = []  # the memory's own images' left-out maps, where it holds them
    if choice == CROSS_FITTED and training_normals is not None and can_cross_fit(training_normals, normal_dataset):
        # The cross-fitted scores (and n_images) include the training images; paths name the held-out slice.
        raw = cross_fitted_latent_scores(model, ConcatDataset([training_normals, normal_dataset]), batch_size)
    elif (
        choice in MEMORY_LEFT_OUT
        and training_normals is not None
        and can_cross_fit(training_normals)
        and (choice.anomaly_map != "knn_classifier" or memory_weights is not None)
    ):
        # The memory's own images scored without their own rows, beside the held-out slice's scores.
        left_out = left_out_memory_scores(
            model,
            training_normals,
            batch_size,
            memory_weights,
            choice.anomaly_map,
            normal_maps,
            training_vectors,
            choice.score,
        )
        raw = np.concatenate([left_out, raw])
    calibration = fit_calibration(raw, quantile, outputs.paths)
    calibration.residual_threshold = residual_threshold
    if map_spec(choice.anomaly_map).calibrated:
        if choice.anomaly_map in PIXEL_QUANTILE_MAPS:
            calibration.map_threshold = mask_threshold([*normal_maps, torch.from_numpy(outputs.raw_maps)])
        elif choice.score == "map_max":
            calibration.map_threshold = calibration.score_threshold
            calibration.map_peak_fraction = MAP_PEAK_FRACTION
        else:
            calibration.map_threshold = float(np.quantile(outputs.raw_maps, MAP_QUANTILE))
    elif choice.score != "probability":
        calibration.map_threshold = residual_threshold  # as before: used for the residual map reported beside
    return calibration


def mask_threshold(normal_maps: list[torch.Tensor]) -> float:
    """The raw map value that the mask threshold 0.5 stands for: the MASK_QUANTILE of every pixel of the normal
    images' maps (each a tensor of any shape), a threshold of the pixels' own, apart from the image threshold."""
    pixels = torch.cat([m.reshape(-1).float().cpu() for m in normal_maps]).numpy()
    return float(np.quantile(pixels, MASK_QUANTILE))


def _ranking(values: np.ndarray) -> np.ndarray:
    """Non-negative raw values on [0, 1] by their maximum: the same order, no clipping (for the AuROCs)."""
    values = np.asarray(values, dtype=np.float64)
    return values / max(float(values.max()), 1e-12) if values.min() >= 0 else values


def evaluate_outputs(
    outputs: DatasetOutputs, calibration: Calibration, anomaly_map: str | None = None, groups: list | None = None
) -> dict:
    """The metrics of ``outputs``. ``anomaly_map="residual"`` scores the calibrated residual map instead of the
    model's own map (for reporting the alternative beside the paper's 1 - A without running inference twice).
    ``groups`` (the object each image shows, :attr:`AnomalyDataset.groups`): also ``per_group``, the image
    metrics of the objects (:func:`cavga.metrics.per_group`).

    The threshold-free metrics (image and pixel AuROC, AUPRO) rank the raw scores and raw maps: calibration
    clips at 1, and a clipped score or pixel ties with every other one above twice its threshold. Balanced
    accuracy and the IoUs use the calibrated values at the 0.5 threshold."""
    scores = calibration.normalize(outputs.raw_scores)
    pred_labels = (scores > THRESHOLD).astype(np.int64)
    maps = outputs.anomaly_maps
    raw_maps = maps if outputs.raw_maps is None else outputs.raw_maps
    if anomaly_map == "residual":
        if outputs.residual_maps is None:
            raise ConfigError(
                "these outputs hold no residual maps (inferred without the decoder): evaluate(..., residual_maps=True)"
            )
        threshold = calibration.residual_threshold or calibration.map_threshold
        maps = normalize_map(torch.from_numpy(outputs.residual_maps), max(threshold, 1e-12)).numpy()
        raw_maps = outputs.residual_maps
    elif anomaly_map not in (None, "model"):
        raise ConfigError(f"anomaly_map must be None, 'model' or 'residual', got {anomaly_map!r}")
    result = metrics.compute_all(
        scores=outputs.raw_scores,
        pred_labels=pred_labels,
        labels=outputs.labels,
        anomaly_maps=_ranking(raw_maps),
        masks=outputs.masks,
        has_mask=outputs.has_mask,
        threshold=THRESHOLD,
    )
    if result["iou"] is not None:
        has = np.asarray(outputs.has_mask, dtype=bool)
        result["iou"] = metrics.iou(maps[has], outputs.masks[has], THRESHOLD, "mean")
        result["iou_pooled"] = metrics.iou(maps[has], outputs.masks[has], THRESHOLD, "pooled")
    if groups is not None:
        result["per_group"] = metrics.per_group(outputs.raw_scores, pred_labels, outputs.labels, groups)
    return result
