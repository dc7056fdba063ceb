"""CAVGA_w end to end: L_cga through Grad-CAM and the training step, the weak-label protocol (seeded sample of
anomalous test images, labels only, excluded from evaluation), inference, save/load and the CLI."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import cavga
from cavga.cli import main
from cavga.config import LossWeights, ModelConfig, TrainConfig
from cavga.data import AnomalyDataset, Record, load_dataset
from cavga.data.splits import sample_weak_labels, weak_training_set
from cavga.data.types import ANOMALOUS, NORMAL, Sample, collate_samples
from cavga.engine.classifier import fit_deviation_classifier, fold_standardization, refit_classifier
from cavga.engine.infer import MapChoice, infer_batch
from cavga.engine.train import class_weights_for, make_optimizers, training_step
from cavga.errors import ConfigError, DataError
from cavga.model import losses
from cavga.model.gaussian import top_mean_logit
from cavga.model.gradcam import class_attention, grad_cam, signed_class_maps
from cavga.model.networks import CavgaOutput, build_model
from tiny_data import write_tiny_mvtec

TINY = {"image_size": 32, "width": 8, "latent_channels": 8, "epochs": 1, "batch_size": 4, "device": "cpu"}


def tiny_w_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(variant="D", image_size=32, channels=3, width=8, latent_channels=8, setting="w"))


def batch_of(labels: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(labels), 3, 32, 32, generator=g)
    return collate_samples(
        [Sample(img, None, y, "x", f"{i}.png") for i, (img, y) in enumerate(zip(images, labels, strict=True))]
    )


def force_prediction(model, cls: int) -> None:
    """Make C predict ``cls`` for every input (a bias that dwarfs the small initial weights)."""
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([50.0, -50.0] if cls == NORMAL else [-50.0, 50.0]))


# ------------------------------------------------------------------ L_cga by hand, through class_attention


def test_cga_loss_matches_a_hand_computed_case_through_class_attention():
    # z: 2 images, 2 channels of 2x2. C is linear, so Grad-CAM's alpha_k is the spatial mean of C's weights
    # for channel k: normal row alpha = (1, -1), anomalous row alpha = (0.5, 1) (uneven weights, same means).
    w_normal = [1, 1, 1, 1, -1, -1, -1, -1]
    w_anomalous = [0, 1, 0.5, 0.5, 2, 0, 1, 1]
    weight = torch.tensor([w_normal, w_anomalous], dtype=torch.float32)
    model = SimpleNamespace(
        classify=lambda z: z.flatten(1) @ weight.T, config=SimpleNamespace(gradcam_normalization="max")
    )
    z = torch.tensor(
        [
            [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]],
            [[[-1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]],
        ],
        requires_grad=True,
    )
    out = CavgaOutput(features=z, mu=z, logvar=torch.zeros_like(z), z=z, x_hat_logits=torch.zeros(2, 1, 2, 2))
    a_n = class_attention(model, out, NORMAL, create_graph=True)
    a_a = class_attention(model, out, ANOMALOUS, create_graph=True)
    # image 0: relu(k0 - k1) = [[1,1],[3,3]] / 3; relu(0.5 k0 + k1) = [[.5,2],[1.5,3]] / 3
    #   per image = 1 - mean(A_n) + mean(A_a) = 1 - 2/3 + 7/12 = 11/12
    # image 1: relu(k0 - k1) = [[0,0],[0,1]]; relu(0.5 k0 + k1) = [[.5,1],[1,2]] / 2
    #   per image = 1 - 1/4 + 9/16 = 21/16
    np.testing.assert_allclose(a_n[0, 0].detach(), [[1 / 3, 1 / 3], [1, 1]], rtol=1e-6)
    np.testing.assert_allclose(a_a[1, 0].detach(), [[0.25, 0.5], [0.5, 1]], rtol=1e-6)
    normal = torch.tensor([NORMAL, NORMAL])
    both_right = losses.complementary_guided_attention_loss(a_n, a_a, normal, normal)
    assert both_right.item() == pytest.approx((11 / 12 + 21 / 16) / 2, rel=1e-6)
    # The indicator: image 1 misclassified, or image 1 anomalous -> it adds zero but still counts in N = 2.
    misclassified = losses.complementary_guided_attention_loss(a_n, a_a, torch.tensor([NORMAL, ANOMALOUS]), normal)
    anomalous = losses.complementary_guided_attention_loss(a_n, a_a, normal, torch.tensor([NORMAL, ANOMALOUS]))
    assert misclassified.item() == pytest.approx(11 / 24, rel=1e-6)
    assert anomalous.item() == pytest.approx(11 / 24, rel=1e-6)
    # Differentiable: the loss reaches z through both maps.
    (grad,) = torch.autograd.grad(both_right, z)
    assert grad.abs().sum() > 0


def test_signed_class_maps_keep_a_gradient_where_the_paper_maps_meet_l_cga_trivially():
    # The collapse issue 14 measured: the anomalous class's evidence negative everywhere (0 after the ReLU) and
    # the normal class's flat (1 after max-normalization). The paper's L_cga is then exactly 0; the signed maps
    # keep the anomalous evidence's shape, so the loss stays above its bound (-1) and still moves z.
    weight = torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4])  # normal: channel 0; anomalous: channel 1
    model = SimpleNamespace(
        classify=lambda z: z.flatten(1) @ weight.T, config=SimpleNamespace(gradcam_normalization="max")
    )
    z = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-1.0, -1.0], [-1.0, -0.5]]]], requires_grad=True)
    out = CavgaOutput(features=z, mu=z, logvar=torch.zeros_like(z), z=z, x_hat_logits=torch.zeros(1, 1, 2, 2))
    labels = torch.tensor([NORMAL])
    paper = losses.complementary_guided_attention_loss(
        class_attention(model, out, NORMAL, create_graph=True),
        class_attention(model, out, ANOMALOUS, create_graph=True),
        labels,
        labels,
    )
    assert paper.item() == pytest.approx(0.0, abs=1e-6)
    a_n, a_a = signed_class_maps(model, out, NORMAL), signed_class_maps(model, out, ANOMALOUS)
    # by hand: A_n = 1 everywhere, A_a = cam_a / 1 = z's channel 1; per image mean(1 - 1 + A_a) = -3.5 / 4
    np.testing.assert_allclose(a_a[0, 0].detach(), [[-1.0, -1.0], [-1.0, -0.5]], rtol=1e-6)
    signed = losses.complementary_guided_attention_loss(a_n, a_a, labels, labels)
    assert signed.item() == pytest.approx(-3.5 / 4, rel=1e-6)
    (grad,) = torch.autograd.grad(signed, z)
    assert grad[0, 1].abs().sum() > 0


# ------------------------------------------------------------------ the indicator through the training step


def hand_signed_maps(model, z: torch.Tensor, cls: int) -> torch.Tensor:
    """Pre-ReLU Grad-CAM of class ``cls`` on z by hand: alpha_k = spatial mean of C's weights for channel k,
    cam = sum_k alpha_k z_k, divided by its largest magnitude per image."""
    alpha = model.classifier.weight[cls].detach().view(z.shape[1:]).mean(dim=(1, 2))
    cam = torch.einsum("k,bkhw->bhw", alpha, z.detach())
    return cam / cam.abs().flatten(1).amax(1).view(-1, 1, 1)


def expected_cga(model, batch, seed: int, cga_maps: str = "paper") -> float:
    """L_cga recomputed on a copy of the model with the same sampled z the step will draw."""
    twin = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    out = twin(batch.images, sample=True)
    predictions = twin.classify(out.z).argmax(1)
    if cga_maps == "paper":
        a_n = class_attention(twin, out, NORMAL, create_graph=False)
        a_a = class_attention(twin, out, ANOMALOUS, create_graph=False)
    else:
        a_n, a_a = hand_signed_maps(twin, out.z, NORMAL), hand_signed_maps(twin, out.z, ANOMALOUS)
    per_image = (1 - a_n + a_a).flatten(1).mean(1)
    keep = (predictions == NORMAL) & (batch.labels == NORMAL)
    return float(per_image[keep].sum()) / len(batch.labels)


@pytest.mark.parametrize("cga_maps", ["paper", "signed"])
@pytest.mark.parametrize("predicted", [NORMAL, ANOMALOUS])
def test_training_step_counts_only_correctly_classified_normal_images_in_cga(predicted, cga_maps):
    model = tiny_w_model().train()
    force_prediction(model, predicted)
    batch = batch_of([NORMAL, NORMAL, ANOMALOUS, ANOMALOUS])
    config = TrainConfig(batch_size=4, cga_maps=cga_maps)
    opt_g, opt_d = make_optimizers(model, config)
    expected = expected_cga(model, batch, seed=123, cga_maps=cga_maps)
    torch.manual_seed(123)
    terms = training_step(model, batch, opt_g, opt_d, config, class_weights_for(batch.labels.tolist()))
    if predicted == NORMAL:
        # the two normal images only, divided by all four
        assert expected != 0
        assert terms["L_cga"] == pytest.approx(expected, rel=1e-5)
    else:
        assert terms["L_cga"] == 0.0  # every normal image misclassified, every anomalous one excluded


def test_l_bce_is_the_class_balanced_mean_of_the_epoch():
    # Class weights n / (2 n_c) from the whole training set; one batch's L_bce is sum_i w_{y_i} CE_i / B.
    model = tiny_w_model().train()
    batch = batch_of([NORMAL, NORMAL, NORMAL, ANOMALOUS])
    weights = class_weights_for([NORMAL] * 9 + [ANOMALOUS])  # 10 / 18 and 10 / 2
    config = TrainConfig(batch_size=4, weights=LossWeights(w_r=0, w_adv=0, w_c=1, w_cga=0))
    twin = copy.deepcopy(model).train()
    torch.manual_seed(5)
    ce = torch.nn.functional.cross_entropy(
        twin.classify(twin(batch.images, sample=True).z), batch.labels, reduction="none"
    )
    expected = float((weights[batch.labels] * ce.detach()).sum() / 4)
    torch.manual_seed(5)
    terms = training_step(model, batch, *make_optimizers(model, config), config, weights)
    assert weights.tolist() == pytest.approx([10 / 18, 5.0])
    assert terms["L_bce"] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ gradient flow


def test_both_class_maps_carry_gradient_into_the_encoder():
    model = tiny_w_model().train()
    images = batch_of([NORMAL, NORMAL]).images
    encoder = [p for p in model.encoder.parameters()]
    for cls, term in ((NORMAL, lambda a: (1 - a).mean()), (ANOMALOUS, lambda a: a.mean())):
        out = model(images, sample=False)
        attention = class_attention(model, out, cls, create_graph=True)
        grads = torch.autograd.grad(term(attention), encoder + [model.classifier.weight], allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads[:-1] if g is not None) > 0, cls
        assert float(grads[-1].abs().sum()) > 0, cls  # and into C, through Grad-CAM's alpha
        detached = class_attention(model, model(images, sample=False), cls, create_graph=False)
        assert not detached.requires_grad


@pytest.mark.parametrize("w_cga", [0.0, 1.0])
def test_only_cga_moves_the_encoder_when_the_other_weights_are_zero(w_cga):
    model = tiny_w_model().train()
    force_prediction(model, NORMAL)
    batch = batch_of([NORMAL, NORMAL, NORMAL, ANOMALOUS])
    config = TrainConfig(batch_size=4, weights=LossWeights(w_r=0, w_adv=0, w_c=0, w_cga=w_cga))
    before = [p.detach().clone() for p in model.encoder.parameters()]
    training_step(model, batch, *make_optimizers(model, config), config, class_weights_for(batch.labels.tolist()))
    moved = any(not torch.equal(b, p) for b, p in zip(before, model.encoder.parameters(), strict=True))
    assert moved == (w_cga > 0)


# ------------------------------------------------------------------ inference


def test_inference_map_is_the_anomalous_grad_cam_only_where_c_says_anomalous():
    model = tiny_w_model().eval()
    images = batch_of([NORMAL, NORMAL]).images
    attention = class_attention(model, model(images, sample=False), ANOMALOUS, create_graph=False)[:, 0]
    force_prediction(model, ANOMALOUS)
    says_anomalous = infer_batch(model, images)
    assert (says_anomalous.raw_scores > 0.99).all()
    np.testing.assert_allclose(says_anomalous.anomaly_maps, attention.numpy(), atol=1e-6)
    assert (says_anomalous.anomaly_maps > 0.5).any()
    force_prediction(model, NORMAL)
    says_normal = infer_batch(model, images)
    p = says_normal.raw_scores[:, None, None]
    np.testing.assert_allclose(says_normal.anomaly_maps, attention.numpy() * p, atol=1e-6)
    assert not (says_normal.anomaly_maps > 0.5).any()  # no mask where C says normal


# ------------------------------------------------------------------ the weak-label protocol


def fake_test_split(n_normal: int = 10, n_anomalous: int = 100) -> AnomalyDataset:
    records = [Record(Path(f"good/{i}.png"), NORMAL, "good", f"good/{i}.png") for i in range(n_normal)]
    records += [Record(Path(f"crack/{i}.png"), ANOMALOUS, "crack", f"crack/{i}.png") for i in range(n_anomalous)]
    return AnomalyDataset(records)


def test_weak_sample_is_seeded_anomalous_and_sized():
    test = fake_test_split()
    a, b, other = (sample_weak_labels(test, 0.02, None, seed) for seed in (0, 0, 1))
    assert a == b and len(a) == 2
    assert a != other
    assert all(test.labels[i] == ANOMALOUS for i in a + other)
    assert len(sample_weak_labels(test, None, 7, 0)) == 7
    assert len(sample_weak_labels(test, 0.001, None, 0)) == 1  # at least one image
    with pytest.raises(ConfigError, match="anomalous_count"):
        sample_weak_labels(test, None, 101, 0)
    with pytest.raises(DataError, match="none"):
        sample_weak_labels(fake_test_split(n_anomalous=0), 0.02, None, 0)


def test_weak_training_set_keeps_labels_and_drops_masks(tmp_path):
    root = write_tiny_mvtec(tmp_path)
    splits = load_dataset(root, category="bottle")
    spots = [i for i, y in enumerate(splits.test.labels) if y == ANOMALOUS]
    assert splits.test[spots[0]].mask is not None  # the test image does have a mask ...
    train = weak_training_set(splits.train, splits.test.subset(spots[:2]))
    assert train.labels == [NORMAL] * len(splits.train) + [ANOMALOUS, ANOMALOUS]
    tail = [train[len(train) - 1], train[len(train) - 2]]
    assert all(s.mask is None and s.label == ANOMALOUS for s in tail)  # ... which training never sees


def test_weak_options_are_validated():
    with pytest.raises(ConfigError, match="setting 'w' only"):
        cavga.Cavga("D", "u", anomalous_count=2)
    with pytest.raises(ConfigError, match="at most one"):
        cavga.Cavga("D", "w", anomalous_count=2, anomalous_fraction=0.1)
    with pytest.raises(ConfigError, match="anomalous_fraction"):
        cavga.Cavga("D", "w", anomalous_fraction=0.0)
    with pytest.raises(ConfigError, match="anomalous_count"):
        cavga.Cavga("D", "w", anomalous_count=0)


@pytest.fixture(scope="module")
def fitted_w(tmp_path_factory):
    root = write_tiny_mvtec(tmp_path_factory.mktemp("mvtec"))
    detector = cavga.Cavga("D", "w", anomalous_count=2, **TINY).fit(root, category="bottle", progress=False)
    return root, detector


@pytest.mark.slow
def test_sampled_test_images_train_the_model_and_never_count_in_evaluation(fitted_w, tmp_path):
    root, detector = fitted_w
    spots = {os.path.realpath(p) for p in (root / "bottle/test/spot").glob("*.png")}
    excluded = set(detector.excluded_paths_)
    assert len(excluded) == 2 and excluded <= spots
    assert detector.data_info_["weak_labels"]["n_anomalous"] == 2
    # 12 normal training images minus the calibration slice, the 2 labelled anomalous ones (augmented copies to
    # about 10 % of the normal count: round(11 / 9 / 2) = 1 copy each) and round(0.1 * 11) = 1 synthesized
    weak = detector.data_info_["weak_labels"]
    assert detector.data_info_["n_calibration"] == 1
    assert (weak["n_labelled_examples"], weak["n_synthetic"]) == (2, 1)
    assert detector.data_info_["n_train"] == 12 - 1 + 2 + 1
    result = detector.evaluate(root, category="bottle")
    assert result["n_images"] == 4 and result["n_excluded"] == 2  # 3 good + 3 spot - 2 used for training
    evaluated = {os.path.realpath(p) for p in detector.last_outputs_.paths}
    assert not evaluated & excluded
    # Another spelling of the same folder (a symlink) must not let them back in.
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    assert detector.evaluate(link, category="bottle")["n_images"] == 4


@pytest.fixture(scope="module")
def fitted_u(fitted_w):
    root, _ = fitted_w
    return root, cavga.Cavga("D", "u", **TINY).fit(root, category="bottle", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["u", "w"])
def test_predict_and_evaluate_read_the_same_for_both_settings(which, fitted_u, fitted_w):
    """For either setting, predict() on the evaluated images gives exactly evaluate()'s scores, maps and labels."""
    root, detector = fitted_u if which == "u" else fitted_w
    assert detector.model_config.setting == which
    result = detector.evaluate(root, category="bottle")
    outputs = detector.last_outputs_
    predictions = detector.predict(outputs.paths)
    scores = detector.calibration_.normalize(outputs.raw_scores)
    np.testing.assert_array_equal([p.pred_score for p in predictions], scores)
    np.testing.assert_array_equal([p.raw_score for p in predictions], outputs.raw_scores)
    np.testing.assert_array_equal(np.stack([p.anomaly_map for p in predictions]), outputs.anomaly_maps)
    labels = np.array([p.pred_label for p in predictions])
    np.testing.assert_array_equal(labels, scores > 0.5)
    truth = outputs.labels
    balanced = np.mean([np.mean(labels[truth == c] == c) for c in (NORMAL, ANOMALOUS)])
    assert result["balanced_accuracy"] == pytest.approx(balanced)
    for p in predictions:
        np.testing.assert_array_equal(p.pred_mask, p.anomaly_map > 0.5)
        if which == "w":
            # C's probability, calibrated on held-out normal images as every score is
            assert p.pred_score == pytest.approx(detector.calibration_.normalize(np.array([p.raw_score]))[0])
            if p.pred_label == NORMAL:
                assert not p.pred_mask.any()  # C says normal: no anomalous pixel either


