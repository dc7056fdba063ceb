"""One entry point for every layout: detect_format and load_dataset, used by the CLI and the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cavga.data.dataset import DatasetSplits
from cavga.data.folders import magnetic_tile_classes, read_folders, read_magnetic_tile
from cavga.data.io import list_image_files, list_subdirs
from cavga.data.mvtec import GOOD, is_mvtec_category, list_mvtec_categories, read_mvtec
from cavga.data.oneclass import find_cifar10, find_idx_files, is_class_folders, read_oneclass
from cavga.data.transforms import Preprocess
from cavga.data.video import read_video_frames
from cavga.errors import CavgaError, ConfigError, DataError

FORMATS = ("mvtec", "magnetic_tile", "folders", "oneclass", "video")

# Sub-folder names load_dataset looks for in the "folders" and "video" layouts.
NORMAL_DIRS = ("normal", "good")
ABNORMAL_DIRS = ("abnormal", "anomalous")
MASK_DIRS = ("masks", "ground_truth")
VIDEO_MASK_DIRS = ("test_masks", "test_mask")

EXPECTED_LAYOUTS = """expected one of:
  mvtec:          <root>/<category>/train/good/*, test/<defect>/*, ground_truth/<defect>/<stem>_mask.png
                  (or <root> itself is a category)
  magnetic_tile:  <root>/MT_<class>/Imgs/<name>.jpg + <name>.png, with MT_Free
  oneclass:       MNIST-style IDX files, CIFAR-10 batches, or <root>/train/<class>/*, <root>/test/<class>/*
  video:          <root>/train/<video>/<frames>, <root>/test/<video>/<frames>, <root>/test_masks/<video>/<masks>
  folders:        <root>/normal/* [+ <root>/abnormal/*, <root>/masks/*], or images directly in <root>"""


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _is_category_root(root: Path) -> bool:
    """``root`` itself is one MVTec category (train holds only good/)."""
    return is_mvtec_category(root) and [p.name for p in list_subdirs(root / "train")] == [GOOD]


def _is_video(root: Path) -> bool:
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return False
    train, test = list_subdirs(root / "train"), list_subdirs(root / "test")
    if not train or not test:
        return False
    return _first_dir(root, VIDEO_MASK_DIRS) is not None or not is_class_folders(root)


def is_oneclass(root: str | Path, format: str | None = None) -> bool:
    """Whether ``root`` (read as ``format``, or as detected) is one-class data; False where it cannot be read
    (the loader names the problem when it reads the folder)."""
    try:
        return (format or detect_format(root)) == "oneclass"
    except CavgaError:
        return False


def detect_format(root: str | Path) -> str:
    """The layout of ``root``: "mvtec", "magnetic_tile", "folders", "oneclass" or "video"."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if magnetic_tile_classes(root):
        return "magnetic_tile"
    if list_mvtec_categories(root) or _is_category_root(root):
        return "mvtec"
    if find_idx_files(root) is not None or find_cifar10(root) is not None:
        return "oneclass"
    if _is_video(root):
        return "video"
    if is_class_folders(root):
        return "oneclass"
    if _first_dir(root, NORMAL_DIRS) is not None or list_image_files(root):
        return "folders"
    raise DataError(f"cannot tell the layout of {root}; {EXPECTED_LAYOUTS}")


_KWARGS = {
    "mvtec": set(),
    "magnetic_tile": {"test_fraction", "seed", "split"},
    "folders": {"normal_dir", "abnormal_dir", "mask_dir", "mask_suffix", "mask_ext", "test_fraction", "seed"},
    "oneclass": {"normal_class", "source"},
    "video": {"every", "mask_root", "test_root"},
}


def _check_kwargs(format: str, kwargs: dict[str, Any]) -> None:
    unknown = set(kwargs) - _KWARGS[format]
    if unknown:
        raise ConfigError(
            f"option(s) {sorted(unknown)} do not apply to the {format!r} format; it takes {sorted(_KWARGS[format])}"
        )


def load_dataset(
    root: str | Path,
    format: str | None = None,
    category: str | None = None,
    preprocess: Preprocess | None = None,
    **kwargs: Any,
) -> DatasetSplits:
    """Read any supported dataset; ``format`` None detects it (see detect_format).

    mvtec: ``category`` (optional when there is only one, or when ``root`` is the category folder).
    magnetic_tile: test_fraction, seed, split ("tile", default, or "image"). folders: normal_dir (default
    <root>/normal or <root>), abnormal_dir (default <root>/abnormal if present), mask_dir (default <root>/masks
    if present), mask_suffix, mask_ext, test_fraction, seed. oneclass: normal_class (required), source.
    video: every, test_root, mask_root (defaults <root>/test and <root>/test_masks when <root>/train exists).
    Options given as None are ignored, so a CLI can pass all of its options through.
    """
    root = Path(root)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if format is None:
        format = detect_format(root)
    if format not in FORMATS:
        raise ConfigError(f"unknown dataset format {format!r}; known: {', '.join(FORMATS)}")
    _check_kwargs(format, kwargs)
    if category is not None and format != "mvtec":
        raise ConfigError(f"category={category!r} applies to the mvtec format only, not {format!r}")
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")

    if format == "mvtec":
        if _is_category_root(root) and category in (None, root.name):
            return read_mvtec(root.parent, root.name, preprocess)
        if category is None:
            categories = list_mvtec_categories(root)
            if not categories:
                raise DataError(f"no MVTec categories in {root}; {EXPECTED_LAYOUTS}")
            if len(categories) > 1:
                raise DataError(f"{root} holds several MVTec categories, choose one: {', '.join(categories)}")
            category = categories[0]
        return read_mvtec(root, category, preprocess)
    if format == "magnetic_tile":
        return read_magnetic_tile(root, preprocess=preprocess, **kwargs)
    if format == "oneclass":
        if "normal_class" not in kwargs:
            raise ConfigError("the oneclass format needs normal_class (the class trained on as normal)")
        return read_oneclass(root, kwargs["normal_class"], preprocess=preprocess, source=kwargs.get("source"))
    if format == "video":
        if (root / "train").is_dir() and "test_root" not in kwargs and "mask_root" not in kwargs:
            test_root = root / "test" if (root / "test").is_dir() else None
            mask_root = _first_dir(root, VIDEO_MASK_DIRS) if test_root is not None else None
            if test_root is not None and mask_root is None:
                raise DataError(f"{root / 'test'} has no masks: expected {root / VIDEO_MASK_DIRS[0]}/<video>/<masks>")
            return read_video_frames(
                root / "train", kwargs.get("every", 5), mask_root=mask_root, test_root=test_root, preprocess=preprocess
            )
        return read_video_frames(root, preprocess=preprocess, **kwargs)
    # folders
    normal_dir = kwargs.pop("normal_dir", None) or _first_dir(root, NORMAL_DIRS) or root
    abnormal_dir = kwargs.pop("abnormal_dir", None) or _first_dir(root, ABNORMAL_DIRS)
    mask_dir = kwargs.pop("mask_dir", None) or _first_dir(root, MASK_DIRS)
    return read_folders(normal_dir, abnormal_dir, mask_dir, preprocess=preprocess, **kwargs)
