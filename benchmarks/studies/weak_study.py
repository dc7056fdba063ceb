"""What a handful of labelled defects buys: CAVGA_w against CAVGA_u on the same test images, by label count.

For each dataset, each training recipe and each label count, trains CAVGA-L_w with that many anomalous test
images as labels (a seeded draw, the paper's protocol: ``anomalous_count``; 2 % of bottle's 63 is 1 image), and
evaluates it on the test split without those images with every map / score pair a CAVGA_w model can give, each
calibrated on held-out normal training images only. The default CAVGA-L_u (trained once per dataset by
``benchmarks/studies/map_study.py`` and loaded from its OUT/models) is evaluated on exactly the same images.

Recipes (``--recipes``):

* ``default``: today's defaults (labelled images augmented to 10 % of an epoch, 10 % synthesized anomalies,
  L_cga on signed class maps, C refitted on the trained latent for 300 steps);
* ``paper``: the paper's training (each labelled image once, no synthesized anomalies, L_cga on the ReLU'd,
  max-normalized Grad-CAMs, C as the joint training left it); ``no-refit``: the default without the refit;
* ``no-synthetic``: the default without synthesized anomalies; ``synthetic-only-signal``: the default with
  the labelled images each once, unaugmented.

    python benchmarks/studies/map_study.py --out runs/map-study --models L-frozen --datasets demo/wood   # the u models
    python benchmarks/studies/weak_study.py --out runs/map-study --datasets demo/wood demo/pill --counts 1
    python benchmarks/studies/weak_study.py --out runs/map-study --datasets bottle --counts 1 2 5 10 20 \
        --recipes default
    python benchmarks/studies/weak_study.py --out runs/map-study --datasets magnetic_tile --counts 8 --recipes default \
        --maps "latent_knn, map max" "deviation_classifier, map max"      # only these w rows (a long dataset)

``knn_classifier`` (latent_knn weighted by (1 + the deviation classifier's probability) / 2) was to replace
latent_knn as CAVGA-L_w's default map by the rule written down before any figure of it was seen: on the six demo
cells (demo/* and demo-s1/*, 1 label, recipe default, seed 0) its mean pixel AuROC and AUPRO higher and its mean
image AuROC and balanced accuracy no more than 0.01 lower. Bottle and Magnetic Tile are reported after the decision.
Measured: its balanced accuracy was 0.015 lower, so it failed and stays an option (README, "Weak supervision").

Second rule (written 2026-12-03 before any figure of it): the failure came with a calibration that was not
latent_knn's. knn_classifier reads the memory, but its threshold was taken from the held-out slice alone (16
normal images on a demo category), where latent_knn's comes from every memory image scored without its own rows
beside that slice. Calibrated as latent_knn is (the left-out distances weighted by (1 + the classifier's
probability) / 2), the same rule is applied once more on the same six demo cells. Calibration moves no AuROC
or AUPRO, and those were seen (0.999 / 0.962 / 0.860 against latent_knn's 0.998 / 0.960 / 0.858), so what is
open is balanced accuracy: the mean over the six cells no more than 0.01 below latent_knn's. Bottle (2 labels)
and Magnetic Tile (8 labels) are reported after the decision, whatever it is.
Measured: mean balanced accuracy 0.944 against 0.971: failed again, by more.

Third rule (written 2026-12-03 before any figure of it): a diagnostic on the saved demo-s1/weave w model shows
why. The classifier's weight is lower on the normal images it was fitted on (the mean of each image's largest
weight: 0.613 on them, 0.643 on the held-out slice, 0.646 on the normal test images), so their left-out scores
understate a new normal image's and the threshold is too low. With the weights cross-fitted (the memory's normal
images in 5 folds, each fold weighted by a classifier fitted on the other examples), the same rule is applied a
third time on the same six cells: mean balanced accuracy no more than 0.01 below latent_knn's. A third try on the
same cells is weaker evidence than a first; whatever the outcome, bottle and Magnetic Tile are reported after it.
Measured: mean balanced accuracy 0.951 against 0.971: failed a third time. knn_classifier stays an option,
calibrated with the cross-fitted weights (the unbiased estimate, on every memory image).

Writes OUT/weak_study.json after every model (a rerun skips what it holds) and OUT/weak_study.md. A w model saved
in OUT/models-w by an earlier run is loaded and scored again rather than retrained (its labels are in its file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cavga.api import Cavga
from cavga.api import load as load_model
from cavga.data.splits import (
    exclude_paths,
    path_key,
    split_calibration,
    weak_labels,
    weak_training_set,
    with_group_twins,
)
from cavga.engine.classifier import cross_fitted_classifier_weights, fit_deviation_classifier
from cavga.engine.infer import WEAK_PAPER_CHOICE, MapChoice, fit_latent_gaussian
from cavga.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_study import (  # noqa: E402
    DATASETS,
    L_OPTIONS,
    data_args,
    evaluate_choice,
    fill_memory,
    table,
    trained_model,
)

RECIPES = {
    "default": {},
    "paper": {"anomalous_share": 0.0, "synthetic_share": 0.0, "cga_maps": "paper", "classifier_steps": 0},
    "no-refit": {"classifier_steps": 0},
    "no-synthetic": {"synthetic_share": 0.0},
    "synthetic-only-signal": {"anomalous_share": 0.0},
}
W_CHOICES = {
    "paper (class Grad-CAM, C's probability)": WEAK_PAPER_CHOICE,
    "latent_gaussian, C's probability": MapChoice("latent_gaussian", "probability"),
    "latent_gaussian, map max": MapChoice("latent_gaussian", "map_max"),
    "latent_knn, map max": MapChoice("latent_knn", "map_max"),
    "class_gaussian, map max": MapChoice("class_gaussian", "map_max"),
    "class_gaussian, C's probability": MapChoice("class_gaussian", "probability"),
    "deviation_classifier, map max": MapChoice("deviation_classifier", "map_max"),
    "knn_classifier, map max": MapChoice("knn_classifier", "map_max"),
}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "iou", "balanced_accuracy")


def _metrics(detector: Cavga, test, choice: MapChoice, calibration_set, train_set, memory_weights=None) -> dict:
    result, outputs = evaluate_choice(detector, test, choice, calibration_set, train_set, memory_weights)
    if choice.score == "probability":
        # The paper's decision: C's own 0.5, before calibration (does C call every image one class?).
        called = outputs.raw_scores > 0.5
        labels = outputs.labels.astype(bool)
        result["c_balanced_accuracy"] = float(0.5 * (called[labels].mean() + (~called[~labels]).mean()))
        result["c_called_anomalous"] = float(called.mean())
    return result


_U_MODELS: dict[tuple[str, Path], Cavga] = {}


def u_model(dataset: str, out: Path) -> Cavga:
    """The map study's CAVGA-L_u of ``dataset``, loaded (and its Gaussian refitted) once per process."""
    if (dataset, out) not in _U_MODELS:
        _U_MODELS[dataset, out] = trained_model(dataset, "L-frozen", out, device="cpu")[0]
    return _U_MODELS[dataset, out]


