"""The caller's model around a conversion: checked before, given back in its own dtype after.

``check_model`` (one device, one floating dtype, finite values), ``probe_outputs`` (what the losses need of
the model's output, on one image), ``restore_dtype`` and ``transplant`` (a float16 / bfloat16 / float64
model is converted through a float32 copy and comes back in its own dtype, in place when asked).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .calibration import CalibrationSet, model_logits
from .config import CoRaConfig
from .modules import CoRaConv2d, QuantLinear

__all__ = ["check_model", "probe_outputs", "restore_dtype", "transplant"]


def check_model(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The model's one device and one floating dtype; ``ValueError`` naming the problem otherwise."""
    tensors = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None]
    if not tensors:
        raise ValueError("the model has no parameters to quantize")
    devices = {t.device for _, t in tensors}
    if any(d.type == "meta" for d in devices):
        raise ValueError("the model's tensors are on the meta device (no values); load its weights before converting")
    if len(devices) > 1:
        raise ValueError(f"the model's tensors are on several devices {sorted(map(str, devices))}; move it to one device")
    dtypes = {t.dtype for _, t in tensors if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"the model's floating-point tensors have several dtypes {sorted(map(str, dtypes))}; use one")
    for name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the model's {name} contains NaN or Inf")
    return devices.pop(), dtypes.pop()


def probe_outputs(float_model: nn.Module, data: CalibrationSet, config: CoRaConfig) -> None:
    """Check, on one image, what the losses will need of the model's (selected) output: a tensor with a
    batch dimension, and for cross-entropy logits ``[N, classes]`` of which the labels are indices."""
    search = config.method == "search"
    tuning = config.method != "none" and config.tune.iterations > 0
    if not (search or tuning):
        return
    out = model_logits(float_model, data.images[:1], output=config.output)
    if out.dim() < 2 or out.shape[0] != 1:
        raise ValueError(f"the model's output must have a batch dimension, [N, classes], got shape {list(out.shape)}")
    uses_labels = (search and config.search.loss == "ce") or (tuning and config.tune.loss in ("ce", "blocks+ce"))
    if uses_labels:
        if out.dim() != 2:
            raise ValueError(
                f"cross-entropy with one label per image needs logits [N, classes]; the model gives {list(out.shape)}"
                " (use loss='kl' and tune_loss='kl', or choose the logits with CoRaConfig(output=...))"
            )
        data.check_labels(out.shape[1])


def restore_dtype(output: nn.Module, original: nn.Module, dtype: torch.dtype) -> None:
    """Give the float (non-CoRa) tensors of ``output`` the caller's ``dtype``: the caller's exact
    values where the conversion did not change them, else the new values cast."""
    ref = dict(original.named_parameters())
    ref.update(original.named_buffers())
    for mod_name, mod in output.named_modules():
        if isinstance(mod, (CoRaConv2d, QuantLinear)):
            continue
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is None or not t.is_floating_point():
                    continue
                orig = ref.get(f"{mod_name}.{key}" if mod_name else key)
                same = orig is not None and orig.shape == t.shape and torch.equal(orig.float(), t)
                new = (orig.detach().clone() if same else t.detach().to(dtype)).to(t.device)
                if isinstance(t, nn.Parameter):
                    store[key] = nn.Parameter(new, requires_grad=t.requires_grad)
                else:
                    store[key] = new


def transplant(output: nn.Module, model: nn.Module) -> nn.Module:
    """``inplace=True`` for a non-float32 model: move the converted layers and changed tensors of
    ``output`` (a converted float32 copy, dtypes restored) into the caller's ``model``."""
    for name, mod in list(output.named_modules()):
        if isinstance(mod, (CoRaConv2d, QuantLinear)):
            model.set_submodule(name, mod)
    target = model.state_dict()
    with torch.no_grad():
        for key, value in output.state_dict().items():
            if isinstance(value, torch.Tensor) and key in target and not torch.equal(target[key], value):
                target[key].copy_(value)
    return model
