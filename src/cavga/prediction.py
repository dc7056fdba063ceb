"""What cavga says about one image: :class:`Prediction`, returned by ``Cavga.predict``, the ONNX inferencer and
the HTTP service alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cavga.metrics import THRESHOLD


@dataclass
class Prediction:
    """What cavga says about one image, under anomalib's names. ``anomaly_map`` and ``pred_mask`` are at the
    model's input size."""

    pred_score: float  # normalized anomaly score in [0, 1]
    pred_label: int  # 1 anomalous (pred_score > 0.5), 0 normal
    anomaly_map: np.ndarray  # (H, W) float32 in [0, 1]
    pred_mask: np.ndarray  # (H, W) bool, anomaly_map > 0.5
    raw_score: float
    path: str | None = None
    original_size: tuple[int, int] | None = None  # (width, height) of the input image


def predictions_from(outputs, original_sizes: Sequence, paths: Sequence | None = None) -> list[Prediction]:
    """One :class:`Prediction` per image of a calibrated ``infer_batch`` result (``Cavga.predict``, the service)."""
    paths = paths if paths is not None else [None] * len(original_sizes)
    return [
        Prediction(
            pred_score=float(outputs.scores[i]),
            pred_label=int(outputs.scores[i] > THRESHOLD),
            anomaly_map=outputs.anomaly_maps[i].astype(np.float32),
            pred_mask=outputs.masks[i],
            raw_score=float(outputs.raw_scores[i]),
            path=paths[i],
            original_size=size,
        )
        for i, size in enumerate(original_sizes)
    ]
