"""Mixed precision: per-layer widths chosen to meet a target of equivalent bits per weight.

With ``CoRaConfig(target_bits=T)`` every quantized layer that no ``layer_bits`` pattern or
``grouped_bits`` fixes gets one of the two supported widths around the bits per weight left for the codes
(once the adapters, at their full budget, and the fixed layers are paid; at most ``bits``), so that the
whole conversion, adapters included, stores at most ``T`` bits per quantized weight: the report's
``equiv_bits`` is at most ``T``, the same held-budget guarantee as the adapter budget's.

What a layer loses at width ``b`` is measured end to end and without labels: the float model with that
one layer rounded to nearest at ``b`` bits (on the conversion's ranges), against the float model, as the
KL divergence of their outputs on a few calibration images (:func:`sensitivities`). The widths then
minimise the sum of those losses under the bit budget, greedily: every layer starts at the narrowest
width, and the step (one width up for one layer) that removes the most loss per stored bit is taken
while it fits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cora_kernels.packing import SUPPORTED_BITS

from .calibration import model_logits
from .config import CoRaConfig
from .modules import base_storage_bits
from .progress import progress_bar
from .quantizer import compute_qparams, fake_quantize

__all__ = ["SENSITIVITY_IMAGES", "width_choices", "layer_cost_bits", "adapter_reserve_bits", "sensitivities", "choose_widths"]


SENSITIVITY_IMAGES = 256  # calibration images each one-layer-rounded model is compared on


def width_choices(widest: int, code_bits: float) -> list[int]:
    """The widths a layer may get: the two supported ones around ``code_bits`` (the bits per weight left
    for the codes once the adapters and fixed layers are paid: 2 and 3 for 2.4), from 2 up to ``widest``.

    Only two: with 2, 3 and 4 to choose from, the one-layer sensitivities put the small early layers at 4
    bits and the large late ones at 2, which on ResNet-20 lost to every layer at 3 (see the README).
    """
    allowed = [b for b in SUPPORTED_BITS if b <= widest]
    below = [b for b in allowed if b <= code_bits]
    low = below[-1] if below else allowed[0]
    return [b for b in allowed if b >= low][:2]


def layer_cost_bits(layer: nn.Module, bits: int, per_channel: bool) -> int:
    """Bits a layer's base quantization stores at ``bits``: codes, an fp16 scale and a b-bit zero per
    output channel (one pair per tensor otherwise), as ``CoRaConv2d`` / ``QuantLinear`` count them."""
    return base_storage_bits(bits, layer.weight.numel(), layer.weight.shape[0] if per_channel else 1)


def adapter_reserve_bits(config: CoRaConfig, weight_params: int) -> int:
    """The most bits the adapters can take: ``budget · P`` parameters at their storage width (none
    without adapters). int8 adapters' per-row scales depend on the ranks, so they are not supported here."""
    if config.method == "none":
        return 0
    return int(config.budget * weight_params) * torch.finfo(getattr(torch, config.adapter.dtype)).bits


@torch.no_grad()
def sensitivities(
    model: nn.Module, layers: dict[str, nn.Module], widths: list[int], config: CoRaConfig, images: torch.Tensor
) -> dict[str, dict[int, float]]:
    """``{layer: {width: what the model's output loses}}``, one layer rounded at a time (label-free).

    For each layer of ``model`` (the float model; ``layers`` are its modules) and width, the layer's weight
    is replaced by its round-to-nearest version on the conversion's ranges, the others stay float, and the
    output on ``images`` is compared with the float one: ``KL(float || rounded)`` of the softmaxes for
    ``[N, classes]`` logits, else the output's relative squared error. The weights are restored exactly.
    """
    q = config.quantizer
    ref = model_logits(model, images, output=config.output)
    out: dict[str, dict[int, float]] = {}
    with progress_bar(len(layers), "widths", config.progress) as bar:  # one forward pass per layer and width
        for name, mod in layers.items():
            original = mod.weight.detach().clone()
            w = original.float().cpu()
            out[name] = {}
            try:
                for b in widths:
                    method = q.range_for(b, config.budget if config.method != "none" else 0.0)
                    scale, zero = compute_qparams(w, b, per_channel=q.granularity == "channel", method=method, std_k=q.std_k)
                    mod.weight.copy_(fake_quantize(w, scale, zero, b).to(original))
                    out[name][b] = _loss(model_logits(model, images, output=config.output), ref)
            finally:
                mod.weight.copy_(original)
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
    return out


def _loss(y: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.dim() == 2:
        return float(F.kl_div(F.log_softmax(y, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean"))
    return float((y - ref).double().pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-300))


def choose_widths(
    layers: dict[str, nn.Module], losses: dict[str, dict[int, float]], budget_bits: float, per_channel: bool
) -> dict[str, int]:
    """Widths for ``layers`` that store at most ``budget_bits`` (codes and ranges) with the least summed loss.

    Greedy on loss removed per bit: each layer starts at its narrowest width in ``losses``; while a
    step fits, the layer whose next width removes the most error per added bit moves up one width.
    Raises ``ValueError`` when even the narrowest widths do not fit.
    """
    widths = {n: min(losses[n]) for n in layers}
    used = sum(layer_cost_bits(layers[n], b, per_channel) for n, b in widths.items())
    if used > budget_bits:
        raise ValueError(f"needs {used} bits at the narrowest widths, the target leaves {int(budget_bits)}")
    while True:
        best, best_gain = None, 0.0
        for n, b in widths.items():
            wider = [c for c in sorted(losses[n]) if c > b]
            if not wider:
                continue
            extra = layer_cost_bits(layers[n], wider[0], per_channel) - layer_cost_bits(layers[n], b, per_channel)
            if used + extra > budget_bits:
                continue
            gain = (losses[n][b] - losses[n][wider[0]]) / extra
            if best is None or gain > best_gain:
                best, best_gain = (n, wider[0], extra), gain
        if best is None:
            return widths
        n, b, extra = best
        widths[n], used = b, used + extra
