"""Adapter tuning: a short gradient pass over the low-rank adapters of a converted model.

After conversion every adapter is the best one *layer by layer* (closed form, on the layer's own
inputs). ``tune_adapters`` then trains all adapters of the model jointly, end to end, on the
calibration images (the adapters of convs and of linear layers alike): only ``A`` and ``B`` move;
the integer codes, scales, zero points, biases, BatchNorm statistics and every float layer stay
exactly as they are (BatchNorm runs in eval mode, so its running statistics are never touched).
The rank of every layer, hence the budget, is unchanged.

int8 adapters (``adapter_dtype="int8"``) are trained through their rounding: the float32 masters
start from the dequantized adapters, every forward uses them rounded per row exactly as
:meth:`cora.modules.CoRaConv2d.set_adapter` (or ``QuantLinear.set_adapter``) will store them (straight-through gradients), and the
write-back rounds them once more, so the tuned layer is int8 again and computes what was trained.

Losses: ``"kl"`` to the float model's logits (no labels; keeps the quantized model close to the float
one) or ``"ce"`` with the calibration labels (also fits the calibration images' domain, so the result
can land above the float model on images like them; see the README for how much of that is domain).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cora_kernels.packing import dequantize_adapter, quantize_adapter

from ._modules_util import kept_modes
from .calibration import Objective
from .modules import CoRaConv2d, QuantLinear
from .layout import preferred_layout
from .progress import progress_bar

__all__ = ["tune_adapters", "TuneReport", "trainable_adapter", "adapter_factors", "adapted_layers"]


@dataclass
class TuneReport:
    loss: str
    iterations: int
    layers: int
    first_loss: float  # mean loss over the first tenth of the iterations
    last_loss: float  # mean loss over the last tenth
    seconds: float
    # set when the trained adapters were not kept (non-finite once stored, or non-finite outputs)
    warning: str | None = None


def _fake_int8(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[rows, ...]`` rounded per row as int8 storage rounds it (:func:`quantize_adapter`, rows
    are ranks of ``A`` or output channels of ``B``), with the gradient passed straight through."""
    q, s = quantize_adapter(w.reshape(w.shape[0], -1))
    return w + (dequantize_adapter(q, s).reshape(w.shape) - w).detach()


class _TrainableAdapter(nn.Module):
    """What both stand-ins share: the layer, its frozen dequantized weight ``weight_q`` and bias ``bias_f``
    (float32), the float32 masters ``a`` / ``b`` of its adapter (:func:`adapter_factors`: the stored adapters
    may be float16, which would lose the small updates), and :meth:`write_back`."""

    def __init__(self, layer: CoRaConv2d | QuantLinear) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("weight_q", layer.dequantized_weight().float())
        a, b = adapter_factors(layer)
        self.a = nn.Parameter(a.detach().float().clone())
        self.b = nn.Parameter(b.detach().float().clone())
        self.register_buffer("bias_f", None if layer.bias is None else layer.bias.detach().float())

    def _terms(self, dt: torch.dtype):
        """Bias and masters in ``dt`` (int8 layers: the masters rounded as :func:`_fake_int8` does)."""
        bias = None if self.bias_f is None else self.bias_f.to(dt)
        a, b = (_fake_int8(self.a), _fake_int8(self.b)) if self.layer.adapter_int8 else (self.a, self.b)
        return bias, a.to(dt), b.to(dt)

    def write_back(self) -> CoRaConv2d | QuantLinear:
        """Store the trained factors in the layer (its storage dtype; int8 rounds them again) and return it."""
        self.layer.set_adapter(self.a.detach(), self.b.detach())
        return self.layer


class _TrainableAdapterConv(_TrainableAdapter):
    """Stand-in for a ``CoRaConv2d`` during tuning: frozen ``Q(W)`` and bias, float32 ``A``/``B`` parameters.

    ``A`` ``[r, C_in, kh, kw]`` and ``B`` ``[C_out, r, 1, 1]``; like ``CoRaConv2d.reference_forward`` the
    conv runs in the input's dtype, so a half-precision model keeps its dtypes between layers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay, dt = self.layer, x.dtype
        x, pad = lay._padded_input(x)
        bias, a, b = self._terms(dt)
        y = F.conv2d(x, self.weight_q.to(dt), bias, lay.stride, pad, lay.dilation, lay.groups)
        return y + F.conv2d(F.conv2d(x, a, None, lay.stride, pad, lay.dilation), b)


class _TrainableAdapterLinear(_TrainableAdapter):
    """Stand-in for a ``QuantLinear`` during tuning: frozen ``Q(W)`` and bias, float32 ``A`` ``[r, in]`` /
    ``B`` ``[out, r]`` masters; ``linear(x; Q) + linear(linear(x; A); B) + bias`` in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias, a, b = self._terms(x.dtype)
        return F.linear(x, self.weight_q.to(x.dtype), bias) + F.linear(F.linear(x, a), b)


def trainable_adapter(layer: CoRaConv2d | QuantLinear) -> nn.Module:
    """The trainable stand-in for ``layer`` (float32 masters ``a``, ``b``; ``write_back()`` stores them)."""
    return _TrainableAdapterLinear(layer) if isinstance(layer, QuantLinear) else _TrainableAdapterConv(layer)


