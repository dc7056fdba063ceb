"""Export: the closed-form Grad-CAM (what the graph computes) equals autograd's, and ONNX / pt2 (torch.export)
outputs equal eager inference (``infer_batch`` + calibration) within 1e-4 for every variant and both settings, on
tiny untrained models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cavga.config import LossWeights, ModelConfig, TrainConfig
from cavga.data import Preprocess
from cavga.engine.infer import Calibration, infer_batch
from cavga.errors import ConfigError
from cavga.model.gradcam import cam_from_weights, class_attention, closed_form_weights, grad_cam, target_score
from cavga.model.networks import build_model

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[export]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install '.[export]')")

from cavga.export import ExportedCavga, OnnxInferencer, export, load_exported  # noqa: E402

VARIANTS = {
    "D": {"variant": "D", "image_size": 32},
    "R": {"variant": "R", "image_size": 64},
    "D*": {"variant": "D", "image_size": 32, "flatten_latent": True, "flat_latent_dim": 12},
    "R*": {"variant": "R", "image_size": 64, "flatten_latent": True, "flat_latent_dim": 12},
}
TOL = 1e-4
SLOW = pytest.mark.slow  # the full-size ResNet-18 trunk: seconds per export on a small CPU


def _perturb_batchnorm(model: torch.nn.Module, seed: int) -> None:
    # Untrained BatchNorm has mean 0, var 1 running stats: make eval-mode BN a real affine map.
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _detector(name: str, setting: str, seed: int = 0, **extra):
    """A loaded-like Cavga around an untrained tiny model with a calibration that spreads the test scores."""
    import cavga

    torch.manual_seed(seed)
    config = ModelConfig(**VARIANTS[name], channels=3, width=8, latent_channels=4, setting=setting)
    config = dataclasses.replace(config, **extra)
    model = build_model(config).eval()
    _perturb_batchnorm(model, seed)
    with torch.no_grad():  # positive head weights: relu(sum_k alpha_k F_k) is not zero everywhere at init
        head = model.mu_head if not config.flatten_latent else model.mu_head[1]
        head.weight.abs_()
    x = _images(seed, n=5 if config.variant == "D" else 3, size=config.image_size)
    if setting == "w":
        with torch.no_grad():
            model.classifier.weight[1].abs_()  # as the head: a non-empty anomalous map at init
            model.classifier.weight.mul_(50.0)  # spread P(anomalous) so both sides of the 0.5 gate occur
            logits = model.classify(model(x, sample=False).z)
            diff = (logits[:, 1] - logits[:, 0]).sort().values
            k = len(diff) // 2  # between two images' logit gaps: none sits on the 0.5 gate itself
            model.classifier.bias[1] -= (diff[k - 1] + diff[k]) / 2
        calibration = Calibration(0.0, 0.5, 0.95, 1)
    else:
        raw = infer_batch(model, x).raw_scores
        calibration = Calibration(float(raw.min()) - 1e-3, float(np.median(raw)), 0.95, 1, map_threshold=0.05)
    detector = cavga.Cavga.__new__(cavga.Cavga)
    detector.model_config = config
    detector.train_config = TrainConfig(weights=LossWeights())
    detector.model_ = model
    detector.calibration_ = calibration
    detector.preprocess_ = Preprocess(config.image_size, 3)
    detector.calibration_quantile = 0.95
    detector.anomalous_fraction = detector.anomalous_count = detector.anomalous_dir = None
    detector.data_info_ = {}
    detector.channels_given = True
    return detector, x


def _images(seed: int, n: int = 5, size: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.rand(n, 3, size or 64, size or 64, generator=g)[..., : (size or 64), : (size or 64)]


def _eager(detector, x):
    out = infer_batch(detector.model_, x, detector.calibration_)
    score = detector.calibration_.normalize(out.raw_scores)
    return score, out.anomaly_maps, out.anomaly_maps > 0.5


def _graph_weights(model, x):
    """The constant Grad-CAM channel weights the exported graph uses: u's target, or w's anomalous class."""
    target = model.config.gradcam_target if model.config.setting == "u" else 1
    with torch.no_grad():
        return closed_form_weights(model, target, model(x, sample=False))


def test_closed_form_weights_by_hand():
    # Conv latent, setting u: alpha_k = sum over output channels of the 1x1 head's weights.
    detector, x = _detector("D", "u")
    w = detector.model_.mu_head.weight.detach()[:, :, 0, 0].numpy()
    np.testing.assert_allclose(_graph_weights(detector.model_, x).numpy(), w.sum(0), rtol=1e-6)
    # Conv latent, setting w: the anomalous row of C reshaped to (C_z, h*w), averaged over positions.
    detector, x = _detector("D", "w")
    row = detector.model_.classifier.weight.detach()[1].numpy()
    np.testing.assert_allclose(_graph_weights(detector.model_, x).numpy(), row.reshape(4, -1).mean(1), rtol=1e-5)


def test_encoder_mid_layer_is_refused():
    detector, _ = _detector("D", "u", gradcam_layer="encoder_mid")
    with pytest.raises(ConfigError, match="closed form"):
        ExportedCavga(detector.model_, detector.calibration_)


def _check_outputs(got, expected, setting):
    score, amap, mask = got
    e_score, e_map, e_mask = expected
    np.testing.assert_allclose(score, e_score, atol=TOL)
    np.testing.assert_allclose(amap, e_map, atol=TOL)
    # The mask may differ only where the map lies within the tolerance of the threshold.
    differ = mask.astype(bool) != e_mask
    assert not differ.any() or np.all(np.abs(e_map[differ] - 0.5) < TOL)


def _check_closed_form_gradcam(detector, x):
    """The exported graph's constant-weight Grad-CAM equals the autograd map (Grad-CAM by double backward)."""
    model, setting = detector.model_, detector.model_config.setting
    cfg = model.config
    size = tuple(x.shape[-2:])
    alpha = _graph_weights(model, x)
    with torch.no_grad():
        out = model(x, sample=False)
    ref = model(x, sample=False)  # a forward with gradients, for autograd
    if setting == "u":
        got = cam_from_weights(alpha, out.features, size, cfg.gradcam_normalization)
        expected = grad_cam(target_score(ref, cfg.gradcam_target), ref.features, size, cfg.gradcam_normalization)
    else:
        features = out.features if cfg.flatten_latent else out.z
        got = cam_from_weights(alpha, features, size, cfg.gradcam_normalization)
        if cfg.flatten_latent:
            expected = grad_cam(model.classify(ref.z)[:, 1], ref.features, size, cfg.gradcam_normalization)
        else:
            z = ref.z.detach().requires_grad_(True)
            expected = grad_cam(model.classify(z)[:, 1], z, size, cfg.gradcam_normalization)
        torch.testing.assert_close(class_attention(model, out, 1, create_graph=False), got)
    expected = expected.detach()
    assert float(expected.amax()) > 0.5  # a real map, not all zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["D", "D*", pytest.param("R", marks=SLOW), pytest.param("R*", marks=SLOW)])
