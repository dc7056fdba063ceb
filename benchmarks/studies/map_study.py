"""Which anomaly map of a CAVGA model finds defects: every map of ``cavga.engine.maps`` on the same trained models.

Trains each (dataset, model) pair once, then scores every map from that one model, each calibrated on the same
held-out normal training images (never a test image), and records image / pixel AuROC, AUPRO, IoU, balanced
accuracy and how much the map depends on the image (the mean pairwise correlation of the raw maps of different
test images: near 1 means the map draws the same picture for every input).

    python benchmarks/studies/map_study.py --out runs/map-study                       # every dataset and model
    python benchmarks/studies/map_study.py --out runs/map-study --datasets demo/wood --models L-frozen D-paper
    python benchmarks/studies/map_study.py --out runs/map-study --datasets magnetic_tile --models L-frozen \
        --maps "paper (1 - A, residual score)" latent_gaussian      # only these rows (a long dataset)

Development data: the MVTec AD ``bottle`` category and Magnetic Tile from ``../shared/data``, and the built-in
demo categories (written into OUT/demo). Writes OUT/study.json after every (dataset, model) pair, so an
interrupted study keeps what it finished and a rerun skips what it holds; OUT/study.md holds the tables. Each
trained model is saved to OUT/models/DATASET/MODEL and loaded from there by a later run (no retraining).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cavga.api import Cavga
from cavga.api import load as load_model
from cavga.data.splits import split_calibration, split_differs
from cavga.data.synthetic import DEMO_CATEGORIES, write_demo_dataset
from cavga.engine.infer import (
    PAPER_CHOICE,
    MapChoice,
    calibrate,
    evaluate_outputs,
    fit_latent_gaussian,
    fit_latent_memory,
    infer_dataset,
)
from cavga.engine.maps import ANOMALY_MAPS
from cavga.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATASETS = {
    "bottle": {"root": SHARED / "mvtec-bottle", "format": "mvtec", "category": "bottle", "size": 256},
    # Split by tile (cavga's split since the tiles' six exposures were found); "magnetic_tile/image" is the
    # split by image that every Magnetic Tile figure before it used (normal test tiles have copies in training).
    "magnetic_tile": {
        "root": SHARED / "magnetic-tile",
        "format": "magnetic_tile",
        "seed": 0,
        "size": 256,
        "split": "tile",
    },
    "magnetic_tile/image": {
        "root": SHARED / "magnetic-tile",
        "format": "magnetic_tile",
        "seed": 0,
        "size": 256,
        "split": "image",
    },
    **{f"demo/{c}": {"root": None, "format": "mvtec", "category": c, "size": 128} for c in DEMO_CATEGORIES},
    # The same categories drawn with another seed: new development images (OUT/demo-s1).
    **{
        f"demo-s1/{c}": {"root": None, "format": "mvtec", "category": c, "size": 128, "demo_seed": 1}
        for c in DEMO_CATEGORIES
    },
}
# Options of each model; "size" takes the dataset's own size unless the model fixes one. D-paper is the
# paper-literal CAVGA-D_u (its loss weights, 64 px); L-* are the ImageNet EfficientNet-Lite0 CAVGA.
MODELS: dict[str, dict] = {
    "D-paper": {"variant": "D", "image_size": 64, "epochs": 20},
    "L-frozen": {"variant": "L", "freeze_encoder": True, "epochs": 1},
    "L-finetuned": {"variant": "L", "freeze_encoder": False, "epochs": 1},
    "L-random": {"variant": "L", "encoder_weights": "none", "epochs": 1},
    # The trunk's stride 16 and 32 maps (112 + 320 channels) instead of 8 and 16: deeper context, coarser map.
    "L16-frozen": {"variant": "L", "freeze_encoder": True, "epochs": 1, "latent_stride": 16},
}
L_OPTIONS = {"latent_stride": 8, "latent_channels": 64, "width": 16}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "iou", "balanced_accuracy", "map_correlation")


def map_correlation(maps: np.ndarray, limit: int = 40) -> float:
    """Mean Pearson correlation between the maps of different images (at most ``limit``, evenly spread)."""
    idx = np.linspace(0, len(maps) - 1, min(limit, len(maps))).round().astype(int)
    flat = maps[idx].reshape(len(idx), -1).astype(np.float64)
    flat = flat - flat.mean(1, keepdims=True)
    flat = flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-12)
    c = flat @ flat.T
    n = len(idx)
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def choices() -> dict[str, MapChoice]:
    """Every map, deviation maps scored by their maximum, attention maps by the paper's residual score."""
    out = {"paper (1 - A, residual score)": PAPER_CHOICE}
    for name, spec in ANOMALY_MAPS.items():
        if name != "attention":
            out[name] = MapChoice(name, "map_max" if spec.calibrated else PAPER_CHOICE.score)
    return out


