"""What a few labelled defects (images, no masks) can buy CAVGA-L's default map: thresholds and a map that read them.

Setting w's default today reads no label: its map is ``trunk_knn`` (the frozen ImageNet trunk's patch features
against a memory of normal ones) and its thresholds come from normal images alone, so u and w give the same output.
This study measures, on the same features, what the labelled images can change, with nothing trained:

* ``u``: the default. Image threshold: the 95 % quantile of the normal images' scores (the held-out slice, and each
  memory image scored without its own rows); mask threshold: the 99.9 % quantile of their pixels. Score: the mean
  of the map's top 1 % (``map_top1``).
* ``u+labels``: the same map, the thresholds fitted with the labels beside the normal images:

  - image: the midpoint of the normal and the labelled images' mean log score (the equal-density point of two
    log-normal classes of equal spread, i.e. the threshold that maximises balanced accuracy under that model),
    clipped to the normal scores' [80 %, 99 %] quantiles, so that one or two labels cannot push it to an extreme;
  - mask: half the labelled images' mean map peak (a known defect's strength sets how far its region reaches),
    clipped to the normal pixels' [99 %, 99.99 %] quantiles.

* ``labelled_knn``: a map that reads the labels. The labelled images' patch positions that stand out (distance to
  the normal memory above the normal positions' 99.9 % quantile; at least each image's 10 highest) form a small
  memory of defect patches A. At every position, with d_N the distance to the normal memory and d_A to A,
  ``map = d_N * (1/2 + d_N / (d_N + d_A))``: a patch nearer a known defect than normal patches counts up to three
  times as much as one that resembles no known defect; normal patches (d_N small) stay small. Thresholds as
  ``u+labels``.

Labels are the paper's protocol (``cavga.data.splits.sample_weak_labels``: a seeded draw of the test split's
anomalous images, by count or share); each row is the mean over three draws (seeds 0, 1, 2), and every candidate is
scored on the test split less that draw's labelled images and their exposure twins (Magnetic Tile's tiles).

THE RULE (written down, with this file, before any figure of it was seen):

1. Sets: bottle, capsule and Magnetic Tile (split by tile); the 2 % protocol decides (``2%``: one label on
   bottle, two on capsule); the counts 1, 5 and 10 are reported after the decision.
2. Image threshold: ``u+labels``' thresholds become setting w's if their mean balanced accuracy over the three sets
   is at least 0.01 above ``u``'s and no set loses more than 0.01.
3. Mask threshold: the labels' mask threshold is kept if the mean calibrated IoU over the sets rises by at least
   0.01 and no set loses more than 0.01 IoU; otherwise w cuts masks as u does.
4. Map: ``labelled_knn`` becomes setting w's default map if, at 2 %, the mean over the sets of (pixel AuROC +
   AUPRO) / 2 is at least 0.01 above ``u``'s and no set loses more than 0.01 on image AuROC, pixel AuROC or AUPRO.

    python benchmarks/studies/label_study.py --out runs/label-study
    python benchmarks/studies/label_study.py --out runs/label-study --datasets capsule --counts 2%

Writes OUT/label_study.json after every (set, count) row (a rerun skips what it holds) and OUT/label_study.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cavga import metrics
from cavga.data.splits import sample_weak_labels, with_group_twins
from cavga.engine.maps import upsampled_blur
from cavga.model.memory import LatentMemory, patch_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_map import Levels, ceiling_iou, dataset_splits  # noqa: E402
from map_study import save_rows  # noqa: E402

SETS = ("bottle", "capsule", "magnetic_tile")
COUNTS = ("2%", "1", "5", "10")
CANDIDATES = ("u", "u+labels", "labelled_knn")
DRAWS = (0, 1, 2)
SEED, BATCH, ROWS = 0, 16, 8192
IMAGE_Q, MASK_Q = 0.95, 0.999  # the product's u thresholds (cavga.engine.infer)
IMAGE_CLIP, MASK_CLIP = (0.80, 0.99), (0.99, 0.9999)
DEFECT_Q, MIN_DEFECT_POSITIONS = 0.999, 10
TOP_SHARE = 0.01
GAIN, LOSS = 0.01, 0.01


def grid_distances(memory: LatentMemory, feats: torch.Tensor, leave_out: bool = False) -> torch.Tensor:
    """Distance of every position's features to the memory (B, 1, h, w); ``leave_out``: ``feats`` are the images
    the memory was filled from, in order, each scored without its own rows."""
    out = []
    with torch.no_grad():
        for start in range(0, feats.shape[0], BATCH):
            own = torch.arange(start, min(start + BATCH, feats.shape[0])) if leave_out else None
            out.append(memory(feats[start : start + BATCH], own))
    return torch.cat(out)


def to_maps(grids: torch.Tensor, size) -> np.ndarray:
    return torch.cat([upsampled_blur(grids[i : i + BATCH], size) for i in range(0, len(grids), BATCH)])[:, 0].numpy()


def top_scores(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(flat.shape[1] * TOP_SHARE))
    return np.sort(flat, axis=1)[:, -k:].mean(1)


def label_image_threshold(normal: np.ndarray, labelled: np.ndarray) -> float:
    """The midpoint of the two classes' mean log scores, clipped to the normal scores' IMAGE_CLIP quantiles."""
    mid = float(np.exp((np.log(normal).mean() + np.log(labelled).mean()) / 2))
    low, high = np.quantile(normal, IMAGE_CLIP)
    return float(np.clip(mid, low, high))


def label_mask_threshold(normal_maps: np.ndarray, labelled_maps: np.ndarray) -> float:
    """Half the labelled images' mean peak, clipped to the normal pixels' MASK_CLIP quantiles."""
    half_peak = 0.5 * float(labelled_maps.reshape(len(labelled_maps), -1).max(1).mean())
    low, high = np.quantile(normal_maps, MASK_CLIP)
    return float(np.clip(half_peak, low, high))


def defect_patches(grids: torch.Tensor, feats: torch.Tensor, normal_grid_q: float) -> torch.Tensor:
    """The labelled images' positions above ``normal_grid_q`` (at least each image's MIN_DEFECT_POSITIONS highest),
    as rows (n, C)."""
    rows = []
    for g, f in zip(grids[:, 0], feats, strict=True):
        flat, vecs = g.flatten(), f.flatten(1).T
        keep = flat > normal_grid_q
        if int(keep.sum()) < MIN_DEFECT_POSITIONS:
            keep = torch.zeros_like(keep)
            keep[flat.topk(MIN_DEFECT_POSITIONS).indices] = True
        rows.append(vecs[keep])
    return torch.cat(rows)


def labelled_knn(grids: torch.Tensor, feats: torch.Tensor, defects: torch.Tensor) -> torch.Tensor:
    """d_N * (1/2 + d_N / (d_N + d_A)) at every position (B, 1, h, w)."""
    out = []
    for start in range(0, len(feats), BATCH):
        f = feats[start : start + BATCH]
        q = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        d_a = torch.cdist(q, defects).amin(1).view(f.shape[0], 1, *f.shape[-2:])
        d_n = grids[start : start + BATCH]
        out.append(d_n * (0.5 + d_n / (d_n + d_a).clamp_min(1e-12)))
    return torch.cat(out)


def figures(test_maps, normal_maps, labels, masks, has, image_thr: float, mask_thr: float) -> dict:
    scale = float(test_maps.max())  # the metrics rank maps on [0, 1]; one scale keeps every order
    tm, scores = test_maps / scale, top_scores(test_maps)
    m, g = tm[has], masks[has]
    return {
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(m, g),
        "aupro": metrics.aupro(m, g, num_thresholds=200),
        "balanced_accuracy": metrics.balanced_accuracy((scores > image_thr).astype(int), labels),
        "iou": metrics.iou(m, g, mask_thr / scale),
        "iou_ceiling": ceiling_iou(m, g),
        "anomalous_flagged": float((scores[labels == 1] > image_thr).mean()),
        "normal_flagged": float((scores[labels == 0] > image_thr).mean()),
    }


def candidate_maps(name: str, parts: dict, labelled: list[int]) -> dict:
    """Each candidate's (test maps, normal maps, image threshold, mask threshold) for one draw of labels."""
    size = parts["masks"].shape[-2:]
    normal_grids = parts["normal_grids"]
    u_test, u_normal = parts["u_test"], parts["u_normal"]
    u_scores = top_scores(u_normal)
    lab = u_test[labelled]
    out = {
        "u": (u_test, u_normal, float(np.quantile(u_scores, IMAGE_Q)), float(np.quantile(u_normal, MASK_Q))),
        "u+labels": (
            u_test,
            u_normal,
            label_image_threshold(u_scores, top_scores(lab)),
            label_mask_threshold(u_normal, lab),
        ),
    }
    q = float(torch.quantile(normal_grids.flatten()[:: max(1, normal_grids.numel() // 4_000_000)], DEFECT_Q))
    defects = defect_patches(parts["test_grids"][labelled], parts["test_feats"][labelled], q)
    w_test = to_maps(labelled_knn(parts["test_grids"], parts["test_feats"], defects), size)
    w_normal = to_maps(labelled_knn(normal_grids, parts["normal_feats"], defects), size)
    w_lab = w_test[labelled]
    out["labelled_knn"] = (
        w_test,
        w_normal,
        label_image_threshold(top_scores(w_normal), top_scores(w_lab)),
        label_mask_threshold(w_normal, w_lab),
    )
    return out


def prepare(name: str, out: Path, levels: Levels) -> dict:
    """A set's features, its normal memory and the u maps: read once for every count and draw."""
    start = time.perf_counter()
    fit, cal, test = dataset_splits(name, out)
    f_lv, c_lv, t_lv = levels(fit), levels(cal), levels(test)
    fit_feats, cal_feats, test_feats = (patch_features(lv[0], 1) for lv in (f_lv, c_lv, t_lv))
    memory = LatentMemory(fit_feats.shape[1], ROWS).fit([fit_feats], seed=SEED)
    normal_grids = torch.cat([grid_distances(memory, cal_feats), grid_distances(memory, fit_feats, leave_out=True)])
    test_grids = grid_distances(memory, test_feats)
    masks, labels, has = t_lv[1], t_lv[2], t_lv[3].astype(bool)
    size = masks.shape[-2:]
    return {
        "test": test,
        "masks": masks,
        "labels": labels,
        "has": has,
        "test_feats": test_feats,
        "normal_feats": torch.cat([cal_feats, fit_feats]),
        "normal_grids": normal_grids,
        "test_grids": test_grids,
        "u_test": to_maps(test_grids, size),
        "u_normal": to_maps(normal_grids, size),
        "prepare_seconds": round(time.perf_counter() - start, 1),
    }


def run_row(name: str, count: str, parts: dict) -> dict:
    start = time.perf_counter()
    per: dict[str, list[dict]] = {c: [] for c in CANDIDATES}
    n_labels = []
    for draw in DRAWS:
        fraction, n = (float(count[:-1]) / 100, None) if count.endswith("%") else (None, int(count))
        labelled = sample_weak_labels(parts["test"], fraction, n, draw)
        excluded = set(with_group_twins(parts["test"], parts["test"].subset(labelled)))
        keep = np.array([p not in excluded for p in parts["test"].paths])
        n_labels.append(len(labelled))
        for cand, (tm, nm, image_thr, mask_thr) in candidate_maps(name, parts, labelled).items():
            truth = (parts["labels"][keep], parts["masks"][keep], parts["has"][keep])
            per[cand].append(figures(tm[keep], nm, *truth, image_thr, mask_thr))
    row = {"dataset": name, "count": count, "n_labels": n_labels, "draws": list(DRAWS)}
    for cand, rows in per.items():
        row[cand] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def choose(rows: list[dict]) -> dict:
    """The rule of the module docstring, on the 2 % rows of every set."""
    at = {r["dataset"]: r for r in rows if r["count"] == "2%"}
    if set(at) != set(SETS):
        return {"complete": False}

    def gains(cand: str, key) -> dict[str, float]:
        return {s: key(at[s][cand]) - key(at[s]["u"]) for s in SETS}

    bal = gains("u+labels", lambda f: f["balanced_accuracy"])
    iou = gains("u+labels", lambda f: f["iou"])
    local = gains("labelled_knn", lambda f: (f["pixel_auroc"] + f["aupro"]) / 2)
    worst = min(
        min(gains("labelled_knn", lambda f, k=k: f[k]).values()) for k in ("image_auroc", "pixel_auroc", "aupro")
    )
    return {
        "complete": True,
        "image_threshold": bool(np.mean(list(bal.values())) >= GAIN and min(bal.values()) >= -LOSS),
        "mask_threshold": bool(np.mean(list(iou.values())) >= GAIN and min(iou.values()) >= -LOSS),
        "map": bool(np.mean(list(local.values())) >= GAIN and worst >= -LOSS),
        "balanced_accuracy_gain": bal,
        "iou_gain": iou,
        "map_gain": local,
        "map_worst_loss": worst,
    }


KEYS = ("image_auroc", "pixel_auroc", "aupro", "balanced_accuracy", "iou", "iou_ceiling")


def markdown(rows: list[dict]) -> str:
    lines = [
        "| set | labels | candidate | image AuROC | pixel AuROC | AUPRO | bal. acc. | IoU | IoU ceiling | "
        "anomalous flagged | normal flagged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for cand in CANDIDATES:
            f = r[cand]
            cells = [f[k] for k in (*KEYS, "anomalous_flagged", "normal_flagged")]
            lines.append(
                f"| {r['dataset']} | {r['count']} ({'/'.join(map(str, r['n_labels']))}) | {cand} | "
                + " | ".join(f"{v:.3f}" for v in cells)
                + " |"
            )
    verdict = choose(rows)
    lines += ["", "Means over label draws " + ", ".join(map(str, DRAWS)) + "; the labelled images and their twins are "
              "out of every row.", ""]  # fmt: skip
    if verdict["complete"]:
        lines.append(
            f"Rule (2 %): image threshold {'adopted' if verdict['image_threshold'] else 'not adopted'} "
            f"(balanced accuracy gain {_show(verdict['balanced_accuracy_gain'])}); mask threshold "
            f"{'adopted' if verdict['mask_threshold'] else 'not adopted'} (IoU gain {_show(verdict['iou_gain'])}); "
            f"labelled_knn {'adopted' if verdict['map'] else 'not adopted'} ((pixel AuROC + AUPRO) / 2 gain "
            f"{_show(verdict['map_gain'])}, worst loss {verdict['map_worst_loss']:+.3f})"
        )
    return "\n".join(lines) + "\n"


def _show(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:+.3f}" for k, v in values.items()) + f"; mean {np.mean(list(values.values())):+.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--counts", nargs="+", default=list(COUNTS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "label_study.json"
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    done = {(r["dataset"], r["count"]) for r in rows}
    levels = Levels()
    for name in args.datasets:
        todo = [c for c in args.counts if (name, c) not in done]
        if not todo:
            continue
        parts = prepare(name, args.out, levels)
        for count in todo:
            row = run_row(name, count, parts) | {"prepare_seconds": parts["prepare_seconds"]}
            rows.append(row)
            print(f"{name} {count}: " + "; ".join(
                f"{c} " + "/".join(f"{row[c][k]:.3f}" for k in KEYS) for c in CANDIDATES), flush=True)  # fmt: skip
            save_rows(rows, json_path, args.out / "label_study.md", markdown)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
