"""The lazy dataset every reader builds, and the train/test pair readers return."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cavga.data.io import image_header_channels, load_image, load_mask
from cavga.data.transforms import Preprocess
from cavga.data.types import ANOMALOUS, NORMAL, Sample
from cavga.errors import ConfigError, DataError


@dataclass(frozen=True)
class Record:
    """Where one sample comes from, before anything is decoded.

    image: an image file, or an index into the dataset's in-memory uint8 array (IDX, CIFAR).
    mask: a mask file, or None. zero_mask: no file, but the sample has an all-zero mask (a normal test
    image of a localization dataset). path: the string reported in Sample.path. group: the physical object the
    image shows where a dataset photographs one object several times (Magnetic Tile's tiles, each under six
    exposures), else None; a split or an exclusion keeps a group together.
    """

    image: Path | int
    label: int
    defect_type: str
    path: str
    mask: Path | None = None
    zero_mask: bool = False
    group: str | None = None


class AnomalyDataset(torch.utils.data.Dataset):
    """A list of records, decoded and preprocessed one at a time in ``__getitem__``.

    ``array``: uint8 images (N, H, W) or (N, H, W, 3) that integer record images index into.
    ``memo``: a dict that keeps every decoded, preprocessed sample by record, so that each file is decoded once
    however many epochs read it (benchmarks train many models on one category); shared with :meth:`subset`.
    None (default) decodes on every access and holds nothing in memory.
    """

    def __init__(
        self,
        records: Sequence[Record],
        preprocess: Preprocess | None = None,
        array: np.ndarray | None = None,
        memo: dict[Record, Sample] | None = None,
    ) -> None:
        self.records = list(records)
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.array = array
        self.memo = memo
        if any(isinstance(r.image, int) for r in self.records) and array is None:
            raise ConfigError("records index an in-memory image array, but no array was given")
        # First image seen when channels are kept as stored: (channels, path), to report a mixture.
        self._first_channels: tuple[int, str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        counts = Counter(self.labels)
        return (
            f"AnomalyDataset({len(self)} images: {counts[NORMAL]} normal, {counts[ANOMALOUS]} anomalous; "
            f"masks={self.has_masks}; {self.preprocess})"
        )

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    @property
    def defect_types(self) -> list[str]:
        return [r.defect_type for r in self.records]

    @property
    def groups(self) -> list[str | None] | None:
        """The object each image shows (Record.group), or None where no image names one."""
        groups = [r.group for r in self.records]
        return groups if any(g is not None for g in groups) else None

    @property
    def has_masks(self) -> bool:
        """True when samples carry pixel ground truth (all-zero masks of normal test images count)."""
        return any(r.mask is not None or r.zero_mask for r in self.records)

    def subset(self, indices: Sequence[int]) -> AnomalyDataset:
        """A dataset of the records at ``indices`` (same preprocessing, shared image array)."""
        return AnomalyDataset([self.records[int(i)] for i in indices], self.preprocess, self.array, self.memo)

    def _load(self, record: Record) -> Image.Image:
        if isinstance(record.image, int):
            return Image.fromarray(np.ascontiguousarray(self.array[record.image]))
        return load_image(record.image)

    def _check_channels(self, image: Image.Image, path: str) -> None:
        channels = 1 if image.mode == "L" else 3
        if self._first_channels is None:
            self._first_channels = (channels, path)
        elif self._first_channels[0] != channels:
            first_channels, first_path = self._first_channels
            raise DataError(
                f"mixed channel counts: {first_path} has {first_channels} channel(s) but {path} has {channels}; "
                "set Preprocess(channels=1 or 3) to convert them all"
            )

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)}")
        record = self.records[index]
        if self.memo is not None:
            sample = self.memo.get(record)
            if sample is None:
                sample = self.memo[record] = self._decode(record)
            return sample
        return self._decode(record)

    def _decode(self, record: Record) -> Sample:
        image = self._load(record)
        if self.preprocess.channels is None:
            self._check_channels(image, record.path)
        mask = None
        if record.mask is not None:
            mask_image = load_mask(record.mask)
            if mask_image.size != image.size:  # compare before any resize hides the mismatch
                raise DataError(
                    f"mask {record.mask} is {mask_image.size[0]}x{mask_image.size[1]} (WxH) but its image "
                    f"{record.path} is {image.size[0]}x{image.size[1]}"
                )
            mask = self.preprocess.mask(mask_image)
        tensor = self.preprocess(image)
        if record.zero_mask and mask is None:
            mask = torch.zeros(1, tensor.shape[1], tensor.shape[2], dtype=torch.float32)
        return Sample(image=tensor, mask=mask, label=record.label, defect_type=record.defect_type, path=record.path)


@dataclass
class DatasetSplits:
    """A train and a test dataset and how they were made (``info``: format, root, counts, split, ...)."""

    train: AnomalyDataset
    test: AnomalyDataset
    info: dict[str, Any] = field(default_factory=dict)


def _check_test_fraction(test_fraction: float) -> None:
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of range(n): shuffle with numpy.random.default_rng(seed), the first
    round(test_fraction * n) go to test, the rest to train; both returned in ascending order."""
    _check_test_fraction(test_fraction)
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(test_fraction * n)
    return sorted(int(i) for i in order[n_test:]), sorted(int(i) for i in order[:n_test])


