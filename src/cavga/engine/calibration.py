"""Calibration of anomaly scores (and of the residual map) on normal images only (SPEC 1.1).

The maths is written once, on tensors (:func:`normalize_score`, :func:`normalize_map`): the inference core and
the exported graph call it with the constants as buffers (:class:`CalibrationConstants`), the numpy edges through
:meth:`Calibration.normalize`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from cavga.errors import ConfigError
from cavga.metrics import THRESHOLD

MAP_QUANTILE = 0.995  # this quantile of the normal images' map pixels maps to THRESHOLD (calibrated maps)
# A deviation map scored by its maximum: in an image called anomalous, a pixel is in the mask where it also reaches
# this fraction of the image's peak (chosen on the demo categories, README "What works and what does not").
MAP_PEAK_FRACTION = 0.5
_TINY = 1e-12


def normalize_score(raw: torch.Tensor, score_min: torch.Tensor | float, spread: torch.Tensor | float) -> torch.Tensor:
    """Raw scores on the [0, 1] scale: ``score_min`` -> 0, ``score_min + spread`` -> THRESHOLD, linear, clipped."""
    return (THRESHOLD * (raw - score_min) / spread).clamp(0.0, 1.0)


def normalize_map(
    residual: torch.Tensor, map_threshold: torch.Tensor | float, peak_fraction: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """A map (B, ..., H, W) on the [0, 1] scale: ``map_threshold`` -> THRESHOLD, linear, clipped.

    With ``peak_fraction`` f > 0 each image is divided by max(map_threshold, f * its peak) instead, so a pixel
    passes THRESHOLD where it exceeds both the threshold and f of its image's peak: an image whose peak stays
    below the threshold reads as before (nothing passes), a strong defect's map peaks at 1 and its mask is the
    region around the peak rather than everything above the threshold."""
    if isinstance(peak_fraction, float) and peak_fraction == 0.0:
        return (THRESHOLD * residual / map_threshold).clamp(0.0, 1.0)
    peak = residual.flatten(1).amax(dim=1).view(-1, *([1] * (residual.dim() - 1)))
    return (THRESHOLD * residual / torch.clamp(peak_fraction * peak, min=map_threshold)).clamp(0.0, 1.0)


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
    # For a calibrated anomaly map (cavga.engine.maps): this raw map value maps to 0.5 (see infer.calibrate).
    map_threshold: float | None = None
    # MAP_QUANTILE of the normal images' residual pixels, for the residual map reported beside the model's own.
    residual_threshold: float | None = None
    # The map's peak fraction (normalize_map); 0 in calibrations written before it existed.
    map_peak_fraction: float = 0.0

    @property
    def spread(self) -> float:
        return max(self.score_threshold - self.score_min, _TINY)

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        scores = torch.from_numpy(np.array(raw, dtype=np.float64, ndmin=1))
        return normalize_score(scores, self.score_min, self.spread).numpy().reshape(np.shape(raw))

    def normalize_map(self, residual: torch.Tensor) -> torch.Tensor:
        if self.map_threshold is None:
            raise ConfigError("this calibration has no map threshold (it was fitted for the attention map)")
        return normalize_map(residual, max(self.map_threshold, _TINY), self.map_peak_fraction)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


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


class CalibrationConstants(nn.Module):
    """A :class:`Calibration` as buffers, for the inference core and the graphs traced from it.

    Scores are normalized in float64, as the numpy edge does. ``None`` (a model not calibrated yet, e.g. while
    training) leaves raw scores in place (clipped to [0, 1]) and clips the residual map instead of scaling it."""

    def __init__(self, calibration: Calibration | None = None) -> None:
        super().__init__()
        score_min, spread = (0.0, THRESHOLD) if calibration is None else (calibration.score_min, calibration.spread)
        self.register_buffer("score_min", torch.tensor(score_min, dtype=torch.float64))
        self.register_buffer("score_spread", torch.tensor(spread, dtype=torch.float64))
        self.calibrated = calibration is not None
        self.has_map_threshold = self.calibrated and calibration.map_threshold is not None
        map_threshold = max(calibration.map_threshold, _TINY) if self.has_map_threshold else 1.0
        self.register_buffer("map_threshold", torch.tensor(map_threshold, dtype=torch.float32))
        peak_fraction = calibration.map_peak_fraction if self.has_map_threshold else 0.0
        self.register_buffer("map_peak_fraction", torch.tensor(peak_fraction, dtype=torch.float32))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return normalize_score(raw.double(), self.score_min, self.score_spread)

    def normalize_map(self, residual: torch.Tensor) -> torch.Tensor:
        if not self.has_map_threshold:
            if self.calibrated:
                raise ConfigError("this calibration has no map threshold (it was fitted for the attention map)")
            return residual.clamp(0.0, 1.0)
        return normalize_map(residual, self.map_threshold, self.map_peak_fraction)
