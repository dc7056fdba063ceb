"""Which map of the frozen trunk CAVGA-L_u should draw by default, and where its masks should be cut.

The default map before this study, ``latent_knn``, compares CAVGA's 64-channel latent mu with a memory of normal mu
vectors. anomalib's PatchCore on the same ImageNet EfficientNet-Lite0 weights was ahead of it on MVTec categories
nobody here tuned on, so this study asks what the trunk's own features give when compared the same way
(``trunk_knn``: :func:`cavga.model.memory.patch_features` into a :class:`cavga.model.memory.LatentMemory`), and
varies what PatchCore varies: the trunk levels (``8+16`` as the latent reads them, or ``4+8+16``), PatchCore's
3 x 3 averaging of each level (pool 3) or none (pool 1), and the memory's size (a greedy coreset of every
training position).

No training is involved: the trunk is the packaged ImageNet one, frozen, as in every CAVGA-L model. Each data set
is read with the product's split; the memory holds the normal training images less the seeded calibration slice
(10 %), as ``Cavga.fit`` does. The image threshold is the 95th percentile of the normal scores (the slice's and
each training image's measured without its own memory rows); the mask candidates are quantiles of those same
normal images' pixels, and the image threshold. The best-threshold IoU is a ceiling read off the test masks, not a
method. AUPRO is computed on 200 thresholds (``cavga.metrics.aupro(num_thresholds=200)``).

The rule (written down before the figures of this table were read, docs/research/2026-12-06-default-map.md):

1. Development sets: bottle, capsule, Magnetic Tile (split by tile) and the demo data (the mean of its three
   categories counts as one set).
2. A candidate qualifies if on no set it loses more than 0.02 image AuROC against the default before it
   (``latent_knn``, figures in ``REFERENCE``).
3. Among the qualifiers the highest mean over the sets of (pixel AuROC + AUPRO) / 2 wins; within 0.005 of it the
   cheaper one (fewer memory rows, then fewer channels) wins.
4. For the winner, the mask quantile with the highest mean over the sets of calibrated IoU / ceiling IoU.

    python benchmarks/studies/default_map.py --out runs/default-map
    python benchmarks/studies/default_map.py --out runs/default-map --datasets bottle capsule --candidates 4+8+16:1:8192

Writes OUT/default_map.json after every (set, candidate) row (a rerun skips what it holds) and OUT/default_map.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cavga import metrics
from cavga.data import Preprocess, collate_samples, load_dataset
from cavga.data.splits import split_calibration
from cavga.engine.maps import upsampled_blur
from cavga.model.efficientnet_lite import EfficientNetLite0, load_imagenet_weights
from cavga.model.memory import LatentMemory, patch_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_study import DATASETS, data_args, save_rows  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SETS = {
    "bottle": "bottle",
    "capsule": "capsule",
    "magnetic_tile": "magnetic_tile",
    "demo/weave": "demo",
    "demo/wood": "demo",
    "demo/pill": "demo",
}
# (levels, pool, memory rows); levels "8+16" leave the stride-4 map out of patch_features.
CANDIDATES = ("8+16:1:2048", "8+16:3:2048", "4+8+16:3:2048", "4+8+16:1:2048", "4+8+16:1:8192")
MASK_QUANTILES = (0.99, 0.995, 0.999, 0.9995, 0.9999)
# latent_knn, the default before (image AuROC, pixel AuROC, AUPRO): bottle and the demo categories from
# benchmarks/studies/results/map_study_knn.json (L-frozen); capsule from the landed main at its defaults (issue 33's
# table: cavga train + cavga evaluate, seed 0); Magnetic Tile (split by tile) from
# `cavga evaluate runs/ms-tile/models/magnetic_tile/L-frozen` (docs/research, the per-tile note).
REFERENCE = {
    "bottle": (1.000, 0.968, 0.897),
    "capsule": (0.961, 0.975, 0.850),
    "magnetic_tile": (0.855, 0.699, 0.589),
    "demo/weave": (1.000, 0.949, 0.817),
    "demo/wood": (1.000, 0.966, 0.877),
    "demo/pill": (0.993, 0.969, 0.891),
}
IMAGE_LOSS, TIE, SEED, BATCH = 0.02, 0.005, 0, 16


def dataset_splits(name: str, out: Path):
    if name == "capsule":
        root, kwargs, size = SHARED / "mvtec-capsule", {"format": "mvtec", "category": "capsule"}, 256
    else:
        (root, kwargs), size = data_args(name, out), DATASETS[name]["size"]
    splits = load_dataset(root, preprocess=Preprocess(size, 3), **kwargs)
    fit, cal = split_calibration(splits.train, 0.1, SEED)
    return fit, cal, splits.test


class Levels:
    """The frozen ImageNet trunk's maps at strides 4, 8 and 16 of every image of a data set, read once."""

    def __init__(self) -> None:
        self.trunk = load_imagenet_weights(EfficientNetLite0(3, classifier=False), classifier=False).eval()

    @torch.no_grad()
    def __call__(self, dataset) -> tuple[dict[int, torch.Tensor], np.ndarray, np.ndarray, np.ndarray]:
        maps, masks, labels, has = {4: [], 8: [], 16: []}, [], [], []
        for start in range(0, len(dataset), BATCH):
            batch = collate_samples([dataset[i] for i in range(start, min(len(dataset), start + BATCH))])
            for stride, m in self.trunk.forward_features(batch.images, strides=(4, 8, 16)).items():
                maps[stride].append(m)
            masks.append(batch.masks[:, 0].numpy() > 0.5)
            labels.append(batch.labels.numpy())
            has.append(batch.has_mask.numpy())
        return {s: torch.cat(v) for s, v in maps.items()}, *(np.concatenate(x) for x in (masks, labels, has))


