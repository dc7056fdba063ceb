"""Atomic saves (a crash while writing leaves the previous file) and no unpickling of a user's file: a pickle that
would run a shell command is refused by every loader, and the command never runs."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cavga.api as api
import cavga.engine.checkpoint as checkpoint_module
from cavga.config import ModelConfig
from cavga.data.oneclass import read_cifar10
from cavga.engine.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from cavga.errors import CavgaError, DataError, ModelFileError
from cavga.model.networks import build_model, load_encoder_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import write_tiny_mvtec  # noqa: E402


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"data": Payload(marker), "labels": [0]}, protocol=2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    detector = api.Cavga("D", image_size=32, width=8, latent_channels=8, epochs=1, batch_size=4, device="cpu")
    detector.fit(write_tiny_mvtec(root / "data"), progress=False)
    return detector.save(root / "model")


def test_the_payload_really_runs_under_plain_pickle(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(malicious_pickle(marker))  # noqa: S301 - the control: proves the payload is live
    assert marker.exists()


def test_encoder_weights_refuse_a_malicious_pth(tmp_path):
    model = build_model(ModelConfig(variant="R", image_size=64, channels=3))
    marker = tmp_path / "marker"
    zipped, legacy = tmp_path / "resnet18.pth", tmp_path / "legacy.pth"
    torch.save({"conv1.weight": Payload(marker)}, zipped)  # torch's zip format with a pickle inside
    legacy.write_bytes(malicious_pickle(marker))  # a bare pickle with a .pth name
    for path in (zipped, legacy):
        with pytest.raises(ModelFileError, match=path.name):
            load_encoder_weights(model, path)
    assert not marker.exists()


def test_cifar_reader_refuses_a_malicious_python_batch(tmp_path):
    marker = tmp_path / "marker"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(malicious_pickle(marker))
    with pytest.raises(DataError, match="refused to load posix.system|refused to load os.system"):
        read_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.slow
def test_model_load_refuses_a_pickle_in_place_of_the_weights(fitted, tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text((fitted / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(malicious_pickle(marker))
    with pytest.raises(ModelFileError, match="model.safetensors"):
        api.load(bad, device="cpu")
    torch.save({"x": Payload(marker)}, bad / "model.safetensors")  # torch's zip format under the expected name
    with pytest.raises(ModelFileError, match="model.safetensors"):
        api.load(bad, device="cpu")
    assert not marker.exists()


def test_checkpoint_loader_refuses_a_pickle(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(malicious_pickle(marker))
    model = build_model(ModelConfig(variant="D", image_size=32, width=8, latent_channels=8))
    with pytest.raises(ModelFileError, match="not a cavga checkpoint"):
        load_checkpoint(path, model, {})
    assert not marker.exists()


def tear_midway(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00" * 1000)  # half a file on disk, then the crash
    raise OSError("disk full (simulated)")


def test_crash_while_saving_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    model = build_model(ModelConfig(variant="D", image_size=32, width=8, latent_channels=8))
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model, {}, {"step": 1})
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(checkpoint_module, "save_file", tear_midway)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, model, {}, {"step": 2})
    assert path.read_bytes() == before
    assert read_checkpoint(path)[1]["progress"] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.slow
def test_crash_while_saving_a_model_leaves_the_previous_one(fitted, monkeypatch):
    detector = api.load(fitted, device="cpu")
    before = {name: (fitted / name).read_bytes() for name in ("model.safetensors", "config.json")}
    with torch.no_grad():
        next(detector.model_.parameters()).add_(1.0)
    monkeypatch.setattr(api, "save_file", tear_midway)
    with pytest.raises(OSError, match="simulated"):
        detector.save(fitted)
    assert {name: (fitted / name).read_bytes() for name in before} == before
    assert load_file(str(fitted / "model.safetensors"))  # still a complete model
    assert sorted(p.name for p in fitted.parent.iterdir() if p.name.startswith(".")) == []


def test_every_refusal_is_a_cavga_error():
    # The CLI turns CavgaError into "cavga: error: ..." and exit status 2; these must not escape as tracebacks.
    assert issubclass(ModelFileError, CavgaError) and issubclass(DataError, CavgaError)
