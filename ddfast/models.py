"""Model zoo for dataset distillation: the DC-style ConvNet family and small-image CNNs.

``create(name, in_channels, num_classes, image_size, width=None, **options)`` builds a model;
``available()`` lists the canonical names. Every model is a ``features`` module followed by a
``classifier`` Linear, and exposes ``embed(x)`` (flattened pre-classifier features), which
distribution / feature matching methods need.

``width`` is the model's base width (None = standard width):

* convnet*      channels of every conv layer (default 128)
* resnet18      stem / first-stage channels, stages are w, 2w, 4w, 8w (default 64)
* resnet*-dim   stem / first-stage channels, stages are w, 2w, 4w, 8w (default 64, as DiM)
* mobilenetv2   stem channels, all other layers scaled by width/32 (default 32)
* shufflenetv2  first-stage channels of the 0.5x config, all layers scaled by width/48 (default 48)
* wrn-16-2      stem channels, stages are 2w, 4w, 8w (default 16)
* vgg11         first conv channels, all layers scaled by width/64 (default 64)

Only the ConvNet family takes options: ``norm``, ``net_act``, ``pooling``, ``mnist_padding``.
Activations are never in-place so forward hooks always see unmodified tensors.

``resnet10-dim``, ``resnet18-dim``, ``resnet10ap-dim`` and ``resnet18ap-dim`` reproduce the ResNets of
DiM's model pool (vimar-gu/DiM ``models/resnet.py`` / ``models/resnet_ap.py``, non-CIFAR branch); they are
method-specific replicas, so ``available()`` lists them only with ``include_method_models=True``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "create",
    "available",
    "ConvNet",
    "ResNet18",
    "ResNetDiM",
    "ResNetAPDiM",
    "MobileNetV2",
    "ShuffleNetV2",
    "WideResNet",
    "VGG11",
]


class _Net(nn.Module):
    """``features`` -> flatten -> ``classifier``."""

    features: nn.Module
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _scaled(channels: int, scale: float) -> int:
    return max(1, round(channels * scale))


def _kaiming_init(model: nn.Module) -> None:
    """Standard ResNet/WRN init (He et al.): fan-out kaiming convs, zero linear bias (BN defaults already 1/0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- ConvNet


class ConvNet(_Net):
    """The ConvNet of DatasetCondensation (Zhao et al.): ``depth`` x [conv3x3 -> norm -> act -> pool].

    Submodule layout (``features.0``, ``features.1``, ... and ``classifier``) follows the DC code.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        net_act: str = "relu",
        pooling: str = "avgpool",
        mnist_padding: str = "dc",
    ) -> None:
        super().__init__()
        h, w = image_size
        # The DC code pads the first conv by 3 for 1-channel 28x28 inputs (MNIST, Fashion-MNIST), so
        # the network works at 32x32 (classifier Linear(width*4*4)); kept so accuracies compare.
        first_padding = 3 if mnist_padding == "dc" and in_channels == 1 and (h, w) == (28, 28) else 1
        h, w = h + 2 * first_padding - 2, w + 2 * first_padding - 2
        layers: list[nn.Module] = []
        channels = in_channels
        for d in range(depth):
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=first_padding if d == 0 else 1))
            if norm != "none":
                layers.append(_convnet_norm(norm, width))
            layers.append(_activation(net_act))
            if pooling != "none":
                layers.append(nn.MaxPool2d(2, 2) if pooling == "maxpool" else nn.AvgPool2d(2, 2))
                h, w = h // 2, w // 2
            channels = width
        if h < 1 or w < 1:
            raise ValueError(
                f"ConvNet of depth {depth} with {pooling} pooling reduces a {image_size[0]}x{image_size[1]} "
                f"image to {h}x{w}; use a larger image or a shallower ConvNet"
            )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)


def _convnet_norm(norm: str, channels: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "instancenorm":
        # The DC code's instance norm: one group per channel keeps an affine per channel.
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels, affine=True)
    return nn.GroupNorm(4, channels, affine=True)


def _activation(net_act: str) -> nn.Module:
    if net_act == "sigmoid":
        return nn.Sigmoid()
    if net_act == "leakyrelu":
        return nn.LeakyReLU(0.01)
    return nn.ReLU()


# --------------------------------------------------------------------------- ResNet-18


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(_Net):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, BasicBlock [2, 2, 2, 2]."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        stages: list[tuple[str, nn.Module]] = [
            ("conv1", nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)),
            ("bn1", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU()),
        ]
        channels = width
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)], start=1):
            out = width * mult
            stages.append((f"layer{i}", nn.Sequential(_BasicBlock(channels, out, stride), _BasicBlock(out, out, 1))))
            channels = out
        stages.append(("pool", nn.AdaptiveAvgPool2d(1)))
        self.features = nn.Sequential(OrderedDict(stages))
        self.classifier = nn.Linear(channels, num_classes)
        _kaiming_init(self)


# --------------------------------------------------------------------------- DiM pool ResNets
# vimar-gu/DiM @ 3657339, models/resnet.py (ResNet) and models/resnet_ap.py (ResNetAP), the branch
# taken for every non-CIFAR dataset (``dataset.startswith('cifar')`` False, ``size=-1`` => 'large').


class _DiMBlock(nn.Module):
    """BasicBlock of DiM's resnet.py:52-82 (``avg_pool=False``) or resnet_ap.py:78-111 (``avg_pool=True``).

    Submodule names (conv1, bn1, conv2, bn2, downsample.{0,1[,2]}) and their creation / registration
    order follow the official code, so a seeded init draws the same weights and the official
    ``state_dict`` loads after the prefix mapping of ``_DiMResNetBase``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, avg_pool: bool, ceil_mode: bool) -> None:
        super().__init__()
        # _make_layer builds the shortcut before the block (resnet.py:193-210), so its conv takes its
        # default-init random numbers first; it is registered last (resnet.py:63).
        downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            if avg_pool:  # resnet_ap.py:226-233: 1x1 stride-1 conv -> AvgPool(stride) -> BN
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
                    nn.AvgPool2d(stride, stride, ceil_mode=ceil_mode),
                    nn.BatchNorm2d(out_channels),
                )
            else:  # resnet.py:195-202: 1x1 stride-s conv -> BN
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False), nn.BatchNorm2d(out_channels)
                )
        # The AP block keeps conv1 at stride 1 and average-pools after its ReLU (resnet_ap.py:83, 99-100).
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1 if avg_pool else stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride
        self.pool_after_conv1 = avg_pool and stride != 1
        self.ceil_mode = ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        if self.pool_after_conv1:
            out = F.avg_pool2d(out, self.stride, self.stride, ceil_mode=self.ceil_mode)
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


