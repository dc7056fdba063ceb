"""benchmarks/anomalib_accuracy.py: the key mapping from cavga's Lite0 to timm's efficientnet_lite0, the loading
and photo verdict around it, the float16 maps, and the table's verdict and resume on rows made up by hand; none of
it needs anomalib (timm's own key list is read from anomalib's venv where there is one)."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark
from cavga.model.efficientnet_lite import STAGES, STRIDE_END_BLOCK, EfficientNetLite0

ANOMALIB_PYTHON = Path(__file__).resolve().parents[1] / ".venv-anomalib" / "bin" / "python"


@pytest.fixture(scope="module")
def script():
    return load_benchmark("anomalib_accuracy")


# ---------------------------------------------------------------- the key mapping
def test_hand_picked_keys_land_on_timms_names(script):
    assert script.STAGE_REPEATS == tuple(stage[0] for stage in STAGES)
    cases = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_mean": "bn1.running_mean",
        # block 0 (expansion 1): timm's DepthwiseSeparableConv, whose pointwise conv is conv_pw and its BN bn2
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn1.bias": "blocks.0.0.bn1.bias",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.num_batches_tracked": "blocks.0.0.bn2.num_batches_tracked",
        # later blocks: InvertedResidual, conv_pw / bn1 expand, conv_dw / bn2, conv_pwl / bn3 project
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn0.weight": "blocks.1.0.bn1.weight",
        "_blocks.2._bn1.running_var": "blocks.1.1.bn2.running_var",
        "_blocks.4._project_conv.weight": "blocks.2.1.conv_pwl.weight",
        "_blocks.10._bn2.bias": "blocks.4.2.bn3.bias",
        "_blocks.11._depthwise_conv.weight": "blocks.5.0.conv_dw.weight",
        "_blocks.15._bn2.weight": "blocks.6.0.bn3.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.running_mean": "bn2.running_mean",
        "_fc.bias": "classifier.bias",
    }
    assert {k: script.timm_key(k) for k in cases} == cases
    for bad in ("_blocks.16._bn0.weight", "_blocks.0._expand_conv.weight", "_head.weight", "_blocks.x._bn0.bias"):
        with pytest.raises(KeyError):
            script.timm_key(bad)


def test_every_key_of_cavgas_lite0_maps_to_its_own_timm_key_and_the_levels_are_the_trunk_memorys(script):
    state = EfficientNetLite0().state_dict()
    mapped = script.timm_state(state)
    assert len(mapped) == len(state) == 296
    assert all(mapped[script.timm_key(k)] is v for k, v in state.items())
    # blocks.2 and blocks.4 end where cavga's blocks at strides 8 and 16 end (the last block of timm's stage)
    for layer, (stride, channels) in script.LAYERS.items():
        stage, block = script.BLOCK_PLACE[STRIDE_END_BLOCK[stride]]
        assert (f"blocks.{stage}", block) == (layer, script.STAGE_REPEATS[stage] - 1)
        assert EfficientNetLite0.feature_channels(stride) == channels


def test_two_keys_meeting_on_one_name_is_an_error(script, monkeypatch):
    monkeypatch.setattr(script, "timm_key", lambda key: "bn1.weight")
    with pytest.raises(ValueError, match="two of cavga's keys"):
        script.timm_state({"_bn0.weight": torch.zeros(1), "_bn0.bias": torch.zeros(1)})


@pytest.mark.skipif(not ANOMALIB_PYTHON.is_file(), reason="timm lives in .venv-anomalib, which this checkout lacks")
def test_the_mapped_keys_and_shapes_are_exactly_timms(script):
    code = (
        "import json, timm; m = timm.create_model('efficientnet_lite0', pretrained=False); "
        "print(json.dumps({k: list(v.shape) for k, v in m.state_dict().items()}))"
    )
    done = subprocess.run([str(ANOMALIB_PYTHON), "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"timm is not importable in {ANOMALIB_PYTHON}: {done.stderr[-300:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    mine = {k: list(v.shape) for k, v in script.timm_state(EfficientNetLite0().state_dict()).items()}
    assert mine == theirs


class _Trunk(torch.nn.Module):
    """The first two modules of timm's Lite0 under timm's names, for the loader."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = torch.nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(32)  # timm's eps 1e-5


