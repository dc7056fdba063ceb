"""Video frames (e.g. ShanghaiTech / mSTC) as independent images: every ``every``-th frame, no time.

    <root>/<video>/<frame>.png|jpg             training videos (normal)
    <test_root>/<video>/<frame>.png|jpg        test videos
    <mask_root>/<video>/<frame>.<ext>          one mask per test frame: the frame's own file name, or its
                                               stem + ".png"; any foreground (>= 128) makes it ANOMALOUS

Frames are ordered by natural sort of their file names (frame2 before frame10), and frames 0, every,
2*every, ... of that order are kept. No video file is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cavga.data.dataset import DatasetSplits, Record, make_splits
from cavga.data.io import IMAGE_EXTENSIONS, is_image_file, list_subdirs, load_mask, natural_key
from cavga.data.transforms import MASK_THRESHOLD, Preprocess
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.errors import ConfigError, DataError


def sampled_frames(root: str | Path, every: int = 5) -> list[tuple[str, Path]]:
    """(video name, frame file) for frames 0, every, 2*every, ... of each ``<root>/<video>/`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"frame folder not found: {root}")
    videos = list_subdirs(root)
    if not videos:
        raise DataError(f"no video folders in {root}: expected <video>/<frames> ({', '.join(IMAGE_EXTENSIONS)})")
    out = []
    for video in videos:
        frames = sorted((p for p in video.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name))
        if not frames:
            raise DataError(f"no frames ({', '.join(IMAGE_EXTENSIONS)}) in video folder {video}")
        out += [(video.name, p) for p in frames[::every]]
    return out


def _frame_mask(mask_root: Path, video: str, frame: Path) -> Path:
    for candidate in (mask_root / video / frame.name, mask_root / video / f"{frame.stem}.png"):
        if candidate.is_file():
            return candidate
    raise DataError(f"test frame {frame} has no mask: expected {mask_root / video / frame.name} or .png")


def read_video_frames(
    root: str | Path,
    every: int = 5,
    mask_root: str | Path | None = None,
    test_root: str | Path | None = None,
    preprocess: Preprocess | None = None,
) -> DatasetSplits:
    """Train on every ``every``-th frame of the videos in ``root`` (all NORMAL, no masks).

    Test on every ``every``-th frame of the videos in ``test_root``, labelled from their masks under
    ``mask_root`` (both or neither; a test frame without a mask is an error). Without ``test_root`` the
    test split is empty. defect_type is "good" or "anomalous"; masks are read once here to label frames.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"every must be a positive integer, got {every!r}")
    if (mask_root is None) != (test_root is None):
        raise ConfigError("give test_root and mask_root together: test frames are labelled from their masks")
    root = Path(root)
    train = [Record(image=p, label=NORMAL, defect_type="good", path=str(p)) for _, p in sampled_frames(root, every)]
    test = []
    if test_root is not None and mask_root is not None:
        mask_root = Path(mask_root)
        for video, frame in sampled_frames(test_root, every):
            mask = _frame_mask(mask_root, video, frame)
            anomalous = bool((np.asarray(load_mask(mask)) >= MASK_THRESHOLD).any())
            test.append(
                Record(
                    image=frame,
                    label=ANOMALOUS if anomalous else NORMAL,
                    defect_type="anomalous" if anomalous else "good",
                    path=str(frame),
                    mask=mask,
                )
            )
    info = {
        "format": "video",
        "root": str(root),
        "test_root": str(test_root) if test_root is not None else None,
        "mask_root": str(mask_root) if mask_root is not None else None,
        "every": every,
    }
    return make_splits(train, test, preprocess, info)
