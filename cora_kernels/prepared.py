"""A layer prepared once for the Triton backend: validated, laid out and planned per input shape.

The op path (:func:`cora_kernels.cora_conv2d` -> ``torch.ops.cora.conv2d`` -> the launcher) validates
every argument and rebuilds the kernel's arguments on every call, which costs more host time than a small
layer's kernel.  :class:`PreparedConv` does that work once:

* at construction, the layer (:class:`~cora_kernels.records.PackedWeight`) and its epilogue
  (:class:`~cora_kernels.records.Epilogue`) are validated, with a probe input of the layer's channels;
* on the first call for an input of a given shape, dtype, device and layout (and residual layout, and
  ``CORA_STRATEGY``), a :class:`_Plan` is made: the call is validated in full, the geometry computed, the weight side of the
  launch laid out (``layer_args``) and, for ``groups == 1``, the strategy and config chosen by the tuner
  (kept once the tuner has cached them; untimed choices, made during a CUDA-graph capture or past a
  tuning budget, are asked again next time);
* every later call with that key runs the plan: allocate the output, put x in NHWC storage, launch.
  Nothing is validated again: the plan's key pins everything the validation depended on.

It is what a deployed conv calls in eager mode on the Triton backend (``cora.deployed.DeployedConv``);
``torch.compile`` keeps seeing the ``cora::conv2d`` op.  Inference only: no autograd.
"""
from __future__ import annotations

import torch

from . import conv_depthwise, conv_fused, tuning
from .cost_model import DEQUANT
from .dequantize import cora_conv2d_dequant
from .environment import strategy_override
from .geometry import ACTIVATIONS, check_conv_args
from .jit_common import nhwc_strides
from .records import Epilogue, PackedWeight

__all__ = ["PreparedConv"]


class _Plan:
    """One input key's launch: geometry, output layout, the weight side of the launch, and (once the choice
    is settled) the launch bound to it."""

    __slots__ = ("g", "layer", "out_shape", "fmt", "x_nhwc", "strides", "choice", "run")

    def __init__(self, g, layer, fmt, x_nhwc: bool, strides):
        self.g = g
        self.layer = layer
        self.out_shape = (g.N, g.C_out, g.OH, g.OW)
        self.fmt = fmt
        self.x_nhwc = x_nhwc   # x already in the kernel's NHWC storage
        self.strides = strides  # (x as the kernel reads it, out, residual or None), (n, h, w, c) order
        self.choice = None     # the tuner's settled choice (groups == 1)
        self.run = None        # run(x, out, residual) -> out: the launch bound to the choice (or the grouped tile)


