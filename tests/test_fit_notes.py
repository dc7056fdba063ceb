"""What fit() does beyond training, and what it says: only the model's own statistics and calibration (the paper's
map where asked for), the images it trains and calibrates on, a warning under 20 calibration images, a folder of
normal images trained on whole, and progress bars for the memory and the calibration."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import cavga
from cavga.cli import main
from cavga.data.types import ANOMALOUS
from cavga.engine.calibration import Calibration
from cavga.engine.fitting import (
    LATENT_GAUSSIAN_MAPS,
    MIN_CALIBRATION_IMAGES,
    needs_latent_gaussian,
    note_calibration,
)
from cavga.engine.infer import MapChoice
from cavga.engine.maps import ANOMALY_MAPS
from cavga.engine.scores import IMAGE_SCORES
from cavga.errors import DataError
from conftest import write_image
from tiny_data import write_tiny_mvtec

TINY = {"image_size": 32, "width": 8, "latent_channels": 8, "epochs": 1, "batch_size": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_mvtec(tmp_path_factory.mktemp("notes"))


def messages(caplog, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cavga.api" and r.levelno == level]


# ---------------------------------------------------------------------------------------------- the product path


class Spy:
    """A model whose attribute reads are recorded (a map or score that reads ``latent_gaussian`` names it)."""

    def __init__(self, model):
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self.model, name)


def test_the_latent_gaussian_list_names_every_map_and_score_that_reads_it():
    """Each map and score is run on a CAVGA-D_w whose latent Gaussian is not fitted: exactly those that read it
    (before failing on it, or on another unfitted part) are the ones fit() fits it for."""
    from cavga.config import ModelConfig
    from cavga.model.networks import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="D", image_size=32, width=8, latent_channels=8, setting="w")).eval()
    x = torch.rand(2, 3, 32, 32)
    out = model(x, sample=False)
    x_hat = torch.sigmoid(out.x_hat_logits)
    functions = {("map", k): spec.function for k, spec in ANOMALY_MAPS.items() if k != "feature_residual"}
    functions |= {("score", k): f for k, f in IMAGE_SCORES.items()}
    for (kind, name), function in functions.items():
        spy = Spy(model)
        try:
            function(spy, out, x, x_hat)
        except Exception:  # an unfitted part (the Gaussian itself, a memory, the deviation classifier)
            pass
        choice = MapChoice(name, "map_max") if kind == "map" else MapChoice("attention", name)
        assert needs_latent_gaussian(choice) == ("latent_gaussian" in spy.read), (kind, name)
    assert "feature_residual" not in LATENT_GAUSSIAN_MAPS  # a second network's features, not the latent's


def test_a_default_fit_calibrates_its_own_map_only_and_evaluate_asks_for_the_paper_map(root, tmp_path):
    """No paper calibration and no latent Gaussian for a map that reads neither; evaluate(paper_map=True) then
    reports the paper's map with exactly the figures of a fit that calibrated it; the model saves, loads,
    predicts, evaluates and exports without it."""
    own = cavga.Cavga("D", anomaly_map="latent_knn", score="map_max", **TINY).fit(root, progress=False)
    assert own.paper_calibration_ is None and not own.model_.latent_gaussian.fitted
    assert own.model_.latent_memory.fitted
    result = own.evaluate(root)
    assert "paper_map" not in result
    asked = own.evaluate(root, paper_map=True)
    with_paper = cavga.Cavga("D", anomaly_map="latent_knn", score="map_max", **TINY)
    with_paper.fit(root, progress=False, paper_map=True)
    assert with_paper.paper_calibration_ is not None
    assert with_paper.evaluate(root) == asked  # reported by default where the model holds its calibration
    assert {k: v for k, v in asked.items() if k != "paper_map"} == result
    assert with_paper.evaluate(root, paper_map=False) == result

    loaded = cavga.load(own.save(tmp_path / "m"), device="cpu")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["paper_calibration"] is None
    assert loaded.paper_calibration_ is None and loaded.evaluate(root) == result
    assert loaded.evaluate(root, paper_map=True) == asked
    image = root / "bottle" / "test" / "spot" / "000.png"
    assert loaded.predict(image)[0].pred_score == pytest.approx(own.predict(image)[0].pred_score, rel=1e-6)
    from cavga.export import export

    assert export(tmp_path / "m", tmp_path / "m.pt2", format="pt2").is_file()


def test_model_files_with_and_without_the_paper_calibration_load_and_evaluate(root, tmp_path):
    """A file of a fit that calibrated the paper's map (as every fit did before it was asked for) reports it by
    default; one written before the key existed loads as a model without it."""
    detector = cavga.Cavga("D", anomaly_map="residual", score="map_max", **TINY)
    detector.fit(root, progress=False, paper_map=True)
    expected = detector.evaluate(root)
    loaded = cavga.load(detector.save(tmp_path / "with"), device="cpu")
    assert loaded.paper_calibration_ is not None and loaded.evaluate(root) == expected
    config = json.loads((tmp_path / "with" / "config.json").read_text())
    del config["paper_calibration"]
    (tmp_path / "with" / "config.json").write_text(json.dumps(config))
    older = cavga.load(tmp_path / "with", device="cpu")
    assert older.paper_calibration_ is None and "paper_map" not in older.evaluate(root)
    assert older.evaluate(root, paper_map=True) == expected  # calibrated on the same held-out images now


def test_the_latent_gaussian_is_fitted_where_the_map_or_the_score_reads_it(root):
    by_map = cavga.Cavga("D", anomaly_map="latent_gaussian", score="map_max", **TINY).fit(root, progress=False)
    by_score = cavga.Cavga("D", anomaly_map="attention", score="latent_mahalanobis", **TINY).fit(root, progress=False)
    paper = cavga.Cavga("D", **TINY).fit(root, progress=False, paper_map=True)
    assert by_map.model_.latent_gaussian.fitted and by_score.model_.latent_gaussian.fitted
    assert not paper.model_.latent_gaussian.fitted
    assert paper.paper_calibration_ is None  # the model's own map and score are the paper's: nothing beside
    assert "paper_map" not in paper.evaluate(root, paper_map=True)


def test_cli_train_and_evaluate_take_paper_map(root, tmp_path, caplog):
    options = ["--variant", "D", "--image-size", "32", "--width", "8", "--latent-channels", "8", "--batch-size", "4"]
    options += ["--device", "cpu", "--no-progress", "--anomaly-map", "residual", "--score", "map_max"]
    caplog.set_level(logging.INFO, logger="cavga.api")
    assert main(["train", str(root), "--out", str(tmp_path / "plain"), *options]) == 0
    # The data line shows on the console without -v (the command line sets cavga.api to INFO).
    assert logging.getLogger("cavga.api").getEffectiveLevel() == logging.INFO
    assert any(m.startswith("bottle: 11 normal training images, 1 held out") for m in messages(caplog))
    assert main(["train", str(root), "--out", str(tmp_path / "paper"), "--paper-map", *options]) == 0
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["paper_calibration"] is None
    assert json.loads((tmp_path / "paper" / "config.json").read_text())["paper_calibration"] is not None
    for model, flags, has in (("plain", [], False), ("plain", ["--paper-map"], True), ("paper", [], True)):
        out = tmp_path / f"eval-{model}-{len(flags)}"
        assert main(["evaluate", str(tmp_path / model), str(root), "--out", str(out), "--no-report", *flags]) == 0
        assert ("paper_map" in json.loads((out / "metrics.json").read_text())) == has, (model, flags)


# ---------------------------------------------------------------------------------------------- what it says


def test_fit_says_what_it_trains_and_calibrates_on_and_warns_under_20(root, caplog):
    caplog.set_level(logging.INFO, logger="cavga.api")
    cavga.Cavga("D", **TINY).fit(root, progress=False)
    assert messages(caplog)[0] == (
        "bottle: 11 normal training images, 1 held out for calibration (calibration_fraction 0.1); "
        "test split: 6 images (3 anomalous)"
    )
    (warning,) = messages(caplog, logging.WARNING)
    assert "only 1 normal images' scores (fewer than 20)" in warning and "--calibration-fraction" in warning


def test_the_warning_appears_under_20_calibration_scores_and_not_at_20(caplog):
    caplog.set_level(logging.INFO, logger="cavga.api")
    for n, warned in ((1, True), (MIN_CALIBRATION_IMAGES - 1, True), (MIN_CALIBRATION_IMAGES, False), (200, False)):
        caplog.clear()
        note_calibration(Calibration(0.0, 1.0, 0.95, n_images=n), n, 0.1)
        assert bool(messages(caplog, logging.WARNING)) == warned, n
    # Scores of training images taken as if new count too, and are said
    caplog.clear()
    note_calibration(Calibration(0.0, 1.0, 0.95, n_images=30), 3, 0.1)
    assert not messages(caplog, logging.WARNING)
    assert messages(caplog) == [
        "calibration: 30 normal images' scores, 3 held out and 27 training images each scored as if new"
    ]


@pytest.fixture(scope="module")
def normal_folder(tmp_path_factory):
    """40 normal images beside 2 abnormal ones (folders layout)."""
    folder = tmp_path_factory.mktemp("folders")
    for i in range(40):
        write_image(folder / "normal" / f"{i:02d}.png", (32, 32), seed=i)
    for i in range(2):
        write_image(folder / "abnormal" / f"{i}.png", (32, 32), seed=100 + i)
    return folder


def test_a_fit_warns_with_18_held_out_images_and_not_with_20(normal_folder, caplog):
    caplog.set_level(logging.INFO, logger="cavga.api")
    for fraction, warned in ((0.45, True), (0.5, False)):
        caplog.clear()
        detector = cavga.Cavga("D", calibration_fraction=fraction, **TINY)
        detector.fit(normal_folder, format="folders", test_fraction=0.0, progress=False)
        assert detector.calibration_.n_images == round(fraction * 40)
        assert bool(messages(caplog, logging.WARNING)) == warned, fraction


def test_a_folder_of_normal_images_trains_whole_and_says_there_is_no_test_split(normal_folder, caplog):
    caplog.set_level(logging.INFO, logger="cavga.api")
    detector = cavga.Cavga("D", **TINY).fit(normal_folder / "normal", format="folders", progress=False)
    info = detector.data_info_
    assert info["n_train"] + info["n_calibration"] == 40 and info["n_calibration"] == 4
    assert "no test split" in messages(caplog)[0]
    with pytest.raises(DataError, match="no test split"):
        detector.evaluate(normal_folder / "normal", format="folders")
    # Beside an abnormal folder a fifth of the normal images is still the test split's.
    splits = detector._load(normal_folder, format="folders")
    assert len(splits.test) == 8 + 2 and sum(label == ANOMALOUS for label in splits.test.labels) == 2


def test_the_memory_fill_and_the_calibration_show_progress_unless_told_not_to(root, capsys):
    options = {**TINY, "anomaly_map": "latent_knn", "score": "map_max"}
    cavga.Cavga("D", **options).fit(root, progress=False)
    assert "memory" not in capsys.readouterr().err
    torch.manual_seed(0)
    cavga.Cavga("D", **options).fit(root, progress=True, paper_map=True)
    err = capsys.readouterr().err
    assert "memory" in err and "11/11" in err  # the memory's bar counts its images
    assert "calibration:" in err and "calibration (paper's map)" in err
