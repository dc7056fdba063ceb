"""The paper's experiments as benchmark suites (``cavga benchmark SUITE``): Tables 3, 6, 7 and 8 regenerated.

Suites:

- ``mvtec``: every MVTec-layout category under the root (or those named): CAVGA-D_u, R_u, D_w, R_w and the
  AE-SSIM / AE-L2 baselines; IoU, pixel AuROC, AUPRO, balanced accuracy and image AuROC per category.
- ``pairs``: an image+mask pair layout (Magnetic Tile, or normal/abnormal/masks folders): the same models and
  table, on the reader's seeded split.
- ``oneclass``: MNIST / Fashion-MNIST / CIFAR-10 / class folders: CAVGA-D_u at the one-class defaults (with its
  paper-literal score beside), AE-SSIM, AE-L2 and PaDiM per class, image AuROC (Table 7).
- ``ablation``: Table 8's eight columns (flattened vs conv z, with and without L_ae in u, L_cga in w) on an
  MVTec-layout or pair-layout root, IoU.

``specs`` holds the suites and budgets, ``paper`` the paper's tables as data, ``runner`` the data loading, the
runner and its cache, ``tables`` the summaries and the Markdown writer.
"""

from cavga.benchmark.paper import MVTEC_CATEGORIES, PAPER, PAPER_SOURCES, paper_table, paper_value
from cavga.benchmark.runner import SuiteRun, config_hash, job_config, run_job, run_suite, write_results
from cavga.benchmark.specs import (
    ABLATION_MODELS,
    METRICS,
    ONECLASS_BUDGET,
    ONECLASS_MODEL,
    QUICK_BUDGET,
    SUITES,
    Budget,
    ModelSpec,
    default_budget,
    suite_models,
)
from cavga.benchmark.tables import markdown_report, metric_table, summarize

__all__ = [
    "ABLATION_MODELS",
    "METRICS",
    "ONECLASS_BUDGET",
    "ONECLASS_MODEL",
    "MVTEC_CATEGORIES",
    "PAPER",
    "PAPER_SOURCES",
    "QUICK_BUDGET",
    "SUITES",
    "Budget",
    "ModelSpec",
    "SuiteRun",
    "config_hash",
    "default_budget",
    "job_config",
    "markdown_report",
    "metric_table",
    "paper_table",
    "paper_value",
    "run_job",
    "run_suite",
    "summarize",
    "suite_models",
    "write_results",
]
