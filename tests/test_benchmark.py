"""cavga benchmark: every suite in --quick mode (files, table layout, resume), the paper's numbers, summaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cavga import benchmark, cli
from cavga.benchmark import (
    ABLATION_MODELS,
    MVTEC_CATEGORIES,
    PAPER,
    QUICK_BUDGET,
    Budget,
    ModelSpec,
    config_hash,
    job_config,
    markdown_report,
    run_suite,
    summarize,
)
from cavga.data.synthetic import write_demo_dataset
from cavga.errors import ConfigError

PAPER_MD = Path(__file__).resolve().parents[1].parent / "shared" / "paper" / "cavga-eccv2020.md"


def _paper_rows(name: str) -> list[list[float]]:
    """Every row of the paper's text that starts with ``name`` and a tab, as numbers."""
    rows = []
    for line in PAPER_MD.read_text().splitlines():
        cells = line.split("\t")
        if cells[0].strip() == name:
            rows.append([float(c) for c in cells[1:] if re.fullmatch(r"\d\.\d+", c.strip())])
    return rows


@pytest.mark.skipif(not PAPER_MD.is_file(), reason=f"the paper's text is not at {PAPER_MD}")
def test_paper_tables_3_and_6_match_the_paper_text():
    names = {"metal_nut": "Metal Nut"}
    ours = ("AE-SSIM", "AE-L2", "CAVGA-D_u", "CAVGA-R_u", "CAVGA-D_w", "CAVGA-R_w")
    for category in MVTEC_CATEGORIES:
        table3, table6 = _paper_rows(names.get(category, category.capitalize()))[:2]
        assert len(table3) == 11 and len(table6) == 10
        # Table 3 columns: AVID, AE_SSIM, AE_L2, AnoGAN, gamma-VAE, LSA, ADVAE, D_u, R_u, D_w, R_w
        for model, value in zip(ours, [table3[i] for i in (1, 2, 7, 8, 9, 10)], strict=True):
            assert PAPER["mvtec"]["iou"][model][category] == value
        # Table 6 has no ADVAE column
        for model, value in zip(ours, [table6[i] for i in (1, 2, 6, 7, 8, 9)], strict=True):
            assert PAPER["mvtec"]["balanced_accuracy"][model][category] == value
    # Table 3's mean rows are the first "IoU" / "AuROC" rows with its 11 columns (Tables 4, 5 have others).
    iou_mean = next(r for r in _paper_rows("IoU") if len(r) == 11)
    auroc_mean = next(r for r in _paper_rows("AuROC") if len(r) == 11)
    assert [PAPER["mvtec"]["iou"][m]["mean"] for m in ours] == [iou_mean[i] for i in (1, 2, 7, 8, 9, 10)]
    assert [PAPER["mvtec"]["pixel_auroc"][m]["mean"] for m in ours] == [auroc_mean[i] for i in (1, 2, 7, 8, 9, 10)]


def test_paper_tables_7_and_8_spot_checks():
    mnist = PAPER["mnist"]["image_auroc"]["CAVGA-D_u"]
    assert (mnist["0"], mnist["5"], mnist["mean"]) == (0.994, 0.968, 0.986)
    cifar = PAPER["cifar10"]["image_auroc"]["CAVGA-D_u"]
    assert (cifar["1"], cifar["5"], cifar["mean"]) == (0.784, 0.552, 0.737)
    assert PAPER["fashion-mnist"]["image_auroc"]["CAVGA-D_u"] == {"mean": 0.885}
    table8 = PAPER["ablation"]["iou"]
    assert [table8[m.name]["mean"] for m in ABLATION_MODELS] == [0.24, 0.34, 0.33, 0.47, 0.39, 0.52, 0.48, 0.60]
    assert table8["c6"]["hazelnut"] == 0.76 and table8["c1"]["leather"] == 0.55
    assert benchmark.paper_value("ablation", "iou", "c8", "Metal Nut") == 0.46
    assert benchmark.paper_value("mvtec", "iou", "CAVGA-D_u", "weave") is None
    assert benchmark.paper_value(None, "iou", "CAVGA-D_u", "bottle") is None


