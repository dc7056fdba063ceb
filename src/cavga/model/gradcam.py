"""Differentiable Grad-CAM (Selvaraju et al.), the attention map A of CAVGA (paper 3.1-3.2, SPEC 1.1).

The losses L_ae and L_cga train *through* A, so the channel weights come from ``torch.autograd.grad`` with
``create_graph=True`` (double backward), never from hooks on detached tensors.

Per-image maps from one backward pass: the gradient of ``score.sum()`` (summed over the batch) with respect to
image i's features equals the gradient of image i's own score, because nothing couples images between the
feature map and the score. That holds for the default layer ("latent_input": only the linear mu head lies in
between). For "encoder_mid" a BatchNorm lies in between; in train mode its batch statistics add a small
cross-image term to the gradient, in eval mode (inference) the maps are exactly per image.

For a linear head (the 1x1 conv mu head with target sum(mu), and the linear classifier on z) the gradient
d score / d F does not depend on the input, so alpha_k is a constant of the weights (for sum(mu): the sum of
the head's weights over output channels) and A = normalize(relu(sum_k alpha_k F_k)) has a closed form. Export
relies on this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cavga.errors import ConfigError
from cavga.model.networks import CavgaNet, CavgaOutput

NORMALIZATIONS = ("max", "minmax")


def grad_cam(
    score: torch.Tensor,
    features: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    normalization: str = "max",
    create_graph: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Grad-CAM of a per-image ``score`` (B,) on ``features`` (B, K, h, w): a map (B, 1, H, W) in [0, 1].

    alpha_k = spatial mean of d score / d F_k; cam = relu(sum_k alpha_k F_k), normalized per image
    ("max": cam / max; "minmax": (cam - min) / (max - min)), bilinearly resized to ``output_size``.
    With ``create_graph`` the map is differentiable with respect to everything ``score`` and ``features``
    depend on.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if score.dim() != 1 or features.dim() != 4 or score.shape[0] != features.shape[0]:
        raise ValueError(
            f"grad_cam needs score (B,) and features (B, K, h, w); got {tuple(score.shape)} and {tuple(features.shape)}"
        )
    (grads,) = torch.autograd.grad(score.sum(), features, create_graph=create_graph, retain_graph=True)
    return cam_from_weights(grads.mean(dim=(2, 3), keepdim=True), features, output_size, normalization, eps)


def cam_from_weights(
    alpha: torch.Tensor,
    features: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    normalization: str = "max",
    eps: float = 1e-8,
) -> torch.Tensor:
    """normalize(relu(sum_k alpha_k F_k)) resized to ``output_size``: (B, 1, H, W) in [0, 1].

    ``alpha`` is (K,) (the same weights for every image) or (B, K, 1, 1)."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if alpha.dim() == 1:
        alpha = alpha.view(1, -1, 1, 1)
    cam = F.relu((alpha * features).sum(dim=1, keepdim=True))
    flat = cam.flatten(1)
    high = flat.amax(dim=1).view(-1, 1, 1, 1)
    if normalization == "max":
        cam = cam / (high + eps)
    else:
        low = flat.amin(dim=1).view(-1, 1, 1, 1)
        cam = (cam - low) / (high - low + eps)
    if output_size is not None and tuple(cam.shape[-2:]) != tuple(output_size):
        cam = F.interpolate(cam, size=tuple(output_size), mode="bilinear", align_corners=False)
    return cam.clamp(0.0, 1.0)


def target_score(output: CavgaOutput, target: str = "sum_mu") -> torch.Tensor:
    """Per-image Grad-CAM target of CAVGA_u: ``sum(mu)`` (default, as public re-implementations) or ``sum(z)``."""
    if target == "sum_mu":
        return output.mu.flatten(1).sum(1)
    if target == "sum_z":
        return output.z.flatten(1).sum(1)
    raise ConfigError(f"gradcam target must be 'sum_mu' or 'sum_z', got {target!r}")