def features(levels: dict[int, torch.Tensor], which: str, pool: int) -> torch.Tensor:
    """The memory's vectors of one candidate: :func:`patch_features` of the three levels, or for ``8+16`` of the
    stride-8 and 16 maps alone, on the stride-8 grid."""
    if which == "4+8+16":
        return patch_features(levels, pool)
    return patch_features({s: levels[s] for s in (8, 16)}, pool, grid=8)


def distance_maps(memory: LatentMemory, feats: torch.Tensor, size, leave_out: bool = False) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, feats.shape[0], BATCH):
            own = torch.arange(start, min(start + BATCH, feats.shape[0])) if leave_out else None
            out.append(upsampled_blur(memory(feats[start : start + BATCH], own), size)[:, 0])
    return torch.cat(out).numpy()


def ceiling_iou(maps: np.ndarray, masks: np.ndarray) -> float:
    """The best per-image-mean IoU over 60 quantiles of the defective images' map values (read off the masks)."""
    anomalous = masks.reshape(len(masks), -1).any(1)
    m, g = maps[anomalous], masks[anomalous]
    return max(metrics.iou(m, g, float(t)) for t in np.quantile(m, np.linspace(0.80, 0.9995, 60)))


class Scored(NamedTuple):
    """A memory's maps of one set: the test maps and masks of the images that have masks, every normal pixel's
    value (the held-out slice's maps, and each training image's without its own rows), the image threshold, and
    the figures every study row reports."""

    maps: np.ndarray
    masks: np.ndarray
    normal_maps: np.ndarray
    threshold: float
    figures: dict


def score_memory(memory: LatentMemory, fit: torch.Tensor, cal: torch.Tensor, test: torch.Tensor, test_part) -> Scored:
    """Score a filled ``memory`` on a set's features (``fit``: the images it was filled from; ``test_part``: the
    test images' masks, labels and has-mask flags from :class:`Levels`) as the product calibrates and evaluates."""
    _, masks, labels, has = test_part
    size = masks.shape[-2:]
    test_maps = distance_maps(memory, test, size)
    normal_maps = np.concatenate([distance_maps(memory, cal, size), distance_maps(memory, fit, size, True)])
    scale = float(test_maps.max())  # the metrics rank maps on [0, 1]; one scale keeps every order
    test_maps, normal_maps = test_maps / scale, np.minimum(normal_maps / scale, 1.0)
    scores = test_maps.reshape(len(test_maps), -1).max(1)
    threshold = float(np.quantile(normal_maps.reshape(len(normal_maps), -1).max(1), 0.95))
    has = has.astype(bool)
    maps, masks = test_maps[has], masks[has]
    figures = {
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "aupro": metrics.aupro(maps, masks, num_thresholds=200),
        "balanced_accuracy": metrics.balanced_accuracy((scores > threshold).astype(int), labels),
        "iou_ceiling": ceiling_iou(maps, masks),
    }
    return Scored(maps, masks, normal_maps, threshold, figures)


