"""Wall time of the default ``fit`` + ``evaluate`` with and without the paper-literal map, side by side.

Before the paper's map was asked for, every ``Cavga.fit`` trained the CAVGA network (one epoch for CAVGA-L), fitted
the latent Gaussian and calibrated the paper's map, and every ``evaluate`` ran a second inference pass for it; the
default map reads none of it. This runs, on one MVTec category, the DEFAULT detector (``cavga.Cavga(seed=0)``,
nothing else set) twice:

* "paper map asked for (before)": ``fit(..., paper_map=True)`` (which trains the variant's epoch, as every fit
  did) plus the latent Gaussian fitted on the same normal training images, then ``evaluate(..., paper_map=True)``:
  the old behaviour, except that its memory fill and calibration are today's (so the saving shown is only what the
  product path leaves out);
* "product path (now)": ``fit`` and ``evaluate`` as they are (no training step for the default map).

Each row is timed in the same process, one after the other, after a warm-up (imports, the ImageNet weights, a
first forward pass); the product path runs first, so that what warm-up remains counts against it. The before row
also times its extra parts on their own (the latent Gaussian; the paper calibration, computed once more), which a
loaded machine blurs less than the totals. It checks that
the default map's metrics are identical in the two, prints a table and writes ``OUT`` (JSON)::

    python benchmarks/product_path.py /work/shared/data/mvtec-bottle --category bottle \
        --out benchmarks/results/product_path.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import cavga
from cavga.config import ModelConfig
from cavga.data.splits import split_calibration
from cavga.engine.fitting import paper_calibration
from cavga.engine.infer import fit_latent_gaussian
from cavga.model.networks import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mvtec_table import machine  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro", "iou", "balanced_accuracy", "n_images")


def run(root: Path, category: str, before: bool, seed: int = 0) -> dict[str, Any]:
    """One default fit + evaluate; ``before``: as every fit and evaluate ran before the paper's map was asked for."""
    detector = cavga.Cavga(seed=seed)
    started = time.perf_counter()
    detector.fit(root, format="mvtec", category=category, progress=False, paper_map=before)
    parts: dict[str, float] = {}
    if before:  # every fit fitted the latent Gaussian, whatever the map
        gaussian_started = time.perf_counter()
        splits = detector._load(root, format="mvtec", category=category)
        config = detector.train_config
        train_set, calibration_set = split_calibration(splits.train, config.calibration_fraction, config.seed)
        fit_latent_gaussian(detector.model_, train_set)
        parts["latent_gaussian"] = round(time.perf_counter() - gaussian_started, 2)
    fit_seconds = time.perf_counter() - started
    if before:  # the paper calibration fit() made, once more on its own: what it costs (not in fit_seconds twice)
        again = time.perf_counter()
        paper_calibration(detector.model_, calibration_set, detector.calibration_quantile)
        parts["paper_calibration"] = round(time.perf_counter() - again, 2)
    started = time.perf_counter()
    result = detector.evaluate(root, format="mvtec", category=category, paper_map=before)
    evaluate_seconds = time.perf_counter() - started
    return {
        "row": "paper map asked for (before)" if before else "product path (now)",
        "fit_seconds": round(fit_seconds, 2),
        "train_seconds": round(detector.train_seconds_, 2),
        "evaluate_seconds": round(evaluate_seconds, 2),
        "total_seconds": round(fit_seconds + evaluate_seconds, 2),
        "extra_parts_seconds": parts,
        "metrics": {k: result.get(k) for k in METRICS},
        "paper_map": {k: result["paper_map"].get(k) for k in METRICS} if "paper_map" in result else None,
        "anomaly_map": detector.model_config.anomaly_map,
        "score": detector.model_config.score,
        "n_train": detector.data_info_["n_train"],
        "n_calibration": detector.data_info_["n_calibration"],
    }


def warm_up() -> None:
    """The one-off costs (imports, the ImageNet weights read, torch's first forward), paid before either row."""
    import torch

    with torch.no_grad():
        build_model(ModelConfig()).eval()(torch.rand(1, 3, 256, 256), sample=False)


def table(rows: list[dict]) -> str:
    lines = ["| path | fit s | of which training s | evaluate s | total s | image AuROC | pixel AuROC |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        cells = [r["fit_seconds"], r["train_seconds"], r["evaluate_seconds"], r["total_seconds"]]
        lines.append(
            f"| {r['row']} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {m['image_auroc']:.4f} | "
            f"{m['pixel_auroc']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="an MVTec root or category folder")
    parser.add_argument("--category", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/product_path.json"))
    args = parser.parse_args(argv)
    warm_up()
    now = run(args.root, args.category, before=False, seed=args.seed)
    before = run(args.root, args.category, before=True, seed=args.seed)
    rows = [before, now]
    identical = before["metrics"] == now["metrics"]
    saving = before["total_seconds"] - now["total_seconds"]
    print(table(rows))
    print(
        f"default map {now['anomaly_map']} / {now['score']}: metrics identical in both: {identical}; "
        f"fit + evaluate {saving:.1f} s shorter ({100 * saving / before['total_seconds']:.0f} %)"
    )
    record = {
        "command": " ".join(["python", "benchmarks/product_path.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "root": str(args.root),
        "category": args.category,
        "rows": rows,
        "metrics_identical": identical,
        "seconds_saved": round(saving, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
