"""Model zoo: the CIFAR ResNet family (pretrained checkpoints from the shared folder) and
torchvision's classification models (random weights or a local state-dict file; nothing is
ever downloaded).

``build_model("cifar_resnet20")`` gives the pretrained ResNet-20 in eval mode;
``model_input_spec(name)`` gives the input normalisation and size the model expects.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from cora import paths
from cora.models.cifar_resnet import (
    CifarBasicBlock,
    CifarResNet,
    OptionAShortcut,
    blocks_per_stage,
    cifar_resnet,
    load_cifar_resnet,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CifarBasicBlock",
    "CifarResNet",
    "OptionAShortcut",
    "blocks_per_stage",
    "cifar_resnet",
    "load_cifar_resnet",
    "build_model",
    "model_input_spec",
    "torchvision_model_names",
]

# The CIFAR checkpoints were trained with the ImageNet statistics too (shared/README.md).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_RE = re.compile(r"cifar_resnet(\d+)")
_EXAMPLES = "cifar_resnet20, cifar_resnet32, cifar_resnet56, resnet18, resnet50, mobilenet_v2"


def torchvision_model_names() -> list[str]:
    """The classification model names torchvision knows (``resnet18``, ``mobilenet_v2``, ...)."""
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def _cifar_depth(name: str) -> int | None:
    m = _CIFAR_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def _check_name(name: str) -> None:
    if _cifar_depth(name) is not None:
        return
    if name not in torchvision_model_names():
        raise ValueError(
            f"unknown model {name!r}: use cifar_resnet<6n+2> or a torchvision classification "
            f"model name; examples: {_EXAMPLES}"
        )


def build_model(
    name: str,
    weights: str | os.PathLike | bool | None = None,
    shared: str | os.PathLike | None = None,
    pretrained_torchvision: bool = False,
) -> nn.Module:
    """Build a model by name, in eval mode.

    - ``cifar_resnet{6n+2}``: ``weights=None`` loads ``models/resnet{depth}-*.th`` from the
      shared folder, a path loads that checkpoint, ``weights=False`` gives a fresh
      Kaiming-initialised model.
    - torchvision classification names (``resnet18``, ``mobilenet_v2``, ...): random weights,
      unless ``weights`` is a local state-dict file, or ``pretrained_torchvision=True`` and
      torchvision's default weights are already in the local torch hub cache. Never downloads.

    Raises ``ValueError`` for an unknown name (with examples), ``FileNotFoundError`` for
    weights that cannot be found.
    """
    _check_name(name)
    depth = _cifar_depth(name)
    if depth is not None:
        if weights is False:
            return cifar_resnet(depth).eval()
        if weights is True:
            weights = None
        return load_cifar_resnet(depth, weights=weights, shared=shared)

    import torchvision.models as tvm

    model = tvm.get_model(name, weights=None)
    if weights not in (None, False, True):
        path = paths.find_file(weights, shared)
        model.load_state_dict(_read_plain_state_dict(path), strict=True)
    elif pretrained_torchvision or weights is True:
        model.load_state_dict(_cached_torchvision_state(name), strict=True)
    return model.eval()


def _read_plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path} is not a readable torch checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a state dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _cached_torchvision_state(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default weights for ``name`` from the hub cache, never from the network."""
    import torchvision.models as tvm

    w = tvm.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if not cached.is_file():
        raise FileNotFoundError(
            f"pretrained weights for {name} are not in the local cache ({cached}); cora never "
            f"downloads: fetch {w.url} yourself and pass weights=<file>"
        )
    return _read_plain_state_dict(cached)


def model_input_spec(name: str) -> dict:
    """What the model expects as input.

    Returns ``{"mean": (r, g, b), "std": (r, g, b), "image_size": int, "resize_size": int,
    "num_classes": int, "layout": "NCHW float32, RGB scaled to [0, 1] then normalised"}``.
    CIFAR ResNets: 32×32, no resize. torchvision models: the crop/resize sizes of their
    default weights' preset (224/256 for most), ImageNet mean/std.
    """
    _check_name(name)
    layout = "NCHW float32, RGB scaled to [0, 1] then normalised"
    if _cifar_depth(name) is not None:
        blocks_per_stage(_cifar_depth(name))  # validate the depth
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 32, "resize_size": 32,
                "num_classes": 10, "layout": layout}
    import torchvision.models as tvm

    size, resize = 224, 256
    try:  # metadata only: no download happens here
        t = tvm.get_model_weights(name).DEFAULT.transforms()
        size, resize = int(t.crop_size[0]), int(t.resize_size[0])
    except Exception:
        pass
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": size, "resize_size": resize,
            "num_classes": 1000, "layout": layout}
