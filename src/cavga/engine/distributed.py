"""Data-parallel training and prediction under ``torchrun`` (PyTorch's own launcher; no process management here).

``torchrun --nproc_per_node=N -m cavga.cli train ...`` starts N copies of the same command. Each reads the rank
and world size torchrun puts in its environment, joins the process group (gloo on CPU, nccl on CUDA), trains on
its shard of every global batch and averages the gradients of both the generator side and the discriminator
with ``all_reduce`` before each optimizer step.

Why not ``DistributedDataParallel``: CAVGA's generator loss holds a Grad-CAM map built with
``torch.autograd.grad(create_graph=True)``, and the discriminator is called both inside and outside the generator's
graph in one step. DDP's reducer hooks expect one backward per forward and do not support double backward, so we
average the gradients explicitly, which is what DDP would do.

BatchNorm: each rank normalizes with its own batch statistics (as DDP without SyncBatchNorm does); SyncBatchNorm is
CUDA-only and has no double backward. The running statistics are averaged across ranks before every save.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (idempotent); a no-op without torchrun.

    On CUDA each process takes the GPU of its LOCAL_RANK (so "cuda" / "auto" mean that GPU).
    """
    if not launched_by_torchrun():
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def context() -> DistContext:
    """The current process group's context, without joining one."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if context().enabled:
        dist.barrier()


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average the gradients of ``optimizer``'s parameters over all ranks (one all_reduce per call)."""
    ctx = context()
    if not ctx.enabled:
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_model(model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (all ranks must start from the same weights)."""
    if not context().enabled:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running mean / var) over ranks, so the saved model's statistics
    come from every rank's data and not rank 0's shard alone."""
    ctx = context()
    if not ctx.enabled:
        return
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer.data, op=dist.ReduceOp.SUM)
                buffer.data /= ctx.world_size


def shard(items: Sequence, ctx: DistContext) -> list:
    """This rank's share of ``items``: every world_size-th item starting at its rank."""
    return list(items[ctx.rank :: ctx.world_size])


def shard_dir(out: Path, rank: int) -> Path:
    return out / f".rank{rank}"


def merge_prediction_shards(out: Path, order: Sequence, world_size: int):
    """Rank 0: move each rank's outputs from ``out/.rank<r>/`` into ``out`` (the ranks named their files from
    the whole input list, so names do not clash) and rewrite ``predictions.jsonl`` (atomically) as the lines it
    held before plus the ranks' new ones, in the order of ``order`` (the input paths); ``errors.jsonl`` gathers
    the ranks' errors. Returns a :class:`cavga.report.outputs.PredictRun` for the whole input."""
    from cavga.engine.checkpoint import atomic_write
    from cavga.report.outputs import ERRORS_FILE, PREDICTIONS_FILE, PredictRun, read_jsonl

    target = out / PREDICTIONS_FILE
    lines = {str(line.get("path")): line for line in read_jsonl(target)}
    before, n_before = set(lines), len(lines)
    errors: list[dict] = []
    parts = [shard_dir(out, rank) for rank in range(world_size)]
    for part in parts:
        errors.extend(read_jsonl(part / ERRORS_FILE))
        for line in read_jsonl(part / PREDICTIONS_FILE):
            if line["path"] in lines:
                continue  # merged by an earlier run that stopped before removing the shard folder
            for key, value in line.items():
                # Any relative path to a file the rank wrote (heat map, mask, overlay, ...) moves up to ``out``.
                if key != "path" and isinstance(value, str) and (part / value).is_file():
                    (out / value).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(part / value, out / value)
            lines[line["path"]] = line
    ordered = [lines.pop(str(p)) for p in order if str(p) in lines] + list(lines.values())

    def write(path: str, records: list[dict]) -> None:
        Path(path).write_text("".join(json.dumps(record) + "\n" for record in records))

    atomic_write(target, lambda tmp: write(tmp, ordered))
    atomic_write(out / ERRORS_FILE, lambda tmp: write(tmp, errors))
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    n_skipped = sum(str(p) in before for p in order)
    return PredictRun(len(order), len(ordered) - n_before, n_skipped, len(errors), target, out / ERRORS_FILE)