def data_args(name: str, out: Path) -> tuple[Path, dict]:
    spec = DATASETS[name]
    demo_seed = spec.get("demo_seed", 0)
    root = spec["root"] or out / ("demo" if demo_seed == 0 else f"demo-s{demo_seed}")
    if spec["root"] is None and not (root / "README.txt").exists():  # written once, read by every later run
        write_demo_dataset(root, seed=demo_seed)
    kwargs = {k: spec[k] for k in ("format", "category", "seed", "split") if k in spec}
    return root, kwargs


def trained_model(dataset: str, model: str, out: Path, device: str = "auto") -> tuple[Cavga, bool]:
    """The study's model of ``dataset``: loaded from OUT/models when a run saved it (second value True), else
    trained and saved. A loaded model's latent Gaussian is refitted as this cavga fits it (the model may come
    from a run before a change to that fit; training does not depend on it), a new one's fitted where fit() left
    it out (its map reads none); its memory is filled if it has none."""
    root, kwargs = data_args(dataset, out)
    options = {**(L_OPTIONS if MODELS[model]["variant"] == "L" else {}), **MODELS[model]}
    options.setdefault("image_size", DATASETS[dataset]["size"])
    saved = out / "models" / dataset.replace("/", "_") / model
    reused = (saved / "config.json").exists()
    if not reused:
        detector = Cavga(setting="u", seed=0, device=device, **options)
        detector.fit(root, progress=False, **kwargs)
    else:
        detector = load_model(saved, device=device)
        neighbourhood = Cavga(setting="u", **options).model_config.gaussian_neighbourhood
        detector.model_config.gaussian_neighbourhood = neighbourhood
        detector.model_.config.gaussian_neighbourhood = neighbourhood
    splits = detector._load(root, **kwargs)
    if reused and split_differs(detector.data_info_, splits.info):
        # e.g. a model saved before Magnetic Tile was split by tile: its training images would count as test images
        trained_on, now = detector.data_info_["split"], splits.info["split"]
        raise ConfigError(f"{saved} was trained on the split {trained_on}, not {now}: use another --out")
    config = detector.train_config
    train_set, _ = split_calibration(splits.train, config.calibration_fraction, config.seed)
    gaussian = detector.model_.latent_gaussian
    if reused or (gaussian is not None and not gaussian.fitted):
        # The latent_gaussian rows' Gaussian: fit() fits it only where the model's own map or score reads it.
        fit_latent_gaussian(detector.model_, train_set)
    # The latent_knn row's memory: fit() fills it where it is the model's map; a file without one is filled here.
    detector.memory_seconds_ = fill_memory(detector, train_set)
    if not reused:
        detector.save(saved)
    return detector, reused


def fill_memory(detector: Cavga, train_set) -> float | None:
    """Fill the latent_knn memory of a model that has none, from ``train_set`` as fit() would: the seconds it
    took, or None where the memory was already filled."""
    if detector.model_.latent_memory.fitted:
        return None
    started = time.perf_counter()
    fit_latent_memory(detector.model_, train_set, detector.train_config.seed)
    return round(time.perf_counter() - started, 1)


