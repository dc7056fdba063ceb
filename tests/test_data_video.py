"""Video frame folders: every 5th frame, per-frame masks, and the train/test/test_masks layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from cavga.data import ANOMALOUS, NORMAL, detect_format, load_dataset, read_video_frames
from cavga.errors import ConfigError, DataError

SIZE = (6, 4)


@pytest.fixture
def videos(tmp_path, image_writer, mask_writer):
    """train/v1 12 frames named frame1..frame12 (not zero-padded), train/v2 7 frames;
    test/t1 11 frames with masks: frames 5 and 10 (0-based) have foreground."""
    for i in range(1, 13):
        image_writer(tmp_path / "train" / "v1" / f"frame{i}.png", SIZE, mode="L", seed=i)
    for i in range(7):
        image_writer(tmp_path / "train" / "v2" / f"{i:04d}.jpg", SIZE, mode="L", seed=i)
    for i in range(11):
        image_writer(tmp_path / "test" / "t1" / f"{i:03d}.jpg", SIZE, mode="L", seed=i)
        mask_writer(tmp_path / "test_masks" / "t1" / f"{i:03d}.png", SIZE, (0, 0, 2, 2) if i in (5, 10) else None)
    return tmp_path


def _names(paths: list[str]) -> list[str]:
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]


def test_every_fifth_frame_natural_order(videos):
    splits = read_video_frames(videos / "train")
    # v1: natural order frame1..frame12, indices 0, 5, 10 -> frame1, frame6, frame11; v2: indices 0, 5.
    assert _names(splits.train.paths) == [
        "v1/frame1.png",
        "v1/frame6.png",
        "v1/frame11.png",
        "v2/0000.jpg",
        "v2/0005.jpg",
    ]
    assert splits.train.labels == [NORMAL] * 5 and not splits.train.has_masks
    assert len(splits.test) == 0
    assert len(read_video_frames(videos / "train", every=1).train) == 19
    assert len(read_video_frames(videos / "train", every=4).train) == 3 + 2


def test_masks_label_frames(videos):
    splits = read_video_frames(videos / "train", test_root=videos / "test", mask_root=videos / "test_masks")
    assert _names(splits.test.paths) == ["t1/000.jpg", "t1/005.jpg", "t1/010.jpg"]
    assert splits.test.labels == [NORMAL, ANOMALOUS, ANOMALOUS]
    assert splits.test.defect_types == ["good", "anomalous", "anomalous"]
    assert splits.test[0].mask.sum().item() == 0 and splits.test[1].mask.sum().item() == 4
    assert splits.info["every"] == 5 and splits.info["counts"]["test_anomalous"] == 2


def test_video_errors(videos, tmp_path):
    (videos / "test_masks" / "t1" / "005.png").unlink()
    with pytest.raises(DataError, match=r"test/t1/005\.jpg has no mask.*test_masks/t1/005\.jpg"):
        read_video_frames(videos / "train", test_root=videos / "test", mask_root=videos / "test_masks")
    with pytest.raises(ConfigError, match="every"):
        read_video_frames(videos / "train", every=0)
    with pytest.raises(ConfigError, match="together"):
        read_video_frames(videos / "train", test_root=videos / "test")
    (tmp_path / "empty_video" / "v").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no frames.*empty_video/v"):
        read_video_frames(tmp_path / "empty_video")
    (tmp_path / "no_videos").mkdir()
    with pytest.raises(DataError, match=r"no video folders.*no_videos"):
        read_video_frames(tmp_path / "no_videos")


def test_load_dataset_video_layout(videos):
    assert detect_format(videos) == "video"
    splits = load_dataset(videos)
    assert len(splits.train) == 5 and splits.test.labels == [NORMAL, ANOMALOUS, ANOMALOUS]
    assert splits.info["format"] == "video" and splits.info["channels"] == 1
    assert len(load_dataset(videos, format="video", every=10).train) == 2 + 1
