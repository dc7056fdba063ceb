"""CAVGA_u against CAVGA_w on the Magnetic Tile defect dataset (issue 4's closing benchmark).

Trains and evaluates CAVGA-D_u, CAVGA-R_u, CAVGA-D_w and CAVGA-R_w on ``../shared/data/magnetic-tile`` with
cavga's seeded split (``read_magnetic_tile`` defaults: 762 MT_Free images to train, 190 MT_Free + 392 defects
to test), grayscale. Each variant uses the same image size and every model the same epochs and seed.

The w models train on 2 % of the anomalous test images (labels only), which then leave their evaluation; the
u models are evaluated on the same reduced test set, so every row counts the same images. Prints a Markdown
table and writes JSON to ``--out``.

    .venv/bin/python benchmarks/magnetic_tile.py --epochs 10 --models D_u D_w
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import cavga
from cavga.api import DEFAULT_IMAGE_SIZE
from cavga.data import DatasetSplits, Preprocess, read_magnetic_tile
from cavga.data.splits import DEFAULT_ANOMALOUS_FRACTION, exclude_paths, sample_weak_labels

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic-tile"
MODELS = ("D_u", "D_w", "R_u", "R_w")  # D first: its pair finishes long before R's
COLUMNS = (
    ("image_auroc", "image AuROC"),
    ("pixel_auroc", "pixel AuROC"),
    ("iou", "IoU"),
    ("iou_pooled", "IoU pooled"),
    ("aupro", "AUPRO"),
    ("balanced_accuracy", "bal. acc."),
    ("n_images", "test images"),
    ("train_seconds", "train s"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size-d", type=int, default=DEFAULT_IMAGE_SIZE["D"])
    p.add_argument("--image-size-r", type=int, default=DEFAULT_IMAGE_SIZE["R"])
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the 2 %% weak-label sample")
    p.add_argument("--anomalous-fraction", type=float, default=DEFAULT_ANOMALOUS_FRACTION)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "magnetic_tile.json")
    p.add_argument("--progress", action="store_true", help="show the training progress bars")
    return p.parse_args(argv)


def run_model(name: str, splits: DatasetSplits, image_size: int, args: argparse.Namespace) -> dict:
    variant, setting = name.split("_")
    weak = {"anomalous_fraction": args.anomalous_fraction} if setting == "w" else {}
    detector = cavga.Cavga(
        variant,
        setting,
        image_size=image_size,
        channels=1,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        **weak,
    )
    detector.fit(splits, progress=args.progress)
    if setting == "u":
        # The same test images as the w models: leave out the seeded sample a w model would train on.
        sample = sample_weak_labels(splits.test, args.anomalous_fraction, None, args.seed)
        held = [splits.test.paths[i] for i in sample]
        evaluated = DatasetSplits(splits.train, exclude_paths(splits.test, held), splits.info)
    else:
        evaluated = splits
    start = time.perf_counter()
    result = detector.evaluate(evaluated)
    return {
        "model": f"CAVGA-{variant}_{setting}",
        "variant": variant,
        "setting": setting,
        "image_size": image_size,
        **result,
        "train_seconds": round(detector.train_seconds_, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "n_train": detector.data_info_["n_train"],
        "n_calibration": detector.data_info_["n_calibration"],
        "weak_labels": detector.data_info_.get("weak_labels"),
        "excluded_paths": list(getattr(detector, "excluded_paths_", [])),
        "last_epoch_losses": detector.history_[-1] if detector.history_ else None,
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("n/a")
            elif isinstance(value, float) and key != "train_seconds":
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"Magnetic Tile data not found at {args.data}", file=sys.stderr)
        return 2
    sizes = {"D": args.image_size_d, "R": args.image_size_r}
    splits_by_size: dict[int, DatasetSplits] = {}
    rows = []
    started = time.perf_counter()
    for name in args.models:
        size = sizes[name[0]]
        if size not in splits_by_size:
            splits_by_size[size] = read_magnetic_tile(args.data, preprocess=Preprocess(size, channels=1))
        row = run_model(name, splits_by_size[size], size, args)
        rows.append(row)
        print(f"{row['model']}: {json.dumps({k: row[k] for k, _ in COLUMNS})}", flush=True)
        write_report(args, argv, sizes, splits_by_size, rows, started)  # after every model: partial runs count
    print()
    print(markdown_table(rows))
    print(f"\nwrote {args.out}")
    return 0


def write_report(args, argv, sizes, splits_by_size, rows, started) -> None:
    table = markdown_table(rows)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "data": str(args.data),
        "split": next(iter(splits_by_size.values())).info.get("split") if splits_by_size else None,
        "epochs": args.epochs,
        "seed": args.seed,
        "image_size": sizes,
        "batch_size": args.batch_size,
        "anomalous_fraction": args.anomalous_fraction,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "device": args.device,
        "total_seconds": round(time.perf_counter() - started, 1),
        "results": rows,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
