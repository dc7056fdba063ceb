"""The code paths ``benchmarks/speed.py`` times: the library's own training step and inference, the paths its
optimizations replaced (for the ratios), a plain VAE forward, and the PaDiM-style baseline's fit and inference.

Each ``_trainer`` / ``_inferrer`` returns a closure over its own copy of the model, so that variants timed
interleaved do not share state.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cavga.config import ModelConfig, TrainConfig
from cavga.data.types import Batch
from cavga.engine import infer, train
from cavga.engine.calibration import Calibration
from cavga.engine.infer import aggregate_score, infer_batch, residual_map
from cavga.engine.maps import upsampled_blur
from cavga.model import gradcam
from cavga.model.encoders import LiteEncoder
from cavga.model.gaussian import PositionGaussian

HERE = Path(__file__).resolve().parent
# A calibration that spreads the scores (speed does not depend on it); the map threshold serves deviation maps.
CALIBRATION = Calibration(0.0, 1.0, 0.95, 1, map_threshold=1.0)


# --------------------------------------------------------------------------- code paths compared


@contextlib.contextmanager
def before_optimizations():
    """The code paths the optimizations replaced: autograd Grad-CAM everywhere (double backward in training,
    a backward at inference) and D weight gradients computed in the generator's backward."""
    saved = gradcam.closed_form_weights, gradcam.has_closed_form, infer.has_closed_form, train._frozen
    gradcam.closed_form_weights = lambda *a, **k: None
    gradcam.has_closed_form = infer.has_closed_form = lambda *a, **k: False
    train._frozen = lambda module: contextlib.nullcontext()
    try:
        yield
    finally:
        gradcam.closed_form_weights, gradcam.has_closed_form, infer.has_closed_form, train._frozen = saved


@contextlib.contextmanager
def without_attention():
    """Attention maps replaced by zeros (no Grad-CAM work); used with attention weights 0."""
    saved = train.output_attention, train.class_attention

    def zeros(model, out, *args, **kwargs):
        return torch.zeros(out.x_hat_logits.shape[0], 1, *out.x_hat_logits.shape[-2:])

    train.output_attention = train.class_attention = zeros
    try:
        yield
    finally:
        train.output_attention, train.class_attention = saved


def naive_infer(model, images: torch.Tensor, setting: str) -> tuple[np.ndarray, np.ndarray]:
    """Inference as public re-implementations write it: per image, hooks capture the feature map and its
    gradient, a full backward (into the parameters too) gives Grad-CAM's weights. Returns (scores, maps)."""
    model.eval()
    store: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        features = output[0] if isinstance(output, tuple) else output
        store["features"] = features
        features.register_hook(lambda grad: store.__setitem__("grad", grad))

    handle = model.encoder.register_forward_hook(keep)
    scores, maps = [], []
    try:
        for i in range(images.shape[0]):
            x = images[i : i + 1]
            model.zero_grad()
            with torch.enable_grad():
                out = model(x, sample=False)
                if setting == "u":
                    features = store["features"]
                    out.mu.sum().backward()
                    grad = store["grad"]
                else:
                    z = out.z
                    z.retain_grad()
                    logits = model.classify(z)
                    logits[0, 1].backward()
                    features, grad = z, z.grad
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((alpha * features).sum(1, keepdim=True)).detach()
            cam = cam / (cam.max() + 1e-8)
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x_hat = torch.sigmoid(out.x_hat_logits.detach())
            if setting == "u":
                scores.append(float(aggregate_score(x, x_hat, residual_map(x, x_hat), model.config)[0]))
                maps.append((1 - cam)[0, 0].numpy())
            else:
                scores.append(float(torch.softmax(logits.detach(), 1)[0, 1]))
                maps.append(cam[0, 0].numpy())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return np.array(scores), np.stack(maps)


def _batch(images: torch.Tensor, setting: str) -> Batch:
    b = images.shape[0]
    labels = torch.zeros(b, dtype=torch.long)
    if setting == "w":
        labels[-1] = 1  # one labelled anomalous image per batch (CAVGA_w)
    masks = torch.zeros(b, 1, *images.shape[-2:])
    return Batch(images, masks, torch.zeros(b, dtype=torch.bool), labels, ["good"] * b, [""] * b)


def build(spec: dict):
    """The untrained model a configuration names, its latent Gaussian (and memory) fitted on random images where
    its map needs one (a fitted Gaussian or memory costs what a trained one does)."""
    from cavga.model.memory import patch_features
    from cavga.model.networks import build_model

    config = ModelConfig(
        variant=spec["variant"], image_size=spec["size"], width=spec["width"], setting=spec["setting"],
        **spec.get("options", {}),
    )  # fmt: skip
    model = build_model(config)
    if config.anomaly_map in ("latent_gaussian", "fusion", "latent_knn", "trunk_knn"):
        with torch.inference_mode():
            out = model.eval()(torch.rand(4, config.channels, spec["size"], spec["size"]), sample=False)
        model.latent_gaussian.fit([out.mu])
        model.latent_memory.fit([out.mu])  # all memory_size rows are compared at inference, however few were filled
        if model.trunk_memory is not None:  # the same for the trunk memory (trunk_knn)
            model.trunk_memory.fit([patch_features(out.levels, config.trunk_pool)])
    return model


