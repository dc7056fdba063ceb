"""Built-in demo data: a small, seeded MVTec-layout dataset of procedural textures and objects.

Every image is rendered from numbers alone (numpy, scipy.ndimage, PIL), so training, evaluation and the
tests run without any download. Each defect is rendered on top of a defect-free image and its ground-truth
mask is exactly the set of pixels the defect changed: pixels outside the mask are identical to the clean
image, pixels inside it are blended with a weight of at least 0.5.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cavga.data.render import RENDERERS, add_defect
from cavga.errors import ConfigError, DataError

DEMO_CATEGORIES: tuple[str, ...] = ("weave", "wood", "pill")

# Defect types per category, in the order the defective test images are spread over them.
DEMO_DEFECTS: dict[str, tuple[str, ...]] = {
    "weave": ("cut", "hole", "scratch", "stain"),
    "wood": ("cut", "hole", "scratch", "stain"),
    "pill": ("colour", "cut", "scratch", "spot"),
}

GOOD = "good"
_TRAIN, _TEST = 0, 1
_MIN_IMAGE_SIZE = 32
_README_TITLE = "cavga built-in demo dataset (synthetic)"


@dataclass(frozen=True)
class RenderedSample:
    """One demo image: the defect-free rendering, the final image, and the defect mask (uint8 0/255)."""

    clean: np.ndarray  # (H, W, 3) uint8
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) uint8 in {0, 255}; None for normal images


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def write_demo_dataset(
    root: str | Path,
    seed: int = 0,
    categories: list[str] | tuple[str, ...] | None = None,
    image_size: int = 128,
    n_train: int = 160,
    n_test_good: int = 30,
    n_test_defect: int = 40,
    overwrite: bool = False,
) -> dict:
    """Write the demo dataset in MVTec AD layout under ``root`` and return its manifest.

    ``n_train``, ``n_test_good`` and ``n_test_defect`` are per category; the defective test images are
    spread evenly over the category's defect types (see ``DEMO_DEFECTS``). The output depends only on the
    arguments: the same seed gives byte-identical files. A category folder that already exists is
    replaced when ``root`` holds an earlier demo dataset (its README.txt) or ``overwrite`` is true, and is
    an error otherwise (so a user's own data is never deleted by accident).

    The manifest holds ``seed``, ``image_size``, ``categories`` (list) and ``counts``:
    ``counts[category]["train"|"test"][defect_type] = number of images``.
    """
    categories = _check_args(seed, categories, image_size, n_train, n_test_good, n_test_defect)
    root = Path(root)
    readme = root / "README.txt"
    earlier_demo = readme.is_file() and readme.read_text(errors="replace").startswith(_README_TITLE)
    for category in categories:
        cat_dir = root / category
        if cat_dir.exists() and any(cat_dir.iterdir()):
            if not (overwrite or earlier_demo):
                raise DataError(f"{cat_dir}: already exists and is not empty (pass overwrite=True to replace)")
            shutil.rmtree(cat_dir)

    counts: dict[str, dict[str, dict[str, int]]] = {}
    for category in categories:
        cat_dir = root / category
        per_defect = _spread(n_test_defect, DEMO_DEFECTS[category])
        counts[category] = {
            "train": {GOOD: n_train},
            "test": {GOOD: n_test_good, **{d: k for d, k in per_defect.items() if k > 0}},
        }
        jobs = [("train", GOOD, n_train), ("test", GOOD, n_test_good)]
        jobs += [("test", d, k) for d, k in per_defect.items() if k > 0]
        for split, defect, count in jobs:
            img_dir = cat_dir / split / defect
            img_dir.mkdir(parents=True, exist_ok=True)
            if defect != GOOD:
                mask_dir = cat_dir / "ground_truth" / defect
                mask_dir.mkdir(parents=True, exist_ok=True)
            width = max(3, len(str(count - 1)))
            for index in range(count):
                sample = render_sample(category, seed, split, defect, index, image_size)
                stem = f"{index:0{width}d}"
                _save_png(sample.image, img_dir / f"{stem}.png")
                if sample.mask is not None:
                    _save_png(sample.mask, mask_dir / f"{stem}_mask.png")

    manifest = {"seed": seed, "image_size": image_size, "categories": list(categories), "counts": counts}
    (root / "README.txt").write_text(_readme_text(manifest), encoding="utf-8")
    return manifest


def validate_demo_dataset(root: str | Path) -> dict:
    """Check that ``root`` holds a well-formed MVTec-layout dataset and return its categories and counts.

    Checks: every category has ``train/good`` and ``test/good`` with images; every image is a readable
    RGB PNG of one common square size; every defect image has ``ground_truth/<defect>/<stem>_mask.png``
    of the same size, single-channel, with values only 0 and 255 and at least one 255; no mask lacks its
    image. Raises :class:`cavga.errors.DataError` naming the first offending file.
    Returns ``{"image_size", "categories", "counts"}`` shaped like :func:`write_demo_dataset`'s manifest.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root does not exist or is not a folder")
    cat_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not cat_dirs:
        raise DataError(f"{root}: no category folders (expected <root>/<category>/train/good, ...)")

    image_size: int | None = None
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for cat_dir in cat_dirs:
        counts[cat_dir.name] = {"train": {}, "test": {}}
        for split in ("train", "test"):
            split_dir = cat_dir / split
            if not (split_dir / GOOD).is_dir():
                raise DataError(f"{split_dir / GOOD}: missing folder of normal {split} images")
            if split == "train":
                extra = sorted(p.name for p in split_dir.iterdir() if p.name != GOOD)
                if extra:
                    raise DataError(f"{split_dir / extra[0]}: train split may only hold 'good' images")
            for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                images = sorted(defect_dir.glob("*.png"))
                if not images:
                    raise DataError(f"{defect_dir}: folder holds no PNG images")
                for path in images:
                    size = _check_image(path)
                    image_size = size if image_size is None else image_size
                    if size != image_size:
                        raise DataError(f"{path}: image is {size}x{size}, others are {image_size}x{image_size}")
                    if defect_dir.name != GOOD:
                        mask_path = cat_dir / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                        _check_mask(mask_path, size)
                counts[cat_dir.name][split][defect_dir.name] = len(images)
        gt_dir = cat_dir / "ground_truth"
        if gt_dir.is_dir():
            for mask_path in sorted(gt_dir.glob("*/*_mask.png")):
                stem = mask_path.name[: -len("_mask.png")]
                if not (cat_dir / "test" / mask_path.parent.name / f"{stem}.png").is_file():
                    raise DataError(f"{mask_path}: mask has no matching test image")
    return {"image_size": image_size, "categories": [p.name for p in cat_dirs], "counts": counts}


def render_sample(
    category: str, seed: int, split: str, defect: str, index: int, image_size: int = 128
) -> RenderedSample:
    """Render one image of the demo dataset exactly as :func:`write_demo_dataset` writes it.

    Each image has its own random stream seeded by (seed, category, split, defect, index), so changing the
    counts of one folder leaves every other image unchanged.
    """
    if category not in DEMO_DEFECTS:
        raise ConfigError(f"unknown demo category {category!r}; choose from {', '.join(DEMO_CATEGORIES)}")
    if defect != GOOD and defect not in DEMO_DEFECTS[category]:
        raise ConfigError(f"unknown defect {defect!r} for demo category {category!r}")
    split_code = {"train": _TRAIN, "test": _TEST}[split]
    rng = np.random.default_rng([seed, _code(category), split_code, _code(defect), index])
    clean, region = RENDERERS[category](rng, image_size)
    clean_u8 = _to_uint8(clean)
    if defect == GOOD:
        return RenderedSample(clean=clean_u8, image=clean_u8, mask=None)
    alpha, layer = add_defect(category, defect, clean, region, rng, image_size)
    mask = alpha > 0
    blended = clean * (1.0 - alpha[..., None]) + layer * alpha[..., None]
    # np.where keeps the pixels outside the mask bit-identical to the clean image.
    image_u8 = np.where(mask[..., None], _to_uint8(blended), clean_u8)
    return RenderedSample(clean=clean_u8, image=image_u8, mask=mask.astype(np.uint8) * 255)


# ---------------------------------------------------------------------------------------------------
# Helpers: arguments, files
# ---------------------------------------------------------------------------------------------------


def _check_args(seed, categories, image_size, n_train, n_test_good, n_test_defect) -> tuple[str, ...]:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if categories is None:
        categories = DEMO_CATEGORIES
    categories = tuple(categories)
    if not categories:
        raise ConfigError("categories is empty; choose from " + ", ".join(DEMO_CATEGORIES))
    for name in categories:
        if name not in DEMO_DEFECTS:
            raise ConfigError(f"unknown demo category {name!r}; choose from {', '.join(DEMO_CATEGORIES)}")
    if len(set(categories)) != len(categories):
        raise ConfigError(f"categories has duplicates: {list(categories)}")
    if not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return categories


def _spread(total: int, defects: tuple[str, ...]) -> dict[str, int]:
    base, extra = divmod(total, len(defects))
    return {d: base + (1 if i < extra else 0) for i, d in enumerate(defects)}


def _code(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def _check_image(path: Path) -> int:
    try:
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
    except Exception as exc:  # PIL raises several types for unreadable/truncated files
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    if mode != "RGB":
        raise DataError(f"{path}: expected an RGB image, got mode {mode}")
    if w != h:
        raise DataError(f"{path}: expected a square image, got {w}x{h}")
    return w


def _check_mask(path: Path, size: int) -> None:
    if not path.is_file():
        raise DataError(f"{path}: missing ground-truth mask for a defect image")
    try:
        with Image.open(path) as im:
            im.load()
            mode, mask = im.mode, np.asarray(im)
    except Exception as exc:
        raise DataError(f"{path}: cannot read mask ({exc})") from exc
    if mode != "L":
        raise DataError(f"{path}: mask must be single-channel (mode L), got mode {mode}")
    if mask.shape != (size, size):
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image is {size}x{size}")
    values = np.unique(mask)
    if not np.isin(values, (0, 255)).all():
        raise DataError(f"{path}: mask is not binary (values other than 0 and 255: {values[:5].tolist()})")
    if values.max() != 255:
        raise DataError(f"{path}: mask of a defect image is empty")


def _readme_text(manifest: dict) -> str:
    lines = [
        _README_TITLE,
        "",
        "Procedural images rendered by cavga.data.synthetic.write_demo_dataset: no photographs.",
        "Layout: MVTec AD (<category>/train/good, <category>/test/<defect>,",
        "<category>/ground_truth/<defect>/<stem>_mask.png; masks are 0/255 and mark exactly the pixels",
        "the synthetic defect changed).",
        "",
        f"seed: {manifest['seed']}",
        f"image_size: {manifest['image_size']}x{manifest['image_size']} RGB",
        "Regenerate byte-identically with: cavga make-data DIR --seed " + str(manifest["seed"]),
        "",
    ]
    for category, splits in manifest["counts"].items():
        parts = [f"train/{d}: {k}" for d, k in splits["train"].items()]
        parts += [f"test/{d}: {k}" for d, k in splits["test"].items()]
        lines.append(f"{category}: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Tiny data for the benchmark's --quick mode
# ---------------------------------------------------------------------------------------------------


def write_quick_data(suite: str, root: str | os.PathLike) -> Path:
    """Tiny generated data for ``--quick``: one demo MVTec category, a Magnetic-Tile-like pair layout made
    from it (``pairs``), or three-class IDX files (``oneclass``). Rewritten on every call."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if suite == "oneclass":
        write_tiny_idx(root)
        return root
    mvtec = root / "mvtec" if suite == "pairs" else root
    write_demo_dataset(mvtec, categories=["weave"], image_size=64, n_train=10, n_test_good=3, n_test_defect=5)
    if suite != "pairs":
        return root
    tiles = root / "tiles"
    write_pair_layout(mvtec / "weave", tiles)
    shutil.rmtree(mvtec)
    return tiles


def write_pair_layout(category: Path, out: Path) -> None:
    """Magnetic Tile's layout from an MVTec-layout category: ``MT_Free/Imgs/<n>.jpg`` (+ an empty ``.png``
    mask) for every good image, ``MT_<Defect>/Imgs/<n>.jpg`` + ``<n>.png`` for every defect image."""
    goods = sorted((category / "train" / "good").glob("*.png")) + sorted((category / "test" / "good").glob("*.png"))
    for i, path in enumerate(goods):
        _write_pair(Image.open(path), None, out / "MT_Free" / "Imgs", f"free_{i:03d}")
    for defect_dir in sorted(p for p in (category / "test").iterdir() if p.is_dir() and p.name != "good"):
        for path in sorted(defect_dir.glob("*.png")):
            mask = Image.open(category / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png")
            name = defect_dir.name.capitalize()
            _write_pair(Image.open(path), mask, out / f"MT_{name}" / "Imgs", f"{name.lower()}_{path.stem}")


def _write_pair(image: Image.Image, mask: Image.Image | None, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    gray = image.convert("L")
    gray.save(folder / f"{stem}.jpg", quality=95)
    (mask if mask is not None else Image.new("L", gray.size, 0)).convert("L").save(folder / f"{stem}.png")


def write_tiny_idx(root: str | os.PathLike, n_classes: int = 3, n_train: int = 12, n_test: int = 6) -> Path:
    """MNIST-style gzipped IDX files of 28 x 28 images: class k is a bright bar at a class-specific angle,
    with noise. ``n_train`` / ``n_test`` images per class."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(n_classes), n)
        out = np.empty((len(labels), 28, 28), np.uint8)
        for i, label in enumerate(labels):
            angle = np.pi * label / n_classes + rng.normal(0, 0.05)
            dist = np.abs(xx * np.sin(angle) - yy * np.cos(angle))
            img = 230 * (dist < 2.5) * (np.hypot(xx, yy) < 11) + rng.normal(0, 12, (28, 28))
            out[i] = np.clip(img, 0, 255).astype(np.uint8)
        return out, labels.astype(np.uint8)

    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs, labels = images(n)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", imgs)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
