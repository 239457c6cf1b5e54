"""Per-layer input statistics: im2col rows, their second moments, and the order layers run in.

The base quantizer (GPTQ) and the activation-aware adapters need, for each layer, the second
moment ``H = E[x xᵀ]`` ``[K, K]`` of the rows the layer multiplies by its weight (im2col patches
``[rows, C_in·kh·kw]`` for a conv, in PyTorch's ``(C_in, kh, kw)`` order; the last dimension for a
linear). These are collected here with forward hooks, from a seeded random subset of the output
positions (a CPU cannot afford every patch of an early layer), summed in float64. Also here: the
order layers first run in, and the re-estimation of BatchNorm statistics (an opt-in step).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cora_kernels.geometry import explicit_padding

from ._modules_util import kept_modes

__all__ = [
    "layer_input_rows",
    "collect_hessians",
    "execution_order",
    "LayerInputs",
    "layer_moments",
    "paired_moments_of",
    "paired_moments",
    "reestimate_batchnorm",
]


def layer_input_rows(module: nn.Module, x: torch.Tensor, max_rows: int | None = None, generator=None) -> torch.Tensor:
    """The rows the layer multiplies by its weight: im2col ``[rows, C_in·kh·kw]`` (PyTorch K order).

    With ``max_rows``, a random subset of at most that many output positions is taken *before* the
    patches are copied out (only the picked patches are gathered), which is much cheaper than a full
    ``F.unfold`` on a CPU.
    """
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        if max_rows is not None and rows.shape[0] > max_rows:
            rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_rows].to(rows.device)]
        return rows
    lrtb = explicit_padding(module.padding, module.kernel_size, module.dilation)
    x = F.pad(x, lrtb, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    n, c, hp, wp = x.shape
    oh, ow = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1
    total = n * oh * ow
    if max_rows is not None and total > max_rows:
        pick = torch.randperm(total, generator=generator)[:max_rows].to(x.device)
    else:
        pick = torch.arange(total, device=x.device)
    # Gather whole channel vectors from a channels-last copy (one index per output position and tap):
    # several times faster on a CPU than indexing a 6-D strided unfold view, and the same values.
    i_n, rest = pick // (oh * ow), pick % (oh * ow)
    corner = i_n * (hp * wp) + (rest // ow) * (sh * wp) + (rest % ow) * sw  # top-left tap, [P]
    taps = (torch.arange(kh, device=x.device) * (dh * wp))[:, None] + torch.arange(kw, device=x.device) * dw
    pixels = x.permute(0, 2, 3, 1).reshape(-1, c)  # [N·Hp·Wp, C]
    patches = pixels[corner[:, None] + taps.reshape(1, -1)]  # [P, kh·kw, C]
    return patches.transpose(1, 2).reshape(-1, c * kh * kw)  # PyTorch's (C, kh, kw) order


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    modules: dict[str, nn.Module],
    inputs: torch.Tensor,
    batch_size: int = 100,
    max_rows: int = 65536,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``H = E[x xᵀ]`` (float64 ``[K, K]``) of each named layer's im2col inputs over ``inputs``.

    An early conv sees ~1000 im2col rows per image, far more than a ``[K, K]`` estimate needs, so at
    most ``max_rows`` rows per layer (a seeded random subset, spread evenly over the batches) enter
    the sum; that keeps the pass to seconds on a CPU. Layers with ``groups > 1`` are skipped (their K
    differs per group). The model runs in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    per_batch = _rows_per_batch(max_rows, batch_size, inputs.shape[0])
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, args):
            # float32 products per batch (fast), summed across batches in float64 (accurate)
            rows = layer_input_rows(mod, args[0].detach().float(), per_batch, gen)
            sums[name] = sums.get(name, 0) + (rows.T @ rows).double()
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return fn

    for name, mod in modules.items():
        if getattr(mod, "groups", 1) == 1:
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        with kept_modes(model, train=False):
            for start in range(0, inputs.shape[0], batch_size):
                model(inputs[start : start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / counts[n]) for n in sums}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted layer's input is captured."""


