"""The Python API that the command line is a thin shell over: ``Cavga(...).fit(data)``, ``.predict``,
``.evaluate``, ``.save``, and ``cavga.load``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset

from cavga._version import __version__
from cavga.config import LossWeights, ModelConfig, TrainConfig, from_dict, to_dict
from cavga.data import AnomalyDataset, DatasetSplits, Preprocess, Record, load_dataset, load_image
from cavga.data.types import ANOMALOUS, NORMAL
from cavga.engine.checkpoint import atomic_write
from cavga.engine.infer import THRESHOLD, Calibration, calibrate, evaluate_outputs, infer_batch, infer_dataset
from cavga.engine.train import resolve_device, seed_everything, train
from cavga.errors import ConfigError, DataError, ModelFileError
from cavga.model.networks import build_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_IMAGE_SIZE = {"D": 64, "R": 128}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DEFAULT_ANOMALOUS_FRACTION = 0.02  # the paper's CAVGA_w protocol: 2 % of the anomalous test images

ImageInput = str | os.PathLike | np.ndarray | Image.Image


@dataclass
class Prediction:
    """What cavga says about one image. ``anomaly_map`` and ``mask`` are at the model's input size."""

    score: float  # normalized anomaly score in [0, 1]
    label: int  # 1 anomalous (score > 0.5), 0 normal
    anomaly_map: np.ndarray  # (H, W) float32 in [0, 1]
    mask: np.ndarray  # (H, W) bool, anomaly_map > 0.5
    raw_score: float
    path: str | None = None
    original_size: tuple[int, int] | None = None  # (width, height) of the input image


def _split_options(options: dict[str, Any]) -> tuple[dict, dict, dict]:
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"weights"}
    weight_fields = {f.name for f in dataclasses.fields(LossWeights)}
    model_kw, train_kw, weight_kw = {}, {}, {}
    for key, value in options.items():
        if key in model_fields:
            model_kw[key] = value
        elif key in train_fields:
            train_kw[key] = value
        elif key in weight_fields:
            weight_kw[key] = value
        else:
            raise ConfigError(f"unknown option {key!r}")
    return model_kw, train_kw, weight_kw


