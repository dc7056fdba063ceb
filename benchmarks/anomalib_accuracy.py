"""anomalib's PatchCore and PaDiM beside cavga's default model, on accuracy: the same ImageNet EfficientNet-Lite0
weights, the same images, the same metrics, side by side in one run.

For each development set (bottle, capsule, Magnetic Tile split by tile, as the studies read them):

* cavga's default, ``cavga.Cavga(seed=0)`` with nothing else set, fitted and evaluated as
  ``benchmarks/mvtec_table.py`` does (its memory holds the normal training images less the seeded 10 %
  calibration slice, which ``fit`` holds out to calibrate on);
* anomalib 2.7's torch models, run directly (no Lightning engine) under anomalib's own interpreter:
  ``PatchcoreModel`` (coreset ratio 0.1 and 9 neighbours, anomalib's defaults; ``--coreset-ratio`` sets
  another) and ``PadimModel`` (all 152 channels kept), both on timm's ``efficientnet_lite0`` at strides 8 and 16
  (``blocks.2``, 40 channels, and ``blocks.4``, 112: PatchCore's two middle levels; cavga's default reads the
  stride-4 map beside them, 176 channels), built with ``pre_trained=False`` and then given
  cavga's packaged Lite0 ImageNet weights (:func:`cavga.model.efficientnet_lite.imagenet_lite0_path`) by an
  explicit key mapping (:func:`timm_key`). They fit on every normal training image the cavga fit read,
  calibration slice included (they calibrate nothing).

Before a model is fitted the worker checks the mapping: timm's full ``efficientnet_lite0`` classifier with the
mapped weights must name scikit-image's ``chelsea`` a cat (ImageNet 281-285) and ``coffee`` an espresso (967), on
the preprocessing of ``tests/test_efficientnet_lite.py``, and give the logits cavga's own Lite0 gives; it refuses
to go on otherwise. Two things the key names do not carry are set as the weights need them: BatchNorm's eps 1e-3
(TensorFlow's; timm builds this model with 1e-5), and the input normalization (x * 255 - 127) / 128 that the
weights were trained with and cavga's trunk applies (``--timm-normalization imagenet`` gives anomalib's usual
ImageNet mean and std instead).

All three see the same tensors: the product's reader, split and 256 px resize, written once as .npy for the worker
(gray Magnetic Tile images repeated to three channels for timm, which with the summed stem weights cavga uses for
one channel gives the same features). The worker writes per-image scores and maps (float16) back; the driver
computes image AuROC, pixel AuROC and AUPRO of all three with :mod:`cavga.metrics` (exact AUPRO at 30 % FPR, the
product's), each method's maps divided by their maximum over the set and stored as float16 alike.

    python benchmarks/anomalib_accuracy.py --out runs/anomalib-accuracy
    python benchmarks/anomalib_accuracy.py --out runs/anomalib-accuracy --datasets bottle \\
        --anomalib-python .venv-anomalib/bin/python

Writes OUT/anomalib_accuracy.json after every (set, method) row (a rerun skips the rows it holds with the same
settings) and OUT/anomalib_accuracy.md, a table per set; each worker's messages (anomalib's coreset progress among
them) go to OUT/logs. anomalib lives in a venv of its own (``benchmarks/anomalib_padim.py`` says how to make it);
this file runs under both interpreters and imports cavga only on the driver's side.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZE, SEED, BATCH = 256, 0, 16
SETS = ("bottle", "capsule", "magnetic_tile")
METHODS = ("cavga default", "anomalib PatchCore", "anomalib PaDiM")
FIGURES = ("image_auroc", "pixel_auroc", "aupro")
# timm's efficientnet_lite0 (features_only) names its feature levels after the stage that ends them: blocks.2 ends
# at stride 8 (40 channels), blocks.4 at stride 16 (112), where cavga's blocks 4 and 10 end.
LAYERS = {"blocks.2": (8, 40), "blocks.4": (16, 112)}
CORESET_RATIO, NUM_NEIGHBORS = 0.1, 9  # anomalib's Patchcore defaults
PADIM_FEATURES = 152  # all of 40 + 112: anomalib has no default for this backbone, and nothing needs reducing
BN_EPS = 1e-3  # the weights' (TensorFlow's) BatchNorm eps, as cavga.model.efficientnet_lite.BN_EPS
NORMALIZATION = {
    "weights": ((127 / 255,) * 3, (128 / 255,) * 3),  # (x * 255 - 127) / 128: the weights' own, cavga's trunk's
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # anomalib's pre-processor
}
PHOTOS = {"chelsea": tuple(range(281, 286)), "coffee": (967,)}  # tabby .. Egyptian cat; espresso
PHOTO_SIZE = 224
LOGIT_TOLERANCE = 1e-2  # timm's logits against cavga's Lite0 on the photos; a wrong key or eps is far above it
TIMING_NOTE = (
    "fit seconds are wall clock on a shared 2-core machine, each method in its own process (cavga's includes "
    "reading and resizing the image files, anomalib's starts from the decoded tensors): only ratios mean anything"
)

# ---------------------------------------------------------------- cavga's Lite0 keys -> timm's
# Blocks per stage of EfficientNet-Lite0 (cavga.model.efficientnet_lite.STAGES; a test holds them equal). cavga
# numbers its 16 blocks in one list, timm as blocks.STAGE.BLOCK.
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
BLOCK_PLACE = [(stage, block) for stage, repeats in enumerate(STAGE_REPEATS) for block in range(repeats)]
TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 (expansion 1) is timm's DepthwiseSeparableConv, the others its InvertedResidual; their layer names.
DEPTHWISE_LAYERS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED_LAYERS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")  # timm keys a features_only trunk does not have


def timm_key(key: str) -> str:
    """The timm ``efficientnet_lite0`` name of a key of cavga's Lite0 state dict (the packaged weights' names)."""
    first, _, rest = key.partition(".")
    if first in TOP_KEYS:
        return f"{TOP_KEYS[first]}.{rest}"
    index, _, rest = rest.partition(".")
    layer, _, param = rest.partition(".")
    if first != "_blocks" or not index.isdigit() or int(index) >= len(BLOCK_PLACE):
        raise KeyError(f"not a key of cavga's EfficientNet-Lite0: {key!r}")
    stage, block = BLOCK_PLACE[int(index)]
    layers = DEPTHWISE_LAYERS if stage == 0 else INVERTED_LAYERS
    if layer not in layers:
        raise KeyError(f"not a key of cavga's EfficientNet-Lite0: {key!r} (no {layer} in a stage-{stage} block)")
    return f"blocks.{stage}.{block}.{layers[layer]}.{param}"


def timm_state(state: dict) -> dict:
    """cavga's Lite0 state dict under timm's names; two keys meeting on one name is an error."""
    mapped = {timm_key(k): v for k, v in state.items()}
    if len(mapped) != len(state):
        raise ValueError("the key mapping sent two of cavga's keys to one timm key")
    return mapped


def load_mapped(module, mapped: dict) -> None:
    """Load ``mapped`` into a timm Lite0 (the classifier or a features_only trunk) strictly: every key of the
    module present with its shape; left over only the head keys a trunk lacks. BatchNorm eps set to the weights'."""
    import torch

    target = module.state_dict()
    missing = [k for k in target if k not in mapped]
    extra = [k for k in mapped if k not in target and not k.startswith(HEAD_PREFIXES)]
    shapes = [k for k in target if k in mapped and tuple(mapped[k].shape) != tuple(target[k].shape)]
    if missing or extra or shapes:
        raise SystemExit(f"the mapped Lite0 weights do not fit timm's: missing {missing[:5]}, extra {extra[:5]}, "
                         f"mis-shaped {shapes[:5]}")  # fmt: skip
    module.load_state_dict({k: mapped[k] for k in target}, strict=True)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = BN_EPS