@pytest.mark.slow
def test_save_load_keeps_the_exclusion(fitted_w, tmp_path):
    root, detector = fitted_w
    before = detector.evaluate(root, category="bottle")
    detector.save(tmp_path / "model")
    config = json.loads((tmp_path / "model/config.json").read_text())
    assert sorted(config["excluded_paths"]) == sorted(detector.excluded_paths_)
    assert config["weak_supervision"]["anomalous_count"] == 2
    loaded = cavga.load(tmp_path / "model")
    assert loaded.excluded_paths_ == detector.excluded_paths_
    after = loaded.evaluate(root, category="bottle")
    assert after == before and after["n_images"] == 4


@pytest.mark.slow
def test_a_labelled_folder_gives_the_weak_labels_and_is_kept_out_of_evaluation(tmp_path):
    root = write_tiny_mvtec(tmp_path / "data")
    spot_dir = root / "bottle/test/spot"  # the user points at a test folder: those images must not count
    detector = cavga.Cavga("D", "w", anomalous_dir=spot_dir, **TINY).fit(root, category="bottle", progress=False)
    weak = detector.data_info_["weak_labels"]
    assert weak["source"] == "dir" and weak["n_anomalous"] == 3
    assert detector.evaluate(root, category="bottle")["n_images"] == 3


