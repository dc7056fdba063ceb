"""What :meth:`cavga.Cavga.fit` does after training, and what it says about the images it was given.

The product path fits only what the model's own map and score read: the latent Gaussian where a map or a score
reads it (:func:`needs_latent_gaussian`), the latent or trunk memory where the map reads one, CAVGA_w's
deviation classifier where the map is drawn from it, and the calibration of that map and score. The paper-literal
map and its calibration (:func:`paper_calibration`) come only when asked for: the benchmark tables ask, to keep
the paper's column beside the model's own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from cavga.config import TrainConfig
from cavga.data import DatasetSplits
from cavga.data.types import ANOMALOUS
from cavga.engine.calibration import Calibration
from cavga.engine.classifier import cross_fitted_classifier_weights, fit_deviation_classifier
from cavga.engine.infer import (
    MapChoice,
    NormalVectors,
    calibrate,
    fit_latent_gaussian,
    fit_latent_memory,
    fit_trunk_memory,
    paper_choice,
)
from cavga.engine.maps import map_spec
from cavga.engine.progress import progress_bar
from cavga.model.networks import CavgaNet

log = logging.getLogger("cavga.api")  # the user's notes of a fit: the command line shows this logger's INFO

# The maps that read the latent Gaussian (cavga.engine.maps: directly, or through the deviation classifier's
# inputs, which are the deviation of mu from it) and the scores that do (cavga.engine.scores).
LATENT_GAUSSIAN_MAPS = ("latent_gaussian", "fusion", "class_gaussian", "deviation_classifier", "knn_classifier")
LATENT_GAUSSIAN_SCORES = ("latent_mahalanobis",)
# The maps drawn from CAVGA_w's deviation classifier (fitted after training on the labelled examples).
DEVIATION_CLASSIFIER_MAPS = ("deviation_classifier", "knn_classifier")
# Fewer normal scores than this make the image threshold (their 95 % quantile) rest on one or two images.
MIN_CALIBRATION_IMAGES = 20


def needs_latent_gaussian(choice: MapChoice) -> bool:
    """Whether ``choice``'s map or score reads the latent Gaussian of normal mu vectors."""
    return choice.anomaly_map in LATENT_GAUSSIAN_MAPS or choice.score in LATENT_GAUSSIAN_SCORES


def fit_normal_statistics(
    model: CavgaNet, normal_train_set: Dataset, train_set: Dataset, config: TrainConfig, progress: bool = True
) -> tuple[dict, NormalVectors | None]:
    """Fit, after training, what the model's own map and score read, from the normal training images
    ``normal_train_set`` (``train_set``: every training example, CAVGA_w's labelled ones too). Returns what the
    deviation classifier's fit reports, where it was fitted (empty otherwise), and the trunk features the trunk
    memory was filled from, for :func:`calibrate_model` to read again (None where it holds none)."""
    choice = MapChoice.of(model.config)
    spec = map_spec(choice.anomaly_map)
    fits_classifier = (
        choice.anomaly_map in DEVIATION_CLASSIFIER_MAPS
        and model.deviation_classifier is not None
        and config.classifier_steps > 0
    )
    if needs_latent_gaussian(choice):
        fit_latent_gaussian(model, normal_train_set)
    if spec.needs_memory:
        with progress_bar("memory", progress, total=len(normal_train_set)):
            fit_latent_memory(model, normal_train_set, config.seed)
    vectors = None
    if spec.needs_trunk_memory:
        with progress_bar("memory", progress, total=len(normal_train_set)):
            vectors = fit_trunk_memory(model, normal_train_set, config.seed)
    if not fits_classifier:
        return {}, vectors
    info = {"deviation_classifier": fit_deviation_classifier(model, train_set, config.classifier_steps, config.seed)}
    return info, vectors


def calibrate_model(
    model: CavgaNet,
    calibration_set: Dataset,
    normal_train_set: Dataset,
    train_set: Dataset,
    quantile: float,
    config: TrainConfig,
    progress: bool = True,
    has_classifier: bool = False,
    training_vectors: NormalVectors | None = None,
) -> Calibration:
    """The calibration of the model's own map and score (:func:`cavga.engine.infer.calibrate`), with a progress
    bar, and a note of how many normal images' scores it rests on (a warning under MIN_CALIBRATION_IMAGES).
    ``training_vectors``: what :func:`fit_normal_statistics` returned."""
    weights = None  # knn_classifier's calibration: its classifier's weights of the memory's images
    if model.config.anomaly_map == "knn_classifier" and has_classifier:
        weights = cross_fitted_classifier_weights(
            model, train_set, len(normal_train_set), config.classifier_steps, config.seed
        )
    with progress_bar("calibration", progress):
        calibration = calibrate(
            model,
            calibration_set,
            quantile,
            training_normals=normal_train_set,
            memory_weights=weights,
            training_vectors=training_vectors,
        )
    note_calibration(calibration, len(calibration_set), config.calibration_fraction)
    return calibration


def paper_calibration(
    model: CavgaNet, calibration_set: Dataset, quantile: float, progress: bool = False
) -> Calibration | None:
    """The calibration of the paper-literal map and score of the model's setting on the held-out normal
    ``calibration_set``; None where they are the model's own (its calibration is theirs)."""
    paper = paper_choice(model.config.setting)
    if MapChoice.of(model.config) == paper:
        return None
    with progress_bar("calibration (paper's map)", progress):
        return calibrate(model, calibration_set, quantile, choice=paper)


def note_untrained(anomaly_map: str, score: str) -> None:
    """Say that the fit trains nothing, and why: neither the map nor the score reads a trained weight."""
    log.info(
        "no training: the %s map scored by %s reads no trained weight (epochs 0); fitting its memory and "
        "calibration only. Give epochs >= 1 (--epochs) to train the CAVGA network, which the paper's map reads",
        anomaly_map,
        score,
    )


def note_calibration(calibration: Calibration, n_held_out: int, fraction: float) -> None:
    """Log how many normal images' scores set the threshold; warn where they are fewer than
    MIN_CALIBRATION_IMAGES, saying how to get more."""
    n = calibration.n_images
    others = n - n_held_out
    if others > 0:
        log.info(
            "calibration: %d normal images' scores, %d held out and %d training images each scored as if new",
            n,
            n_held_out,
            others,
        )
    if n < MIN_CALIBRATION_IMAGES:
        log.warning(
            "the anomaly threshold rests on only %d normal images' scores (fewer than %d): it may call too many or "
            "too few images anomalous. Give more normal training images, or hold out a larger share of them "
            "(calibration_fraction, now %g; --calibration-fraction on the command line)",
            n,
            MIN_CALIBRATION_IMAGES,
            fraction,
        )


def describe_data(splits: DatasetSplits, n_train: int, n_calibration: int, fraction: float) -> None:
    """Log what a fit trains and calibrates on and what the test split holds, e.g. "bottle: 188 normal training
    images, 21 held out for calibration (calibration_fraction 0.1); test split: 83 images (63 anomalous)"."""
    info = splits.info
    name = info.get("category") or info.get("normal_class") or Path(str(info.get("root") or "data")).name
    n_test = len(splits.test)
    if n_test:
        n_anomalous = sum(1 for label in splits.test.labels if label == ANOMALOUS)
        test = f"test split: {n_test} images ({n_anomalous} anomalous)"
    else:
        test = "no test split (nothing to evaluate on: give anomalous test images, e.g. an abnormal folder)"
    log.info(
        "%s: %d normal training images, %d held out for calibration (calibration_fraction %g); %s",
        name,
        n_train,
        n_calibration,
        fraction,
        test,
    )
