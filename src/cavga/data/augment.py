"""CAVGA_w's extra anomalous training examples: augmented copies of the few labelled defect images and, beyond the
paper, anomalies synthesized on normal training images.

Both are datasets of :class:`~cavga.data.types.Sample` that training concatenates after the normal images
(:func:`cavga.data.splits.weak_training_set`); evaluation and calibration never read them. Every example is a
function of (seed, index) alone, so that an epoch is the same in every process and after a resume.

* :class:`AugmentedCopies`: each labelled image ``copies`` times, the first as it is, the others flipped, turned
  by multiples of 90 degrees (square images), shifted by up to 1/8 of a side (reflected at the border) and
  jittered in brightness and contrast (up to 10 %). Such changes leave a defect a defect.
* :class:`SyntheticAnomalies`: a normal training image with a small region replaced (0.2-3 % of its area): a
  patch cut from another normal image at another place, brightness-shifted ("cut-and-paste", as CutPaste), or
  a blob of blurred noise ("noise blob"). Labelled anomalous, no mask (weak supervision sees none).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cavga.data.types import ANOMALOUS, Sample

MAX_SHIFT = 1 / 8  # largest shift of an augmented copy, as a share of the image side
JITTER = 0.1  # largest brightness offset and contrast change of an augmented copy
AREA_RANGE = (0.002, 0.03)  # share of the image a synthesized anomaly covers
ASPECT_RANGE = (0.3, 3.3)  # its height / width


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _synthetic_path(path: str, index: int) -> str:
    """Where synthesized example ``index`` came from: its normal image's path, marked."""
    return f"{path}#synthetic{index}"


def augment(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One random augmentation of ``image`` (C, H, W) in [0, 1]: flips, a 90-degree turn (square images), a
    reflected shift and a brightness/contrast jitter; the result is (C, H, W) in [0, 1]."""
    out = image
    if rng.random() < 0.5:
        out = out.flip(-1)
    if rng.random() < 0.5:
        out = out.flip(-2)
    if out.shape[-1] == out.shape[-2]:
        out = torch.rot90(out, int(rng.integers(4)), dims=(-2, -1))
    h, w = out.shape[-2:]
    dy, dx = (int(rng.integers(-int(s * MAX_SHIFT), int(s * MAX_SHIFT) + 1)) for s in (h, w))
    if dy or dx:
        pad = (abs(dx), abs(dx), abs(dy), abs(dy))
        padded = F.pad(out.unsqueeze(0), pad, mode="reflect")[0]
        top, left = abs(dy) - dy, abs(dx) - dx
        out = padded[:, top : top + h, left : left + w]
    contrast = 1.0 + rng.uniform(-JITTER, JITTER)
    brightness = rng.uniform(-JITTER, JITTER)
    mean = out.mean()
    return ((out - mean) * contrast + mean + brightness).clamp(0.0, 1.0).contiguous()


def _box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random box (top, left, height, width) inside an h x w image with the area and aspect ranges above."""
    area = rng.uniform(*AREA_RANGE) * h * w
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    bh = int(min(h, max(2, round(math.sqrt(area * aspect)))))
    bw = int(min(w, max(2, round(math.sqrt(area / aspect)))))
    return int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1)), bh, bw


def cut_paste(image: torch.Tensor, source: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` with a box of ``source`` (same shape) pasted at another random place, its brightness shifted by
    up to 20 %. Returns the new image and the (1, H, W) mask of the changed region."""
    h, w = image.shape[-2:]
    top, left, bh, bw = _box(h, w, rng)
    src_top, src_left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
    patch = source[:, src_top : src_top + bh, src_left : src_left + bw]
    patch = (patch + rng.uniform(-0.2, 0.2)).clamp(0.0, 1.0)
    out = image.clone()
    out[:, top : top + bh, left : left + bw] = patch
    mask = torch.zeros(1, h, w)
    mask[:, top : top + bh, left : left + bw] = 1.0
    return out, mask


def noise_blob(image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` with a soft-edged blob of blurred noise (a random grey level or colour) in a random box.
    Returns the new image and the (1, H, W) mask where the blob covers more than half."""
    c, h, w = image.shape
    top, left, bh, bw = _box(h, w, rng)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    noise = torch.rand(1, 1, bh, bw, generator=generator)
    k = max(3, (min(bh, bw) // 3) | 1)
    smooth = F.avg_pool2d(noise, k, stride=1, padding=k // 2, count_include_pad=False)[0]
    # An ellipse inside the box, its edge broken up by the smoothed noise.
    ys, xs = ((torch.arange(n) + 0.5) / n * 2.0 - 1.0 for n in (bh, bw))  # cell centres on (-1, 1)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    alpha = ((1.0 - (yy**2 + xx**2)) * 2.0 + (smooth - 0.5) * 2.0).clamp(0.0, 1.0)
    colour = torch.tensor(rng.uniform(0.0, 1.0, size=c), dtype=image.dtype).view(c, 1, 1)
    texture = (colour + (torch.rand(c, bh, bw, generator=generator) - 0.5) * 0.3).clamp(0.0, 1.0)
    out = image.clone()
    region = out[:, top : top + bh, left : left + bw]
    out[:, top : top + bh, left : left + bw] = region * (1.0 - alpha) + texture * alpha
    mask = torch.zeros(1, h, w)
    mask[:, top : top + bh, left : left + bw] = (alpha > 0.5).float()
    return out, mask


def synthesize(
    image: torch.Tensor, source: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthesized anomaly on ``image``: cut-and-paste from ``source`` or a noise blob, with equal odds."""
    if rng.random() < 0.5:
        return cut_paste(image, source, rng)
    return noise_blob(image, rng)


class AugmentedCopies(Dataset):
    """Every sample of ``dataset`` ``copies`` times: index i is sample i % n, as it is for i < n, else augmented
    (:func:`augment`, seeded by (seed, i))."""

    def __init__(self, dataset, copies: int, seed: int) -> None:
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.dataset, self.copies, self.seed = dataset, copies, seed

    def __len__(self) -> int:
        return len(self.dataset) * self.copies

    @property
    def labels(self) -> list[int]:
        return list(self.dataset.labels) * self.copies

    @property
    def paths(self) -> list[str]:
        return list(self.dataset.paths) * self.copies

    def __getitem__(self, index: int) -> Sample:
        n = len(self.dataset)
        sample = self.dataset[index % n]
        if index < n:
            return sample
        return dataclasses.replace(sample, image=augment(sample.image, _rng(self.seed, index)))


class SyntheticAnomalies(Dataset):
    """``count`` anomalous samples synthesized on the normal images of ``normal`` (:func:`synthesize`): index i
    alters normal image i % n with a region of another one, both chosen by (seed, i)."""

    def __init__(self, normal, count: int, seed: int) -> None:
        if len(normal) < 2:
            raise ValueError("synthesized anomalies need at least 2 normal images")
        self.normal, self.count, self.seed = normal, count, seed

    def __len__(self) -> int:
        return self.count

    @property
    def labels(self) -> list[int]:
        return [ANOMALOUS] * self.count

    @property
    def paths(self) -> list[str]:
        paths = self.normal.paths
        return [_synthetic_path(paths[i % len(paths)], i) for i in range(self.count)]

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        n = len(self.normal)
        rng = _rng(self.seed, index)
        base = self.normal[index % n]
        other = (index % n + 1 + int(rng.integers(n - 1))) % n
        image, _ = synthesize(base.image, self.normal[other].image, rng)
        path = _synthetic_path(base.path, index)
        return Sample(image=image, mask=None, label=ANOMALOUS, defect_type="synthetic", path=path)