@pytest.mark.parametrize("setting", ["u", "w"])
def test_onnx_and_pt2_equal_eager(name, setting, tmp_path):
    detector, x = _detector(name, setting)  # 5 images: a batch size other than the export's example batch
    _check_closed_form_gradcam(detector, x)
    expected = _eager(detector, x)
    if setting == "w":  # both branches of the decision gate are exercised
        assert 0 < (expected[0] > 0.5).sum() < len(x)
    else:
        assert 0 < expected[0].min() < 1 or 0 < expected[0].max() < 1  # not everything clipped
    with torch.no_grad():
        eager_module = ExportedCavga(detector.model_, detector.calibration_)(x)
    _check_outputs([t.numpy() for t in eager_module], expected, setting)

    onnx_path = export(detector, tmp_path / "m.onnx", "onnx")
    _check_outputs(OnnxInferencer(onnx_path).run(x.numpy()), expected, setting)

    pt2_path = export(detector, tmp_path / "m.pt2", "pt2")
    program, config = load_exported(pt2_path)
    assert config == json.loads(json.dumps(detector.config_dict()))
    with torch.no_grad():
        _check_outputs([t.numpy() for t in program(x)], expected, setting)
        _check_outputs([t.numpy() for t in program(x[:2])], [e[:2] for e in expected], setting)  # another batch


