"""Small helpers shared by several test modules."""
from __future__ import annotations

import torch
import torch.nn as nn

from cora.budget import AdaptedLayer
from cora.quantizer import compute_qparams, fake_quantize
from cora.residual import ResidualFactors, factorize_residual, full_rank

__all__ = ["randomise_bn", "fake_adapted_layer", "ToyCNN", "toy_setup", "compile_fullgraph"]


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


def fake_adapted_layer(name: str, c_out: int, c_in: int, k: int) -> AdaptedLayer:
    """An AdaptedLayer whose factors have the right shapes (allocation only reads shapes)."""
    shape = (c_out, c_in, k, k)
    R = full_rank(shape)
    f = ResidualFactors(torch.zeros(c_out, R), torch.ones(R), torch.zeros(R, c_in * k * k), shape)
    return AdaptedLayer(name, torch.zeros(shape), f)


class ToyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 24, 1, bias=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x))) + x
        x = torch.relu(self.conv4(x))
        return self.fc(x.mean((2, 3)))


def toy_setup(seed=0, n=64, bits=2):
    torch.manual_seed(seed)
    model = ToyCNN().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    layers = []
    for name in ("conv1", "conv2", "conv3", "conv4"):
        w = model.get_submodule(name).weight.detach()
        s, z = compute_qparams(w, bits)
        qw = fake_quantize(w, s, z, bits)
        layers.append(AdaptedLayer(name, qw, factorize_residual(w - qw, method="weight")))
    conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return model, layers, x, y, conv_params


def compile_fullgraph(model: nn.Module, x: torch.Tensor):
    """``model(x)`` eager and through ``torch.compile(fullgraph=True)`` with a recording backend (no grad):
    ``(eager, compiled, graphs)``, ``graphs`` the FX graphs dynamo handed to the backend."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=backend)(x)
    return eager, compiled, graphs