# ------------------------------------------------------------------ the command line


@pytest.mark.slow
def test_cli_trains_evaluates_and_predicts_with_weak_labels(tmp_path, capsys):
    root = write_tiny_mvtec(tmp_path / "data")
    model_dir, eval_dir, pred_dir = tmp_path / "model", tmp_path / "eval", tmp_path / "pred"
    tiny = ["--variant", "D"]
    tiny += ["--image-size", "32", "--width", "8", "--latent-channels", "8", "--epochs", "1", "--batch-size", "4"]
    args = ["train", str(root), "--category", "bottle", "--out", str(model_dir), "--setting", "w"]
    assert main([*args, "--anomalous-count", "2", *tiny, "--device", "cpu", "--no-progress"]) == 0
    assert "2 anomalous image(s)" in capsys.readouterr().out
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"]["setting"] == "w" and len(config["excluded_paths"]) == 2
    assert main(["evaluate", str(model_dir), str(root), "--category", "bottle", "--out", str(eval_dir)]) == 0
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["n_images"] == 4
    assert main(["predict", str(model_dir), str(root / "bottle/test/good"), "--out", str(pred_dir)]) == 0
    assert len((pred_dir / "predictions.jsonl").read_text().splitlines()) == 3
    # setting u with a weak-label option is refused with a message; two options at once by argparse
    assert main(["train", str(root), "--out", str(tmp_path / "m2"), "--anomalous-count", "2"]) == 2
    assert "setting 'w' only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--anomalous-count", "2", "--anomalous-fraction", "0.1"])


