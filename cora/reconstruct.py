"""Label-free block reconstruction of the adapters: each block fitted to the float model's block output.

After conversion every adapter is fitted layer by layer (closed form). Here the adapters are
trained block by block, in execution order, without labels: a *block* is a stage of the model's
:class:`cora.graph.StageChain` that holds adapted layers (convs or linears), together with the adapter-free stages after
it (a residual block; the stem conv with its BatchNorm and ReLU; the last block with the head). Its
adapters minimise ``‖block_q(x_q) - block_f(x_f)‖²`` (mean squared error), where ``x_f`` is the
block's input in the float model and ``x_q`` its input in the quantized model, *as the blocks before
it have already been fitted*, so each block also undoes the error that reaches it (the BRECQ idea,
applied to the adapters; the integer codes are not touched). The blocks come from tracing the model,
so any traceable architecture works; each block's nonlinearities and residual adds are part of what
its adapters are fitted through, which a layer-wise fit cannot see.

With ``norms`` the scale and shift of every affine BatchNorm the block calls are fitted too (a
per-channel correction of the quantized layer's output: float parameters the model has anyway, so
they cost no storage and deploy folds them into the conv as before), and blocks are cut at every
quantized layer, so a model without adapters (budget 0) is reconstructed as well. Ranks (hence the
budget) stay, the integer codes stay, BatchNorm runs in eval mode (its running statistics stay).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._modules_util import kept_modes
from .layout import preferred_layout
from .graph import StageChain, batch_len, cat_values, map_tensors, tensors_of
from .progress import progress_bar
from .modules import CoRaConv2d, QuantLinear
from .tune import adapted_layers, trainable_adapter

__all__ = ["ReconstructReport", "reconstruct_blocks", "adapter_blocks"]


@dataclass
class ReconstructReport:
    blocks: int  # blocks whose adapters (or BatchNorms) were fitted
    iterations: int  # optimizer steps in all
    first_loss: float  # mean block loss (relative to the float block output's mean square) before fitting
    last_loss: float  # the same after
    seconds: float
    norms: int = 0  # BatchNorm layers whose scale and shift were fitted (and kept)


def adapter_blocks(chain: StageChain, adapted: set[str]) -> list[tuple[list[int], list[str]]]:
    """Consecutive stages grouped into blocks: ``(stage indices, adapted layer names)``.

    A block starts at a stage that calls an adapted layer and takes every following stage that calls
    none. Stages before the first adapted layer form a block with no layers (they are only run).
    """
    by_stage: dict[int, list[str]] = {}
    for name, k in chain.layer_stage.items():
        if name in adapted:
            by_stage.setdefault(k, []).append(name)
    blocks: list[tuple[list[int], list[str]]] = []
    for k in range(len(chain)):
        if k in by_stage or not blocks:
            blocks.append(([k], list(by_stage.get(k, []))))
        else:
            blocks[-1][0].append(k)
    return blocks


def _run(chain: StageChain, model: nn.Module, stages: list[int], x):
    for k in stages:
        x = chain.run(model, k, x)
    return x


@torch.no_grad()
def _run_all(chain: StageChain, model: nn.Module, stages: list[int], xs, batch_size: int):
    """The block's output on all of ``xs``, ``batch_size`` at a time (values as at a cut: a tensor, or a
    tuple / list / dict of them, :mod:`cora.graph`)."""
    return cat_values([
        _run(chain, model, stages, map_tensors(lambda t: t[i : i + batch_size], xs))
        for i in range(0, batch_len(xs), batch_size)
    ])


def reconstruct_blocks(
    model: nn.Module,
    float_model: nn.Module,
    chain: StageChain,
    images: torch.Tensor,
    *,
    iterations: int = 200,
    lr: float = 1e-3,
    batch_size: int = 32,
    norms: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> ReconstructReport:
    """Fit the adapters of ``model`` (a converted model) block by block to ``float_model``'s outputs, in place.

    ``chain``: the stages of the float model (:func:`cora.graph.trace_stages`), run on both models by
    module name. ``images``: ``[N, C, H, W]`` calibration images on the models' device (no labels);
    both models' block inputs are kept for all of them. Per block, ``iterations`` Adam steps on
    ``batch_size`` images drawn with ``seed`` (a private generator), cosine learning-rate decay.
    ``norms``: fit the BatchNorm scale and shift of each block as well (same learning rate), blocks
    cut at every quantized layer. A block whose loss ends higher than it started keeps its adapters
    (and BatchNorms) as they were. ``model``'s BatchNorms must be its own, not ``float_model``'s.
    The blocks run on channels-last tensors where the float model computes the same on them
    (:func:`preferred_layout`: faster convs), so the result matches a contiguous run up to float rounding.
    """
    adapted = set(adapted_layers(model))
    quantized = {n for n, m in model.named_modules() if isinstance(m, (CoRaConv2d, QuantLinear))}
    blocks = adapter_blocks(chain, quantized if norms else adapted)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    first, last, steps, fitted, fitted_norms = [], [], 0, 0, 0
    eval_batch = max(batch_size, 100)
    with kept_modes(model, float_model, train=False), progress_bar(len(blocks), "reconstruct", progress) as bar:
        x_f = x_q = images.contiguous(memory_format=preferred_layout(float_model, images))
        for stages, names in blocks:
            target = _run_all(chain, float_model, stages, x_f, eval_batch)
            names = [n for n in names if n in adapted]
            block_norms = _block_norms(chain, model, stages) if norms else {}
            if names or block_norms:
                before, after, x_next = _fit_block(
                    model, chain, stages, names, block_norms, x_q, target, iterations, lr, batch_size, gen, eval_batch
                )
                first.append(before)
                last.append(after)
                steps += iterations
                fitted += 1
                fitted_norms += len(block_norms) if after < before else 0
            else:
                x_next = _run_all(chain, model, stages, x_q, eval_batch)
            x_q, x_f = x_next, target
            bar.update(1)
    mean = (lambda v: sum(v) / len(v)) if first else (lambda v: math.nan)
    return ReconstructReport(fitted, steps, mean(first), mean(last), time.perf_counter() - t0, fitted_norms)


def _block_norms(chain: StageChain, model: nn.Module, stages: list[int]) -> dict[str, nn.Module]:
    """The affine BatchNorm modules (by name) that the block's stages call in ``model``."""
    found = {}
    for k in stages:
        for node in chain.stages[k]:
            if node.op == "call_module":
                m = model.get_submodule(node.target)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    found[node.target] = m
    return found


