"""Batch prediction over files and folders: ``cavga predict``, streamed and resumable, on one process or under
``torchrun`` (files split over the processes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cavga.api import Cavga, load
from cavga.data.io import list_images
from cavga.engine import distributed
from cavga.report.outputs import (
    PREDICTIONS_FILE,
    PredictRun,
    clear_predictions,
    output_names,
    read_jsonl,
    stream_predictions,
)


def predict_folder(
    model: Cavga | str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    batch_size: int = 32,
    resume: bool = True,
    progress: bool = False,
) -> PredictRun | None:
    """Predict the images in ``inputs`` (files and folders) with ``model`` (a fitted Cavga or a model directory)
    and write heat maps, masks, overlays and ``predictions.jsonl`` to ``out``, streaming batch by batch (see
    :func:`cavga.report.outputs.stream_predictions`): ``resume`` skips what ``out`` holds already, unreadable
    files go to ``errors.jsonl``. Returns what the run did.

    Under ``torchrun`` each process predicts every world_size-th file into ``out/.rank<r>`` and rank 0 merges
    the outputs into ``out`` in input order; the other processes return None."""
    out = Path(out)
    ctx = distributed.setup()  # before loading: on CUDA it picks this process's GPU
    detector = model if isinstance(model, Cavga) else load(model)
    files = list_images(inputs)
    names = output_names(files)  # of the whole list, so that every rank names its images alike
    options = {"batch_size": batch_size, "resume": resume}
    if not ctx.enabled:
        return stream_predictions(detector, files, out, names=names, progress=progress, **options)
    try:
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                clear_predictions(out)
            read_jsonl(out / PREDICTIONS_FILE, repair=True)  # drop a torn line before the other ranks read it
        distributed.barrier()
        merged = {str(record.get("path")) for record in read_jsonl(out / PREDICTIONS_FILE)}
        part = distributed.shard_dir(out, ctx.rank)
        stream_predictions(
            detector,
            distributed.shard(files, ctx),
            part,
            names=distributed.shard(names, ctx),
            done=merged,
            progress=progress and ctx.is_main,
            **options,
        )
        distributed.barrier()
        run = distributed.merge_prediction_shards(out, files, ctx.world_size) if ctx.is_main else None
    finally:
        distributed.cleanup()
    return run
