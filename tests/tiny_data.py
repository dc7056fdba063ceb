"""Tiny datasets written on the fly for the API and CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_tiny_mvtec(root: Path, seed: int = 0, test_value: int | None = None) -> Path:
    """bottle/train/good (12), test/good (3), test/spot (3) with masks. ``test_value`` fills every test image."""
    rng = np.random.default_rng(seed)
    cat = root / "bottle"
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (cat / sub).mkdir(parents=True, exist_ok=True)

    def normal():
        base = np.full((40, 40, 3), 120, np.uint8)
        return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)

    for i in range(12):
        Image.fromarray(normal()).save(cat / "train/good" / f"{i:03d}.png")
    for i in range(3):
        img = normal() if test_value is None else np.full((40, 40, 3), test_value, np.uint8)
        Image.fromarray(img).save(cat / "test/good" / f"{i:03d}.png")
        img = normal() if test_value is None else np.full((40, 40, 3), test_value, np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 12:22] = 255
        img[mask > 0] = [250, 10, 10]
        Image.fromarray(img).save(cat / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(cat / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


class ListDataset(torch.utils.data.Dataset):
    """Samples held in memory, with the ``labels`` attribute the training loop reads."""

    def __init__(self, samples):
        self.samples = samples
        self.labels = [s.label for s in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def write_tiny_model(root: Path) -> Path:
    """A tiny CAVGA-D_u (32 px, one epoch) fitted on :func:`write_tiny_mvtec` data under ``root / "data"`` and
    saved to ``root / "model"``, whose path is returned (the data stays beside it)."""
    import cavga

    write_tiny_mvtec(root / "data")
    detector = cavga.Cavga(
        "D", "u", image_size=32, width=8, latent_channels=8, epochs=1, batch_size=4, device="cpu"
    ).fit(root / "data", progress=False)
    return detector.save(root / "model")
