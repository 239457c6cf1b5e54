"""The model registry: names -> builders, input specs and preprocessing records.

The CIFAR ResNet family and the CIFAR ShuffleNetV2 x0.5 (pretrained checkpoints from the shared
folder) and torchvision's classification models (random weights or a local state-dict file;
nothing is ever downloaded).

``build_model("cifar_resnet20")`` gives the pretrained ResNet-20 in eval mode;
``model_input_spec(name)`` gives the input normalisation and size the model expects;
:func:`read_state_dict` is the one reader of ``.th`` / ``.pt`` state-dict files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .paths import find_file, find_glob
from .cifar_resnet import (
    CifarBasicBlock,
    CifarResNet,
    OptionAShortcut,
    blocks_per_stage,
    cifar_resnet,
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
    "cifar_shufflenetv2_x0_5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "build_model",
    "load_float_model",
    "model_input_spec",
    "preprocessing_for",
    "CIFAR10_CLASSES",
    "read_state_dict",
    "torchvision_model_names",
]

# The CIFAR ResNet checkpoints were trained with the ImageNet statistics too (shared/README.md);
# the ShuffleNet with CIFAR-10's own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_CIFAR_RE = re.compile(r"cifar_resnet(\d+)")
_EXAMPLES = ("cifar_resnet20, cifar_resnet32, cifar_resnet56, cifar_shufflenetv2_x0_5, resnet18, resnet50, "
             "mobilenet_v2")


def cifar_shufflenetv2_x0_5(num_classes: int = 10) -> nn.Module:
    """torchvision's ShuffleNetV2 x0.5 in its CIFAR variant: a 3x3 stride-1 stem conv and no max-pool,
    so the stem keeps 32x32 (the layout of ``models/cifar10_shufflenetv2_x0_5-*.pt``)."""
    from torchvision.models import ShuffleNetV2

    model = ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024], num_classes=num_classes)
    model.conv1[0] = nn.Conv2d(3, 24, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


# The other pretrained CIFAR models: name -> (builder, checkpoint glob in the shared folder, mean, std).
_CIFAR_ZOO = {
    "cifar_shufflenetv2_x0_5": (cifar_shufflenetv2_x0_5, "models/cifar10_shufflenetv2_x0_5-*.pt",
                                CIFAR10_MEAN, CIFAR10_STD),
}


def torchvision_model_names() -> list[str]:
    """The classification model names torchvision knows (``resnet18``, ``mobilenet_v2``, ...)."""
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def _cifar_depth(name: str) -> int | None:
    m = _CIFAR_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def _is_cifar(name: str) -> bool:
    return _cifar_depth(name) is not None or name in _CIFAR_ZOO


def _check_name(name: str) -> None:
    if _is_cifar(name):
        return
    if name not in torchvision_model_names():
        raise ValueError(
            f"unknown model {name!r}: use cifar_resnet<6n+2>, {', '.join(_CIFAR_ZOO)} or a torchvision "
            f"classification model name; examples: {_EXAMPLES}"
        )


def build_model(
    name: str,
    weights: str | os.PathLike | bool | None = None,
    shared: str | os.PathLike | None = None,
    pretrained_torchvision: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a model by name, in eval mode.

    - ``cifar_resnet{6n+2}``: ``weights=None`` loads ``models/resnet{depth}-*.th`` from the
      shared folder, a path loads that checkpoint, ``weights=False`` gives a fresh
      Kaiming-initialised model. The one keyword argument is ``num_classes`` (default 10).
    - ``cifar_shufflenetv2_x0_5`` (:func:`cifar_shufflenetv2_x0_5`): the same, from
      ``models/cifar10_shufflenetv2_x0_5-*.pt``; ``weights=False`` gives torchvision's initialisation.
    - torchvision classification names (``resnet18``, ``mobilenet_v2``, ...): random weights,
      unless ``weights`` is a local state-dict file, or ``pretrained_torchvision=True`` and
      torchvision's default weights are already in the local torch hub cache. Never downloads.
      Keyword arguments go to the model's constructor (``torchvision.models.get_model``), e.g.
      ``build_model("googlenet", weights=False, aux_logits=False, init_weights=False)``.

    Raises ``ValueError`` for an unknown name (with examples), for keyword arguments the model
    does not take, and for weights that do not fit the model (one line: how many keys are missing
    or unexpected, the first few of them, shape mismatches); ``FileNotFoundError`` for weights that
    cannot be found.
    """
    _check_name(name)
    if _is_cifar(name):
        unknown = sorted(set(kwargs) - {"num_classes"})
        if unknown:
            raise ValueError(f"{name} takes no keyword argument(s) {', '.join(unknown)} (only num_classes)")
    if name in _CIFAR_ZOO:
        builder, pattern = _CIFAR_ZOO[name][:2]
        model = _construct(name, lambda: builder(**kwargs), kwargs)
        if weights is not False:
            path = find_glob(pattern, shared) if weights in (None, True) else find_file(weights, shared)
            _load_checked(model, read_state_dict(path), f"{path} does not fit {name}{_fmt_kwargs(kwargs)}")
        return model.eval()
    depth = _cifar_depth(name)
    if depth is not None:
        if weights is False:
            return _construct(name, lambda: cifar_resnet(depth, **kwargs), kwargs).eval()
        if weights is True:
            weights = None
        return load_cifar_resnet(depth, weights=weights, shared=shared, **kwargs)

    import torchvision.models as tvm

    model = _construct(name, lambda: tvm.get_model(name, weights=None, **kwargs), kwargs)
    if weights not in (None, False, True):
        path = find_file(weights, shared)
        _load_checked(model, read_state_dict(path), f"{path} does not fit {name}{_fmt_kwargs(kwargs)}")
    elif pretrained_torchvision or weights is True:
        state = _cached_torchvision_state(name)
        _load_checked(model, state, f"torchvision's pretrained weights do not fit {name}{_fmt_kwargs(kwargs)}")
    return model.eval()


