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
``CoRaConv2d``) stays as it is, except that ``weights="dense"`` (below) gives every ``CoRaConv2d`` and
``QuantLinear`` left its dense form.

Weights: ``deploy(model, weights=...)`` picks how each deployed conv computes.  ``"packed"`` keeps the
packed codes: one ``cora::conv2d`` op per conv (the fused Triton kernel on CUDA; on the CPU the op's
pure-torch reference, which unpacks the codes and runs three convs per call, slow).  ``"dense"``
computes once, at deploy, each conv's effective weight ``Q(W) + B·A`` in float32 with the BatchNorm
folded into weight and bias, so a conv is one ``F.conv2d`` (oneDNN on the CPU) plus the residual add
and the activation in torch (:meth:`DeployedConv.to_dense`; ``QuantLinear`` -> :class:`DeployedLinear`).
``"auto"`` (the default) is dense for a model on the CPU, packed otherwise.  The dense weights are
non-persistent buffers (moved by ``.to()``, absent from ``state_dict``, counted by
:func:`weight_bytes` as ``dense``); the choice is recorded in ``model.cora_deploy["weights"]``.
The deployed modules live in :mod:`cora.deployed` (imported by this module and by :mod:`cora.fusion`)
and are re-exported here.

With packed weights, BatchNorm folding uses the op's fp32 per-channel epilogue rather than rewriting
the quantized weights: ``out_scale = gamma / sqrt(running_var + eps)`` and
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
conv is one opaque ``cora::conv2d`` node (with dense weights, an aten convolution).  Feed it
float16/bfloat16/float32 inputs directly; with packed weights do not call ``.half()`` on the deployed
model (that would round the fp32 BatchNorm epilogue to fp16); dense weights are cast to the input's
dtype per call (or once, by ``.to(dtype)``).

Before capturing it in a CUDA graph, call :func:`warmup` with every batch size that will be
captured: the Triton kernels autotune on first use of each shape, and autotuning (which launches
and times many candidate kernels and synchronizes) must not happen inside a graph capture.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from cora_kernels.ops import Backend, default_backend
from cora_kernels.scratch import scratch_bytes

from .deployed import (
    DENSE_BUFFERS,
    DeployedBasicBlock,
    DeployedBottleneck,
    DeployedConv,
    DeployedLinear,
    _foldable,
)
from .fusion import fuse_traced, module_activation
from .modules import CoRaConv2d, QuantLinear

__all__ = ["deploy", "warmup", "weight_bytes", "WEIGHTS", "DeployedConv", "DeployedBasicBlock", "DeployedBottleneck",
           "DeployedLinear"]

# deploy(weights=...): "dense" (effective weights computed once, one F.conv2d per conv), "packed" (the op on the
# packed codes) or "auto" (dense for a model on the CPU, packed elsewhere)
WEIGHTS = ("auto", "dense", "packed")


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
    from .zoo.cifar_resnet import CifarBasicBlock

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
    from .zoo.cifar_resnet import CifarResNet

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