class PreparedConv:
    """``PreparedConv(weight, epilogue)(x, residual=None)``: the layer on the Triton backend, validated once.

    ``x`` ``[N, C_in, H, W]`` float32 / float16 / bfloat16 (NCHW or channels_last) on the weight's device;
    ``residual`` ``[N, C_out, OH, OW]`` or None.  Returns ``[N, C_out, OH, OW]`` in x's dtype and memory
    format, the same as :func:`cora_kernels.cora_conv2d` with ``backend="triton"``.  Construction raises
    what :func:`cora_kernels.geometry.check_conv_args` raises for a bad layer; the first call with a new
    input shape raises it for a bad input.  Safe to call from several threads (plans are only added).
    """

    def __init__(self, weight: PackedWeight, epilogue: Epilogue | None = None):
        epilogue = epilogue or Epilogue()
        if not isinstance(weight.in_channels, int) or weight.in_channels < 1:
            raise ValueError(f"PreparedConv needs weight.in_channels (a positive int), got {weight.in_channels!r}")
        if not isinstance(epilogue.act, int) or not 0 <= epilogue.act <= len(ACTIVATIONS):
            raise ValueError(f"epilogue.act must be an activation code 0..{len(ACTIVATIONS)}, got {epilogue.act!r}")
        self.weight = weight
        self.epilogue = epilogue
        kh, kw = weight.kernel_size
        dh, dw = weight.dilation
        probe = torch.empty((1, weight.in_channels, dh * (kh - 1) + 1, dw * (kw - 1) + 1), device=weight.scale.device)
        self._check(probe, None)
        self._plans: dict[tuple, _Plan] = {}

    def _check(self, x, residual):
        w, ep = self.weight, self.epilogue
        act = ACTIVATIONS[ep.act - 1] if ep.act else None
        return check_conv_args(x, list(w.planes), w.scale, w.zero, w.a, w.b, w.bias, bits=w.bits,
                               kernel_size=w.kernel_size, stride=w.stride, padding=w.padding, dilation=w.dilation,
                               out_scale=ep.out_scale, out_shift=ep.out_shift, residual=residual, groups=w.groups,
                               in_channels=w.in_channels, a_scale=w.a_scale, b_scale=w.b_scale, activation=act)

    def _plan(self, x: torch.Tensor, residual, forced) -> _Plan:
        g = self._check(x, residual)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        x_nhwc = g.C_in == 1 or x.is_contiguous(memory_format=torch.channels_last)
        x_k = x if x_nhwc else torch.empty(x.shape, device="meta").contiguous(memory_format=torch.channels_last)
        out = torch.empty((g.N, g.C_out, g.OH, g.OW), device="meta", memory_format=fmt)
        strides = (nhwc_strides(x_k), nhwc_strides(out), None if residual is None else nhwc_strides(residual))
        if g.groups > 1:
            plan = _Plan(g, conv_depthwise.layer_args(self.weight, self.epilogue, x.dtype), fmt, x_nhwc, strides)
            cfg = conv_depthwise.choose_config(g, x.device)
            plan.run = lambda xk, o, res: conv_depthwise._launch(plan.layer, g, xk, o, res, cfg)
            return plan
        plan = _Plan(g, conv_fused.layer_args(self.weight, self.epilogue, g, x.dtype), fmt, x_nhwc, strides)
        self._settle(plan, self._settled_choice(x, g, residual, forced))
        return plan

    def _settle(self, plan: _Plan, choice) -> None:
        """Keep ``choice`` (when it will not change) and bind the launch to it."""
        if choice is None:
            return
        plan.choice = choice
        if choice.strategy == DEQUANT:
            w, ep, g = self.weight, self.epilogue, plan.g
            plan.run = lambda xk, o, res: cora_conv2d_dequant(xk, w, ep, res, g)
        else:
            plan.run = conv_fused.bind_launch(plan.layer, plan.g, choice.config, choice.split_k, *plan.strides)

    def _settled_choice(self, x, g, residual, forced) -> tuning.TuneChoice | None:
        """The tuner's choice if it will not change (cached, forced to dequant, or fixed off the GPU); None:
        ask per call.  ``forced``: ``CORA_STRATEGY`` (part of the plan's key)."""
        if x.device.type != "cuda" or forced == DEQUANT:
            return conv_fused.select(x, g, self.weight, self.epilogue, residual)
        if forced is not None:  # the fused kernel alone: its best timed choice, asked per call
            return None
        return tuning.TUNING_CACHE.get(conv_fused.tune_key(x, g, self.weight, False, residual is not None))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        res_key = None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device)
        forced = strategy_override()  # read per call, as the op does: a plan per forced strategy
        key = (x.shape, x.dtype, x.device, x.stride(), res_key, forced)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(x, residual, forced)
        run = plan.run
        if run is None:  # not settled yet: the tuner times it now, or decides untimed (capture, budget)
            g = plan.g
            choice = conv_fused.select(x, g, self.weight, self.epilogue, residual)
            if choice is tuning.TUNING_CACHE.get(conv_fused.tune_key(x, g, self.weight, False, residual is not None)):
                self._settle(plan, choice)
                run = plan.run
            elif choice.strategy == DEQUANT:
                return cora_conv2d_dequant(x, self.weight, self.epilogue, residual, g)
            else:
                run = conv_fused.bind_launch(plan.layer, g, choice.config, choice.split_k, *plan.strides)
        if plan.choice is not None and plan.choice.strategy == DEQUANT:
            return run(x, None, residual)
        xk = x if plan.x_nhwc else x.contiguous(memory_format=torch.channels_last)
        return run(xk, torch.empty(plan.out_shape, device=x.device, dtype=x.dtype, memory_format=plan.fmt), residual)
