"""read_folders and read_magnetic_tile, on tiny folders and on the real Magnetic Tile data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cavga.data import (
    ANOMALOUS,
    NORMAL,
    detect_format,
    load_dataset,
    load_mask,
    read_folders,
    read_magnetic_tile,
)
from cavga.data.folders import magnetic_tile_groups
from cavga.errors import ConfigError, DataError

SIZE = (8, 6)


@pytest.fixture
def folders(tmp_path, image_writer, mask_writer):
    """normal/ 10 images, abnormal/ 3 images, masks/<stem>_mask.png for the abnormal ones."""
    for i in range(10):
        image_writer(tmp_path / "normal" / f"n{i:02d}.png", SIZE, seed=i)
    for i in range(3):
        image_writer(tmp_path / "abnormal" / f"a{i}.jpg", SIZE, seed=50 + i)
        mask_writer(tmp_path / "masks" / f"a{i}_mask.png", SIZE, (i, 0, i + 2, 2))
    return tmp_path


def _names(paths: list[str]) -> list[str]:
    return [Path(p).name for p in paths]


def test_split_counts_and_independent_split(folders):
    splits = read_folders(folders / "normal", folders / "abnormal", folders / "masks", mask_suffix="_mask", seed=3)
    names = [f"n{i:02d}.png" for i in range(10)]
    order = np.random.default_rng(3).permutation(10)
    assert _names(splits.test.paths[:2]) == sorted(names[i] for i in order[:2])  # round(0.2 * 10) = 2
    assert _names(splits.train.paths) == sorted(names[i] for i in order[2:])
    assert len(splits.train) == 8 and len(splits.test) == 5
    assert splits.test.labels == [NORMAL, NORMAL, ANOMALOUS, ANOMALOUS, ANOMALOUS]
    assert splits.test.defect_types[2:] == ["abnormal"] * 3
    assert torch.equal(splits.test[0].mask, torch.zeros(1, 6, 8))  # normal test image of a localization set
    assert splits.test[3].mask[0, 0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]  # a1: box x 1..2, y 0..1
    assert splits.train[0].mask is None


def test_split_is_seeded(folders):
    a = read_folders(folders / "normal", test_fraction=0.3, seed=1)
    b = read_folders(folders / "normal", test_fraction=0.3, seed=1)
    c = read_folders(folders / "normal", test_fraction=0.3, seed=2)
    assert a.test.paths == b.test.paths and a.train.paths == b.train.paths
    assert a.test.paths != c.test.paths
    assert len(a.test) == 3 and sorted(a.train.paths + a.test.paths) == sorted(c.train.paths + c.test.paths)
    assert not a.test.has_masks and a.test[0].mask is None  # no abnormal dir: detection only


def test_masks_beside_images_are_not_images(tmp_path, image_writer, mask_writer):
    for i in range(4):
        image_writer(tmp_path / "n" / f"{i}.jpg", SIZE, seed=i)
        mask_writer(tmp_path / "n" / f"{i}.png", SIZE, None)
    for i in range(2):
        image_writer(tmp_path / "ab" / f"{i}.jpg", SIZE, seed=9 + i)
        mask_writer(tmp_path / "ab" / f"{i}.png", SIZE)
    splits = read_folders(tmp_path / "n", tmp_path / "ab", test_fraction=0.25)
    assert len(splits.train) + len(splits.test) == 6
    assert all(p.endswith(".jpg") for p in splits.train.paths + splits.test.paths)
    assert splits.test.labels.count(ANOMALOUS) == 2 and splits.test[-1].mask.sum().item() == 6


def test_abnormal_without_any_mask_is_detection_only(folders):
    splits = read_folders(folders / "normal", folders / "abnormal")
    assert not splits.test.has_masks
    assert all(splits.test[i].mask is None for i in range(len(splits.test)))
    assert splits.info["has_masks"] is False


def test_some_masks_missing_names_one(folders):
    (folders / "masks" / "a1_mask.png").unlink()
    with pytest.raises(DataError, match=r"a1\.jpg has no mask \(expected .*masks/a1_mask\.png\)"):
        read_folders(folders / "normal", folders / "abnormal", folders / "masks", mask_suffix="_mask")


def test_empty_and_missing_folders(tmp_path, folders):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"no images.*empty"):
        read_folders(tmp_path / "empty")
    with pytest.raises(DataError, match=r"not found.*missing"):
        read_folders(folders / "normal", tmp_path / "missing")


def test_load_dataset_folders_layout(folders):
    assert detect_format(folders) == "folders"
    splits = load_dataset(folders, mask_suffix="_mask")
    assert len(splits.test) == 5 and splits.test.has_masks
    assert load_dataset(folders, format="folders", mask_suffix="_mask").test.paths == splits.test.paths
    assert detect_format(folders / "normal") == "folders"  # a bare folder of normal images
    bare = load_dataset(folders / "normal")  # no abnormal images: nothing to test on, every image trains
    assert len(bare.train) == 10 and len(bare.test) == 0 and bare.info["split"]["test_fraction"] == 0.0
    assert len(load_dataset(folders / "normal", test_fraction=0.2).train) == 8  # a split where one is asked for


# ---------------------------------------------------------------- Magnetic Tile layout


@pytest.fixture
def tiles(tmp_path, image_writer):
    """MT_Free 6 pairs, MT_Blowhole 2, MT_Crack 1 (grayscale jpg + png mask)."""

    def pair(cls: str, name: str, mask: np.ndarray) -> None:
        image_writer(tmp_path / f"MT_{cls}" / "Imgs" / f"{name}.jpg", SIZE, mode="L")
        Image.fromarray(mask).save(tmp_path / f"MT_{cls}" / "Imgs" / f"{name}.png")

    empty = np.zeros((6, 8), dtype=np.uint8)
    for i in range(6):
        pair("Free", f"f{i}", empty)
    antialiased = empty.copy()
    antialiased[0, :4] = [127, 128, 200, 255]
    pair("Blowhole", "b0", antialiased)
    pair("Blowhole", "b1", empty)
    pair("Crack", "c0", np.full((6, 8), 255, dtype=np.uint8))
    return tmp_path


def test_magnetic_tile_layout(tiles):
    splits = read_magnetic_tile(tiles, test_fraction=0.5, seed=0)
    free = [f"f{i}.jpg" for i in range(6)]
    order = np.random.default_rng(0).permutation(6)
    assert _names(splits.train.paths) == sorted(free[i] for i in order[3:])
    assert _names(splits.test.paths) == sorted(free[i] for i in order[:3]) + ["b0.jpg", "b1.jpg", "c0.jpg"]
    assert splits.test.defect_types == ["good"] * 3 + ["Blowhole", "Blowhole", "Crack"]
    assert splits.test.labels == [NORMAL] * 3 + [ANOMALOUS] * 3
    assert splits.test[3].mask[0, 0, :5].tolist() == [0, 1, 1, 1, 0]  # threshold at 128
    assert splits.test[4].mask.sum().item() == 0 and splits.test[4].label == ANOMALOUS
    assert splits.info["channels"] == 1 and splits.info["format"] == "magnetic_tile"
    assert detect_format(tiles) == "magnetic_tile"
    assert load_dataset(tiles, format="magnetic_tile", test_fraction=0.5).test.paths == splits.test.paths


def test_magnetic_tile_groups_hand_worked():
    names = ["exp2_num_150", "exp1_num_100", "other", "exp3_num_390", "exp1_num_1000", "exp2_num_1290", "exp1_num_2"]
    # Sorted by frame: 2, 100, 150, 390 (gaps 98, 50, 240: one tile), 1000 (gap 610: a new one), 1290 (gap 290).
    assert magnetic_tile_groups([Path(f"{n}.jpg") for n in names]) == [0, 0, 2, 0, 1, 1, 0]
    # gap 100: 150 -> 390 and 1000 -> 1290 now split too.
    assert magnetic_tile_groups([Path(f"{n}.jpg") for n in names], gap=100) == [0, 0, 4, 1, 2, 3, 0]


def test_magnetic_tile_split_by_tile(tmp_path, image_writer):
    """Four tiles of three exposures each: the tile split puts whole tiles in test, in the order of the seeded
    permutation of the tiles, until half the images are there; the image split cuts tiles apart."""
    empty = np.zeros((6, 8), dtype=np.uint8)
    names = [f"exp{e}_num_{1000 * t + 10 * e}" for t in range(4) for e in (1, 2, 3)]
    for n in [*names, "exp1_num_9000"]:
        folder = "Free" if n != "exp1_num_9000" else "Crack"
        image_writer(tmp_path / f"MT_{folder}" / "Imgs" / f"{n}.jpg", SIZE, mode="L")
        Image.fromarray(empty).save(tmp_path / f"MT_{folder}" / "Imgs" / f"{n}.png")
    splits = read_magnetic_tile(tmp_path, test_fraction=0.5, seed=3)
    tiles_in_test = [int(t) for t in np.random.default_rng(3).permutation(4)[:2]]
    expected = sorted(n + ".jpg" for n in names if int(n.split("_")[-1]) // 1000 in tiles_in_test)
    assert _names(splits.test.paths[:6]) == expected
    assert sorted(_names(splits.train.paths)) == sorted(set(n + ".jpg" for n in names) - set(expected))
    assert {r.group for r in splits.test.records} == {f"Free/{t}" for t in tiles_in_test} | {"Crack/0"}
    by_image = read_magnetic_tile(tmp_path, test_fraction=0.5, seed=3, split="image")
    assert {r.group for r in by_image.train.records} & {r.group for r in by_image.test.records}
    with pytest.raises(ConfigError, match=r"split must be one of \['tile', 'image'\], got 'tiles'"):
        read_magnetic_tile(tmp_path, split="tiles")


def test_magnetic_tile_errors(tiles, tmp_path):
    (tiles / "MT_Crack" / "Imgs" / "c0.png").unlink()
    with pytest.raises(DataError, match=r"c0\.jpg has no mask.*c0\.png"):
        read_magnetic_tile(tiles)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=r"not laid out as Magnetic Tile.*MT_Free"):
        read_magnetic_tile(tmp_path / "other")


# ---------------------------------------------------------------- the real Magnetic Tile data


@pytest.fixture(scope="module")
def real_tiles(shared_data):
    return read_magnetic_tile(shared_data / "magnetic-tile", split="image")


@pytest.mark.realdata
def test_real_magnetic_tile_counts_and_split(real_tiles, shared_data):
    train, test = real_tiles.train, real_tiles.test
    assert len(train) + len(test) == 1344
    assert (len(train), len(test)) == (762, 582)
    assert Counter(test.labels) == {NORMAL: 190, ANOMALOUS: 392}
    assert Counter(test.defect_types) == {
        "good": 190,
        "Blowhole": 115,
        "Break": 85,
        "Crack": 57,
        "Fray": 32,
        "Uneven": 103,
    }
    # Independent split: the 952 sorted MT_Free names, shuffled with default_rng(0), first round(0.2*952).
    free = sorted(p.name for p in (shared_data / "magnetic-tile" / "MT_Free" / "Imgs").glob("*.jpg"))
    assert len(free) == 952
    order = np.random.default_rng(0).permutation(952)
    assert set(_names(test.paths[:190])) == {free[i] for i in order[:190]}
    assert set(_names(train.paths)) == {free[i] for i in order[190:]}
    assert real_tiles.info["channels"] == 1
    assert detect_format(shared_data / "magnetic-tile") == "magnetic_tile"
    other = read_magnetic_tile(shared_data / "magnetic-tile", seed=1, split="image")
    assert other.train.paths != train.paths and len(other.train) == 762


def _thumbnails(paths: list[str]) -> torch.Tensor:
    """Each image as a 48 x 48 thumbnail with its own mean and spread removed (the exposure)."""
    rows = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("L").resize((48, 48)), dtype=np.float32)
        rows.append((a - a.mean()) / (a.std() + 1e-6))
    return torch.tensor(np.stack(rows)).flatten(1)


@pytest.mark.realdata
def test_real_magnetic_tile_split_by_tile_keeps_each_tiles_exposures_together(real_tiles, shared_data):
    """Independent of the frame numbers: an MT_Free image's nearest other MT_Free image in pixels is nearly always
    the same tile under another exposure. The image split leaves that copy in training for most normal test
    images; the tile split for almost none."""
    tiled = read_magnetic_tile(shared_data / "magnetic-tile")
    assert tiled.info["split"]["by"] == "tile" and (len(tiled.train), len(tiled.test)) == (755, 589)
    assert Counter(tiled.test.labels) == {NORMAL: 197, ANOMALOUS: 392}
    train_groups = {r.group for r in tiled.train.records}
    assert not train_groups & {r.group for r in tiled.test.records}

    def copy_in_training(splits) -> float:
        test = [p for p, label in zip(splits.test.paths, splits.test.labels, strict=True) if label == NORMAL]
        paths = [*splits.train.paths, *test]
        distances = torch.cdist(*(2 * [_thumbnails(paths)]))
        distances.fill_diagonal_(float("inf"))
        nearest = distances[len(splits.train) :].argmin(1)
        return (nearest < len(splits.train)).float().mean().item()

    assert copy_in_training(real_tiles) > 0.7
    assert copy_in_training(tiled) < 0.1
    # Six exposures a tile: the defect folders' groups too (Blowhole's 115 images are about 19 tiles).
    blowhole = {r.group for r in tiled.test.records if r.defect_type == "Blowhole"}
    assert 15 <= len(blowhole) <= 25


@pytest.mark.realdata
def test_real_magnetic_tile_masks(real_tiles):
    test = real_tiles.test
    blowhole = test.defect_types.index("Blowhole")
    s = test[blowhole]
    assert s.label == ANOMALOUS and s.mask.shape == (1, *s.image.shape[1:])
    assert s.mask.sum() > 0 and set(s.mask.unique().tolist()) == {0.0, 1.0}
    uneven = [i for i, d in enumerate(test.defect_types) if d == "Uneven"]
    # Only the masks are decoded here (fast); test[i] on one of them checks the dataset path too.
    empty = [i for i in uneven if not (np.asarray(load_mask(test.records[i].mask)) >= 128).any()]
    assert test[empty[0]].mask.sum() == 0
    assert len(empty) == 4 and all(test.labels[i] == ANOMALOUS for i in empty)
