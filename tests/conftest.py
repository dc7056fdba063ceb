"""Shared fixtures: the real data folder (or a skip) and writers of tiny image/mask files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository, or skip when this machine does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repository)")
    return SHARED_DATA


def write_image(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """Write a random image of PIL ``size`` (W, H) and ``mode``; returns its uint8 pixels."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return pixels


def write_mask(
    path: Path, size: tuple[int, int] = (8, 6), box: tuple[int, int, int, int] | None = (1, 1, 3, 4)
) -> np.ndarray:
    """Write a 0/255 mask of PIL ``size`` (W, H), foreground in ``box`` = (x0, y0, x1, y1) exclusive;
    returns the expected {0, 1} array (H, W)."""
    w, h = size
    binary = np.zeros((h, w), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        binary[y0:y1, x0:x1] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(binary * 255).save(path)
    return binary


@pytest.fixture
def image_writer() -> Callable[..., np.ndarray]:
    return write_image


@pytest.fixture
def mask_writer() -> Callable[..., np.ndarray]:
    return write_mask
