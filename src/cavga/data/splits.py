"""Dataset operations of a fit: the calibration slice, CAVGA_w's weak labels and the images left out of evaluation."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset

from cavga.data.augment import AugmentedCopies, SyntheticAnomalies
from cavga.data.dataset import AnomalyDataset, DatasetSplits, Record
from cavga.data.io import list_images
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_ANOMALOUS_FRACTION = 0.02  # the paper's CAVGA_w protocol: 2 % of the anomalous test images


def split_calibration(dataset: AnomalyDataset, fraction: float, seed: int) -> tuple[AnomalyDataset, AnomalyDataset]:
    """Hold out a seeded slice of the NORMAL training images for calibration (never test images)."""
    normal = [i for i, label in enumerate(dataset.labels) if label == NORMAL]
    others = [i for i, label in enumerate(dataset.labels) if label != NORMAL]
    if len(normal) < 2:
        raise DataError(f"need at least 2 normal training images (one to train, one to calibrate), got {len(normal)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    n_cal = min(max(1, round(fraction * len(normal))), len(normal) - 1)
    cal = sorted(normal[i] for i in order[:n_cal])
    fit = sorted([normal[i] for i in order[n_cal:]] + others)
    return dataset.subset(fit), dataset.subset(cal)


def validate_weak_options(setting: str, fraction: float | None, count: int | None, directory: str | None) -> None:
    """Refuse CAVGA_w's options where they do not apply or contradict one another."""
    given = [
        name
        for name, v in (("anomalous_fraction", fraction), ("anomalous_count", count), ("anomalous_dir", directory))
        if v is not None
    ]
    if given and setting != "w":
        raise ConfigError(f"{given[0]} applies to setting 'w' only (got setting={setting!r})")
    if len(given) > 1:
        raise ConfigError(f"give at most one of anomalous_fraction, anomalous_count, anomalous_dir; got {given}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"anomalous_fraction must lie in (0, 1], got {fraction}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"anomalous_count must be an integer >= 1, got {count!r}")


