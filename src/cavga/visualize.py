"""Pictures for people: colour heat maps of anomaly maps and binary mask images."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered dark-blue -> cyan -> yellow -> red ramp (a "turbo"-like scale).
_ANCHORS = np.array(
    [
        [48, 18, 59],
        [70, 107, 227],
        [40, 187, 236],
        [50, 241, 153],
        [164, 252, 60],
        [237, 208, 58],
        [251, 128, 34],
        [210, 49, 5],
        [122, 4, 3],
    ],
    dtype=np.float64,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map an (H, W) array in [0, 1] to an (H, W, 3) uint8 colour image."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_ANCHORS) - 1)
    t = (v - lo)[..., None]
    return np.round(_ANCHORS[lo] * (1 - t) + _ANCHORS[hi] * t).astype(np.uint8)


def resize_map(values: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Bilinear resize of an (H, W) float map to ``size`` = (width, height); None keeps it."""
    if size is None or (values.shape[1], values.shape[0]) == tuple(size):
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def heatmap_image(anomaly_map: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    return Image.fromarray(colorize(resize_map(anomaly_map, size)))


def mask_image(anomaly_map: np.ndarray, threshold: float = 0.5, size: tuple[int, int] | None = None) -> Image.Image:
    return Image.fromarray(((resize_map(anomaly_map, size) > threshold) * 255).astype(np.uint8), mode="L")
