"""Export a saved model to ONNX or a ``torch.export`` program (``pt2``) with the anomaly map inside the graph, and
run the files.

The exported graph takes a preprocessed batch ``image`` (B, C, H, W) in [0, 1] (what ``Cavga.preprocess``
returns, stacked) and returns ``pred_score`` (B,) normalized with the model's calibration (constants baked in),
``anomaly_map`` (B, H, W) in [0, 1] and ``pred_mask`` (B, H, W) bool (= anomaly_map > 0.5), anomalib's names,
exactly what ``Cavga.predict`` computes: the graph is :func:`cavga.engine.infer.infer_tensors` traced.

Grad-CAM without autograd (derivation). Grad-CAM's channel weights are alpha_k = mean_ij d s / d F[k, i, j]
for a target score s and feature map F (B, K, h, w). When s is an affine function of F, its gradient is a
constant of the weights, so alpha is fixed at export time and the map is relu(sum_k alpha_k F_k), normalized
per image and upsampled, with no backward pass in the graph (:func:`cavga.model.gradcam.closed_form_weights`):

* CAVGA_u, conv latent: mu = W * F + b with a 1x1 conv W (C_z, K). s = sum_{c,i,j} mu[c, i, j]
  = sum_{c,i,j} (sum_k W[c, k] F[k, i, j] + b_c), so d s / d F[k, i, j] = sum_c W[c, k] at every position and
  alpha_k = sum_c W[c, k]. (Target sum(z) is the same: z = mu at inference.)
* CAVGA_u, flattened latent (Table 8's `*`): mu = W flatten(F) + b with W (D, K h w).
  d s / d F[k, i, j] = sum_d W[d, (k, i, j)], so alpha_k = mean_ij (sum_d W[d, :]).view(K, h, w)[k].
* CAVGA_w, conv latent: the anomalous logit l = V[1] . flatten(z) + c_1 and the Grad-CAM features are z itself,
  so d l / d z = V[1].view(C_z, h, w) and alpha = its spatial mean.
* CAVGA_w, flattened latent: the features are F (the flat z has no space) and l = V[1] . (W flatten(F) + b) + c_1,
  so d l / d F = (V[1] W).view(K, h, w) and alpha = its spatial mean.

This holds for the default Grad-CAM layer (the map feeding the latent heads) only: from ``encoder_mid`` the
path to mu crosses a LeakyReLU, so the weights depend on the input and no constant form exists; such models
are refused. ``tests/test_export.py`` checks the closed form against autograd Grad-CAM.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cavga.data.io import to_pil
from cavga.engine.calibration import Calibration, CalibrationConstants
from cavga.engine.infer import MapChoice, infer_tensors
from cavga.engine.maps import map_spec
from cavga.errors import ConfigError, ModelFileError
from cavga.metrics import THRESHOLD
from cavga.model.gradcam import has_closed_form
from cavga.model.networks import CavgaNet

FORMATS = ("onnx", "pt2")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}
INPUT_NAME = "image"
OUTPUT_NAMES = ("pred_score", "anomaly_map", "pred_mask")  # anomalib's names
METADATA_KEY = "cavga_config"  # the model's config.json, in the ONNX metadata
CONFIG_EXTRA_FILE = "config.json"  # ... and as an extra file of a pt2 archive
OPSET = 17


class ExportedCavga(nn.Module):
    """Inference of one CAVGA model as a plain forward pass: image batch -> (pred_score, anomaly_map, pred_mask).

    The forward is :func:`cavga.engine.infer.infer_tensors` with the calibration constants as buffers; the
    model must have closed-form Grad-CAM weights (no backward pass in the graph).
    """

    def __init__(self, model: CavgaNet, calibration: Calibration) -> None:
        super().__init__()
        cfg = model.config
        if cfg.gradcam_layer != "latent_input":
            raise ConfigError(
                f"gradcam_layer {cfg.gradcam_layer!r} cannot be exported: its Grad-CAM weights depend on the input "
                "(a LeakyReLU lies between it and mu); only 'latent_input' has a closed form"
            )
        if not has_closed_form(model):
            raise ConfigError(f"this model's Grad-CAM (setting {cfg.setting!r}) has no closed form to export")
        choice = MapChoice.of(cfg)
        if not map_spec(choice.anomaly_map).exportable:
            raise ConfigError(
                f"anomaly_map {choice.anomaly_map!r} cannot be exported: it needs a second network (the frozen "
                "ImageNet reference) outside the model; export a model with another map, e.g. 'latent_gaussian'"
            )
        self.model = copy.deepcopy(model).cpu().float().eval()
        self.calibration = CalibrationConstants(calibration)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        result = infer_tensors(self.model, x, self.calibration)
        return result.score.float(), result.anomaly_map, result.mask


def exported_module(detector) -> ExportedCavga:
    """The :class:`ExportedCavga` of a fitted or loaded :class:`cavga.Cavga`."""
    detector._check_fitted()
    return ExportedCavga(detector.model_, detector.calibration_)


def export(model: Any, out: str | os.PathLike | None = None, format: str = "onnx", batch_size: int = 1) -> Path:
    """Export ``model`` (a model directory or a fitted ``Cavga``) to ``out`` (default MODEL_DIR/model.onnx or
    model.pt2).

    The file carries the model's config.json (preprocessing, calibration, architecture) as ONNX metadata
    ``cavga_config`` or an extra file ``config.json`` of the pt2 archive. The batch dimension is
    dynamic. ``pt2`` is a ``torch.export`` ExportedProgram (:func:`load_exported` runs it).
    """
    from cavga.api import load

    if format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(model, (str, os.PathLike)):
        model_dir = Path(model)
        detector = load(model_dir, device="cpu")
        if out is None:
            out = model_dir / f"model{SUFFIXES[format]}"
    else:
        detector = model
        if out is None:
            raise ConfigError("give an output path when exporting an in-memory model")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = exported_module(detector).eval()
    cfg = detector.model_config
    example = torch.rand(batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    config_text = json.dumps(detector.config_dict())
    if format == "pt2":
        # An example batch of 2: torch.export specializes a dimension whose example size is 0 or 1.
        example = example.expand(max(batch_size, 2), *example.shape[1:])
        with torch.no_grad():
            module(example)  # eagerly once: the checks on tensor values (a fitted Gaussian) that the trace skips
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(program, str(out), extra_files={CONFIG_EXTRA_FILE: config_text})
        return out
    _export_onnx(module, example, out, config_text)
    return out


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """A ``pt2`` file written by :func:`export`: (module, config). ``module(image)`` on a preprocessed batch
    (B, C, H, W) returns (pred_score, anomaly_map, pred_mask) as the ONNX graph does; config is the model's
    config.json.

    ``torch.export.load`` unpickles parts of the archive (weights and constants): load only files you trust,
    e.g. ones you exported; ONNX files carry no code."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such pt2 file")
    extra = {CONFIG_EXTRA_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # torch raises several types for a file that is not an ExportedProgram archive
        raise ModelFileError(f"{path}: not a loadable torch.export program ({exc})") from exc
    return program.module(), json.loads(extra[CONFIG_EXTRA_FILE] or "{}")


def _export_onnx(module: nn.Module, example: torch.Tensor, out: Path, config_text: str) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            (example,),
            str(out),
            dynamo=False,  # the TorchScript-based exporter: no onnxscript dependency
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=OPSET,
        )
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, config_text
    onnx.save(proto, str(out))