def run_row(name: str, candidate: str, parts: dict) -> dict:
    which, pool, rows = candidate.split(":")
    start = time.perf_counter()
    fit, cal, test = (features(parts[p][0], which, int(pool)) for p in ("fit", "cal", "test"))
    memory = LatentMemory(fit.shape[1], int(rows)).fit([fit], seed=SEED)
    fill_seconds = time.perf_counter() - start
    scored = score_memory(memory, fit, cal, test, parts["test"])
    test_maps, masks, normal_maps = scored.maps, scored.masks, scored.normal_maps
    row = {
        "dataset": name,
        "candidate": candidate,
        "channels": int(fit.shape[1]),
        **scored.figures,
        "iou_image_threshold": metrics.iou(test_maps, masks, scored.threshold),
        "memory_seconds": round(fill_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }
    for q in MASK_QUANTILES:
        row[f"iou_q{q}"] = metrics.iou(test_maps, masks, float(np.quantile(normal_maps, q)))
    return row


def choose(rows: list[dict]) -> dict:
    """The rule of the module docstring applied to ``rows`` (every candidate on every set)."""

    def by_set(candidate: str, value) -> dict[str, float]:
        per: dict[str, list[float]] = {}
        for r in rows:
            if r["candidate"] == candidate:
                per.setdefault(SETS[r["dataset"]], []).append(value(r))
        return {s: float(np.mean(v)) for s, v in per.items()}

    candidates = sorted({r["candidate"] for r in rows})
    complete = [c for c in candidates if {r["dataset"] for r in rows if r["candidate"] == c} == set(SETS)]
    qualified, means = [], {}
    for c in complete:
        images = by_set(c, lambda r: r["image_auroc"])
        means[c] = float(np.mean(list(by_set(c, lambda r: (r["pixel_auroc"] + r["aupro"]) / 2).values())))
        if all(REFERENCE_SET[s] - v <= IMAGE_LOSS for s, v in images.items()):
            qualified.append(c)
    if not qualified:
        return {"qualified": [], "means": means, "winner": None}
    best = max(means[c] for c in qualified)
    near = [c for c in qualified if means[c] >= best - TIE]
    cost = {c: (int(c.split(":")[2]), next(r["channels"] for r in rows if r["candidate"] == c)) for c in near}
    winner = min(near, key=lambda c: cost[c])
    ratios = {}
    for q in (*MASK_QUANTILES, "image_threshold"):
        key = f"iou_q{q}" if q != "image_threshold" else "iou_image_threshold"
        ratios[str(q)] = float(np.mean(list(by_set(winner, lambda r, k=key: r[k] / r["iou_ceiling"]).values())))
    return {
        "qualified": qualified,
        "means": means,
        "winner": winner,
        "mask_ratios": ratios,
        "mask_quantile": max(ratios, key=ratios.get),
    }


def _reference_sets() -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for name, (image, _, _) in REFERENCE.items():
        per.setdefault(SETS[name], []).append(image)
    return {s: float(np.mean(v)) for s, v in per.items()}


REFERENCE_SET = _reference_sets()


def markdown(rows: list[dict]) -> str:
    lines = [
        "| set | candidate (levels:pool:rows) | image AuROC | pixel AuROC | AUPRO | bal. acc. | IoU ceiling | "
        + " | ".join(f"IoU q{q}" for q in MASK_QUANTILES)
        + " | IoU image thr. | memory s |",
        "|---|---|---|---|---|---|---|" + "---|" * len(MASK_QUANTILES) + "---|---|",
    ]
    for r in rows:
        cells = [r["image_auroc"], r["pixel_auroc"], r["aupro"], r["balanced_accuracy"], r["iou_ceiling"]]
        cells += [r[f"iou_q{q}"] for q in MASK_QUANTILES] + [r["iou_image_threshold"]]
        lines.append(
            f"| {r['dataset']} | {r['candidate']} | "
            + " | ".join(f"{v:.3f}" for v in cells)
            + f" | {r['memory_seconds']} |"
        )
    lines += ["", "Reference (latent_knn, the default before): "
              + "; ".join(f"{k} {v[0]:.3f} / {v[1]:.3f} / {v[2]:.3f}" for k, v in REFERENCE.items()), ""]  # fmt: skip
    verdict = choose(rows)
    lines.append(f"Rule: qualified {verdict['qualified']}; mean (pixel AuROC + AUPRO) / 2 by candidate "
                 + ", ".join(f"{c} {m:.4f}" for c, m in sorted(verdict["means"].items())))  # fmt: skip
    if verdict["winner"]:
        lines.append(f"Winner: {verdict['winner']}; mask: mean calibrated / ceiling IoU by quantile "
                     + ", ".join(f"{q} {v:.3f}" for q, v in verdict["mask_ratios"].items())
                     + f"; chosen {verdict['mask_quantile']}")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_study(out: Path, datasets: list[str], values: list, key: str, run_row, stem: str, markdown) -> list[dict]:
    """Every (set, value) row not yet in OUT/STEM.json: each set's trunk levels read once, then ``run_row(set,
    value, parts)`` per value, the rows saved after each (``key``: the rows' field holding the value)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    done = {(r["dataset"], r[key]) for r in rows}
    levels = Levels()
    for name in datasets:
        todo = [v for v in values if (name, v) not in done]
        if not todo:
            continue
        fit, cal, test = dataset_splits(name, out)
        parts = {"fit": levels(fit), "cal": levels(cal), "test": levels(test)}
        for value in todo:
            row = run_row(name, value, parts)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            save_rows(rows, json_path, out / f"{stem}.md", markdown)
    print(markdown(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    args = parser.parse_args(argv)
    run_study(args.out, args.datasets, args.candidates, "candidate", run_row, "default_map", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
