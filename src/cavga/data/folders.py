"""Plain folders (normal, abnormal, masks matched by stem) and the Magnetic Tile layout."""

from __future__ import annotations

import re
from pathlib import Path

from cavga.data.dataset import DatasetSplits, Record, make_splits, split_group_indices, split_indices
from cavga.data.io import IMAGE_EXTENSIONS, list_image_files, list_subdirs
from cavga.data.transforms import Preprocess
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.errors import ConfigError, DataError

MAGNETIC_TILE_NORMAL = "MT_Free"
FOLDERS_TEST_FRACTION = 0.2  # read_folders' share of normal test images beside an abnormal folder
MAGNETIC_TILE_SPLITS = ("tile", "image")
# Magnetic Tile photographs each tile under six exposures, one after another: file names exp<k>_num_<n> where n
# counts frames. Sorted by n, one tile's six frames lie within a few hundred of each other and a new tile starts
# after a larger gap. Tiles closer than this gap share a group (over-merging only makes a group coarser).
MAGNETIC_TILE_FRAME_GAP = 300
_MAGNETIC_TILE_NAME = re.compile(r"^exp\d+_num_(\d+)$")


def _images_without_masks(folder: Path, mask_suffix: str, mask_ext: str) -> list[Path]:
    """Image files of ``folder``, leaving out the files that are the mask of another image there
    (``x.jpg`` + ``x.png`` with the default suffix "" and extension ".png")."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = list_image_files(folder)
    names = {p.name for p in files}
    # a file is never its own mask
    masks = {p.stem + mask_suffix + mask_ext for p in files if p.stem + mask_suffix + mask_ext != p.name} & names
    images = [p for p in files if p.name not in masks]
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def read_folders(
    normal_dir: str | Path,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    mask_suffix: str = "",
    mask_ext: str = ".png",
    test_fraction: float | None = None,
    seed: int = 0,
    preprocess: Preprocess | None = None,
) -> DatasetSplits:
    """Normal images (split seeded into train/test, see split_indices) plus optional abnormal test images.

    ``test_fraction``: the share of the normal images held out as test images; unset: 0.2 beside an abnormal
    folder, and none without one (a plain folder of normal images trains whole: with no anomalous image there is
    nothing a test split could measure).

    Folders are read non-recursively. The mask of abnormal image ``<stem>.<ext>`` is
    ``<mask_dir or the image's folder>/<stem><mask_suffix><mask_ext>``. If no abnormal image has a mask,
    the dataset is detection-only (masks None); if some have one, all must. When masks exist, normal test
    images get all-zero masks. Abnormal images get defect_type = the abnormal folder's name.
    """
    normal_dir = Path(normal_dir)
    mask_dir = Path(mask_dir) if mask_dir is not None else None
    # Masks beside the images only when no mask folder is given; otherwise every image file counts.
    beside = mask_dir is None
    normal = _images_without_masks(normal_dir, mask_suffix, mask_ext) if beside else _all_images(normal_dir)
    if test_fraction is None:
        test_fraction = FOLDERS_TEST_FRACTION if abnormal_dir is not None else 0.0
    train_idx, test_idx = split_indices(len(normal), test_fraction, seed)
    if not train_idx:
        raise DataError(f"test_fraction={test_fraction} leaves no training image among {len(normal)} in {normal_dir}")

    abnormal: list[tuple[Path, Path | None]] = []
    if abnormal_dir is not None:
        abnormal_dir = Path(abnormal_dir)
        images = _images_without_masks(abnormal_dir, mask_suffix, mask_ext) if beside else _all_images(abnormal_dir)
        for p in images:
            mask = (mask_dir if mask_dir is not None else p.parent) / f"{p.stem}{mask_suffix}{mask_ext}"
            abnormal.append((p, mask if mask.is_file() else None))
        with_mask = [p for p, m in abnormal if m is not None]
        if with_mask and len(with_mask) < len(abnormal):
            missing = next(p for p, m in abnormal if m is None)
            expected = (mask_dir if mask_dir is not None else missing.parent) / f"{missing.stem}{mask_suffix}{mask_ext}"
            raise DataError(
                f"abnormal image {missing} has no mask (expected {expected}) while {len(with_mask)} of "
                f"{len(abnormal)} abnormal images have one"
            )
    has_masks = any(m is not None for _, m in abnormal)
    defect = abnormal_dir.name if abnormal_dir is not None else ""

    train = [Record(image=normal[i], label=NORMAL, defect_type="good", path=str(normal[i])) for i in train_idx]
    test = [
        Record(image=normal[i], label=NORMAL, defect_type="good", path=str(normal[i]), zero_mask=has_masks)
        for i in test_idx
    ]
    test += [Record(image=p, label=ANOMALOUS, defect_type=defect, path=str(p), mask=m) for p, m in abnormal]
    info = {
        "format": "folders",
        "root": str(normal_dir),
        "normal_dir": str(normal_dir),
        "abnormal_dir": str(abnormal_dir) if abnormal_dir is not None else None,
        "mask_dir": str(mask_dir) if mask_dir is not None else None,
        "split": {"test_fraction": test_fraction, "seed": seed, "of": "normal images"},
    }
    return make_splits(train, test, preprocess, info)


def _all_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    images = list_image_files(folder)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def magnetic_tile_classes(root: str | Path) -> list[Path]:
    """The ``MT_<class>`` folders of ``root`` that hold an ``Imgs`` folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    return [p for p in list_subdirs(root) if p.name.startswith("MT_") and (p / "Imgs").is_dir()]