class Cavga:
    """A CAVGA anomaly detector, scikit-learn style: construct with parameters, ``fit``, then ``predict``.

    ``variant`` "D" or "R", ``setting`` "u" (normal images only) or "w" (plus a few labelled anomalous images).
    Other keyword options are any field of :class:`ModelConfig`, :class:`TrainConfig` or :class:`LossWeights`.

    Setting "w" takes its anomalous images (labels only, never their masks) from one of: a seeded random
    ``anomalous_fraction`` of the test split's anomalous images (default 0.02, at least one image), exactly
    ``anomalous_count`` of them, or every image in ``anomalous_dir`` (a user's own labelled defect images).
    Test images used for training are removed from every evaluation of the model (``excluded_paths_``).
    """

    def __init__(
        self,
        variant: str = "D",
        setting: str = "u",
        image_size: int | None = None,
        channels: int | None = None,
        calibration_quantile: float = 0.95,
        anomalous_fraction: float | None = None,
        anomalous_count: int | None = None,
        anomalous_dir: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        model_kw, train_kw, weight_kw = _split_options(options)
        self.model_config = ModelConfig(
            variant=variant,
            image_size=image_size or DEFAULT_IMAGE_SIZE.get(variant, 64),
            channels=channels or 3,
            weakly_supervised=setting == "w",
            **model_kw,
        )
        self.channels_given = channels is not None
        self.train_config = TrainConfig(setting=setting, weights=LossWeights(**weight_kw), **train_kw)
        self.calibration_quantile = calibration_quantile
        self.anomalous_fraction = anomalous_fraction
        self.anomalous_count = anomalous_count
        self.anomalous_dir = str(anomalous_dir) if anomalous_dir is not None else None
        self.model_config.validate()
        self.train_config.validate()
        _validate_weak_options(setting, anomalous_fraction, anomalous_count, self.anomalous_dir)

    # ---------------------------------------------------------------- fitting
    def _preprocess(self) -> Preprocess:
        return Preprocess(self.model_config.image_size, self.model_config.channels)

    def _load(self, data: DatasetSplits | str | os.PathLike, **data_kwargs: Any) -> DatasetSplits:
        if isinstance(data, DatasetSplits):
            return data
        if self.channels_given:
            return load_dataset(data, preprocess=self._preprocess(), **data_kwargs)
        # Channels left open: the reader settles them from the image headers (one read, no probe pass).
        splits = load_dataset(data, preprocess=Preprocess(self.model_config.image_size, None), **data_kwargs)
        if len(splits.train) == 0:
            raise DataError(f"{data}: no training images found")
        self.model_config.channels = 1 if splits.train.preprocess.channels == 1 else 3
        self.channels_given = True
        return splits

    def fit(
        self,
        data: DatasetSplits | str | os.PathLike,
        progress: bool = True,
        run_dir: str | os.PathLike | None = None,
        resume: bool = False,
        checkpoint_steps: int = 0,
        tensorboard: bool = False,
        **data_kwargs: Any,
    ) -> Cavga:
        """Train on the normal training images of ``data`` (a DatasetSplits or a dataset folder); setting "w"
        adds the labelled anomalous images described in the class docstring.

        ``run_dir`` keeps a training checkpoint (every ``checkpoint_steps`` steps, every ``checkpoint_every``
        epochs, at the end), ``config.json`` and the log ``train.log``; ``resume=True`` continues exactly from
        the checkpoint (same parameters and data). ``tensorboard=True`` also writes loss scalars and image grids
        of inputs, reconstructions and anomaly maps to ``run_dir/tensorboard`` (``pip install
        'cavga[tensorboard]'``)."""
        if tensorboard and run_dir is None:
            raise ConfigError("tensorboard=True needs a run_dir to write to")
        splits = self._load(data, **data_kwargs)
        train_set, calibration_set = split_calibration(
            splits.train, self.train_config.calibration_fraction, self.train_config.seed
        )
        self.excluded_paths_: list[str] = []
        weak_info: dict[str, Any] = {}
        if self.train_config.setting == "w":
            anomalous, weak_info = self._weak_labels(splits)
            # Paper protocol: weak labels never count in an evaluation. Kept by resolved path, so that another
            # spelling of the folder still matches; anomalous_dir images are listed too, in case the folder
            # given is part of a test split.
            self.excluded_paths_ = [_path_key(p) for p in anomalous.paths]
            train_set = weak_training_set(train_set, anomalous)
        # Seeded here, not only in train(): the initial weights must follow the seed too (a fresh process's
        # default torch seed is random), or two runs with one seed differ and a resumed run has no twin.
        seed_everything(self.train_config.seed)
        self.model_ = build_model(self.model_config)
        start = time.perf_counter()
        self.history_ = train(
            self.model_,
            train_set,
            self.train_config,
            progress=progress,
            run_dir=run_dir,
            resume=resume,
            checkpoint_steps=checkpoint_steps,
            tensorboard=tensorboard,
        )
        self.train_seconds_ = time.perf_counter() - start
        self.calibration_ = calibrate(
            self.model_, calibration_set, self.train_config.setting, self.calibration_quantile
        )
        self.preprocess_ = splits.train.preprocess
        self.data_info_ = {**splits.info, "n_train": len(train_set), "n_calibration": len(calibration_set)}
        if weak_info:
            self.data_info_["weak_labels"] = weak_info
        return self

    def _weak_labels(self, splits: DatasetSplits) -> tuple[AnomalyDataset, dict[str, Any]]:
        """The labelled anomalous training images of setting "w" and a record of where they came from."""
        if self.anomalous_dir is not None:
            files = list_images([self.anomalous_dir])
            folder = Path(self.anomalous_dir)
            records = [Record(image=f, label=ANOMALOUS, defect_type=folder.name, path=str(f)) for f in files]
            anomalous = AnomalyDataset(records, splits.train.preprocess)
            return anomalous, {"source": "dir", "dir": str(folder), "n_anomalous": len(anomalous)}
        fraction = self.anomalous_fraction
        if fraction is None and self.anomalous_count is None:
            fraction = DEFAULT_ANOMALOUS_FRACTION
        indices = sample_weak_labels(splits.test, fraction, self.anomalous_count, self.train_config.seed)
        info = {
            "source": "test",
            "fraction": fraction,
            "count": self.anomalous_count,
            "seed": self.train_config.seed,
            "n_anomalous": len(indices),
            "n_test_anomalous": sum(1 for label in splits.test.labels if label == ANOMALOUS),
        }
        return splits.test.subset(indices), info

    # ---------------------------------------------------------------- using
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError("this Cavga model is not fitted yet: call fit() or cavga.load()")

    @property
    def device(self) -> torch.device:
        self._check_fitted()
        return next(self.model_.parameters()).device

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """The exact (C, H, W) float32 array the network takes for ``image`` (path, array or PIL image)."""
        self._check_fitted()
        return self.preprocess_(_to_pil(image)).numpy()

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> list[Prediction]:
        """Score and localize one image or a list of them (paths, numpy arrays HxW / HxWxC, PIL images)."""
        self._check_fitted()
        items = [images] if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)) else list(images)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pils = [_to_pil(item) for item in chunk]
            batch = torch.stack([self.preprocess_(p) for p in pils]).to(self.device)
            outputs = infer_batch(self.model_, batch, self.train_config.setting, self.calibration_)
            scores = self.calibration_.normalize(outputs.raw_scores)
            for i, item in enumerate(chunk):
                amap = outputs.anomaly_maps[i].astype(np.float32)
                results.append(
                    Prediction(
                        score=float(scores[i]),
                        label=int(scores[i] > THRESHOLD),
                        anomaly_map=amap,
                        mask=amap > THRESHOLD,
                        raw_score=float(outputs.raw_scores[i]),
                        path=str(item) if isinstance(item, (str, os.PathLike)) else None,
                        original_size=pils[i].size,
                    )
                )
        return results

    def evaluate(self, data: DatasetSplits | str | os.PathLike, **data_kwargs: Any) -> dict:
        """Metrics on the test split of ``data``: image_auroc, pixel_auroc, iou, iou_pooled, aupro,
        balanced_accuracy, n_images (pixel metrics None where no masks exist)."""
        self._check_fitted()
        splits = (
            data if isinstance(data, DatasetSplits) else load_dataset(data, preprocess=self.preprocess_, **data_kwargs)
        )
        excluded = getattr(self, "excluded_paths_", [])
        test = exclude_paths(splits.test, excluded)
        n_removed = len(splits.test) - len(test)
        from_test = self.data_info_.get("weak_labels", {}).get("source") == "test"
        if from_test and n_removed == 0 and ANOMALOUS in splits.test.labels:
            log.warning(
                "none of the %d anomalous images this model was trained on is in this test split; if it is "
                "the training data under another path, those images now count in the metrics",
                len(excluded),
            )
        outputs = infer_dataset(self.model_, test, self.train_config.setting, calibration=self.calibration_)
        self.last_outputs_ = outputs
        result = evaluate_outputs(outputs, self.calibration_)
        if excluded:
            result["n_excluded"] = n_removed
        return result

    # ---------------------------------------------------------------- saving
    def config_dict(self) -> dict:
        self._check_fitted()
        return {
            "cavga_version": __version__,
            "format_version": FORMAT_VERSION,
            "model": to_dict(self.model_config),
            "train": to_dict(self.train_config),
            "preprocess": self.preprocess_.to_dict(),
            "calibration": self.calibration_.to_dict(),
            "calibration_quantile": self.calibration_quantile,
            "weak_supervision": {
                "anomalous_fraction": self.anomalous_fraction,
                "anomalous_count": self.anomalous_count,
                "anomalous_dir": self.anomalous_dir,
            },
            "data": _jsonable(self.data_info_),
            "excluded_paths": list(getattr(self, "excluded_paths_", [])),
            "train_seconds": getattr(self, "train_seconds_", None),
            "history": getattr(self, "history_", []),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/model.safetensors`` and ``path/config.json`` atomically (a crash leaves the old model)."""
        self._check_fitted()

        def write(tmp: str) -> None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
            save_file(state, str(Path(tmp) / WEIGHTS_FILE))
            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")

        return atomic_write(path, write, directory=True)


def load(path: str | os.PathLike, device: str = "auto") -> Cavga:
    """Load a saved model directory (no pickle anywhere: safetensors weights and a JSON config)."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise ModelFileError(f"{path}: not a cavga model directory ({required.name} is missing)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{config_path}: unreadable config ({exc})") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{config_path}: format_version {config.get('format_version')!r}, this cavga reads {FORMAT_VERSION}"
        )
    model_config = from_dict(ModelConfig, config["model"])
    train_config = from_dict(TrainConfig, config["train"])
    detector = Cavga.__new__(Cavga)
    detector.model_config = model_config
    detector.train_config = train_config
    detector.channels_given = True
    detector.calibration_quantile = config.get("calibration_quantile", 0.95)
    weak = config.get("weak_supervision", {})
    detector.anomalous_fraction = weak.get("anomalous_fraction")
    detector.anomalous_count = weak.get("anomalous_count")
    detector.anomalous_dir = weak.get("anomalous_dir")
    model = build_model(dataclasses.replace(model_config, encoder_weights=None))
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors has its own error type for a file that is not safetensors (a pickle)
        raise ModelFileError(f"{weights_path}: not safetensors weights that match config.json ({exc})") from exc
    detector.model_ = model.to(resolve_device(device)).eval()
    detector.preprocess_ = Preprocess.from_dict(config["preprocess"])
    detector.calibration_ = Calibration.from_dict(config["calibration"])
    detector.data_info_ = config.get("data", {})
    detector.excluded_paths_ = config.get("excluded_paths", [])
    detector.history_ = config.get("history", [])
    detector.train_seconds_ = config.get("train_seconds")
    return detector