def load_float_model(name: str, weights=None, shared=None) -> nn.Module:
    """The float model by name (:func:`build_model`), in eval mode, tagged with ``cora_architecture =
    {"name": name}`` so that :func:`cora.save` records how to rebuild it."""
    model = build_model(name, weights=weights, shared=shared)
    model.cora_architecture = {"name": name}
    return model.eval()


def _fmt_kwargs(kwargs: dict) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")" if kwargs else ""


def _construct(name: str, build, kwargs: dict) -> nn.Module:
    """``build()``; when it rejects the caller's keyword arguments (unknown keyword, wrong type, a
    negative size, ...), a one-line ``ValueError`` naming the model and the arguments."""
    try:
        return build()
    except (TypeError, ValueError, RuntimeError) as e:
        if not kwargs:
            raise
        msg = " ".join(str(e).split())
        raise ValueError(f"cannot build {name}{_fmt_kwargs(kwargs)}: {type(e).__name__}: {msg}") from e


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], head: str) -> None:
    """A strict ``load_state_dict`` whose failure is one line (see :func:`_mismatch`) instead of
    torch's one line per key."""
    expected = model.state_dict()
    # Checkpoints from before BatchNorm's num_batches_tracked counter lack it; it only matters for
    # momentum=None training, so a zero fills it.
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state and k.replace("num_batches_tracked", "running_mean") in state:
            state[k] = torch.zeros((), dtype=torch.long)
    problem = _mismatch(expected, state)
    if problem:
        raise ValueError(f"{head}: {problem}")
    model.load_state_dict(state, strict=True)


def _mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into a model with ``expected``, in one line ("" if it fits)."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if k in state and state[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if bad:
        parts.append(f"{len(bad)} shape mismatches, checkpoint vs model ({_first(bad, 3)})")
    return "; ".join(parts)


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
    return read_state_dict(cached)


