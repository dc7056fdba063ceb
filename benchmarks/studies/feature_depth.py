"""How deep the frozen ImageNet features of a nearest-neighbour memory must reach: a training-free probe.

CAVGA-L's latent reads the EfficientNet-Lite0 trunk at stride 8 with the stride-16 map beside it (``8+16``, 152
channels). This probe leaves CAVGA out: it fills the product's :class:`cavga.model.memory.LatentMemory` (greedy
coreset, window 1 unless told) with the raw trunk features of the normal training images and scores the test images
by the distance to it, upsampled and blurred as the product's maps are, the image score the map's maximum. It asks
whether deeper features (``16+32``: 112 + 320 channels at stride 16; ``8+16+32``: all three at stride 8, 472
channels) find Magnetic Tile's large "Uneven" regions, and what they cost on bottle's small defects; and whether a
finer map (``4+8+16``: 24 + 40 + 112 channels at stride 4) finds its thin cracks.

The test split is the product's (the datasets' seeded splits, ``benchmarks/studies/map_study.py``'s DATASETS); the
threshold of the balanced accuracy is the 95th percentile of the held-out normal slice's scores (no test image).
Pixel AuROC per defect type pools that type's images with the normal test images; ``pixel_auroc_split`` splits the
pooled one's negatives into the normal images' pixels and the defect-free pixels of the anomalous images. Magnetic
Tile's halves are ``benchmarks/studies/memory_window.py``'s (whole tiles to one half).

    python benchmarks/studies/feature_depth.py --out runs/feature-depth
    python benchmarks/studies/feature_depth.py --out runs/feature-depth --datasets magnetic_tile --levels 16+32 \
        --windows 3

Writes OUT/feature_depth.json after every (dataset, levels, window) row (a rerun skips what it holds) and
OUT/feature_depth.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cavga import metrics
from cavga.data import Batch, Preprocess, collate_samples, load_dataset
from cavga.data.splits import split_calibration
from cavga.engine.maps import upsampled_blur
from cavga.model.efficientnet_lite import EfficientNetLite0, load_imagenet_weights, upsampled_concat
from cavga.model.memory import LatentMemory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_study import DATASETS, data_args, save_rows  # noqa: E402
from memory_window import halves  # noqa: E402

LEVELS = {"8+16": (8, 16), "16+32": (16, 32), "8+16+32": (8, 16, 32), "4+8+16": (4, 8, 16)}
CALIBRATION_FRACTION, SEED, QUANTILE, BATCH = 0.1, 0, 0.95, 16


class TrunkFeatures:
    """The frozen ImageNet Lite0 trunk's maps at ``strides``, the deeper ones bilinearly upsampled onto the first
    and all concatenated (as CAVGA-L's encoder does for two of them)."""

    def __init__(self, channels: int, strides: tuple[int, ...]) -> None:
        self.strides = strides
        self.trunk = EfficientNetLite0(channels, classifier=False)
        load_imagenet_weights(self.trunk, None, classifier=False)
        self.trunk.eval()
        self.channels = sum(EfficientNetLite0.feature_channels(s) for s in strides)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return upsampled_concat(self.trunk.forward_features(images, strides=self.strides), self.strides)


def batches(dataset) -> Iterator[Batch]:
    """``dataset`` in batches of BATCH samples, each image and mask decoded once."""
    for start in range(0, len(dataset), BATCH):
        yield collate_samples([dataset[i] for i in range(start, min(len(dataset), start + BATCH))])


def score(dataset, features: TrunkFeatures, memory: LatentMemory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image scores (N,), maps (N, H, W) and masks (N, H, W; zeros where an image has none) of ``dataset``."""
    scores, maps, masks = [], [], []
    with torch.no_grad():
        for batch in batches(dataset):
            m = upsampled_blur(memory(features(batch.images)), tuple(batch.images.shape[-2:]))
            scores.append(m.flatten(1).amax(1).numpy())
            maps.append(m[:, 0].numpy())
            masks.append(batch.masks[:, 0].numpy())
    return np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)


def pixel_split(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, limit: int = 1_000_000) -> dict:
    """Where the pooled pixel AuROC is lost: the AuROC of defect pixels against the normal images' pixels, against
    the defect-free pixels of the anomalous images ("background"), and of that background against the normal
    images' pixels (0.5: the background of an anomalous image looks as normal as a normal image). Each group is a
    seeded sample of at most ``limit`` pixels."""
    rng = np.random.default_rng(SEED)
    defect = masks > 0.5
    anomalous = labels == 1

    def sample(values: np.ndarray) -> np.ndarray:
        return values if len(values) <= limit else rng.choice(values, limit, replace=False)

    groups = {
        "defect": sample(maps[defect]),
        "normal_images": sample(maps[~anomalous].ravel()),
        "background": sample(maps[anomalous][~defect[anomalous]]),
    }

    def auroc(positive: str, negative: str) -> float:
        scores = np.concatenate([groups[positive], groups[negative]])
        truth = np.concatenate([np.ones(len(groups[positive])), np.zeros(len(groups[negative]))])
        return metrics.image_auroc(scores, truth.astype(int))

    return {
        "defect_vs_normal_images": auroc("defect", "normal_images"),
        "defect_vs_background": auroc("defect", "background"),
        "background_vs_normal_images": auroc("background", "normal_images"),
    }


def run_row(dataset: str, levels: str, window: int, out: Path) -> dict:
    root, kwargs = data_args(dataset, out)
    splits = load_dataset(root, preprocess=Preprocess(DATASETS[dataset]["size"], None), **kwargs)
    train_set, calibration_set = split_calibration(splits.train, CALIBRATION_FRACTION, SEED)
    features = TrunkFeatures(splits.train[0].image.shape[0], LEVELS[levels])
    started = time.perf_counter()
    normal = (features(batch.images) for batch in batches(train_set))
    memory = LatentMemory(features.channels, window=window).fit(normal, seed=SEED)
    fill_seconds = time.perf_counter() - started
    calibration_scores, _, _ = score(calibration_set, features, memory)
    scores, maps, masks = score(splits.test, features, memory)
    labels = np.asarray(splits.test.labels)
    maps = maps / max(float(maps.max()), 1e-12)  # a rank-preserving scale onto [0, 1]
    predicted = (scores > np.quantile(calibration_scores, QUANTILE)).astype(int)
    types = np.asarray([r.defect_type for r in splits.test.records])
    row = {
        "dataset": dataset,
        "levels": levels,
        "window": window,
        "channels": features.channels,
        "n_test": len(labels),
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "aupro": metrics.aupro(maps, masks),
        "balanced_accuracy": metrics.balanced_accuracy(predicted, labels),
        "pixel_auroc_by_type": {
            t: metrics.pixel_auroc(maps[(types == t) | (labels == 0)], masks[(types == t) | (labels == 0)])
            for t in sorted(set(types[labels == 1]))
        },
        "pixel_auroc_split": pixel_split(maps, masks, labels),
        "halves": {
            name: {
                "image_auroc": metrics.image_auroc(scores[idx], labels[idx]),
                "pixel_auroc": metrics.pixel_auroc(maps[idx], masks[idx]),
            }
            for name, idx in halves(len(labels), [r.group for r in splits.test.records]).items()
        },
        "fill_seconds": round(fill_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | strides | window | image AuROC | pixel AuROC | AUPRO | bal. acc. | pixel AuROC by type | "
        "defect vs normal images / vs background; background vs normal | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        by_type = ", ".join(f"{t} {v:.3f}" for t, v in r["pixel_auroc_by_type"].items())
        split = " / ".join(f"{v:.3f}" for v in r["pixel_auroc_split"].values())
        lines.append(
            f"| {r['dataset']} | {r['levels']} | {r['window']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
            f"{r['aupro']:.3f} | {r['balanced_accuracy']:.3f} | {by_type} | {split} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=["magnetic_tile", "bottle"], choices=list(DATASETS))
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--windows", nargs="+", type=int, default=[1])
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "feature_depth.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["dataset"], r["levels"], r["window"]) for r in rows}
    for dataset in args.datasets:
        if DATASETS[dataset]["root"] is not None and not DATASETS[dataset]["root"].exists():
            print(f"skipping {dataset}: {DATASETS[dataset]['root']} not found", file=sys.stderr)
            continue
        for levels in args.levels:
            for window in args.windows:
                if (dataset, levels, window) in done:
                    continue
                print(f"{dataset}, trunk strides {levels}, window {window} ...", flush=True)
                rows.append(run_row(dataset, levels, window, args.out))
                save_rows(rows, path, args.out / "feature_depth.md", markdown)
                print(markdown(rows[-1:]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
