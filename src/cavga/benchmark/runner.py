"""The paper's experiments as benchmark suites (``cavga benchmark SUITE``): Tables 3, 6, 7 and 8 regenerated.

Suites:

- ``mvtec``: every MVTec-layout category under the root (or those named): CAVGA-D_u, R_u, D_w, R_w and the
  AE-SSIM / AE-L2 baselines; IoU, pixel AuROC, AUPRO, balanced accuracy and image AuROC per category.
- ``pairs``: an image+mask pair layout (Magnetic Tile, or normal/abnormal/masks folders): the same models and
  table, on the reader's seeded split.
- ``oneclass``: MNIST / Fashion-MNIST / CIFAR-10 / class folders: CAVGA-D_u per class, image AuROC (Table 7).
- ``ablation``: Table 8's eight columns (flattened vs conv z, with and without L_ae in u, L_cga in w) on an
  MVTec-layout or pair-layout root, IoU.

Each (suite, model, category, seed, config) result is cached as ``OUT/cache/.../<hash>.json``, the hash taken
of everything that decides the result; a restarted suite skips what is cached. ``results.json`` holds every
number and ``results.md`` the tables, with the paper's number beside ours where the paper has that row.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cavga._version import __version__
from cavga.api import Cavga
from cavga.baselines import AutoencoderBaseline
from cavga.data import (
    ANOMALOUS,
    AnomalyDataset,
    DatasetSplits,
    Preprocess,
    list_mvtec_categories,
    load_dataset,
)
from cavga.data.oneclass import detect_oneclass_source, read_cifar10, read_class_folders, read_idx
from cavga.data.splits import exclude_paths, sample_weak_labels
from cavga.data.synthetic import write_demo_dataset
from cavga.engine.checkpoint import atomic_write
from cavga.engine.train import resolve_device
from cavga.errors import ConfigError, DataError

SUITES = ("mvtec", "pairs", "oneclass", "ablation")
METRICS = ("iou", "pixel_auroc", "aupro", "balanced_accuracy", "image_auroc")
METRIC_TITLES = {
    "iou": "IoU",
    "pixel_auroc": "pixel AuROC",
    "aupro": "AUPRO",
    "balanced_accuracy": "balanced accuracy",
    "image_auroc": "image AuROC",
}
CACHE_VERSION = 1  # bump when a change to this file changes what a cached result means
DATA_SEED = 0  # the seed of data caps and of the pair layout's train/test split, the same for every model


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One column of a table: a CAVGA model (with extra options) or an AE baseline."""

    name: str
    kind: str  # "cavga" or "ae"
    variant: str = "D"  # CAVGA variant; "D" sizes the AE baselines too
    setting: str = "u"
    options: tuple[tuple[str, Any], ...] = ()  # extra Cavga options, e.g. (("flatten_latent", True),)
    title: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "variant": self.variant, "setting": self.setting,
                "options": dict(self.options)}  # fmt: skip


CAVGA_MODELS = tuple(
    ModelSpec(f"CAVGA-{v}_{s}", "cavga", v, s) for v, s in (("D", "u"), ("R", "u"), ("D", "w"), ("R", "w"))
)
BASELINES = (
    ModelSpec("AE-SSIM", "ae", options=(("kind", "ssim"),)),
    ModelSpec("AE-L2", "ae", options=(("kind", "l2"),)),
)
# Table 8: "*" = flattened 100-d z; the u columns switch L_ae off by w_ae = 0, the w columns L_cga by w_cga = 0.
ABLATION_MODELS = (
    ModelSpec("c1", "cavga", "R", "u", (("flatten_latent", True), ("w_ae", 0.0)), "CAVGA-R_u*"),
    ModelSpec("c2", "cavga", "R", "u", (("flatten_latent", True),), "CAVGA-R_u* + L_ae"),
    ModelSpec("c3", "cavga", "R", "u", (("w_ae", 0.0),), "CAVGA-R_u + conv z"),
    ModelSpec("c4", "cavga", "R", "u", (), "CAVGA-R_u + conv z + L_ae"),
    ModelSpec("c5", "cavga", "R", "w", (("flatten_latent", True), ("w_cga", 0.0)), "CAVGA-R_w*"),
    ModelSpec("c6", "cavga", "R", "w", (("flatten_latent", True),), "CAVGA-R_w* + L_cga"),
    ModelSpec("c7", "cavga", "R", "w", (("w_cga", 0.0),), "CAVGA-R_w + conv z"),
    ModelSpec("c8", "cavga", "R", "w", (), "CAVGA-R_w + conv z + L_cga"),
)
SUITE_MODELS = {
    "mvtec": CAVGA_MODELS + BASELINES,
    "pairs": CAVGA_MODELS + BASELINES,
    "oneclass": (CAVGA_MODELS[0],),
    "ablation": ABLATION_MODELS,
}
ALL_MODELS = {m.name: m for m in CAVGA_MODELS + BASELINES + ABLATION_MODELS}


