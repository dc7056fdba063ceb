"""The benchmark suites: which models each runs (one column per model of the paper's tables) and the budgets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cavga.errors import ConfigError

SUITES = ("mvtec", "pairs", "oneclass", "ablation")
METRICS = ("iou", "pixel_auroc", "aupro", "balanced_accuracy", "image_auroc")
METRIC_TITLES = {
    "iou": "IoU",
    "pixel_auroc": "pixel AuROC",
    "aupro": "AUPRO",
    "balanced_accuracy": "balanced accuracy",
    "image_auroc": "image AuROC",
}


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One column of a table: a CAVGA model (with extra options) or an AE baseline."""

    name: str
    kind: str  # "cavga", "ae" or "padim"
    variant: str = "D"  # CAVGA variant; "D" sizes the AE baselines too
    setting: str = "u"
    options: tuple[tuple[str, Any], ...] = ()  # extra Cavga options, e.g. (("flatten_latent", True),)
    title: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "variant": self.variant, "setting": self.setting,
                "options": dict(self.options)}  # fmt: skip


# The paper's models (their variants default to the paper's map and score).
CAVGA_MODELS = tuple(
    ModelSpec(f"CAVGA-{v}_{s}", "cavga", v, s) for v, s in (("D", "u"), ("R", "u"), ("D", "w"), ("R", "w"))
)
# cavga's default model (`cavga train` with no options), with its own one-epoch budget.
DEFAULT_MODEL = ModelSpec("CAVGA-L_u", "cavga", "L", "u", (("epochs", 1),), "CAVGA-L_u (default: latent Gaussian)")
BASELINES = (
    ModelSpec("AE-SSIM", "ae", options=(("kind", "ssim"),)),
    ModelSpec("AE-L2", "ae", options=(("kind", "l2"),)),
    ModelSpec("PaDiM", "padim", "L"),
)
# Table 8: "*" = flattened 100-d z; the u columns switch L_ae off by w_ae = 0, the w columns L_cga by w_cga = 0.
ABLATION_MODELS = (
    ModelSpec("c1", "cavga", "R", "u", (("flatten_latent", True), ("w_ae", 0.0)), "CAVGA-R_u*"),
    ModelSpec("c2", "cavga", "R", "u", (("flatten_latent", True),), "CAVGA-R_u* + L_ae"),
    ModelSpec("c3", "cavga", "R", "u", (("w_ae", 0.0),), "CAVGA-R_u + conv z"),
    ModelSpec("c4", "cavga", "R", "u", (), "CAVGA-R_u + conv z + L_ae"),
    ModelSpec("c5", "cavga", "R", "w", (("flatten_latent", True), ("w_cga", 0.0)), "CAVGA-R_w*"),
    ModelSpec("c6", "cavga", "R", "w", (("flatten_latent", True),), "CAVGA-R_w* + L_cga"),
    ModelSpec("c7", "cavga", "R", "w", (("w_cga", 0.0),), "CAVGA-R_w + conv z"),
    ModelSpec("c8", "cavga", "R", "w", (), "CAVGA-R_w + conv z + L_cga"),
)
SUITE_MODELS = {
    "mvtec": (DEFAULT_MODEL, *CAVGA_MODELS, *BASELINES),
    "pairs": (DEFAULT_MODEL, *CAVGA_MODELS, *BASELINES),
    "oneclass": (CAVGA_MODELS[0],),
    "ablation": ABLATION_MODELS,
}
ALL_MODELS = {m.name: m for m in (DEFAULT_MODEL, *CAVGA_MODELS, *BASELINES, *ABLATION_MODELS)}


def suite_models(suite: str, names: Sequence[str] | None = None) -> list[ModelSpec]:
    """The models of ``suite`` (its default set), or the named ones in the given order."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    if not names:
        return list(SUITE_MODELS[suite])
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}; known: {', '.join(ALL_MODELS)}")
    return [ALL_MODELS[n] for n in names]


# ---------------------------------------------------------------------------------------------- budgets


@dataclass
class Budget:
    """Training budget and data caps. The defaults fit the ``pairs`` suite on Magnetic Tile (four CAVGA models
    and two baselines) in about 2 hours on 2 CPU cores; see the README for GPU settings."""

    epochs: int = 8
    image_size_d: int = 64
    image_size_r: int = 128
    image_size_ae: int = 64
    image_size_l: int = 256  # CAVGA-L and the PaDiM baseline (their ImageNet trunk's stride-8 map: 32 x 32)
    batch_size: int = 16
    width: int | None = None  # None: each model's default width
    max_train: int | None = None  # seeded cap on the training images per category (None: all)
    max_test: int | None = None  # seeded cap on the test images per category (None: all)
    anomalous_fraction: float = 0.02  # CAVGA_w's weak labels: 2 % of the anomalous test images (paper)
    device: str = "auto"

    def image_size(self, spec: ModelSpec) -> int:
        if spec.kind == "ae":
            return self.image_size_ae
        return {"D": self.image_size_d, "R": self.image_size_r, "L": self.image_size_l}[spec.variant]


QUICK_BUDGET = Budget(
    epochs=1,
    image_size_d=32,
    image_size_r=64,
    image_size_ae=32,
    image_size_l=64,
    batch_size=4,
    width=8,
    max_train=8,
    max_test=12,
)