def _sampled(output: CavgaOutput) -> bool:
    """Whether ``z`` is a reparameterized sample rather than ``mu`` (forward with ``sample=False`` returns mu)."""
    if output.z is output.mu:
        return False
    return output.z.shape != output.mu.shape or not torch.equal(output.z, output.mu)


def closed_form_weights(model: CavgaNet, target: str | int, output: CavgaOutput) -> torch.Tensor | None:
    """Grad-CAM channel weights alpha (K,) as a function of the weights alone, or None where none exists.

    ``target`` is a CAVGA_u target ("sum_mu", "sum_z") or a class index (CAVGA_w's classifier logit). When the
    target is linear in the Grad-CAM features, d target / d F is a constant of the weights (derivation in
    :mod:`cavga.export`) and this alpha equals the autograd one. It is built with ordinary ops, so under
    autograd it stays differentiable with respect to the head weights: the attention losses then train the
    same parameters through alpha as the double backward does, without a second backward through the network.
    None for the ``encoder_mid`` layer (a LeakyReLU lies in between), for ``sum_z`` on a sampled ``z``, and for
    a flattened sampled latent under the classifier (the path through ``logvar`` depends on the input).
    """
    if not isinstance(model, CavgaNet) or model.config.gradcam_layer != "latent_input":
        return None  # anything else with a ``classify`` goes through autograd
    cfg = model.config
    if isinstance(target, str):
        if target not in ("sum_mu", "sum_z") or (target == "sum_z" and _sampled(output)):
            return None
        if cfg.flatten_latent:
            # mu = W flatten(F) + b: d sum(mu) / d F = sum_d W[d, :] viewed as F's (K, h, w); alpha its mean.
            return model.mu_head[1].weight.sum(0).view(output.features.shape[1:]).mean(dim=(1, 2))
        return model.mu_head.weight.sum(dim=(0, 2, 3))  # 1x1 conv: alpha_k = sum_c W[c, k]
    if model.classifier is None:
        return None
    row = model.classifier.weight[target]
    if output.z.dim() == 4:
        return row.view(output.z.shape[1:]).mean(dim=(1, 2))  # features are z itself
    if _sampled(output):
        return None
    return (row @ model.mu_head[1].weight).view(output.features.shape[1:]).mean(dim=(1, 2))


def has_closed_form(model: CavgaNet, setting: str | None = None) -> bool:
    """Whether inference (no sampling) of ``setting`` "u" or "w" (default: the model's own) gets its Grad-CAM
    weights in closed form."""
    if not isinstance(model, CavgaNet) or model.config.gradcam_layer != "latent_input":
        return False
    cfg = model.config
    setting = cfg.setting if setting is None else setting
    if setting == "u":
        return cfg.gradcam_target in ("sum_mu", "sum_z")
    return setting == "w" and model.classifier is not None


def output_attention(model: CavgaNet, output: CavgaOutput, size: tuple[int, int], create_graph: bool) -> torch.Tensor:
    """CAVGA_u attention A (B, 1, H, W) of a forward pass's ``output``, resized to ``size``.

    The closed form when one exists (no backward at all), else autograd Grad-CAM (double backward with
    ``create_graph``). Without ``create_graph`` the map is detached.
    """
    cfg = model.config
    alpha = closed_form_weights(model, cfg.gradcam_target, output)
    if alpha is not None:
        if not create_graph:
            alpha = alpha.detach()
        attention = cam_from_weights(alpha, output.features, size, cfg.gradcam_normalization)
    else:
        attention = grad_cam(
            target_score(output, cfg.gradcam_target),
            output.features,
            output_size=size,
            normalization=cfg.gradcam_normalization,
            create_graph=create_graph,
        )
    return attention if create_graph else attention.detach()


def _detached(output: CavgaOutput) -> CavgaOutput:
    return CavgaOutput(
        features=output.features.detach(),
        mu=output.mu.detach(),
        logvar=output.logvar.detach(),
        z=output.z.detach(),
        x_hat_logits=output.x_hat_logits.detach(),
    )