def suite_models(suite: str, names: Sequence[str] | None = None) -> list[ModelSpec]:
    """The models of ``suite`` (its default set), or the named ones in the given order."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    if not names:
        return list(SUITE_MODELS[suite])
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}; known: {', '.join(ALL_MODELS)}")
    return [ALL_MODELS[n] for n in names]


# ---------------------------------------------------------------------------------------------- budgets


@dataclass
class Budget:
    """Training budget and data caps. The defaults fit the ``pairs`` suite on Magnetic Tile (four CAVGA models
    and two baselines) in about 2 hours on 2 CPU cores; see the README for GPU settings."""

    epochs: int = 8
    image_size_d: int = 64
    image_size_r: int = 128
    image_size_ae: int = 64
    batch_size: int = 16
    width: int | None = None  # None: each model's default width
    max_train: int | None = None  # seeded cap on the training images per category (None: all)
    max_test: int | None = None  # seeded cap on the test images per category (None: all)
    anomalous_fraction: float = 0.02  # CAVGA_w's weak labels: 2 % of the anomalous test images (paper)
    device: str = "auto"

    def image_size(self, spec: ModelSpec) -> int:
        if spec.kind == "ae":
            return self.image_size_ae
        return self.image_size_d if spec.variant == "D" else self.image_size_r


QUICK_BUDGET = Budget(
    epochs=1, image_size_d=32, image_size_r=64, image_size_ae=32, batch_size=4, width=8, max_train=8, max_test=12
)


# ---------------------------------------------------------------------------------------------- paper numbers

MVTEC_CATEGORIES = (
    "bottle", "hazelnut", "capsule", "metal_nut", "leather", "pill", "wood", "carpet",
    "tile", "grid", "cable", "transistor", "toothbrush", "screw", "zipper",
)  # fmt: skip
_T36_MODELS = ("AE-SSIM", "AE-L2", "CAVGA-D_u", "CAVGA-R_u", "CAVGA-D_w", "CAVGA-R_w")
# Table 3 (IoU) and Table 6 (balanced accuracy), the columns of the models run here, rows in MVTEC_CATEGORIES
# order and then the mean.
_TABLE3_IOU = """
0.15 0.22 0.30 0.34 0.36 0.39
0.00 0.41 0.44 0.51 0.58 0.79
0.09 0.11 0.25 0.31 0.38 0.41
0.01 0.26 0.39 0.45 0.46 0.46
0.34 0.67 0.76 0.79 0.80 0.84
0.07 0.25 0.34 0.40 0.44 0.53
0.36 0.29 0.56 0.59 0.61 0.66
0.69 0.38 0.71 0.73 0.70 0.81
0.04 0.23 0.31 0.38 0.47 0.81
0.88 0.83 0.32 0.38 0.42 0.55
0.01 0.05 0.37 0.44 0.49 0.51
0.01 0.22 0.30 0.35 0.38 0.45
0.08 0.51 0.54 0.57 0.60 0.63
0.03 0.34 0.42 0.48 0.51 0.66
0.10 0.13 0.20 0.26 0.29 0.31
0.19 0.33 0.41 0.47 0.50 0.59
"""
_TABLE3_MEAN_AUROC = "0.87 0.82 0.85 0.89 0.92 0.93"
_TABLE6_BALANCED_ACCURACY = """
0.88 0.80 0.89 0.91 0.93 0.96
0.54 0.88 0.84 0.87 0.90 0.92
0.61 0.62 0.83 0.87 0.89 0.93
0.54 0.73 0.67 0.71 0.81 0.88
0.46 0.44 0.71 0.75 0.80 0.84
0.60 0.62 0.88 0.91 0.93 0.97
0.83 0.74 0.85 0.88 0.89 0.89
0.67 0.50 0.73 0.78 0.80 0.82
0.52 0.77 0.70 0.72 0.81 0.86
0.69 0.78 0.75 0.78 0.79 0.81
0.61 0.56 0.63 0.67 0.86 0.97
0.52 0.71 0.73 0.75 0.80 0.89
0.74 0.98 0.91 0.97 0.96 0.99
0.51 0.69 0.77 0.78 0.79 0.79
0.80 0.80 0.87 0.94 0.95 0.96
0.63 0.71 0.78 0.82 0.86 0.90
"""
# Table 7, CAVGA-D_u: classes 0-9 then the mean; Fashion-MNIST has only the mean.
_TABLE7_MNIST = "0.994 0.997 0.989 0.983 0.977 0.968 0.988 0.986 0.988 0.991 0.986"
_TABLE7_CIFAR10 = "0.653 0.784 0.761 0.747 0.775 0.552 0.813 0.745 0.801 0.741 0.737"
_TABLE7_FASHION_MEAN = 0.885
# Table 8 (IoU), columns c1..c8; five categories and the mean over all 15.
_TABLE8_CATEGORIES = ("bottle", "hazelnut", "capsule", "metal_nut", "leather", "mean")
_TABLE8_IOU = """
0.24 0.27 0.26 0.33 0.16 0.34 0.28 0.39
0.16 0.26 0.31 0.47 0.51 0.76 0.67 0.79
0.09 0.22 0.14 0.31 0.18 0.36 0.27 0.41
0.28 0.38 0.34 0.45 0.25 0.38 0.28 0.46
0.55 0.71 0.64 0.79 0.72 0.79 0.75 0.84
0.24 0.34 0.33 0.47 0.39 0.52 0.48 0.60
"""


def _grid(text: str, rows: Sequence[str], columns: Sequence[str]) -> dict[str, dict[str, float]]:
    lines = [line.split() for line in text.strip().splitlines()]
    if len(lines) != len(rows) or any(len(line) != len(columns) for line in lines):
        raise AssertionError("paper table text does not match its row and column names")
    return {col: {row: float(line[j]) for row, line in zip(rows, lines, strict=True)} for j, col in enumerate(columns)}


def _paper() -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    rows = (*MVTEC_CATEGORIES, "mean")
    auroc = dict(zip(_T36_MODELS, map(float, _TABLE3_MEAN_AUROC.split()), strict=True))
    digits = [str(d) for d in range(10)] + ["mean"]
    return {
        # PAPER[table][metric][model][row]
        "mvtec": {
            "iou": _grid(_TABLE3_IOU, rows, _T36_MODELS),
            "pixel_auroc": {m: {"mean": v} for m, v in auroc.items()},
            "balanced_accuracy": _grid(_TABLE6_BALANCED_ACCURACY, rows, _T36_MODELS),
        },
        "mnist": {"image_auroc": {"CAVGA-D_u": dict(zip(digits, map(float, _TABLE7_MNIST.split()), strict=True))}},
        "cifar10": {"image_auroc": {"CAVGA-D_u": dict(zip(digits, map(float, _TABLE7_CIFAR10.split()), strict=True))}},
        "fashion-mnist": {"image_auroc": {"CAVGA-D_u": {"mean": _TABLE7_FASHION_MEAN}}},
        "ablation": {"iou": _grid(_TABLE8_IOU, _TABLE8_CATEGORIES, [m.name for m in ABLATION_MODELS])},
    }


PAPER = _paper()
PAPER_SOURCES = {
    "mvtec": "Tables 3 and 6",
    "mnist": "Table 7",
    "cifar10": "Table 7",
    "fashion-mnist": "Table 7",
    "ablation": "Table 8",
}


def paper_value(table: str | None, metric: str, model: str, row: str) -> float | None:
    """The paper's number for (table, metric, model, row), or None where the paper has no such cell."""
    if table is None:
        return None
    return PAPER.get(table, {}).get(metric, {}).get(model, {}).get(_row_key(row))


