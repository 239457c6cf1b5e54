"""Which layers ``convert`` quantizes, at which width, and what each one needs.

``quantizable_layers`` picks the convs and linears (and lists the skipped ones with why); ``layer_bits_of``
gives a layer's width (a ``layer_bits`` pattern, ``grouped_bits``, the mixed-precision choice, else ``bits``);
``uses_statistics`` says whether phase 1 needs the layer's input second moments; ``stored_rank`` how many
singular triplets of its residual to keep for the search.
"""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from .budget import affordable_rank
from .config import CoRaConfig
from .modules import CoRaConv2d, QuantLinear
from .search import mask_margin

__all__ = ["quantizable_layers", "layer_bits_of", "fixed_bits", "uses_statistics", "stored_rank", "matches_any"]


def matches_any(name: str, patterns) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def plain_subclass(mod: nn.Module) -> bool:
    """A Conv2d / Linear subclass whose forward is the base class's (timm's ``Linear``, for one): its
    output is the plain conv / linear, so the quantized layer can stand in for it exactly."""
    if isinstance(mod, nn.Conv2d):
        cls = type(mod)
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


def quantizable_layers(model: nn.Module, config: CoRaConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The convs (and linears) ``convert`` will quantize, and the skipped ones with the reason.

    Every conv- or linear-like layer that is not converted is listed in the skipped dict with why
    (other conv types such as ``Conv1d`` / ``Conv3d`` / transposed convs, subclasses with their own
    forward (a subclass that keeps the base forward is converted), skip patterns,
    ``quantize_linear=False``). A ``skip`` or ``layer_bits`` pattern that matches none of those
    layers raises ``ValueError`` naming it.
    """
    chosen, skipped = {}, {}
    candidates = []  # names of every conv / linear layer, for the pattern check
    for name, mod in model.named_modules():
        if isinstance(mod, (CoRaConv2d, QuantLinear)):
            raise ValueError(f"layer {name!r} is already quantized; convert the float model")
        if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        candidates.append(name)
        if type(mod) not in (nn.Conv2d, nn.Linear) and not plain_subclass(mod):
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                skipped[name] = f"subclass {type(mod).__name__} has its own forward: not converted (stays float)"
            else:
                skipped[name] = f"{type(mod).__name__} is not supported (stays float): cora quantizes Conv2d and Linear"
            continue
        if matches_any(name, config.skip):
            skipped[name] = "skipped by the config"
        elif isinstance(mod, nn.Linear) and not config.quantize_linear:
            skipped[name] = "linear layers not quantized (quantize_linear=False)"
        else:
            chosen[name] = mod
    for what, patterns in (("skip", config.skip), ("layer_bits", [p for p, _ in config.layer_bits])):
        for pattern in patterns:
            if not any(matches_any(n, (pattern,)) for n in candidates):
                few = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
                raise ValueError(f"{what} pattern {pattern!r} matches no conv or linear layer of the model (they are: {few})")
    if not chosen:
        why = f" (skipped: {sorted(skipped)})" if skipped else ""
        raise ValueError("the model has no Conv2d or Linear layer to quantize" + why)
    return chosen, skipped


def uses_statistics(mod: nn.Module, config: CoRaConfig) -> bool:
    """Whether phase 1 needs the layer's input second moments: GPTQ rounds it, or it is a conv or linear
    layer that gets an activation-aware adapter (grouped convs have neither: their K differs per group)."""
    if getattr(mod, "groups", 1) != 1:
        return False
    if config.quantizer.rounding == "gptq":
        return True
    return config.method != "none" and config.adapter.factorization == "activation"


def stored_rank(shape, config: CoRaConfig, weight_params: int) -> int:
    """How many singular triplets of a layer's residual to compute: the most rank it can afford under the
    budget, times the margin beyond which the search's soft mask weighs a direction below 1e-3."""
    margin = mask_margin(config.search.order) if config.method == "search" else 1.0
    return affordable_rank(tuple(shape), config.budget, weight_params, margin=margin)


def fixed_bits(name: str, layer: nn.Module, config: CoRaConfig) -> int | None:
    """A width the config fixes: the first ``layer_bits`` pattern the layer matches, else ``grouped_bits``
    for a grouped conv, else None."""
    for pattern, b in config.layer_bits:
        if matches_any(name, (pattern,)):
            return b
    if config.grouped_bits is not None and getattr(layer, "groups", 1) > 1:
        return config.grouped_bits
    return None


def layer_bits_of(name: str, layer: nn.Module, config: CoRaConfig, widths: dict[str, int] | None = None) -> int:
    """A layer's width: fixed by the config, else chosen for ``target_bits`` (``widths``), else ``bits``."""
    fixed = fixed_bits(name, layer, config)
    if fixed is not None:
        return fixed
    return widths[name] if widths and name in widths else config.bits