def sample_weak_labels(
    test: AnomalyDataset,
    fraction: float | None = DEFAULT_ANOMALOUS_FRACTION,
    count: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices into ``test`` of a seeded random sample of its ANOMALOUS images (CAVGA_w's weak labels).

    ``count`` images when given, else ``round(fraction * n_anomalous)`` and at least one. Drawn without
    replacement by ``numpy.random.default_rng(seed)`` from the anomalous images in dataset order; ascending.
    """
    anomalous = [i for i, label in enumerate(test.labels) if label == ANOMALOUS]
    if not anomalous:
        raise DataError("setting 'w' needs labelled anomalous images: the test split has none (use anomalous_dir)")
    if count is None:
        if fraction is None or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"anomalous_fraction must lie in (0, 1], got {fraction}")
        count = max(1, round(fraction * len(anomalous)))
    if not 1 <= count <= len(anomalous):
        raise ConfigError(f"anomalous_count must lie in [1, {len(anomalous)}] (the test split's anomalous images)")
    chosen = np.random.default_rng(seed).choice(len(anomalous), size=count, replace=False)
    return sorted(anomalous[int(i)] for i in chosen)


class LabelledConcat(ConcatDataset):
    """Datasets one after the other, with the ``labels`` and ``paths`` that training reads."""

    @property
    def labels(self) -> list[int]:
        return [label for part in self.datasets for label in part.labels]

    @property
    def paths(self) -> list[str]:
        return [path for part in self.datasets for path in part.paths]


def weak_training_set(
    normal: AnomalyDataset,
    anomalous: AnomalyDataset,
    anomalous_share: float = 0.0,
    synthetic_share: float = 0.0,
    seed: int = 0,
) -> LabelledConcat:
    """CAVGA_w's training set: the normal training images, then the anomalous ones as labels only.

    The anomalous records lose their masks (weak supervision never sees pixel ground truth) and are read with
    the normal images' preprocessing. ``anomalous_share`` > 0 repeats them, augmented
    (:class:`~cavga.data.augment.AugmentedCopies`), until they make about that share of the set (each at least
    once); ``synthetic_share`` > 0 adds that share (of the normal images' count) of anomalies synthesized on the
    normal images (:class:`~cavga.data.augment.SyntheticAnomalies`). Both 0: the paper's set.
    """
    labels_only = [dataclasses.replace(r, label=ANOMALOUS, mask=None, zero_mask=False) for r in anomalous.records]
    labelled = AnomalyDataset(labels_only, normal.preprocess, anomalous.array)
    for name, share in (("anomalous_share", anomalous_share), ("synthetic_share", synthetic_share)):
        if not 0.0 <= share < 1.0:
            raise ConfigError(f"{name} must lie in [0, 1), got {share}")
    parts = [normal]
    if anomalous_share > 0.0:
        wanted = anomalous_share * len(normal) / (1.0 - anomalous_share)
        parts.append(AugmentedCopies(labelled, max(1, round(wanted / max(1, len(labelled)))), seed))
    else:
        parts.append(labelled)
    if synthetic_share > 0.0:
        parts.append(SyntheticAnomalies(normal, max(1, round(synthetic_share * len(normal))), seed))
    return LabelledConcat(parts)


def path_key(path: str) -> str:
    """How an image path is compared: resolved, so that another spelling of a folder still matches."""
    return os.path.realpath(path)


def with_group_twins(dataset: AnomalyDataset, labelled: AnomalyDataset) -> list[str]:
    """The paths of ``labelled`` and of every image of ``dataset`` that shows the same object (the same
    ``group``, e.g. a Magnetic Tile tile under another exposure): what a weakly supervised model must never be
    evaluated on, since a near copy of a labelled image is as good as the label itself."""
    groups = {r.group for r in labelled.records if r.group is not None}
    twins = [r.path for r in dataset.records if r.group is not None and r.group in groups]
    return list(dict.fromkeys([*labelled.paths, *twins]))


def exclude_paths(dataset: AnomalyDataset, paths: Sequence[str]) -> AnomalyDataset:
    """``dataset`` without the images at ``paths`` (compared as resolved paths)."""
    if not paths:
        return dataset
    excluded = {path_key(p) for p in paths}
    return dataset.subset([i for i, p in enumerate(dataset.paths) if path_key(p) not in excluded])


def weak_labels(
    splits: DatasetSplits,
    anomalous_dir: str | os.PathLike | None,
    fraction: float | None,
    count: int | None,
    seed: int,
) -> tuple[AnomalyDataset, dict]:
    """CAVGA_w's labelled anomalous images and a record of where they came from: every image of
    ``anomalous_dir``, or else a seeded draw from the anomalous test images (:func:`sample_weak_labels`; neither
    ``fraction`` nor ``count``: the paper's 2 %)."""
    if anomalous_dir is not None:
        files = list_images([anomalous_dir])
        folder = Path(anomalous_dir)
        records = [Record(image=f, label=ANOMALOUS, defect_type=folder.name, path=str(f)) for f in files]
        anomalous = AnomalyDataset(records, splits.train.preprocess)
        return anomalous, {"source": "dir", "dir": str(folder), "n_anomalous": len(anomalous)}
    if fraction is None and count is None:
        fraction = DEFAULT_ANOMALOUS_FRACTION
    indices = sample_weak_labels(splits.test, fraction, count, seed)
    info = {
        "source": "test",
        "fraction": fraction,
        "count": count,
        "seed": seed,
        "n_anomalous": len(indices),
        "n_test_anomalous": sum(1 for label in splits.test.labels if label == ANOMALOUS),
    }
    return splits.test.subset(indices), info


def split_differs(trained: dict, now: dict) -> bool:
    """Whether two data records (``DatasetSplits.info``, a model's ``data_info_``) both record a train/test split
    and the splits differ. A split recorded without "by" is a split by image (before tiles existed)."""
    before, after = trained.get("split"), now.get("split")
    return bool(before and after) and {"by": "image", **before} != {"by": "image", **after}


def warn_if_split_differs(trained: dict, now: dict) -> None:
    """Warn when a model is evaluated on another train/test split of the dataset it was trained on: its training
    images may then be test images."""
    if trained.get("root") == now.get("root") and split_differs(trained, now):
        before, after = trained["split"], now["split"]
        log.warning(
            "this model was trained on the split %s of %s and is evaluated on the split %s: images it was trained "
            "on may count as test images",
            before,
            now.get("root"),
            after,
        )
