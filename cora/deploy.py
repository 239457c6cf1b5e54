"""``deploy``: turn a converted CoRa model into its inference form (folded BatchNorm, fused blocks).

After :func:`cora.convert` a ResNet block still runs conv -> BN -> ReLU -> conv -> BN -> add -> ReLU
as separate steps.  :func:`deploy` rewrites the model so that every ``CoRaConv2d`` directly followed
by a ``BatchNorm2d`` (and/or a residual add, an activation) becomes one :class:`DeployedConv`, a single
``cora::conv2d`` call whose epilogue applies the BatchNorm, the residual add and the activation:

* ``CifarBasicBlock`` and torchvision ``BasicBlock`` -> :class:`DeployedBasicBlock`
  (two launches, plus the shortcut: a folded 1x1 conv+BN ``downsample`` or the parameter-free
  option-A shortcut);
* torchvision ``Bottleneck`` -> :class:`DeployedBottleneck` (three launches plus the shortcut);
* the stem ``conv1``/``bn1`` (+ReLU) of ``CifarResNet`` and torchvision ``ResNet``;
* then, anywhere else, ``CoRaConv2d [-> BatchNorm2d] [-> + residual] [-> activation]`` chains found in
  the model's ``torch.fx`` graph (:mod:`cora.fusion`; activations ReLU, ReLU6, SiLU, Hardswish, GELU,
  Sigmoid, Hardsigmoid): MobileNet / EfficientNet inverted-residual blocks, RepVGG-style and unknown
  blocks alike;
* for a model ``torch.fx`` cannot trace, ``CoRaConv2d -> BatchNorm2d (-> activation)`` and
  ``CoRaConv2d -> activation`` runs inside an ``nn.Sequential`` (the folded BN and fused activation
  become ``nn.Identity`` so indices and names stay).

Everything else (pooling, ``QuantLinear``, float layers, blocks whose convs are not all
``CoRaConv2d``) stays as it is.

BatchNorm folding uses the op's fp32 per-channel epilogue rather than rewriting the quantized
weights: ``out_scale = gamma / sqrt(running_var + eps)`` and
``out_shift = beta - running_mean * out_scale`` (computed in float64, stored float32), applied as
``(conv + adapter + bias) * out_scale + out_shift``.  This is exact for per-channel *and*
per-tensor quantization scales alike (folding into a per-tensor scale would force it per-channel,
and folding into the fp16 scale and adapter B would round them), and it leaves the packed codes,
scales, zeros and adapters untouched (int8 adapters too: their per-row fp32 scales stay as stored,
nothing is requantized, and the BatchNorm factor multiplies the whole fp32 sum in the epilogue):
a :class:`DeployedConv` holds a reference to its ``CoRaConv2d`` (as the child ``conv``), plus
``zero_f`` (the uint8 zero point as float16, exact, which the op needs as a floating tensor) and
the fp32 ``out_scale``/``out_shift``.

The deployed model is for inference only (the op has no autograd), is returned in eval mode, and
uses the BatchNorm *running* statistics (eval semantics).  Its forward has no mutable state (safe
to call from several threads) and compiles with ``torch.compile(fullgraph=True)``: each deployed
conv is one opaque ``cora::conv2d`` node.  Feed it float16/bfloat16/float32 inputs directly; do not
call ``.half()`` on the deployed model (that would round the fp32 BatchNorm epilogue to fp16).

Before capturing it in a CUDA graph, call :func:`warmup` with every batch size that will be
captured: the Triton kernels autotune on first use of each shape, and autotuning (which launches
and times many candidate kernels and synchronizes) must not happen inside a graph capture.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from cora_kernels.ops import Backend
from cora_kernels.reference import TORCH_ACTIVATIONS  # the epilogue's activations as torch computes them

from .modules import CoRaConv2d, QuantLinear

__all__ = ["deploy", "warmup", "weight_bytes", "DeployedConv", "DeployedBasicBlock", "DeployedBottleneck"]


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


class DeployedConv(nn.Module):
    """One ``cora::conv2d`` launch: ``act((conv(x) + adapter(x) + bias) * out_scale + out_shift + residual)``.

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
    """

    def __init__(self, conv: CoRaConv2d, bn: nn.BatchNorm2d | None = None, relu: bool = False,
                 backend: Backend | str | None = None, activation: str | None = None,
                 check_residual: bool = False) -> None:
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

    @property
    def has_bn(self) -> bool:
        return self.out_scale is not None

    @property
    def relu(self) -> bool:
        return self.activation == "relu"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        kw = dict(zero=self.zero_f, out_scale=self.out_scale, out_shift=self.out_shift, backend=self.backend)
        if residual is None or not self.check_residual or self._fits(x, residual):
            return self.conv.op_forward(x, residual=residual, activation=self.activation, **kw)
        y = self.conv.op_forward(x, **kw) + residual
        return y if self.activation is None else TORCH_ACTIVATIONS[self.activation](y)

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
        return f"bn_folded={self.has_bn}, activation={self.activation}"


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


# ---------------------------------------------------------------------------------------- rewriting
def _torchvision_blocks():
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:  # torchvision is optional for deploy
        return (), (), ()
    return (BasicBlock,), (Bottleneck,), (ResNet,)


def _deployed_downsample(ds) -> nn.Module | None:
    """``None``/Identity -> Identity; ``Sequential(CoRaConv2d, BatchNorm2d)`` -> DeployedConv; else None."""
    if ds is None or isinstance(ds, nn.Identity):
        return nn.Identity()
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], CoRaConv2d) and _foldable(ds[1]):
        return DeployedConv(ds[0], ds[1], relu=False)
    return None


def _deploy_block(block: nn.Module, stats: dict) -> nn.Module | None:
    """The deployed form of a known residual block, or None when it does not fit the pattern."""
    from .experiments.cifar_resnet import CifarBasicBlock

    basic, bottleneck, _ = _torchvision_blocks()
    # exact types: a subclass (or another library's block of the same name) may have its own forward
    if type(block) is CifarBasicBlock or type(block) in basic:
        convs = (block.conv1, block.conv2)
        bns = (block.bn1, block.bn2)
        shortcut = block.shortcut if isinstance(block, CifarBasicBlock) else _deployed_downsample(block.downsample)
        kind = DeployedBasicBlock
    elif type(block) in bottleneck:
        convs = (block.conv1, block.conv2, block.conv3)
        bns = (block.bn1, block.bn2, block.bn3)
        shortcut = _deployed_downsample(block.downsample)
        kind = DeployedBottleneck
    else:
        return None
    if shortcut is None or not all(isinstance(c, CoRaConv2d) for c in convs) or not all(_foldable(b) for b in bns):
        return None
    parts = [DeployedConv(c, b, relu=True) for c, b in zip(convs, bns)]  # the last ReLU follows the add
    stats["blocks"] += 1
    stats["folded_bn"] += len(bns) + int(isinstance(shortcut, DeployedConv))
    return kind(*parts, shortcut)


def _deploy_stem(model: nn.Module, stats: dict) -> None:
    """``conv1``/``bn1`` (+ReLU) at the top of CifarResNet and torchvision ResNet."""
    from .experiments.cifar_resnet import CifarResNet

    _, _, resnet = _torchvision_blocks()
    if type(model) not in (CifarResNet, *resnet):  # exact: the stem rewrite relies on their forward
        return
    if not isinstance(model.conv1, CoRaConv2d) or not _foldable(model.bn1):
        return
    model.conv1 = DeployedConv(model.conv1, model.bn1, relu=True)
    model.bn1 = nn.Identity()
    if type(model) in resnet:
        model.relu = nn.Identity()  # torchvision's ResNet uses its own `relu` only in the stem
    # CifarResNet.forward applies F.relu after bn1: it now sees a ReLU'd tensor (idempotent).
    stats["folded_bn"] += 1


def _deploy_sequential(seq: nn.Sequential, stats: dict) -> None:
    """Fuse ``CoRaConv2d -> BatchNorm2d (-> activation)`` and ``CoRaConv2d -> activation`` runs in place."""
    from .fusion import module_activation  # fusion imports this module

    keys = list(seq._modules)
    i = 0
    while i < len(keys):
        m = seq._modules[keys[i]]
        if not isinstance(m, CoRaConv2d):
            i += 1
            continue
        j = i + 1
        bn = None
        if j < len(keys) and _foldable(seq._modules[keys[j]]):
            bn = seq._modules[keys[j]]
            j += 1
        act = module_activation(seq._modules[keys[j]]) if j < len(keys) else None
        if bn is None and act is None:
            i += 1
            continue
        seq._modules[keys[i]] = DeployedConv(m, bn, activation=act)
        for k in keys[i + 1 : j + int(act is not None)]:
            seq._modules[k] = nn.Identity()
        stats["folded_bn"] += int(bn is not None)
        i = j + int(act is not None)


def _rewrite_blocks(module: nn.Module, stats: dict) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, (DeployedConv, DeployedBasicBlock, DeployedBottleneck)):
            continue
        new = _deploy_block(child, stats)
        if new is not None:
            setattr(module, name, new)
            continue
        _rewrite_blocks(child, stats)


def _rewrite_sequentials(module: nn.Module, stats: dict) -> None:
    """The fallback for models torch.fx cannot trace: conv runs inside each ``nn.Sequential``."""
    for child in module.children():
        if not isinstance(child, (DeployedConv, DeployedBasicBlock, DeployedBottleneck)):
            _rewrite_sequentials(child, stats)
    if isinstance(module, nn.Sequential):
        _deploy_sequential(module, stats)


def deploy(model: nn.Module, *, inplace: bool = False, backend: Backend | str | None = None) -> nn.Module:
    """The inference form of a converted model: BatchNorm folded, activations and residual adds fused.

    ``model``: a model returned by :func:`cora.convert` or :func:`cora.load` (it must contain at
    least one ``CoRaConv2d``).  Returns a new model (``inplace=False``, the input is left unchanged)
    or the same one rewritten (``inplace=True``), in eval mode, with ``cora_deploy`` set to
    ``{"blocks": fused residual blocks, "folded_bn": BatchNorms folded, "traced_fusions": convs fused by
    tracing}``.  When tracing fused something (:mod:`cora.fusion`) the result is a ``torch.fx.GraphModule``
    with the model's submodule names, not the model's class: always use the returned model, also with
    ``inplace=True``.  ``backend`` (see
    :class:`cora_kernels.Backend`), when given, is set on every deployed and quantized conv; None
    keeps theirs (by default ``CORA_BACKEND`` decides, at call time).  See the module docstring for
    the patterns recognised and the (exact, fp32 epilogue) BatchNorm folding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy expects an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, CoRaConv2d) for m in model.modules()):
        raise ValueError(
            "deploy: the model has no CoRaConv2d layer; quantize it first with cora.convert(...) or load a "
            "CoRa checkpoint with cora.load(...)"
        )
    from .fusion import fuse_traced

    work = model if inplace else copy.deepcopy(model)
    stats = {"blocks": 0, "folded_bn": 0, "traced_fusions": 0}
    with torch.no_grad():
        work.eval()  # BatchNorms fold only in eval mode
        _deploy_stem(work, stats)
        _rewrite_blocks(work, stats)
        work = fuse_traced(work, stats)
        if not stats.pop("traced"):
            _rewrite_sequentials(work, stats)
    if backend is not None:
        for m in work.modules():
            if isinstance(m, (DeployedConv, CoRaConv2d)):
                m.backend = Backend(backend)
    work.eval()
    work.cora_deploy = stats
    return work