def _row_key(category: str) -> str:
    return category.strip().lower().replace(" ", "_").replace("-", "_")


# ---------------------------------------------------------------------------------------------- data


def list_categories(suite: str, root: Path, wanted: Sequence[str] | None = None) -> list[str]:
    """The categories (MVTec), the one pair dataset, or the classes (one-class) that ``suite`` runs on."""
    fmt = _ablation_format(root) if suite == "ablation" else suite
    if fmt == "oneclass":
        found = _oneclass_classes(root)
    elif fmt == "mvtec":
        found = list_mvtec_categories(root)
        if not found and (root / "train").is_dir() and (root / "test").is_dir():
            found = [root.name]  # root is one category folder
        if not found:
            raise DataError(f"no MVTec-layout categories in {root}")
    else:
        found = [root.name]
    if not wanted:
        return found
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"categories {missing} are not in {root}; found: {', '.join(found)}")
    return list(wanted)


def _ablation_format(root: Path) -> str:
    is_category = (root / "train").is_dir() and (root / "test").is_dir() and (root / "ground_truth").is_dir()
    return "mvtec" if list_mvtec_categories(root) or is_category else "pairs"


def _oneclass_classes(root: Path) -> list[str]:
    source = detect_oneclass_source(root)
    if source == "idx":
        labels = read_idx(root)[1]
    elif source == "cifar10":
        labels = read_cifar10(root)[1]
    elif source == "folders":
        return sorted(set(read_class_folders(root)[1]), key=lambda c: (len(c), c))
    else:
        raise DataError(f"no one-class source (IDX, CIFAR-10 or class folders) in {root}")
    return [str(v) for v in sorted(np.unique(labels).tolist())]


