"""``convert``: the one public verb that turns a float model into a CoRa model."""
from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ._modules_util import set_submodule
from .calibration import collect_hessians, execution_order, materialize, model_logits, paired_moments, reestimate_batchnorm
from .config import CoRaConfig
from .modules import CoRaConv2d, QuantLinear
from .quantizer import compute_qparams, dequantize, gptq_quantize, quantize
from .residual import adapter_from_factors, factorize_residual, regression_residual
from .search import AdaptedLayer, Progress, adapter_fraction, heuristic_ranks, search_ranks
from .tune import tune_adapters

__all__ = ["convert", "ConversionReport", "quantizable_layers"]


@dataclass
class ConversionReport:
    """What a conversion did. Fractions are of all conv weight parameters of the model."""

    method: str
    bits: int
    budget: float
    ranks: dict[str, int]
    adapter_fraction: float
    equiv_bits: float
    iterations: int
    calib_images: int
    search_seconds: float
    total_seconds: float
    quantized: list[str]
    skipped: dict[str, str]  # layer name -> why it stays float or gets no adapter
    config: dict
    continuous_budget: float | None = None
    trace: list = field(default_factory=list)
    tune_loss: str | None = None  # the loss the adapter tuning ran with (None: no tuning)
    tune_iterations: int = 0
    tune_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _matches(name: str, patterns) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def quantizable_layers(model: nn.Module, config: CoRaConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The convs (and linears) ``convert`` will quantize, and the skipped ones with the reason."""
    chosen, skipped = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, (CoRaConv2d, QuantLinear)):
            raise ValueError(f"layer {name!r} is already quantized; convert the float model")
        if type(mod) not in (nn.Conv2d, nn.Linear):
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                skipped[name] = f"subclass {type(mod).__name__} is not converted"
            continue
        if _matches(name, config.skip):
            skipped[name] = "skipped by the config"
        elif isinstance(mod, nn.Linear) and not config.quantize_linear:
            skipped[name] = "linear layers not quantized (quantize_linear=False)"
        else:
            if not torch.isfinite(mod.weight).all():
                raise ValueError(f"layer {name!r}: weight contains NaN or Inf")
            chosen[name] = mod
    if not chosen:
        raise ValueError("the model has no Conv2d or Linear layer to quantize" + (f" (skipped: {sorted(skipped)})" if skipped else ""))
    return chosen, skipped


def _layer_bits(name: str, config: CoRaConfig) -> int:
    for pattern, b in config.layer_bits:
        if _matches(name, (pattern,)):
            return b
    return config.bits


def convert(model: nn.Module, calib, config: CoRaConfig | None = None, *, inplace: bool = False) -> nn.Module:
    """Quantize ``model``'s convs to ``CoRaConv2d`` (with searched adapters) and linears to ``QuantLinear``.

    ``calib``: calibration data, a DataLoader of ``(images, labels)``, of bare image batches, or
    tensors; the first ``config.calib_images`` samples are used. Labels change what the "auto" config
    choices do (:meth:`CoRaConfig.resolved`) and are required for an explicit ``loss``/``tune_loss="ce"``.
    Runs on the device the model is on. Returns the converted model (a copy unless ``inplace=True``;
    BatchNorm statistics are kept unless ``config.bn_reestimate``) with the :class:`ConversionReport` as ``model.cora_report``.
    """
    config = config or CoRaConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    layers, skipped = quantizable_layers(model, config)
    device = next(model.parameters()).device
    x, y = materialize(calib, config.calib_images)
    x = x.to(device)
    y = y.to(device) if y is not None else None
    if config.method == "cora" and config.loss == "ce" and y is None:
        raise ValueError("loss='ce' needs labelled calibration data; pass (images, labels) or use loss='kl' (or 'auto')")
    if config.method != "rtn" and config.tune_iterations and config.tune_loss == "ce" and y is None:
        raise ValueError("tune_loss='ce' needs labelled calibration data; pass (images, labels) or use tune_loss='kl' (or 'auto')")
    config = config.resolved(has_labels=y is not None)  # the report records the choices made
    work = model if inplace else copy.deepcopy(model)
    was_training = model.training
    conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    needs_h = config.rounding == "gptq" or (config.factorization == "activation" and config.method != "rtn")
    order = execution_order(work, list(layers), x[:1])
    # Layer statistics need far fewer images than the search: a seeded random subset (never the
    # first images, which may be sorted by class).
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))[: config.stats_images]
    xs = x[pick.to(x.device)]
    layers = {n: layers[n] for n in order}
    sequential = config.sequential and needs_h
    hessians = {} if sequential or not needs_h else collect_hessians(work, {n: work.get_submodule(n) for n in layers}, xs)
    seq_model = copy.deepcopy(model) if sequential else None  # float model whose layers turn quantized in order
    per_channel = config.granularity == "channel"

    # 1) base quantization of every chosen layer, in execution order
    quant: dict[str, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    adapted: list[AdaptedLayer] = []
    bar = Progress(len(layers), "quantize", config.progress)
    for i, (name, mod) in enumerate(layers.items(), 1):
        bits = _layer_bits(name, config)
        w = mod.weight.detach().float().cpu()
        scale, zero = compute_qparams(w, bits, per_channel=per_channel, method=config.range_method, std_k=config.std_k)
        if sequential and getattr(mod, "groups", 1) == 1:
            h = paired_moments(model, seq_model, name, xs, seed=config.seed)[0]
            h = h.cpu() if h is not None else None  # None: the layer never runs on these inputs
        else:
            h = hessians.get(name)
            h = h.cpu() if h is not None else None
        if config.rounding == "gptq" and h is not None:
            codes = gptq_quantize(w.reshape(w.shape[0], -1), h, scale, zero, bits, damp=config.gptq_damp, act_order=config.gptq_act_order).reshape(w.shape)
        else:
            codes = quantize(w, scale, zero, bits)
        quant[name] = (bits, codes, scale, zero)
        qw = dequantize(codes, scale, zero)
        if seq_model is not None:
            with torch.no_grad():
                seq_model.get_submodule(name).weight.copy_(qw.to(device))
        if isinstance(mod, nn.Conv2d) and config.method != "rtn":
            if mod.groups != 1:
                skipped[name] = "grouped/depthwise conv: quantized without adapter"
            else:
                # without input statistics (a layer the calibration data never reaches) fall back to
                # the weight-space SVD
                method = config.factorization if h is not None else "weight"
                factors = factorize_residual(w - qw, method=method, hessian=h)
                adapted.append(AdaptedLayer(name, qw, factors))
        bar.update(i, name)
    del seq_model

    # 2) ranks
    teacher = None  # the float model's logits on the calibration images, when a KL loss needs them
    ranks = {l.name: 0 for l in adapted}
    iterations, search_seconds, cont, trace = 0, 0.0, None, []
    if config.method == "heuristic" and adapted:
        ranks = heuristic_ranks(adapted, config.budget, conv_params)
    elif config.method == "cora" and adapted:
        teacher = model_logits(model, x) if config.loss == "kl" else None
        search_model = copy.deepcopy(model)
        with torch.no_grad():
            adapted_names = {l.name for l in adapted}
            for name, (bits, codes, scale, zero) in quant.items():
                if name not in adapted_names:  # fixed quantized layers during the search
                    search_model.get_submodule(name).weight.copy_(dequantize(codes, scale, zero).to(device))
        rep = search_ranks(
            search_model,
            adapted,
            x,
            budget=config.budget,
            conv_params=conv_params,
            iterations=config.iterations,
            batch_size=config.batch_size,
            lr=config.lr,
            order=config.order,
            gamma=config.gamma,
            grad_clip=config.grad_clip,
            rho_init=config.rho_init,
            loss=config.loss,
            labels=y,
            teacher_logits=teacher,
            budget_mode=config.budget_mode,
            optimizer=config.optimizer,
            bn_mode=config.search_bn,
            seed=config.seed,
            progress=config.progress,
        )
        del search_model
        ranks, iterations, search_seconds, cont, trace = rep.ranks, rep.iterations, rep.seconds, rep.continuous_budget, rep.trace

    # 3) build the quantized modules, in execution order; with `refine`, each adapter is re-fitted on
    #    the inputs it will really see (every earlier layer final) to reproduce the float outputs
    factors = {l.name: l.factors for l in adapted}
    refine = config.refine and config.factorization == "activation"
    reference = copy.deepcopy(model) if refine and any(ranks.values()) else None
    total_bits = total_weights = 0
    bar = Progress(len(layers), "build", config.progress and reference is not None)
    for i, (name, mod) in enumerate(layers.items(), 1):
        bits, codes, scale, zero = quant[name]
        if isinstance(mod, nn.Conv2d):
            r = ranks.get(name, 0)
            adapter = None
            h_qq = h_fq = None
            if r and reference is not None:
                h_qq, h_fq = paired_moments(reference, work, name, xs, seed=config.seed)
            if h_qq is not None:
                w = mod.weight.detach().float().cpu()
                target = regression_residual(w, dequantize(codes, scale, zero), h_qq.cpu(), h_fq.cpu())
                adapter = adapter_from_factors(factorize_residual(target, method="activation", hessian=h_qq.cpu()), r)
            elif r:
                adapter = adapter_from_factors(factors[name], r)
            new = CoRaConv2d.from_conv(mod, bits, codes=codes, scale=scale, zero=zero, adapter=adapter, adapter_dtype=config.adapter_dtype)
        else:
            new = QuantLinear.from_linear(mod, bits, codes=codes, scale=scale, zero=zero)
        new.train(mod.training)
        total_bits += new.storage_bits()
        total_weights += mod.weight.numel()
        set_submodule(work, name, new)
        bar.update(i, name)
    del reference
    if config.bn_reestimate:  # asked for: BatchNorm statistics of the quantized model on the calibration images
        reestimate_batchnorm(work, x, batch_size=config.tune_batch_size, seed=config.seed)

    # 4) joint, end-to-end tuning of the adapters (ranks, codes and everything else fixed)
    tune_loss, tune_iters, tune_seconds = None, 0, 0.0
    if config.method != "rtn" and config.tune_iterations and any(ranks.values()):
        tune_loss = config.tune_loss
        if tune_loss == "kl" and teacher is None:  # the search's float logits serve here too
            teacher = model_logits(model, x)
        rep = tune_adapters(
            work, x, loss=tune_loss, labels=y, teacher_logits=teacher, iterations=config.tune_iterations,
            lr=config.tune_lr, batch_size=config.tune_batch_size, seed=config.seed,
            progress=Progress(config.tune_iterations, "tune", config.progress),
        )
        tune_iters, tune_seconds = rep.iterations, rep.seconds
    work.train(was_training)
    work.cora_report = ConversionReport(
        method=config.method,
        bits=config.bits,
        budget=config.budget,
        ranks=dict(ranks),
        adapter_fraction=adapter_fraction(ranks, adapted, conv_params) if adapted else 0.0,
        equiv_bits=total_bits / total_weights,
        iterations=iterations,
        calib_images=int(x.shape[0]),
        search_seconds=search_seconds,
        total_seconds=time.perf_counter() - t0,
        quantized=list(layers),
        skipped=skipped,
        config=config.to_dict(),
        continuous_budget=cont,
        trace=trace,
        tune_loss=tune_loss,
        tune_iterations=tune_iters,
        tune_seconds=tune_seconds,
    )
    return work
