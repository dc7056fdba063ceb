"""The one-class protocol's defaults: `cavga train --format oneclass` and the oneclass suite's columns."""

from __future__ import annotations

import json

from cavga import cli
from cavga.benchmark import ONECLASS_BUDGET, ONECLASS_MODEL, default_budget, suite_models
from cavga.benchmark.specs import BASELINES, ONECLASS_D_MODEL, ONECLASS_L_MODEL, QUICK_BUDGET, Budget
from cavga.benchmark.tables import with_paper_score_columns
from cavga.config import ONECLASS_D_DEFAULTS, ONECLASS_DEFAULTS, ONECLASS_L_DEFAULTS, oneclass_options
from test_data_oneclass import write_idx


def test_oneclass_options_fill_what_is_not_given_with_the_variants_own_defaults():
    assert oneclass_options({}) == ONECLASS_DEFAULTS == ONECLASS_L_DEFAULTS
    assert oneclass_options({"epochs": 7})["epochs"] == 7 and oneclass_options({"epochs": 7})["variant"] == "L"
    assert oneclass_options({"variant": "D"}) == ONECLASS_D_DEFAULTS
    assert oneclass_options({"variant": "D", "width": 8})["flatten_latent"] and oneclass_options({"variant": "D",
                            "width": 8})["width"] == 8  # fmt: skip
    assert oneclass_options({"variant": "R", "epochs": 2}) == {"variant": "R", "epochs": 2}
    assert ONECLASS_L_DEFAULTS["score"] == ONECLASS_D_DEFAULTS["score"] == "latent_mahalanobis"
    assert (ONECLASS_L_DEFAULTS["image_size"], ONECLASS_D_DEFAULTS["image_size"]) == (64, 32)


def test_the_oneclass_suite_runs_both_cavga_models_and_the_three_baselines_at_its_own_budget():
    assert suite_models("oneclass") == [ONECLASS_MODEL, ONECLASS_D_MODEL, *BASELINES]
    assert ONECLASS_MODEL is ONECLASS_L_MODEL and ONECLASS_MODEL.variant == ONECLASS_DEFAULTS["variant"]
    for spec, defaults in ((ONECLASS_L_MODEL, ONECLASS_L_DEFAULTS), (ONECLASS_D_MODEL, ONECLASS_D_DEFAULTS)):
        assert dict(spec.options)["score"] == defaults["score"]
        assert spec.paper_name == "CAVGA-D_u"  # compared with Table 7's CAVGA-D_u
    budget = default_budget("oneclass")
    assert budget == ONECLASS_BUDGET and budget is not ONECLASS_BUDGET
    assert budget.image_size(ONECLASS_D_MODEL) == 32 and budget.image_size(ONECLASS_L_MODEL) == 64
    assert budget.epochs == ONECLASS_DEFAULTS["epochs"]
    assert default_budget("mvtec") == Budget() and default_budget("oneclass", quick=True) == QUICK_BUDGET


def test_paper_score_columns_follow_their_model_and_carry_its_paper_map():
    records = [
        {"model": "A", "category": "0", "seed": 0, "metrics": {"image_auroc": 0.9}, "paper_map": {"image_auroc": 0.6}},
        {"model": "B", "category": "0", "seed": 0, "metrics": {"image_auroc": 0.8}},
    ]
    a, b = ONECLASS_MODEL.__class__("A", "cavga", title="t"), BASELINES[1]
    b = b.__class__("B", "ae")
    columns, out = with_paper_score_columns([a, b], records)
    assert [c.name for c in columns] == ["A", "A (paper score)", "B"]
    assert columns[1].paper_name == "-"  # no paper number beside the paper-score column
    extra = [r for r in out if r["model"] == "A (paper score)"]
    assert len(out) == 3 and extra[0]["metrics"] == {"image_auroc": 0.6}


def test_cavga_train_on_a_oneclass_folder_takes_the_oneclass_defaults(tmp_path):
    write_idx(tmp_path / "digits")
    out = tmp_path / "model"
    argv = ["train", str(tmp_path / "digits"), "--format", "oneclass", "--normal-class", "0", "--out", str(out)]
    assert cli.main([*argv, "--epochs", "1", "--width", "4", "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    model = config["model"]
    assert (model["variant"], model["image_size"], model["score"], model["anomaly_map"]) == (
        "L", 64, ONECLASS_DEFAULTS["score"], ONECLASS_DEFAULTS["anomaly_map"],
    )  # fmt: skip
    assert model["width"] == 4 and config["train"]["epochs"] == 1  # given flags win
    assert config["train"]["batch_size"] == ONECLASS_DEFAULTS["batch_size"]
    # --variant D takes CAVGA-D's one-class defaults (32 px, the flattened 100-d latent)
    assert cli.main([*argv[:-1], str(tmp_path / "d"), "--variant", "D", "--epochs", "1", "--no-progress"]) == 0
    model = json.loads((tmp_path / "d" / "config.json").read_text())["model"]
    assert (model["variant"], model["image_size"], model["flatten_latent"], model["width"]) == ("D", 32, True, 32)
    # no --width: L's one-class width (8, a quarter of its decoder's cost at L's default 16)
    assert cli.main([*argv[:-1], str(tmp_path / "l"), "--epochs", "1", "--no-progress"]) == 0
    model = json.loads((tmp_path / "l" / "config.json").read_text())["model"]
    assert (model["variant"], model["width"]) == ("L", ONECLASS_L_DEFAULTS["width"]) == ("L", 8)


def test_cifar10_class_folders_find_their_table7_row_by_name():
    from cavga.benchmark.paper import CIFAR10_CLASSES, paper_value

    assert paper_value("cifar10", "image_auroc", "CAVGA-D_u", "ship") == 0.801  # Table 7, class 8
    by_name = [paper_value("cifar10", "image_auroc", "CAVGA-D_u", c) for c in CIFAR10_CLASSES]
    assert by_name == [paper_value("cifar10", "image_auroc", "CAVGA-D_u", str(i)) for i in range(10)]