def load_category(suite: str, root: Path, category: str) -> DatasetSplits:
    """The splits of one category, images at their stored size and channel count (resized per model later)."""
    pre = Preprocess(None, None)
    if suite == "oneclass":
        return load_dataset(root, format="oneclass", normal_class=category, preprocess=pre)
    fmt = _ablation_format(root) if suite == "ablation" else suite
    if fmt == "mvtec":
        return load_dataset(root, format="mvtec", category=category, preprocess=pre)
    return load_dataset(root, format="pairs", preprocess=pre, seed=DATA_SEED)


def _cap(dataset: AnomalyDataset, limit: int | None) -> AnomalyDataset:
    if limit is None or len(dataset) <= limit:
        return dataset
    chosen = np.random.default_rng(DATA_SEED).choice(len(dataset), size=limit, replace=False)
    return dataset.subset(sorted(int(i) for i in chosen))


def sized(splits: DatasetSplits, image_size: int, budget: Budget) -> DatasetSplits:
    """``splits`` capped by the budget and resized to ``image_size`` (channels as the data stores them)."""
    channels = splits.train.preprocess.channels or (1 if splits.train[0].image.shape[0] == 1 else 3)
    pre = Preprocess(image_size, channels)
    train = _cap(splits.train, budget.max_train)
    test = _cap(splits.test, budget.max_test)
    # Every model of this size trains and evaluates on these datasets: decode and resize each image once.
    return DatasetSplits(
        AnomalyDataset(train.records, pre, train.array, memo={}),
        AnomalyDataset(test.records, pre, test.array, memo={}),
        splits.info,
    )


# ---------------------------------------------------------------------------------------------- one job


