"""benchmarks/studies/attention_sweep.py: one tiny run per setting, its files, and resuming without retraining."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from cavga.data.synthetic import write_demo_dataset


@pytest.mark.slow
def test_sweep_writes_runs_summary_and_table_and_resumes(tmp_path, monkeypatch):
    sweep = load_benchmark("attention_sweep")
    evaluated, residual = [], []  # what each run's evaluation computed, to compare sweep.json with

    def evaluate(self, *args, **kwargs):
        evaluated.append(real_evaluate(self, *args, **kwargs))
        return evaluated[-1]

    def evaluate_outputs(*args, **kwargs):
        residual.append(real_evaluate_outputs(*args, **kwargs))
        return residual[-1]

    real_evaluate, real_evaluate_outputs = sweep.Cavga.evaluate, sweep.evaluate_outputs
    monkeypatch.setattr(sweep.Cavga, "evaluate", evaluate)
    monkeypatch.setattr(sweep, "evaluate_outputs", evaluate_outputs)
    data = tmp_path / "data"
    write_demo_dataset(data, categories=["pill"], image_size=64, n_train=10, n_test_good=3, n_test_defect=5)
    out = tmp_path / "out"
    args = ["--out", str(out), "--data", str(data), "--categories", "pill", "--epochs", "1", "--device", "cpu"]
    assert sweep.main([*args, "--settings", "base", "no_l_ae"]) == 0

    saved = json.loads((out / "sweep.json").read_text())
    runs = saved["runs"]
    assert [(r["setting"], r["seed"], r["category"]) for r in runs] == [("base", 0, "pill"), ("no_l_ae", 0, "pill")]
    assert runs[1]["options"] == {"w_ae": 0.0}
    assert len(evaluated) == len(residual) == 2
    for run, result, alternative in zip(runs, evaluated, residual, strict=True):
        assert (run["image_auroc"], run["pixel_auroc"], run["iou"]) == (
            result["image_auroc"],
            result["pixel_auroc"],
            result["iou"],
        )
        assert run["pixel_auroc_residual"] == alternative["pixel_auroc"]
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| setting | runs | image AuROC | pixel AuROC 1 - A |")
    assert len(table) == 2 + 2 and {line.split(" | ")[0] for line in table[2:]} == {"| base", "| no_l_ae"}

    # A rerun holds every (setting, seed, category) already: nothing is trained again.
    monkeypatch.setattr(sweep, "run_one", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert sweep.main([*args, "--settings", "base", "no_l_ae"]) == 0
    assert json.loads((out / "sweep.json").read_text())["runs"] == runs


def test_summary_means_and_worst_seed_by_hand():
    sweep = load_benchmark("attention_sweep")
    runs = [
        {"setting": "s", "seed": 0, "category": "pill", "image_auroc": 0.9, "pixel_auroc": 0.8,
         "pixel_auroc_residual": 0.7},
        {"setting": "s", "seed": 0, "category": "wood", "image_auroc": 0.5, "pixel_auroc": 0.4,
         "pixel_auroc_residual": 0.6},
        {"setting": "s", "seed": 1, "category": "pill", "image_auroc": 0.7, "pixel_auroc": 0.2,
         "pixel_auroc_residual": 0.5},
        {"setting": "s", "seed": 1, "category": "wood", "image_auroc": 0.3, "pixel_auroc": 0.6,
         "pixel_auroc_residual": 0.4},
    ]  # fmt: skip
    (row,) = sweep.summarize(runs)
    assert row["runs"] == 4 and row["seeds"] == [0, 1]
    assert np.isclose(row["pixel_auroc"], 0.5) and np.isclose(row["image_auroc"], 0.6)
    # seed 0 mean pixel 0.6, seed 1 mean 0.4 -> worst 0.4; per category: pill (0.8 + 0.2) / 2, wood (0.4 + 0.6) / 2
    assert np.isclose(row["worst_seed_pixel_auroc"], 0.4) and np.isclose(row["worst_seed_image_auroc"], 0.5)
    assert np.isclose(row["pixel_pill"], 0.5) and np.isclose(row["pixel_wood"], 0.5)