class OnnxInferencer:
    """Run an exported ONNX model with onnxruntime, preprocessing as the model was trained (from its config).

    ``path``: an ``.onnx`` file written by :func:`export` (its config is in the file), or a model directory
    holding ``model.onnx`` (then that directory's config.json is used). ``predict`` takes what
    ``Cavga.predict`` takes and returns the same :class:`cavga.prediction.Prediction` objects; ``raw_score`` is NaN
    because the graph returns only the calibrated score.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        from cavga.data import Preprocess

        path = Path(path)
        if path.is_dir():
            onnx_path, config_path = path / "model.onnx", path / "config.json"
            if not onnx_path.is_file():
                raise ModelFileError(f"{path}: no model.onnx (write it with: cavga export {path} --format onnx)")
            config = json.loads(config_path.read_text()) if config_path.is_file() else None
        elif path.is_file():
            onnx_path, config = path, None
        else:
            raise ModelFileError(f"{path}: no such ONNX file or model directory")
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelFileError(f"{onnx_path}: not a loadable ONNX model ({exc})") from exc
        if config is None:
            text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            if text is None:
                raise ModelFileError(f"{onnx_path}: no {METADATA_KEY} metadata; pass the model directory instead")
            config = json.loads(text)
        self.config = config
        self.preprocess_ = Preprocess.from_dict(config["preprocess"])

    def preprocess(self, image) -> np.ndarray:
        """The (C, H, W) float32 array the graph takes for one image (path, numpy array or PIL image)."""
        return self.preprocess_(to_pil(image)).numpy()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph on a preprocessed batch (B, C, H, W): (pred_score, anomaly_map, pred_mask)."""
        score, anomaly, mask = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return score, anomaly, mask

    def predict(self, images, batch_size: int = 32) -> list:
        """Score and localize one image or a list of them, like ``Cavga.predict``."""
        from PIL import Image

        from cavga.prediction import Prediction

        single = isinstance(images, (str, os.PathLike, np.ndarray, Image.Image))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pils = [to_pil(item) for item in chunk]
            batch = np.stack([self.preprocess_(p).numpy() for p in pils])
            scores, maps, masks = self.run(batch)
            for i, item in enumerate(chunk):
                results.append(
                    Prediction(
                        pred_score=float(scores[i]),
                        pred_label=int(scores[i] > THRESHOLD),
                        anomaly_map=maps[i].astype(np.float32),
                        pred_mask=masks[i].astype(bool),
                        raw_score=float("nan"),
                        path=str(item) if isinstance(item, (str, os.PathLike)) else None,
                        original_size=pils[i].size,
                    )
                )
        return results