# ------------------------------------------------------------------ the classifier refit (beyond the paper)


def test_fold_standardization_gives_the_same_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, 2, 2, generator=g)
    shift, scale = torch.randn(1, 3, 1, 1, generator=g), torch.rand(1, 3, 1, 1, generator=g) + 0.5
    weight, bias = torch.randn(2, 12, generator=g), torch.randn(2, generator=g)
    expected = ((z - shift) / scale).flatten(1) @ weight.T + bias
    folded_w, folded_b = fold_standardization(weight, bias, shift.expand(1, 3, 2, 2), scale.expand(1, 3, 2, 2))
    torch.testing.assert_close(z.flatten(1) @ folded_w.T + folded_b, expected)


@pytest.mark.parametrize("flat", [False, True])
def test_refit_classifier_separates_the_training_examples_and_keeps_the_closed_form_cam(flat):
    torch.manual_seed(0)
    extra = {"flatten_latent": True, "flat_latent_dim": 12} if flat else {}
    model = build_model(
        ModelConfig(variant="D", image_size=32, channels=3, width=8, latent_channels=8, setting="w", **extra)
    ).eval()
    # Normal examples dark, anomalous ones with a bright square: separable in z for a linear C.
    g = torch.Generator().manual_seed(1)
    images = torch.rand(24, 3, 32, 32, generator=g) * 0.3
    labels = [NORMAL] * 16 + [ANOMALOUS] * 8
    for i in range(16, 24):
        images[i, :, 8:20, 8:20] = 1.0
    samples = [Sample(img, None, y, "x", f"{i}.png") for i, (img, y) in enumerate(zip(images, labels, strict=True))]
    before = model.classify(model(images, sample=False).mu).argmax(1)
    info = refit_classifier(model, samples, steps=200, seed=0)
    assert info["n_normal"] == 16 and info["n_anomalous"] == 8
    with torch.no_grad():
        out = model(images, sample=False)
        predicted = model.classify(out.z).argmax(1)
    assert predicted.tolist() == labels and before.tolist() != labels
    if flat:
        return
    # The refit changes only C's weights: its Grad-CAM's closed form still equals autograd's.
    closed = class_attention(model, out, ANOMALOUS, create_graph=False)
    z = out.z.detach().requires_grad_(True)
    auto = grad_cam(model.classify(z)[:, ANOMALOUS], z, output_size=(32, 32), create_graph=False)
    torch.testing.assert_close(closed, auto, atol=1e-5, rtol=1e-4)


