"""The Python API that the command line is a thin shell over: ``Cavga(...).fit(data)``, ``.predict``,
``.evaluate``, ``.save``, and ``cavga.load``."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from cavga._version import __version__
from cavga.config import (
    LossWeights,
    ModelConfig,
    TrainConfig,
    default_epochs,
    from_dict,
    reads_training,
    split_options,
    to_dict,
)
from cavga.data import AnomalyDataset, DatasetSplits, Preprocess, load_dataset
from cavga.data.io import ImageInput, to_pil
from cavga.data.splits import (
    exclude_paths,
    path_key,
    split_calibration,
    validate_weak_options,
    warn_if_split_differs,
    weak_labels,
    weak_training_set,
    with_group_twins,
)
from cavga.data.types import ANOMALOUS
from cavga.engine import distributed
from cavga.engine.calibration import Calibration
from cavga.engine.checkpoint import atomic_write
from cavga.engine.classifier import refit_classifier
from cavga.engine.fitting import (
    calibrate_model,
    describe_data,
    fit_normal_statistics,
    note_untrained,
    paper_calibration,
)
from cavga.engine.infer import check_anomaly_map, evaluate_outputs, infer_batch, infer_dataset, paper_choice
from cavga.engine.runlog import RUN_FILE, read_run_file
from cavga.engine.train import resolve_device, seed_everything, train
from cavga.errors import ConfigError, DataError, ModelFileError
from cavga.model.networks import build_model
from cavga.model_files import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, read_model_dir
from cavga.prediction import Prediction, predictions_from

log = logging.getLogger(__name__)


class Cavga:
    """A CAVGA anomaly detector, scikit-learn style: construct with parameters, ``fit``, then ``predict``.

    ``variant`` "L" (the default: an ImageNet EfficientNet-Lite0 trunk, frozen; its map ``trunk_knn`` chosen by
    ``benchmarks/studies/default_map.py``), or the paper's "D" (DCGAN) and "R" (ResNet-18); ``setting`` "u"
    (normal images only) or "w" (plus a few labelled anomalous images). Fields left unset take the variant's
    defaults (:data:`cavga.config.VARIANT_DEFAULTS`); the paper-literal map is ``anomaly_map="attention",
    score="top_mean"``, which ``evaluate(..., paper_map=True)`` reports beside the model's own.
    Other keyword options are any field of :class:`ModelConfig`, :class:`TrainConfig` or :class:`LossWeights`.

    Setting "w" takes its anomalous images (labels only, never their masks) from one of: a seeded random
    ``anomalous_fraction`` of the test split's anomalous images (default 0.02, at least one image), exactly
    ``anomalous_count`` of them, or every image in ``anomalous_dir`` (a user's own labelled defect images).
    Test images used for training are removed from every evaluation of the model (``excluded_paths_``), with
    every test image of the same object where the dataset records one (Magnetic Tile: the tile under its other
    exposures, ``weak_labels["n_excluded_twins"]``).
    """

    def __init__(
        self,
        variant: str = "L",
        setting: str = "u",
        image_size: int | None = None,
        channels: int | None = None,
        calibration_quantile: float = 0.95,
        anomalous_fraction: float | None = None,
        anomalous_count: int | None = None,
        anomalous_dir: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        # The arguments as given: what a run directory records, so that a resumed run rebuilds this estimator.
        self.params = {"variant": variant, "setting": setting, "image_size": image_size, "channels": channels}
        self.params |= {"calibration_quantile": calibration_quantile, "anomalous_fraction": anomalous_fraction}
        self.params |= {"anomalous_count": anomalous_count, "anomalous_dir": anomalous_dir, **options}
        model_kw, train_kw, weight_kw = split_options(options)
        self.model_config = ModelConfig(
            variant=variant, setting=setting, image_size=image_size, channels=channels or 3, **model_kw
        )
        self.channels_given = channels is not None
        self.epochs_given = train_kw.get("epochs") is not None
        if not self.epochs_given:
            mc = self.model_config
            train_kw["epochs"] = default_epochs(mc.variant, mc.anomaly_map, mc.score)
        self.train_config = TrainConfig(weights=LossWeights(**weight_kw), **train_kw)
        self.calibration_quantile = calibration_quantile
        self.anomalous_fraction = anomalous_fraction
        self.anomalous_count = anomalous_count
        self.anomalous_dir = str(anomalous_dir) if anomalous_dir is not None else None
        self.model_config.validate()
        check_anomaly_map(self.model_config.anomaly_map)
        self.train_config.validate()
        if self.train_config.epochs == 0 and reads_training(self.model_config.anomaly_map, self.model_config.score):
            raise ConfigError(
                f"anomaly_map {self.model_config.anomaly_map!r} with score {self.model_config.score!r} reads the "
                "trained network: epochs must be >= 1, got 0"
            )
        validate_weak_options(setting, anomalous_fraction, anomalous_count, self.anomalous_dir)

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
        command: dict[str, Any] | None = None,
        paper_map: bool = False,
        **data_kwargs: Any,
    ) -> Cavga:
        """Train on the normal training images of ``data`` (a DatasetSplits or a dataset folder); setting "w"
        adds the labelled anomalous images described in the class docstring.

        ``run_dir`` keeps a training checkpoint (every ``checkpoint_steps`` steps, every ``checkpoint_every``
        epochs, at the end), ``run.json`` (this estimator's arguments, the data, the resolved configuration and
        ``command``, e.g. the command line's own arguments) and the log ``train.log``; ``resume=True`` continues
        exactly from the checkpoint (same parameters and data; :meth:`resume` rebuilds them from ``run.json``).
        ``tensorboard=True`` also writes loss scalars and image grids of inputs, reconstructions and anomaly maps
        to ``run_dir/tensorboard`` (``pip install 'cavga[tensorboard]'``). Under ``torchrun`` every process trains
        its shard; ``is_main_process_`` says whether this one should write the results.

        Only what the model's own map and score read is fitted after training (:mod:`cavga.engine.fitting`);
        ``paper_map=True`` also calibrates the paper-literal map and score on the same held-out images, kept with
        the model, so that :meth:`evaluate` reports them beside the model's own (the benchmark tables do).
        What it trains and calibrates on is logged (logger ``cavga.api``, INFO; a warning under 20 calibration
        images)."""
        if tensorboard and run_dir is None:
            raise ConfigError("tensorboard=True needs a run_dir to write to")
        splits = self._load(data, **data_kwargs)
        train_set, calibration_set = split_calibration(
            splits.train, self.train_config.calibration_fraction, self.train_config.seed
        )
        normal_train_set = train_set
        tc, mc = self.train_config, self.model_config
        if paper_map and tc.epochs == 0:
            if self.epochs_given:
                raise ConfigError("the paper's map reads the trained network: paper_map needs epochs >= 1, got 0")
            tc.epochs = default_epochs(mc.variant, mc.anomaly_map, mc.score, paper_map=True)
        self.excluded_paths_: list[str] = []
        weak_info: dict[str, Any] = {}
        if self.model_config.setting == "w":
            anomalous, weak_info = self._weak_labels(splits)
            # Paper protocol: weak labels never count in an evaluation. Kept by resolved path, so that another
            # spelling of the folder still matches; anomalous_dir images are listed too, in case the folder
            # given is part of a test split.
            # The same object under another exposure (Magnetic Tile's tiles) is excluded with it.
            self.excluded_paths_ = [path_key(p) for p in with_group_twins(splits.test, anomalous)]
            weak_info["n_excluded_twins"] = len(self.excluded_paths_) - len(anomalous)
            weak_info["label_paths"] = [path_key(p) for p in anomalous.paths]  # the report shows them
            train_set = weak_training_set(train_set, anomalous, tc.anomalous_share, tc.synthetic_share, tc.seed)
            # What one epoch holds beside the normal images: the labelled ones (with augmented copies) and
            # the synthesized anomalies.
            extra = [len(part) for part in train_set.datasets[1:]]
            weak_info |= {"n_labelled_examples": extra[0], "n_synthetic": extra[1] if len(extra) > 1 else 0}
        run_info = None
        if run_dir is not None:
            # In-memory splits cannot be recorded: such a run resumes through fit(..., resume=True) only.
            fit_args = {
                "data": None if isinstance(data, DatasetSplits) else _resolved(data),
                "data_kwargs": data_kwargs,
            }
            fit_args |= {"checkpoint_steps": checkpoint_steps, "tensorboard": tensorboard, "paper_map": paper_map}
            run_info = {"estimator": self.params, "fit": fit_args, "command": command}
        # Under torchrun every rank runs this; the process group is joined once here and left after calibration.
        ctx = distributed.setup(self.train_config.device)
        try:
            if ctx.is_main:
                describe_data(splits, len(normal_train_set), len(calibration_set), tc.calibration_fraction)
                if tc.epochs == 0:
                    note_untrained(mc.anomaly_map, mc.score)
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
                run_info=_jsonable(run_info) if run_info is not None else None,
                ctx=ctx,
            )
            if self.model_config.setting == "w" and tc.classifier_steps > 0 and tc.epochs > 0:
                weak_info["classifier_refit"] = refit_classifier(self.model_, train_set, tc.classifier_steps, tc.seed)
            self.train_seconds_ = time.perf_counter() - start
            show = progress and ctx.is_main
            fitted, training_vectors = fit_normal_statistics(self.model_, normal_train_set, train_set, tc, show)
            weak_info |= fitted
            self.calibration_ = calibrate_model(
                self.model_,
                calibration_set,
                normal_train_set,
                train_set,
                self.calibration_quantile,
                tc,
                show,
                has_classifier="deviation_classifier" in weak_info,
                training_vectors=training_vectors,
            )
            del training_vectors  # the normal images' features: hundreds of MB on a large category
            # The paper-literal map and score of the same model, where asked for (evaluate reports it beside).
            self.paper_calibration_ = None
            if paper_map:
                self.paper_calibration_ = paper_calibration(
                    self.model_, calibration_set, self.calibration_quantile, show
                )
        finally:
            distributed.cleanup()
        self.is_main_process_ = ctx.is_main
        self.preprocess_ = splits.train.preprocess
        self.data_info_ = {**splits.info, "n_train": len(train_set), "n_calibration": len(calibration_set)}
        if weak_info:
            self.data_info_["weak_labels"] = weak_info
        return self

    @classmethod
    def resume(
        cls, run_dir: str | os.PathLike, epochs: int | None = None, device: str | None = None, progress: bool = True
    ) -> Cavga:
        """Continue the interrupted (or finished) run in ``run_dir`` exactly from its checkpoint, with the
        estimator, data and options its ``run.json`` records; ``epochs`` may extend it, ``device`` move it."""
        info = read_run_file(run_dir)
        if "estimator" not in info or "fit" not in info:
            raise ConfigError(f"{run_dir}: its {RUN_FILE} was written by an older cavga and cannot be resumed")
        if info["fit"]["data"] is None:
            raise ConfigError(f"{run_dir}: this run trained on in-memory data; resume it with fit(data, resume=True)")
        params = dict(info["estimator"])
        params |= {k: v for k, v in (("epochs", epochs), ("device", device)) if v is not None}
        fit_args = info["fit"]
        detector = cls(**params)
        return detector.fit(
            fit_args["data"],
            progress=progress,
            run_dir=run_dir,
            resume=True,
            checkpoint_steps=fit_args["checkpoint_steps"],
            tensorboard=fit_args["tensorboard"],
            command=info.get("command"),
            paper_map=fit_args.get("paper_map", False),
            **fit_args["data_kwargs"],
        )

    def _weak_labels(self, splits: DatasetSplits) -> tuple[AnomalyDataset, dict[str, Any]]:
        """The labelled anomalous training images of setting "w" and a record of where they came from."""
        return weak_labels(
            splits, self.anomalous_dir, self.anomalous_fraction, self.anomalous_count, self.train_config.seed
        )

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
        return self.preprocess_(to_pil(image)).numpy()

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> list[Prediction]:
        """Score and localize one image or a list of them (paths, numpy arrays HxW / HxWxC, PIL images)."""
        self._check_fitted()
        items = [images] if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)) else list(images)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pils = [to_pil(item) for item in chunk]
            batch = torch.stack([self.preprocess_(p) for p in pils]).to(self.device)
            # A Prediction holds no reconstruction: the decoder runs only where the map or the score needs it.
            outputs = infer_batch(self.model_, batch, self.calibration_, reconstruct=False)
            paths = [str(item) if isinstance(item, (str, os.PathLike)) else None for item in chunk]
            results.extend(predictions_from(outputs, [p.size for p in pils], paths))
        return results

    def evaluate(
        self,
        data: DatasetSplits | str | os.PathLike,
        residual_maps: bool = False,
        paper_map: bool | None = None,
        **data_kwargs: Any,
    ) -> dict:
        """Metrics on the test split of ``data``: image_auroc, pixel_auroc, iou, iou_pooled, aupro,
        balanced_accuracy, n_images (pixel metrics None where no masks exist); per_group where the images name
        the object they show (Magnetic Tile's tiles: :func:`cavga.metrics.per_group`).

        The decoder runs only where the map or the score needs x_hat; ``residual_maps=True`` runs it anyway and
        keeps the blurred residual |x - x_hat| of every test image in ``last_outputs_`` (for the residual map
        reported beside).

        ``paper_map=True`` also reports the paper-literal map and score of the same model (key ``paper_map``; a
        second pass over the test images), calibrated as ``fit(..., paper_map=True)`` calibrates them, or on the
        same held-out normal images of ``data`` now where the model was fitted without; None (default): where the
        model holds their calibration. No key where the model's own map and score are the paper's."""
        self._check_fitted()
        splits = (
            data if isinstance(data, DatasetSplits) else load_dataset(data, preprocess=self.preprocess_, **data_kwargs)
        )
        warn_if_split_differs(self.data_info_, splits.info)
        if len(splits.test) == 0:
            raise DataError("this dataset has no test split to evaluate on (a folder of normal images trains whole)")
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
        outputs = infer_dataset(self.model_, test, calibration=self.calibration_, reconstruct=residual_maps)
        self.last_outputs_ = outputs
        groups = getattr(test, "groups", None)  # per object too where a dataset shows one in several images
        result = evaluate_outputs(outputs, self.calibration_, groups=groups)
        paper = self._paper_calibration(splits, paper_map)
        if paper is not None:
            choice = paper_choice(self.model_config.setting)
            paper_outputs = infer_dataset(self.model_, test, calibration=paper, choice=choice, reconstruct=False)
            result["paper_map"] = evaluate_outputs(paper_outputs, paper, groups=groups)
        if excluded:
            result["n_excluded"] = n_removed
        if self.model_config.setting == "w":
            # Which images the model was given as known defects (a model saved before they were recorded: the
            # excluded images, twins included); the report shows them apart from the evaluated ones.
            labels = self.data_info_.get("weak_labels", {}).get("label_paths", excluded)
            result["labelled_images"] = list(labels)
        return result

    def _paper_calibration(self, splits: DatasetSplits, paper_map: bool | None) -> Calibration | None:
        """The paper-literal map's calibration that :meth:`evaluate` reports with, if any (see there)."""
        held = getattr(self, "paper_calibration_", None)
        if paper_map is False:
            return None
        if held is not None or paper_map is None:
            return held
        # Asked for, and fitted without: the same seeded held-out slice of the normal training images as fit().
        _, calibration_set = split_calibration(
            splits.train, self.train_config.calibration_fraction, self.train_config.seed
        )
        return paper_calibration(self.model_, calibration_set, self.calibration_quantile)

    # ---------------------------------------------------------------- saving
    def config_dict(self) -> dict:
        self._check_fitted()
        paper = getattr(self, "paper_calibration_", None)
        return {
            "cavga_version": __version__,
            "format_version": FORMAT_VERSION,
            "model": to_dict(self.model_config),
            "train": to_dict(self.train_config),
            "preprocess": self.preprocess_.to_dict(),
            "calibration": self.calibration_.to_dict(),
            "paper_calibration": None if paper is None else paper.to_dict(),
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

    @classmethod
    def from_config_dict(
        cls, config: dict, state: dict[str, torch.Tensor], device: str = "auto", source: Any = "weights"
    ) -> Cavga:
        """The fitted estimator that :meth:`config_dict` and the weights ``state`` describe (the inverse of
        :meth:`save`). A section key this version does not know is refused by name (:func:`from_dict`)."""
        # A model saved before the trunk was a choice has Lite0's, whatever today's default trunk is.
        model_config = from_dict(ModelConfig, {"trunk": "lite0", **config["model"]})
        train_config = from_dict(TrainConfig, config["train"])
        options = {**to_dict(model_config), **to_dict(train_config), **to_dict(train_config.weights)}
        del options["weights"]
        weak = config.get("weak_supervision", {})
        detector = cls(
            calibration_quantile=config.get("calibration_quantile", 0.95),
            anomalous_fraction=weak.get("anomalous_fraction"),
            anomalous_count=weak.get("anomalous_count"),
            anomalous_dir=weak.get("anomalous_dir"),
            **options,
        )
        # The weights come from the file: no pretrained encoder is read again (the trunk stays frozen/pretrained
        # as trained, so its BatchNorm behaves as it did).
        model = build_model(model_config, read_weights=False)
        fresh = model.state_dict()
        # Files written before the latent Gaussian existed lack its buffers: it stays unfitted there.
        # So do CAVGA_w files written before the deviation classifier: it stays unfitted (n_examples 0).
        # And files written before the latent memory: it stays empty (n_vectors 0).
        # And files written before the memory's unit: 1.
        # And files written before the trunk memory: it stays empty.
        later = ("latent_gaussian.", "deviation_classifier.", "latent_memory.", "latent_memory_coarse.")
        later += ("trunk_memory.",)
        state = {**{k: v for k, v in fresh.items() if k.startswith(later)}, **state}
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # a missing, extra or misshapen tensor
            raise ModelFileError(f"{source}: not safetensors weights that match config.json ({exc})") from exc
        detector.model_ = model.to(resolve_device(device)).eval()
        detector.preprocess_ = Preprocess.from_dict(config["preprocess"])
        detector.calibration_ = Calibration.from_dict(config["calibration"])
        paper = config.get("paper_calibration")
        detector.paper_calibration_ = None if paper is None else Calibration.from_dict(paper)
        detector.data_info_ = config.get("data", {})
        detector.excluded_paths_ = config.get("excluded_paths", [])
        detector.history_ = config.get("history", [])
        detector.train_seconds_ = config.get("train_seconds")
        return detector


def load(path: str | os.PathLike, device: str = "auto") -> Cavga:
    """Load a saved model directory (no pickle anywhere: safetensors weights and a JSON config)."""
    config, state, weights_path = read_model_dir(path)
    return Cavga.from_config_dict(config, state, device=device, source=weights_path)


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


def _resolved(data: str | os.PathLike) -> str:
    return str(Path(data).resolve())
