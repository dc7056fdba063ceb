"""detect_format and load_dataset: layouts that fit nothing, bad options."""

from __future__ import annotations

import pytest

from cavga.data import detect_format, load_dataset
from cavga.errors import ConfigError, DataError


def test_nothing_fits_says_what_was_expected(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(
        DataError, match=r"(?s)cannot tell the layout.*mvtec:.*magnetic_tile:.*oneclass:.*video:.*folders:"
    ):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="not found"):
        detect_format(tmp_path / "absent")
    with pytest.raises(DataError, match="cannot tell the layout"):
        load_dataset(tmp_path)


def test_bad_options(tmp_path, image_writer):
    image_writer(tmp_path / "normal" / "a.png")
    image_writer(tmp_path / "normal" / "b.png")
    known = "known: mvtec, magnetic_tile, folders, oneclass, video"
    for unknown in ("coco", "folder", "pairs"):  # the last two: aliases of development versions, gone
        with pytest.raises(ConfigError, match=f"unknown dataset format '{unknown}'; {known}$"):
            load_dataset(tmp_path, format=unknown)
    assert len(load_dataset(tmp_path, format="folders", test_fraction=0.5).train) == 1
    with pytest.raises(ConfigError, match=r"\['normal_class'\].*'folders'"):
        load_dataset(tmp_path, normal_class=3)
    with pytest.raises(ConfigError, match="category"):
        load_dataset(tmp_path, category="bottle")
    # None-valued options are ignored, so a CLI can pass every option through.
    splits = load_dataset(tmp_path, normal_class=None, test_fraction=0.5, seed=None)
    assert len(splits.train) == 1 and len(splits.test) == 1
    with pytest.raises(DataError, match=r"no MVTec categories"):
        load_dataset(tmp_path, format="mvtec")


def test_demo_data_reads_as_mvtec(tmp_path):
    synthetic = pytest.importorskip("cavga.data.synthetic")
    category = synthetic.DEMO_CATEGORIES[0]
    synthetic.write_demo_dataset(
        tmp_path, seed=0, categories=[category], image_size=64, n_train=2, n_test_good=1, n_test_defect=2
    )
    assert detect_format(tmp_path) == "mvtec"
    splits = load_dataset(tmp_path)  # the only category
    assert len(splits.train) == 2 and len(splits.test) == 3 and splits.test.has_masks
    sample = splits.test[len(splits.test) - 1]
    assert sample.mask is not None and sample.mask.shape[1:] == sample.image.shape[1:]