def model_input_spec(name: str) -> dict:
    """What the model expects as input.

    Returns ``{"mean": (r, g, b), "std": (r, g, b), "image_size": int, "resize_size": int,
    "num_classes": int, "layout": "NCHW float32, RGB scaled to [0, 1] then normalised"}``.
    CIFAR ResNets: 32×32, no resize, ImageNet mean/std; ``cifar_shufflenetv2_x0_5``: 32×32, CIFAR-10
    mean/std. torchvision models: the crop/resize sizes of their default weights' preset (224/256
    for most), ImageNet mean/std.
    """
    _check_name(name)
    layout = "NCHW float32, RGB scaled to [0, 1] then normalised"
    if name in _CIFAR_ZOO:
        mean, std = _CIFAR_ZOO[name][2:]
        return {"mean": mean, "std": std, "image_size": 32, "resize_size": 32, "num_classes": 10, "layout": layout}
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


def preprocessing_for(name: str, kwargs: dict | None = None, class_names=None) -> dict:
    """How an encoded RGB image becomes the input of model ``name`` (built with ``kwargs``), as
    recorded in checkpoints for serving: ``{"image_size": int, "resize_size": int, "mean": [r, g, b],
    "std": [r, g, b], "class_names": [str, ...] or None}``. The image is resized so that its short
    side is ``resize_size``, centre-cropped to ``image_size`` square, scaled to [0, 1] and normalised.

    ``class_names``: given, or CIFAR-10's for the CIFAR models and the ImageNet categories of
    torchvision's weights metadata (no download) when the class count is the default one; else None.
    """
    spec = model_input_spec(name)
    kwargs = kwargs or {}
    if class_names is None and kwargs.get("num_classes", spec["num_classes"]) == spec["num_classes"]:
        if _is_cifar(name):
            class_names = CIFAR10_CLASSES
        else:
            import torchvision.models as tvm

            try:  # metadata only
                class_names = tvm.get_model_weights(name).DEFAULT.meta["categories"]
            except Exception:
                class_names = None
    return {"image_size": spec["image_size"], "resize_size": spec["resize_size"], "mean": list(spec["mean"]),
            "std": list(spec["std"]), "class_names": None if class_names is None else [str(c) for c in class_names]}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load ``path`` as a checkpoint: a dict with ``state_dict`` (or a bare state dict), with
    any DataParallel ``module.`` prefix stripped."""
    try:
        obj = torch.load(path, map_location="cpu")
    except Exception as e:  # pickle errors, zip errors, weights_only refusals, ...
        raise ValueError(f"{path} is not a readable torch checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"{path} is not a checkpoint: expected a state dict (str -> Tensor) or a dict with "
            f"'state_dict', got {type(obj).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _checkpoint_blocks(state: dict[str, torch.Tensor]) -> int | None:
    idx = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))}
    return max(idx) + 1 if idx else None


def _first(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def load_cifar_resnet(
    depth: int,
    weights: str | os.PathLike | None = None,
    shared: str | os.PathLike | None = None,
    **kwargs,
) -> CifarResNet:
    """A CIFAR ResNet with pretrained weights, in eval mode (``kwargs``: ``num_classes``).

    ``weights`` is a checkpoint path; by default ``models/resnet{depth}-*.th`` is looked up
    in the shared folder (``shared``, ``CORA_SHARED`` or ``../shared``, see
    :mod:`cora.zoo.paths`). The load is strict. Raises ``FileNotFoundError`` (naming every place
    looked at), or ``ValueError`` for a file that is not a checkpoint or does not fit the depth
    (one line: the blocks per stage it has, how many keys are missing / unexpected and the first few,
    shape mismatches).
    """
    model = _construct(f"cifar_resnet{depth}", lambda: cifar_resnet(depth, **kwargs), kwargs)
    if weights is None:
        path = find_glob(f"models/resnet{depth}-*.th", shared)
    else:
        path = find_file(weights, shared)
    state = read_state_dict(path)
    head = f"{path} does not fit cifar_resnet{depth}{_fmt_kwargs(kwargs)}"
    got = _checkpoint_blocks(state)
    if got is not None and got != model.n:
        head += f" (checkpoint has {got} blocks per stage (depth {6 * got + 2}), cifar_resnet{depth} expects {model.n})"
    _load_checked(model, state, head)
    return model.eval()