_DIM_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}  # resnet.py:162-170 / resnet_ap.py:194-202 (BasicBlock depths)


class _DiMResNetBase(_Net):
    """Shared layout: ``features`` = layer0 (stem), layer1-4 (w, 2w, 4w, 8w), global average pool;
    ``classifier`` = the official ``fc``. Official ``state_dict`` keys map as ``layerN.*`` ->
    ``features.layerN.*`` and ``fc.*`` -> ``classifier.*``.
    """

    def __init__(
        self,
        stem: nn.Module,
        num_classes: int,
        depth: int,
        width: int,
        avg_pool: bool,
        ceil_mode: bool,
    ) -> None:
        super().__init__()
        if depth not in _DIM_BLOCKS:
            raise ValueError(f"DiM ResNet depth must be one of {sorted(_DIM_BLOCKS)}, got {depth!r}")
        stages: list[tuple[str, nn.Module]] = [("layer0", stem)]
        channels = width
        for i, (blocks, mult) in enumerate(zip(_DIM_BLOCKS[depth], (1, 2, 4, 8)), start=1):
            out, stride = width * mult, 1 if i == 1 else 2
            units = [_DiMBlock(channels if j == 0 else out, out, stride if j == 0 else 1, avg_pool, ceil_mode)
                     for j in range(blocks)]
            stages.append((f"layer{i}", nn.Sequential(*units)))
            channels = out
        # Official forward: F.avg_pool2d(x, x.shape[-1]) (resnet.py:224, resnet_ap.py:256), the same for the
        # square maps it supports; its registered ``avgpool = AvgPool2d(7)`` is never called and is left out.
        stages.append(("pool", nn.AdaptiveAvgPool2d(1)))
        self.features = nn.Sequential(OrderedDict(stages))
        self.classifier = nn.Linear(channels, num_classes)  # PyTorch default init, as the official fc
        # resnet.py:184-190 / resnet_ap.py:215-221: N(0, sqrt(2 / (k*k*out))) convs, BN weight 1 / bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class _DiMStem(nn.Module):
    """IntroBlock 'large' (conv1 -> bn1 -> relu -> pool); submodule names as the official code."""

    def __init__(self, conv: nn.Conv2d, pool: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv
        self.bn1 = nn.BatchNorm2d(conv.out_channels)
        self.relu = nn.ReLU()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn1(self.conv1(x))))


