"""Running a benchmark suite: per-suite data loading, one job (train and evaluate one model on one category),
and the suite with its cache.

Each (suite, model, category, seed, config) result is cached as ``OUT/cache/.../<hash>.json``, the hash taken
of everything that decides the result; a restarted suite skips what is cached. ``results.json`` holds every
number and ``results.md`` the tables, with the paper's number beside ours where the paper has that row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cavga._version import __version__
from cavga.api import Cavga
from cavga.baselines import AutoencoderBaseline, PadimBaseline
from cavga.benchmark.paper import paper_table
from cavga.benchmark.specs import SUITES, Budget, ModelSpec, default_budget, suite_models
from cavga.benchmark.tables import fmt, markdown_report, suite_metrics, summarize, with_paper_score_columns
from cavga.data import (
    ANOMALOUS,
    AnomalyDataset,
    DatasetSplits,
    Preprocess,
    list_mvtec_categories,
    load_dataset,
)
from cavga.data.folders import magnetic_tile_classes
from cavga.data.oneclass import detect_oneclass_source, read_cifar10, read_class_folders, read_idx
from cavga.data.splits import exclude_paths, sample_weak_labels, with_group_twins
from cavga.data.synthetic import write_quick_data
from cavga.engine.checkpoint import atomic_write
from cavga.engine.train import resolve_device
from cavga.errors import ConfigError, DataError

CACHE_VERSION = 1  # bump when a change to this package changes what a cached result means
DATA_SEED = 0  # the seed of data caps and of the pair layout's train/test split, the same for every model


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


def _pairs_format(root: Path) -> str:
    """The image + mask pairs suite reads Magnetic Tile where its MT_* folders are, otherwise plain folders."""
    return "magnetic_tile" if root.is_dir() and magnetic_tile_classes(root) else "folders"


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
    return load_dataset(root, format=_pairs_format(root), preprocess=pre, seed=DATA_SEED)


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
    if spec.kind == "padim":
        model: Any = PadimBaseline(image_size=size, channels=channels, seed=seed, device=budget.device)
    elif spec.kind == "ae":
        model = AutoencoderBaseline(
            image_size=size, channels=channels, epochs=budget.epochs, batch_size=budget.batch_size, seed=seed,
            device=budget.device, **({"width": budget.width} if budget.width else {}), **dict(spec.options),
        )  # fmt: skip
    else:
        options = dict(spec.options)
        if budget.width:
            options["width"] = budget.width
        if spec.setting == "w":
            options["anomalous_fraction"] = budget.anomalous_fraction
        options = {"epochs": budget.epochs, **options}  # a model's own budget (the default CAVGA-L's) wins
        model = Cavga(
            spec.variant, spec.setting, image_size=size, channels=channels, batch_size=budget.batch_size,
            seed=seed, device=budget.device, **options,
        )  # fmt: skip
    # CAVGA's rows keep the paper-literal map of the same model beside its own (a column of the tables).
    paper = {"paper_map": True} if isinstance(model, Cavga) else {}
    model.fit(splits, progress=progress, **paper)
    evaluated = splits
    if hold_out_weak and spec.setting != "w":
        # Every row counts the same test images: leave out the seeded sample a w model with this seed trains on
        # (a w model leaves it out itself).
        sample = sample_weak_labels(splits.test, budget.anomalous_fraction, None, seed)
        held = with_group_twins(splits.test, splits.test.subset(sample))  # with their other exposures
        evaluated = DatasetSplits(splits.train, exclude_paths(splits.test, held), splits.info)
    eval_start = time.perf_counter()
    metrics = model.evaluate(evaluated, **paper)
    # The paper-literal map of the same model (CAVGA-L), kept beside its own metrics.
    paper_metrics = metrics.pop("paper_map", None)
    per_group = metrics.pop("per_group", None)  # Magnetic Tile: the same metrics per tile
    metrics.pop("labelled_images", None)  # setting w: which images were labels (for the report), not a metric
    if paper_metrics is not None:
        paper_metrics.pop("per_group", None)
    return {
        "metrics": _floats(metrics),
        **({"paper_map": _floats(paper_metrics)} if paper_metrics is not None else {}),
        **({"per_group": _floats(per_group)} if per_group is not None else {}),
        "train_seconds": round(model.train_seconds_, 2),
        "eval_seconds": round(time.perf_counter() - eval_start, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "n_train": model.data_info_["n_train"],
        "n_calibration": model.data_info_["n_calibration"],
        "device": device_name(budget.device),
    }


def _floats(metrics: dict) -> dict:
    return {k: (None if v is None else float(v)) for k, v in metrics.items()}


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


# ---------------------------------------------------------------------------------------------- the jobs


@dataclass(frozen=True)
class Cell:
    """One job of a suite: a model, a category and a seed under a budget (picklable: it crosses to a worker)."""

    suite: str
    root: Path
    category: str
    spec: ModelSpec
    seed: int
    budget: Budget

    @property
    def config(self) -> dict:
        return job_config(self.suite, self.spec, self.category, self.seed, self.root, self.budget)

    def path(self, out: Path) -> Path:
        """The cache file of this job's result."""
        name = f"seed{self.seed}-{config_hash(self.config)}.json"
        return out / "cache" / self.suite / _slug(self.spec.name) / _slug(self.category) / name


