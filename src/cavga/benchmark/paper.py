"""The paper's numbers (Tables 3, 6, 7 and 8) as data, to print beside ours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cavga.benchmark.specs import ABLATION_MODELS
from cavga.errors import ConfigError

MVTEC_CATEGORIES = (
    "bottle", "hazelnut", "capsule", "metal_nut", "leather", "pill", "wood", "carpet",
    "tile", "grid", "cable", "transistor", "toothbrush", "screw", "zipper",
)  # fmt: skip
_T36_MODELS = ("AE-SSIM", "AE-L2", "CAVGA-D_u", "CAVGA-R_u", "CAVGA-D_w", "CAVGA-R_w")
# Table 3 (IoU) and Table 6 (balanced accuracy), the columns of the models run here, rows in MVTEC_CATEGORIES
# order and then the mean.
_TABLE3_IOU = """
0.15 0.22 0.30 0.34 0.36 0.39
0.00 0.41 0.44 0.51 0.58 0.79
0.09 0.11 0.25 0.31 0.38 0.41
0.01 0.26 0.39 0.45 0.46 0.46
0.34 0.67 0.76 0.79 0.80 0.84
0.07 0.25 0.34 0.40 0.44 0.53
0.36 0.29 0.56 0.59 0.61 0.66
0.69 0.38 0.71 0.73 0.70 0.81
0.04 0.23 0.31 0.38 0.47 0.81
0.88 0.83 0.32 0.38 0.42 0.55
0.01 0.05 0.37 0.44 0.49 0.51
0.01 0.22 0.30 0.35 0.38 0.45
0.08 0.51 0.54 0.57 0.60 0.63
0.03 0.34 0.42 0.48 0.51 0.66
0.10 0.13 0.20 0.26 0.29 0.31
0.19 0.33 0.41 0.47 0.50 0.59
"""
_TABLE3_MEAN_AUROC = "0.87 0.82 0.85 0.89 0.92 0.93"
_TABLE6_BALANCED_ACCURACY = """
0.88 0.80 0.89 0.91 0.93 0.96
0.54 0.88 0.84 0.87 0.90 0.92
0.61 0.62 0.83 0.87 0.89 0.93
0.54 0.73 0.67 0.71 0.81 0.88
0.46 0.44 0.71 0.75 0.80 0.84
0.60 0.62 0.88 0.91 0.93 0.97
0.83 0.74 0.85 0.88 0.89 0.89
0.67 0.50 0.73 0.78 0.80 0.82
0.52 0.77 0.70 0.72 0.81 0.86
0.69 0.78 0.75 0.78 0.79 0.81
0.61 0.56 0.63 0.67 0.86 0.97
0.52 0.71 0.73 0.75 0.80 0.89
0.74 0.98 0.91 0.97 0.96 0.99
0.51 0.69 0.77 0.78 0.79 0.79
0.80 0.80 0.87 0.94 0.95 0.96
0.63 0.71 0.78 0.82 0.86 0.90
"""
# Table 7, CAVGA-D_u: classes 0-9 then the mean; Fashion-MNIST has only the mean.
_TABLE7_MNIST = "0.994 0.997 0.989 0.983 0.977 0.968 0.988 0.986 0.988 0.991 0.986"
_TABLE7_CIFAR10 = "0.653 0.784 0.761 0.747 0.775 0.552 0.813 0.745 0.801 0.741 0.737"
_TABLE7_FASHION_MEAN = 0.885
# Table 8 (IoU), columns c1..c8; five categories and the mean over all 15.
_TABLE8_CATEGORIES = ("bottle", "hazelnut", "capsule", "metal_nut", "leather", "mean")
_TABLE8_IOU = """
0.24 0.27 0.26 0.33 0.16 0.34 0.28 0.39
0.16 0.26 0.31 0.47 0.51 0.76 0.67 0.79
0.09 0.22 0.14 0.31 0.18 0.36 0.27 0.41
0.28 0.38 0.34 0.45 0.25 0.38 0.28 0.46
0.55 0.71 0.64 0.79 0.72 0.79 0.75 0.84
0.24 0.34 0.33 0.47 0.39 0.52 0.48 0.60
"""


def _grid(text: str, rows: Sequence[str], columns: Sequence[str]) -> dict[str, dict[str, float]]:
    lines = [line.split() for line in text.strip().splitlines()]
    if len(lines) != len(rows) or any(len(line) != len(columns) for line in lines):
        raise AssertionError("paper table text does not match its row and column names")
    return {col: {row: float(line[j]) for row, line in zip(rows, lines, strict=True)} for j, col in enumerate(columns)}


# CIFAR-10's classes in label order (0 airplane ... 9 truck): class folders name them, batches number them.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _by_name_too(rows: dict[str, float]) -> dict[str, float]:
    return {**rows, **{name: rows[str(i)] for i, name in enumerate(CIFAR10_CLASSES)}}


def _paper() -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    rows = (*MVTEC_CATEGORIES, "mean")
    auroc = dict(zip(_T36_MODELS, map(float, _TABLE3_MEAN_AUROC.split()), strict=True))
    digits = [str(d) for d in range(10)] + ["mean"]
    return {
        # PAPER[table][metric][model][row]
        "mvtec": {
            "iou": _grid(_TABLE3_IOU, rows, _T36_MODELS),
            "pixel_auroc": {m: {"mean": v} for m, v in auroc.items()},
            "balanced_accuracy": _grid(_TABLE6_BALANCED_ACCURACY, rows, _T36_MODELS),
        },
        "mnist": {"image_auroc": {"CAVGA-D_u": dict(zip(digits, map(float, _TABLE7_MNIST.split()), strict=True))}},
        "cifar10": {
            "image_auroc": {
                "CAVGA-D_u": _by_name_too(dict(zip(digits, map(float, _TABLE7_CIFAR10.split()), strict=True)))
            }
        },
        "fashion-mnist": {"image_auroc": {"CAVGA-D_u": {"mean": _TABLE7_FASHION_MEAN}}},
        "ablation": {"iou": _grid(_TABLE8_IOU, _TABLE8_CATEGORIES, [m.name for m in ABLATION_MODELS])},
    }


PAPER = _paper()
PAPER_SOURCES = {
    "mvtec": "Tables 3 and 6",
    "mnist": "Table 7",
    "cifar10": "Table 7",
    "fashion-mnist": "Table 7",
    "ablation": "Table 8",
}


def paper_value(table: str | None, metric: str, model: str, row: str) -> float | None:
    """The paper's number for (table, metric, model, row), or None where the paper has no such cell."""
    if table is None:
        return None
    return PAPER.get(table, {}).get(metric, {}).get(model, {}).get(_row_key(row))


def _row_key(category: str) -> str:
    return category.strip().lower().replace(" ", "_").replace("-", "_")


def paper_table(suite: str, root: Path, paper_dataset: str | None = None) -> str | None:
    """Which of the paper's tables our rows are compared with (keys of :data:`PAPER`), or None."""
    if suite == "ablation":
        return "ablation"
    if suite == "mvtec":
        return "mvtec"
    if suite == "oneclass":
        if paper_dataset is not None:
            if paper_dataset not in ("mnist", "fashion-mnist", "cifar10"):
                raise ConfigError(f"paper dataset must be mnist, fashion-mnist or cifar10, got {paper_dataset!r}")
            return paper_dataset
        name = root.resolve().name.lower()
        if "fashion" in name:
            return "fashion-mnist"
        if "cifar" in name:
            return "cifar10"
        if "mnist" in name:
            return "mnist"
    return None
