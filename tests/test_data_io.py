"""load_image / load_mask, Preprocess, and AnomalyDataset itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cavga.data import (
    ANOMALOUS,
    NORMAL,
    AnomalyDataset,
    Preprocess,
    Record,
    collate_samples,
    load_image,
    load_mask,
)
from cavga.errors import ConfigError, DataError

# ---------------------------------------------------------------- load_image / load_mask


def test_load_image_keeps_gray_and_rgb(tmp_path, image_writer):
    gray = image_writer(tmp_path / "g.png", (5, 4), "L")
    rgb = image_writer(tmp_path / "c.png", (5, 4), "RGB")
    g, c = load_image(tmp_path / "g.png"), load_image(tmp_path / "c.png")
    assert (g.mode, g.size) == ("L", (5, 4)) and np.array_equal(np.asarray(g), gray)
    assert (c.mode, c.size) == ("RGB", (5, 4)) and np.array_equal(np.asarray(c), rgb)


def test_load_image_drops_alpha(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0  # fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert np.asarray(img).reshape(-1, 3).tolist() == [[10, 20, 30]] * 6  # colour kept, not premultiplied

    la = Image.new("LA", (3, 2), (77, 0))
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.mode == "L" and np.all(np.asarray(img) == 77)


def test_load_image_palette_to_rgb(tmp_path):
    p = Image.new("P", (2, 2))
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    arr = np.asarray(load_image(tmp_path / "p.png"))
    assert arr.shape == (2, 2, 3)
    assert arr[0, 1].tolist() == [200, 100, 50] and arr[0, 0].tolist() == [0, 0, 0]


def test_load_image_16_bit_scaled(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "w.png")
    assert Image.open(tmp_path / "w.png").mode.startswith("I")  # the file really is 16-bit
    img = load_image(tmp_path / "w.png")
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 1, 128, 255]]  # v * 255 / 65535, rounded


def test_load_mask_colour_takes_channel_max(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)  # pure red: luminance 76 would be background
    Image.fromarray(rgb).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.mode == "L" and np.asarray(mask).tolist() == [[255, 0], [0, 0]]


def test_load_errors_name_the_file(tmp_path, image_writer):
    with pytest.raises(DataError, match="not found.*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.png.*|empty.*zero\.png"):
        load_image(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("not an image at all")
    with pytest.raises(DataError, match=r"text\.png.*not an image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(DataError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(DataError, match=r"mask file.*nomask\.png"):
        load_mask(tmp_path / "nomask.png")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image_is_refused(tmp_path, image_writer, ext):
    path = tmp_path / f"t{ext}"
    image_writer(path, (64, 64), "RGB")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"t\{ext}.*truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_is_refused(tmp_path, image_writer, monkeypatch):
    image_writer(tmp_path / "big.png", (40, 30), "L")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 px > limit: PIL warns; 2x limit: PIL errors
    with pytest.raises(DataError, match=r"big\.png.*decompression bomb"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(DataError, match=r"big\.png.*decompression bomb"):
        load_image(tmp_path / "big.png")


# ---------------------------------------------------------------- Preprocess


def test_preprocess_tensor_shape_range_and_values():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    t = Preprocess()(Image.fromarray(pixels))
    assert t.dtype == torch.float32 and t.shape == (1, 3, 4)
    assert torch.allclose(t[0], torch.from_numpy(pixels.astype(np.float32) / 255))

    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    t = Preprocess()(Image.fromarray(rgb))
    assert t.shape == (3, 3, 4)
    assert torch.allclose(t[2], torch.from_numpy(rgb[..., 2].astype(np.float32) / 255))  # CHW order


def test_preprocess_resize_and_channels():
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (10, 14, 3), dtype=np.uint8))
    t = Preprocess(image_size=(6, 8), channels=1)(rgb)
    assert t.shape == (1, 6, 8)
    expected = np.asarray(rgb.convert("L").resize((8, 6), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert torch.allclose(t[0], torch.from_numpy(expected))
    assert Preprocess(image_size=5)(rgb).shape == (3, 5, 5)  # int -> square
    gray = Image.fromarray(np.full((4, 4), 9, dtype=np.uint8))
    t3 = Preprocess(channels=3)(gray)
    assert t3.shape == (3, 4, 4) and torch.allclose(t3, torch.full((3, 4, 4), 9 / 255))
    assert torch.equal(Preprocess(7, 1)(rgb), Preprocess(7, 1)(rgb))  # deterministic


def test_mask_nearest_resize_keeps_binary_and_threshold():
    hand = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    t = Preprocess(image_size=4).mask(Image.fromarray(hand))
    expected = np.repeat(np.repeat(hand // 255, 2, axis=0), 2, axis=1)  # nearest x2 = repeat each pixel
    assert t.dtype == torch.float32 and t.shape == (1, 4, 4)
    assert np.array_equal(t[0].numpy(), expected.astype(np.float32))
    odd = Preprocess(image_size=(7, 5)).mask(Image.fromarray(hand))
    assert set(odd.unique().tolist()) <= {0.0, 1.0} and odd.shape == (1, 7, 5)
    edge = Preprocess().mask(Image.fromarray(np.array([[127, 128, 0, 255]], dtype=np.uint8)))
    assert edge[0].tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_preprocess_dict_round_trip_and_validation():
    p = Preprocess(image_size=32, channels=3)
    d = json.loads(json.dumps(p.to_dict()))
    assert d == {"image_size": [32, 32], "channels": 3}
    assert Preprocess.from_dict(d) == p
    assert Preprocess.from_dict(Preprocess().to_dict()) == Preprocess()
    with pytest.raises(ConfigError, match="bogus"):
        Preprocess.from_dict({"image_size": 4, "bogus": 1})
    with pytest.raises(ConfigError, match="channels"):
        Preprocess(channels=2)
    with pytest.raises(ConfigError, match="image_size"):
        Preprocess(image_size=0)


# ---------------------------------------------------------------- AnomalyDataset


def test_dataset_lazy_samples_subset_and_loader(tmp_path, image_writer, mask_writer):
    image_writer(tmp_path / "a.png", (8, 6), "L", seed=1)
    image_writer(tmp_path / "b.png", (8, 6), "L", seed=2)
    expected_mask = mask_writer(tmp_path / "b_mask.png", (8, 6), (2, 1, 5, 3))
    records = [
        Record(image=tmp_path / "a.png", label=NORMAL, defect_type="good", path="a", zero_mask=True),
        Record(image=tmp_path / "b.png", label=ANOMALOUS, defect_type="hole", path="b", mask=tmp_path / "b_mask.png"),
    ]
    ds = AnomalyDataset(records, Preprocess())
    assert len(ds) == 2 and ds.labels == [0, 1] and ds.paths == ["a", "b"] and ds.defect_types == ["good", "hole"]
    assert ds.has_masks
    a, b = ds[0], ds[1]
    assert torch.equal(a.mask, torch.zeros(1, 6, 8))
    assert np.array_equal(b.mask[0].numpy(), expected_mask.astype(np.float32))
    assert (b.label, b.defect_type, b.path) == (ANOMALOUS, "hole", "b")
    assert ds[-1].path == "b"
    with pytest.raises(IndexError):
        ds[2]
    sub = ds.subset([1])
    assert sub.paths == ["b"] and sub.preprocess == ds.preprocess
    assert not AnomalyDataset(records[:1][:0]).has_masks
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_samples)))
    assert batch.images.shape == (2, 1, 6, 8) and batch.labels.tolist() == [0, 1]


def test_dataset_from_array():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    records = [Record(image=i, label=NORMAL, defect_type="7", path=f"f#{i}") for i in range(2)]
    ds = AnomalyDataset(records, Preprocess(), array=array)
    s = ds[1]
    assert s.mask is None and torch.allclose(s.image[0], torch.from_numpy(array[1] / 255).float())
    with pytest.raises(ConfigError):
        AnomalyDataset(records)


def test_dataset_mask_size_mismatch_names_both(tmp_path, image_writer, mask_writer):
    image_writer(tmp_path / "img.png", (8, 6))
    mask_writer(tmp_path / "img_mask.png", (8, 7))
    ds = AnomalyDataset(
        [Record(tmp_path / "img.png", ANOMALOUS, "x", str(tmp_path / "img.png"), mask=tmp_path / "img_mask.png")],
        Preprocess(image_size=4),  # resizing would hide the mismatch: it must be checked before
    )
    with pytest.raises(DataError, match=r"img_mask\.png.*8x7.*img\.png.*8x6"):
        ds[0]


def test_dataset_mixed_channels_detected_lazily(tmp_path, image_writer):
    image_writer(tmp_path / "gray.png", mode="L")
    image_writer(tmp_path / "colour.png", mode="RGB")
    records = [
        Record(tmp_path / "gray.png", NORMAL, "good", "gray.png"),
        Record(tmp_path / "colour.png", NORMAL, "good", "colour.png"),
    ]
    ds = AnomalyDataset(records)
    ds[0]
    with pytest.raises(DataError, match=r"mixed channel.*gray\.png.*colour\.png"):
        ds[1]
    converted = AnomalyDataset(records, Preprocess(channels=3))
    assert converted[0].image.shape[0] == 3 and converted[1].image.shape[0] == 3