def run_cell(
    cell: Cell,
    out: Path,
    any_weak: bool,
    progress: bool,
    loaded: dict[tuple[str, int | None], DatasetSplits] | None = None,
) -> dict:
    """Train and evaluate one job, write its cache file (atomically) and return its record. ``loaded`` keeps the
    category's splits (as stored, key size None, and per image size) for the next job of the same category."""
    loaded = {} if loaded is None else loaded
    size = cell.budget.image_size(cell.spec)
    if (cell.category, None) not in loaded:  # as stored, resized per model below
        loaded[(cell.category, None)] = load_category(cell.suite, cell.root, cell.category)
    if (cell.category, size) not in loaded:
        loaded[(cell.category, size)] = sized(loaded[(cell.category, None)], size, cell.budget)
    splits = loaded[(cell.category, size)]
    hold_out = any_weak and ANOMALOUS in splits.test.labels
    config = cell.config
    result = run_job(cell.spec, splits, cell.seed, cell.budget, hold_out, progress)
    record = {
        "suite": cell.suite,
        "model": cell.spec.name,
        "category": cell.category,
        "seed": cell.seed,
        "key": config_hash(config),
        "config": config,
        **result,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cavga_version": __version__,
    }
    _write_json(cell.path(out), record)
    return record


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_threads(jobs: int) -> int:
    """torch threads of each of ``jobs`` workers: an equal share of the cores."""
    return max(1, available_cores() // jobs)


def resolve_jobs(jobs: int | None, pending: int, device: str) -> int:
    """How many jobs run at once: ``jobs`` if given (>= 1), else one per core on the CPU and one on a GPU (models
    sharing one GPU gain little and may not fit); never more than ``pending``."""
    if jobs is not None and jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if jobs is None:
        jobs = 1 if resolve_device(device).type != "cpu" else available_cores()
    return max(1, min(jobs, pending))


def _worker_start(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_run(cell: Cell, out: Path, any_weak: bool) -> dict:
    return run_cell(cell, out, any_weak, progress=False)


def run_in_workers(
    cells: Sequence[Cell], pending: Sequence[int], jobs: int, out: Path, any_weak: bool, finished: Callable
) -> None:
    """Run the ``pending`` cells in ``jobs`` spawned worker processes, calling ``finished(i, record)`` as each ends.
    A job that fails costs no other: the rest run to the end (each writes its cache file), then the first error is
    raised, naming its job."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pools
    failures: list[tuple[Cell, BaseException]] = []
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_start, initargs=(job_threads(jobs),)
    ) as pool:
        running: dict[Future, int] = {pool.submit(_worker_run, cells[i], out, any_weak): i for i in pending}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                error = future.exception()
                if error is None:
                    finished(i, future.result())
                else:
                    failures.append((cells[i], error))
    if failures:
        cell, error = failures[0]
        names = "; ".join(f"{c.spec.name} {c.category} seed {c.seed}" for c, _ in failures)
        raise RuntimeError(
            f"{len(failures)} benchmark job(s) failed ({names}); the others are cached. First: {cell.spec.name} "
            f"{cell.category} seed {cell.seed}: {error}"
        ) from error


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
    jobs: int | None = 1,
) -> SuiteRun:
    """Run (or resume) ``suite`` and write ``OUT/results.json`` and ``OUT/results.md``.

    ``quick``: the tiny :data:`QUICK_BUDGET` and, when ``data`` is None, tiny generated data under
    ``OUT/quick-data``. ``paper_dataset`` ("mnist", "fashion-mnist", "cifar10") picks Table 7's column for
    the oneclass suite; None guesses it from the data folder's name. ``jobs``: how many models train at once,
    each in a spawned worker process of its own with an equal share of the cores (None: one per core on the CPU,
    one on a GPU; :func:`resolve_jobs`); 1 (the default) runs them in this process, in order. A script that runs
    more than one at a time must call this under ``if __name__ == "__main__":`` (a spawned worker imports it)."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or default_budget(suite, quick)
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
    cells = [Cell(suite, root, category, spec, seed, budget) for category in cats for spec in specs for seed in seeds]
    any_weak = suite != "oneclass" and any(s.setting == "w" for s in specs)
    slots: list[dict | None] = [None] * len(cells)
    pending = []
    for i, cell in enumerate(cells):
        path = cell.path(out)
        if path.is_file():
            slots[i] = json.loads(path.read_text()) | {"cached": True}
            log(f"[{i + 1}/{len(cells)}] {cell.spec.name} {cell.category} seed {cell.seed}: cached")
        else:
            pending.append(i)
    jobs = resolve_jobs(jobs, len(pending), budget.device)
    meta["jobs"] = jobs
    meta["threads"] = torch.get_num_threads() if jobs == 1 else job_threads(jobs)

    def finished(i: int, record: dict) -> None:
        slots[i] = record | {"cached": False}
        shown = ", ".join(f"{k} {fmt(record['metrics'].get(k))}" for k in suite_metrics(suite))
        cell = cells[i]
        wall = record["wall_seconds"]
        log(f"[{i + 1}/{len(cells)}] {cell.spec.name} {cell.category} seed {cell.seed}: {shown} ({wall:.0f} s)")
        meta["total_seconds"] = round(time.perf_counter() - started, 1)
        write_results(out, meta, specs, cats, [r for r in slots if r is not None])

    if jobs == 1:
        loaded: dict[tuple[str, int | None], DatasetSplits] = {}  # one category at a time, each size decoded once
        for i in pending:
            cell = cells[i]
            if not any(key[0] == cell.category for key in loaded):
                loaded.clear()
            finished(i, run_cell(cell, out, any_weak, progress, loaded))
    else:
        log(f"running {len(pending)} jobs, {jobs} at a time ({job_threads(jobs)} thread(s) each)")
        run_in_workers(cells, pending, jobs, out, any_weak, finished)
    run.records = [r for r in slots if r is not None]
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    run.results_json, run.results_md = write_results(out, meta, specs, cats, run.records)
    return run


def write_results(
    out: Path, meta: dict, specs: Sequence[ModelSpec], categories: Sequence[str], records: Sequence[dict]
) -> tuple[Path, Path]:
    """Write ``results.json`` (meta, every record, the summary) and ``results.md`` (the tables)."""
    # Each model's paper-literal map and score (the same trained model; the default CAVGA-L's, the one-class
    # defaults') as a column beside it.
    columns, column_records = with_paper_score_columns(specs, records)
    summary = summarize(meta["suite"], meta.get("paper_table"), columns, categories, column_records)
    results_json, results_md = out / "results.json", out / "results.md"
    _write_json(results_json, {**meta, "results": list(records), "summary": summary})
    results_md.write_text(markdown_report(meta, columns, categories, records, summary))
    return results_json, results_md


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
