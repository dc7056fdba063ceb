"""``cavga predict`` streams and resumes: unreadable files are reported and skipped, a run killed with SIGKILL and
run again writes the same predictions as one that was never interrupted, a torn last line is dropped.

One tiny CPU model for the module; real files and real ``cavga predict`` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cavga.report.outputs import read_jsonl
from tiny_data import write_tiny_model

N_IMAGES, N_CORRUPT = 200, 5
CAVGA = [sys.executable, "-m", "cavga.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("stream"))


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (and holds none): refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """200 files in two subfolders (the same stems in both): 195 images and 5 that cannot be read."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    good = N_IMAGES - N_CORRUPT
    for i in range(good):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (24 + i % 9, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i // 2:03d}.png")
    png = (root / "a" / "000.png").read_bytes()
    (root / "a" / "bad_empty.png").write_bytes(b"")
    (root / "a" / "bad_truncated.png").write_bytes(png[: len(png) // 2])
    (root / "b" / "bad_text.png").write_text("not an image\n")
    (root / "b" / "bad_noise.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "b" / "bad_huge.png").write_bytes(_huge_png_header(40_000, 40_000))  # 1.6e9 pixels
    return root


def predict(model: Path, folder: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [*CAVGA, "predict", str(model), str(folder), "--out", str(out), "--batch-size", "8", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def line_set(out: Path) -> set[str]:
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "an image was written twice"
    return set(lines)


@pytest.fixture(scope="module")
def uninterrupted(model_dir, folder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("full") / "out"
    return out, predict(model_dir, folder, out)


@pytest.mark.slow
def test_corrupt_files_are_reported_and_the_run_goes_on(uninterrupted, model_dir, folder):
    out, done = uninterrupted
    assert done.returncode == 1, done.stderr
    assert f"{N_CORRUPT} file(s) could not be read" in done.stderr
    lines = [json.loads(text) for text in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == N_IMAGES - N_CORRUPT
    for line in lines[:5]:
        assert (out / line["heatmap"]).is_file() and (out / line["overlay"]).is_file()
    assert len({line["heatmap"] for line in lines}) == len(lines)  # a/000.png and b/000.png both kept
    errors = [json.loads(text) for text in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in errors) == sorted(
        ["bad_empty.png", "bad_truncated.png", "bad_text.png", "bad_noise.jpg", "bad_huge.png"]
    )
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert "empty" in reasons["bad_empty.png"] and "decompression bomb" in reasons["bad_huge.png"]

    # A rerun on the same --out skips the 195, tries the 5 again; --skip-errors makes it exit 0.
    again = predict(model_dir, folder, out, "--skip-errors")
    assert again.returncode == 0, again.stderr
    assert "wrote predictions for 0 images (195 already there)" in again.stdout
    assert len((out / "predictions.jsonl").read_text().splitlines()) == N_IMAGES - N_CORRUPT
    assert len((out / "errors.jsonl").read_text().splitlines()) == N_CORRUPT


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_predictions(uninterrupted, model_dir, folder, tmp_path):
    full, _ = uninterrupted
    expected = line_set(full)
    out = tmp_path / "out"
    command = [*CAVGA, "predict", str(model_dir), str(folder), "--out", str(out), "--batch-size", "8"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (target.is_file() and target.stat().st_size > 0):
            assert process.poll() is None, "cavga predict ended before it wrote anything"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(process.pid, signal.SIGSTOP)  # halt it where it is, then kill it as a power cut would
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    partial = target.read_text().splitlines()
    assert 0 < len(partial) < N_IMAGES - N_CORRUPT, "the run was not interrupted halfway"
    with open(target, "a") as f:  # and a crash in the middle of a write
        f.write(partial[-1][: len(partial[-1]) // 2])

    rerun = predict(model_dir, folder, out)
    assert rerun.returncode == 1, rerun.stderr
    assert line_set(out) == expected
    for line in map(json.loads, expected):
        assert (out / line["pred_mask"]).read_bytes() == (full / line["pred_mask"]).read_bytes()


def test_overwrite_starts_again_and_a_torn_line_is_dropped(model_dir, folder, tmp_path):
    from cavga.predict import predict_folder

    files = sorted((folder / "a").glob("00[0-5].png"))
    out = tmp_path / "out"
    first = predict_folder(model_dir, files, out, batch_size=4)
    assert (first.n_written, first.n_skipped, first.n_failed) == (6, 0, 0)
    text = (out / "predictions.jsonl").read_text()
    (out / "predictions.jsonl").write_text(text + '{"path": "torn')
    resumed = predict_folder(model_dir, files, out, batch_size=4)
    assert (resumed.n_written, resumed.n_skipped) == (0, 6)
    assert (out / "predictions.jsonl").read_text() == text  # the torn tail was cut off

    (out / "heatmaps" / "stale.png").write_bytes(b"")
    again = predict_folder(model_dir, files[:2], out, batch_size=4, resume=False)
    assert (again.n_written, again.n_skipped) == (2, 0)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert not (out / "heatmaps" / "stale.png").exists()


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a": \n')  # torn, with its newline on disk
    assert read_jsonl(path) == [{"a": 1}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')  # damage before the last line is not a crash's
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []
