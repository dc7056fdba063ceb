"""cavga.data.splits: the calibration slice and the images left out of evaluation, on in-memory records."""

from __future__ import annotations

from pathlib import Path

import pytest

from cavga.data import ANOMALOUS, NORMAL, AnomalyDataset, Record
from cavga.data.splits import exclude_paths, split_calibration
from cavga.errors import DataError


def records(n_normal: int, n_anomalous: int = 0) -> AnomalyDataset:
    rows = [Record(Path(f"good/{i}.png"), NORMAL, "good", f"good/{i}.png") for i in range(n_normal)]
    rows += [Record(Path(f"bad/{i}.png"), ANOMALOUS, "bad", f"bad/{i}.png") for i in range(n_anomalous)]
    return AnomalyDataset(rows)


def test_calibration_takes_the_asked_share_of_normal_images_only():
    data = records(10, n_anomalous=2)
    fit, cal = split_calibration(data, 0.3, seed=0)
    assert len(cal.paths) == 3  # 30 % of the 10 normal images; the anomalous ones never calibrate
    assert all(p.startswith("good/") for p in cal.paths)
    assert {"bad/0.png", "bad/1.png"} <= set(fit.paths) and len(fit.paths) == 9
    assert cal.paths == sorted(cal.paths, key=lambda p: int(Path(p).stem))  # dataset order is kept


def test_calibration_slice_follows_its_seed():
    data = records(20)
    first, again, other = (split_calibration(data, 0.25, seed)[1].paths for seed in (0, 0, 1))
    assert first == again and first != other


@pytest.mark.parametrize(("fraction", "expected"), [(0.001, 1), (0.99, 9)])
def test_calibration_keeps_at_least_one_image_on_each_side(fraction, expected):
    _, cal = split_calibration(records(10), fraction, seed=0)
    assert len(cal.paths) == expected


def test_calibration_needs_two_normal_images():
    with pytest.raises(DataError, match="at least 2 normal training images"):
        split_calibration(records(1, n_anomalous=5), 0.5, seed=0)


def test_exclude_paths_compares_resolved_paths(tmp_path):
    (tmp_path / "real").mkdir()
    for i in range(3):
        (tmp_path / "real" / f"{i}.png").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    rows = [
        Record(tmp_path / "real" / f"{i}.png", NORMAL, "good", str(tmp_path / "real" / f"{i}.png")) for i in range(3)
    ]
    kept = exclude_paths(AnomalyDataset(rows), [str(tmp_path / "link" / "1.png")])
    assert kept.paths == [str(tmp_path / "real" / "0.png"), str(tmp_path / "real" / "2.png")]


def test_group_twins_are_the_labelled_images_and_every_image_of_their_groups():
    from cavga.data.splits import with_group_twins

    records = [
        Record(image=Path(f"{name}.png"), label=ANOMALOUS, defect_type="Crack", path=f"{name}.png", group=group)
        for name, group in [("a1", "Crack/0"), ("a2", "Crack/0"), ("b1", "Crack/1"), ("c1", None), ("c2", None)]
    ]
    test = AnomalyDataset(records)
    assert with_group_twins(test, test.subset([0])) == ["a1.png", "a2.png"]
    assert with_group_twins(test, test.subset([2, 3])) == ["b1.png", "c1.png"]  # no group: the image alone
    assert with_group_twins(test, test.subset([])) == []
