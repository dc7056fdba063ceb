"""Which image score and which latent make CAVGA-D_u a one-class detector: every score of one trained model.

Development protocol, from the TRAINING split only (the test split is never read): for normal class k, a seeded
``--n-train`` of class k's training images train the model (its own 10 % calibration slice among them), and the
development set is ``--n-dev-normal`` other training images of class k (normal) against ``--n-dev-other`` training
images of every other class (anomalous). Every score of :data:`cavga.engine.scores.IMAGE_SCORES`, the paper's
``top_mean`` and the latent Gaussian's map maximum is computed from the one trained model and ranked by image
AuROC; ``combination`` adds the squared residual and the latent Mahalanobis distance, each standardized by its
mean and standard deviation on the normal calibration slice. ``fpr@cal`` is the share of the development normal
images above the threshold that calibration (on the normal calibration slice only) puts at 0.5: about 0.05 when
the calibration transfers to unseen normal images.

    python benchmarks/studies/oneclass_study.py --out runs/oneclass-study --datasets mnist --models paper flat100
    python benchmarks/studies/oneclass_study.py --out runs/oneclass-study --cifar-root /tmp/cifar10-jpg  # the JPEGs

Rule for the one-class CAVGA-L_u's decoder width, written before its figures (2026-12-07): half of a one-class
L_u's time is its decoder (docs/research/2026-12-07-oneclass-speed.md), which the default score does not read.
``L64-w8`` (width 8: a quarter of the decoder's multiply-adds) replaces ``L64`` (width 16, the default) if, in one
run of ``--datasets mnist cifar10 --models L64 L64-w8 --epochs 1``, its ``latent_mahalanobis`` development image
AuROC is on each dataset (a) at most 0.005 below L64's in the mean over the ten classes and (b) at most 0.02 below
in the worst class. Otherwise width 16 stays.

Data: ``../shared/data/mnist`` (IDX) and the CIFAR-10 JPEG re-encodings (``../shared/data/cifar10-jpg``, unpacked
outside the repository; ``--cifar-root`` names the folder with ``train/<class>/``). Each (dataset, model, class)
result is cached in OUT/runs/; a rerun skips what it holds. OUT/study.json and OUT/study.md hold the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cavga.api import Cavga
from cavga.data.dataset import AnomalyDataset, DatasetSplits, Record
from cavga.data.oneclass import read_class_folders, read_idx
from cavga.data.splits import split_calibration
from cavga.data.transforms import Preprocess
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.engine.calibration import fit_calibration
from cavga.engine.infer import PAPER_CHOICE, MapChoice, fit_latent_gaussian, infer_dataset
from cavga.engine.scores import IMAGE_SCORES
from cavga.metrics import image_auroc

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA_SEED = 0
# Model options on top of CAVGA-D_u at 32 px, at width 32 (the paper's DCGAN width is 64: three times the CPU
# time; "paper-w64" keeps it). "paper": the paper's CAVGA-D latent (conv z of 64 channels at stride 8: 4 x 4 x 64
# at 32 px) and loss weights; the others change one thing: the latent's channels or stride, the flattened 100-d
# latent (Table 8's `*`), or the loss weights (no adversarial term; no attention expansion).
BASE_OPTIONS = {"variant": "D", "image_size": 32}  # what a model of MODELS does not set
_W = {"width": 32}
MODELS: dict[str, dict] = {
    "paper": _W,
    "paper-w64": {},
    "cz16": {**_W, "latent_channels": 16},
    "stride16": {**_W, "latent_stride": 16},
    "flat100": {**_W, "flatten_latent": True},
    "flat32": {**_W, "flatten_latent": True, "flat_latent_dim": 32},
    "paper-no-adv": {**_W, "w_adv": 0.0},
    "flat100-no-adv": {**_W, "flatten_latent": True, "w_adv": 0.0},
    "paper-no-ae": {**_W, "w_ae": 0.0},
    # CAVGA-L_u (the default model of the other protocols: frozen ImageNet Lite0 trunk, conv z at stride 8) at 64 px,
    # the smallest side its trunk takes well (8 x 8 latent positions); and with the flattened 100-d latent.
    "L64": {"variant": "L", "image_size": 64},
    "L64-flat100": {"variant": "L", "image_size": 64, "flatten_latent": True},
    "L96": {"variant": "L", "image_size": 96},
    "L64-cz128": {"variant": "L", "image_size": 64, "latent_channels": 128},
    "L64-w8": {"variant": "L", "image_size": 64, "width": 8},  # the decoder at half L's default width
}
SCORES = ("top_mean", *IMAGE_SCORES, "latent_gaussian_max", "combination")
COMBINED = ("squared", "latent_mahalanobis")
PAPER_SCORE_NAME = "top_mean"


# ---------------------------------------------------------------------------------------------- data


def mnist_train(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, _, _ = read_idx(root)
    return images, labels, [str(i) for i in range(10)]


def cifar_train(root: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The JPEG training images decoded once into one uint8 array (cached in OUT, outside the repository)."""
    from PIL import Image

    if cache.is_file():
        data = np.load(cache)
        return data["images"], data["labels"], [str(c) for c in data["classes"]]
    files, classes, _, _ = read_class_folders(root)
    names = sorted(set(classes))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([names.index(c) for c in classes], dtype=np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=images, labels=labels, classes=np.array(names))
    return images, labels, names