def adapter_factors(layer: CoRaConv2d | QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` of a layer as it computes with them (int8 dequantized; conv or linear shapes)."""
    return layer.adapter_weights() if isinstance(layer, QuantLinear) else layer.adapter_conv_weights()


def adapted_layers(model: nn.Module) -> list[str]:
    """Names of the model's ``CoRaConv2d`` / ``QuantLinear`` layers with an adapter (rank > 0)."""
    return [name for name, m in model.named_modules() if isinstance(m, (CoRaConv2d, QuantLinear)) and m.rank > 0]


def tune_adapters(
    model: nn.Module,
    images: torch.Tensor,
    objective: Objective,
    *,
    iterations: int = 250,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> TuneReport:
    """Train the adapters of every ``CoRaConv2d`` and ``QuantLinear`` (rank > 0) in ``model``, in place.

    ``images``: float ``[N, C, H, W]`` calibration inputs on the model's device; ``objective``: the
    task loss on them (:class:`cora.calibration.Objective`: cross-entropy to their labels, or KL to
    the float model's logits). Adam with a cosine learning-rate decay over ``iterations`` steps of
    ``batch_size`` images drawn with ``seed`` (a private generator: the global RNG is not touched).
    ``progress``: show a progress bar. Nothing but the adapters changes; every module's training mode
    and the ``requires_grad`` flags are restored.

    A loss that turns NaN or Inf raises ``FloatingPointError`` and leaves every adapter untouched. If
    the trained adapters are non-finite once stored in the layers' dtype (e.g. float16 overflow), or
    the model's outputs on the first calibration images are, the untuned adapters are put back and
    :attr:`TuneReport.warning` says why.
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a cora.calibration.Objective, got {type(objective).__name__}")
    loss = objective.kind
    n = images.shape[0]
    if n == 0:
        raise ValueError("adapter tuning needs at least one calibration image")
    names = adapted_layers(model)
    t0 = time.perf_counter()
    if not names or iterations <= 0:
        return TuneReport(loss, 0, len(names), math.nan, math.nan, 0.0)

    frozen = {p: p.requires_grad for p in model.parameters()}
    untuned = {name: model.get_submodule(name).adapter_state() for name in names}
    wrappers: dict[str, nn.Module] = {}
    done, warning = False, None
    bar = progress_bar(iterations, "tune", progress)
    with kept_modes(model, train=False):  # BatchNorm uses (and keeps) the float model's running statistics
        try:
            for p in frozen:
                p.requires_grad_(False)
            for name in names:
                wrappers[name] = trainable_adapter(model.get_submodule(name))
                model.set_submodule(name, wrappers[name])
            params = [p for w in wrappers.values() for p in (w.a, w.b)]
            # channels-last batches where the model computes the same on them: faster CPU convs
            images = images.contiguous(memory_format=preferred_layout(model, images))
            opt = torch.optim.Adam(params, lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
            gen = torch.Generator().manual_seed(seed)
            tenth = max(1, iterations // 10)
            losses = []
            for it in range(1, iterations + 1):
                idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(images.device)
                value = objective(model(images[idx]), idx)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
                losses.append(float(value.detach()))
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"adapter tuning diverged at iteration {it} (loss {losses[-1]}); lower tune_lr")
                bar.set_postfix_str(f"{loss} {sum(losses[-tenth:]) / len(losses[-tenth:]):.4f}", refresh=False)
                bar.update(1)
            done = True
        finally:
            bar.close()
            # on failure the layers go back untouched, never half-trained
            for name, w in wrappers.items():
                model.set_submodule(name, w.write_back() if done else w.layer)
            for p, flag in frozen.items():
                p.requires_grad_(flag)
        warning = _check_finite(model, names, images[: min(batch_size, n)])
        if warning is not None:
            for name, state in untuned.items():
                model.get_submodule(name).restore_adapter_state(state)
    return TuneReport(
        loss=loss,
        iterations=iterations,
        layers=len(names),
        first_loss=sum(losses[:tenth]) / tenth,
        last_loss=sum(losses[-tenth:]) / tenth,
        seconds=time.perf_counter() - t0,
        warning=warning,
    )


@torch.no_grad()
def _check_finite(model: nn.Module, names: list[str], images: torch.Tensor) -> str | None:
    """Why the tuned adapters cannot be kept (None: they can): non-finite stored factors or outputs."""
    bad = [n for n in names if not all(torch.isfinite(t).all() for t in adapter_factors(model.get_submodule(n)))]
    if bad:
        more = " ..." if len(bad) > 3 else ""
        return f"adapter tuning produced non-finite adapters in {bad[:3]}{more}; the untuned adapters are kept (lower tune_lr)"
    out = model(images)
    if isinstance(out, dict):
        out = list(out.values())
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    if not all(torch.isfinite(t).all() for t in tensors):
        return "after adapter tuning the model's outputs are not finite; the untuned adapters are kept (lower tune_lr)"
    return None