def test_loading_is_strict_sets_the_weights_eps_and_leaves_only_the_head_over(script):
    cavga_net = EfficientNetLite0()
    keep = ("_conv_stem.", "_bn0.", "_fc.")
    mapped = script.timm_state({k: v for k, v in cavga_net.state_dict().items() if k.startswith(keep)})
    trunk = _Trunk()
    script.load_mapped(trunk, mapped)  # classifier.* left over: a trunk has no head
    assert torch.equal(trunk.conv_stem.weight, cavga_net._conv_stem.weight)
    assert trunk.bn1.eps == script.BN_EPS == 1e-3
    mapped["conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(SystemExit, match="mis-shaped"):
        script.load_mapped(_Trunk(), mapped)
    mapped.pop("conv_stem.weight")
    with pytest.raises(SystemExit, match=r"missing \['conv_stem.weight'\]"):
        script.load_mapped(_Trunk(), mapped)
    with pytest.raises(SystemExit, match="extra"):
        script.load_mapped(_Trunk(), {**script.timm_state(cavga_net.state_dict())})  # blocks.* are not the trunk's


def test_photo_verdict_wants_a_cat_and_an_espresso(script):
    probs = np.full((2, 1000), 1e-4)
    probs[0, 282], probs[1, 967] = 0.7, 0.8
    verdict = script.photo_verdict(probs, ["chelsea", "coffee"])
    assert verdict == {
        "chelsea": {"top1": 282, "probability": 0.7, "ok": True},
        "coffee": {"top1": 967, "probability": 0.8, "ok": True},
    }
    assert not script.photo_verdict(probs[::-1], ["chelsea", "coffee"])["chelsea"]["ok"]


def test_timms_input_repeats_gray_and_normalizes(script):
    gray = np.full((1, 1, 2, 2), 127 / 255, dtype=np.float32)
    x = script.normalized(gray, "weights")
    assert x.shape == (1, 3, 2, 2) and float(x.abs().max()) < 1e-6  # (x * 255 - 127) / 128 of 127 is 0
    x = script.normalized(np.ones((1, 3, 1, 1), dtype=np.float32), "imagenet")
    assert x[0, :, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])


def test_float16_maps_keep_the_order_on_zero_to_one(script):
    maps = np.array([[[-2.0, 0.0], [3.0, 6.0]]])
    stored, lo, span = script.as_float16(maps)
    assert stored.dtype == np.float16 and (lo, span) == (-2.0, 8.0)
    assert stored.ravel().tolist() == [0.0, 0.25, 0.625, 1.0]
    positive, lo, _ = script.as_float16(np.array([[[1.0, 4.0]]]))
    assert lo == 0.0 and positive.ravel().tolist() == [0.25, 1.0]  # divided by the maximum alone


def test_figures_are_cavgas_metrics(script):
    labels = np.array([0, 1, 1])
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[1, :2, :2] = masks[2, 3, 3] = True
    maps = masks.astype(np.float16) * 0.5 + 0.1
    maps[0, 0, 0] = 0.9  # a normal image's hot pixel: above every defect pixel
    got = script.figures(np.array([0.2, 0.1, 0.9]), maps, (labels, masks, np.array([True, True, True])))
    assert got["image_auroc"] == pytest.approx(0.5)  # 0.1 < 0.2 < 0.9: one of two pairs ranked right
    assert got["pixel_auroc"] == pytest.approx(1 - 1 / 43)  # 5 defect pixels below 1 of 43 normal ones
    assert 0 < got["aupro"] <= 1


# ---------------------------------------------------------------- the table and resuming
def _row(name: str, method: str, values, settings=None) -> dict:
    row = {"set": name, "method": method, "n_train": 10, "n_test": 4, "n_test_with_mask": 4, "fit_seconds": 1.5}
    return row | dict(zip(("image_auroc", "pixel_auroc", "aupro"), values, strict=True)) | {"settings": settings}


