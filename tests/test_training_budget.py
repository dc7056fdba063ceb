"""The training budget follows what the model reads: the default CAVGA-L (trunk_knn scored by its maximum) reads
no trained weight, so it is not trained unless the paper's map is asked for beside; a map that reads the trained
network gets the variant's epochs, and 0 epochs for it is refused. The calibration reads the trunk features the
memory was filled from instead of running the trunk again, with the same result."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import cavga
from cavga.config import ModelConfig, default_epochs, reads_training
from cavga.data.splits import split_calibration
from cavga.data.synthetic import write_demo_dataset
from cavga.engine.infer import calibrate, fit_trunk_memory
from cavga.errors import ConfigError
from cavga.model.networks import build_model
from tiny_data import write_tiny_mvtec


def test_the_default_model_trains_no_step_and_a_map_that_reads_the_network_does():
    assert cavga.Cavga().train_config.epochs == 0
    assert cavga.Cavga(anomaly_map="latent_knn").train_config.epochs == 1
    assert cavga.Cavga(score="latent_mahalanobis").train_config.epochs == 1  # the score reads mu
    assert cavga.Cavga(variant="R").train_config.epochs == 30
    assert cavga.Cavga(setting="w").train_config.epochs == 0  # L's weak default map is trunk_knn too
    assert cavga.Cavga(epochs=3).train_config.epochs == 3
    assert default_epochs("L", "trunk_knn", "map_max", paper_map=True) == 1
    assert not reads_training("trunk_knn", "map_max") and reads_training("trunk_knn", "top_mean")
    with pytest.raises(ConfigError, match="'latent_knn'.*epochs must be >= 1"):
        cavga.Cavga(anomaly_map="latent_knn", epochs=0)
    with pytest.raises(ConfigError, match="epochs must be >= 0"):
        cavga.Cavga(epochs=-1)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_mvtec(tmp_path_factory.mktemp("budget"))


def test_an_untrained_default_fit_says_so_and_draws_the_map_a_trained_one_draws(tiny_root, caplog):
    """No training step leaves every trained weight at its seeded initial value, and the map, scores and
    calibration equal those of the same model trained one epoch (the map reads no trained weight)."""
    with caplog.at_level(logging.INFO, logger="cavga.api"):
        untrained = cavga.Cavga(image_size=64, seed=0).fit(tiny_root, category="bottle", progress=False)
    assert untrained.history_ == []
    assert "no training: the trunk_knn map scored by map_top1 reads no trained weight" in caplog.text
    torch.manual_seed(0)
    initial = build_model(untrained.model_config).state_dict()
    now = untrained.model_.state_dict()
    assert all(torch.equal(initial[k], now[k]) for k in initial if not k.startswith("trunk_memory"))
    trained = cavga.Cavga(image_size=64, seed=0, epochs=1).fit(tiny_root, category="bottle", progress=False)
    assert len(trained.history_) == 1
    assert not torch.equal(trained.model_.state_dict()["mu_head.weight"], now["mu_head.weight"])
    a = untrained.evaluate(tiny_root, category="bottle")
    b = trained.evaluate(tiny_root, category="bottle")
    for key in ("image_auroc", "pixel_auroc", "aupro", "balanced_accuracy"):
        assert a[key] == b[key], key
    assert untrained.calibration_.score_threshold == pytest.approx(trained.calibration_.score_threshold, rel=1e-5)
    np.testing.assert_allclose(untrained.last_outputs_.raw_maps, trained.last_outputs_.raw_maps, rtol=1e-5)


def test_the_papers_map_beside_trains_the_variants_epochs_unless_zero_was_asked_for(tiny_root):
    detector = cavga.Cavga(image_size=64).fit(tiny_root, category="bottle", progress=False, paper_map=True)
    assert detector.train_config.epochs == 1 and len(detector.history_) == 1
    assert "paper_map" in detector.evaluate(tiny_root, category="bottle", paper_map=True)
    with pytest.raises(ConfigError, match="paper_map needs epochs >= 1"):
        cavga.Cavga(image_size=64, epochs=0).fit(tiny_root, category="bottle", progress=False, paper_map=True)


def test_the_calibration_reading_the_kept_trunk_features_equals_the_one_that_runs_the_trunk_again(tmp_path):
    write_demo_dataset(tmp_path, seed=0, categories=["pill"], image_size=64, n_train=24, n_test_good=4)
    splits = cavga.data.load_dataset(tmp_path, category="pill", preprocess=cavga.data.Preprocess(64, 3))
    normals, held_out = split_calibration(splits.train, 0.2, seed=0)
    n = len(normals) + len(held_out)
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="L", image_size=64, trunk_memory_size=256)).eval()
    kept = fit_trunk_memory(model, normals, seed=0, batch_size=8)
    assert kept.trunk and sum(b.shape[0] for b in kept.batches) == len(normals) and kept.size == (64, 64)
    again = calibrate(model, held_out, training_normals=normals, batch_size=8)
    reused = calibrate(model, held_out, training_normals=normals, batch_size=8, training_vectors=kept)
    assert again.n_images == reused.n_images == n
    assert reused.score_threshold == again.score_threshold and reused.map_threshold == again.map_threshold
    # The kept features are the ones the trunk gives: a corrupted copy changes the calibration.
    broken = type(kept)([b + 1.0 for b in kept.batches], kept.size, True)
    other = calibrate(model, held_out, training_normals=normals, batch_size=8, training_vectors=broken)
    assert other.score_threshold != again.score_threshold


def test_cavga_train_says_when_weak_labels_change_no_output(tiny_root, tmp_path, capsys):
    from cavga.cli import main

    args = ["train", str(tiny_root), "--category", "bottle", "--setting", "w", "--anomalous-count", "1"]
    args += ["--image-size", "64", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "w0")]) == 0
    out = capsys.readouterr().out
    assert "fitted (no training step) CAVGA-L_w" in out
    assert "the labels change no output: the trunk_knn map scored by map_top1" in out
    assert main([*args, "--out", str(tmp_path / "w1"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "trained CAVGA-L_w" in out and "anomalous training examples" in out and "change no output" not in out


def test_map_top1_is_the_mean_of_the_top_percent_of_pixels_and_the_default_scores_with_it(tiny_root):
    from cavga.engine.maps import map_score

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, 20, 30, generator=g)
    by_hand = np.sort(maps.reshape(3, -1).numpy(), axis=1)[:, -6:].mean(1)  # 1 % of 600 pixels: the top 6
    np.testing.assert_allclose(map_score(maps, "map_top1").numpy(), by_hand, rtol=1e-6)
    np.testing.assert_allclose(map_score(maps, "map_max").numpy(), maps.reshape(3, -1).amax(1).numpy())
    assert map_score(torch.rand(2, 1, 5, 5, generator=g), "map_top1").shape == (2,)  # 1 % of 25 pixels: at least 1
    with pytest.raises(ConfigError, match="not a score of the map alone"):
        map_score(maps, "top_mean")
    detector = cavga.Cavga(image_size=64).fit(tiny_root, category="bottle", progress=False)
    assert detector.model_config.score == "map_top1"
    detector.evaluate(tiny_root, category="bottle")
    raw_maps = detector.last_outputs_.raw_maps
    top = np.sort(raw_maps.reshape(len(raw_maps), -1), axis=1)[:, -(64 * 64 // 100) :].mean(1)
    np.testing.assert_allclose(detector.last_outputs_.raw_scores, top, rtol=1e-5)
