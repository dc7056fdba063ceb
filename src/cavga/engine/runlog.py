"""What a training run leaves in its run directory for a person to watch: ``run.json`` (the one description of the
run: how it was asked for and the model and training settings it resolved to), ``train.log`` (the ``cavga``
loggers' INFO lines: epochs, checkpoints, stops) and, on request, TensorBoard scalars of every loss term and
image grids of inputs, reconstructions and anomaly maps."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cavga._version import __version__
from cavga.config import TrainConfig, to_dict
from cavga.data.types import collate_samples
from cavga.engine.calibration import CalibrationConstants
from cavga.engine.checkpoint import atomic_write
from cavga.engine.infer import MapChoice, infer_tensors, paper_choice
from cavga.engine.maps import map_spec
from cavga.errors import ConfigError
from cavga.model.networks import CavgaNet

RUN_FILE = "run.json"
LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
PACKAGE_LOGGER = "cavga"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A record logged with extra={FILE_ONLY: True} goes to train.log but not to the console (the CLI prints the
# same message itself, e.g. the error that stopped training).
FILE_ONLY = "cavga_file_only"
N_VISUAL_IMAGES = 8


def write_run_file(
    run_dir: str | os.PathLike, model: CavgaNet, config: TrainConfig, run_info: dict | None = None, **facts: Any
) -> Path:
    """``run_dir/run.json``: ``run_info`` (how the run was asked for: the estimator's arguments, the data and the
    fit options that :meth:`cavga.Cavga.resume` replays, and the command line's own arguments), then the model and
    training settings this run uses with every default filled in (the ``model`` / ``train`` sections of a saved
    model's config.json) and ``facts`` (images, processes, device)."""
    data = {"cavga_version": __version__, **(run_info or {}), "model": to_dict(model.config), "train": to_dict(config)}
    text = json.dumps({**data, **facts}, indent=2, default=str) + "\n"
    return atomic_write(Path(run_dir) / RUN_FILE, lambda tmp: Path(tmp).write_text(text))


def read_run_file(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a cavga run directory ({RUN_FILE} is missing)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from exc


class _Forward(logging.Handler):
    """Hands records at or above ``level`` (and not FILE_ONLY) to the handlers above the package logger."""

    def __init__(self, target: logging.Logger, level: int) -> None:
        super().__init__(level)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, FILE_ONLY, False):
            self.target.handle(record)


@contextmanager
def log_to_file(path: str | os.PathLike) -> Iterator[logging.Handler]:
    """Append the ``cavga`` loggers' INFO-and-above records to ``path`` while the block runs.

    The file gets INFO even when the console shows only warnings. Lowering the package logger's level alone
    would send INFO to the console handlers too, so while the block runs the package stops propagating and a
    forwarding handler passes on exactly what passed before (the old level, the old console)."""
    package = logging.getLogger(PACKAGE_LOGGER)
    old_level, old_propagate = package.level, package.propagate
    console_level = package.getEffectiveLevel()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    forward = _Forward(package.parent, console_level) if old_propagate and package.parent is not None else None
    package.addHandler(handler)
    if forward is not None:
        package.addHandler(forward)
        package.propagate = False
    package.setLevel(min(console_level, logging.INFO))
    try:
        yield handler
    finally:
        package.removeHandler(handler)
        if forward is not None:
            package.removeHandler(forward)
        package.setLevel(old_level)
        package.propagate = old_propagate
        handler.close()


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when the tensorboard package is missing
        raise ConfigError(
            f"TensorBoard logging needs the tensorboard package: pip install 'cavga[tensorboard]' ({exc})"
        ) from exc
    return SummaryWriter


def require_tensorboard() -> None:
    """Raise ConfigError now (before any training) when TensorBoard logging cannot work."""
    _summary_writer_class()


def visual_indices(n: int, k: int = N_VISUAL_IMAGES) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (first and last included): the images shown every epoch.

    Spread rather than the first k so that a weakly supervised set (anomalous images last) shows some too."""
    if n <= k:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


class TensorBoardLog:
    """Loss scalars and image grids for TensorBoard in ``directory`` (rank 0 only)."""

    def __init__(self, directory: str | os.PathLike, dataset: Dataset, purge_step: int | None = None) -> None:
        writer_class = _summary_writer_class()
        # purge_step: a resumed run rewrites the steps after its checkpoint; TensorBoard drops the old ones.
        self.writer = writer_class(log_dir=str(directory), purge_step=purge_step)
        self.images = collate_samples([dataset[i] for i in visual_indices(len(dataset))]).images

    def step(self, terms: dict[str, float], step: int) -> None:
        for name, value in terms.items():
            self.writer.add_scalar(f"step/{name}", value, step)

    def epoch(self, means: dict[str, float], epoch: int, model: CavgaNet) -> None:
        from torchvision.utils import make_grid

        for name, value in means.items():
            if name != "epoch":
                self.writer.add_scalar(f"epoch/{name}", value, epoch)
        images, x_hat, anomaly = visual_batch(model, self.images)
        n = images.shape[0]
        self.writer.add_image("images/input", make_grid(images, nrow=n, padding=2), epoch)
        self.writer.add_image("images/reconstruction", make_grid(x_hat, nrow=n, padding=2), epoch)
        self.writer.add_image("images/anomaly_map", make_grid(anomaly, nrow=n, padding=2), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def visual_batch(model: CavgaNet, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inputs, reconstructions and anomaly maps (what the uncalibrated model would predict), on the CPU.

    While training, the normal-image statistics of a deviation map (the latent Gaussian) do not exist yet, and
    its calibration neither: such a model's images show the paper's attention map 1 - A instead (u only).

    Eval mode and the mean latent: this must not move BatchNorm's running statistics or draw from the RNG, or
    watching a run would change it."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():  # the core turns gradients on itself where Grad-CAM needs autograd
            choice = MapChoice.of(model.config)
            if map_spec(choice.anomaly_map).calibrated:
                choice = paper_choice(model.config.setting)
            result = infer_tensors(model, images.to(device), CalibrationConstants().to(device), choice)
    finally:
        model.train(was_training)
    return images, result.x_hat.cpu(), result.anomaly_map[:, None].cpu()
