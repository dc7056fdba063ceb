"""Baselines beside CAVGA in every benchmark: the paper's autoencoders AE-L2 and AE-SSIM (Bergmann et al., VISAPP
2019; paper Tables 3 and 6), and a PaDiM-style model on pretrained features (Defard et al., 2020), the reference
a user would otherwise pick.

AE-L2 / AE-SSIM:
A plain convolutional autoencoder with a 100-d bottleneck, trained on the normal training images only, with
the per-pixel L2 loss (AE-L2) or the SSIM loss (AE-SSIM). The anomaly map is the per-pixel squared L2 residual
resp. 1 - local SSIM between the image and its reconstruction; the image score is the mean of the map's top
1 %. Both are calibrated like CAVGA_u: on a seeded held-out slice of the normal training images only
(:func:`cavga.engine.calibration.fit_calibration` for scores; the ``MAP_QUANTILE`` quantile of the normal pixels maps to
0.5 for the map), then thresholded at 0.5 and scored with :func:`cavga.engine.infer.evaluate_outputs`.

PaDiM: no training. A per-position Gaussian (:class:`cavga.model.gaussian.PositionGaussian`) of frozen ImageNet
EfficientNet-Lite0 features (stride 8, with stride 16 upsampled onto it: 152 channels) over the normal training
images; the map is the Mahalanobis distance, upsampled and blurred as CAVGA's deviation maps are, the score its
maximum. PaDiM itself uses ResNet/WideResNet features and a random subset of their channels; this keeps all 152
channels of the one ImageNet network that ships with a pip package. Calibrated like CAVGA's deviation maps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cavga.data import DatasetSplits
from cavga.data.splits import split_calibration
from cavga.data.types import collate_samples
from cavga.engine.calibration import MAP_PEAK_FRACTION, MAP_QUANTILE, Calibration, fit_calibration
from cavga.engine.infer import (
    GAUSSIAN_FOLDS,
    BatchOutputs,
    DatasetOutputs,
    can_cross_fit,
    collect_outputs,
    evaluate_outputs,
    top_mean,
)
from cavga.engine.maps import upsampled_blur
from cavga.engine.train import resolve_device, seed_everything
from cavga.errors import ConfigError
from cavga.model.encoders import LiteEncoder
from cavga.model.gaussian import DEFAULT_SHRINKAGE, PositionGaussian, cross_fitted_scores
from cavga.model.ssim import SSIM_SIGMA, SSIM_WINDOW, gaussian_window, ssim_map  # noqa: F401 (re-exported)

KINDS = ("l2", "ssim")


@dataclass
class AutoencoderConfig:
    """One AE baseline: architecture, training budget and inference choices."""

    kind: str = "l2"  # "l2": AE-L2; "ssim": AE-SSIM
    image_size: int = 64  # a power of two >= 16
    channels: int = 3
    latent_dim: int = 100  # Bergmann et al.'s bottleneck (also the paper's flattened-z size)
    width: int = 32
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-4
    seed: int = 0
    calibration_fraction: float = 0.1
    calibration_quantile: float = 0.95
    score_top_fraction: float = 0.01
    device: str = "auto"

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        size = self.image_size
        if size < 16 or size & (size - 1):
            raise ConfigError(f"image_size must be a power of two >= 16 (32, 64, 128, ...), got {size}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if self.epochs < 1 or self.batch_size < 1 or self.width < 1 or self.latent_dim < 1:
            raise ConfigError("epochs, batch_size, width and latent_dim must be positive")
        if not 0.0 < self.score_top_fraction <= 1.0:
            raise ConfigError(f"score_top_fraction must lie in (0, 1], got {self.score_top_fraction}")


class ConvAutoencoder(nn.Module):
    """Strided 4x4 convs down to a 4x4 map, a fully connected 100-d code, and the mirror image back up."""

    def __init__(self, channels: int, image_size: int, width: int = 32, latent_dim: int = 100) -> None:
        super().__init__()
        n_down = int(math.log2(image_size // 4))
        if 4 * 2**n_down != image_size:
            raise ConfigError(f"image_size must be 4 * a power of two, got {image_size}")
        chans = [channels] + [width * 2 ** min(i, 3) for i in range(n_down)]
        enc: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*enc)
        self.bottom = (chans[-1], 4, 4)
        self.to_code = nn.Linear(chans[-1] * 16, latent_dim)
        self.from_code = nn.Linear(latent_dim, chans[-1] * 16)
        dec: list[nn.Module] = []
        rev = chans[::-1]
        for i, (c_in, c_out) in enumerate(zip(rev[:-1], rev[1:], strict=True)):
            dec.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1))
            if i < len(rev) - 2:
                dec += [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.decoder = nn.Sequential(*dec, nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.to_code(self.encoder(x).flatten(1))
        return self.decoder(self.from_code(code).view(-1, *self.bottom))


def residual(kind: str, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The raw anomaly map (B, 1, H, W): squared L2 distance over channels, or 1 - local SSIM."""
    if kind == "l2":
        return ((x - x_hat) ** 2).sum(dim=1, keepdim=True)
    if kind == "ssim":
        return 1.0 - ssim_map(x, x_hat)
    raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")