def weak_examples(detector: Cavga, splits, train_set):
    """The w model's own training set rebuilt (the same seeded labels, augmented copies and synthesized anomalies
    as its fit)."""
    config = detector.train_config
    anomalous, _ = weak_labels(
        splits, detector.anomalous_dir, detector.anomalous_fraction, detector.anomalous_count, config.seed
    )
    if sorted(path_key(p) for p in with_group_twins(splits.test, anomalous)) != sorted(detector.excluded_paths_):
        raise ConfigError("the labelled images drawn again are not the ones the model was trained with")
    return weak_training_set(train_set, anomalous, config.anomalous_share, config.synthetic_share, config.seed)


def knn_classifier_weights(detector: Cavga, splits, train_set):
    """knn_classifier's cross-fitted weights of the memory's normal images, from the w model's own training set
    rebuilt."""
    config = detector.train_config
    examples = weak_examples(detector, splits, train_set)
    return cross_fitted_classifier_weights(
        detector.model_, examples, len(train_set), config.classifier_steps, config.seed
    )


def fit_row_statistics(detector: Cavga, splits, train_set) -> None:
    """The latent Gaussian and the deviation classifier the w rows read, fitted as fit() fits them where it left
    them out (it fits them only where the model's own map reads them)."""
    model, config = detector.model_, detector.train_config
    if model.latent_gaussian is not None and not model.latent_gaussian.fitted:
        fit_latent_gaussian(model, train_set)
    head = model.deviation_classifier
    if head is not None and not head.fitted and config.classifier_steps > 0:
        examples = weak_examples(detector, splits, train_set)
        detector.data_info_["weak_labels"]["deviation_classifier"] = fit_deviation_classifier(
            model, examples, config.classifier_steps, config.seed
        )


