"""How the default model's 0.5 thresholds are set: threshold rules for the image score and the mask, compared on
models that ``benchmarks/studies/map_study.py`` trained and saved (OUT/models/DATASET/L-frozen).

Every rule uses normal training images only. Image rules: a quantile of the raw scores of the 10 % held-out
slice, or of the cross-fitted scores of every normal training image (each from a Gaussian fitted without it,
:func:`cavga.engine.infer.cross_fitted_latent_scores`). Mask rules, in images called anomalous: every pixel above
the threshold, or only those that also reach a fraction of the image's peak (the calibration's
``map_peak_fraction``). The defaults were chosen on the demo categories; the other datasets are reported with the
same rules.

    python benchmarks/studies/map_study.py --out runs/map-study --models L-frozen   # trains and saves the models
    python benchmarks/studies/calibration_study.py --out runs/map-study   # writes OUT/calibration_study.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset

from cavga.data.splits import split_calibration
from cavga.engine.infer import CROSS_FITTED, cross_fitted_latent_scores, infer_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_study import DATASETS, data_args, trained_model  # noqa: E402

IMAGE_RULES = ("held-out q0.95", "held-out max", "cross-fitted q0.95 (default)", "cross-fitted q0.99")
PEAK_FRACTIONS = (0.0, 0.4, 0.5, 0.6)  # 0: every pixel above the threshold; default 0.5


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    called = scores > threshold
    tpr, tnr = float(called[labels == 1].mean()), float((~called[labels == 0]).mean())
    return {"balanced_accuracy": 0.5 * (tpr + tnr), "tpr": tpr, "tnr": tnr}


def mean_iou(maps: np.ndarray, masks: np.ndarray, threshold: float, fraction: float) -> float:
    """IoU averaged over images with a defect mask; a pixel is predicted where it exceeds max(threshold,
    fraction * its image's peak) (nothing in an image whose peak stays below the threshold)."""
    values = []
    for amap, mask in zip(maps, masks, strict=True):
        if mask.any():
            pred = amap > max(threshold, fraction * float(amap.max()))
            values.append((pred & mask).sum() / (pred | mask).sum())
    return float(np.mean(values))


def study(dataset: str, out: Path) -> dict:
    root, kwargs = data_args(dataset, out)
    detector, _ = trained_model(dataset, "L-frozen", out, device="cpu")
    splits = detector._load(root, **kwargs)
    train, held_out = split_calibration(
        splits.train, detector.train_config.calibration_fraction, detector.train_config.seed
    )
    held = infer_dataset(detector.model_, held_out, choice=CROSS_FITTED).raw_scores
    crossed = cross_fitted_latent_scores(detector.model_, ConcatDataset([train, held_out]))
    test = infer_dataset(detector.model_, splits.test, choice=CROSS_FITTED)
    thresholds = {
        IMAGE_RULES[0]: np.quantile(held, 0.95),
        IMAGE_RULES[1]: held.max(),
        IMAGE_RULES[2]: np.quantile(crossed, 0.95),
        IMAGE_RULES[3]: np.quantile(crossed, 0.99),
    }
    rows = {}
    for rule, threshold in thresholds.items():
        row = {"threshold": float(threshold), **balanced_accuracy(test.raw_scores, test.labels, threshold)}
        for fraction in PEAK_FRACTIONS:
            row[f"iou_peak_{fraction}"] = mean_iou(test.raw_maps, test.masks, threshold, fraction)
        rows[rule] = row
    return {"dataset": dataset, "n_held_out": len(held), "n_cross_fitted": len(crossed), "rules": rows}


def markdown(runs: list[dict]) -> str:
    head = "| dataset | image rule | threshold | balanced acc. (TPR / TNR) | " + " | ".join(
        f"IoU, peak {f}" for f in PEAK_FRACTIONS
    )
    lines = [head + " |", "|---" * (4 + len(PEAK_FRACTIONS)) + "|"]
    for run in runs:
        for rule, r in run["rules"].items():
            ious = " | ".join(f"{r[f'iou_peak_{f}']:.3f}" for f in PEAK_FRACTIONS)
            lines.append(
                f"| {run['dataset']} | {rule} | {r['threshold']:.2f} | {r['balanced_accuracy']:.3f} "
                f"({r['tpr']:.3f} / {r['tnr']:.3f}) | {ious} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the map study's OUT (its saved models)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    args = parser.parse_args(argv)
    runs = []
    for dataset in args.datasets:
        if not (args.out / "models" / dataset.replace("/", "_") / "L-frozen" / "config.json").exists():
            print(f"skipping {dataset}: no saved L-frozen model under {args.out / 'models'}", file=sys.stderr)
            continue
        runs.append(study(dataset, args.out))
        print(markdown(runs[-1:]), flush=True)
    (args.out / "calibration_study.json").write_text(json.dumps(runs, indent=1) + "\n")
    (args.out / "calibration_study.md").write_text(markdown(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
