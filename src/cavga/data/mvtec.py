"""The MVTec AD layout, used by MVTec itself and by any dataset laid out the same way.

<root>/<category>/train/good/*.png
<root>/<category>/test/<defect>/*.png          (test/good holds the normal test images)
<root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

from pathlib import Path

from cavga.data.dataset import DatasetSplits, Record, make_splits
from cavga.data.io import IMAGE_EXTENSIONS, list_image_files, list_subdirs
from cavga.data.transforms import Preprocess
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.errors import DataError

GOOD = "good"
EXPECTED_LAYOUT = "<category>/train/good/<images>, <category>/test/<defect>/<images>, " + (
    "<category>/ground_truth/<defect>/<stem>_mask.png"
)


def is_mvtec_category(folder: Path) -> bool:
    """True when ``folder`` has train/good and test sub-folders."""
    return (folder / "train" / GOOD).is_dir() and (folder / "test").is_dir()


def list_mvtec_categories(root: str | Path) -> list[str]:
    """Names of the sub-folders of ``root`` laid out as MVTec categories, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    return [p.name for p in list_subdirs(root) if is_mvtec_category(p)]


def _images(folder: Path) -> list[Path]:
    images = list_image_files(folder)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def read_mvtec(root: str | Path, category: str, preprocess: Preprocess | None = None) -> DatasetSplits:
    """Read one category of an MVTec-layout dataset.

    Train: every image of train/good (NORMAL, no mask). Test: every image of test/<defect>, sorted by
    defect folder then file name; test/good is NORMAL with an all-zero mask, the other folders are
    ANOMALOUS with their ground_truth mask (a missing mask is an error).
    """
    root = Path(root)
    folder = root / category
    categories = list_mvtec_categories(root)
    if category not in categories:
        if folder.is_dir():
            raise DataError(f"{folder} is not laid out as an MVTec category: expected {EXPECTED_LAYOUT}")
        found = ", ".join(categories) if categories else f"none (expected {EXPECTED_LAYOUT})"
        raise DataError(f"unknown category {category!r} in {root}; categories found: {found}")

    train = [Record(image=p, label=NORMAL, defect_type=GOOD, path=str(p)) for p in _images(folder / "train" / GOOD)]
    defect_dirs = list_subdirs(folder / "test")
    if not defect_dirs:
        raise DataError(f"no defect folders in {folder / 'test'}: expected test/good and test/<defect>")
    test = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        for p in _images(defect_dir):
            if defect == GOOD:
                test.append(Record(image=p, label=NORMAL, defect_type=GOOD, path=str(p), zero_mask=True))
                continue
            mask = folder / "ground_truth" / defect / f"{p.stem}_mask.png"
            if not mask.is_file():
                raise DataError(f"defect image {p} has no mask: expected {mask}")
            test.append(Record(image=p, label=ANOMALOUS, defect_type=defect, path=str(p), mask=mask))
    info = {"format": "mvtec", "root": str(root), "category": category}
    return make_splits(train, test, preprocess, info)
