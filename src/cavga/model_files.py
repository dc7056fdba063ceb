"""A saved model directory: ``config.json`` beside ``model.safetensors``, no pickle anywhere (:meth:`Cavga.save`
writes it, :func:`cavga.load` reads it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from cavga.errors import ModelFileError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def read_model_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config, weights, weights path) of the model directory ``path``; a missing or unreadable file, or a
    config of another format version, is a ModelFileError that names the file."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise ModelFileError(f"{path}: not a cavga model directory ({required.name} is missing)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{config_path}: unreadable config ({exc})") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{config_path}: format_version {config.get('format_version')!r}, this cavga reads {FORMAT_VERSION}"
        )
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors has its own error type for a file that is not safetensors (a pickle)
        raise ModelFileError(f"{weights_path}: not safetensors weights that match config.json ({exc})") from exc
    return config, state, weights_path
