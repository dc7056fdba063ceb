"""Write the bad-input corpus into a folder (the tests call this on a temporary folder; nothing is committed).

    python tests/corpus/make_corpus.py OUT_DIR

Each case is a small file or dataset folder named after the case; ``tests/corpus/README.md`` documents the
outcome cavga must give for each, and ``tests/test_bad_inputs.py`` checks it.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

RNG_SEED = 0
UNICODE_NAME = "ñandú_写真_Ωmega"


def _pixels(h: int = 24, w: int = 20, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height 8-bit gray pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def mvtec(root: Path, n_train: int = 3, defect: bool = True, mask_size: tuple[int, int] | None = None) -> Path:
    """A one-category MVTec-layout dataset under ``root``: train/good, test/good, test/crack (+ masks)."""
    cat = root / "widget"
    for i in range(n_train):
        _save(Image.fromarray(_pixels(seed=i)), cat / "train" / "good" / f"{i:03d}.png")
    _save(Image.fromarray(_pixels(seed=10)), cat / "test" / "good" / "000.png")
    if defect:
        _save(Image.fromarray(_pixels(seed=11)), cat / "test" / "crack" / "000.png")
        w, h = mask_size or (20, 24)
        mask = np.zeros((h, w), np.uint8)
        mask[2:6, 3:9] = 255
        _save(Image.fromarray(mask), cat / "ground_truth" / "crack" / "000_mask.png")
    return root


def _save(image: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- the cases: name -> builder(folder) -> path


def truncated_png(d: Path) -> Path:
    data = _encoded(Image.fromarray(_pixels(64, 64)), "PNG")
    return _write(d / "truncated.png", data[: len(data) // 2])


def truncated_jpeg(d: Path) -> Path:
    data = _encoded(Image.fromarray(_pixels(64, 64)), "JPEG")
    return _write(d / "truncated.jpg", data[: len(data) // 2])


def zero_byte(d: Path) -> Path:
    return _write(d / "empty.png", b"")


def not_an_image(d: Path) -> Path:
    return _write(d / "notes.png", b"these are my notes, not a picture\n" * 3)


def png_16bit(d: Path) -> Path:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 8-bit 0, 1, 128, 255 times 257
    return _save(Image.fromarray(values), d / "sixteen.png")


def rgba(d: Path) -> Path:
    pixels = np.concatenate([_pixels(), np.full((24, 20, 1), 7, np.uint8)], axis=2)
    return _save(Image.fromarray(pixels, "RGBA"), d / "alpha.png")


def palette(d: Path) -> Path:
    return _save(Image.fromarray(_pixels()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), d / "palette.png")


def gray_alpha(d: Path) -> Path:
    return _save(Image.fromarray(_pixels()).convert("LA"), d / "gray_alpha.png")


def cmyk_jpeg(d: Path) -> Path:
    return _save(Image.fromarray(_pixels()).convert("CMYK"), d / "cmyk.jpg", "JPEG")


def decompression_bomb(d: Path) -> Path:
    return _write(d / "bomb.png", bomb_png())


def gray_mixed_with_rgb(d: Path) -> Path:
    root = mvtec(d / "mixed")
    _save(Image.fromarray(_pixels(seed=5)).convert("L"), root / "widget" / "train" / "good" / "100_gray.png")
    return root


def mask_larger(d: Path) -> Path:
    return mvtec(d / "mask_larger", mask_size=(40, 48))


def mask_smaller(d: Path) -> Path:
    return mvtec(d / "mask_smaller", mask_size=(10, 12))


def mask_values(d: Path) -> Path:
    root = mvtec(d / "mask_values")
    values = np.tile(np.array([0, 1, 127, 128, 200, 255], np.uint8), (24, 4))[:, :20]
    _save(Image.fromarray(values), root / "widget" / "ground_truth" / "crack" / "000_mask.png")
    return root


def missing_mask(d: Path) -> Path:
    root = mvtec(d / "missing_mask")
    (root / "widget" / "ground_truth" / "crack" / "000_mask.png").unlink()
    return root


def empty_category(d: Path) -> Path:
    root = mvtec(d / "empty_category", n_train=0)
    (root / "widget" / "train" / "good").mkdir(parents=True, exist_ok=True)
    return root


def symlink_loop_file(d: Path) -> Path:
    root = mvtec(d / "symlink_file")
    link = root / "widget" / "train" / "good" / "loop.png"
    os.symlink(link.name, link)  # loop.png -> loop.png
    return root


def symlink_loop_dir(d: Path) -> Path:
    folder = d / "symlink_dir" / "images"
    _save(Image.fromarray(_pixels()), folder / "a.png")
    os.symlink("..", folder / "up")  # images/up -> images/.. (a cycle for anything that follows links)
    return folder


def unicode_names(d: Path) -> Path:
    root = mvtec(d / "unicode")
    cat = root / "widget"
    for path in (cat / "train/good/000.png", cat / "test/crack/000.png", cat / "ground_truth/crack/000_mask.png"):
        path.rename(path.with_name(path.name.replace("000", UNICODE_NAME)))
    return root


def upper_case_extension(d: Path) -> Path:
    root = mvtec(d / "upper")
    path = root / "widget" / "train" / "good" / "000.png"
    path.rename(path.with_name("000.PNG"))
    return root


def folder_named_like_an_image(d: Path) -> Path:
    root = mvtec(d / "dir_png")
    (root / "widget" / "train" / "good" / "folder.png").mkdir()
    return root


def idx_truncated(d: Path) -> Path:
    header = bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (10, 28, 28))
    return _write(d / "train-images-idx3-ubyte", header + bytes(100))


def cifar_binary_wrong_size(d: Path) -> Path:
    return _write(d / "cifar" / "data_batch_1.bin", bytes(3073 + 17))


CASES: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        truncated_png,
        truncated_jpeg,
        zero_byte,
        not_an_image,
        png_16bit,
        rgba,
        palette,
        gray_alpha,
        cmyk_jpeg,
        decompression_bomb,
        gray_mixed_with_rgb,
        mask_larger,
        mask_smaller,
        mask_values,
        missing_mask,
        empty_category,
        symlink_loop_file,
        symlink_loop_dir,
        unicode_names,
        upper_case_extension,
        folder_named_like_an_image,
        idx_truncated,
        cifar_binary_wrong_size,
    )
}


def make_corpus(out: Path) -> dict[str, Path]:
    """Write every case into its own sub-folder of ``out``; returns case name -> file or dataset root."""
    return {name: build(Path(out) / name) for name, build in CASES.items()}


if __name__ == "__main__":
    for name, path in make_corpus(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