class ResNetDiM(_DiMResNetBase):
    """DiM's ``RN.ResNet(data, depth, num_classes, nch=in_channels)`` for a non-CIFAR dataset
    (models/resnet.py): ImageNet-style 7x7/2 conv stem + BN + ReLU + 3x3/2 max-pool (resnet.py:25-29),
    BasicBlock stages of [1,1,1,1] (depth 10) or [2,2,2,2] (depth 18) blocks with w, 2w, 4w, 8w channels,
    stride-2 3x3 conv + 1x1 stride-2 conv/BN shortcut at stages 2-4, global average pool, fc.

    Differences from the official module, none of which changes the function on square inputs:
    ``width`` (official: fixed 64) scales all channels; ReLUs are not in-place and the residual sum is
    out of place; the global pool is ``AdaptiveAvgPool2d(1)`` (official ``avg_pool2d(x, W)``, which
    equals it on square maps); the unused ``avgpool`` module is absent; modules are nested in
    ``features`` / ``classifier`` (see ``_DiMResNetBase`` for the key mapping).
    The official CIFAR branch (3x3 stem, 32-256 channels, (depth-2)/6 blocks) is not implemented.
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int = 18, width: int = 64) -> None:
        stem = _DiMStem(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        super().__init__(stem, num_classes, depth, width, avg_pool=False, ceil_mode=False)


def _ap_needs_ceil(image_size: tuple[int, int]) -> bool:
    """True when the official floor-mode pools would shrink a map to 0: the stem's AvgPool(4) gives
    s = size // 4 and the three stride-2 pools give s // 8 at layer4, so s < 8 (e.g. 28 px: 7 -> 3 -> 1 -> 0)."""
    return min(image_size) // 4 < 8


class ResNetAPDiM(_DiMResNetBase):
    """DiM's ``RNAP.ResNetAP(data, depth, num_classes, nch=in_channels)`` for a non-CIFAR dataset
    (models/resnet_ap.py): stem 7x7 stride-1 conv + BN + ReLU + AvgPool(4, 4) (resnet_ap.py:51-55);
    BasicBlocks whose stride-2 downsampling is an AvgPool(2, 2) after conv1's ReLU (resnet_ap.py:99-100)
    and a 1x1 stride-1 conv -> AvgPool(2, 2) -> BN shortcut (resnet_ap.py:226-233); stages w, 2w, 4w, 8w
    with [1,1,1,1] / [2,2,2,2] blocks; global average pool; fc.

    Documented deviation (spec A6.4): the official model cannot run on 28 px inputs (7x7 after the stem,
    then 3 -> 1 -> 0 at layer4, which PyTorch rejects). When ``ceil_mode`` is None (default) it is set to
    True iff ``image_size`` needs it (``min(H, W) // 4 < 8``, i.e. inputs under 32 px); then, and only
    then, the three stride-2 average pools inside the blocks (resnet_ap.py:100) and the three in the
    shortcuts (resnet_ap.py:231) use ``ceil_mode=True``: 28 px gives 7 -> 4 -> 2 -> 1, a partial window
    averaging only the pixels it covers. The stem's AvgPool(4) is unchanged. With ceil_mode False
    (every input of 32 px or more, where the official model runs) the function is exactly the official
    one. Other differences as ``ResNetDiM``: ``width`` = ``int(64 * official width)``, out-of-place ReLU
    and sum, ``AdaptiveAvgPool2d(1)`` global pool, unused ``avgpool`` absent, nesting in ``features``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        depth: int = 18,
        width: int = 64,
        ceil_mode: bool | None = None,
    ) -> None:
        if min(image_size) < 4:
            raise ValueError(f"ResNetAP's AvgPool(4) stem needs images of at least 4x4, got {image_size}")
        ceil = _ap_needs_ceil(image_size) if ceil_mode is None else bool(ceil_mode)
        stem = _DiMStem(nn.Conv2d(in_channels, width, 7, 1, 3, bias=False), nn.AvgPool2d(kernel_size=4, stride=4))
        super().__init__(stem, num_classes, depth, width, avg_pool=True, ceil_mode=ceil)
        self.ceil_mode = ceil


# --------------------------------------------------------------------------- MobileNetV2

# (expansion, out channels, blocks, stride); the second stage's stride is 1 instead of 2 for
# small images (as in the common CIFAR port), so the total downsampling is 8.
_MOBILENETV2_CFG = [
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
]


class _InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(_Net):
    """MobileNetV2 (Sandler et al.) with a stride-1 stem for small images; ``width`` = stem channels."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        scale = width / 32
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
        ]
        channels = width
        for expansion, out, blocks, stride in _MOBILENETV2_CFG:
            out = _scaled(out, scale)
            for i in range(blocks):
                layers.append(_InvertedResidual(channels, out, stride if i == 0 else 1, expansion))
                channels = out
        last = _scaled(1280, scale)
        layers += [nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)


