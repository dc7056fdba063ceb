"""Inference: anomaly scores, anomaly maps, and their calibration on normal images only (SPEC 1.1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cavga import metrics
from cavga.data.types import ANOMALOUS, NORMAL, collate_samples
from cavga.errors import ConfigError
from cavga.metrics import THRESHOLD
from cavga.model.gradcam import attention_map, class_attention, has_closed_form
from cavga.model.networks import CavgaNet


@dataclass
class Calibration:
    """Maps raw anomaly scores to [0, 1] so that THRESHOLD separates normal from anomalous.

    Fitted on normal images only: ``score_min`` (-> 0) is their smallest raw score, ``score_threshold`` (-> 0.5)
    their ``quantile``-quantile; the map is linear in between and continues with the same slope above, clipped to
    [0, 1]. The paper says only that s_a is "normalized between [0, 1]"; this is our resolution, with no test data.
    """

    score_min: float
    score_threshold: float
    quantile: float
    n_images: int
    paths: list[str] = field(default_factory=list)
    # For the "residual" anomaly map: this quantile of the normal images' residual pixels maps to 0.5.
    map_threshold: float | None = None

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        spread = max(self.score_threshold - self.score_min, 1e-12)
        return np.clip(0.5 * (np.asarray(raw, dtype=np.float64) - self.score_min) / spread, 0.0, 1.0)

    def normalize_map(self, residual: torch.Tensor) -> torch.Tensor:
        if self.map_threshold is None:
            raise ConfigError("this calibration has no map threshold (it was fitted for the attention map)")
        return (0.5 * residual / max(self.map_threshold, 1e-12)).clamp(0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


MAP_QUANTILE = 0.995


def residual_map(images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """|x - x_hat| averaged over channels and box-blurred (kernel ~ 1/16 of the image side): (B, 1, H, W).

    The blur turns single-pixel reconstruction noise of textures into region evidence before aggregating."""
    k = max(3, (images.shape[-1] // 16) | 1)
    residual = (images - x_hat).abs().mean(dim=1, keepdim=True)
    return F.avg_pool2d(residual, k, stride=1, padding=k // 2, count_include_pad=False)


def aggregate_score(images: torch.Tensor, x_hat: torch.Tensor, residual: torch.Tensor, config) -> torch.Tensor:
    """s_a of paper 3.1 per image, aggregated as ``config.score`` says."""
    if config.score == "mean":
        return (images - x_hat).abs().flatten(1).mean(1)
    flat = residual.flatten(1)
    k = max(1, math.ceil(config.score_top_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def fit_calibration(raw_scores: np.ndarray, quantile: float = 0.95, paths: Iterable[str] = ()) -> Calibration:
    raw_scores = np.asarray(raw_scores, dtype=np.float64)
    if raw_scores.size == 0:
        raise ConfigError("calibration needs at least one normal image, got none")
    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"calibration quantile must lie in (0, 1], got {quantile}")
    return Calibration(
        score_min=float(raw_scores.min()),
        score_threshold=float(np.quantile(raw_scores, quantile)),
        quantile=quantile,
        n_images=int(raw_scores.size),
        paths=list(paths),
    )


@dataclass
class BatchOutputs:
    """Raw per-image results of one batch (numpy, on the CPU)."""

    raw_scores: np.ndarray  # (B,) aggregated |x - x_hat| (u) or P(anomalous) from C (w)
    anomaly_maps: np.ndarray  # (B, H, W) in [0, 1]
    reconstructions: np.ndarray  # (B, C, H, W) in [0, 1]
    residual_maps: np.ndarray  # (B, H, W) blurred |x - x_hat|, not normalized


def infer_batch(
    model: CavgaNet, images: torch.Tensor, setting: str, calibration: Calibration | None = None
) -> BatchOutputs:
    """Scores and anomaly maps for a preprocessed batch. Gradients are enabled only for an autograd Grad-CAM
    pass; with closed-form Grad-CAM weights (the default layer) the whole batch runs in inference mode.

    ``calibration`` is needed only for ``anomaly_map="residual"`` models (to put the map on the 0.5 scale)."""
    model.eval()
    if has_closed_form(model, setting):
        with torch.inference_mode():
            return _infer_batch(model, images, setting, calibration)
    return _infer_batch(model, images, setting, calibration)


def _infer_batch(model: CavgaNet, images: torch.Tensor, setting: str, calibration: Calibration | None) -> BatchOutputs:
    if setting == "u":
        attention, out = attention_map(model, images, create_graph=False)
        x_hat = torch.sigmoid(out.x_hat_logits.detach())
        residual = residual_map(images, x_hat)
        raw = aggregate_score(images, x_hat, residual, model.config)
        if model.config.anomaly_map == "residual" and calibration is not None:
            anomaly = calibration.normalize_map(residual)
        elif model.config.anomaly_map == "residual":
            anomaly = residual.clamp(0.0, 1.0)
        else:
            anomaly = 1.0 - attention  # SPEC 1.1: the anomaly is where the attention is not
    elif setting == "w":
        # Inference mode means closed-form weights (see infer_batch); autograd Grad-CAM needs gradients.
        with nullcontext() if torch.is_inference_mode_enabled() else torch.enable_grad():
            out = model(images, sample=False)
            logits = model.classify(out.z)
            # Paper 3.2: the anomalous map is the Grad-CAM of the anomalous class on z.
            attention = class_attention(model, out, ANOMALOUS, create_graph=False)
        x_hat = torch.sigmoid(out.x_hat_logits.detach())
        residual = residual_map(images, x_hat)
        raw = torch.softmax(logits.detach(), dim=1)[:, ANOMALOUS]
        # Paper 3.2: C decides first, and the anomalous map "is computed when y = c_a". Where C says normal
        # (P(anomalous) <= 0.5) the map is scaled by that probability: below the 0.5 threshold everywhere, so
        # the mask is empty as the paper's decision implies, while the heat map keeps its pixel ranking.
        says_anomalous = (raw > THRESHOLD).view(-1, 1, 1, 1)
        anomaly = torch.where(says_anomalous, attention, attention * raw.view(-1, 1, 1, 1))
    else:
        raise ConfigError(f"setting must be 'u' or 'w', got {setting!r}")
    return BatchOutputs(
        raw_scores=raw.detach().cpu().double().numpy(),
        anomaly_maps=anomaly.detach()[:, 0].cpu().float().numpy(),
        reconstructions=x_hat.cpu().float().numpy(),
        residual_maps=residual.detach()[:, 0].cpu().float().numpy(),
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
    setting: str,
    batch_size: int = 32,
    device: torch.device | None = None,
    calibration: Calibration | None = None,
) -> DatasetOutputs:
    device = device or next(model.parameters()).device
    return collect_outputs(dataset, lambda images: infer_batch(model, images, setting, calibration), batch_size, device)


def calibrate(
    model: CavgaNet, normal_dataset: Dataset, setting: str, quantile: float = 0.95, batch_size: int = 32
) -> Calibration:
    """Fit the score calibration on a dataset of NORMAL images only (a held-out slice of the training folder)."""
    outputs = infer_dataset(model, normal_dataset, setting, batch_size)
    if (outputs.labels != NORMAL).any():
        bad = [p for p, label in zip(outputs.paths, outputs.labels, strict=True) if label != NORMAL]
        raise ConfigError(f"calibration must use normal images only; got anomalous ones such as {bad[0]}")
    if setting == "w":
        # C's probability is already in [0, 1] with 0.5 its decision boundary: keep it as it is.
        return Calibration(0.0, 0.5, quantile, len(outputs.paths), outputs.paths)
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
