"""Run directory logging: config.json, train.log and optional TensorBoard scalars and image grids."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
import torch

from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import ANOMALOUS, NORMAL, Sample
from cavga.engine import runlog
from cavga.engine.train import TrainingError, train
from cavga.errors import ConfigError
from cavga.model.networks import build_model
from tiny_data import ListDataset, write_tiny_mvtec

EPOCH_LINE = re.compile(r"INFO cavga\.engine\.train: epoch (\d+)/(\d+) (.*)$")


def tiny_data(n: int = 8, labels: list[int] | None = None) -> ListDataset:
    g = torch.Generator().manual_seed(1)
    labels = labels or [NORMAL] * n
    return ListDataset(
        [Sample(torch.rand(3, 32, 32, generator=g), None, label, "good", str(i)) for i, label in enumerate(labels)]
    )


def tiny_model(weak: bool = False):
    torch.manual_seed(0)
    config = ModelConfig(
        variant="D", image_size=32, channels=3, width=8, latent_channels=8, setting="w" if weak else "u"
    )
    return build_model(config)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "seed": 3, "device": "cpu", **kw})


def parse_epoch_lines(text: str) -> dict[int, dict[str, float]]:
    """{epoch: {term: value}} from train.log's epoch lines."""
    epochs = {}
    for line in text.splitlines():
        match = EPOCH_LINE.search(line)
        if match:
            terms = dict(item.split("=") for item in match.group(3).split())
            epochs[int(match.group(1))] = {k: float(v) for k, v in terms.items()}
    return epochs


def test_train_log_has_one_line_per_epoch_with_the_loss_means_and_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    history = train(tiny_model(), tiny_data(), config(), progress=False, run_dir=run)
    text = (run / runlog.LOG_FILE).read_text()
    epochs = parse_epoch_lines(text)
    assert sorted(epochs) == [1, 2] and len(history) == 2
    for means in history:
        logged = epochs[means["epoch"]]
        assert set(logged) == {"L", "L_adv", "L_ae", "total", "L_D"}
        for term, value in logged.items():
            assert value == pytest.approx(means[term], rel=1e-3)  # written with 4 significant digits
    assert "epochs of 2 steps" in text  # 8 images, batch 4
    assert re.search(r"checkpoint \(end\): epoch 2, batch 0, step 4 -> .*checkpoint\.safetensors", text)
    # The run's settings with every default filled in.
    saved = json.loads((run / runlog.RUN_FILE).read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["weights"]["w_ae"] == TrainConfig().weights.w_ae
    assert saved["model"]["width"] == 8 and saved["n_samples"] == 8 and saved["world_size"] == 1


def test_the_file_handler_is_removed_and_the_console_keeps_its_level(tmp_path, caplog):
    package = logging.getLogger("cavga")
    before = (list(package.handlers), package.level, package.propagate)
    train(tiny_model(), tiny_data(), config(epochs=1), progress=False, run_dir=tmp_path / "run")
    assert (list(package.handlers), package.level, package.propagate) == before
    # INFO went to the file only: nothing reached the handlers above (caplog's sits on the root logger).
    assert "epoch 1/1" not in caplog.text
    # Logging after the run does not reach the file any more.
    size = (tmp_path / "run" / runlog.LOG_FILE).stat().st_size
    logging.getLogger("cavga.engine.train").warning("after the run")
    assert (tmp_path / "run" / runlog.LOG_FILE).stat().st_size == size


def test_warnings_still_reach_the_console_while_the_file_is_attached(tmp_path, caplog):
    with runlog.log_to_file(tmp_path / "x.log"):
        logging.getLogger("cavga.engine.train").info("only in the file")
        logging.getLogger("cavga.engine.train").warning("in both")
        logging.getLogger("cavga.engine.train").error("file only", extra={runlog.FILE_ONLY: True})
    # caplog's handler sits on the root logger, where the console handlers are.
    assert "in both" in caplog.text and "only in the file" not in caplog.text and "file only" not in caplog.text
    text = (tmp_path / "x.log").read_text()
    assert "only in the file" in text and "in both" in text and "file only" in text


def test_a_failed_run_says_why_in_its_log_and_removes_the_handler(tmp_path):
    data = tiny_data()
    data.samples[0].image[0, 0, 0] = float("nan")
    with pytest.raises(TrainingError):
        train(tiny_model(), data, config(), progress=False, run_dir=tmp_path / "run")
    text = (tmp_path / "run" / runlog.LOG_FILE).read_text()
    assert re.search(r"ERROR cavga\.engine\.train: training stopped: loss term .* became nan", text)
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("cavga").handlers)


