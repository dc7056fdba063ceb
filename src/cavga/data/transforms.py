"""Deterministic preprocessing: resize, channel conversion, [0, 1] tensors; masks resized nearest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cavga.data.io import to_gray_or_rgb
from cavga.errors import ConfigError

MASK_THRESHOLD = 128  # mask pixels >= 128 (of 255) are anomalous; anti-aliased edges split at the middle


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input.

    image_size: (H, W), an int for a square, or None to keep each file's size.
    channels: 1 (luminance "L"), 3 ("RGB"), or None to keep the file's own channel count.
    Images are resized bilinear (PIL's antialiased resize), masks nearest; no randomness.
    """

    image_size: int | tuple[int, int] | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        size = self.image_size
        if size is not None:
            if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
                size = (int(size), int(size))
            elif isinstance(size, (tuple, list)) and len(size) == 2:
                size = (int(size[0]), int(size[1]))
            else:
                raise ConfigError(f"image_size must be an int, a pair (H, W) or None, got {self.image_size!r}")
            if min(size) <= 0:
                raise ConfigError(f"image_size must be positive, got {self.image_size!r}")
            object.__setattr__(self, "image_size", size)
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1, 3 or None, got {self.channels!r}")

    def _convert(self, image: Image.Image) -> Image.Image:
        image = to_gray_or_rgb(image)
        if self.channels == 1 and image.mode != "L":
            image = image.convert("L")
        elif self.channels == 3 and image.mode != "RGB":
            image = image.convert("RGB")
        return image

    def _target_size(self, image: Image.Image) -> tuple[int, int] | None:
        """PIL (W, H) to resize to, or None when no resize is needed."""
        if self.image_size is None:
            return None
        h, w = self.image_size
        return None if image.size == (w, h) else (w, h)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float32 tensor (C, H, W) in [0, 1]."""
        image = self._convert(image)
        size = self._target_size(image)
        if size is not None:
            image = image.resize(size, Image.Resampling.BILINEAR)
        arr = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(arr)
        return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """PIL mask -> float32 tensor (1, H, W) in {0, 1}: resized nearest, then pixels >= 128 are 1."""
        if mask.mode != "L":
            mask = to_gray_or_rgb(mask)
            if mask.mode == "RGB":
                mask = Image.fromarray(np.asarray(mask).max(axis=2))
        size = self._target_size(mask)
        if size is not None:
            mask = mask.resize(size, Image.Resampling.NEAREST)
        arr = (np.asarray(mask) >= MASK_THRESHOLD).astype(np.float32)
        return torch.from_numpy(arr).unsqueeze(0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for a saved model's config."""
        return {
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of to_dict; unknown keys are a ConfigError."""
        unknown = set(d) - {"image_size", "channels"}
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {sorted(unknown)}; known: ['channels', 'image_size']")
        size = d.get("image_size")
        return cls(image_size=tuple(size) if isinstance(size, list) else size, channels=d.get("channels"))
