"""Every anomaly map cavga draws, by name, in one place: :data:`ANOMALY_MAPS` (the inference core reads it).

A map is a function of (model, forward output, images, x_hat) giving a raw map (B, 1, H, W), higher = more
anomalous. Two kinds (:attr:`MapSpec.calibrated`):

* **Attention maps**, the paper's family: on [0, 1] by Grad-CAM's per-image normalization, thresholded at 0.5 as
  the paper says. ``attention`` is the paper's 1 - A (CAVGA_w: the anomalous class's Grad-CAM on z; the core gates
  every CAVGA_w map by the image's decision).
* **Deviation maps**: how far an image is from what the normal training images produce, in units of their own
  (a Mahalanobis distance, a feature or a pixel residual). Each is calibrated on normal images only, so that 0.5
  means the same for every one (see :func:`cavga.engine.infer.calibrate`).

What each measures on development data is in ``benchmarks/studies/map_study.py`` and the README ("What works and what
does not").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cavga.data.types import ANOMALOUS
from cavga.errors import ConfigError
from cavga.model.efficientnet_lite import EfficientNetLite0, load_imagenet_weights
from cavga.model.gaussian import latent_positions
from cavga.model.gradcam import class_attention, output_attention
from cavga.model.memory import patch_features, two_memory_distance
from cavga.model.networks import CavgaNet, CavgaOutput

BLUR_SIGMA_FRACTION = 1 / 64  # deviation maps are blurred with sigma = image side / 64 (4 px at 256 px)
_EPS = 1e-8


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps, kernel radius ceil(2 sigma), replicate-padded."""
    radius = max(1, math.ceil(2 * sigma))
    ax = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(ax**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(maps, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(F.conv2d(out, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


def upsampled_blur(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A coarse map (B, 1, h, w) bilinearly resized to ``size`` and blurred (the PaDiM post-processing)."""
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(maps, max(size) * BLUR_SIGMA_FRACTION)


TOP_SHARE = 0.01  # map_top1: the share of a map's pixels whose mean is the image score


def map_score(maps: torch.Tensor, score: str) -> torch.Tensor:
    """An image score (B,) read off anomaly maps (B, ...) alone: ``map_max`` their largest value, ``map_top1`` the
    mean of their top TOP_SHARE of pixels (at least one; chosen over the maximum by
    benchmarks/studies/image_score.py: a defect's extent counts, one noisy patch counts less)."""
    flat = maps.flatten(1)
    if score == "map_max":
        return flat.amax(dim=1)
    if score == "map_top1":
        return flat.topk(max(1, int(flat.shape[1] * TOP_SHARE)), dim=1).values.mean(dim=1)
    raise ConfigError(f"{score!r} is not a score of the map alone (map_max, map_top1)")


def residual_map(images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """|x - x_hat| averaged over channels and box-blurred (kernel ~ 1/16 of the image side): (B, 1, H, W).

    The blur turns single-pixel reconstruction noise of textures into region evidence before aggregating."""
    k = max(3, (images.shape[-1] // 16) | 1)
    residual = (images - x_hat).abs().mean(dim=1, keepdim=True)
    return F.avg_pool2d(residual, k, stride=1, padding=k // 2, count_include_pad=False)


def anomalous_probability(model: CavgaNet, out: CavgaOutput) -> torch.Tensor:
    """CAVGA_w: C's probability (B,) that each image is anomalous (its decision boundary is THRESHOLD)."""
    return torch.softmax(model.classify(out.z).detach(), dim=1)[:, ANOMALOUS]


def _size(images: torch.Tensor) -> tuple[int, int]:
    return (images.shape[-2], images.shape[-1])


# ---------------------------------------------------------------------------------------------- attention maps


def attention(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The paper's map. CAVGA_u: 1 - A (SPEC 1.1: the anomaly is where the attention is not). CAVGA_w: the
    Grad-CAM of the anomalous class on z (paper 3.2)."""
    if model.config.setting == "u":
        return 1.0 - output_attention(model, out, _size(images), create_graph=False)
    # Gated by the image's calibrated decision in the inference core (cavga.engine.infer.infer_tensors).
    return class_attention(model, out, ANOMALOUS, create_graph=False)


def attention_flip(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """A itself: the polarity ADVAE and later re-implementations use (the attended region is the anomaly)."""
    return output_attention(model, out, _size(images), create_graph=False)


def attention_advae(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """1 - the ADVAE attention: a Grad-CAM per latent channel c (target sum(mu_c)), ReLU each, then their mean,
    max-normalized per image. With the 1 x 1 mu head, channel c's Grad-CAM weights are the head's row W[c]."""
    if model.config.flatten_latent or model.config.gradcam_layer != "latent_input":
        raise ConfigError("attention_advae needs the conv latent and gradcam_layer='latent_input'")
    weight = model.mu_head.weight[:, :, 0, 0]  # (C_z, K)
    cams = F.relu(torch.einsum("ck,bkhw->bchw", weight, out.features)).mean(dim=1, keepdim=True)
    cams = cams / (cams.flatten(1).amax(dim=1).view(-1, 1, 1, 1) + _EPS)
    return 1.0 - F.interpolate(cams, size=_size(images), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- deviation maps


def latent_gaussian(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of mu at every latent position from the normal training images' Gaussian there
    (fitted after training, :func:`cavga.engine.infer.fit_latent_gaussian`), upsampled and blurred."""
    gaussian = model.latent_gaussian
    # torch.export cannot trace a check on a buffer's value; cavga.export runs the module eagerly first.
    if gaussian is None or (not torch.compiler.is_exporting() and not gaussian.fitted):
        raise ConfigError("the latent_gaussian map needs the latent Gaussian fitted on normal images (fit() does it)")
    return upsampled_blur(gaussian(latent_positions(out.mu)), _size(images))


def latent_knn(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Distance of mu at every latent position to the nearest normal mu vector of any position and any normal
    training image (:class:`cavga.model.memory.LatentMemory`, PatchCore's question asked of CAVGA's latent),
    upsampled and blurred. Unlike the per-position Gaussian it does not assume the images are aligned."""
    if not torch.compiler.is_exporting() and not _memories_fitted(model):
        raise ConfigError("the latent_knn map needs the latent memory filled from normal images (fit() does it)")
    distance = two_memory_distance(model.latent_memory, model.latent_memory_coarse, latent_positions(out.mu))
    return upsampled_blur(distance, _size(images))


def trunk_knn(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """CAVGA-L: distance of the frozen ImageNet trunk's patch features at every latent position (the encoder's
    three levels, each averaged over its ``trunk_pool`` neighbourhood: :func:`cavga.model.memory.patch_features`) to the
    nearest of a memory of normal ones (PatchCore's map, on the features the latent heads read), upsampled and
    blurred. It reads the trunk only: what CAVGA's training learns does not change it."""
    memory = model.trunk_memory
    if memory is None or out.levels is None:
        raise ConfigError("the trunk_knn map needs CAVGA-L's ImageNet trunk (variant 'L')")
    if not torch.compiler.is_exporting() and not memory.fitted:
        raise ConfigError("the trunk_knn map needs the trunk memory filled from normal images (fit() does it)")
    return upsampled_blur(memory(patch_features(out.levels, model.config.trunk_pool)), _size(images))


def _memories_fitted(model: CavgaNet) -> bool:
    coarse = model.latent_memory_coarse
    return model.latent_memory.fitted and (coarse is None or coarse.fitted)


_REFERENCES: dict[tuple[int, str], EfficientNetLite0] = {}


def reference_features(images: torch.Tensor) -> torch.Tensor:
    """Frozen ImageNet Lite0 features at stride 8 with stride 16 upsampled onto them, each L2-normalized per
    position (B, 152, H/8, W/8). The network is the packaged ImageNet one, built once per channels and device."""
    key = (images.shape[1], str(images.device))
    if key not in _REFERENCES:
        net = EfficientNetLite0(images.shape[1], classifier=False)
        load_imagenet_weights(net, classifier=False)
        _REFERENCES[key] = net.eval().requires_grad_(False).to(images.device)
    maps = _REFERENCES[key].forward_features(images, strides=(8, 16))
    coarse = F.interpolate(maps[16], size=maps[8].shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([F.normalize(maps[8], dim=1), F.normalize(coarse, dim=1)], dim=1)


def feature_residual(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared distance between the frozen ImageNet features of x and of x_hat, upsampled and blurred."""
    with torch.no_grad():
        diff = (reference_features(images) - reference_features(x_hat)).pow(2).sum(dim=1, keepdim=True)
    return upsampled_blur(diff, _size(images))


def pixel_residual(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The blurred residual |x - x_hat| (:func:`residual_map`)."""
    return residual_map(images, x_hat)


def fusion(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The latent Gaussian weighted by 1 - A: deviation counts where CAVGA's attention does not cover the image."""
    return latent_gaussian(model, out, images, x_hat) * attention(model, out, images, x_hat)


def class_gaussian(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """CAVGA_w: the latent Gaussian weighted by (1 + the anomalous class's Grad-CAM on z) / 2: deviation counts in
    full where C sees the defect and half where it sees none (a plain product drops every deviation C missed)."""
    if model.classifier is None:
        raise ConfigError("the class_gaussian map needs CAVGA_w's classifier (setting 'w')")
    cam = class_attention(model, out, ANOMALOUS, create_graph=False)
    return latent_gaussian(model, out, images, x_hat) * (1.0 + cam) / 2.0


def deviation_classifier(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """CAVGA_w: the latent Gaussian's distance weighted by the deviation classifier's probability at each position
    (:class:`cavga.model.gaussian.DeviationClassifier`, fitted on the labelled and synthesized anomalies),
    upsampled and blurred."""
    head, gaussian = model.deviation_classifier, model.latent_gaussian
    exporting = torch.compiler.is_exporting()
    if head is None or (not exporting and not (head.fitted and gaussian.fitted)):
        raise ConfigError("the deviation_classifier map needs CAVGA_w's fitted deviation classifier (fit() does it)")
    inputs = head.inputs(out.mu, gaussian)
    weighted = inputs[:, -1:] * torch.sigmoid(head.position_logits(inputs))
    return upsampled_blur(weighted, _size(images))


def knn_classifier(model: CavgaNet, out: CavgaOutput, images: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """CAVGA_w: the latent memory's distance (:func:`latent_knn`) weighted by (1 + the deviation classifier's
    probability at each position) / 2: a deviation counts in full where the classifier, fitted on the labelled and
    synthesized anomalies, sees a defect, and half where it sees none. Upsampled and blurred."""
    head, gaussian = model.deviation_classifier, model.latent_gaussian
    exporting = torch.compiler.is_exporting()  # a fitted flag reads a buffer's value: not inside a traced graph
    if head is None or (not exporting and not (head.fitted and gaussian.fitted and _memories_fitted(model))):
        raise ConfigError("the knn_classifier map needs CAVGA_w's fitted deviation classifier and latent memory")
    distance = two_memory_distance(model.latent_memory, model.latent_memory_coarse, latent_positions(out.mu))
    weighted = distance * classifier_weight(model, out.mu)
    return upsampled_blur(weighted, _size(images))


def classifier_weight(model: CavgaNet, mu: torch.Tensor) -> torch.Tensor:
    """knn_classifier's weight of the memory distance (B, 1, h, w) of a conv latent ``mu``: (1 + the deviation
    classifier's probability at each position) / 2."""
    head = model.deviation_classifier
    return head.memory_weight(head.inputs(mu, model.latent_gaussian))


# ---------------------------------------------------------------------------------------------- the registry

MapFunction = Callable[[CavgaNet, CavgaOutput, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MapSpec:
    function: MapFunction
    calibrated: bool  # raw units, put on the 0.5 scale by a threshold fitted on normal images
    exportable: bool = True  # computable inside the exported graph from the model's own tensors
    needs_reconstruction: bool = True  # False: drawn from the encoder's outputs alone (no decoder pass needed)
    needs_memory: bool = False  # True: reads the latent memory, which fit() fills (a coreset: it costs time)
    needs_trunk_memory: bool = False  # True: reads the trunk memory (CAVGA-L), which fit() fills


ANOMALY_MAPS: dict[str, MapSpec] = {
    "attention": MapSpec(attention, calibrated=False),
    "attention_flip": MapSpec(attention_flip, calibrated=False),
    "attention_advae": MapSpec(attention_advae, calibrated=False),
    "residual": MapSpec(pixel_residual, calibrated=True),
    "latent_gaussian": MapSpec(latent_gaussian, calibrated=True, needs_reconstruction=False),
    "latent_knn": MapSpec(latent_knn, calibrated=True, needs_reconstruction=False, needs_memory=True),
    "trunk_knn": MapSpec(trunk_knn, calibrated=True, needs_reconstruction=False, needs_trunk_memory=True),
    "feature_residual": MapSpec(feature_residual, calibrated=True, exportable=False),
    "fusion": MapSpec(fusion, calibrated=True),
    "class_gaussian": MapSpec(class_gaussian, calibrated=True, needs_reconstruction=False),
    "deviation_classifier": MapSpec(deviation_classifier, calibrated=True, needs_reconstruction=False),
    "knn_classifier": MapSpec(knn_classifier, calibrated=True, needs_reconstruction=False, needs_memory=True),
}
PAPER_MAP = "attention"
PAPER_SCORE = "top_mean"


def map_spec(name: str) -> MapSpec:
    if name not in ANOMALY_MAPS:
        raise ConfigError(f"anomaly_map must be one of {', '.join(map(repr, ANOMALY_MAPS))}, got {name!r}")
    return ANOMALY_MAPS[name]
