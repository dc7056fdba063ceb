"""Inference: one tensor-level core that turns a model and a preprocessed batch into scores, anomaly maps and
masks (SPEC 1.1), and the numpy edges around it (a batch, a dataset, the calibration fit, the metrics).

:func:`infer_tensors` reads the setting and the map choice from ``model.config``. It is a plain tensor computation
(with closed-form Grad-CAM weights it has no backward pass), so the exported graphs trace it as it is; the
TensorBoard images and ``Cavga.predict`` / ``evaluate`` call it too. An anomaly map is one entry of
:data:`ANOMALY_MAPS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cavga import metrics
from cavga.data.types import ANOMALOUS, NORMAL, collate_samples
from cavga.engine.calibration import MAP_QUANTILE, Calibration, CalibrationConstants, fit_calibration
from cavga.errors import ConfigError
from cavga.metrics import THRESHOLD
from cavga.model.gradcam import class_attention, has_closed_form, output_attention
from cavga.model.networks import CavgaNet, CavgaOutput


def residual_map(images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """|x - x_hat| averaged over channels and box-blurred (kernel ~ 1/16 of the image side): (B, 1, H, W).

    The blur turns single-pixel reconstruction noise of textures into region evidence before aggregating."""
    k = max(3, (images.shape[-1] // 16) | 1)
    residual = (images - x_hat).abs().mean(dim=1, keepdim=True)
    return F.avg_pool2d(residual, k, stride=1, padding=k // 2, count_include_pad=False)


def top_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per image, the mean of the largest ``fraction`` of the map's pixels (at least one)."""
    flat = maps.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def aggregate_score(images: torch.Tensor, x_hat: torch.Tensor, residual: torch.Tensor, config) -> torch.Tensor:
    """s_a of paper 3.1 per image, aggregated as ``config.score`` says."""
    if config.score == "mean":
        return (images - x_hat).abs().flatten(1).mean(1)
    return top_mean(residual, config.score_top_fraction)


def anomalous_probability(model: CavgaNet, out: CavgaOutput) -> torch.Tensor:
    """CAVGA_w: C's probability (B,) that each image is anomalous (its decision boundary is THRESHOLD)."""
    return torch.softmax(model.classify(out.z).detach(), dim=1)[:, ANOMALOUS]


# ---------------------------------------------------------------------------------------------- anomaly maps
# Each map is a function of (model, forward output, images, x_hat, calibration constants) -> (B, 1, H, W) in [0, 1].


def attention_anomaly_map(
    model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor, calibration: CalibrationConstants
) -> torch.Tensor:
    """The paper's map. CAVGA_u: 1 - A (SPEC 1.1: the anomaly is where the attention is not). CAVGA_w: the
    Grad-CAM of the anomalous class on z (paper 3.2), gated by C's decision."""
    if model.config.setting == "u":
        return 1.0 - output_attention(model, out, tuple(images.shape[-2:]), create_graph=False)
    attention = class_attention(model, out, ANOMALOUS, create_graph=False)
    # Paper 3.2: C decides first, and the anomalous map "is computed when y = c_a". Where C says normal
    # (P(anomalous) <= 0.5) the map is scaled by that probability: below the 0.5 threshold everywhere, so
    # the mask is empty as the paper's decision implies, while the heat map keeps its pixel ranking.
    p = anomalous_probability(model, out).view(-1, 1, 1, 1)
    return torch.where(p > THRESHOLD, attention, attention * p)


def residual_anomaly_map(
    model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor, calibration: CalibrationConstants
) -> torch.Tensor:
    """The blurred residual |x - x_hat|, its MAP_QUANTILE on normal images mapped to THRESHOLD."""
    return calibration.normalize_map(residual_map(images, x_hat))


AnomalyMap = Callable[[CavgaNet, CavgaOutput, torch.Tensor, torch.Tensor, CalibrationConstants], torch.Tensor]
ANOMALY_MAPS: dict[str, AnomalyMap] = {"attention": attention_anomaly_map, "residual": residual_anomaly_map}


def check_anomaly_map(name: str) -> None:
    if name not in ANOMALY_MAPS:
        raise ConfigError(f"anomaly_map must be one of {', '.join(map(repr, ANOMALY_MAPS))}, got {name!r}")