def run_one(dataset: str, recipe: str, count: int, out: Path, seed: int, maps: list[str] | None = None) -> dict:
    root, kwargs = data_args(dataset, out)
    options = {**L_OPTIONS, "variant": "L", "image_size": DATASETS[dataset]["size"], **RECIPES[recipe]}
    started = time.perf_counter()
    saved = out / "models-w" / dataset.replace("/", "_") / f"{recipe}-{count}-seed{seed}"
    if (saved / "config.json").exists():  # a w model an earlier run trained: scored again, not retrained
        detector = load_model(saved, device="cpu")
    else:
        detector = Cavga(setting="w", anomalous_count=count, seed=seed, device="cpu", **options)
        detector.fit(root, progress=False, **kwargs)
    splits = detector._load(root, **kwargs)
    test = exclude_paths(splits.test, detector.excluded_paths_)
    train_set, calibration_set = split_calibration(
        splits.train, detector.train_config.calibration_fraction, detector.train_config.seed
    )
    memory_seconds = fill_memory(detector, train_set)  # the latent_knn rows' memory (fit() fills only its own map's)
    fit_row_statistics(detector, splits, train_set)
    detector.save(saved)
    rows = {}
    for label, choice in W_CHOICES.items():
        if maps is not None and label not in maps:
            continue
        weights = None
        if choice.anomaly_map == "knn_classifier":  # calibrated with cross-fitted weights, as fit() calibrates it
            weights = knn_classifier_weights(detector, splits, train_set)
        try:
            rows[label] = _metrics(detector, test, choice, calibration_set, train_set, weights)
        except ConfigError as exc:  # a map this recipe's model has not fitted (the paper's: no deviation classifier)
            rows[label] = {"error": str(exc)}
    # The u model on the same images, calibrated as its fit calibrates.
    u = u_model(dataset, out)
    u_train, u_cal = split_calibration(splits.train, u.train_config.calibration_fraction, u.train_config.seed)
    u_choice = MapChoice.of(u.model_config)
    rows[f"CAVGA-L_u default ({u_choice.anomaly_map}, {u_choice.score})"] = _metrics(u, test, u_choice, u_cal, u_train)
    history = detector.history_
    return {
        "dataset": dataset,
        "recipe": recipe,
        "count": count,
        "seed": seed,
        "labelled": sorted(detector.excluded_paths_),  # with their exposure twins where the data has them
        "weak_labels": detector.data_info_["weak_labels"],
        "n_train": detector.data_info_["n_train"],
        "n_test": len(test),
        "train_seconds": round(detector.train_seconds_, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "memory_seconds": memory_seconds,
        "last_epoch_losses": history[-1] if history else None,
        "maps": rows,
    }


def _c_own(row: dict) -> str:
    c = row.get("c_balanced_accuracy")
    return "" if c is None else f"{c:.3f} / {row['c_called_anomalous']:.2f}"


def markdown(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        lines.append(
            f"### {run['dataset']}, recipe {run['recipe']}, {run['count']} labelled image(s), seed {run['seed']} "
            f"({run['n_train']} training examples, {run['n_test']} test images; trained {run['train_seconds']} s)"
        )
        lines.append("")
        lines += table(run["maps"], METRICS, "model: map, score", ("C's own 0.5: bal. acc. / called anomalous", _c_own))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where map_study.py saved its models (OUT/models)")
    parser.add_argument("--datasets", nargs="+", default=["demo/wood", "demo/pill"], choices=sorted(DATASETS))
    parser.add_argument("--recipes", nargs="+", default=["default", "paper"], choices=sorted(RECIPES))
    parser.add_argument("--counts", nargs="+", type=int, default=[1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maps", nargs="+", choices=list(W_CHOICES), help="only these w rows (default: every one)")
    args = parser.parse_args(argv)
    path = args.out / "weak_study.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    for dataset in args.datasets:
        for recipe in args.recipes:
            for count in args.counts:
                key = (dataset, recipe, count, args.seed)
                if any((r["dataset"], r["recipe"], r["count"], r["seed"]) == key for r in runs):
                    continue
                run = run_one(dataset, recipe, count, args.out, args.seed, args.maps)
                runs.append(run)
                path.write_text(json.dumps(runs, indent=1))
                (args.out / "weak_study.md").write_text(markdown(runs))
                print(markdown([run]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