def test_watching_a_run_with_tensorboard_does_not_change_it(tmp_path):
    plain, watched = tiny_model(), tiny_model()
    train(plain, tiny_data(), config(), progress=False)
    train(watched, tiny_data(), config(), progress=False, run_dir=tmp_path / "run", tensorboard=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), key


def read_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_has_every_loss_term_per_step_and_epoch_and_image_grids(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    history = train(tiny_model(), tiny_data(), config(), progress=False, run_dir=run, tensorboard=True)
    events = read_events(run / runlog.TENSORBOARD_DIR)
    tags = events.Tags()
    for term in ("L", "L_adv", "L_ae", "L_D", "total"):
        steps = events.Scalars(f"step/{term}")
        assert [e.step for e in steps] == [1, 2, 3, 4]  # 2 epochs of 2 steps
        per_epoch = events.Scalars(f"epoch/{term}")
        assert [e.step for e in per_epoch] == [1, 2]
        # The epoch value is the mean of that epoch's step values (float32 in the event file).
        for epoch, means in zip(per_epoch, history, strict=True):
            assert epoch.value == pytest.approx(means[term], rel=1e-6)
        assert per_epoch[0].value == pytest.approx((steps[0].value + steps[1].value) / 2, rel=1e-5)
    assert set(tags["images"]) == {"images/input", "images/reconstruction", "images/anomaly_map"}
    grids = events.Images("images/anomaly_map")
    assert [g.step for g in grids] == [1, 2]
    # 8 images of 32 px in one row with make_grid's 2 px padding: 8 * 34 + 2 wide, 36 high.
    assert (grids[-1].width, grids[-1].height) == (8 * 34 + 2, 36)


def test_weakly_supervised_grids_show_anomalous_images_too(tmp_path):
    pytest.importorskip("tensorboard")
    labels = [NORMAL] * 10 + [ANOMALOUS] * 2
    run = tmp_path / "run"
    data = tiny_data(labels=labels)
    train(tiny_model(weak=True), data, config(epochs=1), progress=False, run_dir=run, tensorboard=True)
    events = read_events(run / runlog.TENSORBOARD_DIR)
    assert {"step/L_bce", "step/L_cga", "epoch/L_cga"} <= set(events.Tags()["scalars"])
    assert len(events.Images("images/input")) == 1
    assert runlog.visual_indices(12) == [0, 2, 3, 5, 6, 8, 9, 11]  # spread: the last (anomalous) one included


def test_tensorboard_needs_a_run_dir():
    with pytest.raises(ConfigError, match="run directory"):
        train(tiny_model(), tiny_data(), config(), progress=False, tensorboard=True)


def test_missing_tensorboard_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail, as when the package is not installed.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError, match=r"cavga\[tensorboard\]"):
        train(tiny_model(), tiny_data(), config(), progress=False, run_dir=tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()  # refused before training


@pytest.mark.slow
def test_cavga_train_writes_its_run_dir_beside_the_model_by_default(tmp_path):
    pytest.importorskip("tensorboard")
    data = write_tiny_mvtec(tmp_path / "data")
    options = ["--variant", "D"]
    options += ["--image-size", "32", "--width", "8", "--latent-channels", "8", "--epochs", "2", "--batch-size", "4"]
    model = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, "-m", "cavga.cli", "train", str(data), "--out", str(model), "--device", "cpu"]
        + ["--no-progress", "--tensorboard", *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    run = tmp_path / "model.run"
    assert str(run) in done.stdout
    assert "epoch 1/2" not in done.stderr  # INFO goes to the log file, not the console (no -v)
    assert sorted(parse_epoch_lines((run / runlog.LOG_FILE).read_text())) == [1, 2]
    assert json.loads((run / "run.json").read_text())["fit"]["tensorboard"] is True
    assert json.loads((run / runlog.RUN_FILE).read_text())["train"]["epochs"] == 2
    events = read_events(run / runlog.TENSORBOARD_DIR)
    assert "epoch/L_ae" in events.Tags()["scalars"] and "images/reconstruction" in events.Tags()["images"]
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]  # the model dir alone
