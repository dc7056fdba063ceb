"""benchmarks/speed.py --quick (JSON schema and table) and the speed optimizations keeping results equal.

The optimizations: closed-form Grad-CAM weights at inference and in training (no double backward), inference
mode for the whole batch, and no discriminator weight gradients in the generator's backward. Each is checked
against the autograd path it replaces (``closed_form_weights`` forced to None, ``_frozen`` a no-op).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import Batch
from cavga.engine import train
from cavga.engine.infer import infer_batch
from cavga.model.gradcam import attention_map, class_attention, grad_cam, target_score
from cavga.model.networks import build_model

ROOT = Path(__file__).resolve().parents[1]


def _config(**kw) -> ModelConfig:
    base = {"variant": "D", "image_size": 32, "width": 8, "latent_channels": 8, "latent_stride": 8}
    return ModelConfig(**{**base, **kw})


def _load_speed_script():
    spec = importlib.util.spec_from_file_location("cavga_speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The benchmark's "before" switch restores the code paths the optimizations replaced; the tests use the same one.
_autograd_gradcam = _load_speed_script().before_optimizations


# --------------------------------------------------------------------------- results equal


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("target", ["sum_mu", "sum_z"])
@pytest.mark.parametrize("normalization", ["max", "minmax"])
def test_closed_form_attention_equals_autograd_gradcam(flat: bool, target: str, normalization: str) -> None:
    torch.manual_seed(0)
    cfg = _config(flatten_latent=flat, gradcam_target=target, gradcam_normalization=normalization)
    model = build_model(cfg).eval()
    x = torch.rand(3, 3, 32, 32)
    got, out = attention_map(model, x)
    assert not out.features.requires_grad  # one forward without autograd
    # Independent reference: hooks-free autograd Grad-CAM on a forward with gradients.
    ref_out = model(x, sample=False)
    expected = grad_cam(
        target_score(ref_out, target), ref_out.features, (32, 32), normalization, create_graph=False
    ).detach()
    assert got.shape == expected.shape == (3, 1, 32, 32)
    assert (got - expected).abs().max() <= 1e-5
    assert expected.amax() > 0.99  # a non-trivial map (max-normalized)


@pytest.mark.parametrize("flat", [False, True])
def test_closed_form_class_attention_equals_autograd(flat: bool) -> None:
    torch.manual_seed(0)
    model = build_model(_config(flatten_latent=flat, setting="w")).eval()
    x = torch.rand(3, 3, 32, 32)
    for cls in (0, 1):
        got = class_attention(model, model(x, sample=False), cls, create_graph=False)
        with _autograd_gradcam():
            expected = class_attention(model, model(x, sample=False), cls, create_graph=False)
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("setting", ["u", "w"])
def test_infer_batch_equals_autograd_path(setting: str) -> None:
    torch.manual_seed(0)
    model = build_model(_config(setting=setting))
    x = torch.rand(4, 3, 32, 32)
    fast = infer_batch(model, x)
    with _autograd_gradcam():
        slow = infer_batch(model, x)
    for name in ("raw_scores", "anomaly_maps", "reconstructions", "residual_maps"):
        assert abs(getattr(fast, name) - getattr(slow, name)).max() <= 1e-5, name


@pytest.mark.parametrize("setting", ["u", "w"])
@pytest.mark.parametrize("flat", [False, True])
def test_training_step_equals_double_backward_step(setting: str, flat: bool) -> None:
    torch.manual_seed(0)
    model = build_model(_config(flatten_latent=flat, setting=setting)).train()
    config = TrainConfig()
    config.weights.w_ae = config.weights.w_cga = 1.0  # make the attention terms weigh in the update
    labels = torch.tensor([0, 0, 0, 1] if setting == "w" else [0, 0, 0, 0])
    images, masks, has_mask = torch.rand(4, 3, 32, 32), torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.bool)
    batch = Batch(images, masks, has_mask, labels, ["good"] * 4, [f"{i}.png" for i in range(4)])
    weights = torch.tensor([0.6, 2.0]) if setting == "w" else None
    results = []
    for optimized in (True, False):
        twin = copy.deepcopy(model)
        opt_g, opt_d = train.make_optimizers(twin, config)
        torch.manual_seed(1)
        with contextlib.nullcontext() if optimized else _autograd_gradcam():
            terms = [train.training_step(twin, batch, opt_g, opt_d, config, weights, s) for s in range(2)]
        results.append((terms, twin.state_dict()))
    (fast_terms, fast_state), (slow_terms, slow_state) = results
    for a, b in zip(fast_terms, slow_terms, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    moved = 0
    for name, value in fast_state.items():
        torch.testing.assert_close(value, slow_state[name], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(value, model.state_dict()[name]))
    assert moved > 0


# --------------------------------------------------------------------------- FLOP count against a hand count


def _count_flops(fn) -> int:
    return _load_speed_script().count_flops(fn)


@pytest.mark.parametrize("transposed", [False, True])
def test_flop_count_of_a_conv_training_step_equals_the_hand_count(transposed: bool) -> None:
    # One layer, batch N, C_in -> C_out, k x k, stride 2. Multiply-adds of the forward: a conv computes
    # N * C_out * H_out * W_out outputs of C_in * k * k products each; a transposed conv scatters each of its
    # N * C_in * H_in * W_in inputs into C_out * k * k outputs. The input gradient (a conv of the output gradient
    # with the same weights) and the weight gradient (a correlation of input and output gradient) each repeat
    # exactly that set of products. 2 FLOP per multiply-add.
    n, c_in, c_out, k, side = 3, 5, 7, 4, 12
    layer = (torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d)(c_in, c_out, k, 2, 1, bias=False)
    x = torch.rand(n, c_in, side, side, requires_grad=True)
    positions = side * side if transposed else (side // 2) ** 2  # where the products are indexed
    per_pass = 2 * n * c_in * c_out * k * k * positions
    assert _count_flops(lambda: layer(x)) == per_pass
    assert _count_flops(lambda: layer(x).sum().backward()) == 3 * per_pass  # forward, input grad, weight grad
    frozen_input = x.detach()  # no input gradient asked for: forward and weight gradient only
    assert _count_flops(lambda: layer(frozen_input).sum().backward()) == 2 * per_pass


def test_flop_count_of_a_training_step_sums_its_layers() -> None:
    # The benchmark's count of one CAVGA-D training step, against a count built from the layers by hand: every
    # conv of encoder, heads, decoder and discriminator, with the passes the step runs.
    speed = _load_speed_script()
    spec = {"variant": "D", "size": 32, "width": 8, "setting": "u", "options": {"latent_channels": 8}}
    model = speed.build(spec)
    b = 4
    batch = speed._batch(torch.rand(b, 3, 32, 32), "u")
    counted = _count_flops(speed._trainer(model, "u", batch, "no_cam"))

    def conv(c_in, c_out, k, positions):
        return 2 * b * c_in * c_out * k * k * positions

    # Encoder 3 -> 8 -> 16 -> 32 (4x4 stride 2: 16^2, 8^2, 4^2 outputs), mu and logvar 1x1 heads (32 -> 8, 4^2),
    # decoder 8 -> 16 -> 8 -> 3 (transposed 4x4 stride 2, 4^2, 8^2, 16^2 inputs).
    encoder = [conv(3, 8, 4, 256), conv(8, 16, 4, 64), conv(16, 32, 4, 16)]
    heads = [conv(32, 8, 1, 16)] * 2
    decoder = [conv(8, 16, 4, 16), conv(16, 8, 4, 64), conv(8, 3, 4, 256)]
    # Discriminator on 32 px: 3 -> 8 -> 16 -> 32 (16^2, 8^2, 4^2 outputs), then a 4x4 conv to one logit.
    disc = [conv(3, 8, 4, 256), conv(8, 16, 4, 64), conv(16, 32, 4, 16), conv(32, 1, 4, 1)]
    generator = sum(encoder) + sum(heads) + sum(decoder)
    # Generator update: G forward; D forward on x_hat and its input gradient (D's weights frozen there); G
    # backward: weight gradients everywhere, input gradients everywhere but the first encoder layer.
    g_update = generator + 2 * sum(disc) + generator + (generator - encoder[0])
    # Discriminator update: D on real and on detached fake images, forward, weight gradients, and input gradients
    # of every layer but the first (the images need none; the inner layers pass them on to earlier weights).
    d_update = 2 * (sum(disc) + sum(disc) + (sum(disc) - disc[0]))
    assert counted == g_update + d_update


# --------------------------------------------------------------------------- benchmarks/speed.py --quick


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_speed_benchmark_quick_writes_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["threads"] == 1
    assert isinstance(record["torch"], str) and isinstance(record["onnxruntime"], str)
    limits = record["limits"]
    for dtype in ("float32", "bfloat16"):
        kernels = limits[dtype]["kernels_gflops"]
        assert set(kernels) == {"matmul", "conv3x3", "depthwise3x3"} and all(map(_positive, kernels.values()))
        # The peak is the larger of the best kernel and the FMA width x clock (when the width is known).
        width = limits[dtype]["fma_width_x_clock_gflops"]
        assert limits[dtype]["peak_gflops"] == max(max(kernels.values()), width or 0.0)
    names = [c["name"] for c in record["configs"]]
    assert names == ["CAVGA-D_u 32 px", "CAVGA-L_u 64 px", "PaDiM-style 64 px"]
    assert "skipped" in record["anomalib"]  # never timed in --quick
    for c in record["configs"]:
        assert "error" not in c, c.get("error")
        expected_train = {"full"} if c["kind"] == "padim" else {"full", "no_cam"}
        expected_infer = {"eager", "onnx"} if c["kind"] == "padim" else {"eager", "plain", "onnx"}
        if c.get("paper"):
            expected_train |= {"before", "channels_last"}
            expected_infer |= {"before", "naive", "channels_last"}
        assert expected_train <= set(c["train"]) and expected_infer <= set(c["infer"])
        for summary in [*c["train"].values(), *c["infer"].values()]:
            assert _positive(summary["images_per_s"]) and summary["q1"] <= summary["images_per_s"] <= summary["q3"]
            assert summary["n"] >= 2
        for latency in c["latency"].values():
            assert _positive(latency["median_ms"]) and latency["q1_ms"] <= latency["median_ms"] <= latency["q3_ms"]
        assert {"eager", "onnx"} <= set(c["latency"])
        flops = c["flops_per_image"]
        assert _positive(flops["train"]) and _positive(flops["infer"])
        # Achieved GFLOP/s = FLOPs per image x images/s, recomputed here, and never above the peak.
        for phase, variant in (("train", "full"), ("infer", "eager")):
            expected = flops[phase] * c[phase][variant]["images_per_s"] / 1e9
            assert c[f"{phase}_gflops"] == pytest.approx(expected, rel=1e-9)
            assert c[f"{phase}_peak_fraction"] == pytest.approx(expected / limits["float32"]["peak_gflops"], rel=1e-9)
            assert 0 < c[f"{phase}_peak_fraction"] <= 1.0
        assert _positive(c["peak_rss_mib"]) and 50 < c["peak_rss_mib"] < 64 * 1024
        if c["kind"] == "cavga":
            assert flops["train"] >= flops["train_plain"]
            amap = c.get("options", {}).get("anomaly_map", "trunk_knn")
            if amap in ("latent_knn", "trunk_knn") and c["variant"] == "L":
                # Inference compares every latent position with the memory's rows (16384 x C_z for latent_knn,
                # 8192 x 176 for trunk_knn, a multiply-add each): at least that many FLOPs, which training (no
                # memory) does not do.
                positions = (c["size"] // 8) ** 2
                rows = 16384 * 64 if amap == "latent_knn" else 8192 * 176
                assert flops["infer"] >= 2 * positions * rows
            else:  # training does a forward, a backward and D's passes: more work per image than inference
                assert flops["train"] > flops["infer"]
            q = c["ratios"]
            assert q["train_map_overhead"] == pytest.approx(
                c["train"]["no_cam"]["images_per_s"] / c["train"]["full"]["images_per_s"], rel=1e-9
            )
            assert q["onnx_vs_eager_batch1"] == pytest.approx(
                c["latency"]["eager"]["median_ms"] / c["latency"]["onnx"]["median_ms"], rel=1e-9
            )
    assert [t["key"] for t in record["targets"]] == [
        "latency_vs_anomalib_padim", "infer_map_overhead", "onnx_vs_eager_batch1", "train_map_overhead"
    ]  # fmt: skip
    assert record["targets"][0]["met"] is None  # no peer in --quick
    # The printed Markdown tables: a header and one row per configuration in the first, CAVGA rows in the second.
    lines = done.stdout.splitlines()
    assert any(line.startswith("| config | train img/s") for line in lines)
    assert any(line.startswith("| config | train map overhead") for line in lines)
    for name in names:
        rows = [line for line in lines if line.startswith(f"| {name} |")]
        assert len(rows) == (1 if name.startswith("PaDiM") else 2), name
        assert all(row.count("|") == 9 for row in rows)
    assert f"wrote {out}" in done.stdout