def split_group_indices(groups: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of range(len(groups)) that keeps each group (``groups[i]``: the group of item i) on one side:
    whole groups to test, in the order of ``numpy.random.default_rng(seed).permutation`` of the sorted group
    numbers, until test holds at least ``round(test_fraction * n)`` items; the rest to train. Ascending."""
    _check_test_fraction(test_fraction)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    wanted, test = round(test_fraction * len(groups)), []
    for g in np.random.default_rng(seed).permutation(sorted(members)):
        if len(test) >= wanted:
            break
        test.extend(members[int(g)])
    chosen = set(test)
    return [i for i in range(len(groups)) if i not in chosen], sorted(test)


def _record_channels(record: Record, array: np.ndarray | None) -> int:
    if isinstance(record.image, int):
        return 3 if array is not None and array.ndim == 4 else 1
    return image_header_channels(record.image)


def resolve_channels(
    preprocess: Preprocess | None,
    parts: Sequence[tuple[Sequence[Record], np.ndarray | None]],
) -> Preprocess:
    """Fix ``channels`` when it is None: read every image header and take the one channel count found.

    A mixture raises DataError naming one file of each kind. Only headers are read, no pixels.
    """
    preprocess = preprocess if preprocess is not None else Preprocess()
    if preprocess.channels is not None:
        return preprocess
    first: dict[int, str] = {}
    for records, array in parts:
        for record in records:
            channels = _record_channels(record, array)
            first.setdefault(channels, record.path)
            if len(first) > 1:
                raise DataError(
                    f"mixed channel counts: {first[1]} has 1 channel (grayscale) but {first[3]} has 3 (colour); "
                    "set channels=1 or channels=3 to convert them all"
                )
    if not first:
        return preprocess
    return replace(preprocess, channels=next(iter(first)))


def make_splits(
    train: Sequence[Record],
    test: Sequence[Record],
    preprocess: Preprocess | None,
    info: dict[str, Any],
    train_array: np.ndarray | None = None,
    test_array: np.ndarray | None = None,
) -> DatasetSplits:
    """Build both datasets with one Preprocess (channels resolved over both) and fill in the counts."""
    preprocess = resolve_channels(preprocess, [(train, train_array), (test, test_array)])
    train_ds = AnomalyDataset(train, preprocess, train_array)
    test_ds = AnomalyDataset(test, preprocess, test_array)
    test_labels = Counter(test_ds.labels)
    info = dict(info)
    info["counts"] = {
        "train": len(train_ds),
        "test": len(test_ds),
        "test_normal": test_labels[NORMAL],
        "test_anomalous": test_labels[ANOMALOUS],
        "test_defect_types": dict(sorted(Counter(test_ds.defect_types).items())),
    }
    info["channels"] = preprocess.channels
    info["has_masks"] = test_ds.has_masks
    info["preprocess"] = preprocess.to_dict()
    return DatasetSplits(train=train_ds, test=test_ds, info=info)