def _block_loss(chain, model, stages, x, target) -> torch.Tensor:
    """Mean squared error relative to the target's mean square (comparable across blocks); for a
    tuple / list / dict output, the squared error summed over its tensors relative to their summed square."""
    y = _run(chain, model, stages, x)
    if isinstance(target, torch.Tensor):
        return F.mse_loss(y, target) / target.pow(2).mean().clamp_min(1e-12)
    pairs = list(zip(tensors_of(y), tensors_of(target)))
    num = sum((a - t).pow(2).sum() for a, t in pairs)
    den = sum(t.pow(2).sum() for _, t in pairs)
    return num / den.clamp_min(1e-12 * sum(t.numel() for _, t in pairs))


def _relative_error(y, target, chunk: int = 100) -> float:
    """:func:`_block_loss` of a whole output, in float64 (the before / after loss of a block).

    Summed ``chunk`` images at a time: a float64 copy of a whole early block's output (1,600 images)
    costs more than the pass that computed it."""
    num = den = 0.0
    for y_part, t_part in zip(tensors_of(y), tensors_of(target)):
        for i in range(0, t_part.shape[0], chunk):
            t = t_part[i : i + chunk].double()
            num += float((y_part[i : i + chunk].double() - t).pow(2).sum())
            den += float(t.pow(2).sum())
    return num / max(den, 1e-300)


def _fit_block(
    model, chain, stages, names, norms, x_q, target, iterations, lr, batch_size, gen, eval_batch
) -> tuple[float, float, object]:
    """Train the adapters of ``names`` (and the BatchNorms ``norms``) on one block.

    Returns the block loss on all images before and after, and the block's output on all of ``x_q``
    as kept (the next block's input; computing the loss from it saves a pass over the images).
    """
    n, device = batch_len(x_q), tensors_of(x_q)[0].device
    before = _relative_error(_run_all(chain, model, stages, x_q, eval_batch), target)
    frozen = {p: p.requires_grad for p in model.parameters()}
    # small: codes, adapters and per-channel BatchNorm vectors
    saved = {name: copy.deepcopy(model.get_submodule(name)) for name in [*names, *norms]}
    wrappers = {name: trainable_adapter(model.get_submodule(name)) for name in names}
    try:
        for p in frozen:
            p.requires_grad_(False)
        for name, w in wrappers.items():
            model.set_submodule(name, w)
        params = [p for w in wrappers.values() for p in (w.a, w.b)]
        params += [p for m in norms.values() for p in (m.weight, m.bias)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iterations))
        for _ in range(iterations):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
            loss = _block_loss(chain, model, stages, *(map_tensors(lambda t: t[idx], v) for v in (x_q, target)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        for name, w in wrappers.items():
            model.set_submodule(name, w.write_back())
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    out = _run_all(chain, model, stages, x_q, eval_batch)
    after = _relative_error(out, target)
    if not math.isfinite(after) or after > before:  # never leave a block worse than it came
        for name, layer in saved.items():
            model.set_submodule(name, layer)
        out = _run_all(chain, model, stages, x_q, eval_batch)
        after = before
    return before, after, out