def _resolve_weights(weights: str, model: nn.Module, backend: Backend | str | None) -> str:
    """``"dense"`` or ``"packed"`` for ``deploy(weights=...)``: ``"auto"`` is dense when the model's quantized
    convs are on the CPU and the backend asked for (``backend``, else ``CORA_BACKEND``) is not Triton (which
    on CPU tensors is the interpreter, asked for on purpose), packed otherwise (on CUDA the kernels run)."""
    if weights not in WEIGHTS:
        raise ValueError(f"deploy: weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights != "auto":
        return weights
    choice = default_backend() if backend is None else Backend(backend)
    on_cpu = all(m.scale.device.type == "cpu" for m in model.modules() if isinstance(m, CoRaConv2d))
    return "dense" if on_cpu and choice is not Backend.TRITON else "packed"


def _densify(module: nn.Module, done: dict) -> None:
    """Every DeployedConv below ``module`` to its dense form; every CoRaConv2d / QuantLinear left (not fused)
    replaced by a dense DeployedConv / DeployedLinear (one per layer object, also when it has several names)."""
    for name, child in list(module.named_children()):
        if isinstance(child, DeployedConv):
            child.to_dense()
        elif isinstance(child, (CoRaConv2d, QuantLinear)):
            if id(child) not in done:
                done[id(child)] = DeployedConv(child, dense=True) if isinstance(child, CoRaConv2d) else DeployedLinear(child)
            setattr(module, name, done[id(child)])
        elif not isinstance(child, DeployedLinear):
            _densify(child, done)


def deploy(model: nn.Module, *, inplace: bool = False, backend: Backend | str | None = None,
           weights: str = "auto") -> nn.Module:
    """The inference form of a converted model: BatchNorm folded, activations and residual adds fused.

    ``model``: a model returned by :func:`cora.convert` or :func:`cora.load` (it must contain at
    least one ``CoRaConv2d``).  Returns a new model (``inplace=False``, the input is left unchanged)
    or the same one rewritten (``inplace=True``), in eval mode, with ``cora_deploy`` set to
    ``{"blocks": fused residual blocks, "folded_bn": BatchNorms folded, "traced_fusions": convs fused by
    tracing, "weights": "dense" or "packed"}``.  When tracing fused something (:mod:`cora.fusion`) the result
    is a ``torch.fx.GraphModule`` with the model's submodule names, not the model's class: always use the
    returned model, also with ``inplace=True``.  ``backend`` (see
    :class:`cora_kernels.Backend`), when given, is set on every deployed and quantized conv; None
    keeps theirs (by default ``CORA_BACKEND`` decides, at call time).  See the module docstring for
    the patterns recognised and the (exact, fp32 epilogue) BatchNorm folding.

    ``weights`` (:data:`WEIGHTS`): ``"packed"`` keeps the packed codes and runs the ``cora::conv2d`` op per
    conv (the Triton kernels on CUDA; elsewhere the pure-torch reference, which unpacks the codes per call);
    ``"dense"`` computes every conv's effective weight ``Q(W) + B·A`` once, float32, with its BatchNorm
    folded in (:meth:`DeployedConv.to_dense`), so each conv is one ``F.conv2d`` plus the residual add and
    the activation in torch; quantized convs that nothing was fused with become dense
    :class:`DeployedConv` too, and every ``QuantLinear`` a :class:`DeployedLinear`. ``"auto"`` (default):
    dense when the model is on the CPU (and the backend asked for is not Triton), packed otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy expects an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, CoRaConv2d) for m in model.modules()):
        raise ValueError(
            "deploy: the model has no CoRaConv2d layer; quantize it first with cora.convert(...) or load a "
            "CoRa checkpoint with cora.load(...)"
        )
    if backend is not None:
        backend = Backend(backend)
    weights = _resolve_weights(weights, model, backend)
    work = model if inplace else copy.deepcopy(model)
    stats = {"blocks": 0, "folded_bn": 0, "traced_fusions": 0}
    with torch.no_grad():
        work.eval()  # BatchNorms fold only in eval mode
        _deploy_stem(work, stats)
        _rewrite_blocks(work, stats)
        work = fuse_traced(work, stats)
        if not stats.pop("traced"):
            _rewrite_sequentials(work, stats)
        if weights == "dense":
            if isinstance(work, CoRaConv2d):  # a bare layer: its dense form is the model
                work = DeployedConv(work)
            if isinstance(work, DeployedConv):
                work.to_dense()
            else:
                _densify(work, {})
    if backend is not None:
        for m in work.modules():
            if isinstance(m, (DeployedConv, CoRaConv2d)):
                m.backend = backend
    work.eval()
    work.cora_deploy = {**stats, "weights": weights}
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
    tune_seconds: float | None = None,
) -> float:
    """Run ``model`` once per batch size (eval mode, ``torch.no_grad()``) on random inputs.

    ``input_shape`` is one sample's shape, e.g. ``(3, 224, 224)``; inputs are
    ``[batch, *input_shape]`` in ``dtype`` and ``memory_format`` on ``device``.  On CUDA this
    autotunes the Triton kernel for every distinct layer shape the batch sizes produce, which must
    happen *before* CUDA-graph capture: autotuning launches, times and synchronizes, none of which
    may run inside a capture.  Use the same dtype and memory format as the captured inputs.  On the
    CPU it just runs the model.  The training flags of every submodule are restored afterwards.

    The tuning is bounded: ``tune_seconds`` (None: ``CORA_TUNE_SECONDS``, default 60) of candidate timing in
    all (:func:`cora_kernels.tuning.tuning_budget`); layers not tuned by then use the untimed choice.  Every
    batch size runs before any capture, so the scratch buffer of the dequantize strategy has its full size by
    then.  Returns the seconds spent tuning.
    """
    from cora_kernels.tuning import tuning_budget

    modes = [(m, m.training) for m in model.modules()]
    device = torch.device(device)
    model.eval()
    try:
        with torch.no_grad(), tuning_budget(tune_seconds) as budget:
            for bs in batch_sizes:
                x = torch.randn(int(bs), *input_shape, device=device).to(dtype)
                model(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for m, flag in modes:
            m.train(flag)
    return budget.spent


# ---------------------------------------------------------------------------------------- bytes
def _category(module: nn.Module, name: str) -> str:
    if isinstance(module, (CoRaConv2d, QuantLinear)):
        if name.startswith("qweight_p"):
            return "codes"
        if name in ("scale", "zero"):
            return name + "s"
        if name.startswith("adapter_"):
            return "adapters"
    if name in DENSE_BUFFERS and isinstance(module, (DeployedConv, DeployedLinear)):
        return "dense"
    if isinstance(module, DeployedConv):
        return "zeros" if name == "zero_f" else "bn_folded"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    return "float"


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer as stored (each storage counted once), by category.

    Categories: ``codes`` (packed int planes), ``scales``, ``zeros`` (incl. the deployed float
    copy), ``adapters``, ``bn_folded`` (fp32 out_scale/out_shift), ``dense`` (the float32 effective
    weights and biases of a ``weights="dense"`` deployment: non-persistent buffers, counted all the same;
    the packed layers they were computed from stay and are counted too), ``batchnorm`` (unfolded BN
    affine and running stats), ``float`` (everything else: float weights, biases); plus ``total``.
    Integer bookkeeping tensors (BatchNorm's ``num_batches_tracked``) are not counted.  ``scratch``, not in
    ``total``: what the dequantize strategy's scratch buffers (:mod:`cora_kernels.scratch`) hold on the model's
    devices now (one per device and host thread, shared by every model of the process, sized to the largest
    layer that took that strategy; 0 until a layer has run it).
    """
    out = {k: 0 for k in ("codes", "scales", "zeros", "adapters", "bn_folded", "dense", "batchnorm", "float")}
    seen = set()
    for module in model.modules():
        tensors = list(module._parameters.items()) + list(module._buffers.items())
        for name, t in tensors:
            # non-persistent buffers are not stored (a rank-0 QuantLinear's empty adapter and its int8 scales);
            # the dense weights are not stored either, but they are held in memory for every call
            if t is None or name == "num_batches_tracked" or (
                    name in module._non_persistent_buffers_set and _category(module, name) != "dense"):
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
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers()) if t.device.type != "meta"}
    out["scratch"] = sum(scratch_bytes(d) for d in devices)
    return out