# ---------------------------------------------------------------------------------------- warm-up
def warmup(
    model: nn.Module,
    batch_sizes: Iterable[int],
    input_shape: Sequence[int],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> None:
    """Run ``model`` once per batch size (eval mode, ``torch.no_grad()``) on random inputs.

    ``input_shape`` is one sample's shape, e.g. ``(3, 224, 224)``; inputs are
    ``[batch, *input_shape]`` in ``dtype`` and ``memory_format`` on ``device``.  On CUDA this
    autotunes the Triton kernel for every distinct layer shape the batch sizes produce, which must
    happen *before* CUDA-graph capture: autotuning launches, times and synchronizes, none of which
    may run inside a capture.  Use the same dtype and memory format as the captured inputs.  On the
    CPU it just runs the model.  The training flags of every submodule are restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    device = torch.device(device)
    model.eval()
    try:
        with torch.no_grad():
            for bs in batch_sizes:
                x = torch.randn(int(bs), *input_shape, device=device).to(dtype)
                model(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for m, flag in modes:
            m.train(flag)


# ---------------------------------------------------------------------------------------- bytes
def _category(module: nn.Module, name: str) -> str:
    if isinstance(module, (CoRaConv2d, QuantLinear)):
        if name.startswith("qweight_p"):
            return "codes"
        if name in ("scale", "zero"):
            return name + "s"
        if name.startswith("adapter_"):
            return "adapters"
    if isinstance(module, DeployedConv):
        return "zeros" if name == "zero_f" else "bn_folded"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    return "float"


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer as stored (each storage counted once), by category.

    Categories: ``codes`` (packed int planes), ``scales``, ``zeros`` (incl. the deployed float
    copy), ``adapters``, ``bn_folded`` (fp32 out_scale/out_shift), ``batchnorm`` (unfolded BN
    affine and running stats), ``float`` (everything else: float weights, biases); plus ``total``.
    Integer bookkeeping tensors (BatchNorm's ``num_batches_tracked``) are not counted.
    """
    out = {k: 0 for k in ("codes", "scales", "zeros", "adapters", "bn_folded", "batchnorm", "float")}
    seen = set()
    for module in model.modules():
        tensors = list(module._parameters.items()) + list(module._buffers.items())
        for name, t in tensors:
            # non-persistent buffers are not stored (a rank-0 QuantLinear's empty adapter and its int8 scales)
            if t is None or name == "num_batches_tracked" or name in module._non_persistent_buffers_set:
                continue
            if t.device.type == "meta":
                key = id(t)
            else:  # views of one storage (same offset and size) are counted once
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            out[_category(module, name)] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out
