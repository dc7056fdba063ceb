"""Pixel and image AuROC by defect type: which types a pooled figure is made of.

The training-free PaDiM baseline (frozen ImageNet Lite0 features, 256 px) on Magnetic Tile's seeded split; each
defect type is scored against the normal test images alone, beside the pooled figures and the share of the
split's defect pixels each type holds.

    python benchmarks/studies/defect_types.py --out runs/defect-types

Prints a markdown table and writes OUT/defect_types.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cavga import metrics
from cavga.baselines import PadimBaseline
from cavga.data import Preprocess, load_dataset

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def by_type(outputs) -> dict[str, dict]:
    types = np.asarray(outputs.defect_types)
    normal = outputs.labels == 0
    maps = outputs.raw_maps / max(float(outputs.raw_maps.max()), 1e-12)  # the raw ranking on [0, 1]
    total = int(outputs.masks[~normal].sum())
    rows = {}
    for name in sorted(set(types[~normal])):
        chosen = (types == name) | normal
        pixels = int(outputs.masks[types == name].sum())
        rows[name] = {
            "pixel_auroc": metrics.pixel_auroc(maps[chosen], outputs.masks[chosen]),
            "image_auroc": metrics.image_auroc(outputs.raw_scores[chosen], outputs.labels[chosen]),
            "images": int((types == name).sum()),
            "defect_pixel_share": pixels / max(total, 1),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED / "magnetic-tile")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--split-by", choices=["tile", "image"], default="tile", help="image: the older figures' split")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    preprocess = Preprocess(args.image_size, 1)
    splits = load_dataset(args.data, format="magnetic_tile", seed=0, split=args.split_by, preprocess=preprocess)
    baseline = PadimBaseline(image_size=args.image_size, channels=1, seed=0, device="cpu").fit(splits)
    pooled = baseline.evaluate(splits)
    rows = by_type(baseline.last_outputs_)
    result = {
        "data": str(args.data),
        "model": "PaDiM",
        "image_size": args.image_size,
        "split": splits.info["split"],
        "pooled": {k: pooled[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
        "by_type": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "defect_types.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| defect type | images | share of defect pixels | pixel AuROC | image AuROC |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['images']} | {row['defect_pixel_share']:.2f} | {row['pixel_auroc']:.3f} | "
              f"{row['image_auroc']:.3f} |")  # fmt: skip
    p = result["pooled"]
    print(f"| pooled | | 1.00 | {p['pixel_auroc']:.3f} | {p['image_auroc']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