def attention_map(model: CavgaNet, x: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, CavgaOutput]:
    """Attention A (B, 1, H, W) of CAVGA_u for images ``x`` and the model's output, using ``mu`` (no sampling).

    Where the Grad-CAM weights have a closed form (the default layer and target) and no graph is asked for,
    this runs one forward pass without autograd. Otherwise Grad-CAM needs gradients even at inference
    (SPEC 1.4), so this enables them locally and works inside ``torch.no_grad()``. Without ``create_graph``
    both results are detached. The anomaly map is ``1 - A``.
    """
    cfg = model.config
    size = tuple(x.shape[-2:])
    if not create_graph and has_closed_form(model, "u"):
        with torch.no_grad():
            output = model(x, sample=False)
            alpha = closed_form_weights(model, cfg.gradcam_target, output)
            if alpha is not None:
                return cam_from_weights(alpha, output.features, size, cfg.gradcam_normalization), output
    with torch.enable_grad():
        output = model(x, sample=False)
        if not output.features.requires_grad:
            # Frozen parameters: make the input a leaf so the features are part of a graph again.
            output = model(x.detach().requires_grad_(True), sample=False)
        attention = output_attention(model, output, size, create_graph)
    if create_graph:
        return attention, output
    return attention, _detached(output)


def class_attention(model: CavgaNet, output: CavgaOutput, cls: int, create_graph: bool) -> torch.Tensor:
    """CAVGA_w attention: Grad-CAM of classifier logit ``cls`` (0 normal, 1 anomalous) on ``z`` -> (B, 1, H, W).

    Paper 3.2 uses the conv latent ``z`` itself as the feature map. The flattened-latent ablation has no
    spatial ``z``; its classifier maps are taken on the encoder feature map (``output.features``) instead.
    The classifier is linear, so the weights have a closed form (:func:`closed_form_weights`) except for a
    sampled flattened latent, which goes through autograd. Works inside ``torch.no_grad()``; at inference
    ``z`` may come from a graph-free forward pass. Without ``create_graph`` the map is detached.
    """
    size = tuple(output.x_hat_logits.shape[-2:])
    normalization = model.config.gradcam_normalization
    features = output.z if output.z.dim() == 4 else output.features
    alpha = closed_form_weights(model, cls, output)
    if alpha is not None:
        if not create_graph:
            with torch.no_grad():
                return cam_from_weights(alpha, features.detach(), size, normalization)
        with torch.enable_grad():
            return cam_from_weights(alpha, features, size, normalization)
    with torch.enable_grad():
        if output.z.dim() == 4:
            z = output.z
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            features = z
        else:
            features, z = output.features, output.z
            if not z.requires_grad:
                raise ValueError("class_attention on a flattened latent needs the output of a forward with grad")
        logits = model.classify(z)
        attention = grad_cam(
            logits[:, cls],
            features,
            output_size=size,
            normalization=normalization,
            create_graph=create_graph,
        )
    return attention if create_graph else attention.detach()


def signed_class_maps(model: CavgaNet, output: CavgaOutput, cls: int) -> torch.Tensor:
    """Class ``cls``'s Grad-CAM before the ReLU, each image's map divided by its largest magnitude: (B, 1, h, w)
    on [-1, 1] at the features' resolution, differentiable (for L_cga during training).

    The paper's maps (ReLU, then max-normalized) let L_cga reach 0 with no information: a class map negative
    everywhere is 0 after the ReLU and a flat one is 1 after the normalization. Signed maps reach their bound
    only where the class evidence itself is uniform, so the loss keeps a gradient (cga_maps="signed")."""
    features = output.z if output.z.dim() == 4 else output.features
    alpha = closed_form_weights(model, cls, output)
    if alpha is None:
        logits = model.classify(output.z)
        (grads,) = torch.autograd.grad(logits[:, cls].sum(), features, create_graph=True, retain_graph=True)
        alpha = grads.mean(dim=(2, 3), keepdim=True)
    else:
        alpha = alpha.view(1, -1, 1, 1)
    cam = (alpha * features).sum(dim=1, keepdim=True)
    scale = cam.abs().flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return cam / (scale + 1e-8)
