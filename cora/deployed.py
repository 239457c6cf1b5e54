"""The modules of a deployed model: :class:`DeployedConv`, :class:`DeployedBasicBlock`,
:class:`DeployedBottleneck` and :class:`DeployedLinear`, and the BatchNorm folding they use.

A leaf module: :mod:`cora.deploy` (which builds deployed models) and :mod:`cora.fusion` (its traced
pass) both import it; it imports neither.

A :class:`DeployedConv` stores its weights in one of two forms (``deploy(model, weights=...)``):

* packed: the conv's packed codes, fp16 scale, adapters and bias as stored, plus the folded
  BatchNorm as fp32 ``out_scale``/``out_shift``; each call is one ``cora::conv2d`` op (the fused
  Triton kernel on CUDA, the pure-torch reference elsewhere, which unpacks the codes per call);
* dense (:meth:`DeployedConv.to_dense`): the effective weight ``Q(W) + B·A`` computed once, in
  float32, with the BatchNorm folded into weight and bias (``W' = W_eff * out_scale[:, None, None,
  None]``, ``b' = bias * out_scale + out_shift``); each call is one ``F.conv2d`` (oneDNN on the CPU)
  plus the residual add and the activation in torch. ``dense_weight``/``dense_bias`` are
  non-persistent buffers: ``.to(device)`` moves them, ``state_dict`` leaves them out (a deployed
  model is not a checkpoint format), :func:`cora.deploy.weight_bytes` counts them as ``dense``.

:class:`DeployedLinear` is the dense form of a :class:`QuantLinear` (whose own forward dequantizes its
codes per call): ``F.linear`` on the cached effective weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cora_kernels.geometry import activation_code, pad_input
from cora_kernels.ops import Backend, resolve_backend
from cora_kernels.records import Epilogue, PackedWeight
from cora_kernels.reference import TORCH_ACTIVATIONS  # the epilogue's activations as torch computes them

from .modules import CoRaConv2d, QuantLinear

__all__ = ["DeployedConv", "DeployedBasicBlock", "DeployedBottleneck", "DeployedLinear", "DENSE_BUFFERS"]

# the dense forms' cached weights: non-persistent buffers that weight_bytes counts all the same
DENSE_BUFFERS = ("dense_weight", "dense_bias")


def _bn_fold(bn: nn.BatchNorm2d, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(out_scale, out_shift)`` with ``bn(y) == y * out_scale + out_shift`` (eval mode)."""
    if bn.num_features != channels:
        raise ValueError(f"BatchNorm2d has {bn.num_features} features but the conv before it has {channels} outputs")
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    shift = beta - mean * scale
    return scale.float(), shift.float()


def _foldable(bn) -> bool:
    """An affine eval-mode BatchNorm2d that can be folded exactly. The type must be exactly
    ``nn.BatchNorm2d``: a subclass may do more in its forward (timm's ``BatchNormAct2d`` applies an
    activation), and folding it would silently drop that."""
    return type(bn) is nn.BatchNorm2d and bn.running_mean is not None and bn.running_var is not None


def _inplace_activation(name: str | None):
    """The activation applied to a fresh tensor (the conv's output): ReLU in place, the others as the
    epilogue's reference computes them."""
    if name is None:
        return None
    return torch.relu_ if name == "relu" else TORCH_ACTIVATIONS[name]