def dev_splits(images: np.ndarray, labels: np.ndarray, k: int, args: argparse.Namespace, size: int) -> DatasetSplits:
    """Train / development split of the training images for normal class k (seeded, no test image)."""
    rng = np.random.default_rng(DATA_SEED + 1000 * k)
    own = rng.permutation(np.flatnonzero(labels == k))
    train_idx = own[: args.n_train]
    normal_dev = own[args.n_train : args.n_train + args.n_dev_normal]
    others = [rng.choice(np.flatnonzero(labels == c), args.n_dev_other, replace=False) for c in np.unique(labels)]
    anomalous_dev = np.concatenate([o for c, o in zip(np.unique(labels), others, strict=True) if c != k])
    chosen = np.concatenate([train_idx, normal_dev, anomalous_dev])
    array = images[chosen]
    channels = 3 if images.ndim == 4 else 1
    pre = Preprocess(size, channels)

    def record(j: int, label: int) -> Record:
        i = int(chosen[j])
        return Record(image=j, label=label, defect_type=str(labels[i]), path=f"train#{i}")

    n_tr, n_nd = len(train_idx), len(normal_dev)
    train = [record(j, NORMAL) for j in range(n_tr)]
    dev = [record(j, NORMAL) for j in range(n_tr, n_tr + n_nd)]
    dev += [record(j, ANOMALOUS) for j in range(n_tr + n_nd, len(chosen))]
    memo: dict = {}
    info = {"format": "oneclass-dev", "normal_class": str(k)}
    return DatasetSplits(AnomalyDataset(train, pre, array, memo), AnomalyDataset(dev, pre, array, memo), info)


# ---------------------------------------------------------------------------------------------- one run


def choice_of(score: str) -> MapChoice:
    if score == PAPER_SCORE_NAME:
        return PAPER_CHOICE
    if score == "latent_gaussian_max":
        return MapChoice("latent_gaussian", "map_max")
    return MapChoice("residual", score)  # the cheap map: only the score is read here


def run_one(splits: DatasetSplits, options: dict, args: argparse.Namespace, channels: int) -> dict:
    torch.manual_seed(args.seed)
    options = {**BASE_OPTIONS, **options}
    model = Cavga(
        setting="u", channels=channels, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device="cpu",
        **options,
    )  # fmt: skip
    started = time.perf_counter()
    model.fit(splits, progress=False)
    train_seconds = time.perf_counter() - started
    fit_set, cal = split_calibration(splits.train, model.train_config.calibration_fraction, model.train_config.seed)
    gaussian = model.model_.latent_gaussian
    if gaussian is not None and not gaussian.fitted:  # the Gaussian scores' (fit() fits it for its own score only)
        fit_latent_gaussian(model.model_, fit_set)
    labels = np.asarray(splits.test.labels)
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for score in SCORES:
        if score == "combination":
            continue
        choice = choice_of(score)
        if score == "latent_gaussian_max" and model.model_.latent_gaussian is None:
            continue
        dev_scores = infer_dataset(model.model_, splits.test, choice=choice).raw_scores
        cal_scores = infer_dataset(model.model_, cal, choice=choice).raw_scores
        raw[score] = (dev_scores, cal_scores)
    combined_dev = np.zeros(len(labels))
    combined_cal = np.zeros(len(cal))
    for name in COMBINED:
        dev_scores, cal_scores = raw[name]
        mean, std = cal_scores.mean(), cal_scores.std() + 1e-12
        combined_dev += (dev_scores - mean) / std
        combined_cal += (cal_scores - mean) / std
    raw["combination"] = (combined_dev, combined_cal)
    results = {}
    for score, (dev_scores, cal_scores) in raw.items():
        calibration = fit_calibration(cal_scores, model.calibration_quantile, [])
        called = calibration.normalize(dev_scores) > 0.5
        results[score] = {
            "image_auroc": float(image_auroc(dev_scores, labels)),
            "fpr_at_cal": float(called[labels == NORMAL].mean()),
            "tpr_at_cal": float(called[labels == ANOMALOUS].mean()),
        }
    return {
        "scores": results,
        "train_seconds": round(train_seconds, 1),
        "n_fit": model.data_info_["n_train"],  # the training images less the calibration slice
        "n_calibration": model.data_info_["n_calibration"],
        "n_dev": len(labels),
        "final_losses": {k: round(float(v), 4) for k, v in (model.history_[-1] if model.history_ else {}).items()}
        if isinstance(model.history_, list)
        else None,
    }


# ---------------------------------------------------------------------------------------------- tables


DEFAULT_BUDGET = {"n_train": 800, "n_dev_normal": 200, "n_dev_other": 40, "epochs": 3, "batch_size": 32, "seed": 0}