def test_refit_classifier_refuses_examples_of_one_class():
    model = tiny_w_model()
    samples = [Sample(torch.rand(3, 32, 32), None, NORMAL, "good", f"{i}.png") for i in range(4)]
    with pytest.raises(ConfigError, match="normal and anomalous"):
        refit_classifier(model, samples, steps=5, seed=0)


def _fitted_gaussian_w_model(images: torch.Tensor, labels: list[int]):
    model = tiny_w_model().eval()
    with torch.no_grad():
        mu = model(images[[i for i, y in enumerate(labels) if y == NORMAL]], sample=False).mu
    model.latent_gaussian.fit([mu], neighbourhood=1)
    return model


def _bright_square_examples(n_normal: int = 16, n_anomalous: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_normal + n_anomalous, 3, 32, 32, generator=g) * 0.3
    labels = [NORMAL] * n_normal + [ANOMALOUS] * n_anomalous
    for i in range(n_normal, n_normal + n_anomalous):
        top, left = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
        images[i, :, top : top + 8, left : left + 8] = 1.0
    samples = [Sample(img, None, y, "x", f"{i}.png") for i, (img, y) in enumerate(zip(images, labels, strict=True))]
    return images, labels, samples


def test_deviation_classifier_inputs_are_the_deviation_from_the_gaussian():
    images, labels, _ = _bright_square_examples()
    model = _fitted_gaussian_w_model(images, labels)
    head, gaussian = model.deviation_classifier, model.latent_gaussian
    with torch.no_grad():
        mu = model(images[:3], sample=False).mu
        inputs = head.inputs(mu, gaussian)
    c, h, w = mu.shape[1:]
    mean = gaussian.mean.T.reshape(1, c, h, w)
    torch.testing.assert_close(inputs[:, :c], mu - mean)
    torch.testing.assert_close(inputs[:, c : 2 * c], (mu - mean) ** 2)
    # The last input is the Mahalanobis distance, by hand at one position.
    p = 5
    d = (mu[0].flatten(1)[:, p] - gaussian.mean[p]).double()
    expected = torch.sqrt(d @ gaussian.precision[p].double() @ d)
    assert float(inputs[0, -1].flatten()[p]) == pytest.approx(float(expected), rel=1e-4)


