"""The bad-input corpus (tests/corpus/make_corpus.py, outcomes in tests/corpus/README.md): every case either gives a
DataError that names the file, or is handled with the documented result."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cavga.data import Preprocess, load_dataset, load_image, load_mask, read_mvtec
from cavga.data.io import image_header_channels, list_images
from cavga.data.oneclass import _cifar_binary, read_cifar10, read_idx_file
from cavga.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
import make_corpus  # noqa: E402
from make_corpus import CASES, UNICODE_NAME, _pixels  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return make_corpus.make_corpus(tmp_path_factory.mktemp("corpus"))


def refused(call, *args, match: str) -> str:
    with pytest.raises(DataError) as info:
        call(*args)
    message = str(info.value)
    assert match in message, message
    return message


def anomalous_sample(root: Path):
    test = read_mvtec(root, "widget", Preprocess()).test
    index = test.labels.index(1)
    return test, index


def check_unreadable_file(path: Path) -> None:
    for reader in (load_image, load_mask):
        refused(reader, path, match=str(path))


def check_png_16bit(path: Path) -> None:
    image = load_image(path)
    assert image.mode == "L"
    assert np.asarray(image).tolist() == [[0, 1, 128, 255]]  # 16-bit values / 257


def check_rgba(path: Path) -> None:
    image = load_image(path)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), _pixels())  # alpha dropped, colours kept


def check_palette(path: Path) -> None:
    image = load_image(path)
    with Image.open(path) as raw:
        lookup = np.asarray(raw.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(raw)]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), lookup)


def check_gray_alpha(path: Path) -> None:
    image = load_image(path)
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image), np.asarray(Image.fromarray(_pixels()).convert("L")))


def check_cmyk_jpeg(path: Path) -> None:
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 24)


def check_bomb(path: Path) -> None:
    for reader in (load_image, load_mask, image_header_channels):
        refused(reader, path, match="decompression bomb")
        refused(reader, path, match=str(path))


def check_gray_mixed(root: Path) -> None:
    message = refused(load_dataset, root, match="mixed channel counts")
    assert "100_gray.png" in message and "000.png" in message
    splits = load_dataset(root, preprocess=Preprocess(channels=3))
    assert {splits.train[i].image.shape[0] for i in range(len(splits.train))} == {3}  # converted when asked


def check_mask_size(root: Path) -> None:
    test, index = anomalous_sample(root)
    message = refused(test.__getitem__, index, match="000_mask.png")
    assert "crack/000.png" in message and "20x24" in message


def check_mask_values(root: Path) -> None:
    test, index = anomalous_sample(root)
    mask = test[index].mask[0].numpy()
    # Stored values 0, 1, 127, 128, 200, 255 (repeated): >= 128 is anomalous, no error.
    expected = (np.tile(np.array([0, 1, 127, 128, 200, 255]), (24, 4))[:, :20] >= 128).astype(np.float32)
    assert np.array_equal(mask, expected)


def check_missing_mask(root: Path) -> None:
    message = refused(read_mvtec, root, "widget", match="has no mask")
    assert "crack/000.png" in message and "ground_truth/crack/000_mask.png" in message


def check_empty_category(root: Path) -> None:
    refused(read_mvtec, root, "widget", match=str(root / "widget" / "train" / "good"))


def check_symlink_loop_file(root: Path) -> None:
    splits = read_mvtec(root, "widget")
    # The loop is skipped when listing.
    assert len(splits.train) == 3 and "loop.png" not in [Path(p).name for p in splits.train.paths]
    loop = root / "widget" / "train" / "good" / "loop.png"
    refused(load_image, loop, match=f"{loop} is a broken or looping symbolic link")


def check_symlink_loop_dir(folder: Path) -> None:
    assert list_images([folder]) == [folder / "a.png"]  # the cycle is not followed


def check_unicode(root: Path) -> None:
    splits = read_mvtec(root, "widget")
    assert any(UNICODE_NAME in p for p in splits.train.paths)
    test, index = anomalous_sample(root)
    assert UNICODE_NAME in test.paths[index] and test[index].mask.sum() == 24  # its renamed mask was found
    assert all(splits.train[i].image.shape == (3, 24, 20) for i in range(len(splits.train)))


def check_upper_case(root: Path) -> None:
    assert [Path(p).name for p in read_mvtec(root, "widget").train.paths] == ["000.PNG", "001.png", "002.png"]


def check_folder_named_png(root: Path) -> None:
    assert len(read_mvtec(root, "widget").train) == 3
    folder = root / "widget" / "train" / "good" / "folder.png"
    refused(load_image, folder, match=f"not a file: {folder}")


def check_idx_truncated(path: Path) -> None:
    refused(read_idx_file, path, match=str(path))


def check_cifar_binary(path: Path) -> None:
    refused(_cifar_binary, path, match=str(path))
    refused(read_cifar10, path.parent, match=str(path))  # the whole reader names it too


CHECKS = {
    "truncated_png": check_unreadable_file,
    "truncated_jpeg": check_unreadable_file,
    "zero_byte": check_unreadable_file,
    "not_an_image": check_unreadable_file,
    "png_16bit": check_png_16bit,
    "rgba": check_rgba,
    "palette": check_palette,
    "gray_alpha": check_gray_alpha,
    "cmyk_jpeg": check_cmyk_jpeg,
    "decompression_bomb": check_bomb,
    "gray_mixed_with_rgb": check_gray_mixed,
    "mask_larger": check_mask_size,
    "mask_smaller": check_mask_size,
    "mask_values": check_mask_values,
    "missing_mask": check_missing_mask,
    "empty_category": check_empty_category,
    "symlink_loop_file": check_symlink_loop_file,
    "symlink_loop_dir": check_symlink_loop_dir,
    "unicode_names": check_unicode,
    "upper_case_extension": check_upper_case,
    "folder_named_like_an_image": check_folder_named_png,
    "idx_truncated": check_idx_truncated,
    "cifar_binary_wrong_size": check_cifar_binary,
}


def test_every_case_has_a_check_and_a_documented_outcome():
    assert set(CHECKS) == set(CASES)
    readme = (Path(__file__).resolve().parent / "corpus" / "README.md").read_text()
    for name in CASES:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, corpus):
    CHECKS[name](corpus[name])
