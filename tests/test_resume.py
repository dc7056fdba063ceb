"""Checkpoints and exact resume: round trip, an interrupted run resumed equals an uninterrupted one (in process and
after SIGKILL of a real ``cavga train``), NaN stops after saving, discriminator collapse is logged."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cavga.engine.train as train_module
from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import Sample, collate_samples
from cavga.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint, read_checkpoint, save_checkpoint
from cavga.engine.train import TrainingError, make_optimizers, train, training_step
from cavga.model.networks import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import write_tiny_mvtec  # noqa: E402


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g)
        self.labels = [0] * n

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.images[i], None, 0, "good", f"img{i}.png")


def tiny_model(init_seed: int = 0):
    torch.manual_seed(init_seed)
    return build_model(ModelConfig(variant="D", image_size=32, channels=3, width=8, latent_channels=8))


def config(**kw) -> TrainConfig:
    # 10 images, batch 4, drop_last: 2 steps per epoch.
    return TrainConfig(**{"epochs": 3, "batch_size": 4, "lr": 1e-3, "seed": 3, "device": "cpu", **kw})


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diff = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    return diff


def test_checkpoint_round_trip_restores_model_optimizers_and_rngs(tmp_path):
    model = tiny_model()
    opt_g, opt_d = make_optimizers(model, config())
    ds = ListDataset(4)
    batch = collate_samples([ds[i] for i in range(4)])
    training_step(model, batch, opt_g, opt_d, config())  # gives the optimizers state (Adam moments, step)
    path = save_checkpoint(tmp_path / "c.safetensors", model, {"g": opt_g, "d": opt_d}, {"epoch": 1, "batch": 2})
    expected = (torch.rand(3), random.random(), np.random.rand(2))  # noqa: NPY002 - the global RNG is the point

    other = tiny_model(init_seed=99)
    og, od = make_optimizers(other, config())
    torch.manual_seed(123), random.seed(5), np.random.seed(7)  # noqa: NPY002
    progress = load_checkpoint(path, other, {"g": og, "d": od})
    assert progress == {"epoch": 1, "batch": 2}
    assert_same_state(model, other)
    for mine, theirs in ((opt_g, og), (opt_d, od)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a["param_groups"] == b["param_groups"]
        for pid, entries in a["state"].items():
            for key, value in entries.items():
                assert torch.equal(value, b["state"][pid][key]), (pid, key)
    got = (torch.rand(3), random.random(), np.random.rand(2))  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])
    # Nothing of it is a pickle: the file is safetensors with a JSON index in its header.
    assert path.read_bytes()[8:9] == b"{"


def test_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    ds = ListDataset()
    reference = tiny_model()
    history_ref = train(reference, ds, config(), progress=False)

    calls = {"n": 0}
    real_step = train_module.training_step

    def dies_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # 3 steps done (mid epoch 2), checkpointed after each
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), ds, config(), progress=False, run_dir=tmp_path, checkpoint_steps=1)
    progress = read_checkpoint(tmp_path / CHECKPOINT_FILE)[1]["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 1, 3)
    monkeypatch.setattr(train_module, "training_step", real_step)

    resumed = tiny_model(init_seed=42)  # other initial weights: everything must come from the checkpoint
    torch.manual_seed(1234)  # and another global RNG state
    history = train(resumed, ds, config(), progress=False, run_dir=tmp_path, resume=True)
    assert_same_state(reference, resumed)
    assert history == history_ref


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path):
    ds = ListDataset()
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_model(), ds, config(), progress=False, run_dir=tmp_path, resume=True)
    train(tiny_model(), ds, config(epochs=1), progress=False, run_dir=tmp_path)
    with pytest.raises(TrainingError, match="batch_size"):
        train(tiny_model(), ds, config(batch_size=2), progress=False, run_dir=tmp_path, resume=True)
    with pytest.raises(TrainingError, match="10 images"):
        train(tiny_model(), ListDataset(8), config(), progress=False, run_dir=tmp_path, resume=True)
    # More epochs is allowed: a finished run can be extended.
    history = train(tiny_model(), ds, config(epochs=2), progress=False, run_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in history] == [1, 2]


def test_nan_stops_naming_step_and_term_after_saving_the_last_good_state(tmp_path, monkeypatch):
    real = train_module.losses.vae_loss
    calls = {"n": 0}

    def nan_on_third_call(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(train_module.losses, "vae_loss", nan_on_third_call)
    model = tiny_model()
    with pytest.raises(TrainingError, match=r"'L' became nan at step 2.*last good state is saved"):
        train(model, ListDataset(), config(), progress=False, run_dir=tmp_path)
    tensors, index = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert index["progress"]["reason"] == "failure"
    assert index["progress"]["step"] == 2  # steps 0 and 1 done; the failing step 2 is not counted
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point())
    # The saved generator is the in-memory one (the generator side never stepped on the bad loss).
    saved = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.encoder.")}
    for k, v in saved.items():
        assert torch.equal(v, model.state_dict()[k])


def test_discriminator_collapse_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(train_module, "COLLAPSE_STEPS", 3)
    values = iter([0.5, 1e-4, 1e-4, 0.2, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5])

    def fake_step(*args, **kwargs):
        return {"L_D": next(values), "total": 1.0}

    monkeypatch.setattr(train_module, "training_step", fake_step)
    with caplog.at_level(logging.WARNING, logger="cavga.engine.train"):
        train(tiny_model(), ListDataset(), config(epochs=5), progress=False)
    warnings = [r.getMessage() for r in caplog.records if "discriminator collapse" in r.getMessage()]
    # The streak 1e-4, 1e-4 is broken by 0.2; the next one reaches 3 at step 7 and is reported once.
    assert warnings == [warnings[0]] and "step 7" in warnings[0]


# ---------------------------------------------------------------- SIGKILL of a real `cavga train`

SLOW_TRAIN = """
import sys, time
import cavga.engine.train as t
real = t.training_step
def slow(*args, **kwargs):
    time.sleep(0.25)  # gives the test time to kill mid-run; no effect on the numbers
    return real(*args, **kwargs)
t.training_step = slow
from cavga.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args: list[str], env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "cavga.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = write_tiny_mvtec(tmp_path / "data")
    # 12 train images - 1 for calibration = 11, batch 4: 2 steps per epoch, 8 steps in all.
    common = ["--variant", "D"]
    common += ["--image-size", "32", "--width", "8", "--latent-channels", "8", "--epochs", "4", "--batch-size", "4"]
    common += ["--seed", "5", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_cli(["train", str(data), "--out", str(tmp_path / "reference"), *common], env)

    run = tmp_path / "run"
    killed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_TRAIN,
            "train",
            str(data),
            "--out",
            str(tmp_path / "resumed"),
            "--run-dir",
            str(run),
        ]
        + ["--checkpoint-steps", "1", *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    checkpoint = run / CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    step = 0
    while time.monotonic() < deadline and killed.poll() is None:
        if checkpoint.is_file():
            step = read_checkpoint(checkpoint)[1]["progress"]["step"]
            if step >= 3:
                break
        time.sleep(0.02)
    assert killed.poll() is None, f"training ended before it could be killed: {killed.stderr.read()}"
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "resumed").exists()
    assert 3 <= read_checkpoint(checkpoint)[1]["progress"]["step"] < 8

    run_cli(["train", "--resume", str(run), "--no-progress"], env)
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    max_diff = max(float((reference[k].double() - resumed[k].double()).abs().max()) for k in reference)
    print(f"SIGKILL resume: max abs weight difference {max_diff:.3g}")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), max_diff