def test_the_verdict_line_names_each_figure_the_default_is_below_patchcore_on(script):
    rows = [
        _row("bottle", "anomalib PatchCore", (1.0, 0.98, 0.88)),
        _row("bottle", "cavga default", (1.0, 0.97, 0.90)) | {"n_calibration": 2},
        _row("bottle", "anomalib PaDiM", (0.99, 0.96, 0.85)),
        _row("capsule", "cavga default", (0.98, 0.98, 0.89)),
        _row("capsule", "anomalib PatchCore", (0.97, 0.98, 0.88)),
        _row("demo/wood", "cavga default", (1.0, 0.99, 0.97)),
    ]
    line = script.verdict(rows, "bottle")
    assert "image AuROC at or above (+0.0000)" in line and "pixel AuROC BELOW (-0.0100)" in line
    assert "AUPRO at or above (+0.0200)" in line and line.endswith("not at or above on all three.")
    assert script.verdict(rows, "capsule").endswith("- at or above on all three.")
    assert script.verdict(rows, "demo/wood") is None  # no PatchCore row to hold it against
    table = script.markdown({"rows": rows, "notes": ["a note"]})
    bottle = table.split("### bottle")[1].split("###")[0]
    # the methods in their order whatever the rows' order, the default's held-out images beside its own
    assert bottle.index("| cavga default | 10 (+2 held out) |") < bottle.index("| anomalib PatchCore |")
    assert bottle.index("| anomalib PatchCore |") < bottle.index("| anomalib PaDiM |")
    assert "| anomalib PaDiM | 10 | - | 0.990 | 0.960 | 0.850 | 1.5 |" in bottle
    assert table.count("cavga default against anomalib PatchCore") == 2 and "- a note" in table
    patchcore = {"method": "anomalib PatchCore", "memory": [21401, 152], "settings": {"coreset_ratio": 0.1}}
    assert script.memory(patchcore) == "21401 x 152 (coreset 0.1)"
    assert script.memory({"method": "anomalib PaDiM", "memory": [152, 1024], "settings": {}}) == "1024 Gaussians of 152"


def _args(script, out: Path) -> argparse.Namespace:
    return argparse.Namespace(out=out, methods=list(script.METHODS), timm_normalization="weights", coreset_ratio=0.1)


def test_a_rerun_skips_the_rows_it_holds_with_the_same_settings(script, tmp_path, monkeypatch):
    args = _args(script, tmp_path)
    rows = [_row("bottle", m, (1.0, 0.9, 0.8), script.method_settings(m, args)) for m in script.METHODS]
    assert all(script.has_row(rows, "bottle", m, script.method_settings(m, args)) for m in script.METHODS)
    other = _args(script, tmp_path)
    other.timm_normalization = "imagenet"  # anomalib's rows change, the default's does not
    assert script.has_row(rows, "bottle", "cavga default", script.method_settings("cavga default", other))
    assert not script.has_row(rows, "bottle", "anomalib PatchCore", script.method_settings("anomalib PatchCore", other))

    def no_data(name, out):
        raise AssertionError(f"{name} was read although every row of it is held")

    monkeypatch.setattr(script, "set_data", no_data)
    path = tmp_path / "anomalib_accuracy.json"
    verdicts = {"chelsea": {"top1": 285, "probability": 0.692, "ok": True}}
    check = {"weights": verdicts, "imagenet": verdicts, "max_logit_difference_from_cavga": 0.0, "ok": True}
    path.write_text(json.dumps({"rows": rows, "photo_check": check}))
    assert script.main(["--out", str(tmp_path), "--datasets", "bottle", "--methods", "cavga default"]) == 0
    document = json.loads(path.read_text())
    assert document["rows"] == rows and document["photo_check"] == check
    assert len(document["commands"]) == 1 and document["commands"][0][-2:] == ["--methods", "cavga default"]
    table = path.with_suffix(".md").read_text()
    assert "### bottle" in table and "(top-1 class, probability): chelsea 285 (0.692)" in table
    with pytest.raises(AssertionError, match="bottle was read"):  # another normalization: PatchCore's row to do
        script.main(["--out", str(tmp_path), "--datasets", "bottle", "--timm-normalization", "imagenet",
                     "--anomalib-python", __file__])  # fmt: skip