class DeployedConv(nn.Module):
    """One fused conv: ``act((conv(x) + adapter(x) + bias) * out_scale + out_shift + residual)``.

    ``conv`` is the (shared, unchanged) :class:`CoRaConv2d` whose packed codes, fp16 scale, adapters
    and bias are used as stored; ``bn`` (optional, eval statistics) is folded into fp32
    ``out_scale``/``out_shift`` ``[C_out]``; ``activation`` (one of :data:`cora_kernels.ACTIVATIONS`, or
    None; ``relu=True`` is ``activation="relu"``) is applied last.  Input ``[N, C_in, H, W]``
    (float32/float16/bfloat16, NCHW or channels_last); ``residual`` ``[N, C_out, OH, OW]`` or None.
    ``check_residual`` (set for adds found by tracing, whose shapes are not known in advance): a residual
    of another shape (a broadcasting add) is added outside the kernel, before the activation, so the
    result is what the unfused model computes; the typed blocks' residuals always fit and skip the check.
    Non-zero padding modes and asymmetric ``'same'`` padding are applied to the input first, as
    :meth:`CoRaConv2d.op_forward` (which builds the op's arguments) does.  ``backend``: as for
    :class:`CoRaConv2d` (None: the conv's, then ``CORA_BACKEND``).  Inference only (no autograd).

    ``dense=True`` (or :meth:`to_dense` later) stores the dense form instead (see the module
    docstring): each call is one ``F.conv2d`` on the cached float32 weight, the residual add and the
    activation in torch; an input of another floating dtype gets the weight cast to it per call.
    """

    def __init__(self, conv: CoRaConv2d, bn: nn.BatchNorm2d | None = None, relu: bool = False,
                 backend: Backend | str | None = None, activation: str | None = None,
                 check_residual: bool = False, dense: bool = False) -> None:
        super().__init__()
        if not isinstance(conv, CoRaConv2d):
            raise TypeError(f"DeployedConv wraps a CoRaConv2d, got {type(conv).__name__}")
        if relu and activation not in (None, "relu"):
            raise ValueError(f"relu=True and activation={activation!r}: give one activation")
        activation = "relu" if relu else activation
        if activation is not None and activation not in TORCH_ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(TORCH_ACTIVATIONS)} or None, got {activation!r}")
        self.conv = conv
        self.activation = activation
        self.check_residual = bool(check_residual)
        self.backend = None if backend is None else Backend(backend)
        self.dense = False
        self._has_bn = bn is not None
        # The op takes the zero point as a floating tensor; uint8 values are exact in float16.
        self.register_buffer("zero_f", conv.zero.detach().to(torch.float16))
        if bn is not None:
            s, t = _bn_fold(bn, conv.out_channels)
            dev = conv.scale.device
            self.register_buffer("out_scale", s.to(dev))
            self.register_buffer("out_shift", t.to(dev))
        else:
            self.out_scale = None
            self.out_shift = None
        # CoRaConv2d's padding rule (pad_input), decided once: whether the input must be padded first (non-zero
        # modes, asymmetric 'same'), and the padding the conv itself then applies
        left, right, top, bottom = conv._pad_lrtb
        probe = torch.empty(1, 1, top + bottom + 1, left + right + 1, device="meta")
        padded, self._conv_padding = pad_input(probe, conv._pad_lrtb, conv.padding_mode)
        self._pad_first = padded is not probe
        self._prepared = None  # the Triton launcher, prepared on first use (_launcher)
        if dense:
            self.to_dense()

    @property
    def has_bn(self) -> bool:
        return self._has_bn

    @property
    def relu(self) -> bool:
        return self.activation == "relu"

    @torch.no_grad()
    def to_dense(self) -> "DeployedConv":
        """Switch to the dense form (in place; returns self): ``dense_weight`` float32 ``[C_out, C_in/groups,
        kh, kw]`` is :meth:`CoRaConv2d.effective_weight` (``Q(W) + B·A``) times ``out_scale`` per output
        channel, ``dense_bias`` ``bias * out_scale + out_shift`` (None without bias and BatchNorm), both
        contiguous, on the conv's device. The packed buffers of ``conv`` stay (it is shared and unchanged);
        this module's ``zero_f``/``out_scale``/``out_shift``, folded into the weight, are dropped."""
        if self.dense:
            return self
        c = self.conv
        w = c.effective_weight()
        b = None if c.bias is None else c.bias.detach().float()
        if self.out_scale is not None:
            s, t = self.out_scale.float(), self.out_shift.float()
            w = w * s[:, None, None, None]
            b = t if b is None else b * s + t
        self.register_buffer("dense_weight", w.contiguous(), persistent=False)
        self.register_buffer("dense_bias", None if b is None else b.contiguous(), persistent=False)
        self.zero_f = self.out_scale = self.out_shift = None  # buffers set to None: gone from state_dict and .to()
        self._prepared = None
        # what the forward needs, as plain attributes (no submodule look-up per call)
        self._geometry = (c.stride, self._conv_padding, c.dilation, c.groups)
        self._act = _inplace_activation(self.activation)
        self.dense = True
        return self

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense:
            return self._dense_forward(x, residual)
        fits = residual is None or not self.check_residual or self._fits(x, residual)
        if fits and not torch.compiler.is_compiling():
            conv = self.conv
            if resolve_backend(conv.backend if self.backend is None else self.backend, x) is Backend.TRITON:
                # eager on the Triton backend: the launcher prepared once (validated, planned per input shape)
                if self._pad_first:
                    x, _ = conv._padded_input(x)
                return (self._prepared or self._launcher())(x, residual)
        kw = dict(zero=self.zero_f, out_scale=self.out_scale, out_shift=self.out_shift, backend=self.backend)
        if fits:
            return self.conv.op_forward(x, residual=residual, activation=self.activation, **kw)
        y = self.conv.op_forward(x, **kw) + residual
        return y if self.activation is None else TORCH_ACTIVATIONS[self.activation](y)

    def _launcher(self):
        """This layer's :class:`cora_kernels.prepared.PreparedConv`, made on first use and again after a move
        (``.to()``, ``.cuda()``: :meth:`_apply` drops it); ``torch.compile`` sees the ``cora::conv2d`` op instead."""
        prepared = self._prepared
        if prepared is None:
            from cora_kernels.prepared import PreparedConv  # imports Triton: only once the Triton backend runs

            c = self.conv
            ad = c.rank > 0
            weight = PackedWeight(
                tuple(c.packed_planes()), c.scale, self.zero_f, c.bits, c.kernel_size, c.stride, self._conv_padding,
                c.dilation, c.groups, c.adapter_a if ad else None, c.adapter_b if ad else None,
                c.adapter_a_scale if ad else None, c.adapter_b_scale if ad else None, c.bias, c.in_channels)
            epilogue = Epilogue(self.out_scale, self.out_shift, activation_code(self.activation))
            prepared = self._prepared = PreparedConv(weight, epilogue)
        return prepared

    def _apply(self, fn, *args, **kwargs):
        self._prepared = None  # it holds the tensors as they were before the move
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_prepared"] = None  # copies and pickles prepare their own
        return state

    def _dense_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self._pad_first:
            x, _ = self.conv._padded_input(x)
        w, b = self.dense_weight, self.dense_bias
        if x.dtype != w.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        stride, pad, dilation, groups = self._geometry
        y = F.conv2d(x, w, b, stride, pad, dilation, groups)  # a fresh tensor: the steps below may write into it
        if residual is not None:
            y = y + residual if self.check_residual else y.add_(residual)  # traced adds may broadcast
        return y if self._act is None else self._act(y)

    def _fits(self, x: torch.Tensor, residual) -> bool:
        """Whether the kernel can add ``residual``: a floating tensor of exactly the output's shape on x's device."""
        if not isinstance(residual, torch.Tensor) or not residual.is_floating_point() or residual.device != x.device:
            return False
        c = self.conv
        left, right, top, bottom = c._pad_lrtb  # the padding in full, wherever it is applied (no copy here)
        (kh, kw), (sh, sw), (dh, dw) = c.kernel_size, c.stride, c.dilation
        oh = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
        return tuple(residual.shape) == (x.shape[0], c.out_channels, oh, ow)

    def extra_repr(self) -> str:
        return f"bn_folded={self.has_bn}, activation={self.activation}, weights={'dense' if self.dense else 'packed'}"