# ---------------------------------------------------------------- the photo check
def photo_verdict(probs: np.ndarray, names: list[str]) -> dict:
    """Top-1 class and probability of each photo from softmax ``probs`` (one row per name) and whether it is one
    of the photo's classes (:data:`PHOTOS`)."""
    out = {}
    for name, row in zip(names, np.asarray(probs), strict=True):
        top = int(np.argmax(row))
        out[name] = {"top1": top, "probability": round(float(row[top]), 4), "ok": top in PHOTOS[name]}
    return out


def normalized(images, normalization: str):
    """[0, 1] images (N, 1 or 3, H, W) as timm's input: gray repeated to three channels, then normalized."""
    import torch

    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[normalization])
    return (x - mean) / std


def check_photos(mapped: dict, photos: np.ndarray, cavga_logits: np.ndarray, normalization: str) -> dict:
    """timm's efficientnet_lite0 classifier with the mapped weights on the photos: the verdicts, and the largest
    difference from cavga's logits on the same photos (the weights' own normalization)."""
    import timm
    import torch

    net = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    load_mapped(net, mapped)
    result = {}
    with torch.no_grad():
        for name in NORMALIZATION:
            logits = net(normalized(photos, name))
            result[name] = photo_verdict(logits.softmax(1).numpy(), list(PHOTOS))
            if name == "weights":
                result["max_logit_difference_from_cavga"] = float((logits - torch.from_numpy(cavga_logits)).abs().max())
    result["ok"] = all(v["ok"] for v in result[normalization].values())
    result["ok"] = result["ok"] and result["max_logit_difference_from_cavga"] < LOGIT_TOLERANCE
    return result