# --------------------------------------------------------------------------- ShuffleNetV2


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _ShuffleUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        self.branch1: nn.Module | None = None
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(),
            )
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_channels if stride > 1 else branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2(_Net):
    """ShuffleNetV2 0.5x (stages 24, 48, 96, 192, 1024) with a stride-1 stem and no max-pool.

    ``width`` is the first stage's channels; every layer is scaled by width/48.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 48) -> None:
        super().__init__()
        scale = width / 48
        stem = _scaled(24, scale)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
        channels = stem
        for out, repeats in [(48, 4), (96, 8), (192, 4)]:
            out = 2 * max(1, round(out * scale / 2))  # units split channels in two halves
            units = [_ShuffleUnit(channels, out, 2)] + [_ShuffleUnit(out, out, 1) for _ in range(repeats - 1)]
            layers.append(nn.Sequential(*units))
            channels = out
        last = _scaled(1024, scale)
        layers += [nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)


# --------------------------------------------------------------------------- Wide ResNet


class _WideBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis (dropout 0)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        # A projection shortcut takes the pre-activated input, as in the reference code.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(_Net):
    """CIFAR-style WRN-depth-k; ``width`` = stem channels, stages are k*width, 2k*width, 4k*width."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 16, widen: int = 2, width: int = 16) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        stages: list[tuple[str, nn.Module]] = [("conv1", nn.Conv2d(in_channels, width, 3, 1, 1, bias=False))]
        channels = width
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2)], start=1):
            out = width * widen * mult
            units = [_WideBlock(channels if j == 0 else out, out, stride if j == 0 else 1) for j in range(blocks)]
            stages.append((f"block{i}", nn.Sequential(*units)))
            channels = out
        stages += [("bn", nn.BatchNorm2d(channels)), ("relu", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1))]
        self.features = nn.Sequential(OrderedDict(stages))
        self.classifier = nn.Linear(channels, num_classes)
        _kaiming_init(self)


# --------------------------------------------------------------------------- VGG-11

_VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(_Net):
    """VGG-11 with BatchNorm for small images; a max-pool is left out where it would shrink the map below 1x1."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 64) -> None:
        super().__init__()
        scale = width / 64
        h, w = image_size
        layers: list[nn.Module] = []
        channels = in_channels
        for v in _VGG11_CFG:
            if v == "M":
                if h >= 2 and w >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    h, w = h // 2, w // 2
                continue
            out = _scaled(int(v), scale)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)


# --------------------------------------------------------------------------- registry

_CONVNET_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "norm": ("instancenorm", ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")),
    "net_act": ("relu", ("relu", "sigmoid", "leakyrelu")),
    "pooling": ("avgpool", ("avgpool", "maxpool", "none")),
    # "dc": first conv padded by 3 for 1-channel 28x28 inputs, as the DC code does; "none": padding 1
    "mnist_padding": ("dc", ("dc", "none")),
}
# The DC code spells the pooling values this way; accept them so its configs carry over.
_VALUE_ALIASES = {"avgpooling": "avgpool", "maxpooling": "maxpool"}


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., nn.Module]  # (in_channels, num_classes, (h, w), width, **options)
    default_width: int
    options: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    method: str | None = None  # set for a replica of one method's own model (left out of available())


def _convnet_builder(depth: int) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, size: tuple[int, int], width: int, **options: str) -> nn.Module:
        return ConvNet(in_channels, num_classes, size, width, depth, **options)

    return build


_SPECS: dict[str, _Spec] = {
    "convnet": _Spec(_convnet_builder(3), 128, _CONVNET_OPTIONS),
    "convnetd4": _Spec(_convnet_builder(4), 128, _CONVNET_OPTIONS),
    "convnetd5": _Spec(_convnet_builder(5), 128, _CONVNET_OPTIONS),
    "resnet18": _Spec(lambda c, k, size, w: ResNet18(c, k, w), 64),
    "mobilenetv2": _Spec(lambda c, k, size, w: MobileNetV2(c, k, w), 32),
    "shufflenetv2": _Spec(lambda c, k, size, w: ShuffleNetV2(c, k, w), 48),
    "wrn-16-2": _Spec(lambda c, k, size, w: WideResNet(c, k, 16, 2, w), 16),
    "vgg11": _Spec(lambda c, k, size, w: VGG11(c, k, size, w), 64),
    # DiM's model pool (pool_match.py:115-117), non-CIFAR branch; ConvNet-D3 is "convnet".
    "resnet10-dim": _Spec(lambda c, k, size, w: ResNetDiM(c, k, 10, w), 64, method="dim"),
    "resnet18-dim": _Spec(lambda c, k, size, w: ResNetDiM(c, k, 18, w), 64, method="dim"),
    "resnet10ap-dim": _Spec(lambda c, k, size, w: ResNetAPDiM(c, k, size, 10, w), 64, method="dim"),
    "resnet18ap-dim": _Spec(lambda c, k, size, w: ResNetAPDiM(c, k, size, 18, w), 64, method="dim"),
}

_ALIASES = {"convnetd3": "convnet", "resnet18bn": "resnet18", "vgg11bn": "vgg11"}


def _key(name: str) -> str:
    # Case, '-', '_' and spaces are ignored: "ConvNet-D4" == "convnetd4", "wrn16_2" == "wrn-16-2".
    return re.sub(r"[-_\s]", "", name.lower())


_LOOKUP = {_key(n): n for n in _SPECS} | {_key(a): n for a, n in _ALIASES.items()}


def available(include_method_models: bool = False) -> list[str]:
    """Canonical names of the general model zoo accepted by :func:`create`; with
    ``include_method_models=True`` also the replicas of one method's own models (``*-dim``)."""
    return [name for name, spec in _SPECS.items() if include_method_models or spec.method is None]


def _names_help() -> str:
    aliases = ", ".join(f"{a}={n}" for a, n in _ALIASES.items())
    return f"available: {', '.join(_SPECS)} (aliases: {aliases}, e.g. convnet-d4, resnet-18, wrn16_2)"


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
        return _positive_int(image_size[0], "image height"), _positive_int(image_size[1], "image width")
    size = _positive_int(image_size, "image_size")
    return size, size


def create(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    width: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x H x W inputs and ``num_classes`` outputs.

    The result carries ``ddfast_name`` (canonical name) and ``ddfast_config``: the create arguments
    with the name canonicalised, ``image_size`` as (h, w) and defaults filled in, so
    ``create(**model.ddfast_config)`` rebuilds the same architecture and equal configs mean equal models.
    """
    if not isinstance(name, str) or _key(name) not in _LOOKUP:
        raise ValueError(f"unknown model {name!r}; {_names_help()}")
    canonical = _LOOKUP[_key(name)]
    spec = _SPECS[canonical]
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    size = _image_size(image_size)
    width = spec.default_width if width is None else _positive_int(width, "width")

    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise ValueError(f"model {canonical!r} got unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    resolved: dict[str, str] = {}
    for key, (default, choices) in spec.options.items():
        value = options.get(key, default)
        value = _VALUE_ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else value
        if value not in choices:
            raise ValueError(f"model {canonical!r}: invalid {key}={options[key]!r}; choose from {', '.join(choices)}")
        resolved[key] = value

    model = spec.build(in_channels, num_classes, size, width, **resolved)
    model.ddfast_name = canonical
    model.ddfast_config = {
        "name": canonical,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": size,
        "width": width,
        **resolved,
    }
    return model