def test_paper_table_choice():
    assert benchmark.paper_table("oneclass", Path("/data/mnist")) == "mnist"
    assert benchmark.paper_table("oneclass", Path("/data/FashionMNIST")) == "fashion-mnist"
    assert benchmark.paper_table("oneclass", Path("/data/cifar-10-batches-bin")) == "cifar10"
    assert benchmark.paper_table("oneclass", Path("/data/digits")) is None
    assert benchmark.paper_table("oneclass", Path("/data/digits"), "mnist") == "mnist"
    assert benchmark.paper_table("pairs", Path("/data/magnetic-tile")) is None
    with pytest.raises(ConfigError, match="paper dataset must be mnist, fashion-mnist or cifar10, got 'svhn'"):
        benchmark.paper_table("oneclass", Path("/x"), "svhn")


def test_config_hash_follows_every_budget_field(tmp_path):
    spec = ModelSpec("CAVGA-D_u", "cavga")
    base = config_hash(job_config("mvtec", spec, "bottle", 0, tmp_path, Budget()))
    assert base == config_hash(job_config("mvtec", spec, "bottle", 0, tmp_path, Budget()))
    for change in ({"epochs": 9}, {"image_size_d": 32}, {"max_train": 5}, {"batch_size": 8}, {"width": 16}):
        other = Budget(**change)
        assert config_hash(job_config("mvtec", spec, "bottle", 0, tmp_path, other)) != base, change
    assert config_hash(job_config("mvtec", spec, "bottle", 1, tmp_path, Budget())) != base
    # the R image size does not decide a D model's result
    assert config_hash(job_config("mvtec", spec, "bottle", 0, tmp_path, Budget(image_size_r=256))) == base


def _record(model: str, category: str, seed: int, iou: float) -> dict:
    metrics = dict.fromkeys(benchmark.METRICS, None) | {"iou": iou}
    return {"model": model, "category": category, "seed": seed, "metrics": metrics, "train_seconds": 1.0,
            "eval_seconds": 0.5, "wall_seconds": 1.5, "cached": False}  # fmt: skip


def test_summary_mean_and_spread_over_seeds_by_hand():
    specs = [ModelSpec("CAVGA-D_u", "cavga")]
    records = [
        _record("CAVGA-D_u", "bottle", 0, 0.4),
        _record("CAVGA-D_u", "bottle", 1, 0.6),
        _record("CAVGA-D_u", "wood", 0, 0.2),
        _record("CAVGA-D_u", "wood", 1, 0.1),
    ]
    summary = summarize("mvtec", "mvtec", specs, ["bottle", "wood"], records)
    bottle = summary["iou"]["CAVGA-D_u"]["bottle"]
    assert bottle["mean"] == pytest.approx(0.5) and bottle["std"] == pytest.approx(0.1414213562)  # sd of 0.4, 0.6
    assert bottle["paper"] == 0.30
    mean = summary["iou"]["CAVGA-D_u"]["mean"]
    # per seed: seed 0 (0.4 + 0.2) / 2 = 0.3, seed 1 (0.6 + 0.1) / 2 = 0.35
    assert mean["values"] == pytest.approx([0.3, 0.35])
    assert mean["mean"] == pytest.approx(0.325) and mean["std"] == pytest.approx(0.0353553391)
    assert mean["paper"] == 0.41
    meta = {"suite": "mvtec", "paper_table": "mvtec", "budget": vars(Budget()), "seeds": [0, 1], "data": "/d",
            "cavga_version": "x", "torch": "t", "threads": 2, "git_commit": None}  # fmt: skip
    text = markdown_report(meta, specs, ["bottle", "wood"], records, summary)
    assert "| bottle | 0.500 ± 0.141 (0.30) |" in text
    assert "| **mean** | 0.325 ± 0.035 (0.41) |" in text
    assert "| wood | 0.150 ± 0.071 (0.56) |" in text
    assert "Per object" not in text  # no record names objects


def test_markdown_lists_per_object_metrics_of_the_records_that_have_them():
    specs = [ModelSpec("CAVGA-D_u", "cavga")]
    records = [_record("CAVGA-D_u", "tiles", 0, 0.4), _record("CAVGA-D_u", "tiles", 1, 0.5)]
    records[1]["per_group"] = {"image_auroc": 0.875, "image_auroc_mean": None, "balanced_accuracy": 0.75,
                               "n_groups": 12.0, "n_anomalous_groups": 8.0}  # fmt: skip
    meta = {"suite": "pairs", "paper_table": None, "budget": vars(Budget()), "seeds": [0, 1], "data": "/d",
            "cavga_version": "x", "torch": "t", "threads": 2, "git_commit": None}  # fmt: skip
    text = markdown_report(meta, specs, ["tiles"], records, summarize("pairs", None, specs, ["tiles"], records))
    rows = _table(text, "Per object (a tile's exposures counted once)")
    assert rows[2:] == ["| CAVGA-D_u | tiles | 1 | 12 (8) | 0.875 | n/a | 0.750 |"]


