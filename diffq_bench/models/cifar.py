"""The CIFAR models of the DiffQ paper's vision experiments, plus a configurable small ResNet.

- ``resnet18``: the classic CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2] of
  widths 64..512, 1x1-conv + BN projection shortcuts, 4x4 average pool): 11,173,962 parameters
  with 10 classes.
- ``mobilenet``: MobileNet v1 adapted to 32x32 inputs (stride-1 3x3 stem of 32 channels, 13
  depthwise-separable blocks, no biases in the convolutions): 3,217,226 parameters with 10 classes.
- ``wrn28_10``: Wide-ResNet-28-10 (pre-activation blocks, widths 160/320/640, 4 blocks per
  group, dropout between the two convolutions, convolutions with biases as in the implementation
  the DiffQ recipes used): 36,489,290 parameters with 10 classes.
- ``resnet20``: He et al.'s CIFAR ResNet-20 (3 stages of 3 BasicBlocks, widths 16/32/64,
  parameter-free zero-padding shortcuts), the official diffq ResNet-20 preset's model: 269,722
  parameters with 10 classes.
- ``resnet``: the same ResNet family with configurable ``blocks`` and ``widths`` (used, small,
  by the embedded digits task).

All accept any input size (global average pooling), so a model sized for CIFAR also runs on the
embedded digits. The parameter counts above are pinned by tests.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F


class _PadShortcut(nn.Module):
    """He et al.'s option A shortcut: stride-2 subsampling and zero channels, no parameters."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 projection (``projection``) or
    zero-padding (``pad``, He et al.'s option A) one where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if (stride != 1 or in_planes != planes) and shortcut == "pad":
            self.shortcut = _PadShortcut(planes - in_planes)
        elif stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, one stage per entry of ``blocks``, global average pool.

    Args:
        num_classes: number of output classes.
        blocks: number of BasicBlocks per stage; every stage after the first halves the resolution.
        widths: channels of each stage (same length as ``blocks``); the stem has ``widths[0]``.
        in_channels: channels of the input images.
        stem_stride: stride of the 3x3 stem (1 for CIFAR; 2 quarters the compute on inputs
            upsampled from a lower resolution, like the embedded digits).
        shortcut: ``projection`` (1x1 conv + BN) or ``pad`` (option A, the CIFAR ResNet-20).
    """

    def __init__(self, num_classes: int = 10, blocks: tp.Sequence[int] = (2, 2, 2, 2),
                 widths: tp.Sequence[int] = (64, 128, 256, 512), in_channels: int = 3,
                 stem_stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        if shortcut not in ("projection", "pad"):
            raise ValueError(f"shortcut must be projection or pad, got {shortcut!r}")
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks and widths must be non-empty and of the same length, "
                             f"got blocks={list(blocks)} widths={list(widths)}")
        if any(int(b) < 1 for b in blocks) or any(int(w) < 1 for w in widths):
            raise ValueError(f"blocks and widths must be >= 1, got {list(blocks)}, {list(widths)}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths)):
            layers = []
            for block in range(int(count)):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, int(width), stride, shortcut))
                in_planes = int(width)
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        # Global pooling: identical to the paper's avg_pool2d(4) on 32x32 inputs, and size-agnostic.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)))


class MobileNet(nn.Module):
    """MobileNet v1 for 32x32 inputs (stride-1 stem, four stride-2 blocks).

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images.
    """
    # (out_channels, stride) of the 13 depthwise-separable blocks.
    CFG: tp.Tuple[tp.Tuple[int, int], ...] = (
        (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
        (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        layers = []
        in_planes = 32
        for out_planes, stride in self.CFG:
            layers.append(_DepthwiseSeparable(in_planes, out_planes, stride))
            in_planes = out_planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class _WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3, plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1, 1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=True)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Wide-ResNet-``depth``-``widen``.

    Args:
        num_classes: number of output classes.
        depth: total depth, ``6n + 4``.
        widen: width multiplier of the three groups (16, 32, 64 channels times ``widen``).
        dropout: dropout probability inside each block (0.3 in the WRN paper's CIFAR runs).
        in_channels: channels of the input images.
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, widen: int = 10,
                 dropout: float = 0.3, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28...), got {depth}")
        if widen < 1:
            raise ValueError(f"Wide-ResNet widen must be >= 1, got {widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        per_group = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=True)
        groups = []
        in_planes = widths[0]
        for index, width in enumerate(widths[1:]):
            layers = []
            for block in range(per_group):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(_WideBlock(in_planes, width, stride, dropout))
                in_planes = width
            groups.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _resnet18(num_classes: int, **kwargs: tp.Any) -> nn.Module:
    return ResNet(num_classes, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), **kwargs)


def _resnet20(num_classes: int, **kwargs: tp.Any) -> nn.Module:
    # The ResNet-20 of the official diffq CIFAR preset (res20.yaml): 3 stages of 3 blocks, widths
    # 16/32/64, option-A shortcuts, Kaiming-normal convolutions and linear layer.
    model = ResNet(num_classes, blocks=(3, 3, 3), widths=(16, 32, 64), shortcut="pad", **kwargs)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
    return model


def _wrn28_10(num_classes: int, **kwargs: tp.Any) -> nn.Module:
    return WideResNet(num_classes, depth=28, widen=10, **kwargs)


#: name -> constructor(num_classes, **kwargs); the CIFAR models of the paper and the small ResNet.
CIFAR_MODELS: tp.Dict[str, tp.Callable[..., nn.Module]] = {
    "resnet18": _resnet18,
    "resnet20": _resnet20,
    "mobilenet": MobileNet,
    "wrn28_10": _wrn28_10,
    "resnet": ResNet,
    "wide_resnet": WideResNet,
}


def create_cifar_model(name: str, num_classes: int, **kwargs: tp.Any) -> nn.Module:
    """Build a model of :data:`CIFAR_MODELS` by name.

    Args:
        name: a key of :data:`CIFAR_MODELS`.
        num_classes: number of output classes.
        kwargs: extra constructor arguments (``blocks``/``widths`` for ``resnet``, ``dropout``...).
    Raises:
        ValueError: unknown name (the message lists the valid ones) or bad argument.
    """
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown CIFAR model {name!r}; valid: {', '.join(sorted(CIFAR_MODELS))}")
    try:
        return CIFAR_MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for CIFAR model {name!r}: {exc}") from exc
