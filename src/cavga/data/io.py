"""Decoding image and mask files safely, and listing image files in a folder."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cavga.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

ImageInput = str | os.PathLike | np.ndarray | Image.Image  # what predict() takes for one image

# Modes that load_image turns into "L" (one channel); every other mode becomes "RGB".
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def is_image_file(path: Path) -> bool:
    """True for a non-hidden file whose extension is one of IMAGE_EXTENSIONS (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def list_subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders "frame2" before "frame10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def channels_of_mode(mode: str) -> int:
    """How many channels load_image gives for an image stored in PIL ``mode`` (1 or 3)."""
    return 1 if mode in _GRAY_MODES else 3


def to_gray_or_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit "L" or "RGB"."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("1", "LA", "La"):
        return img.convert("L")  # LA -> L drops the alpha channel
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit (and 32-bit integer) gray: scale the 16-bit range onto 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if mode == "F":
        # Float images come as either [0, 1] or [0, 255]; a maximum <= 1 means the former.
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.round(np.nan_to_num(arr)), 0, 255).astype(np.uint8))
    if mode in ("P", "PA"):
        # Via RGBA so palette transparency is understood, then the alpha channel is dropped.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV


def _decode(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise DataError(f"{what} file {path} is a broken or looping symbolic link")
        raise DataError(f"{what} file not found: {path}")
    if not path.is_file():
        raise DataError(f"{what} path is not a file: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_gray_or_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{what} file {path} is refused as a possible decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise DataError(f"{what} file {path} is not an image format that can be read") from e
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ... on broken files
        raise DataError(f"{what} file {path} cannot be decoded (truncated or corrupt?): {e}") from e


def load_image(path: str | Path) -> Image.Image:
    """Fully decode an image file to mode "L" (one channel) or "RGB".

    16-bit images are scaled to 8 bits, palette images become RGB, alpha channels are dropped.
    Raises DataError naming the path for missing, empty, truncated, oversized or non-image files.
    """
    return _decode(path, "image")


def load_mask(path: str | Path) -> Image.Image:
    """Fully decode a mask file to mode "L"; a colour mask takes the maximum over its channels.

    (Luminance would turn a pure red mask, a common convention, into 76 and so into background.)
    """
    img = _decode(path, "mask")
    if img.mode == "RGB":
        img = Image.fromarray(np.asarray(img).max(axis=2))
    return img


def image_header_channels(path: str | Path) -> int:
    """Channel count load_image would give, from the file header only (no pixel decode)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return channels_of_mode(img.mode)
    except Image.DecompressionBombError as e:
        raise DataError(f"image file {path} is refused as a possible decompression bomb: {e}") from e
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except Exception as e:
        raise DataError(f"image file {path} is not an image that can be read: {e}") from e


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files; name what is missing.

    Unlike :func:`list_image_files`, hidden files count and folders are searched recursively."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise DataError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def to_pil(image: ImageInput) -> Image.Image:
    """An image input (a path, a PIL image, or a uint8 / [0, 1] float array HxW, HxWx1|3|4) as a PIL image."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
                raise DataError(f"a float image array must lie in [0, 1], got range [{array.min()}, {array.max()}]")
            array = np.round(np.nan_to_num(array) * 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise DataError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
        return Image.fromarray(array).convert("RGB") if array.ndim == 3 else Image.fromarray(array)
    return load_image(image)