def split_calibration(dataset: AnomalyDataset, fraction: float, seed: int) -> tuple[AnomalyDataset, AnomalyDataset]:
    """Hold out a seeded slice of the NORMAL training images for calibration (never test images)."""
    normal = [i for i, label in enumerate(dataset.labels) if label == NORMAL]
    others = [i for i, label in enumerate(dataset.labels) if label != NORMAL]
    if len(normal) < 2:
        raise DataError(f"need at least 2 normal training images (one to train, one to calibrate), got {len(normal)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    n_cal = min(max(1, round(fraction * len(normal))), len(normal) - 1)
    cal = sorted(normal[i] for i in order[:n_cal])
    fit = sorted([normal[i] for i in order[n_cal:]] + others)
    return dataset.subset(fit), dataset.subset(cal)


def sample_weak_labels(
    test: AnomalyDataset,
    fraction: float | None = DEFAULT_ANOMALOUS_FRACTION,
    count: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices into ``test`` of a seeded random sample of its ANOMALOUS images (CAVGA_w's weak labels).

    ``count`` images when given, else ``round(fraction * n_anomalous)`` and at least one. Drawn without
    replacement by ``numpy.random.default_rng(seed)`` from the anomalous images in dataset order; ascending.
    """
    anomalous = [i for i, label in enumerate(test.labels) if label == ANOMALOUS]
    if not anomalous:
        raise DataError("setting 'w' needs labelled anomalous images: the test split has none (use anomalous_dir)")
    if count is None:
        if fraction is None or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"anomalous_fraction must lie in (0, 1], got {fraction}")
        count = max(1, round(fraction * len(anomalous)))
    if not 1 <= count <= len(anomalous):
        raise ConfigError(f"anomalous_count must lie in [1, {len(anomalous)}] (the test split's anomalous images)")
    chosen = np.random.default_rng(seed).choice(len(anomalous), size=count, replace=False)
    return sorted(anomalous[int(i)] for i in chosen)


class LabelledConcat(ConcatDataset):
    """Datasets one after the other, with the ``labels`` and ``paths`` that training reads."""

    @property
    def labels(self) -> list[int]:
        return [label for part in self.datasets for label in part.labels]

    @property
    def paths(self) -> list[str]:
        return [path for part in self.datasets for path in part.paths]


def weak_training_set(normal: AnomalyDataset, anomalous: AnomalyDataset) -> LabelledConcat:
    """CAVGA_w's training set: the normal training images, then the anomalous ones as labels only.

    The anomalous records lose their masks (weak supervision never sees pixel ground truth) and are read with
    the normal images' preprocessing.
    """
    labels_only = [dataclasses.replace(r, label=ANOMALOUS, mask=None, zero_mask=False) for r in anomalous.records]
    return LabelledConcat([normal, AnomalyDataset(labels_only, normal.preprocess, anomalous.array)])


def _path_key(path: str) -> str:
    return os.path.realpath(path)


def exclude_paths(dataset: AnomalyDataset, paths: Sequence[str]) -> AnomalyDataset:
    """``dataset`` without the images at ``paths`` (compared as resolved paths)."""
    if not paths:
        return dataset
    excluded = {_path_key(p) for p in paths}
    return dataset.subset([i for i, p in enumerate(dataset.paths) if _path_key(p) not in excluded])


def _validate_weak_options(setting: str, fraction: float | None, count: int | None, directory: str | None) -> None:
    given = [
        name
        for name, v in (("anomalous_fraction", fraction), ("anomalous_count", count), ("anomalous_dir", directory))
        if v is not None
    ]
    if given and setting != "w":
        raise ConfigError(f"{given[0]} applies to setting 'w' only (got setting={setting!r})")
    if len(given) > 1:
        raise ConfigError(f"give at most one of anomalous_fraction, anomalous_count, anomalous_dir; got {given}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"anomalous_fraction must lie in (0, 1], got {fraction}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"anomalous_count must be an integer >= 1, got {count!r}")


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image files; name what is missing."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def _to_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
                raise DataError(f"a float image array must lie in [0, 1], got range [{array.min()}, {array.max()}]")
            array = np.round(np.nan_to_num(array) * 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise DataError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
        return Image.fromarray(array).convert("RGB") if array.ndim == 3 else Image.fromarray(array)
    return load_image(image)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value