def column(record: dict) -> str:
    """A table column: the model, and its budget where it is not the default one."""
    changed = {k: record[k] for k, v in DEFAULT_BUDGET.items() if record[k] != v}
    return record["model"] + "".join(f", {k} {v}" for k, v in changed.items())


def summarize(records: list[dict]) -> dict:
    """Mean and minimum image AuROC over the classes of every (dataset, column, score)."""
    table: dict = {}
    for r in records:
        for score, values in r["scores"].items():
            table.setdefault(r["dataset"], {}).setdefault(column(r), {}).setdefault(score, []).append(
                values["image_auroc"]
            )
    return {
        d: {
            m: {s: {"mean": float(np.mean(v)), "min": float(np.min(v)), "n_classes": len(v)} for s, v in ms.items()}
            for m, ms in models.items()
        }
        for d, models in table.items()
    }


def markdown(meta: dict, records: list[dict], summary: dict) -> str:
    lines = [
        "# One-class score study (development data: training split only)",
        "",
        f"- command: `{meta['command']}`",
        f"- budget of this invocation: {meta['budget']}; the columns name any other budget of a cached run",
        f"- torch threads {meta['threads']}; total {meta['total_seconds']:.0f} s (this invocation)",
        "- cell: mean image AuROC over the classes run / worst class; the paper's score is `top_mean`",
        "",
    ]
    for dataset, models in summary.items():
        names = list(models)
        scores = [s for s in SCORES if any(s in models[m] for m in names)]
        lines += [f"## {dataset}", "", "| score | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for s in scores:
            cells = []
            for m in names:
                v = models[m].get(s)
                cells.append("-" if v is None else f"{v['mean']:.3f} / {v['min']:.3f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        n = {m: next(iter(models[m].values()))["n_classes"] for m in names}
        lines += ["", "classes per model: " + ", ".join(f"{m} {c}" for m, c in n.items()), ""]
    lines += ["## Per class", "", "| dataset | model | class | train s | best score | its AuROC | top_mean |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in records:
        best = max(r["scores"], key=lambda s: r["scores"][s]["image_auroc"])
        lines.append(
            f"| {r['dataset']} | {column(r)} | {r['class']} | {r['train_seconds']:.0f} | {best} | "
            f"{r['scores'][best]['image_auroc']:.3f} | {r['scores']['top_mean']['image_auroc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"], choices=["mnist", "cifar10"])
    p.add_argument("--models", nargs="+", default=["paper", "flat100"], choices=list(MODELS))
    p.add_argument("--classes", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--mnist-root", type=Path, default=SHARED / "mnist")
    p.add_argument("--cifar-root", type=Path, default=Path("/tmp/cifar10-jpg"))
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-dev-normal", type=int, default=200)
    p.add_argument("--n-dev-other", type=int, default=40)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = {k: getattr(args, k) for k in ("n_train", "n_dev_normal", "n_dev_other", "epochs", "batch_size", "seed")}
    started = time.perf_counter()
    meta = {
        "command": " ".join(["python", "benchmarks/studies/oneclass_study.py", *(argv or sys.argv[1:])]),
        "budget": budget,
    }
    meta["threads"] = torch.get_num_threads()
    for dataset in args.datasets:
        if dataset == "mnist":
            images, labels, names = mnist_train(args.mnist_root)
        else:
            images, labels, names = cifar_train(args.cifar_root, args.out / "cifar10-train.npz")
        for model_name in args.models:
            for k in args.classes:
                config = {"dataset": dataset, "model": model_name, "options": MODELS[model_name], "class": k, **budget}
                key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
                path = args.out / "runs" / dataset / model_name / f"class{k}-{key}.json"
                if path.is_file():
                    record = json.loads(path.read_text())
                else:
                    size = {**BASE_OPTIONS, **MODELS[model_name]}["image_size"]
                    splits = dev_splits(images, labels, k, args, size)
                    channels = 3 if images.ndim == 4 else 1
                    record = {**config, "class_name": names[k], **run_one(splits, MODELS[model_name], args, channels)}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(record, indent=1))
                    best = max(record["scores"], key=lambda s: record["scores"][s]["image_auroc"])
                    shown = {s: round(v["image_auroc"], 3) for s, v in record["scores"].items()}
                    print(f"{dataset} {model_name} class {k}: {record['train_seconds']} s; best {best}; {shown}")
                    sys.stdout.flush()
                meta["total_seconds"] = time.perf_counter() - started
                write_tables(args.out, meta)
    return 0


def write_tables(out: Path, meta: dict) -> None:
    """study.json and study.md from every run cached in OUT (earlier invocations and other budgets too)."""
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))]
    records.sort(key=lambda r: (r["dataset"], column(r) != r["model"], list(MODELS).index(r["model"]), r["class"]))
    summary = summarize(records)
    study = {**meta, "summary": summary, "runs": records}
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "study.md").write_text(markdown(meta, records, summary))


if __name__ == "__main__":
    sys.exit(main())
