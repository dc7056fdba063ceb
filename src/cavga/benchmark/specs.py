"""The benchmark suites: which models each runs (one column per model of the paper's tables) and the budgets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cavga.config import ONECLASS_D_DEFAULTS, ONECLASS_DEFAULTS, ONECLASS_L_DEFAULTS
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
    paper_name: str = ""  # the paper's model this column is compared with (default: ``name``)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "variant": self.variant, "setting": self.setting,
                "options": dict(self.options)}  # fmt: skip


# The paper's models (their variants default to the paper's map and score).
CAVGA_MODELS = tuple(
    ModelSpec(f"CAVGA-{v}_{s}", "cavga", v, s) for v, s in (("D", "u"), ("R", "u"), ("D", "w"), ("R", "w"))
)
# cavga's default model (`cavga train` with no options), with its own one-epoch budget.
DEFAULT_MODEL = ModelSpec("CAVGA-L_u", "cavga", "L", "u", (("epochs", 1),), "CAVGA-L_u (default: trunk kNN)")
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


# The one-class protocol's models at their one-class defaults (cavga.config.ONECLASS_*_DEFAULTS; the budget's
# epochs, batch and image sizes come from ONECLASS_BUDGET). Each one's paper-literal score (attention map,
# top_mean) is reported beside it. Both are compared with Table 7's CAVGA-D_u, the paper's one-class model.
def _oneclass_options(defaults: dict) -> tuple:
    return tuple((k, v) for k, v in defaults.items() if k not in ("variant", "image_size", "epochs", "batch_size"))


ONECLASS_D_MODEL = ModelSpec(
    "CAVGA-D_u-oneclass",
    "cavga",
    "D",
    "u",
    _oneclass_options(ONECLASS_D_DEFAULTS),
    "CAVGA-D_u, one-class defaults (100-d z, latent Mahalanobis score)",
    paper_name="CAVGA-D_u",
)
ONECLASS_L_MODEL = ModelSpec(
    "CAVGA-L_u-oneclass",
    "cavga",
    "L",
    "u",
    _oneclass_options(ONECLASS_L_DEFAULTS),
    "CAVGA-L_u, one-class defaults (ImageNet Lite0 trunk, latent Mahalanobis score)",
    paper_name="CAVGA-D_u",
)
ONECLASS_MODEL = {"D": ONECLASS_D_MODEL, "L": ONECLASS_L_MODEL}[ONECLASS_DEFAULTS["variant"]]
ONECLASS_MODELS = (ONECLASS_MODEL, *(m for m in (ONECLASS_L_MODEL, ONECLASS_D_MODEL) if m is not ONECLASS_MODEL))
SUITE_MODELS = {
    "mvtec": (DEFAULT_MODEL, *CAVGA_MODELS, *BASELINES),
    "pairs": (DEFAULT_MODEL, *CAVGA_MODELS, *BASELINES),
    "oneclass": (*ONECLASS_MODELS, *BASELINES),
    "ablation": ABLATION_MODELS,
}
ALL_MODELS = {m.name: m for m in (DEFAULT_MODEL, *ONECLASS_MODELS, *CAVGA_MODELS, *BASELINES, *ABLATION_MODELS)}


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
# The one-class protocol (MNIST, CIFAR-10, ...): every model at 32 px (PaDiM's ImageNet trunk at its smallest,
# 64 px), ONECLASS_DEFAULTS' epochs and batch (docs/research/2026-12-07-oneclass-speed.md times MNIST's ten classes).
ONECLASS_BUDGET = Budget(
    epochs=ONECLASS_DEFAULTS["epochs"],
    image_size_d=ONECLASS_D_DEFAULTS["image_size"],
    image_size_r=64,
    image_size_ae=ONECLASS_D_DEFAULTS["image_size"],
    image_size_l=ONECLASS_L_DEFAULTS["image_size"],
    batch_size=ONECLASS_DEFAULTS["batch_size"],
)


def default_budget(suite: str, quick: bool = False) -> Budget:
    """A fresh copy of the budget a suite runs with when none is given."""
    if quick:
        return dataclasses.replace(QUICK_BUDGET)
    return dataclasses.replace(ONECLASS_BUDGET) if suite == "oneclass" else Budget()