# ---------------------------------------------------------------- the worker (anomalib's interpreter)
def build_anomalib(method: str):
    """anomalib's torch model of ``method`` on timm's efficientnet_lite0 at :data:`LAYERS`, random weights."""
    if method == "anomalib PatchCore":
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        return PatchcoreModel(list(LAYERS), "efficientnet_lite0", pre_trained=False, num_neighbors=NUM_NEIGHBORS)
    from anomalib.models.image.padim.torch_model import PadimModel

    return PadimModel("efficientnet_lite0", list(LAYERS), pre_trained=False, n_features=PADIM_FEATURES)


def as_float16(maps: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Maps on [0, 1] by one offset and span over the whole set (the order kept), stored as float16; returns the
    offset and span too."""
    maps = np.asarray(maps, dtype=np.float64)
    lo = min(float(maps.min()), 0.0)
    span = max(float(maps.max()) - lo, 1e-12)
    return ((maps - lo) / span).astype(np.float16), lo, span


def anomalib_worker(manifest: dict) -> dict:
    """Fit and run one anomalib model as the manifest says; scores and maps into its folder; a summary back."""
    import warnings

    warnings.filterwarnings("ignore")
    import anomalib
    import timm
    import torch

    torch.manual_seed(manifest["seed"])
    method, normalization, out = manifest["method"], manifest["normalization"], Path(manifest["out"])
    mapped = timm_state(torch.load(manifest["weights"], map_location="cpu", weights_only=True))
    photos = check_photos(mapped, np.load(manifest["photos"]), np.load(manifest["cavga_logits"]), normalization)
    if not photos["ok"]:
        raise SystemExit(f"the mapped Lite0 weights fail the photo check, not going on: {json.dumps(photos)}")
    model = build_anomalib(method)
    trunk = model.feature_extractor
    levels = dict(zip(trunk.layers, zip(trunk.reductions, trunk.out_dims, strict=True), strict=True))
    if levels != LAYERS:
        raise SystemExit(f"timm's efficientnet_lite0 levels {levels} are not {LAYERS}")
    load_mapped(trunk.feature_extractor, mapped)
    train, test = np.load(manifest["train"], mmap_mode="r"), np.load(manifest["test"], mmap_mode="r")
    start = time.perf_counter()
    model.train()  # anomalib's models collect embeddings in training mode; the trunk keeps itself in eval
    for i in range(0, len(train), BATCH):
        model(normalized(train[i : i + BATCH], normalization))
    if method == "anomalib PatchCore":
        model.subsample_embedding(manifest["coreset_ratio"])
        memory = list(model.memory_bank.shape)
    else:
        model.fit()
        memory = list(model.gaussian.mean.shape)
    fit_seconds = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(test), BATCH):
            batch = model(normalized(test[i : i + BATCH], normalization))
            scores.append(batch.pred_score.reshape(-1).numpy())
            maps.append(batch.anomaly_map[:, 0].numpy())
    predict_seconds = time.perf_counter() - start
    stored, lo, span = as_float16(np.concatenate(maps))
    np.save(out / "scores.npy", np.concatenate(scores).astype(np.float32))
    np.save(out / "maps.npy", stored)
    return {
        "photo_check": photos,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "memory": memory,
        "map_offset": lo,
        "map_span": span,
        "n_train": len(train),
        "threads": torch.get_num_threads(),
        "versions": {"anomalib": anomalib.__version__, "timm": timm.__version__, "torch": torch.__version__},
    }


# ---------------------------------------------------------------- the driver (cavga's interpreter)
def set_data(name: str, out: Path) -> tuple[Path, dict]:
    """The folder and reader options of a development set, as the studies read it (map_study's DATASETS; capsule
    from ../shared/data as default_map reads it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "studies"))
    from map_study import SHARED, data_args

    if name == "capsule":
        return SHARED / "mvtec-capsule", {"format": "mvtec", "category": "capsule"}
    return data_args(name, out)