def job_config(suite: str, spec: ModelSpec, category: str, seed: int, root: Path, budget: Budget) -> dict:
    """Everything that decides one result; its hash names the cache file."""
    return {
        "cache_version": CACHE_VERSION,
        "suite": suite,
        "model": spec.to_dict(),
        "category": category,
        "seed": seed,
        "data": str(root.resolve()),
        "data_seed": DATA_SEED,
        "image_size": budget.image_size(spec),
        "epochs": budget.epochs,
        "batch_size": budget.batch_size,
        "width": budget.width,
        "max_train": budget.max_train,
        "max_test": budget.max_test,
        "anomalous_fraction": budget.anomalous_fraction,
    }


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def run_job(
    spec: ModelSpec, splits: DatasetSplits, seed: int, budget: Budget, hold_out_weak: bool, progress: bool
) -> dict:
    """Train and evaluate one model on one category; returns metrics, timings and data counts."""
    started = time.perf_counter()
    size = budget.image_size(spec)
    channels = 1 if splits.train[0].image.shape[0] == 1 else 3
    if spec.kind == "ae":
        model: Any = AutoencoderBaseline(
            image_size=size, channels=channels, epochs=budget.epochs, batch_size=budget.batch_size, seed=seed,
            device=budget.device, **({"width": budget.width} if budget.width else {}), **dict(spec.options),
        )  # fmt: skip
    else:
        options = dict(spec.options)
        if budget.width:
            options["width"] = budget.width
        if spec.setting == "w":
            options["anomalous_fraction"] = budget.anomalous_fraction
        model = Cavga(
            spec.variant, spec.setting, image_size=size, channels=channels, epochs=budget.epochs,
            batch_size=budget.batch_size, seed=seed, device=budget.device, **options,
        )  # fmt: skip
    model.fit(splits, progress=progress)
    evaluated = splits
    if hold_out_weak and spec.setting != "w":
        # Every row counts the same test images: leave out the seeded sample a w model with this seed trains on
        # (a w model leaves it out itself).
        sample = sample_weak_labels(splits.test, budget.anomalous_fraction, None, seed)
        held = [splits.test.paths[i] for i in sample]
        evaluated = DatasetSplits(splits.train, exclude_paths(splits.test, held), splits.info)
    eval_start = time.perf_counter()
    metrics = model.evaluate(evaluated)
    return {
        "metrics": {k: (None if v is None else float(v)) for k, v in metrics.items()},
        "train_seconds": round(model.train_seconds_, 2),
        "eval_seconds": round(time.perf_counter() - eval_start, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "n_train": model.data_info_["n_train"],
        "n_calibration": model.data_info_["n_calibration"],
        "device": device_name(budget.device),
    }


def device_name(device: str) -> str:
    """What trained a model: "cpu" or the CUDA device's name (records from several machines can share a cache)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(resolved)})"
    return resolved.type


def _write_json(path: Path, data: Any) -> None:
    # Atomic: a crash leaves no half-written cache file that a restart would trust.
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------- the suite


@dataclass
class SuiteRun:
    """The outcome of :func:`run_suite`: every result record, and the files written."""

    records: list[dict] = field(default_factory=list)
    results_json: Path | None = None
    results_md: Path | None = None

    @property
    def trained(self) -> int:
        return sum(1 for r in self.records if not r["cached"])


def run_suite(
    suite: str,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    budget: Budget | None = None,
    categories: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    models: Sequence[str] | None = None,
    quick: bool = False,
    paper_dataset: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> SuiteRun:
    """Run (or resume) ``suite`` and write ``OUT/results.json`` and ``OUT/results.md``.

    ``quick``: the tiny :data:`QUICK_BUDGET` and, when ``data`` is None, tiny generated data under
    ``OUT/quick-data``. ``paper_dataset`` ("mnist", "fashion-mnist", "cifar10") picks Table 7's column for
    the oneclass suite; None guesses it from the data folder's name."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or (dataclasses.replace(QUICK_BUDGET) if quick else Budget())
    if data is None:
        if not quick:
            raise ConfigError("--data is required (or --quick, which generates tiny data)")
        data = write_quick_data(suite, out / "quick-data")
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    specs = suite_models(suite, models)
    cats = list_categories(suite, root, categories)
    table = paper_table(suite, root, paper_dataset)
    started = time.perf_counter()
    run = SuiteRun()
    meta = {
        "suite": suite,
        "command": command,
        "data": str(root.resolve()),
        "out": str(out.resolve()),
        "quick": quick,
        "budget": dataclasses.asdict(budget),
        "seeds": list(seeds),
        "categories": cats,
        "models": [s.to_dict() | {"title": s.title or s.name} for s in specs],
        "paper_table": table,
        "git_commit": git_commit(),
        "cavga_version": __version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "python": sys.version.split()[0],
    }
    n_jobs, done = len(cats) * len(specs) * len(seeds), 0
    for category in cats:
        raw_splits: DatasetSplits | None = None
        by_size: dict[int, DatasetSplits] = {}
        for spec in specs:
            for seed in seeds:
                done += 1
                config = job_config(suite, spec, category, seed, root, budget)
                key = config_hash(config)
                path = out / "cache" / suite / _slug(spec.name) / _slug(category) / f"seed{seed}-{key}.json"
                if path.is_file():
                    record = json.loads(path.read_text()) | {"cached": True}
                    log(f"[{done}/{n_jobs}] {spec.name} {category} seed {seed}: cached ({path.name})")
                else:
                    if raw_splits is None:
                        raw_splits = load_category(suite, root, category)
                    size = budget.image_size(spec)
                    if size not in by_size:
                        by_size[size] = sized(raw_splits, size, budget)
                    splits = by_size[size]
                    hold_out = suite != "oneclass" and any(s.setting == "w" for s in specs)
                    hold_out = hold_out and ANOMALOUS in splits.test.labels
                    result = run_job(spec, splits, seed, budget, hold_out, progress)
                    record = {
                        "suite": suite,
                        "model": spec.name,
                        "category": category,
                        "seed": seed,
                        "key": key,
                        "config": config,
                        **result,
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "cavga_version": __version__,
                    }
                    _write_json(path, record)
                    record = record | {"cached": False}
                    shown = ", ".join(f"{k} {_fmt(record['metrics'].get(k))}" for k in _suite_metrics(suite))
                    wall = result["wall_seconds"]
                    log(f"[{done}/{n_jobs}] {spec.name} {category} seed {seed}: {shown} ({wall:.0f} s)")
                run.records.append(record)
                meta["total_seconds"] = round(time.perf_counter() - started, 1)
                run.results_json, run.results_md = write_results(out, meta, specs, cats, run.records)
    return run


def write_results(
    out: Path, meta: dict, specs: Sequence[ModelSpec], categories: Sequence[str], records: Sequence[dict]
) -> tuple[Path, Path]:
    """Write ``results.json`` (meta, every record, the summary) and ``results.md`` (the tables)."""
    summary = summarize(meta["suite"], meta.get("paper_table"), specs, categories, records)
    results_json, results_md = out / "results.json", out / "results.md"
    _write_json(results_json, {**meta, "results": list(records), "summary": summary})
    results_md.write_text(markdown_report(meta, specs, categories, records, summary))
    return results_json, results_md


# ---------------------------------------------------------------------------------------------- summaries


def _suite_metrics(suite: str) -> tuple[str, ...]:
    return {"oneclass": ("image_auroc",), "ablation": ("iou",)}.get(suite, METRICS)


def paper_table(suite: str, root: Path, paper_dataset: str | None = None) -> str | None:
    """Which of the paper's tables our rows are compared with (keys of :data:`PAPER`), or None."""
    if suite == "ablation":
        return "ablation"
    if suite == "mvtec":
        return "mvtec"
    if suite == "oneclass":
        if paper_dataset is not None:
            if paper_dataset not in ("mnist", "fashion-mnist", "cifar10"):
                raise ConfigError(f"paper dataset must be mnist, fashion-mnist or cifar10, got {paper_dataset!r}")
            return paper_dataset
        name = root.resolve().name.lower()
        if "fashion" in name:
            return "fashion-mnist"
        if "cifar" in name:
            return "cifar10"
        if "mnist" in name:
            return "mnist"
    return None


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return float(np.mean(vals)), std


def summarize(
    suite: str, table: str | None, specs: Sequence[ModelSpec], categories: Sequence[str], records: Sequence[dict]
) -> dict:
    """``summary[metric][model][row]`` = mean, sd (sample, over seeds), n, the values, and the paper's number.

    Row "mean": per seed, the mean over the categories that have that seed; then mean and sd over seeds."""
    summary: dict[str, dict[str, dict[str, dict]]] = {}
    for metric in METRICS:
        per_model: dict[str, dict[str, dict]] = {}
        for spec in specs:
            rows: dict[str, dict] = {}
            by_seed: dict[int, list[float]] = {}
            for category in categories:
                hits = [r for r in records if r["model"] == spec.name and r["category"] == category]
                values = [r["metrics"].get(metric) for r in hits]
                mean, std = _mean_std(values)
                rows[category] = {"mean": mean, "std": std, "n": len(hits), "values": values,
                                  "paper": paper_value(table, metric, spec.name, category)}  # fmt: skip
                for r in hits:
                    if r["metrics"].get(metric) is not None:
                        by_seed.setdefault(r["seed"], []).append(r["metrics"][metric])
            seed_means = [float(np.mean(v)) for _, v in sorted(by_seed.items())]
            mean, std = _mean_std(seed_means)
            rows["mean"] = {"mean": mean, "std": std, "n": len(seed_means), "values": seed_means,
                            "paper": paper_value(table, metric, spec.name, "mean")}  # fmt: skip
            per_model[spec.name] = rows
        summary[metric] = per_model
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(entry: dict) -> str:
    text = _fmt(entry["mean"])
    if entry.get("std") is not None:
        text += f" ± {entry['std']:.3f}"
    if entry.get("paper") is not None:
        paper = entry["paper"]
        text += f" ({paper:.2f})" if round(paper, 2) == paper else f" ({paper:.3f})"
    return text


def metric_table(metric: str, specs: Sequence[ModelSpec], categories: Sequence[str], summary: dict) -> str:
    """Rows = categories and "mean", columns = models; cells "ours ± sd (paper)"."""
    header = "| category | " + " | ".join(s.title or s.name for s in specs) + " |"
    if any(s.title for s in specs):
        header = "| category | " + " | ".join(f"{s.name}: {s.title}" if s.title else s.name for s in specs) + " |"
    lines = [header, "|---" * (len(specs) + 1) + "|"]
    for row in [*categories, "mean"]:
        cells = [_cell(summary[metric][s.name][row]) for s in specs]
        lines.append(f"| {'**mean**' if row == 'mean' else row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(
    meta: dict, specs: Sequence[ModelSpec], categories: Sequence[str], records: Sequence[dict], summary: dict
) -> str:
    suite, table = meta["suite"], meta.get("paper_table")
    b = meta["budget"]
    seeds = meta["seeds"]
    lines = [
        f"# cavga benchmark: {suite}",
        "",
        f"- command: `{meta.get('command') or 'n/a'}`",
        f"- data: `{meta['data']}`; categories: {', '.join(categories)}",
        f"- budget: {b['epochs']} epochs, batch {b['batch_size']}, image size D {b['image_size_d']} / "
        f"R {b['image_size_r']} / AE {b['image_size_ae']}, width {b['width'] or 'default'}, "
        f"max train {b['max_train'] or 'all'}, max test {b['max_test'] or 'all'}, "
        f"weak labels {b['anomalous_fraction']:.0%} of the anomalous test images"
        + (" (quick)" if meta.get("quick") else ""),
        f"- seeds: {', '.join(map(str, seeds))}" + (" (cells: mean ± sample sd over seeds)" if len(seeds) > 1 else ""),
        f"- git commit: {meta.get('git_commit') or 'n/a'}; cavga {meta['cavga_version']}; torch {meta['torch']}, "
        f"{meta['threads']} threads; this run {meta.get('total_seconds', 0):.0f} s, the models' own wall time "
        f"{sum(r['wall_seconds'] for r in records):.0f} s (cached ones included; devices in the Runs table)",
        "- paper: "
        + (
            f"numbers in parentheses are the paper's ({PAPER_SOURCES[table]}), where it has that row"
            if table
            else "no row of the paper matches this data"
        ),
        "",
    ]
    for metric in _suite_metrics(suite):
        lines += [f"## {METRIC_TITLES[metric]}", "", metric_table(metric, specs, categories, summary), ""]
    if suite == "ablation":
        lines += ["Columns: " + "; ".join(f"{s.name} = {s.title}" for s in specs), ""]
    lines += [
        "## Runs",
        "",
        "| model | category | seed | device | train s | eval s | wall s | cached |",
        "|---" * 8 + "|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['category']} | {r['seed']} | {r.get('device', 'n/a')} | {r['train_seconds']:.1f} "
            f"| {r['eval_seconds']:.1f} | {r['wall_seconds']:.1f} | {'yes' if r['cached'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout this package runs from, or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# ---------------------------------------------------------------------------------------------- quick data


def write_quick_data(suite: str, root: str | os.PathLike) -> Path:
    """Tiny generated data for ``--quick``: one demo MVTec category, a Magnetic-Tile-like pair layout made
    from it (``pairs``), or three-class IDX files (``oneclass``). Rewritten on every call."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if suite == "oneclass":
        write_tiny_idx(root)
        return root
    mvtec = root / "mvtec" if suite == "pairs" else root
    write_demo_dataset(mvtec, categories=["weave"], image_size=64, n_train=10, n_test_good=3, n_test_defect=5)
    if suite != "pairs":
        return root
    tiles = root / "tiles"
    write_pair_layout(mvtec / "weave", tiles)
    shutil.rmtree(mvtec)
    return tiles


def write_pair_layout(category: Path, out: Path) -> None:
    """Magnetic Tile's layout from an MVTec-layout category: ``MT_Free/Imgs/<n>.jpg`` (+ an empty ``.png``
    mask) for every good image, ``MT_<Defect>/Imgs/<n>.jpg`` + ``<n>.png`` for every defect image."""
    goods = sorted((category / "train" / "good").glob("*.png")) + sorted((category / "test" / "good").glob("*.png"))
    for i, path in enumerate(goods):
        _write_pair(Image.open(path), None, out / "MT_Free" / "Imgs", f"free_{i:03d}")
    for defect_dir in sorted(p for p in (category / "test").iterdir() if p.is_dir() and p.name != "good"):
        for path in sorted(defect_dir.glob("*.png")):
            mask = Image.open(category / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png")
            name = defect_dir.name.capitalize()
            _write_pair(Image.open(path), mask, out / f"MT_{name}" / "Imgs", f"{name.lower()}_{path.stem}")


def _write_pair(image: Image.Image, mask: Image.Image | None, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    gray = image.convert("L")
    gray.save(folder / f"{stem}.jpg", quality=95)
    (mask if mask is not None else Image.new("L", gray.size, 0)).convert("L").save(folder / f"{stem}.png")


def write_tiny_idx(root: str | os.PathLike, n_classes: int = 3, n_train: int = 12, n_test: int = 6) -> Path:
    """MNIST-style gzipped IDX files of 28 x 28 images: class k is a bright bar at a class-specific angle,
    with noise. ``n_train`` / ``n_test`` images per class."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(n_classes), n)
        out = np.empty((len(labels), 28, 28), np.uint8)
        for i, label in enumerate(labels):
            angle = np.pi * label / n_classes + rng.normal(0, 0.05)
            dist = np.abs(xx * np.sin(angle) - yy * np.cos(angle))
            img = 230 * (dist < 2.5) * (np.hypot(xx, yy) < 11) + rng.normal(0, 12, (28, 28))
            out[i] = np.clip(img, 0, 255).astype(np.uint8)
        return out, labels.astype(np.uint8)

    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs, labels = images(n)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", imgs)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
