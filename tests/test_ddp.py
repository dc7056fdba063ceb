"""Data-parallel training under torchrun (2 CPU processes, gloo) equals a single process with the global batch;
``cavga train`` and ``cavga predict`` run under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_data import write_tiny_mvtec  # noqa: E402

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TOLERANCE = 1e-5

# Trains a tiny CAVGA-D on 8 fixed images, 2 epochs of 2 steps, with ``batch_size`` per process, then again with
# gradient averaging switched off. Per-rank BatchNorm statistics and per-rank reparameterization noise legitimately
# differ from one global batch, so both are taken out to isolate what data parallelism must preserve (the global
# batches and the averaged gradients of G and D): BatchNorm normalizes with its fixed running statistics, and the
# noise is zero. Everything else (Grad-CAM's double backward included) is the real training step.
WORKER = r"""
import sys
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
import cavga.engine.train as train_module
from cavga.engine import distributed
from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import Sample
from cavga.model.networks import build_model

class FrozenBatchNorm(torch.nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

class Images(torch.utils.data.Dataset):
    def __init__(self):
        self.images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.labels = [0] * 8
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return Sample(self.images[i], None, 0, "good", f"img{i}.png")

torch.randn_like = torch.zeros_like
out, batch_size = sys.argv[1], int(sys.argv[2])
for name in ("synced", "unsynced"):
    if name == "unsynced":
        train_module.distributed.average_gradients = lambda optimizer: None
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="D", image_size=32, channels=3, width=8, latent_channels=8))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.__class__ = FrozenBatchNorm
    config = TrainConfig(epochs=2, batch_size=batch_size, lr=1e-3, seed=3, device="cpu")
    train_module.train(model, Images(), config, progress=False)
    ctx = distributed.context()
    if ctx.is_main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}-rank0.safetensors")
    elif ctx.enabled:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}-rank1.safetensors")
distributed.cleanup()
"""


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run([sys.executable, str(worker), str(single), "4"])  # one process, global batch 4
    run([*TORCHRUN, str(worker), str(ddp), "2"])  # two processes of 2 images each
    reference = load_file(str(single / "synced-rank0.safetensors"))
    rank0 = load_file(str(ddp / "synced-rank0.safetensors"))
    rank1 = load_file(str(ddp / "synced-rank1.safetensors"))
    diff = max_abs_diff(reference, rank0)
    print(f"DDP (2 x batch 2) vs single process (batch 4): max abs weight difference {diff:.3g}")
    assert diff < TOLERANCE
    assert max_abs_diff(rank0, rank1) == 0.0  # the ranks stay identical
    # The same run without gradient averaging leaves the tolerance far behind: the test can fail.
    unsynced = load_file(str(ddp / "unsynced-rank0.safetensors"))
    assert max_abs_diff(reference, unsynced) > 100 * TOLERANCE
    assert max_abs_diff(unsynced, load_file(str(ddp / "unsynced-rank1.safetensors"))) > 100 * TOLERANCE


@pytest.mark.slow
def test_cavga_train_and_predict_under_torchrun(tmp_path):
    data = write_tiny_mvtec(tmp_path / "data")
    model = tmp_path / "model"
    options = ["--variant", "D"]
    options += ["--image-size", "32", "--width", "8", "--latent-channels", "8", "--epochs", "1", "--batch-size", "2"]
    done = run([*TORCHRUN, "-m", "cavga.cli", "train", str(data), "--out", str(model), "--device", "cpu", *options])
    assert done.stdout.count("saved to") == 1  # rank 0 alone saves and prints
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert not list(tmp_path.glob(".model.*"))  # no temporary directory left behind

    inputs = data / "bottle" / "test"
    out = tmp_path / "pred"
    run([*TORCHRUN, "-m", "cavga.cli", "predict", str(model), str(inputs), "--out", str(out)])
    lines = [json.loads(t) for t in (out / "predictions.jsonl").read_text().splitlines()]
    expected = sorted(str(p) for p in inputs.rglob("*.png"))
    assert [line["path"] for line in lines] == expected  # every file once, in input order, from both ranks
    for line in lines:
        assert (out / line["heatmap"]).is_file() and (out / line["pred_mask"]).is_file()
    assert len({line["heatmap"] for line in lines}) == len(lines)
    assert not list(out.glob(".rank*"))
    # The merged scores equal a single-process prediction of the same files.
    from cavga.api import load
    from cavga.data.io import list_images

    detector = load(model, device="cpu")
    scores = [p.pred_score for p in detector.predict(list_images([inputs]))]
    assert [line["pred_score"] for line in lines] == pytest.approx(scores, abs=1e-6)


def test_gradient_averaging_is_a_no_op_without_torchrun():
    from cavga.engine import distributed

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    distributed.average_gradients(torch.optim.SGD([p], lr=0.1))
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert distributed.shard(list(range(7)), distributed.DistContext(rank=1, world_size=3)) == [1, 4]