def _map_name(config) -> str:
    # ``anomaly_map`` chooses among CAVGA_u's maps; CAVGA_w's map is always C's class attention (paper 3.2).
    check_anomaly_map(config.anomaly_map)
    return config.anomaly_map if config.setting == "u" else "attention"


# ---------------------------------------------------------------------------------------------- the core


@dataclass
class Inference:
    """What :func:`infer_tensors` computes for a batch (tensors on the model's device, detached)."""

    raw_score: torch.Tensor  # (B,) aggregated |x - x_hat| (u) or P(anomalous) from C (w)
    score: torch.Tensor  # (B,) float64, normalized with the calibration; > THRESHOLD is anomalous
    anomaly_map: torch.Tensor  # (B, H, W) in [0, 1]
    mask: torch.Tensor  # (B, H, W) bool, anomaly_map > THRESHOLD
    x_hat: torch.Tensor  # (B, C, H, W) reconstruction in [0, 1]
    residual: torch.Tensor  # (B, H, W) blurred |x - x_hat|, not normalized


def infer_tensors(model: CavgaNet, images: torch.Tensor, calibration: CalibrationConstants) -> Inference:
    """Score and localize a preprocessed batch (B, C, H, W) in [0, 1] with ``model`` (in eval mode).

    Uses ``mu`` (no sampling). Where the Grad-CAM weights have no closed form (``gradcam_layer="encoder_mid"``)
    gradients are enabled locally (SPEC 1.4: Grad-CAM needs them at inference too), so this also works inside
    ``torch.no_grad()``; otherwise no backward pass is taken and the computation traces as a plain graph.
    """
    cfg = model.config
    autograd = not has_closed_form(model)
    with torch.enable_grad() if autograd else nullcontext():
        out = model(images, sample=False)
        if autograd and cfg.setting == "u" and not out.features.requires_grad:
            # Frozen parameters: make the input a leaf so the features are part of a graph again.
            out = model(images.detach().requires_grad_(True), sample=False)
        x_hat = torch.sigmoid(out.x_hat_logits.detach())
        residual = residual_map(images, x_hat)
        if cfg.setting == "u":
            raw = aggregate_score(images, x_hat, residual, cfg)
        else:
            raw = anomalous_probability(model, out)
        anomaly = ANOMALY_MAPS[_map_name(cfg)](model, out, images, x_hat, calibration).detach()[:, 0]
    raw = raw.detach()
    return Inference(
        raw_score=raw,
        score=calibration.normalize(raw),
        anomaly_map=anomaly,
        mask=anomaly > THRESHOLD,
        x_hat=x_hat,
        residual=residual.detach()[:, 0],
    )


# ---------------------------------------------------------------------------------------------- numpy edges


@dataclass
class BatchOutputs:
    """Raw per-image results of one batch (numpy, on the CPU)."""

    raw_scores: np.ndarray  # (B,) aggregated |x - x_hat| (u) or P(anomalous) from C (w)
    anomaly_maps: np.ndarray  # (B, H, W) in [0, 1]
    reconstructions: np.ndarray  # (B, C, H, W) in [0, 1]
    residual_maps: np.ndarray  # (B, H, W) blurred |x - x_hat|, not normalized
    scores: np.ndarray | None = None  # (B,) normalized with the calibration given to infer_batch
    masks: np.ndarray | None = None  # (B, H, W) bool, anomaly_maps > THRESHOLD


def infer_batch(model: CavgaNet, images: torch.Tensor, calibration: Calibration | None = None) -> BatchOutputs:
    """:func:`infer_tensors` on a preprocessed batch, as numpy. With closed-form Grad-CAM weights (the default
    layer) the whole batch runs in inference mode.

    Without ``calibration`` the scores are the raw ones and a ``anomaly_map="residual"`` map is only clipped."""
    model.eval()
    device = next(model.parameters()).device
    constants = CalibrationConstants(calibration).to(device)
    with torch.inference_mode() if has_closed_form(model) else nullcontext():
        result = infer_tensors(model, images, constants)
    return BatchOutputs(
        raw_scores=result.raw_score.cpu().double().numpy(),
        anomaly_maps=result.anomaly_map.cpu().float().numpy(),
        reconstructions=result.x_hat.cpu().float().numpy(),
        residual_maps=result.residual.cpu().float().numpy(),
        scores=result.score.cpu().numpy(),
        masks=result.mask.cpu().numpy(),
    )


