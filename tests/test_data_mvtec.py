"""read_mvtec and its layout errors, on tiny MVTec-layout folders made on the fly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cavga.data import ANOMALOUS, NORMAL, Preprocess, detect_format, list_mvtec_categories, load_dataset, read_mvtec
from cavga.errors import DataError

SIZE = (8, 6)  # PIL (W, H)


@pytest.fixture
def mvtec(tmp_path, image_writer, mask_writer):
    """<root>/widget: 3 train/good, test/good 2, test/crack 2, test/scratch 1 (RGB, masks 0/255)."""
    cat = tmp_path / "mvtec" / "widget"
    for i in range(3):
        image_writer(cat / "train" / "good" / f"{i:03d}.png", SIZE, seed=i)
    for i in range(2):
        image_writer(cat / "test" / "good" / f"{i:03d}.png", SIZE, seed=10 + i)
    masks = {}
    for defect, n in (("crack", 2), ("scratch", 1)):
        for i in range(n):
            image_writer(cat / "test" / defect / f"{i:03d}.png", SIZE, seed=20 + i)
            box = (i, 1, i + 3, 4)
            masks[(defect, i)] = mask_writer(cat / "ground_truth" / defect / f"{i:03d}_mask.png", SIZE, box)
    (cat / "train" / "good" / "notes.txt").write_text("ignored")
    (cat / "license.txt").write_text("ignored")
    return tmp_path / "mvtec", masks


def test_counts_labels_order_and_masks(mvtec):
    root, masks = mvtec
    splits = read_mvtec(root, "widget")
    train, test = splits.train, splits.test
    assert len(train) == 3 and train.labels == [NORMAL] * 3 and not train.has_masks
    assert train[0].mask is None and train[0].image.shape == (3, 6, 8)
    assert test.defect_types == ["crack", "crack", "good", "good", "scratch"]  # sorted folders, then files
    assert test.labels == [ANOMALOUS, ANOMALOUS, NORMAL, NORMAL, ANOMALOUS]
    assert [p.split("/")[-1] for p in test.paths] == ["000.png", "001.png", "000.png", "001.png", "000.png"]
    assert test.has_masks
    good = test[2]
    assert good.mask is not None and torch.equal(good.mask, torch.zeros(1, 6, 8))
    crack1 = test[1]
    assert np.array_equal(crack1.mask[0].numpy(), masks[("crack", 1)].astype(np.float32))
    counts = splits.info["counts"]
    assert (counts["train"], counts["test"], counts["test_normal"], counts["test_anomalous"]) == (3, 5, 2, 3)
    assert splits.info["format"] == "mvtec" and splits.info["category"] == "widget"
    assert splits.info["channels"] == 3


def test_resize_keeps_masks_binary(mvtec):
    root, masks = mvtec
    test = read_mvtec(root, "widget", Preprocess(image_size=16, channels=1)).test
    s = test[0]
    assert s.image.shape == (1, 16, 16) and s.mask.shape == (1, 16, 16)
    assert set(s.mask.unique().tolist()) == {0.0, 1.0}
    # Nearest: output pixel o takes source pixel floor((o + 0.5) * src / dst), independently of PIL.
    rows = np.floor((np.arange(16) + 0.5) * 6 / 16).astype(int)
    cols = np.floor((np.arange(16) + 0.5) * 8 / 16).astype(int)
    expected = masks[("crack", 0)][rows][:, cols]
    assert np.array_equal(s.mask[0].numpy(), expected.astype(np.float32))


def test_categories_and_unknown_category(mvtec, image_writer):
    root, _ = mvtec
    image_writer(root / "bolt" / "train" / "good" / "0.png")
    (root / "bolt" / "test" / "good").mkdir(parents=True)
    image_writer(root / "bolt" / "test" / "good" / "0.png")
    (root / "not_a_category").mkdir()
    assert list_mvtec_categories(root) == ["bolt", "widget"]
    with pytest.raises(DataError, match=r"'toaster'.*bolt, widget"):
        read_mvtec(root, "toaster")
    with pytest.raises(DataError, match=r"not_a_category.*expected.*train/good"):
        read_mvtec(root, "not_a_category")
    with pytest.raises(DataError, match="bolt, widget"):
        load_dataset(root)  # two categories and none chosen
    assert load_dataset(root, category="bolt").info["counts"]["test"] == 1


def test_missing_mask_names_image_and_expected_path(mvtec):
    root, _ = mvtec
    (root / "widget" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"scratch/000\.png.*expected .*ground_truth/scratch/000_mask\.png"):
        read_mvtec(root, "widget")


def test_empty_train_folder(mvtec):
    root, _ = mvtec
    for p in (root / "widget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"no images.*train/good"):
        read_mvtec(root, "widget")


def test_empty_test_folder(tmp_path, image_writer):
    image_writer(tmp_path / "c" / "train" / "good" / "0.png")
    (tmp_path / "c" / "test").mkdir()
    with pytest.raises(DataError, match=r"no defect folders.*test"):
        read_mvtec(tmp_path, "c")


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_mvtec(tmp_path / "absent", "x")


def test_mask_size_mismatch_and_truncated_image(mvtec, mask_writer):
    root, _ = mvtec
    mask_writer(root / "widget" / "ground_truth" / "crack" / "000_mask.png", (9, 6))
    test = read_mvtec(root, "widget", Preprocess(image_size=4)).test
    with pytest.raises(DataError, match=r"000_mask\.png.*9x6.*crack/000\.png.*8x6"):
        test[0]
    bad = root / "widget" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=r"good/001\.png"):
        test[3]


def test_mixed_channels_name_one_file_of_each(mvtec, image_writer):
    root, _ = mvtec
    image_writer(root / "widget" / "train" / "good" / "001.png", SIZE, mode="L")
    with pytest.raises(DataError, match=r"mixed channel.*train/good/001\.png.*(train/good/000\.png)"):
        read_mvtec(root, "widget")
    splits = read_mvtec(root, "widget", Preprocess(channels=3))  # converting is the way out
    assert splits.train[1].image.shape[0] == 3


def test_grayscale_jpeg_uppercase_extensions(tmp_path, image_writer, mask_writer):
    cat = tmp_path / "tile"
    image_writer(cat / "train" / "good" / "a.JPG", SIZE, mode="L")
    image_writer(cat / "test" / "good" / "b.Png", SIZE, mode="L")
    image_writer(cat / "test" / "bad" / "c.bmp", SIZE, mode="L")
    mask_writer(cat / "ground_truth" / "bad" / "c_mask.png", SIZE)
    splits = read_mvtec(tmp_path, "tile")
    assert splits.info["channels"] == 1
    assert splits.test.paths[0].endswith("c.bmp") and splits.test[0].image.shape == (1, 6, 8)


def test_load_dataset_detects_and_accepts_category_folder(mvtec):
    root, _ = mvtec
    assert detect_format(root) == "mvtec"
    assert detect_format(root / "widget") == "mvtec"
    by_root = load_dataset(root)
    by_category = load_dataset(root / "widget")
    assert by_root.test.paths == by_category.test.paths
    assert by_category.info["category"] == "widget"


def test_memo_decodes_each_file_once_and_changes_nothing(mvtec, monkeypatch):
    import cavga.data.dataset as dataset_module

    root, _ = mvtec
    plain = load_dataset(root, category="widget", preprocess=Preprocess(16, 3))
    calls = []
    real_load_image = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: calls.append(path) or real_load_image(path))
    memo: dict = {}
    cached = dataset_module.AnomalyDataset(plain.test.records, plain.test.preprocess, plain.test.array, memo=memo)
    part = cached.subset(range(1, len(cached)))  # a subset shares the memo
    for _ in range(3):
        for i in range(len(cached)):
            a, b = cached[i], plain.test[i]
            assert torch.equal(a.image, b.image) and a.path == b.path and a.label == b.label
            assert (a.mask is None) == (b.mask is None) and (a.mask is None or torch.equal(a.mask, b.mask))
        part[0]
    # plain.test decoded each file 3 times; the memo dataset once, and the subset not at all.
    assert len(calls) == 4 * len(cached)
    assert len(memo) == len(cached)
