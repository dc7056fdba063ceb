"""Property tests (hypothesis, bounded): random and mutated bytes given to the image, mask, IDX and CIFAR-10 readers
give a DataError or a valid result, never another exception. scripts/fuzz_atheris.py is the long-running fuzzer."""

from __future__ import annotations

import io
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cavga.data import Preprocess, load_image, load_mask
from cavga.data.oneclass import CIFAR_RECORD, _cifar_binary, _cifar_python, read_idx_file
from cavga.errors import DataError

FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="cavga-hypothesis-"))


def _valid(fmt: str, mode: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


SEEDS = {
    "png": _valid("PNG", "RGB"),
    "png_palette": _valid("PNG", "P"),
    "jpeg": _valid("JPEG", "RGB"),
    "bmp": _valid("BMP", "L"),
    "tiff": _valid("TIFF", "RGBA"),
}
CIFAR_PICKLE = pickle.dumps(
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4], b"filenames": [b"a.png", b"b.png"]}, protocol=2
)


def mutated(seed: bytes):
    """``seed`` with a few bytes overwritten and possibly cut short."""
    edits = st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=6)

    def apply(args):
        changes, cut = args
        data = bytearray(seed)
        for position, value in changes:
            data[position] = value
        return bytes(data[:cut])

    return st.tuples(edits, st.integers(1, len(seed))).map(apply)


image_bytes = st.one_of(st.binary(max_size=600), *(mutated(seed) for seed in SEEDS.values()))


def write(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


@FUZZ
@given(image_bytes)
def test_image_reader_gives_an_image_or_a_data_error(data):
    path = write("fuzz.png", data)
    try:
        image = load_image(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert image.mode in ("L", "RGB")
    tensor = Preprocess(8, 3)(image)
    assert tensor.shape == (3, 8, 8) and bool(((tensor >= 0) & (tensor <= 1)).all())


@FUZZ
@given(image_bytes)
def test_mask_reader_gives_a_binary_mask_or_a_data_error(data):
    path = write("fuzz_mask.png", data)
    try:
        mask = Preprocess(8).mask(load_mask(path))
    except DataError as e:
        assert str(path) in str(e)
        return
    assert mask.shape == (1, 8, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}


def idx_headers():
    """Well-formed IDX magic and dims with data of any (often wrong) length, or raw bytes."""
    structured = st.builds(
        lambda kind, dims, data: bytes([0, 0, kind, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + data,
        st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07]),
        st.lists(st.integers(0, 6), max_size=4),
        st.binary(max_size=300),
    )
    return st.one_of(structured, st.binary(max_size=100))


@FUZZ
@given(idx_headers())
def test_idx_reader_gives_an_array_or_a_data_error(data):
    path = write("fuzz-idx3-ubyte", data)
    try:
        array = read_idx_file(path)
    except DataError:
        return
    assert array.ndim == data[3] and array.nbytes == len(data) - 4 - 4 * data[3]


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=50),
        st.integers(0, 3).flatmap(lambda n: st.binary(min_size=n * CIFAR_RECORD, max_size=n * CIFAR_RECORD + 2)),
    )
)
def test_cifar_binary_reader_gives_arrays_or_a_data_error(data):
    path = write("fuzz.bin", data)
    try:
        images, labels = _cifar_binary(path)
    except DataError:
        return
    assert images.shape == (len(data) // CIFAR_RECORD, 32, 32, 3) and labels.shape == (len(images),)


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(CIFAR_PICKLE)))
def test_cifar_python_reader_gives_arrays_or_a_data_error(data):
    path = write("data_batch_1", data)
    try:
        images, labels = _cifar_python(path)
    except DataError:
        return
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and labels.shape == (len(images),)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_unmutated_seeds_are_read(name):
    # The mutation seeds themselves must be valid, or the mutated inputs would test only the error path.
    assert load_image(write(f"seed_{name}", SEEDS[name])).size == (10, 12)