@dataclass
class DatasetOutputs:
    raw_scores: np.ndarray
    anomaly_maps: np.ndarray
    residual_maps: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    paths: list[str]


def collect_outputs(
    dataset: Dataset, run_batch: Callable[[torch.Tensor], BatchOutputs], batch_size: int = 32, device=None
) -> DatasetOutputs:
    """Run ``run_batch`` over ``dataset`` in order and gather its outputs with the ground truth of every image."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    parts: dict[str, list] = {k: [] for k in ("raw", "maps", "res", "masks", "has", "labels", "defects", "paths")}
    for batch in loader:
        outputs = run_batch(batch.images.to(device) if device is not None else batch.images)
        parts["raw"].append(outputs.raw_scores)
        parts["maps"].append(outputs.anomaly_maps)
        parts["res"].append(outputs.residual_maps)
        parts["masks"].append(batch.masks[:, 0].numpy() > 0.5)
        parts["has"].append(batch.has_mask.numpy())
        parts["labels"].append(batch.labels.numpy())
        parts["defects"].extend(batch.defect_types)
        parts["paths"].extend(batch.paths)
    if not parts["raw"]:
        raise ConfigError("no images to run inference on")
    return DatasetOutputs(
        raw_scores=np.concatenate(parts["raw"]),
        anomaly_maps=np.concatenate(parts["maps"]),
        residual_maps=np.concatenate(parts["res"]),
        masks=np.concatenate(parts["masks"]),
        has_mask=np.concatenate(parts["has"]),
        labels=np.concatenate(parts["labels"]),
        defect_types=parts["defects"],
        paths=parts["paths"],
    )


def infer_dataset(
    model: CavgaNet,
    dataset: Dataset,
    batch_size: int = 32,
    device: torch.device | None = None,
    calibration: Calibration | None = None,
) -> DatasetOutputs:
    device = device or next(model.parameters()).device
    return collect_outputs(dataset, lambda images: infer_batch(model, images, calibration), batch_size, device)


def calibrate(model: CavgaNet, normal_dataset: Dataset, quantile: float = 0.95, batch_size: int = 32) -> Calibration:
    """Fit the score calibration on a dataset of NORMAL images only (a held-out slice of the training folder)."""
    outputs = infer_dataset(model, normal_dataset, batch_size)
    if (outputs.labels != NORMAL).any():
        bad = [p for p, label in zip(outputs.paths, outputs.labels, strict=True) if label != NORMAL]
        raise ConfigError(f"calibration must use normal images only; got anomalous ones such as {bad[0]}")
    if model.config.setting == "w":
        # C's probability is already in [0, 1] with THRESHOLD its decision boundary: keep it as it is.
        return Calibration(0.0, THRESHOLD, quantile, len(outputs.paths), outputs.paths)
    calibration = fit_calibration(outputs.raw_scores, quantile, outputs.paths)
    calibration.map_threshold = float(np.quantile(outputs.residual_maps, MAP_QUANTILE))
    return calibration


def evaluate_outputs(outputs: DatasetOutputs, calibration: Calibration, anomaly_map: str | None = None) -> dict:
    """The metrics of ``outputs``. ``anomaly_map="residual"`` scores the calibrated residual map instead of the
    model's own map (for reporting the alternative beside the paper's 1 - A without running inference twice)."""
    scores = calibration.normalize(outputs.raw_scores)
    pred_labels = (scores > THRESHOLD).astype(np.int64)
    maps = outputs.anomaly_maps
    if anomaly_map == "residual":
        maps = calibration.normalize_map(torch.from_numpy(outputs.residual_maps)).numpy()
    elif anomaly_map not in (None, "model"):
        raise ConfigError(f"anomaly_map must be None, 'model' or 'residual', got {anomaly_map!r}")
    result = metrics.compute_all(
        scores=scores,
        pred_labels=pred_labels,
        labels=outputs.labels,
        anomaly_maps=maps,
        masks=outputs.masks,
        has_mask=outputs.has_mask,
        threshold=THRESHOLD,
    )
    return result
