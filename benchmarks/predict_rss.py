"""Memory of ``cavga predict`` over a large folder: does its RSS stay flat while it streams N images?

Issue 17 asks for RSS growth under 50 MB over 10 000 images predicted from a folder. This script

1. trains a tiny CAVGA-D_u (32 px, width 8, one epoch on a small MVTec-layout folder it writes) and saves it,
   unless ``--model DIR`` names a saved model;
2. writes ``--images`` small RGB noise PNGs (48x48) into a temporary folder;
3. runs ``cavga predict MODEL FOLDER --out OUT --batch-size 32 --no-progress`` as a subprocess and samples its
   VmRSS from ``/proc/<pid>/status`` every 0.2 s.

Reported: the early RSS (once ~5% of the lines exist in ``OUT/predictions.jsonl``, or the first sample after
10 s if that comes first), the peak and the final value while streaming (up to the first sample that sees all N
lines), growth = peak - early, images/s (lines written over the time from the first line to the last) and
whether ``predictions.jsonl`` holds N lines; the peak including the interpreter's exit is reported beside them.
After ``--timeout`` seconds the subprocess is killed and what was measured is reported. Prints a Markdown table
and writes JSON:

    python benchmarks/predict_rss.py [--images 10000] [--model DIR] [--timeout 1200]
        [--out-json benchmarks/results/predict_rss.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_S = 0.2
EARLY_FRACTION = 0.05
EARLY_MAX_S = 10.0
GROWTH_LIMIT_MB = 50.0


def write_training_folder(root: Path, seed: int = 0) -> Path:
    """A small MVTec-layout category: train/good (12), test/good (3), test/spot (3) with masks."""
    rng = np.random.default_rng(seed)
    category = root / "bottle"
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (category / sub).mkdir(parents=True, exist_ok=True)

    def normal() -> np.ndarray:
        return np.clip(120 + rng.integers(-20, 20, (40, 40, 3)), 0, 255).astype(np.uint8)

    for i in range(12):
        Image.fromarray(normal()).save(category / "train/good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(normal()).save(category / "test/good" / f"{i:03d}.png")
        image, mask = normal(), np.zeros((40, 40), np.uint8)
        mask[10:20, 12:22] = 255
        image[mask > 0] = [250, 10, 10]
        Image.fromarray(image).save(category / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(category / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


def tiny_model(root: Path) -> Path:
    import cavga

    data = write_training_folder(root / "train-data")
    model = cavga.Cavga("D", "u", image_size=32, width=8, latent_channels=8, epochs=1, batch_size=4, device="cpu").fit(
        data, progress=False
    )
    return model.save(root / "model")


def write_images(folder: Path, n: int, side: int = 48, seed: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def measure(model: Path, folder: Path, out: Path, n: int, batch_size: int, timeout: float) -> dict:
    predictions = out / "predictions.jsonl"
    command = [sys.executable, "-m", "cavga.cli", "predict", str(model), str(folder), "--out", str(out)]
    command += ["--batch-size", str(batch_size), "--no-progress"]
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[float, int, int]] = []  # (seconds since start, RSS kB, lines written)
    early: tuple[float, int, int] | None = None
    timed_out = False
    while process.poll() is None:
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            process.kill()
            timed_out = True
            break
        kb = rss_kb(process.pid)
        if kb is not None:
            sample = (elapsed, kb, count_lines(predictions))
            samples.append(sample)
            if early is None and (sample[2] >= EARLY_FRACTION * n or elapsed >= EARLY_MAX_S):
                early = sample
        time.sleep(SAMPLE_S)
    _, stderr = process.communicate()
    wall = time.monotonic() - start
    lines = count_lines(predictions)
    if not samples:
        raise SystemExit(f"no RSS sample of cavga predict (exit {process.returncode}): {stderr.decode()[-2000:]}")
    early = early or samples[-1]
    # the streaming window ends at the first sample that sees all N lines; what follows is interpreter shutdown
    done_at = next((i for i, s in enumerate(samples) if s[2] >= n), len(samples) - 1)
    streaming = samples[: done_at + 1]
    first_line, last = next((s for s in samples if s[2] > 0), None), streaming[-1]
    rate = None
    if first_line is not None and last[2] > first_line[2] and last[0] > first_line[0]:
        rate = (last[2] - first_line[2]) / (last[0] - first_line[0])
    peak_kb = max(s[1] for s in streaming)
    peak_all_kb = max(s[1] for s in samples)
    step = max(1, len(samples) // 100)
    trace = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    return {
        "exit_code": process.returncode,
        "timed_out": timed_out,
        "stderr_tail": stderr.decode(errors="replace")[-2000:],
        "wall_s": round(wall, 1),
        "samples": len(samples),
        "early": {"t_s": round(early[0], 1), "lines": early[2], "rss_mb": round(early[1] / 1024, 1)},
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "final_rss_mb": round(last[1] / 1024, 1),
        "peak_rss_with_exit_mb": round(peak_all_kb / 1024, 1),
        "growth_mb": round((peak_kb - early[1]) / 1024, 1),
        "images_per_s": round(rate, 1) if rate else None,
        "lines": lines,
        "lines_ok": lines == n,
        # about 100 samples, to show the shape of the curve without a huge file
        "trace": [{"t_s": round(t, 1), "rss_mb": round(kb / 1024, 1), "lines": c} for t, kb, c in trace],
    }


def table(result: dict) -> str:
    early = result["early"]
    passed = result["growth_mb"] < GROWTH_LIMIT_MB and result["lines_ok"]
    rows = [
        "| images | batch | early RSS (MB, at line) | peak RSS (MB) | final RSS (MB) | growth (MB) | images/s "
        "| lines ok | wall (s) | peak incl. exit (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
        f"| {result['images']} | {result['batch_size']} | {early['rss_mb']} (at {early['lines']}) "
        f"| {result['peak_rss_mb']} | {result['final_rss_mb']} | {result['growth_mb']} "
        f"| {result['images_per_s']} | {'yes' if result['lines_ok'] else 'no'} | {result['wall_s']} "
        f"| {result['peak_rss_with_exit_mb']} |",
    ]
    verdict = "under" if passed else "NOT under"
    return "\n".join(rows) + f"\n\ngrowth {verdict} {GROWTH_LIMIT_MB:.0f} MB with all lines written: {passed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--model", type=Path, help="a saved model directory (default: train a tiny one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1200.0, help="kill cavga predict after this many seconds")
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cavga-rss-") as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        model = args.model or tiny_model(tmp)
        t1 = time.monotonic()
        write_images(tmp / "images", args.images)
        t2 = time.monotonic()
        result = measure(model, tmp / "images", tmp / "out", args.images, args.batch_size, args.timeout)

    result = {
        "images": args.images,
        "batch_size": args.batch_size,
        "image_side": 48,
        "model": "given" if args.model else "CAVGA-D_u 32 px, width 8, latent 8, 1 epoch (trained here)",
        "train_s": round(t1 - t0, 1),
        "write_images_s": round(t2 - t1, 1),
        **result,
        "growth_limit_mb": GROWTH_LIMIT_MB,
        "passed": result["growth_mb"] < GROWTH_LIMIT_MB and result["lines_ok"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    result["command"] = (
        f"python -m cavga.cli predict MODEL FOLDER --out OUT --batch-size {args.batch_size} --no-progress"
    )
    print(table(result))
    if result["timed_out"]:
        print(f"cavga predict was killed after --timeout {args.timeout:.0f} s")
    elif result["exit_code"] != 0:
        print(f"cavga predict exited {result['exit_code']}: {result['stderr_tail']}")
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