def _table(text: str, heading: str) -> list[str]:
    """The Markdown table lines under ``## heading``."""
    block = text.split(f"## {heading}\n\n", 1)[1]
    return [line for line in block.split("\n\n", 1)[0].splitlines() if line.startswith("|")]


DEFAULT_AND_PAPER = ["CAVGA-L_u", "CAVGA-D_u", "CAVGA-R_u", "CAVGA-D_w", "CAVGA-R_w"]
SUITE_LAYOUT = {
    # suite: (models, categories, a table heading, its mean-row paper number for the first model or None)
    "mvtec": ([*DEFAULT_AND_PAPER, "AE-SSIM", "AE-L2", "PaDiM"], ["weave"], "IoU", "(0.41)"),
    "pairs": ([*DEFAULT_AND_PAPER, "AE-SSIM", "AE-L2", "PaDiM"], ["tiles"], "IoU", None),
    "oneclass": (
        ["CAVGA-L_u-oneclass", "CAVGA-D_u-oneclass", "AE-SSIM", "AE-L2", "PaDiM"],
        ["0", "1", "2"],
        "image AuROC",
        None,
    ),
    "ablation": ([m.name for m in ABLATION_MODELS], ["weave"], "IoU", "(0.24)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("suite", list(SUITE_LAYOUT))
def test_quick_suite_files_layout_and_resume(suite, tmp_path):
    models, categories, heading, paper_mean = SUITE_LAYOUT[suite]
    out = tmp_path / suite
    if suite == "oneclass":  # through the command line once
        assert cli.main(["benchmark", suite, "--quick", "--out", str(out)]) == 0
        first = json.loads((out / "results.json").read_text())["results"]
        assert all(not r["cached"] for r in first)
    else:
        run = run_suite(suite, out, quick=True, log=lambda _: None)
        assert run.trained == len(models) * len(categories)
    data = json.loads((out / "results.json").read_text())
    assert data["suite"] == suite and data["seeds"] == [0] and data["categories"] == categories
    assert data["budget"] == vars(QUICK_BUDGET) | {}
    assert "git_commit" in data and (data["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", data["git_commit"]))
    assert [r["model"] for r in data["results"]] == [m for _ in categories for m in models]
    for r in data["results"]:
        assert set(benchmark.METRICS) <= set(r["metrics"]) and r["wall_seconds"] > 0 and r["n_train"] > 0
        assert r["config"]["epochs"] == QUICK_BUDGET.epochs and r["key"] == config_hash(r["config"])
    if suite != "oneclass":  # every row counts the same test images (the w models' weak labels left out)
        assert len({r["metrics"]["n_images"] for r in data["results"]}) == 1
    text = (out / "results.md").read_text()
    table = _table(text, heading)
    # The default CAVGA-L_u's and the one-class defaults' paper-literal map and score (the same model) is a column
    # right after each.
    with_paper = {m for m in models if m == "CAVGA-L_u" or (suite == "oneclass" and m.startswith("CAVGA"))}
    assert with_paper == {r["model"] for r in data["results"] if r.get("paper_map")}
    columns = [c for m in models for c in ([m, m + " (paper score)"] if m in with_paper else [m])]
    assert table[0].startswith("| category | ") and table[0].count("|") == len(columns) + 2
    header = [c.strip() for c in table[0].split("|")[2:-1]]
    assert [h.split(":")[0] for h in header] == columns
    assert [line.split("|")[1].strip() for line in table[2:]] == [*categories, "**mean**"]
    mean_cells = [c.strip() for c in table[-1].split("|")[2:-1]]
    assert len(mean_cells) == len(columns)
    if paper_mean:  # on the first of the paper's models (the default CAVGA-L_u has no paper row)
        first = columns.index(next(m for m in models if m != "CAVGA-L_u"))
        assert mean_cells[first].endswith(paper_mean) and not any("(" in c for c in mean_cells[:first])
    else:
        assert "(" not in table[-1]

    # Resume: a second run trains nothing and leaves the cached results untouched.
    cache_files = sorted((out / "cache").rglob("*.json"))
    assert len(cache_files) == len(models) * len(categories)
    stamps = {p: p.stat().st_mtime_ns for p in cache_files}
    again = run_suite(suite, out, quick=True, log=lambda _: None)
    assert again.trained == 0 and all(r["cached"] for r in again.records)
    assert {p: p.stat().st_mtime_ns for p in cache_files} == stamps
    assert [r["metrics"] for r in again.records] == [r["metrics"] for r in data["results"]]
    assert "| yes |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_changed_budget_retrains_only_the_changed_jobs(tmp_path):
    out = tmp_path / "o"
    one = {"quick": True, "categories": ["0"], "models": ["CAVGA-D_u-oneclass"], "log": lambda _: None}
    run_suite("oneclass", out, **one)
    budget = Budget(**(vars(QUICK_BUDGET) | {"epochs": 2}))
    run = run_suite("oneclass", out, budget=budget, **one)
    assert run.trained == 1
    run = run_suite("oneclass", out, seeds=[0, 1], budget=budget, **one)
    assert run.trained == 1 and [r["cached"] for r in run.records] == [True, False]
    assert len(list((out / "cache").rglob("*.json"))) == 3


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown suite 'lag'"):
        run_suite("lag", tmp_path)
    with pytest.raises(ConfigError, match="--data is required"):
        run_suite("mvtec", tmp_path)  # neither --data nor --quick
    with pytest.raises(ConfigError, match=r"unknown model\(s\) \['CAVGA-X'\]"):
        benchmark.suite_models("mvtec", ["CAVGA-X"])
    assert [m.name for m in benchmark.suite_models("pairs", ["AE-L2", "c3"])] == ["AE-L2", "c3"]


@pytest.mark.slow
def test_jobs_in_worker_processes_match_one_process_and_a_failed_job_costs_no_other(tmp_path):
    root = tmp_path / "data"
    write_demo_dataset(root, image_size=64, n_train=6, n_test_good=2, n_test_defect=3)
    cats = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(cats) == 3
    two = {"data": root, "budget": QUICK_BUDGET, "models": ["PaDiM", "AE-L2"], "log": lambda _: None}
    inline = run_suite("mvtec", tmp_path / "inline", categories=cats[1:], jobs=1, **two)
    spawned = run_suite("mvtec", tmp_path / "spawned", categories=cats[1:], jobs=2, **two)
    assert spawned.trained == inline.trained == 4
    assert [(r["model"], r["category"]) for r in spawned.records] == [
        (r["model"], r["category"]) for r in inline.records
    ]
    for a, b in zip(spawned.records, inline.records, strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
    meta = json.loads(spawned.results_json.read_text())
    assert meta["jobs"] == 2 and meta["threads"] >= 1
    assert json.loads(inline.results_json.read_text())["jobs"] == 1
    assert "2 jobs at once, " in spawned.results_md.read_text()
    assert "jobs at once" not in inline.results_md.read_text()

    # One category's training images are unreadable: its jobs fail with the file named, the other's are cached.
    bad = root / cats[0] / "train" / "good"
    for path in bad.iterdir():
        path.write_bytes(b"not an image")
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match=rf"2 benchmark job\(s\) failed .*{cats[0]}.*not an image") as caught:
        run_suite("mvtec", out, jobs=2, **two)
    assert str(bad) in str(caught.value)
    cached = sorted(p.parent.name for p in (out / "cache").rglob("*.json"))
    assert cached == sorted(cats[1:] * 2)


def test_resolve_jobs():
    from cavga.benchmark.runner import available_cores, job_threads, resolve_jobs

    assert resolve_jobs(None, 100, "cpu") == available_cores()
    assert resolve_jobs(None, 1, "cpu") == 1 and resolve_jobs(8, 3, "cpu") == 3 and resolve_jobs(2, 0, "cpu") == 1
    assert job_threads(1) == available_cores() and job_threads(10 * available_cores()) == 1
    with pytest.raises(ConfigError, match="jobs must be at least 1, got 0"):
        resolve_jobs(0, 5, "cpu")
