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


# --------------------------------------------------------------------------- benchmarks/speed.py --quick


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_speed_benchmark_quick_writes_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["threads"] == 1
    assert isinstance(record["torch"], str) and isinstance(record["onnxruntime"], str)
    peak = record["matmul_peak"]
    assert _positive(peak["gflops"]) and peak["q1"] <= peak["gflops"] <= peak["q3"]
    names = [c["name"] for c in record["configs"]]
    assert names == ["CAVGA-D_u 32 px", "CAVGA-D_w 32 px", "CAVGA-R_u 64 px"]
    for c in record["configs"]:
        assert "error" not in c, c.get("error")
        assert set(c["train"]) == {"full", "no_cam", "before", "channels_last", "bf16"} - {
            n.split()[1] for n in c["notes"] if n.startswith("train ")
        }
        assert {"eager", "before", "naive", "onnx"} <= set(c["infer"])
        for summary in [*c["train"].values(), *c["infer"].values()]:
            assert _positive(summary["images_per_s"]) and summary["q1"] <= summary["images_per_s"] <= summary["q3"]
            assert summary["n"] >= 2
        flops = c["flops_per_image"]
        assert all(_positive(flops[k]) for k in ("train", "infer", "train_before"))
        # Training does a forward, a backward and D's passes: more work per image than inference.
        assert flops["train"] > flops["infer"]
        # Achieved GFLOP/s = FLOPs per image x images/s, recomputed here.
        expected = flops["train"] * c["train"]["full"]["images_per_s"] / 1e9
        assert c["train_gflops"] == pytest.approx(expected, rel=1e-9)
        assert c["train_peak_fraction"] == pytest.approx(expected / peak["gflops"], rel=1e-9)
        assert _positive(c["peak_rss_mib"]) and 50 < c["peak_rss_mib"] < 64 * 1024
        for key in ("gradcam_overhead", "train_speedup_vs_before", "infer_vs_naive", "onnx_vs_eager"):
            assert _positive(c["ratios"][key]), key
        no_cam, full = c["train"]["no_cam"]["images_per_s"], c["train"]["full"]["images_per_s"]
        assert c["ratios"]["gradcam_overhead"] == pytest.approx(no_cam / full, rel=1e-9)
    # The printed Markdown tables: a header and one row per configuration, in both tables.
    lines = done.stdout.splitlines()
    assert any(line.startswith("| config | train img/s |") for line in lines)
    assert any(line.startswith("| config | Grad-CAM overhead") for line in lines)
    for name in names:
        rows = [line for line in lines if line.startswith(f"| {name} |")]
        assert len(rows) == 2, name
        assert rows[0].count("|") == 9 and rows[1].count("|") == 9
    assert f"wrote {out}" in done.stdout