def _capture_input(run, layer: nn.Module, x) -> torch.Tensor | None:
    """The input of ``layer`` when ``run(x)`` runs (``None`` if the layer is never called); the pass
    stops at the layer."""
    box = []

    def hook(mod, args):
        box.append(args[0].detach())
        raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        run(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return box[0] if box else None


class LayerInputs:
    """The inputs of one model's layers over fixed images, batch by batch.

    Without a chain, each request runs the model from the images up to the layer (any model; the cost
    of a request grows with the layer's depth). With a :class:`cora.graph.StageChain`, the inputs of
    the current stage are kept for every batch (on the images' device) and a request runs only the
    layer's own stage; asking for a layer of a later stage first moves the kept inputs forward through
    the stages in between, with the model's modules *as they are then* (so layers must be asked for in
    execution order, each after every earlier layer has its final weights). The whole sweep then costs
    about two forward passes over the images, whatever the depth. A layer of a stage already passed
    falls back to a full pass. The model runs in eval mode.

    ``images``: ``[N, C, H, W]``; batches are ``images[i : i + batch_size]`` in order, so both paths give
    the same batches (and, with deterministic kernels, the same values).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, chain=None, batch_size: int = 100) -> None:
        self.model, self.images, self.chain, self.batch_size = model, images, chain, batch_size
        self._stage = 0
        self._kept: list | None = None  # inputs of stage self._stage, one per batch

    def _batches(self) -> list[torch.Tensor]:
        return [self.images[i : i + self.batch_size] for i in range(0, self.images.shape[0], self.batch_size)]

    @torch.no_grad()
    def _advance(self, stage: int) -> None:
        if self._kept is None:
            self._kept = self._batches()
        with kept_modes(self.model, train=False):
            while self._stage < stage:
                self._kept = [self.chain.run(self.model, self._stage, x) for x in self._kept]
                self._stage += 1

    @torch.no_grad()
    def of(self, name: str):
        """Yields the input of layer ``name`` for each batch (float32); nothing if the forward pass never
        reaches the layer."""
        layer = self.model.get_submodule(name)
        stage = self.chain.layer_stage.get(name) if self.chain is not None else None
        if self.chain is not None and stage is None:
            return  # the traced forward never calls it
        with kept_modes(self.model, train=False):
            if stage is None or stage < self._stage:
                for xb in self._batches():
                    x = _capture_input(self.model, layer, xb)
                    if x is None:
                        return
                    yield x.float()
                return
            self._advance(stage)
            for xb in self._kept:
                x = _capture_input(lambda v: self.chain.run(self.model, stage, v), layer, xb)
                if x is None:
                    return
                yield x.float()


def _rows_per_batch(max_rows: int, batch_size: int, n_images: int) -> int:
    return max(1, -(-max_rows * batch_size // max(1, n_images)))


@torch.no_grad()
def layer_moments(inputs: LayerInputs, name: str, max_rows: int = 65536, seed: int = 0) -> torch.Tensor | None:
    """``H = E[x xᵀ]`` (float64 ``[K, K]``) of layer ``name``'s im2col inputs, or ``None`` when the forward
    pass never reaches it. At most ``max_rows`` rows in all (a seeded random subset, spread evenly over
    the batches)."""
    layer = inputs.model.get_submodule(name)
    gen = torch.Generator().manual_seed(seed)
    per_batch = _rows_per_batch(max_rows, inputs.batch_size, inputs.images.shape[0])
    h, n = None, 0
    for x in inputs.of(name):
        rows = layer_input_rows(layer, x, per_batch, gen)
        h = (rows.T @ rows).double() + (0 if h is None else h)
        n += rows.shape[0]
    return None if h is None else h / n


@torch.no_grad()
def paired_moments_of(
    float_inputs: LayerInputs, quant_inputs: LayerInputs, name: str, max_rows: int = 65536, seed: int = 0
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Second moments of layer ``name``'s im2col inputs in the float and the (partly) quantized model.

    Returns float64 ``(H_qq = E[x_q x_qᵀ], H_fq = E[x_f x_qᵀ])``, both ``[K, K]``, where ``x_f`` and ``x_q``
    are the layer's input rows at the same positions of the same images in the two models (both
    :class:`LayerInputs` must hold the same images and batch size). ``(None, None)`` for a layer the
    forward pass never reaches.
    """
    f_layer, q_layer = float_inputs.model.get_submodule(name), quant_inputs.model.get_submodule(name)
    gen = torch.Generator().manual_seed(seed)
    per_batch = _rows_per_batch(max_rows, quant_inputs.batch_size, quant_inputs.images.shape[0])
    hqq = hfq = None
    n = 0
    f_iter, q_iter = float_inputs.of(name), quant_inputs.of(name)
    try:
        for xf, xq in zip(f_iter, q_iter):
            state = gen.get_state()
            rf = layer_input_rows(f_layer, xf, per_batch, gen)
            gen.set_state(state)  # the same positions in both
            rq = layer_input_rows(q_layer, xq, per_batch, gen)
            hqq = (rq.T @ rq).double() + (0 if hqq is None else hqq)
            hfq = (rf.T @ rq).double() + (0 if hfq is None else hfq)
            n += rq.shape[0]
    finally:  # a generator zip left unfinished gives its model's modes back now, not at garbage collection
        f_iter.close()
        q_iter.close()
    if hqq is None:
        return None, None
    return hqq / n, hfq / n


@torch.no_grad()
def execution_order(model: nn.Module, names: list[str], sample: torch.Tensor) -> list[str]:
    """``names`` sorted by when each layer first runs in a forward pass on ``sample`` (eval mode)."""
    first: dict[str, int] = {}
    hooks = []

    def hook(n):
        def fn(mod, args):
            first.setdefault(n, len(first))  # returns None: the input is left alone

        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        with kept_modes(model, train=False):
            model(sample)
    finally:
        for h in hooks:
            h.remove()
    return sorted(names, key=lambda n: first.get(n, len(names) + names.index(n)))


def paired_moments(
    float_model: nn.Module,
    quant_model: nn.Module,
    name: str,
    inputs: torch.Tensor,
    batch_size: int = 100,
    max_rows: int = 65536,
    seed: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`paired_moments_of` with full forward passes from ``inputs`` (``[N, C, H, W]``) for one layer."""
    return paired_moments_of(
        LayerInputs(float_model, inputs, batch_size=batch_size), LayerInputs(quant_model, inputs, batch_size=batch_size),
        name, max_rows=max_rows, seed=seed,
    )


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64, seed: int = 0) -> int:
    """Replace every BatchNorm's running statistics by those of ``model`` on ``inputs``; returns how many.

    ``inputs``: ``[N, C, H, W]`` on the model's device. Statistics are the cumulative average over
    batches of ``batch_size`` (``momentum=None``), computed with every earlier layer as it is (the
    quantized layers included). Affine parameters are not touched; momentum and training mode are
    restored. The images are shuffled first (seeded): averaged per-batch variances miss the spread
    *between* batches, so batches must be alike (calibration sets are often sorted by class). With
    ``N`` not a multiple of ``batch_size`` the last, smaller batch is dropped (unless it is the only
    one) so that no batch's statistics weigh more than the others'.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if inputs.shape[0] < 2:
        raise ValueError("BatchNorm re-estimation needs at least 2 calibration images")
    momenta = [m.momentum for m in norms]
    try:
        with kept_modes(model, train=True):
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average
            n = inputs.shape[0]
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(inputs.device)
            full = max(1, n // batch_size) * batch_size if n >= batch_size else n
            for i in range(0, full, batch_size):
                model(inputs[order[i : i + batch_size]])
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
    return len(norms)
