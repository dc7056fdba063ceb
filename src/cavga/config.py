"""Typed configuration with the paper's defaults. Saved as JSON next to the weights; the CLI fills these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cavga.errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture of one CAVGA network (paper section 4, "Architecture details"; SPEC 1.3)."""

    variant: str = "D"  # "D": DCGAN encoder/decoder; "R": ResNet-18 trunk + residual decoder
    image_size: int = 64  # D: 32 or 64; R: any multiple of 32 (128 or 256 in the paper's spirit)
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    latent_channels: int = 64  # C_z of the convolutional latent z (C_z x h x w)
    latent_stride: int = 8  # image_size / h of z; D: 8 or 16; R: 32 (the ResNet-18 trunk)
    width: int = 64  # base channel count (DCGAN's ndf/ngf); smaller values make tiny test models
    flatten_latent: bool = False  # Table 8's `*` models: a 100-d fully connected latent instead of conv z
    flat_latent_dim: int = 100
    encoder_weights: str | None = None  # R only: local torchvision-format ResNet-18 state dict (never downloaded)
    weakly_supervised: bool = False  # adds the classifier C on flattened z (CAVGA_w, paper 3.2)
    gradcam_layer: str = "latent_input"  # "latent_input": the map feeding the mu/logvar heads; "encoder_mid"
    gradcam_target: str = "sum_mu"  # unsupervised target score; public re-implementations use sum(mu)
    gradcam_normalization: str = "max"  # "max": relu(cam)/max; "minmax": (cam-min)/(max-min), per image
    # Inference choices, stored with the model. The paper scores an image by "the pixel-wise difference" between x and
    # x_hat without saying how it is aggregated: "top_mean" (default) averages the largest `score_top_fraction` of
    # the blurred residual map, "mean" the whole residual. The anomaly map is the paper's 1 - A ("attention") or,
    # as a documented alternative, the blurred residual calibrated on normal images ("residual").
    score: str = "top_mean"
    score_top_fraction: float = 0.01
    anomaly_map: str = "attention"

    def validate(self) -> None:
        if self.variant not in ("D", "R"):
            raise ConfigError(f"variant must be 'D' or 'R', got {self.variant!r}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.variant == "D" and self.image_size not in (32, 64):
            raise ConfigError(f"CAVGA-D takes 32 or 64 px images, got image_size={self.image_size}")
        if self.variant == "R" and (self.image_size % 32 or self.image_size < 64):
            raise ConfigError(f"CAVGA-R takes a multiple of 32 px (>= 64), got image_size={self.image_size}")
        if self.gradcam_layer not in ("latent_input", "encoder_mid"):
            raise ConfigError(f"gradcam_layer must be 'latent_input' or 'encoder_mid', got {self.gradcam_layer!r}")
        if self.gradcam_normalization not in ("max", "minmax"):
            raise ConfigError(f"gradcam_normalization must be 'max' or 'minmax', got {self.gradcam_normalization!r}")
        if self.score not in ("top_mean", "mean"):
            raise ConfigError(f"score must be 'top_mean' or 'mean', got {self.score!r}")
        if not 0.0 < self.score_top_fraction <= 1.0:
            raise ConfigError(f"score_top_fraction must lie in (0, 1], got {self.score_top_fraction}")
        if self.anomaly_map not in ("attention", "residual"):
            raise ConfigError(f"anomaly_map must be 'attention' or 'residual', got {self.anomaly_map!r}")
        for name in ("latent_channels", "latent_stride", "width", "flat_latent_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class LossWeights:
    """Weights of eq. 4 (unsupervised) and eq. 6 (weakly supervised), the paper's values."""

    w_r: float = 1.0
    w_adv: float = 1.0
    w_ae: float = 0.01
    w_c: float = 0.001
    w_cga: float = 0.01


@dataclass
class TrainConfig:
    """How one model is trained. ``setting`` "u" is CAVGA_u, "w" is CAVGA_w."""

    setting: str = "u"
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-4  # DCGAN's Adam settings for both optimizers
    beta1: float = 0.5
    beta2: float = 0.999
    seed: int = 0
    calibration_fraction: float = 0.1  # seeded held-out slice of the normal training images
    checkpoint_every: int = 0  # epochs between checkpoints in the run directory (0: only at the end)
    device: str = "auto"
    num_workers: int = 0
    weights: LossWeights = field(default_factory=LossWeights)

    def validate(self) -> None:
        if self.setting not in ("u", "w"):
            raise ConfigError(f"setting must be 'u' or 'w', got {self.setting!r}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ConfigError(f"calibration_fraction must lie in (0, 1), got {self.calibration_fraction}")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from JSON data, naming any unknown key instead of ignoring it."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    kwargs = {}
    for key, value in data.items():
        if key == "weights" and isinstance(value, dict):
            value = from_dict(LossWeights, value)
        kwargs[key] = value
    return cls(**kwargs)