def test_deviation_classifier_learns_the_labelled_examples_and_top_mean_is_the_image_logit():
    images, labels, samples = _bright_square_examples()
    model = _fitted_gaussian_w_model(images, labels)
    info = fit_deviation_classifier(model, samples, steps=200, seed=0)
    assert info["n_anomalous"] == 8 and model.deviation_classifier.fitted
    with torch.no_grad():
        positions = model.deviation_classifier(model(images, sample=False).mu, model.latent_gaussian)
    logits = top_mean_logit(positions)
    k = max(1, round(0.02 * positions[0].numel()))
    torch.testing.assert_close(logits, positions.flatten(1).sort(1, descending=True).values[:, :k].mean(1))
    truth = np.array(labels)
    assert roc_auc_score(truth, logits.numpy()) == 1.0


def test_knn_classifier_weights_the_memory_distance_by_half_one_plus_the_probability_worked_by_hand():
    from cavga.engine import maps

    images, labels, _ = _bright_square_examples()
    model = _fitted_gaussian_w_model(images, labels)
    x = images[:3]
    with torch.no_grad():
        out = model(x, sample=False)
        with pytest.raises(ConfigError, match="knn_classifier"):  # the classifier and the memory not yet fitted
            maps.knn_classifier(model, out, x, x)
        # The memory holds the zero vector (and one far away): each position's distance is ||mu_p||.
        memory = model.latent_memory
        memory.bank.zero_()
        memory.bank[1] = 1e6
        memory.n_vectors.fill_(2)
        # A classifier of weight 0 and bias b gives the probability sigmoid(b) at every position.
        head = model.deviation_classifier
        head.conv.weight.zero_()
        head.n_examples.fill_(1)
        distance = maps.upsampled_blur(out.mu.norm(dim=1, keepdim=True), (x.shape[-2], x.shape[-1]))
        for bias, factor in ((0.0, 0.75), (50.0, 1.0), (-50.0, 0.5)):  # (1 + sigmoid(b)) / 2 by hand
            head.conv.bias.fill_(bias)
            got = maps.knn_classifier(model, out, x, x)
            torch.testing.assert_close(got, distance * factor, rtol=1e-4, atol=1e-4)