def test_an_unknown_format_is_refused_with_the_known_ones(tmp_path, capsys):
    from cavga.cli import main

    detector, _ = _detector("D", "u")
    with pytest.raises(ConfigError, match=r"format must be one of \('onnx', 'pt2'\), got 'torchscript'"):
        export(detector, tmp_path / "m.pt", "torchscript")
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(detector.save(tmp_path / "model")), "--format", "torchscript"])
    assert exit_.value.code == 2 and "invalid choice: 'torchscript'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [{"anomaly_map": "residual"}, {"score": "mean", "gradcam_normalization": "minmax"}])
def test_export_inference_options(extra, tmp_path):
    detector, _ = _detector("D", "u", **extra)
    x = _images(3, size=32)
    onnx_path = export(detector, tmp_path / "m.onnx", "onnx")
    _check_outputs(OnnxInferencer(onnx_path).run(x.numpy()), _eager(detector, x), "u")


def test_saved_model_dir_preprocess_feeds_the_graph(tmp_path):
    """cavga.load(DIR).preprocess gives exactly the graph's input: the ONNX session on it equals predict."""
    from PIL import Image

    import cavga

    detector, _ = _detector("D", "u")
    model_dir = detector.save(tmp_path / "model")
    export(model_dir, format="onnx")  # default: MODEL_DIR/model.onnx
    loaded = cavga.load(model_dir, device="cpu")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    image_file = tmp_path / "x.png"
    Image.fromarray(arrays[0]).save(image_file)
    inputs = [image_file, arrays[1], Image.fromarray(arrays[2])]  # a path, a numpy array, a PIL image
    preds = loaded.predict(inputs)
    batch = np.stack([loaded.preprocess(item) for item in inputs])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    inferencer = OnnxInferencer(model_dir)
    np.testing.assert_array_equal(np.stack([inferencer.preprocess(item) for item in inputs]), batch)
    score, amap, _ = inferencer.run(batch)
    np.testing.assert_allclose(score, [p.pred_score for p in preds], atol=TOL)
    np.testing.assert_allclose(amap, np.stack([p.anomaly_map for p in preds]), atol=TOL)
    # One image in, a list of one Prediction out, with the fields the API promises.
    (single,) = loaded.predict(arrays[1])
    assert single.anomaly_map.shape == single.pred_mask.shape == (32, 32) and single.pred_label in (0, 1)
    np.testing.assert_allclose(single.pred_score, preds[1].pred_score, atol=1e-9)
    onnx_preds = inferencer.predict(inputs)
    assert [p.pred_label for p in onnx_preds] == [p.pred_label for p in preds]
    assert onnx_preds[1].original_size == (40, 48)


def test_load_exported_names_a_bad_file(tmp_path):
    from cavga.errors import ModelFileError

    with pytest.raises(ModelFileError, match="no such pt2 file"):
        load_exported(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ModelFileError, match="not a loadable torch.export program"):
        load_exported(tmp_path / "junk.pt2")


def test_onnx_file_carries_its_config(tmp_path):
    detector, x = _detector("D", "w")
    path = export(detector, tmp_path / "alone.onnx", "onnx")
    inferencer = OnnxInferencer(path)  # no config.json beside it
    assert inferencer.config["calibration"]["score_threshold"] == 0.5
    assert inferencer.preprocess(np.zeros((10, 10), np.uint8)).shape == (3, 32, 32)
