"""CAVGA networks (paper section 3, "Architecture details" in section 4; SPEC 1.1 and 1.3).

CAVGA-D: a DCGAN-discriminator-style encoder and a DCGAN-generator decoder.
CAVGA-R: the ResNet-18 conv trunk as encoder and a residual decoder.
Both: 1x1 convolutional heads for ``mu`` and ``logvar`` (the convolutional latent, never flattened unless
``flatten_latent`` asks for Table 8's ``*`` ablation), a DCGAN discriminator on images, and for CAVGA_w a linear
classifier on ``z.flatten(1)``.

Images enter every network in [0, 1] (the scale of the BCE target); the ResNet trunk applies the ImageNet
normalization itself so that pretrained weights see the inputs they were trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18

from cavga.config import ModelConfig
from cavga.errors import ConfigError, ModelFileError
from cavga.model.efficientnet_lite import read_state_dict
from cavga.model.encoders import LITE0_STRIDES, LiteEncoder, torchvision_resnet18_path
from cavga.model.gaussian import DeviationClassifier, PositionGaussian
from cavga.model.memory import LatentMemory

GRADCAM_TARGETS = ("sum_mu", "sum_z")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RESNET_STRIDE = 32
_RESNET_CHANNELS = 512
_TRUNK_KEYS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


@dataclass
class CavgaOutput:
    """What one forward pass of :class:`CavgaNet` returns."""

    features: torch.Tensor  # Grad-CAM feature map (B, K, h, w), in the graph that leads to mu
    mu: torch.Tensor  # (B, C_z, h, w); (B, flat_latent_dim) for flatten_latent
    logvar: torch.Tensor
    z: torch.Tensor  # reparameterized sample when sampling, else mu
    x_hat_logits: torch.Tensor | None  # (B, C, H, W), before the sigmoid; None where not decoded
    # CAVGA-L: the trunk's maps at stride / 2, stride and 2 * stride (the trunk_knn map's input); None otherwise.
    levels: dict[int, torch.Tensor] | None = None


# --------------------------------------------------------------------------- building blocks


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialization: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _log2_exact(value: int, name: str) -> int:
    n = int(round(math.log2(value))) if value > 0 else -1
    if n < 0 or 2**n != value:
        raise ConfigError(f"{name} must be a power of two, got {value}")
    return n


class DcganEncoder(nn.Module):
    """Strided 4x4 convs, LeakyReLU 0.2, BatchNorm from the 2nd layer on; channels width, 2*width, 4*width, ...

    ``forward`` returns ``(out, mid)``: the map that feeds the latent heads and the one before the last
    downsampling (the ``encoder_mid`` Grad-CAM layer).
    """

    def __init__(self, channels: int, width: int, n_layers: int) -> None:
        super().__init__()
        self.out_channels = [width * 2**i for i in range(n_layers)]
        blocks = []
        in_ch = channels
        for i, out_ch in enumerate(self.out_channels):
            layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False)]
            if i > 0:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.LeakyReLU(0.2, inplace=False))
            blocks.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = x
        for block in self.blocks[:-1]:
            mid = block(mid)
        return self.blocks[-1](mid), mid


class DcganDecoder(nn.Module):
    """Strided 4x4 transposed convs with BatchNorm and ReLU, the last one giving C-channel logits."""

    def __init__(self, in_channels: int, out_channels: int, encoder_channels: list[int]) -> None:
        super().__init__()
        mirrored = encoder_channels[::-1][1:]  # e.g. [2w, w] for an encoder [w, 2w, 4w]
        ins = [in_channels, *mirrored]
        outs = [*mirrored, out_channels]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(ins, outs, strict=True)):
            last = i == len(ins) - 1
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ResNetTrunk(nn.Module):
    """torchvision ResNet-18 without avgpool/fc (stride 32, 512 channels).

    Submodule names equal torchvision's, so a torchvision state dict (minus ``fc.*``) loads directly.
    ``forward`` returns ``(layer4, layer3)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        net = resnet18(weights=None)
        if channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        mean = torch.tensor(_IMAGENET_MEAN) if channels == 3 else torch.tensor([sum(_IMAGENET_MEAN) / 3])
        std = torch.tensor(_IMAGENET_STD) if channels == 3 else torch.tensor([sum(_IMAGENET_STD) / 3])
        # Not persistent: the state dict stays exactly torchvision's trunk.
        self.register_buffer("input_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", std.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.input_mean) / self.input_std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        mid = self.layer3(self.layer2(self.layer1(x)))
        return self.layer4(mid), mid