def _trainer(model, setting: str, batch: Batch, mode: str):
    """A closure running one training step of ``mode`` on its own copy of the model and optimizers."""
    model = copy.deepcopy(model).train()
    config = TrainConfig()
    if mode == "no_cam":
        config.weights.w_ae = config.weights.w_cga = 0.0
    weights = torch.tensor([0.6, 2.0]) if setting == "w" else None
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        batch = _batch(batch.images.contiguous(memory_format=torch.channels_last), setting)
    opt_g, opt_d = train.make_optimizers(model, config)
    context = {
        "no_cam": without_attention,
        "before": before_optimizations,
        "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }.get(mode, contextlib.nullcontext)

    def step() -> None:
        with context():
            train.training_step(model, batch, opt_g, opt_d, config, weights)

    return step


def _inferrer(model, setting: str, images: torch.Tensor, mode: str):
    model = copy.deepcopy(model).eval()
    if mode == "naive":
        return lambda: naive_infer(model, images, setting)
    if mode == "plain":  # the VAE alone: encoder, heads and decoder, no map and no score

        def forward() -> None:
            with torch.inference_mode():
                model(images, sample=False)

        return forward
    if mode == "encoder":

        def encode() -> None:
            with torch.inference_mode():
                model.encoder(images)

        return encode
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    context = {
        "before": before_optimizations,
        "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }.get(mode, contextlib.nullcontext)

    def run() -> None:  # what Cavga.predict computes (no decoder where map and score need none)
        with context():
            infer_batch(model, images, CALIBRATION, reconstruct=False)

    return run


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_runner(model, images: torch.Tensor, threads: int, tmp: Path):
    from cavga.export import export

    sys.path.insert(0, str(HERE))
    from latency import _detector  # the eager-vs-ONNX latency script's untrained detector

    cfg = model.config
    detector = _detector({"variant": cfg.variant, "image_size": cfg.image_size, "width": cfg.width})
    detector.model_config = cfg
    detector.model_ = copy.deepcopy(model).eval()
    detector.calibration_ = CALIBRATION
    path = export(detector, tmp / f"model{threads}.onnx", "onnx")
    session = _session(path, threads)
    feed = {"image": images.numpy()}
    return lambda: session.run(None, feed)


# --------------------------------------------------------------------------- the PaDiM-style baseline


class PadimGraph(torch.nn.Module):
    """:class:`cavga.baselines.PadimBaseline`'s inference as one module (its ``_infer`` batch function without
    the numpy edge): frozen Lite0 features, the per-position Mahalanobis distance, upsampled and blurred; score =
    the map's maximum."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.encoder = LiteEncoder(3, 8, pretrained=True, frozen=True)
        self.encoder.load_imagenet()
        self.encoder.eval()
        self.gaussian = PositionGaussian(self.encoder.out_channels, size // 8, size // 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = upsampled_blur(self.gaussian(self.encoder(x)[0]), (x.shape[-2], x.shape[-1]))
        return raw.flatten(1).amax(dim=1), raw[:, 0]


def padim_paths(spec: dict, fit_images: torch.Tensor, threads: int, tmp: Path) -> tuple[dict, dict]:
    """(fit closures, inference closures) of the PaDiM-style baseline: fit = features of a batch and the sums
    the Gaussian is fitted from (PadimBaseline.fit per batch); inference eager (with the numpy edge) and ONNX."""
    graph = PadimGraph(spec["size"]).eval()
    with torch.inference_mode():
        graph.gaussian.fit([graph.encoder(fit_images)[0]])

    def fit() -> None:
        with torch.inference_mode():
            f = graph.encoder(fit_images)[0].to(torch.float64).flatten(2)
            f.sum(0), torch.einsum("bcp,bdp->pcd", f, f)

    def runner(images: torch.Tensor):
        def run() -> None:
            with torch.inference_mode():
                score, raw = graph(images)
                score.double().numpy(), raw.float().numpy()

        return run

    def onnx_runner(images: torch.Tensor, n_threads: int):
        path = tmp / f"padim{n_threads}.onnx"
        if not path.is_file():
            with torch.no_grad(), _quiet():
                torch.onnx.export(
                    graph, (images[:1],), str(path), dynamo=False, input_names=["image"],
                    dynamic_axes={"image": {0: "batch"}}, opset_version=17,
                )  # fmt: skip
        session = _session(path, n_threads)
        feed = {"image": images.numpy()}
        return lambda: session.run(None, feed)

    return {"full": fit}, {"eager": runner, "onnx": onnx_runner}


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        yield