class DeployedLinear(nn.Module):
    """The dense form of a :class:`QuantLinear`: ``F.linear(x, W_eff, bias)`` with ``dense_weight`` =
    :meth:`QuantLinear.effective_weight` (``Q(W) + B·A``, float32) computed once, ``dense_bias`` the
    bias in float32 (both non-persistent buffers). ``linear`` (the shared, unchanged layer) stays as
    the child ``linear``. An input of another floating dtype gets the weight cast to it per call."""

    def __init__(self, linear: QuantLinear) -> None:
        super().__init__()
        if not isinstance(linear, QuantLinear):
            raise TypeError(f"DeployedLinear wraps a QuantLinear, got {type(linear).__name__}")
        self.linear = linear
        with torch.no_grad():
            w = linear.effective_weight().contiguous()
            b = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("dense_weight", w, persistent=False)
        self.register_buffer("dense_bias", b, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.dense_weight, self.dense_bias
        if x.dtype != w.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"{self.linear.in_features}, {self.linear.out_features}, weights=dense"


class DeployedBasicBlock(nn.Module):
    """Two-conv residual block: ``conv2(conv1(x), residual=shortcut(x))``, two fused launches.

    ``conv1`` fuses BN1 and the ReLU; ``conv2`` fuses BN2, the residual add and the final ReLU.
    ``shortcut`` is ``nn.Identity``, the parameter-free option-A shortcut, or a :class:`DeployedConv`
    (folded 1x1 conv + BN ``downsample``).
    """

    def __init__(self, conv1: DeployedConv, conv2: DeployedConv, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x), residual=self.shortcut(x))


class DeployedBottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck: three fused launches, the last one adds ``shortcut(x)`` and ReLUs."""

    def __init__(self, conv1: DeployedConv, conv2: DeployedConv, conv3: DeployedConv, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.shortcut = conv1, conv2, conv3, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)), residual=self.shortcut(x))