def read_images(dataset) -> tuple[np.ndarray, list[str]]:
    """Every image of a cavga dataset as one float32 array (N, C, H, W) on [0, 1], and their paths."""
    images = [dataset[i] for i in range(len(dataset))]
    return np.stack([s.image.numpy() for s in images]).astype(np.float32), [str(s.path) for s in images]


def test_truth(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, masks (bool, N x H x W) and has-mask flags of a test split, in its order."""
    from cavga.data import collate_samples

    labels, masks, has = [], [], []
    for start in range(0, len(dataset), 64):
        batch = collate_samples([dataset[i] for i in range(start, min(len(dataset), start + 64))])
        labels.append(batch.labels.numpy())
        masks.append(batch.masks[:, 0].numpy() > 0.5)
        has.append(batch.has_mask.numpy().astype(bool))
    return tuple(np.concatenate(x) for x in (labels, masks, has))


def figures(scores: np.ndarray, maps: np.ndarray, truth: tuple) -> dict[str, float]:
    """Image AuROC of ``scores``, pixel AuROC and AUPRO of ``maps`` (on [0, 1]) over the images with masks."""
    from cavga import metrics

    labels, masks, has = truth
    maps = np.asarray(maps, dtype=np.float64)[has]
    return {
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks[has]),
        "aupro": metrics.aupro(maps, masks[has]),
    }


def photos_and_logits() -> tuple[np.ndarray, np.ndarray, dict]:
    """scikit-image's two photos as tests/test_efficientnet_lite.py prepares them (224 px, bilinear, antialiased,
    [0, 1]), cavga's Lite0 logits on them, and cavga's own top-1 verdicts."""
    import torch
    import torch.nn.functional as F
    from skimage import data

    from cavga.model.efficientnet_lite import EfficientNetLite0, load_imagenet_weights

    pixels = [torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255.0 for name in PHOTOS]
    size = (PHOTO_SIZE, PHOTO_SIZE)
    photos = torch.cat([F.interpolate(p, size=size, mode="bilinear", antialias=True) for p in pixels]).clamp(0, 1)
    with torch.no_grad():
        logits = load_imagenet_weights(EfficientNetLite0()).eval()(photos)
    return photos.numpy(), logits.numpy(), photo_verdict(logits.softmax(1).numpy(), list(PHOTOS))


def method_settings(method: str, args: argparse.Namespace) -> dict:
    if method == "cavga default":
        return {"estimator": {"seed": SEED}, "size": SIZE}
    settings = {"size": SIZE, "seed": SEED, "layers": list(LAYERS), "normalization": args.timm_normalization}
    if method == "anomalib PatchCore":
        return settings | {"coreset_ratio": args.coreset_ratio, "num_neighbors": NUM_NEIGHBORS}
    return settings | {"n_features": PADIM_FEATURES}


def has_row(rows: list[dict], name: str, method: str, settings: dict) -> bool:
    return any(r["set"] == name and r["method"] == method and r["settings"] == settings for r in rows)


def paths_digest(paths: list[str]) -> str:
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()[:16]


def cavga_row(name: str, root: Path, kwargs: dict, truth: tuple, test_paths: list[str], preprocess) -> dict:
    """Fit and evaluate the default model; its raw scores and maps scored as the anomalib ones are."""
    import cavga

    detector = cavga.Cavga(seed=SEED)
    start = time.perf_counter()
    detector.fit(root, progress=False, **kwargs)
    fit_seconds = time.perf_counter() - start
    if detector.preprocess_ != preprocess:
        raise SystemExit(f"{name}: the default read the images as {detector.preprocess_}, not {preprocess}")
    start = time.perf_counter()
    product = detector.evaluate(root, **kwargs)
    predict_seconds = time.perf_counter() - start
    outputs = detector.last_outputs_
    if [str(p) for p in outputs.paths] != test_paths:
        raise SystemExit(f"{name}: the default's test images are not the worker's, or not in its order")
    maps = outputs.anomaly_maps if outputs.raw_maps is None else outputs.raw_maps
    stored, _, _ = as_float16(maps)
    return {
        **figures(outputs.raw_scores, stored, truth),
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "n_train": detector.data_info_["n_train"],
        "n_calibration": detector.data_info_["n_calibration"],
        "product_evaluate": {k: product[k] for k in FIGURES},
        "memory": list(detector.model_.trunk_memory.bank.shape),
    }


def anomalib_row(method: str, args: argparse.Namespace, files: dict, truth: tuple, workdir: Path, log: Path) -> dict:
    """Run the worker of ``method`` on the set's files (its messages, anomalib's coreset progress among them, into
    ``log``) and score what it writes back."""
    out = workdir / method.split()[-1]
    out.mkdir(exist_ok=True)
    manifest = {**files, "method": method, "normalization": args.timm_normalization, "seed": SEED, "out": str(out)}
    manifest["coreset_ratio"] = args.coreset_ratio
    (out / "manifest.json").write_text(json.dumps(manifest))
    command = [args.anomalib_python, __file__, "--worker", str(out / "manifest.json")]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {method} worker failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {**figures(np.load(out / "scores.npy"), np.load(out / "maps.npy"), truth), **summary}


def run_set(name: str, args: argparse.Namespace, document: dict, path: Path) -> None:
    from cavga.data import Preprocess, load_dataset

    todo = [m for m in args.methods if not has_row(document["rows"], name, m, method_settings(m, args))]
    if not todo:
        print(f"{name}: done already (in {path})", flush=True)
        return
    root, kwargs = set_data(name, args.out)
    # The reader as Cavga.fit calls it with the default's size and channels left to the files.
    splits = load_dataset(root, preprocess=Preprocess(SIZE, None), **kwargs)
    truth = test_truth(splits.test)
    with tempfile.TemporaryDirectory(prefix="anomalib-accuracy-") as tmp:
        workdir = Path(tmp)
        train, train_paths = read_images(splits.train)
        test, test_paths = read_images(splits.test)
        photos, logits, _ = photos_and_logits()
        files = {key: str(workdir / f"{key}.npy") for key in ("train", "test", "photos", "cavga_logits")}
        for key, array in zip(files, (train, test, photos, logits), strict=True):
            np.save(files[key], array)
        del train, test
        from cavga.model.efficientnet_lite import imagenet_lite0_path

        files["weights"] = str(imagenet_lite0_path())
        common = {
            "set": name,
            "n_test": len(test_paths),
            "n_test_with_mask": int(truth[2].sum()),
            "test_paths_sha1": paths_digest(test_paths),
            "train_paths_sha1": paths_digest(train_paths),
            "channels": splits.train.preprocess.channels,
        }
        for method in todo:
            print(f"{name}: {method} ...", flush=True)
            if method == "cavga default":
                row = cavga_row(name, root, kwargs, truth, test_paths, splits.train.preprocess)
            else:
                log = args.out / "logs" / f"{name.replace('/', '_')}-{method.split()[-1]}.log"
                row = anomalib_row(method, args, files, truth, workdir, log)
                document["photo_check"] = row.pop("photo_check")
                row["photo_check_ok"] = document["photo_check"]["ok"]
            row = {**common, "method": method, "settings": method_settings(method, args), **row}
            document["rows"] = [r for r in document["rows"] if (r["set"], r["method"]) != (name, method)] + [row]
            save(path, document)
            print(json.dumps({k: row[k] for k in ("set", "method", *FIGURES, "fit_seconds")}), flush=True)


# ---------------------------------------------------------------- writing
def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def memory(row: dict) -> str:
    """What a method keeps of the training images, in words."""
    if "memory" not in row:
        return "-"
    rows, channels = row["memory"]
    if row["method"] == "anomalib PaDiM":  # the Gaussians' mean: channels x positions
        return f"{channels} Gaussians of {rows}"
    ratio = row["settings"].get("coreset_ratio")
    return f"{rows} x {channels}" + (f" (coreset {ratio:g})" if ratio else "")


def verdict(rows: list[dict], name: str) -> str | None:
    """The line saying whether the default is at or above PatchCore on each figure of set ``name``."""
    by = {r["method"]: r for r in rows if r["set"] == name}
    if "cavga default" not in by or "anomalib PatchCore" not in by:
        return None
    ours, theirs = by["cavga default"], by["anomalib PatchCore"]
    parts = []
    for key, label in zip(FIGURES, ("image AuROC", "pixel AuROC", "AUPRO"), strict=True):
        diff = ours[key] - theirs[key]
        parts.append(f"{label} {'at or above' if diff >= 0 else 'BELOW'} ({diff:+.4f})")
    every = all(ours[k] >= theirs[k] for k in FIGURES)
    return (
        f"cavga default against anomalib PatchCore on {name}: "
        + ", ".join(parts)
        + (" - at or above on all three." if every else " - not at or above on all three.")
    )


def markdown(document: dict) -> str:
    rows = document["rows"]
    lines = ["## cavga's default beside anomalib's PatchCore and PaDiM (same Lite0 ImageNet weights, same images)", ""]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = sorted((r for r in rows if r["set"] == name), key=lambda r: METHODS.index(r["method"]))
        first = mine[0]
        lines += [f"### {name} ({first['n_test']} test images, {first['n_test_with_mask']} with masks)", ""]
        lines += ["| method | train images | memory | image AuROC | pixel AuROC | AUPRO | fit s |", "|---" * 7 + "|"]
        for r in mine:
            held = f" (+{r['n_calibration']} held out)" if r.get("n_calibration") else ""
            cells = [f"{r['n_train']}{held}", memory(r), *(_fmt(r[k]) for k in FIGURES), _fmt(r["fit_seconds"], 1)]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        line = verdict(rows, name)
        lines += ["", line, ""] if line else [""]
    check = document.get("photo_check")
    if check:
        mapped = "; ".join(f"{n} {v['top1']} ({v['probability']:.3f})" for n, v in check["weights"].items())
        imagenet = "; ".join(f"{n} {v['top1']} ({v['probability']:.3f})" for n, v in check["imagenet"].items())
        lines.append(
            f"Photo check of the mapped weights in timm (top-1 class, probability): {mapped}; largest logit "
            f"difference from cavga's Lite0 {check['max_logit_difference_from_cavga']:.2g}. With ImageNet mean and "
            f"std instead of the weights' normalization: {imagenet}."
        )
    lines += [""] + [f"- {note}" for note in document["notes"]]
    return "\n".join(lines) + "\n"


def save(path: Path, document: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    path.with_suffix(".md").write_text(markdown(document))


def notes(args: argparse.Namespace) -> list[str]:
    return [
        "Training images: cavga's default fills its memory from the normal training images less a seeded 10 % "
        "calibration slice it holds out to calibrate its threshold on; anomalib's PatchCore and PaDiM read every "
        "normal training image the cavga fit read (they calibrate nothing here).",
        "Images: the product's reader and split, 256 px (PIL's antialiased bilinear resize), the same tensors for "
        f"all; for timm normalized with the {args.timm_normalization!r} normalization "
        f"(mean {NORMALIZATION[args.timm_normalization][0][0]:.3f}.., std "
        f"{NORMALIZATION[args.timm_normalization][1][0]:.3f}..), gray images repeated to three channels.",
        "Backbone: timm's efficientnet_lite0, pre_trained=False, given cavga's packaged Lite0 ImageNet weights by "
        "key mapping, BatchNorm eps set to 1e-3 as the weights need; levels blocks.2 (stride 8, 40 channels) and "
        "blocks.4 (stride 16, 112).",
        f"PatchCore: anomalib 2.7 PatchcoreModel, coreset ratio as its row says (anomalib's default "
        f"{CORESET_RATIO}), {NUM_NEIGHBORS} neighbours; "
        f"PaDiM: PadimModel with all {PADIM_FEATURES} channels; both run as torch modules, no Lightning engine, "
        "scores and maps as the modules give them (no post-processing).",
        "Metrics: cavga.metrics image_auroc, pixel_auroc, aupro (exact curve, 30 % FPR) on each method's scores "
        "and its maps divided by their maximum over the set, stored as float16 for all three; cavga's own "
        "evaluate (full precision) is in each default row's product_evaluate.",
        TIMING_NOTE + ".",
    ]


def machine() -> dict[str, Any]:
    import torch

    import cavga

    return {
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cavga_version": cavga.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/anomalib-accuracy"))
    parser.add_argument("--datasets", nargs="+", default=list(SETS), help=f"default: {' '.join(SETS)}")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--anomalib-python", default=".venv-anomalib/bin/python")
    parser.add_argument("--timm-normalization", choices=list(NORMALIZATION), default="weights")
    parser.add_argument("--coreset-ratio", type=float, default=CORESET_RATIO, help="PatchCore's (anomalib's: 0.1)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(anomalib_worker(json.loads(args.worker.read_text()))), flush=True)
        return 0
    if any(m != "cavga default" for m in args.methods) and not Path(args.anomalib_python).is_file():
        parser.error(f"--anomalib-python {args.anomalib_python}: no such interpreter (see the module docstring)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "anomalib_accuracy.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    command = [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
    # Every invocation that wrote rows here, in order (a set may need settings of its own, e.g. a coreset ratio).
    commands = old.get("commands", [old["command"]] if "command" in old else []) + [command]
    document = {"commands": commands, "machine": machine(), "notes": notes(args), "rows": old.get("rows", [])}
    if "photo_check" in old:
        document["photo_check"] = old["photo_check"]
    for name in args.datasets:
        run_set(name, args, document, path)
    save(path, document)
    print(markdown(document), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
