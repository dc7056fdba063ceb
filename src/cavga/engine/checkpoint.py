"""Training checkpoints that survive a kill: one safetensors file, written atomically, no pickle anywhere.

A checkpoint holds the model's state dict, both optimizers (their tensors flattened into the safetensors file,
everything else in a JSON index stored in the file's metadata), the python / numpy / torch RNG states and the
position in the data order (epoch and batches already done in it). One file keeps the tensors and the index
together, so a single ``os.replace`` swaps in a complete checkpoint or nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cavga.errors import ModelFileError

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_VERSION = 1
_META_KEY = "cavga_checkpoint"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], directory: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temporary file (``directory``: a temporary folder) beside ``path``, then
    swap it into place of ``path``.

    A crash (or an exception) inside ``write`` leaves whatever was at ``path`` before untouched, and a reader
    never sees a half-written file or folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        write(tmp)
        if directory:
            _replace_dir(Path(tmp), path)
        else:
            with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _replace_dir(new: Path, target: Path) -> None:
    """Swap folder ``new`` into place of ``target`` (two renames; the old one is removed afterwards)."""
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        os.replace(new, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(new, target)


# ---------------------------------------------------------------- RNG states as tensors / JSON


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The python, numpy and torch (CPU, and CUDA when used) RNG states: (tensors, JSON-ready extras)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the legacy global RNG
    tensors = {
        "rng.python": torch.tensor(py_state, dtype=torch.int64),
        "rng.numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "rng.torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    extras = {
        "python": {"version": version, "gauss": gauss},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    return tensors, extras


def set_rng_state(tensors: dict[str, torch.Tensor], extras: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = extras["python"]
    random.setstate((py["version"], tuple(int(v) for v in tensors["rng.python"].tolist()), py["gauss"]))
    nps = extras["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached"]))  # noqa: NPY002
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda])


# ---------------------------------------------------------------- optimizer state dicts


def _flatten_optimizer(prefix: str, state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> tensors named ``prefix.state.<param>.<key>`` and a JSON index of the rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    index = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, index


def _unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            param_id, key = name[len(head) :].split(".", 1)
            state.setdefault(int(param_id), {})[key] = value
    for param_id, entries in index["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    groups = []
    for group in index["param_groups"]:
        # JSON turned tuples (Adam's betas) into lists; the optimizers expect what they were given.
        groups.append({k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()})
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    progress: dict[str, Any],
) -> Path:
    """Write model, optimizers, RNG states and ``progress`` (JSON: epoch, batch, step, ...) to ``path``
    atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    index: dict[str, Any] = {"version": CHECKPOINT_VERSION, "progress": progress, "optimizers": {}}
    for name, optimizer in optimizers.items():
        opt_tensors, opt_index = _flatten_optimizer(f"opt.{name}", optimizer.state_dict())
        tensors.update(opt_tensors)
        index["optimizers"][name] = opt_index
    rng_tensors, index["rng"] = rng_state()
    tensors.update(rng_tensors)
    metadata = {_META_KEY: json.dumps(index)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON index of a checkpoint; anything else (a pickle, a torn file) is a ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        index = json.loads(metadata[_META_KEY])
    except Exception as exc:  # safetensors raises its own error type on a file that is not safetensors
        raise ModelFileError(f"{path} is not a cavga checkpoint (safetensors with a JSON index): {exc}") from exc
    if index.get("version") != CHECKPOINT_VERSION:
        raise ModelFileError(f"{path}: checkpoint version {index.get('version')!r}, this cavga reads 1")
    return tensors, index


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizers`` (and the RNGs); returns its ``progress``."""
    tensors, index = read_checkpoint(path)
    device = next(model.parameters()).device
    state = {k[len("model.") :]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(_unflatten_optimizer(f"opt.{name}", tensors, index["optimizers"][name]))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelFileError(f"{path} does not match this model and its optimizers: {exc}") from exc
    if restore_rng:
        set_rng_state(tensors, index["rng"])
    return index["progress"]