class ResidualUpBlock(nn.Module):
    """Paper section 4: upsample -> u; conv3x3+BN+ReLU(u) -> c; out = c + u (1x1 conv on u if channels change)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=False),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.upsample(x)
        return self.conv(u) + self.skip(u)


class ResidualDecoder(nn.Module):
    """Residual blocks doubling the size until full resolution (8w, 4w, 2w, w, w, ...), a 3x3 conv to logits."""

    def __init__(self, in_channels: int, out_channels: int, width: int, n_blocks: int) -> None:
        super().__init__()
        chans = [width * 2 ** max(3 - i, 0) for i in range(n_blocks)]
        blocks = []
        c_in = in_channels
        for c_out in chans:
            blocks.append(ResidualUpBlock(c_in, c_out))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(c_in, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Channels-last activations inside: torch's CPU kernels run the nearest upsampling and these convolutions
        # 1.3-1.6x faster so, forward and forward + backward (benchmarks/results/decoder_layout.json); the same
        # values to float rounding, the output in the default layout.
        x = z.contiguous(memory_format=torch.channels_last)
        return self.to_image(self.blocks(x)).contiguous()


class DcganDiscriminator(nn.Module):
    """DCGAN discriminator: strided 4x4 convs while the map is >= 8 px (channels capped at 8*width), then one
    conv over the remaining 4-7 px map to a single logit (4x4 for power-of-two sizes, as in DCGAN).

    Takes images on the scale of ``x`` ([0, 1]); feed ``sigmoid(x_hat_logits)`` for reconstructions.
    """

    def __init__(self, channels: int, width: int, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        size, i = image_size, 0
        while size >= 8:
            c_out = width * 2 ** min(i, 3)
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=False))
            c_in, size, i = c_out, size // 2, i + 1
        layers.append(nn.Conv2d(c_in, 1, size, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).squeeze(1)


def _flat_head(feature_shape: tuple[int, int, int], flat_dim: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(feature_shape), flat_dim))


# --------------------------------------------------------------------------- the network


def latent_memories(config: ModelConfig) -> tuple[LatentMemory, LatentMemory | None]:
    """The empty latent memory of ``config`` (the latent_knn map: normal mu vectors, filled after training) and
    its second memory of a coarser window, searched apart (memory_coarse_window; None without one)."""
    channels = config.flat_latent_dim if config.flatten_latent else config.latent_channels
    memory = LatentMemory(channels, config.memory_size, config.memory_window, config.memory_both_scales)
    coarse = config.memory_coarse_window
    return memory, (LatentMemory(channels, config.memory_size, coarse) if coarse else None)


class CavgaNet(nn.Module):
    """Encoder, latent heads, decoder, discriminator and (CAVGA_w) classifier of one CAVGA model."""

    def __init__(
        self,
        config: ModelConfig,
        encoder: nn.Module,
        feature_shape: tuple[int, int, int],
        decoder_trunk: nn.Module,
        discriminator: nn.Module,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        k, h, w = feature_shape
        if config.flatten_latent:
            # Table 8's `*` models: fully connected latent; the decoder maps it back to the encoder's shape.
            self.mu_head = _flat_head(feature_shape, config.flat_latent_dim)
            self.logvar_head = _flat_head(feature_shape, config.flat_latent_dim)
            self.decoder = nn.Sequential(
                nn.Linear(config.flat_latent_dim, k * h * w), nn.Unflatten(1, (k, h, w)), decoder_trunk
            )
            z_numel = config.flat_latent_dim
        else:
            self.mu_head = nn.Conv2d(k, config.latent_channels, 1)
            self.logvar_head = nn.Conv2d(k, config.latent_channels, 1)
            self.decoder = decoder_trunk
            z_numel = config.latent_channels * h * w
        self.discriminator = discriminator
        # Paper 3.2: C reads the flattened z itself (shared values, no second latent) into a 2-way output.
        self.classifier = nn.Linear(z_numel, 2) if config.setting == "w" else None
        # The latent Gaussian map's statistics (fitted on the normal training images after training; buffers, so
        # they are saved with the weights). The flattened latent is one position of flat_latent_dim channels.
        self.deviation_classifier = None
        # The latent memories (the latent_knn map; a coarser one beside where configured): filled after training.
        self.latent_memory, self.latent_memory_coarse = latent_memories(config)
        # CAVGA-L: a memory of the frozen trunk's normal patch features (the trunk_knn map), filled after training.
        self.trunk_memory = None
        if isinstance(encoder, LiteEncoder):
            self.trunk_memory = LatentMemory(encoder.patch_channels, config.trunk_memory_size)
        if config.flatten_latent:
            self.latent_gaussian = PositionGaussian(config.flat_latent_dim, 1, 1)
        else:
            self.latent_gaussian = PositionGaussian(config.latent_channels, h, w)
            if config.setting == "w":  # beyond the paper: positions classified by their deviation (gaussian.py)
                self.deviation_classifier = DeviationClassifier(config.latent_channels, h, w)

    def forward(self, x: torch.Tensor, sample: bool | None = None, decode: bool = True) -> CavgaOutput:
        """Encode, sample ``z`` (``sample`` None: when training) and decode to logits (``decode=False``: not, for
        inference whose map and score need no reconstruction)."""
        if sample is None:
            sample = self.training
        levels = None
        if isinstance(self.encoder, LiteEncoder):
            levels = self.encoder.forward_levels(x)
            encoded, mid = self.encoder.combine(levels)
        else:
            encoded, mid = self.encoder(x)
        features = mid if self.config.gradcam_layer == "encoder_mid" else encoded
        mu = self.mu_head(encoded)
        logvar = self.logvar_head(encoded)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        x_hat_logits = self.decoder(z) if decode else None
        return CavgaOutput(features=features, mu=mu, logvar=logvar, z=z, x_hat_logits=x_hat_logits, levels=levels)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 2) of ``z``: class 0 normal, 1 anomalous (CAVGA_w only)."""
        if self.classifier is None:
            raise ConfigError("this model has no classifier: build it with setting='w'")
        return self.classifier(z.flatten(1))

    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything the generator-side optimizer trains: encoder, heads, decoder and classifier."""
        parts = [self.encoder, self.mu_head, self.logvar_head, self.decoder]
        if self.classifier is not None:
            parts.append(self.classifier)
        return [p for part in parts for p in part.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())


# --------------------------------------------------------------------------- construction


def _validate(config: ModelConfig) -> None:
    config.validate()
    if config.gradcam_target not in GRADCAM_TARGETS:
        raise ConfigError(f"gradcam_target must be one of {GRADCAM_TARGETS}, got {config.gradcam_target!r}")
    if config.variant == "L":
        if config.latent_stride not in LITE0_STRIDES:
            raise ConfigError(f"CAVGA-L takes latent_stride 8 or 16, got {config.latent_stride}")
        if config.flatten_latent:
            raise ConfigError("CAVGA-L has a convolutional latent only (flatten_latent is Table 8's CAVGA-R*)")
    if config.variant != "L" and config.trunk != "lite0":
        raise ConfigError(f"trunk {config.trunk!r} is CAVGA-L's choice of EfficientNet-Lite; variant {config.variant} "
                          "has its own encoder")  # fmt: skip
    if config.variant == "D" and config.freeze_encoder:
        raise ConfigError("CAVGA-D's encoder trains from scratch: freeze_encoder is for pretrained R and L trunks")
    if config.variant == "D":
        n = _log2_exact(config.latent_stride, "latent_stride")
        if n < 2:
            raise ConfigError(f"CAVGA-D needs latent_stride >= 4 (two encoder layers), got {config.latent_stride}")
        if config.image_size % config.latent_stride:
            raise ConfigError(
                f"image_size {config.image_size} is not a multiple of latent_stride {config.latent_stride}"
            )
        if config.encoder_weights not in (None, "none", "imagenet"):
            raise ConfigError("encoder_weights applies to CAVGA-R and CAVGA-L only (CAVGA-D trains from scratch)")


def _build_d(config: ModelConfig, read_weights: bool = True) -> CavgaNet:  # D has no pretrained weights
    n_layers = _log2_exact(config.latent_stride, "latent_stride")
    encoder = DcganEncoder(config.channels, config.width, n_layers)
    k = encoder.out_channels[-1]
    h = config.image_size // config.latent_stride
    z_channels = k if config.flatten_latent else config.latent_channels
    decoder = DcganDecoder(z_channels, config.channels, encoder.out_channels)
    discriminator = DcganDiscriminator(config.channels, config.width, config.image_size)
    model = CavgaNet(config, encoder, (k, h, h), decoder, discriminator)
    dcgan_init(model)
    return model


def _build_r(config: ModelConfig, read_weights: bool = True) -> CavgaNet:
    # The trunk fixes the latent at stride 32; config.latent_stride describes CAVGA-D only.
    encoder = ResNetTrunk(config.channels)
    h = config.image_size // _RESNET_STRIDE
    z_channels = _RESNET_CHANNELS if config.flatten_latent else config.latent_channels
    n_blocks = _log2_exact(_RESNET_STRIDE, "stride")
    decoder = ResidualDecoder(z_channels, config.channels, config.width, n_blocks)
    discriminator = DcganDiscriminator(config.channels, config.width, config.image_size)
    model = CavgaNet(config, encoder, (_RESNET_CHANNELS, h, h), decoder, discriminator)
    # DCGAN init everywhere except the ResNet trunk, which keeps torchvision's default init.
    for part in (model.mu_head, model.logvar_head, model.decoder, model.discriminator):
        dcgan_init(part)
    weights = config.encoder_weights
    if weights == "imagenet":
        weights = torchvision_resnet18_path()
    if read_weights and weights not in (None, "none"):
        load_encoder_weights(model, weights)
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


def _build_l(config: ModelConfig, read_weights: bool = True) -> CavgaNet:
    # ImageNet weights unless told otherwise: they are why this variant exists (README, "What works").
    weights = "imagenet" if config.encoder_weights is None else config.encoder_weights
    pretrained = weights != "none"
    encoder = LiteEncoder(config.channels, config.latent_stride, pretrained, config.freeze_encoder, config.trunk)
    if read_weights and weights != "none":
        encoder.load_imagenet(None if weights == "imagenet" else weights)
    h = config.image_size // config.latent_stride
    n_blocks = _log2_exact(config.latent_stride, "latent_stride")
    decoder = ResidualDecoder(config.latent_channels, config.channels, config.width, n_blocks)
    discriminator = DcganDiscriminator(config.channels, config.width, config.image_size)
    model = CavgaNet(config, encoder, (encoder.out_channels, h, h), decoder, discriminator)
    for part in (model.mu_head, model.logvar_head, model.decoder, model.discriminator):
        dcgan_init(part)
    return model


_BUILDERS = {"D": _build_d, "R": _build_r, "L": _build_l}


def build_model(config: ModelConfig, read_weights: bool = True) -> CavgaNet:
    """Build the CAVGA network ``config.variant`` names ("D", "R" or "L"), after validating ``config``.
    ``read_weights=False`` builds it as configured (a frozen or pretrained trunk stays so) without reading its
    pretrained encoder weights: for a saved model, whose weights come from its own file.

    Encoders: D a DCGAN encoder, R ResNet-18 (the paper's), L an EfficientNet-Lite (``config.trunk``)."""
    _validate(config)
    return _BUILDERS[config.variant](config, read_weights)


def load_encoder_weights(model: CavgaNet, path: str | Path) -> None:
    """Load a torchvision-format ResNet-18 state dict from a local file into CAVGA-R's trunk (``fc.*`` ignored).

    Grayscale models get conv1 summed over the RGB input channels. Missing, unexpected or mis-shaped keys raise
    :class:`ModelFileError` naming the file and the keys. Never downloads.
    """
    path = Path(path)
    if not isinstance(model.encoder, ResNetTrunk):
        raise ConfigError("encoder weights load into CAVGA-R's ResNet-18 trunk only")
    state = {k: v for k, v in read_state_dict(path, "encoder weights").items() if not k.startswith("fc.")}
    expected = model.encoder.state_dict()
    unexpected = sorted(k for k in state if k not in expected)
    # Old torchvision files lack BatchNorm's step counter; it is not a weight.
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3 and expected["conv1.weight"].shape[1] == 1:
        state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)  # gray = R = G = B
    misshaped = sorted(
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    )
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ModelFileError(f"{path} does not match the ResNet-18 trunk; " + "; ".join(problems))
    for k, v in expected.items():
        if k not in state:  # only num_batches_tracked can get here
            state[k] = v
    model.encoder.load_state_dict(state, strict=True)
