"""What ``cora.deploy`` fuses on real architectures: a count per model, in seconds, no calibration.

Every ``nn.Conv2d`` of a random-weight model (BatchNorm statistics randomised, eval mode) becomes a
``CoRaConv2d`` (4 bits, rank-1 adapter; grouped convs take none) without any calibration; then
``cora.deploy``. Per model: convs, convs fused into one launch (``DeployedConv``), BatchNorms folded,
the fused activations by name, residual adds fused by rewriting the graph, the result's type, and the
deployed model's output against the undeployed one on 2 random 64x64 images (reference path, fp32).

    python bench/deploy_fusion.py                           # the torchvision and (if installed) timm models
    python bench/deploy_fusion.py mobilenet_v2 timm:repvgg_a0

Names are torchvision model names, or ``timm:<name>`` (needs timm).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cora

TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
               "densenet121", "shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5", "googlenet"]
TIMM = ["timm:resnet18d", "timm:efficientnet_lite0", "timm:repvgg_a0", "timm:mobilevitv2_050", "timm:ghostnet_100",
        "timm:convnext_atto", "timm:densenet121"]


def build(name: str) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (folding is then a real check); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def quantized(model: nn.Module) -> nn.Module:
    import cora

    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            parent, _, child = name.rpartition(".")
            new = cora.CoRaConv2d.from_conv(m, 4, 1 if m.groups == 1 else 0)
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="default: the torchvision list, and the timm list when timm is installed")
    args = ap.parse_args(argv)
    os.environ["CORA_BACKEND"] = "reference"  # the counts and the check need no GPU
    torch.set_num_threads(1)
    import cora
    from cora.deploy import DeployedConv

    names = args.models
    if not names:
        try:
            import timm  # noqa: F401
            names = TORCHVISION + TIMM
        except ImportError:
            names = TORCHVISION
    print(f"{'model':<24}{'convs':>6}{'fused':>6}{'BN folded':>10}{'graph adds':>11}  {'result':<14}{'rel err':>9}  activations")
    for name in names:
        torch.manual_seed(0)
        model = quantized(randomised(build(name), 1))
        convs = sum(isinstance(m, cora.CoRaConv2d) for m in model.modules())
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = model(x)
            dep = cora.deploy(model, weights="packed")  # dense would wrap unfused convs too
            err = float((dep(x) - want).norm() / want.norm())
        fused = [m for m in dep.modules() if isinstance(m, DeployedConv)]
        acts = Counter(m.activation or "none" for m in fused)
        graph = getattr(dep, "graph", None)
        adds = sum(n.op == "call_module" and "residual" in n.kwargs for n in graph.nodes) if graph is not None else 0
        kind = "GraphModule" if graph is not None else "same class"
        print(f"{name:<24}{convs:>6}{len(fused):>6}{dep.cora_deploy['folded_bn']:>10}{adds:>11}  {kind:<14}{err:>9.1e}  "
              + ", ".join(f"{k} {v}" for k, v in sorted(acts.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
