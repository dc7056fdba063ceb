"""The one sample type every reader returns, and how samples are batched."""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMAL = 0
ANOMALOUS = 1


@dataclass(frozen=True)
class Sample:
    """One image of a dataset after preprocessing.

    image: float32 tensor (C, H, W) in [0, 1].
    mask: float32 tensor (1, H, W) with values in {0, 1}, or None when no pixel ground truth exists
        (one-class data, training images). Normal test images of a localization dataset get an all-zero mask.
    label: NORMAL (0) or ANOMALOUS (1).
    defect_type: "good" for normal images, else the defect class name (folder name).
    path: where the image came from (a file path, or "<file>#<index>" for images inside an array file).
    """

    image: torch.Tensor
    mask: torch.Tensor | None
    label: int
    defect_type: str
    path: str


@dataclass
class Batch:
    """Samples stacked for a model. ``has_mask[i]`` is False where sample i had no mask (its row is zeros)."""

    images: torch.Tensor  # (B, C, H, W)
    masks: torch.Tensor  # (B, 1, H, W)
    has_mask: torch.Tensor  # (B,) bool
    labels: torch.Tensor  # (B,) long
    defect_types: list[str]
    paths: list[str]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.images.to(device),
            self.masks.to(device),
            self.has_mask.to(device),
            self.labels.to(device),
            self.defect_types,
            self.paths,
        )


def collate_samples(samples: list[Sample]) -> Batch:
    """DataLoader ``collate_fn`` for lists of :class:`Sample`."""
    images = torch.stack([s.image for s in samples])
    _, _, h, w = images.shape
    masks = torch.stack([s.mask if s.mask is not None else torch.zeros(1, h, w, dtype=torch.float32) for s in samples])
    return Batch(
        images=images,
        masks=masks,
        has_mask=torch.tensor([s.mask is not None for s in samples], dtype=torch.bool),
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        defect_types=[s.defect_type for s in samples],
        paths=[s.path for s in samples],
    )
