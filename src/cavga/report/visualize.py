"""Pictures for people: colour heat maps of anomaly maps, binary mask images and overlays with contours."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from cavga.metrics import THRESHOLD

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


def map_image(anomaly_map: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """The map as an 8-bit grayscale image, round(255 * clip(map, 0, 1)), as the service's ``anomaly_map_png``."""
    values = np.clip(np.nan_to_num(resize_map(anomaly_map, size)), 0.0, 1.0)
    return Image.fromarray(np.round(values * 255).astype(np.uint8))  # 2-D uint8: mode L


def mask_image(
    anomaly_map: np.ndarray, threshold: float = THRESHOLD, size: tuple[int, int] | None = None
) -> Image.Image:
    return Image.fromarray(((resize_map(anomaly_map, size) > threshold) * 255).astype(np.uint8), mode="L")


PRED_CONTOUR = (255, 255, 255)  # white: not on the heat-map ramp, readable over every colour of it
TRUE_CONTOUR = (255, 0, 255)  # magenta: ground truth, also off the ramp


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The boundary pixels of a binary (H, W) mask: the mask XOR its erosion (``thickness`` erosion steps).

    Pixels on the image border count as boundary (the outside is treated as background)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    eroded = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask ^ eroded


def overlay_image(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    true_mask: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    alpha: float = 0.45,
    max_side: int | None = 512,
) -> Image.Image:
    """The input with the anomaly map blended in as colour, the predicted mask's contour (white) and, when
    given, the ground-truth contour (magenta).

    Drawn at the image's own size (shrunk so its longer side is at most ``max_side``); the map is resized
    bilinear and thresholded at that size, so the contour is the one of ``mask_image`` at that size.
    """
    base = image if isinstance(image, Image.Image) else Image.fromarray(_to_uint8(image))
    base = base.convert("RGB")
    if max_side is not None and max(base.size) > max_side:
        scale = max_side / max(base.size)
        base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))), Image.BILINEAR)
    values = resize_map(np.asarray(anomaly_map, dtype=np.float32), base.size)
    pixels = np.asarray(base, dtype=np.float64)
    blended = (1 - alpha) * pixels + alpha * colorize(values).astype(np.float64)
    out = np.round(blended).astype(np.uint8)
    thickness = max(1, round(max(base.size) / 256))
    out[contour(values > threshold, thickness)] = PRED_CONTOUR
    if true_mask is not None:
        gt = Image.fromarray(np.asarray(true_mask, dtype=bool).astype(np.uint8) * 255, mode="L")
        gt = np.asarray(gt.resize(base.size, Image.NEAREST)) >= 128
        out[contour(gt, thickness)] = TRUE_CONTOUR
    return Image.fromarray(out)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1|3) or (C, H, W) with C in 1, 3; float in [0, 1] or uint8 -> (H, W) / (H, W, 3) uint8."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8:
        array = np.round(np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255).astype(np.uint8)
    return array
