"""Small helpers shared by several test modules."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["randomise_bn"]


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm eval statistics and affine parameters (so "unchanged" and folding are real checks); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()