class _Images(torch.utils.data.Dataset):
    """Images in memory, as a dataset of Samples (all normal unless ``labels`` says)."""

    def __init__(self, images: torch.Tensor, labels: list[int] | None = None) -> None:
        self.images, self.labels = images, labels or [NORMAL] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.images[i], None, self.labels[i], "good", f"image/{i}.png")


def _knn_classifier_model():
    """A w model with its Gaussian fitted, the memory filled from 12 normal images, and a constant classifier
    (weight 0, bias 1: every position's weight (1 + sigmoid(1)) / 2); the 12 images, 4 held-out ones, and all."""
    from cavga.engine.infer import fit_latent_memory

    images, labels, _ = _bright_square_examples()
    model = _fitted_gaussian_w_model(images, labels)
    normals = images[[i for i, y in enumerate(labels) if y == NORMAL]]
    train, held = _Images(normals[:12]), _Images(normals[12:])
    fit_latent_memory(model, train, seed=0)
    head = model.deviation_classifier
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.fill_(1.0)
    head.n_examples.fill_(1)
    return model, train, held, (images, labels)


def test_knn_classifier_calibrates_on_left_out_memory_scores_weighted_by_cross_fitted_weights():
    """knn_classifier's threshold reads the memory's own images without their own rows (as latent_knn's does),
    each distance multiplied by the image's given weights; without weights, the held-out slice alone."""
    from cavga.engine.infer import calibrate, left_out_memory_scores

    model, train, held, _ = _knn_classifier_model()
    plain = left_out_memory_scores(model, train)
    factor = (1.0 + 1.0 / (1.0 + np.exp(-1.0))) / 2.0  # (1 + sigmoid(1)) / 2 by hand
    weights = torch.full((12, 1, 4, 4), factor)
    weights[3] = 0.5  # one image's own weight: its score alone halves
    weighted = left_out_memory_scores(model, train, weights=weights)
    expected_left_out = plain * factor
    expected_left_out[3] = plain[3] * 0.5
    np.testing.assert_allclose(weighted, expected_left_out, rtol=1e-5)
    assert (plain > 0).all()  # no image finds its own rows
    choice = MapChoice("knn_classifier", "map_max")
    held_scores = np.asarray(infer_batch(model, held.images, choice=choice).raw_scores)
    calibration = calibrate(model, held, choice=choice, training_normals=train, memory_weights=weights)
    assert calibration.n_images == 16 and calibration.map_threshold == calibration.score_threshold
    expected = np.quantile(np.concatenate([weighted, held_scores]), 0.95)
    np.testing.assert_allclose(calibration.score_threshold, expected, rtol=1e-5)
    slice_only = calibrate(model, held, choice=choice, training_normals=train)  # no weights: not the in-sample ones
    assert slice_only.n_images == 4
    np.testing.assert_allclose(slice_only.score_threshold, np.quantile(held_scores, 0.95), rtol=1e-5)


