"""Tests of the built-in demo dataset (cavga.data.synthetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cavga.data.synthetic import (
    DEMO_CATEGORIES,
    DEMO_DEFECTS,
    render_sample,
    validate_demo_dataset,
    write_demo_dataset,
)
from cavga.errors import ConfigError, DataError

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 9}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_dataset(root, seed=0, **SMALL)


def test_layout_and_counts(small_dataset):
    root, manifest = small_dataset
    assert manifest["categories"] == list(DEMO_CATEGORIES)
    assert len(DEMO_CATEGORIES) >= 3
    for category in DEMO_CATEGORIES:
        defects = DEMO_DEFECTS[category]
        assert len(defects) >= 3
        # 9 defect images over 4 types: 3, 2, 2, 2 in the declared order.
        expected_test = {"good": 2, **{d: (3 if i == 0 else 2) for i, d in enumerate(defects)}}
        assert manifest["counts"][category] == {"train": {"good": 3}, "test": expected_test}
        cat = root / category
        assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(["good", *defects])
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(defects)
        for defect, count in expected_test.items():
            names = sorted(p.name for p in (cat / "test" / defect).iterdir())
            assert names == [f"{i:03d}.png" for i in range(count)]
            if defect != "good":
                masks = sorted(p.name for p in (cat / "ground_truth" / defect).iterdir())
                assert masks == [f"{i:03d}_mask.png" for i in range(count)]
    readme = (root / "README.txt").read_text()
    assert "seed: 0" in readme and "MVTec" in readme
    assert sorted(p.name for p in root.iterdir()) == sorted([*DEMO_CATEGORIES, "README.txt"])


def test_images_rgb_and_masks_binary_nonempty_same_size(small_dataset):
    root, _ = small_dataset
    for image_path in sorted(root.glob("*/*/*/*.png")):
        if image_path.parts[-4] not in DEMO_CATEGORIES or image_path.parts[-3] == "ground_truth":
            continue
        with Image.open(image_path) as im:
            assert im.mode == "RGB" and im.size == (128, 128), image_path
        if image_path.parent.name == "good":
            continue
        mask_path = image_path.parents[2] / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
        with Image.open(mask_path) as im:
            assert im.mode == "L" and im.size == (128, 128), mask_path
            mask = np.asarray(im)
        assert set(np.unique(mask).tolist()) == {0, 255}, mask_path


def test_written_files_are_the_rendered_samples(small_dataset):
    root, _ = small_dataset
    for category in DEMO_CATEGORIES:
        sample = render_sample(category, 0, "train", "good", 2)
        assert np.array_equal(_read(root / category / "train" / "good" / "002.png"), sample.image)
        assert sample.mask is None and np.array_equal(sample.image, sample.clean)
        for defect in DEMO_DEFECTS[category]:
            sample = render_sample(category, 0, "test", defect, 1)
            assert np.array_equal(_read(root / category / "test" / defect / "001.png"), sample.image)
            assert np.array_equal(_read(root / category / "ground_truth" / defect / "001_mask.png"), sample.mask)


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_mask_marks_exactly_the_changed_pixels(category):
    disk = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2  # 5 px wide disk
    for defect in DEMO_DEFECTS[category]:
        for index in range(4):
            sample = render_sample(category, 7, "test", defect, index)
            mask = sample.mask > 0
            diff = np.abs(sample.image.astype(int) - sample.clean.astype(int))
            where = f"{category}/{defect}/{index}"
            # Outside the mask the image is the clean image, bit for bit.
            assert not diff[~mask].any(), where
            # Inside, nearly every pixel changed, and clearly so on average (a visible defect).
            assert (diff.max(axis=-1)[mask] > 0).mean() > 0.95, where
            assert diff[mask].mean() >= 15, where
            # Size: 0.5-10 % of the image, and thick enough (>= ~5 px) to survive a 2x downscale.
            assert 0.005 <= mask.mean() <= 0.10, where
            assert ndimage.binary_opening(mask, disk).sum() >= 0.5 * mask.sum(), where


def test_object_defects_lie_on_the_object():
    for defect in DEMO_DEFECTS["pill"]:
        for index in range(3):
            sample = render_sample("pill", 0, "test", defect, index)
            # The background is dark grey; the tablet is near white. Defects must sit on the tablet.
            tablet = ndimage.binary_fill_holes(sample.clean.mean(axis=-1) > 120)
            assert (sample.mask > 0)[~tablet].sum() == 0, f"pill/{defect}/{index}"


def test_normal_images_vary_but_keep_the_category_look():
    means = {
        c: [render_sample(c, 0, "train", "good", i).image.mean(axis=(0, 1)) for i in range(4)] for c in DEMO_CATEGORIES
    }
    for category in DEMO_CATEGORIES:
        a = render_sample(category, 0, "train", "good", 0).image
        b = render_sample(category, 0, "train", "good", 1).image
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 3, category
        # Every image's mean colour is closer to its own category's mean colour than to any other's.
        centres = {c: np.mean(v, axis=0) for c, v in means.items()}
        for m in means[category]:
            nearest = min(centres, key=lambda c: np.linalg.norm(m - centres[c]))
            assert nearest == category


def test_same_seed_gives_byte_identical_files(tmp_path):
    args = {"categories": ["wood", "pill"], "n_train": 2, "n_test_good": 1, "n_test_defect": 4}
    write_demo_dataset(tmp_path / "a", seed=5, **args)
    write_demo_dataset(tmp_path / "b", seed=5, **args)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 2 * (2 + 1 + 4 + 4) + 1
    assert files_a == files_b


def test_different_seeds_give_different_images():
    for category in DEMO_CATEGORIES:
        assert not np.array_equal(
            render_sample(category, 0, "train", "good", 0).image, render_sample(category, 1, "train", "good", 0).image
        )
        defect = DEMO_DEFECTS[category][0]
        assert not np.array_equal(
            render_sample(category, 0, "test", defect, 0).mask, render_sample(category, 1, "test", defect, 0).mask
        )


def test_other_image_size(tmp_path):
    manifest = write_demo_dataset(
        tmp_path, categories=["weave"], image_size=64, n_train=1, n_test_good=1, n_test_defect=4
    )
    assert manifest["image_size"] == 64
    info = validate_demo_dataset(tmp_path)
    assert info["image_size"] == 64 and info["counts"] == manifest["counts"]
    assert _read(tmp_path / "weave" / "ground_truth" / "hole" / "000_mask.png").shape == (64, 64)


def test_validate_returns_manifest_counts(small_dataset):
    root, manifest = small_dataset
    info = validate_demo_dataset(root)
    assert info == {"image_size": 128, "categories": sorted(DEMO_CATEGORIES), "counts": manifest["counts"]}


def _copy_of_wood(tmp_path) -> Path:
    root = tmp_path / "data"
    write_demo_dataset(root, categories=["wood"], n_train=1, n_test_good=1, n_test_defect=8)
    validate_demo_dataset(root)
    return root


def test_validate_rejects_a_removed_mask(tmp_path):
    root = _copy_of_wood(tmp_path)
    mask = root / "wood" / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    with pytest.raises(DataError, match="000_mask.png.*missing"):
        validate_demo_dataset(root)


def test_validate_rejects_a_resized_mask(tmp_path):
    root = _copy_of_wood(tmp_path)
    mask = root / "wood" / "ground_truth" / "hole" / "000_mask.png"
    Image.open(mask).resize((64, 64), Image.NEAREST).save(mask)
    with pytest.raises(DataError, match="hole.000_mask.png.*64x64"):
        validate_demo_dataset(root)


@pytest.mark.parametrize(
    ("values", "problem"),
    [(np.zeros((128, 128), np.uint8), "empty"), (np.full((128, 128), 128, np.uint8), "not binary")],
)
def test_validate_rejects_bad_mask_values(tmp_path, values, problem):
    root = _copy_of_wood(tmp_path)
    Image.fromarray(values).save(root / "wood" / "ground_truth" / "cut" / "000_mask.png")
    with pytest.raises(DataError, match=f"cut.000_mask.png.*{problem}"):
        validate_demo_dataset(root)


def test_validate_rejects_truncated_image_and_orphan_mask(tmp_path):
    root = _copy_of_wood(tmp_path)
    image = root / "wood" / "test" / "stain" / "000.png"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DataError, match="stain.000.png.*cannot read"):
        validate_demo_dataset(root)
    image.unlink()
    with pytest.raises(DataError, match="stain.000_mask.png.*no matching"):
        validate_demo_dataset(root)


def test_validate_rejects_missing_root_and_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        validate_demo_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no category"):
        validate_demo_dataset(tmp_path)
    (tmp_path / "wood" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train.good"):
        validate_demo_dataset(tmp_path)


def test_existing_output_is_replaced_only_when_it_is_demo_data(tmp_path):
    args = {"categories": ["pill"], "n_train": 1, "n_test_good": 1, "n_test_defect": 4}
    write_demo_dataset(tmp_path, seed=0, **args)
    stale = tmp_path / "pill" / "test" / "good" / "stale.png"
    stale.write_bytes(b"x")
    write_demo_dataset(tmp_path, seed=1, **args)  # an earlier demo dataset is regenerated in place
    assert not stale.exists()
    assert np.array_equal(
        _read(tmp_path / "pill" / "train" / "good" / "000.png"), render_sample("pill", 1, "train", "good", 0).image
    )
    other = tmp_path / "user"
    (other / "pill").mkdir(parents=True)
    (other / "pill" / "mine.png").write_bytes(b"x")
    with pytest.raises(DataError, match="already exists"):
        write_demo_dataset(other, **args)
    assert (other / "pill" / "mine.png").exists()
    write_demo_dataset(other, overwrite=True, **args)
    assert not (other / "pill" / "mine.png").exists()


def test_read_through_read_mvtec(small_dataset):
    """The files are a valid MVTec-layout dataset for cavga's own reader, labels and masks included."""
    mvtec = pytest.importorskip("cavga.data.mvtec")
    from cavga.data.transforms import Preprocess

    root, manifest = small_dataset
    for category in DEMO_CATEGORIES:
        splits = mvtec.read_mvtec(root, category)
        counts = manifest["counts"][category]["test"]
        assert len(splits.train) == 3 and len(splits.test) == sum(counts.values())
        for sample in splits.test:
            path = Path(sample.path)
            assert sample.image.shape == (3, 128, 128)
            assert np.array_equal((sample.image.numpy() * 255).round().astype(np.uint8), _read(path).transpose(2, 0, 1))
            if path.parent.name == "good":
                assert sample.label == 0 and sample.mask.sum() == 0
            else:
                assert sample.label == 1 and sample.defect_type == path.parent.name
                expected = render_sample(category, 0, "test", path.parent.name, int(path.stem)).mask
                assert np.array_equal(sample.mask.numpy()[0], expected / 255)
        # At the demo model's 64 px every defect is still present in the downscaled mask.
        small = mvtec.read_mvtec(root, category, Preprocess(image_size=64))
        for sample in small.test:
            assert sample.image.shape == (3, 64, 64)
            if sample.label == 1:
                assert sample.mask.sum() >= 10, sample.path


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"categories": ["marble"]}, "marble"),
        ({"categories": []}, "empty"),
        ({"image_size": 16}, "image_size"),
        ({"n_train": 0}, "n_train"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path, kwargs, name):
    with pytest.raises(ConfigError, match=name):
        write_demo_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
