"""The command line, run as a user runs it (a real subprocess), on a tiny MVTec-layout folder."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cavga
from cavga.cli_options import RESOLVED_BY_THE_ESTIMATOR, config_fields, train_options
from cavga.config import LossWeights, ModelConfig, TrainConfig
from tiny_data import write_tiny_mvtec

CAVGA = [sys.executable, "-m", "cavga.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CAVGA, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cavga {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("make-data", "demo", "train", "predict", "evaluate"):
        assert command in out


@pytest.mark.slow
def test_train_predict_evaluate(tmp_path):
    root = write_tiny_mvtec(tmp_path / "data")
    model = tmp_path / "model"
    run(
        "train",
        str(root),
        "--out",
        str(model),
        "--category",
        "bottle",
        "--variant",
        "D",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--width",
        "8",
        "--latent-channels",
        "8",
        "--device",
        "cpu",
        "--no-progress",
    )
    config = json.loads((model / "config.json").read_text())
    assert config["model"]["variant"] == "D" and config["model"]["setting"] == "u"

    preds = tmp_path / "preds"
    run("predict", str(model), str(root / "bottle" / "test"), "--out", str(preds))
    lines = [json.loads(line) for line in (preds / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for line in lines:
        assert 0.0 <= line["pred_score"] <= 1.0 and line["pred_label"] in (0, 1)
        heat = Image.open(preds / line["heatmap"])
        mask = Image.open(preds / line["pred_mask"])
        assert heat.size == mask.size == (40, 40)  # written at the input image's own size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert len({line["heatmap"] for line in lines}) == 6  # same stems in two folders do not overwrite

    # The command line writes what the API computes for the same saved model.
    detector = cavga.load(model, device="cpu")
    in_process = detector.predict([Path(line["path"]) for line in lines])
    assert [line["pred_score"] for line in lines] == pytest.approx([p.pred_score for p in in_process], rel=1e-6)
    out = tmp_path / "eval"
    run("evaluate", str(model), str(root), "--category", "bottle", "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    expected = detector.evaluate(root, category="bottle")
    assert set(metrics) == set(expected) and metrics["n_images"] == expected["n_images"] == 6
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key


def test_bad_input_gives_a_clear_error_and_exit_code(tmp_path):
    proc = run("predict", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_make_data_writes_a_readable_mvtec_dataset(tmp_path):
    run("make-data", str(tmp_path / "demo"), "--seed", "1")
    from cavga.data import ANOMALOUS, NORMAL, list_mvtec_categories, read_mvtec
    from cavga.data.synthetic import DEMO_CATEGORIES, DEMO_DEFECTS, render_sample

    assert list_mvtec_categories(tmp_path / "demo") == sorted(DEMO_CATEGORIES)
    for category in DEMO_CATEGORIES:
        splits = read_mvtec(tmp_path / "demo", category)
        # write_demo_dataset's defaults: 160 training images, 30 good and 40 defective test images
        assert len(splits.train) == 160 and splits.test.labels.count(NORMAL) == 30
        assert splits.test.labels.count(ANOMALOUS) == 40
        assert {r.defect_type for r in splits.test.records} == {"good", *DEMO_DEFECTS[category]}
    # The files are the seeded renderings: seed 1 gives exactly render_sample(..., seed=1).
    image = np.asarray(Image.open(tmp_path / "demo" / DEMO_CATEGORIES[0] / "train" / "good" / "000.png"))
    np.testing.assert_array_equal(image, render_sample(DEMO_CATEGORIES[0], 1, "train", "good", 0).image)
    assert Path(tmp_path / "demo" / "README.txt").is_file()


def test_every_config_field_has_a_train_flag_with_its_default_and_help():
    parser = train_options()
    actions = {option: action for action in parser._actions for option in action.option_strings}
    names = {f.name for f in config_fields()}
    expected = {f.name for cls in (ModelConfig, TrainConfig, LossWeights) for f in dataclasses.fields(cls)}
    assert names == expected - {"weights"}
    for f in config_fields():
        action = actions.get("--" + f.name.replace("_", "-"))
        assert action is not None, f"no cavga train flag for {f.name}"
        assert action.dest == f.name and action.help, f.name
        if f.name in RESOLVED_BY_THE_ESTIMATOR:  # left to the estimator (variant-dependent, read from the data)
            assert action.default is None, f.name
        else:
            assert action.default == f.default, f.name


def test_train_flags_fill_the_config_dataclasses():
    """Flags left out give the dataclass defaults; given ones (old spellings included) reach the config."""
    parser = train_options()
    args = parser.parse_args(["data", "--w-cga", "0.5", "--anomaly-map", "residual", "--epochs", "3"])
    assert (args.w_cga, args.anomaly_map, args.epochs, args.lr, args.gradcam_layer) == (
        0.5,
        "residual",
        3,
        TrainConfig().lr,
        ModelConfig().gradcam_layer,
    )
    assert parser.parse_args(["data", "--flatten-latent"]).flatten_latent is True


def test_split_by_reaches_the_magnetic_tile_reader_and_is_refused_elsewhere(tmp_path):
    from cavga.cli import build_parser
    from cavga.cli_options import data_kwargs as _data_kwargs
    from cavga.data import load_dataset
    from cavga.errors import ConfigError

    common = ["evaluate", "model", str(tmp_path), "--out", str(tmp_path / "out")]
    args = build_parser().parse_args([*common, "--split-by", "image", "--split-seed", "3"])
    assert _data_kwargs(args) == {"seed": 3, "split": "image"}
    assert _data_kwargs(build_parser().parse_args(common)) == {}
    (tmp_path / "normal").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "normal" / "a.png")
    with pytest.raises(ConfigError, match=r"\['split'\] do not apply to the 'folders' format"):
        load_dataset(tmp_path, split="image")
