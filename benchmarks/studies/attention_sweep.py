"""How the paper's anomaly map (1 - A) fares on the built-in demo data as training settings change.

Issue 3 asks `cavga demo` for pixel AuROC >= 0.80 with 1 - A. This script trains CAVGA-D_u on every demo
category for each named setting (the demo's defaults with some options changed) and seed, and records image
AuROC, pixel AuROC of 1 - A and, beside it, pixel AuROC of the calibrated residual map (same model).

    python benchmarks/studies/attention_sweep.py --out runs/sweep                       # every setting, seed 0
    python benchmarks/studies/attention_sweep.py --out runs/sweep --settings base paper_w_ae --seeds 0 1 2

Prints a table (mean over categories and seeds, with the worst seed) and writes OUT/sweep.json after every
run, so an interrupted sweep keeps what it finished; a rerun skips the (setting, seed, category) runs it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from cavga.api import Cavga
from cavga.data.synthetic import DEMO_CATEGORIES, write_demo_dataset
from cavga.engine.infer import evaluate_outputs

# The sweep's base: CAVGA-D_u as the demo trained it before the default became CAVGA-L (the paper's map 1 - A).
DEMO_OPTIONS = {"variant": "D", "setting": "u", "image_size": 64, "batch_size": 16, "w_ae": 1.0}
DEMO_EPOCHS = 20

# Each setting: options changed from the base (DEMO_OPTIONS, DEMO_EPOCHS epochs).
SETTINGS: dict[str, dict] = {
    "base": {},
    "paper_w_ae": {"w_ae": 0.01},
    "no_l_ae": {"w_ae": 0.0},
    "w_ae_0.1": {"w_ae": 0.1},
    "w_ae_0.3": {"w_ae": 0.3},
    "w_ae_3": {"w_ae": 3.0},
    "epochs_2": {"epochs": 2},
    "epochs_5": {"epochs": 5},
    "epochs_10": {"epochs": 10},
    "epochs_40": {"epochs": 40},
    "minmax": {"gradcam_normalization": "minmax"},
    "encoder_mid": {"gradcam_layer": "encoder_mid"},
    "sum_z": {"gradcam_target": "sum_z"},
    "latent_16": {"latent_channels": 16},
    "latent_256": {"latent_channels": 256},
    "stride_16": {"latent_stride": 16},
    "width_32": {"width": 32},
    "no_adv": {"w_adv": 0.0},
    "lr_1e-4": {"lr": 1e-4},
    "batch_32": {"batch_size": 32},
}


def run_one(data: Path, category: str, setting: str, seed: int, device: str, epochs: int | None = None) -> dict:
    options = {**DEMO_OPTIONS, "epochs": DEMO_EPOCHS, **SETTINGS[setting]}
    if epochs is not None:  # a smoke test of the script
        options["epochs"] = epochs
    detector = Cavga(seed=seed, device=device, **options)
    detector.fit(data, format="mvtec", category=category, progress=False)
    result = detector.evaluate(data, residual_maps=True, format="mvtec", category=category)
    residual = evaluate_outputs(detector.last_outputs_, detector.calibration_, anomaly_map="residual")
    return {
        "setting": setting,
        "options": SETTINGS[setting],
        "seed": seed,
        "category": category,
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "iou": result["iou"],
        "pixel_auroc_residual": residual["pixel_auroc"],
        "train_seconds": round(detector.train_seconds_, 1),
    }


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == setting]
        seeds = sorted({r["seed"] for r in mine})
        per_seed = {
            s: {k: float(np.mean([r[k] for r in mine if r["seed"] == s])) for k in ("image_auroc", "pixel_auroc")}
            for s in seeds
        }
        rows.append(
            {
                "setting": setting,
                "runs": len(mine),
                "seeds": seeds,
                "image_auroc": float(np.mean([r["image_auroc"] for r in mine])),
                "pixel_auroc": float(np.mean([r["pixel_auroc"] for r in mine])),
                "worst_seed_pixel_auroc": min(v["pixel_auroc"] for v in per_seed.values()),
                "worst_seed_image_auroc": min(v["image_auroc"] for v in per_seed.values()),
                "pixel_auroc_residual": float(np.mean([r["pixel_auroc_residual"] for r in mine])),
                **{
                    f"pixel_{c}": float(np.mean([r["pixel_auroc"] for r in mine if r["category"] == c]))
                    for c in sorted({r["category"] for r in mine})
                },
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a markdown table, best mean pixel AuROC of 1 - A first."""
    cats = sorted({k[6:] for row in rows for k in row if k.startswith("pixel_") and k[6:] in DEMO_CATEGORIES})
    head = ["setting", "runs", "image AuROC", "pixel AuROC 1 - A", "worst seed", *cats, "pixel AuROC residual"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: -r["pixel_auroc"]):
        cells = [row["setting"], str(row["runs"]), f"{row['image_auroc']:.3f}", f"{row['pixel_auroc']:.3f}"]
        cells += [f"{row['worst_seed_pixel_auroc']:.3f}"]
        cells += [f"{row.get('pixel_' + c, float('nan')):.3f}" for c in cats]
        cells += [f"{row['pixel_auroc_residual']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="demo data root (default: written to OUT/data)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=None, help="override every setting's epochs (smoke tests)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    if not (data / args.categories[0]).is_dir():
        write_demo_dataset(data, seed=0)
    path = args.out / "sweep.json"
    runs: list[dict] = json.loads(path.read_text())["runs"] if path.is_file() else []
    done = {(r["setting"], r["seed"], r["category"]) for r in runs}
    started = time.perf_counter()
    for setting in args.settings:
        for seed in args.seeds:
            for category in args.categories:
                if (setting, seed, category) in done:
                    continue
                run = run_one(data, category, setting, seed, args.device, args.epochs)
                runs.append(run)
                print(
                    f"{setting} seed {seed} {category}: image {run['image_auroc']:.3f} pixel(1-A) "
                    f"{run['pixel_auroc']:.3f} residual {run['pixel_auroc_residual']:.3f} "
                    f"({run['train_seconds']:.0f} s)",
                    flush=True,
                )
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"runs": runs, "summary": summarize(runs)}, indent=2) + "\n")
                os.replace(tmp, path)
    print(f"sweep finished in {time.perf_counter() - started:.0f} s; {path}")
    if runs:
        table = markdown_table(summarize(runs))
        (args.out / "sweep.md").write_text(table)
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