def test_cross_fitted_classifier_weights_leave_each_normal_image_out_of_its_own_classifier():
    """Image i's weight comes from a classifier fitted without fold i mod 5: replacing image 0 leaves the weights
    of the other images of its fold exactly as they were and moves those of the other folds (whose classifiers
    read it); the model's own classifier is untouched; examples that do not start with the normal images are
    refused; fewer than two normal images a fold give none (the calibration then takes the held-out slice)."""
    from cavga.engine.classifier import cross_fitted_classifier_weights, fit_deviation_classifier

    model, _, _, (images, labels) = _knn_classifier_model()
    examples = _Images(images, labels)  # 16 normal images first, then 8 anomalous ones
    fit_deviation_classifier(model, examples, steps=40, seed=0)
    own = {k: v.clone() for k, v in model.deviation_classifier.state_dict().items()}
    weights = cross_fitted_classifier_weights(model, examples, 16, steps=40, seed=0)
    assert weights.shape == (16, 1, 4, 4) and bool(((weights >= 0.5) & (weights <= 1.0)).all())
    for key, value in model.deviation_classifier.state_dict().items():
        assert torch.equal(value, own[key]), key
    changed = images.clone()
    changed[0] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(9))
    again = cross_fitted_classifier_weights(model, _Images(changed, labels), 16, steps=40, seed=0)
    fold0 = [5, 10, 15]  # image 0's fold, itself aside
    torch.testing.assert_close(again[fold0], weights[fold0], rtol=0, atol=0)
    others = [i for i in range(1, 16) if i % 5]
    assert (again[others] - weights[others]).abs().max() > 1e-6
    with pytest.raises(ConfigError, match="first 17 examples normal"):
        cross_fitted_classifier_weights(model, examples, 17, steps=1, seed=0)
    assert cross_fitted_classifier_weights(model, examples, 9, steps=1, seed=0) is None  # under 2 a fold: none


def test_an_unfitted_deviation_classifier_map_is_refused():
    model = tiny_w_model().eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="deviation classifier"):
        infer_batch(model, x, choice=MapChoice("deviation_classifier", "map_max"))


@pytest.mark.slow
def test_a_labelled_tiles_other_exposures_never_count_in_evaluation(tmp_path, image_writer, caplog):
    """Magnetic Tile layout, two defective tiles of three exposures each: the one labelled image takes its tile's
    two other exposures out of every evaluation with it; the other tile's three images stay."""
    empty = np.zeros((32, 32), dtype=np.uint8)

    def pair(folder: str, name: str, seed: int) -> None:
        image_writer(tmp_path / f"MT_{folder}" / "Imgs" / f"{name}.jpg", (32, 32), mode="L", seed=seed)
        Image.fromarray(empty).save(tmp_path / f"MT_{folder}" / "Imgs" / f"{name}.png")

    for t in range(5):
        for e in (1, 2, 3):
            pair("Free", f"exp{e}_num_{1000 * t + e}", seed=10 * t + e)
    crack = {t: [f"exp{e}_num_{1000 * t + e}" for e in (1, 2, 3)] for t in (0, 1)}
    for t, names in crack.items():
        for e, name in enumerate(names):
            pair("Crack", name, seed=100 + 10 * t + e)
    detector = cavga.Cavga("D", "w", anomalous_count=1, **TINY).fit(tmp_path, progress=False, test_fraction=0.4)
    excluded = {Path(p).stem for p in detector.excluded_paths_}
    assert excluded in [set(names) for names in crack.values()]
    tile = sorted(excluded)
    assert detector.data_info_["weak_labels"]["n_excluded_twins"] == 2
    result = detector.evaluate(tmp_path, test_fraction=0.4)
    assert result["n_excluded"] == 3
    evaluated = {Path(p).stem for p in detector.last_outputs_.paths}
    assert not evaluated & excluded and set(crack[0] + crack[1]) - evaluated == set(tile)
    assert "evaluated on the split" not in caplog.text
    # Another split of the same data: images the model was trained on may be test images there.
    detector.evaluate(tmp_path, test_fraction=0.4, split="image")
    assert "'by': 'tile'} of" in caplog.text and "evaluated on the split {'test_fraction': 0.4" in caplog.text