class AutoencoderBaseline:
    """AE-L2 / AE-SSIM with the same ``fit`` / ``evaluate`` shape as :class:`cavga.Cavga` (DatasetSplits only)."""

    def __init__(self, kind: str = "l2", **options) -> None:
        self.config = AutoencoderConfig(kind=kind, **options)
        self.config.validate()

    @property
    def name(self) -> str:
        return "AE-L2" if self.config.kind == "l2" else "AE-SSIM"

    def fit(self, splits: DatasetSplits, progress: bool = False) -> AutoencoderBaseline:
        """Train on the normal training images (less a calibration slice), then calibrate on that slice."""
        cfg = self.config
        train_set, calibration_set = split_calibration(splits.train, cfg.calibration_fraction, cfg.seed)
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        self.model_ = ConvAutoencoder(cfg.channels, cfg.image_size, cfg.width, cfg.latent_dim).to(device)
        optimizer = torch.optim.Adam(self.model_.parameters(), lr=cfg.lr, weight_decay=1e-5)
        generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(
            train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate_samples, generator=generator
        )
        start = time.perf_counter()
        self.history_: list[float] = []
        for _ in range(cfg.epochs):
            self.model_.train()
            total, count = 0.0, 0
            for batch in loader:
                x = batch.images.to(device)
                if len(x) < 2:  # BatchNorm needs two samples; a last batch of one is dropped
                    continue
                x_hat = self.model_(x)
                loss = F.mse_loss(x_hat, x) if cfg.kind == "l2" else (1.0 - ssim_map(x, x_hat)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(x)
                count += len(x)
            self.history_.append(total / max(count, 1))
        self.train_seconds_ = time.perf_counter() - start
        outputs = self._infer(calibration_set)
        self.calibration_ = fit_calibration(outputs.raw_scores, cfg.calibration_quantile, outputs.paths)
        # Same rule as CAVGA's "residual" map: a high quantile of the normal images' map pixels maps to 0.5.
        self.calibration_.map_threshold = float(np.quantile(outputs.residual_maps, MAP_QUANTILE))
        self.data_info_ = {**splits.info, "n_train": len(train_set), "n_calibration": len(calibration_set)}
        return self

    @torch.no_grad()
    def _infer(self, dataset: Dataset, calibration: Calibration | None = None) -> DatasetOutputs:
        self.model_.eval()
        device = next(self.model_.parameters()).device

        def run_batch(x: torch.Tensor) -> BatchOutputs:
            x_hat = self.model_(x)
            res = residual(self.config.kind, x, x_hat)
            amap = calibration.normalize_map(res) if calibration is not None else res.clamp(0.0, 1.0)
            return BatchOutputs(
                raw_scores=top_mean(res, self.config.score_top_fraction).double().cpu().numpy(),
                anomaly_maps=amap[:, 0].float().cpu().numpy(),
                reconstructions=x_hat.float().cpu().numpy(),
                residual_maps=res[:, 0].float().cpu().numpy(),
                raw_maps=res[:, 0].float().cpu().numpy(),
            )

        return collect_outputs(dataset, run_batch, batch_size=32, device=device)

    def evaluate(self, splits: DatasetSplits) -> dict:
        """The metrics of :func:`cavga.engine.infer.evaluate_outputs` on the test split of ``splits``."""
        if not hasattr(self, "model_"):
            raise ConfigError("this baseline is not fitted yet: call fit()")
        self.last_outputs_ = self._infer(splits.test, self.calibration_)
        return evaluate_outputs(self.last_outputs_, self.calibration_, groups=getattr(splits.test, "groups", None))

    def config_dict(self) -> dict:
        return asdict(self.config)


@dataclass
class PadimConfig:
    """The PaDiM-style baseline: input size and the shared calibration choices (no training budget)."""

    image_size: int = 256  # a multiple of 16
    channels: int = 3
    shrinkage: float = DEFAULT_SHRINKAGE
    batch_size: int = 16
    seed: int = 0
    calibration_fraction: float = 0.1
    calibration_quantile: float = 0.95
    device: str = "auto"

    def validate(self) -> None:
        if self.image_size % 16 or self.image_size < 32:
            raise ConfigError(f"PaDiM image_size must be a multiple of 16 (>= 32), got {self.image_size}")


class PadimBaseline:
    """PaDiM-style baseline with the ``fit`` / ``evaluate`` shape of the AE baselines (DatasetSplits only)."""

    name = "PaDiM"

    def __init__(self, **options) -> None:
        self.config = PadimConfig(**options)
        self.config.validate()

    @torch.no_grad()
    def fit(self, splits: DatasetSplits, progress: bool = False) -> PadimBaseline:
        cfg = self.config
        train_set, calibration_set = split_calibration(splits.train, cfg.calibration_fraction, cfg.seed)
        device = resolve_device(cfg.device)
        start = time.perf_counter()
        self.encoder_ = LiteEncoder(cfg.channels, 8, pretrained=True, frozen=True)
        self.encoder_.load_imagenet()
        self.encoder_.eval().to(device)
        side = cfg.image_size // 8
        self.gaussian_ = PositionGaussian(self.encoder_.out_channels, side, side).to(device)
        features = {}
        for name, part in (("train", train_set), ("calibration", calibration_set)):
            loader = DataLoader(part, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_samples)
            features[name] = torch.cat([self.encoder_(batch.images.to(device))[0] for batch in loader])
        self.gaussian_.fit([features["train"]], cfg.shrinkage)
        self.train_seconds_ = time.perf_counter() - start
        # Calibrated as CAVGA's latent Gaussian (cavga.engine.infer.calibrate): cross-fitted scores of every
        # normal training image (too few: the held-out slice's); a pixel passes 0.5 only where its image passes,
        # near the image's peak.
        size = (cfg.image_size, cfg.image_size)

        def peak(distances: torch.Tensor) -> torch.Tensor:
            return upsampled_blur(distances, size).flatten(1).amax(dim=1)

        if can_cross_fit(train_set, calibration_set):
            everything = torch.cat([features["train"], features["calibration"]])
            scores = cross_fitted_scores(everything, peak, GAUSSIAN_FOLDS, cfg.shrinkage)
        else:
            scores = peak(self.gaussian_(features["calibration"])).double().cpu()
        self.calibration_ = fit_calibration(scores.numpy(), cfg.calibration_quantile, calibration_set.paths)
        self.calibration_.map_threshold = self.calibration_.score_threshold
        self.calibration_.map_peak_fraction = MAP_PEAK_FRACTION
        self.data_info_ = {**splits.info, "n_train": len(train_set), "n_calibration": len(calibration_set)}
        return self

    @torch.no_grad()
    def _infer(self, dataset: Dataset, calibration: Calibration | None = None) -> DatasetOutputs:
        device = next(self.gaussian_.buffers()).device

        def run_batch(x: torch.Tensor) -> BatchOutputs:
            raw = upsampled_blur(self.gaussian_(self.encoder_(x)[0]), (x.shape[-2], x.shape[-1]))
            amap = calibration.normalize_map(raw) if calibration is not None else raw
            return BatchOutputs(
                raw_scores=raw.flatten(1).amax(dim=1).double().cpu().numpy(),
                anomaly_maps=amap[:, 0].float().cpu().numpy(),
                reconstructions=x.float().cpu().numpy(),  # no reconstruction: the input itself
                residual_maps=raw[:, 0].float().cpu().numpy(),
                raw_maps=raw[:, 0].float().cpu().numpy(),
            )

        return collect_outputs(dataset, run_batch, batch_size=self.config.batch_size, device=device)

    def evaluate(self, splits: DatasetSplits) -> dict:
        """The metrics of :func:`cavga.engine.infer.evaluate_outputs` on the test split of ``splits``."""
        if not hasattr(self, "gaussian_"):
            raise ConfigError("this baseline is not fitted yet: call fit()")
        self.last_outputs_ = self._infer(splits.test, self.calibration_)
        return evaluate_outputs(self.last_outputs_, self.calibration_, groups=getattr(splits.test, "groups", None))

    def config_dict(self) -> dict:
        return asdict(self.config)
