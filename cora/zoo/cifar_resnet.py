"""CIFAR ResNets of depth 6n+2 (He et al. 2016, §4.2) with "option A" shortcuts.

The module tree matches the published "Proper ResNet Implementation for CIFAR10/CIFAR100 in
PyTorch" checkpoints (``models/resnet{20,32}-*.th`` in the shared folder) key for key once
their ``module.`` prefix is stripped: ``conv1``, ``bn1``, ``layer1``..``layer3`` (each an
``nn.Sequential`` of :class:`CifarBasicBlock`) and ``linear``.

Layout: inputs are float32 NCHW ``[N, 3, 32, 32]``, normalised with the ImageNet mean/std on
[0, 1] RGB (see :func:`cora.zoo.model_input_spec`); outputs are logits ``[N, num_classes]``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "OptionAShortcut",
    "CifarBasicBlock",
    "CifarResNet",
    "blocks_per_stage",
    "cifar_resnet",
]

STAGE_WIDTHS = (16, 32, 64)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut for a block that halves the resolution and doubles the width.

    ``[N, C, H, W] -> [N, C + 2*pad, ceil(H/2), ceil(W/2)]``: keep every other pixel
    (``x[:, :, ::2, ::2]``) and zero-pad ``pad`` channels on *each* side, so the original
    channels sit in the middle (this placement is what the checkpoints were trained with).
    """

    def __init__(self, pad: int, stride: int = 2) -> None:
        super().__init__()
        self.pad = int(pad)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    ``shortcut`` is ``nn.Identity`` when shape is kept, else :class:`OptionAShortcut`; it
    never has parameters. The submodules are plain attributes so a later pass can fuse
    conv+BN+ReLU+residual-add per block.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            # Option A assumes the width grows by exactly the padding on both sides.
            if planes - in_planes != 2 * (planes // 4):
                raise ValueError(f"option A shortcut needs planes = 2*in_planes, got {in_planes}->{planes}")
            self.shortcut: nn.Module = OptionAShortcut(planes // 4, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """conv1 3->16, three stages of ``n`` blocks (16, 32, 64 channels; stride 2 at the start
    of stages 2 and 3), global average pooling, linear 64->num_classes. Depth = 6n+2."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.n = n
        self.depth = 6 * n + 2
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for i, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def blocks_per_stage(depth: int) -> int:
    """``n`` for a depth ``6n+2``; ``ValueError`` for any other depth."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...), got {depth!r}"
        )
    return (depth - 2) // 6


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """A freshly (Kaiming-)initialised CIFAR ResNet of the given depth."""
    return CifarResNet(blocks_per_stage(depth), num_classes)