def magnetic_tile_groups(paths: list[Path], gap: int = MAGNETIC_TILE_FRAME_GAP) -> list[int]:
    """The tile of each of ``paths`` (one class folder), as a group number: the files named exp<k>_num_<n>, sorted
    by n, start a new group where n jumps by more than ``gap``. A file named otherwise is a group of its own.
    Numbers count from 0 in order of n, then the others in order of ``paths``."""
    frames = {i: int(m.group(1)) for i, p in enumerate(paths) if (m := _MAGNETIC_TILE_NAME.match(p.stem))}
    groups = [-1] * len(paths)
    group, last = -1, None
    for i in sorted(frames, key=lambda i: (frames[i], paths[i].name)):
        if last is None or frames[i] - last > gap:
            group += 1
        groups[i], last = group, frames[i]
    for i in range(len(paths)):
        if groups[i] < 0:
            group += 1
            groups[i] = group
    return groups


def read_magnetic_tile(
    root: str | Path,
    test_fraction: float = 0.2,
    seed: int = 0,
    preprocess: Preprocess | None = None,
    split: str = "tile",
) -> DatasetSplits:
    """Read the Magnetic Tile defect dataset (Huang et al. 2018) in its original layout.

    Layout: ``<root>/MT_<class>/Imgs/<name>.jpg`` with its mask ``<name>.png`` beside it. ``MT_Free`` is
    normal; every other class is a defect with defect_type = the class name without ``MT_`` ("Blowhole").
    Masks are thresholded at 128 (their edges are anti-aliased); 4 Uneven masks are empty, those images
    stay ANOMALOUS.

    The dataset has no official split, so cavga defines one. Each tile is photographed under six exposures
    (exp1..exp6, consecutive frame numbers), so the six images of a tile are near copies; every record carries
    its tile as ``group`` (:func:`magnetic_tile_groups`, per class folder: "Free/12").
    ``split="tile"`` (default): whole MT_Free tiles go to test
    (:func:`~cavga.data.dataset.split_group_indices`), so no test tile has a copy in training. With the
    defaults: 952 Free in 137 groups -> 755 train, 197 test; test = 197 + 392 = 589.
    ``split="image"``: the split of cavga 0.x before the tiles were found, kept to reproduce its figures: the
    MT_Free images sorted by file name are shuffled with ``numpy.random.default_rng(seed).permutation``; the
    first ``round(test_fraction * n)`` (Python's round) go to test, the rest to train: 762 train, 190 test.
    Nearly every normal test image then has its tile's other exposures in training, which makes the normal test
    images look more normal than an unseen tile would (measured in the README).
    Each split is kept in file-name order. All defect images go to test. Normal test images get all-zero masks
    (the MT_Free masks are all empty and are not read).
    """
    root = Path(root)
    classes = magnetic_tile_classes(root)
    names = [p.name for p in classes]
    if MAGNETIC_TILE_NORMAL not in names:
        raise DataError(
            f"{root} is not laid out as Magnetic Tile: expected MT_<class>/Imgs/<name>.jpg + <name>.png, "
            f"including {MAGNETIC_TILE_NORMAL}/Imgs; found {names or 'no MT_*/Imgs folders'}"
        )
    if split not in MAGNETIC_TILE_SPLITS:
        raise ConfigError(f"split must be one of {list(MAGNETIC_TILE_SPLITS)}, got {split!r}")
    free = _images_without_masks(root / MAGNETIC_TILE_NORMAL / "Imgs", "", ".png")
    groups = magnetic_tile_groups(free)
    tiles = [f"Free/{g}" for g in groups]
    if split == "tile":
        train_idx, test_idx = split_group_indices(groups, test_fraction, seed)
    else:
        train_idx, test_idx = split_indices(len(free), test_fraction, seed)
    if not train_idx:
        raise DataError(f"test_fraction={test_fraction} leaves no training image in {root / MAGNETIC_TILE_NORMAL}")
    train = [
        Record(image=free[i], label=NORMAL, defect_type="good", path=str(free[i]), group=tiles[i]) for i in train_idx
    ]
    test = [
        Record(image=free[i], label=NORMAL, defect_type="good", path=str(free[i]), zero_mask=True, group=tiles[i])
        for i in test_idx
    ]
    for folder in classes:
        if folder.name == MAGNETIC_TILE_NORMAL:
            continue
        defect = folder.name[len("MT_") :]
        images = _images_without_masks(folder / "Imgs", "", ".png")
        for p, g in zip(images, magnetic_tile_groups(images), strict=True):
            mask = p.with_suffix(".png")
            if mask == p or not mask.is_file():
                raise DataError(f"defect image {p} has no mask: expected {p.parent / (p.stem + '.png')}")
            test.append(
                Record(image=p, label=ANOMALOUS, defect_type=defect, path=str(p), mask=mask, group=f"{defect}/{g}")
            )
    info = {
        "format": "magnetic_tile",
        "root": str(root),
        "category": None,
        "split": {"test_fraction": test_fraction, "seed": seed, "of": MAGNETIC_TILE_NORMAL, "by": split},
        "images": len(free) + sum(1 for r in test if r.label == ANOMALOUS),
    }
    return make_splits(train, test, preprocess, info)