def evaluate_choice(
    detector: Cavga, test, choice: MapChoice, calibration_set, train_set, memory_weights=None
) -> tuple[dict, object]:
    """The metrics (and the outputs) of one map and score of ``detector`` on ``test``, calibrated on the held-out
    normal ``calibration_set`` (cross-fitted with ``train_set`` where the choice is; ``memory_weights``:
    knn_classifier's cross-fitted weights of ``train_set``), with how much the maps depend on the image. Raises
    ConfigError for a map this model cannot draw."""
    model = detector.model_
    calibration = calibrate(
        model,
        calibration_set,
        detector.calibration_quantile,
        choice=choice,
        training_normals=train_set,
        memory_weights=memory_weights,
    )
    outputs = infer_dataset(model, test, calibration=calibration, choice=choice)
    result = evaluate_outputs(outputs, calibration)
    result["map_correlation"] = map_correlation(outputs.raw_maps)
    return {k: (None if v is None else float(v)) for k, v in result.items()}, outputs


def run_pair(dataset: str, model: str, out: Path, device: str, only: list[str] | None = None) -> dict:
    root, kwargs = data_args(dataset, out)
    started = time.perf_counter()
    detector, reused = trained_model(dataset, model, out, device)
    splits = detector._load(root, **kwargs)
    train_set, calibration_set = split_calibration(
        splits.train, detector.train_config.calibration_fraction, detector.train_config.seed
    )
    rows = {}
    for label, choice in choices().items():
        if only and label not in only:
            continue
        try:
            rows[label], _ = evaluate_choice(detector, splits.test, choice, calibration_set, train_set)
        except ConfigError as exc:  # a map this model cannot draw (e.g. ADVAE on another layer)
            rows[label] = {"error": str(exc)}
    return {
        "dataset": dataset,
        "model": model,
        "options": detector.params,
        "train_seconds": round(detector.train_seconds_, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "model_reused": reused,  # wall_seconds then leave out the training
        "memory_seconds": getattr(detector, "memory_seconds_", None),  # filling latent_knn's memory, if done here
        "gaussian_neighbourhood": detector.model_.config.gaussian_neighbourhood,
        "n_train": detector.data_info_["n_train"],
        "n_calibration": detector.data_info_["n_calibration"],
        "n_test": len(splits.test),
        "maps": rows,
    }


def save_rows(rows: list[dict], path: Path, markdown_path: Path, markdown: Callable[[list[dict]], str]) -> None:
    """Write a study's ``rows`` to ``path`` atomically (a rerun resumes from it) and their table to
    ``markdown_path``: after every row, so an interrupted study keeps what it finished."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    markdown_path.write_text(markdown(rows))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        lines.append(
            f"### {run['dataset']}, {run['model']} ({run['n_train']} train / {run['n_calibration']} calibration / "
            f"{run['n_test']} test images; trained {run['train_seconds']} s)\n"
        )
        lines += table(run["maps"], METRICS, "map")
        lines.append("")
    return "\n".join(lines)


def table(rows: dict[str, dict], metrics, first: str, extra: tuple[str, Callable[[dict], str]] | None = None):
    """Markdown lines of one table: a row per label, a cell per metric ("n/a" on a row that failed, "-" for a
    metric without a value) and, given ``extra`` (header, cell of a row), one more column."""
    head = [first, *metrics] + ([extra[0]] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, row in rows.items():
        cells = ["n/a" if "error" in row else _fmt(row.get(m)) for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells + ([extra[1](row)] if extra else [])) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--maps", nargs="+", choices=list(choices()), help="only these rows (default: every map)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "study.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    done = {(r["dataset"], r["model"]) for r in runs}
    for dataset in args.datasets:
        if DATASETS[dataset]["root"] is not None and not DATASETS[dataset]["root"].exists():
            print(f"skipping {dataset}: {DATASETS[dataset]['root']} not found", file=sys.stderr)
            continue
        for model in args.models:
            if (dataset, model) in done:
                continue
            print(f"training {model} on {dataset} ...", flush=True)
            runs.append(run_pair(dataset, model, args.out, args.device, args.maps))
            save_rows(runs, path, args.out / "study.md", markdown)
            print(markdown([runs[-1]]), flush=True)
    (args.out / "study.md").write_text(markdown(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
