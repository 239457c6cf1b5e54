"""``convert``: the one public verb that turns a float model into a CoRa model, as five phases.

::

    float model + calibration images
      1. quantize_base   every chosen layer, in execution order: ranges, then GPTQ (or nearest) rounding
                         on the inputs of the partly quantized model; the residual W - Q(W) of each
                         adapted conv or linear layer is factorized (residual.py)
      2. choose_ranks    uniform ranks, or the Butterworth search (search.py), under the budget (budget.py)
      3. build_layers    CoRaConv2d / QuantLinear in place of every chosen layer; with ``refine``, each
                         adapter re-fitted on the inputs it really sees
      4. tune_layers     the adapters trained jointly, end to end (tune.py), or block by block against the
                         float model's block outputs (reconstruct.py), when the config asks for it
      5. make_report     ranks, adapter fraction and each layer's share of the budget, equivalent bits,
                         timings -> ``model.cora_report``

The budget is a fraction of ``P``, the weights of every Conv2d and (unless ``quantize_linear=False``)
every Linear of the model (:func:`cora.budget.budget_weight_count`); convs (groups 1) and linear
layers alike get adapters.

The model copies involved are named by role: ``float_model`` (the caller's, only read),
``output`` (what is returned), ``partly_quantized`` (phase 1: a float copy whose layers turn
quantized one by one), ``search_copy`` (phase 2) and ``float_reference`` (phase 3).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from ._modules_util import kept_modes, module_modes
from .budget import (
    AdaptedLayer, adapter_fraction, bits_breakdown, budget_shares, budget_weight_count, uniform_ranks,
)
from .calibration import CalibrationSet, Objective, model_logits
from .caller_model import check_model, probe_outputs, restore_dtype, transplant
from .conversion_records import BaseQuantization, ConversionReport, QuantizedWeight, RankChoice, TuneOutcome
from .config import BLOCKS_ITERATIONS, BLOCKS_LR, CoRaConfig
from .layer_selection import fixed_bits, layer_bits_of, quantizable_layers, stored_rank, uses_statistics
from .modules import CoRaConv2d, QuantLinear
from .precision import SENSITIVITY_IMAGES, adapter_reserve_bits, choose_widths, layer_cost_bits, sensitivities, width_choices
from .progress import progress_bar
from .quantizer import compute_qparams, gptq_quantize, prepare_hessian, quantize
from .residual import adapter_from_factors, factorize_residual, regression_residual
from .reconstruct import reconstruct_blocks
from .search import search_ranks
from .graph import trace_stages
from .statistics import LayerInputs, execution_order, layer_moments, paired_moments_of, reestimate_batchnorm
from .tune import tune_adapters

__all__ = [
    "convert",
    "ConversionReport",
    "QuantizedWeight",
    "BaseQuantization",
    "RankChoice",
    "TuneOutcome",
    "quantizable_layers",
    "quantize_base",
    "choose_ranks",
    "build_layers",
    "tune_layers",
    "make_report",
]


class _FloatLogits:
    """The float model's logits on the calibration images, computed once, on first use (KL losses)."""

    def __init__(self, float_model: nn.Module, data: CalibrationSet, output=None) -> None:
        self.float_model, self.data, self.output, self._logits = float_model, data, output, None

    def get(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = model_logits(self.float_model, self.data.images, output=self.output)
        return self._logits

    def objective(self, kind: str) -> Objective:
        if kind == "ce":
            return Objective("ce", labels=self.data.labels, output=self.output)
        return Objective("kl", teacher_logits=self.get(), output=self.output)


def choose_layer_widths(
    float_model: nn.Module, layers: dict[str, nn.Module], data: CalibrationSet, config: CoRaConfig, weight_params: int,
) -> dict[str, int]:
    """Phase 0 (``target_bits`` only): the width of every layer the config does not fix (:mod:`cora.precision`).

    The bits left for them are ``target_bits`` times the quantized weights, less what the fixed layers and the
    adapters (``budget · P`` parameters at their storage width) can take.
    """
    per_channel = config.quantizer.granularity == "channel"
    order = execution_order(float_model, list(layers), data.images[:1])
    fixed = {n: b for n in order if (b := fixed_bits(n, layers[n], config)) is not None}
    free = {n: layers[n] for n in order if n not in fixed}
    total_weights = sum(m.weight.numel() for m in layers.values())
    budget_bits = (
        config.target_bits * total_weights - adapter_reserve_bits(config, weight_params)
        - sum(layer_cost_bits(layers[n], b, per_channel) for n, b in fixed.items())
    )
    if not free:
        return {}
    choices = width_choices(config.bits, budget_bits / sum(m.weight.numel() for m in free.values()))
    images = data.statistics_subset(SENSITIVITY_IMAGES, config.seed)
    losses = sensitivities(float_model, free, choices, config, images)
    try:
        return choose_widths(free, losses, budget_bits, per_channel)
    except ValueError as exc:
        narrowest = sum(layer_cost_bits(m, choices[0], per_channel) for m in free.values())
        floor_bits = (narrowest + config.target_bits * total_weights - budget_bits) / total_weights
        raise ValueError(
            f"target_bits={config.target_bits} is below what this model can store with these settings "
            f"({floor_bits:.3f} equivalent bits at the narrowest widths, adapters at their full budget): {exc}"
        ) from None


# ---------------------------------------------------------------------------------------- phases
def quantize_base(
    float_model: nn.Module, output: nn.Module, layers: dict[str, nn.Module], data: CalibrationSet,
    config: CoRaConfig, weight_params: int, widths: dict[str, int] | None = None,
) -> BaseQuantization:
    """Phase 1: ranges and rounding of every chosen layer, in execution order, and the residual factors.

    ``layers``: name -> float layer of ``float_model``; ``weight_params``: ``P``, what the budget is a fraction
    of (only the singular directions a layer can ever afford are computed). With sequential GPTQ each layer's
    statistics come from the inputs the partly quantized model produces (every earlier layer already rounded).
    Convs and linear layers get adapters; grouped convs are quantized without one (recorded in ``no_adapter``).
    """
    q, adapters = config.quantizer, config.method != "none"
    order = execution_order(output, list(layers), data.images[:1])
    stats_images = data.statistics_subset(q.stats_images, config.seed)
    layers = {n: layers[n] for n in order}
    # decided before anything is allocated: [K, K] float64 statistics of a very wide layer do not fit
    wide = {n for n, m in layers.items() if m.weight[0].numel() > q.max_stats_features}
    wanted = {n for n, m in layers.items() if uses_statistics(m, config)}
    too_wide = wanted & wide
    wanted -= too_wide
    chain = trace_stages(float_model, list(layers), data.images[:2]) if wanted else None
    sequential = q.sequential and bool(wanted)
    partly_quantized = copy.deepcopy(float_model) if sequential else None
    # inputs of each layer, one layer at a time, from the kept inputs of its stage (linear in depth)
    float_inputs = LayerInputs(float_model, stats_images, chain) if wanted else None
    quant_inputs = LayerInputs(partly_quantized, stats_images, chain) if sequential else None
    device = data.images.device
    weights: dict[str, QuantizedWeight] = {}
    no_adapter: dict[str, str] = {}
    adapted: list[AdaptedLayer] = []
    with progress_bar(len(layers), "quantize", config.progress) as bar:
        for name, mod in layers.items():
            bits = layer_bits_of(name, mod, config, widths)
            w = mod.weight.detach().float().cpu()
            method = q.range_for(bits, config.budget if adapters else 0.0)
            scale, zero = compute_qparams(w, bits, per_channel=q.granularity == "channel", method=method, std_k=q.std_k)
            h = None  # no statistics: not needed, too wide, or the layer never runs on these images
            if name in wanted and sequential:
                h = paired_moments_of(float_inputs, quant_inputs, name, seed=config.seed)[0]
            elif name in wanted:
                h = layer_moments(float_inputs, name, seed=config.seed)
            # factored once, shared by GPTQ and the activation-aware factorization
            h = prepare_hessian(h.cpu(), q.gptq_damp) if h is not None else None
            if q.rounding == "gptq" and h is not None:
                codes = gptq_quantize(
                    w.reshape(w.shape[0], -1), h, scale, zero, bits, damp=q.gptq_damp, act_order=q.gptq_act_order
                ).reshape(w.shape)
            else:
                codes = quantize(w, scale, zero, bits)
            weights[name] = QuantizedWeight(bits, codes, scale, zero)
            qw = weights[name].dequantized()
            if partly_quantized is not None:
                with torch.no_grad():
                    partly_quantized.get_submodule(name).weight.copy_(qw.to(device))
            if adapters:
                if getattr(mod, "groups", 1) != 1:
                    no_adapter[name] = "grouped/depthwise conv: quantized without adapter"
                else:
                    # without input statistics (a layer the calibration data never reaches): weight-space SVD
                    method = config.adapter.factorization if h is not None else "weight"
                    max_rank = stored_rank(w.shape, config, weight_params)
                    factors = factorize_residual(w - qw, method=method, hessian=h, max_rank=max_rank)
                    adapted.append(AdaptedLayer(name, qw, factors))
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
    return BaseQuantization(weights, adapted, stats_images, too_wide, no_adapter, chain)


def choose_ranks(
    float_model: nn.Module, base: BaseQuantization, data: CalibrationSet, config: CoRaConfig, float_logits: _FloatLogits,
    weight_params: int,
) -> RankChoice:
    """Phase 2: the adapter rank of every adapted layer, under ``config.budget`` (a resolved config).

    ``weight_params``: ``P``, the float model's weight count the budget is a fraction of.
    """
    adapted = base.adapted
    if config.method == "uniform" and adapted:
        return RankChoice(uniform_ranks(adapted, config.budget, weight_params))
    if config.method != "search" or not adapted:
        return RankChoice({l.name: 0 for l in adapted})
    objective = float_logits.objective(config.search.loss)
    search_copy = copy.deepcopy(float_model)
    with torch.no_grad():
        adapted_names = {l.name for l in adapted}
        for name, qw in base.weights.items():
            if name not in adapted_names:  # fixed quantized layers during the search
                search_copy.get_submodule(name).weight.copy_(qw.dequantized().to(data.images.device))
    rep = search_ranks(
        search_copy, adapted, data.images, objective, budget=config.budget, weight_params=weight_params,
        settings=config.search, seed=config.seed, progress=config.progress,
    )
    return RankChoice(rep.ranks, rep.iterations, rep.seconds, rep.continuous_budget, rep.trace)


def build_layers(
    float_model: nn.Module, output: nn.Module, layers: dict[str, nn.Module], base: BaseQuantization,
    ranks: RankChoice, data: CalibrationSet, config: CoRaConfig,
) -> tuple[int, int]:
    """Phase 3: replace every chosen layer of ``output`` by its ``CoRaConv2d`` / ``QuantLinear``, in order.

    With ``adapter.refine`` (and the activation-aware factorization), each conv adapter is re-fitted on the
    inputs it will really see (every earlier layer final) to reproduce the float outputs; linear layers keep
    their phase-1 factorization (one input row per image is too few for that regression). With
    ``bn_reestimate`` the BatchNorm statistics are then re-estimated on the calibration images.
    Returns ``(bits stored, weights)`` over the chosen layers, for the equivalent bits.
    """
    factors = {l.name: l.factors for l in base.adapted}
    refine = config.adapter.refine and config.adapter.factorization == "activation"
    float_reference = copy.deepcopy(float_model) if refine and any(ranks.ranks.values()) else None
    if float_reference is not None:
        float_inputs = LayerInputs(float_reference, base.statistics_images, base.chain)
        output_inputs = LayerInputs(output, base.statistics_images, base.chain)
    total_bits = total_weights = 0
    with progress_bar(len(base.weights), "build", config.progress and float_reference is not None) as bar:
        for name, qw in base.weights.items():
            mod = layers[name]
            r = ranks.ranks.get(name, 0)
            adapter = None
            h_qq = h_fq = None
            # refine re-fits conv adapters only: a linear layer sees one input row per image (per token), too few
            # for the regression (cifar_resnet8, 64 images: its refined 64x10 adapter raised the output MSE
            # 0.014 -> 0.024); it keeps its phase-1 factorization (activation-aware under its input moments)
            if r and float_reference is not None and name not in base.without_statistics and isinstance(mod, nn.Conv2d):
                h_qq, h_fq = paired_moments_of(float_inputs, output_inputs, name, seed=config.seed)
            if h_qq is not None:
                w = mod.weight.detach().float().cpu()
                h_qq = prepare_hessian(h_qq.cpu())  # one factorization for the regression and the SVD
                target = regression_residual(w, qw.dequantized(), h_qq, h_fq.cpu())
                refit = factorize_residual(target, method="activation", hessian=h_qq, max_rank=r)
                adapter = adapter_from_factors(refit, r)
            elif r:
                adapter = adapter_from_factors(factors[name], r)
            kw = dict(codes=qw.codes, scale=qw.scale, zero=qw.zero, adapter=adapter, adapter_dtype=config.adapter.dtype)
            if isinstance(mod, nn.Conv2d):
                new = CoRaConv2d.from_conv(mod, qw.bits, **kw)
            else:
                new = QuantLinear.from_linear(mod, qw.bits, **kw)
            new.train(mod.training)
            total_bits += new.storage_bits()
            total_weights += mod.weight.numel()
            output.set_submodule(name, new)
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
    del float_reference
    if config.bn_reestimate:  # asked for: BatchNorm statistics of the quantized model on the calibration images
        reestimate_batchnorm(output, data.images, batch_size=config.tune.batch_size, seed=config.seed)
    return total_bits, total_weights


def tune_layers(
    float_model: nn.Module, output: nn.Module, base: BaseQuantization, ranks: RankChoice, data: CalibrationSet,
    config: CoRaConfig, float_logits: _FloatLogits,
) -> TuneOutcome:
    """Phase 4: tuning of the adapters of ``output`` (a resolved config decides if it runs and how).

    ``ce`` / ``kl``: all adapters jointly, end to end (:mod:`cora.tune`). ``blocks``: block by block
    against ``float_model``'s block outputs (:mod:`cora.reconstruct`); a model ``torch.fx`` cannot
    trace exactly is tuned end to end with ``kl`` instead, with a warning. ``blocks+ce``: the block
    reconstruction (``BLOCKS_ITERATIONS`` steps per block at ``BLOCKS_LR``), then ``ce`` at the
    config's steps and rate (``ce`` alone, with a note, when the model cannot be traced). When the tuning diverges or
    its adapters are not finite, the untuned adapters stay and the outcome carries a warning (the
    conversion itself does not fail).
    """
    t = config.tune
    adapters = config.method != "none" and any(ranks.ranks.values())
    blocks = t.loss in ("blocks", "blocks+ce")
    norms_only = blocks and t.norms  # the block reconstruction fits BatchNorms without adapters too
    if not t.iterations or not (adapters or norms_only):
        return TuneOutcome()
    loss, note, pre = t.loss, None, None
    if blocks:
        chain = base.chain or trace_stages(float_model, list(base.weights), data.images[:2])
        if chain is not None:
            # "blocks+ce": the block reconstruction at its own steps and rate first, then cross-entropy
            iterations, lr = (t.iterations, t.lr) if loss == "blocks" else (BLOCKS_ITERATIONS, BLOCKS_LR)
            pre = reconstruct_blocks(
                output, float_model, chain, data.images, iterations=iterations, lr=lr, batch_size=t.batch_size,
                norms=t.norms, seed=config.seed, progress=config.progress,
            )
            if loss == "blocks" or not adapters:  # without adapters "blocks+ce" has nothing for its ce phase
                return TuneOutcome("blocks", pre.iterations, pre.seconds, norms=pre.norms)
        elif not adapters:
            return TuneOutcome(warning="block reconstruction needs a model torch.fx can trace exactly; "
                                       "with no adapters there was nothing else to tune")
        elif loss == "blocks":
            loss = "kl"
            note = "block reconstruction needs a model torch.fx can trace exactly; the adapters were tuned end to end (kl)"
        else:
            loss = "ce"
            note = "block reconstruction needs a model torch.fx can trace exactly; the adapters were tuned end to end (ce) only"
    end_to_end = "ce" if loss == "blocks+ce" else loss
    pre_steps, pre_seconds, pre_norms = (pre.iterations, pre.seconds, pre.norms) if pre is not None else (0, 0.0, 0)
    try:
        rep = tune_adapters(
            output, data.images, float_logits.objective(end_to_end), iterations=t.iterations, lr=t.lr,
            batch_size=t.batch_size, seed=config.seed, progress=config.progress,
        )
    except FloatingPointError as exc:
        if pre is not None:  # the block reconstruction stands
            return TuneOutcome("blocks", pre_steps, pre_seconds, f"{exc}; the block-reconstructed adapters are kept", pre_norms)
        return TuneOutcome(warning=f"{exc}; the untuned adapters are kept")
    if rep.warning is not None:
        return TuneOutcome("blocks" if pre is not None else None, pre_steps, pre_seconds + rep.seconds, rep.warning, pre_norms)
    return TuneOutcome(loss, pre_steps + rep.iterations, pre_seconds + rep.seconds, note, pre_norms)


def make_report(
    config: CoRaConfig, skipped: dict[str, str], base: BaseQuantization,
    ranks: RankChoice, storage: tuple[int, int], tuning: TuneOutcome, weight_params: int, calib_images: int, seconds: float,
) -> ConversionReport:
    """Phase 5: the :class:`ConversionReport` (the resolved config, so "auto" choices are on record)."""
    total_bits, total_weights = storage
    warnings = [
        f"{name}: {base.weights[name].codes[0].numel()} input features > quantizer.max_stats_features="
        f"{config.quantizer.max_stats_features}: no input statistics (they would not fit in memory); rounded to nearest"
        + (", weight-space adapter" if any(l.name == name for l in base.adapted) else "")
        for name in base.weights if name in base.without_statistics
    ]
    if tuning.warning:
        warnings.append(tuning.warning)
    return ConversionReport(
        method=config.method,
        bits=config.bits,
        budget=config.budget,
        ranks=dict(ranks.ranks),
        adapter_fraction=adapter_fraction(ranks.ranks, base.adapted, weight_params) if base.adapted else 0.0,
        equiv_bits=total_bits / total_weights,
        iterations=ranks.iterations,
        calib_images=calib_images,
        search_seconds=ranks.seconds,
        total_seconds=seconds,
        quantized=list(base.weights),
        skipped=skipped,
        config=config.to_dict(),
        continuous_budget=ranks.continuous_budget,
        trace=ranks.trace,
        tune_loss=tuning.loss,
        tune_iterations=tuning.iterations,
        tune_seconds=tuning.seconds,
        warnings=warnings,
        no_adapter=dict(base.no_adapter),
        budget_share=budget_shares(ranks.ranks, base.adapted, weight_params),
        tune_norms=tuning.norms,
        widths={name: qw.bits for name, qw in base.weights.items()},
    )


# ---------------------------------------------------------------------------------------- the verb
def convert(model: nn.Module, calib, config: CoRaConfig | None = None, *, inplace: bool = False) -> nn.Module:
    """Quantize ``model``'s convs to ``CoRaConv2d`` and linears to ``QuantLinear``, both with adapters.

    ``calib``: calibration data, a DataLoader of ``(images, labels)``, of bare image batches, or
    tensors; the first ``config.calib_images`` samples are used. Labels (integer class indices, one
    per image; one-hot rows are converted) change what the "auto" config choices do
    (:meth:`CoRaConfig.resolved`) and are required for an explicit ``loss``/``tune_loss="ce"``.

    Runs on the device the model is on. A float16 / bfloat16 / float64 model is converted through a
    float32 copy and returned in its own dtype (its float layers keep their exact values). Returns the
    converted model (a copy unless ``inplace=True``; BatchNorm statistics are kept unless
    ``config.bn_reestimate``) with the :class:`ConversionReport` as ``model.cora_report``. The
    caller's model (unless ``inplace``), every module's training flag, ``requires_grad`` and the
    global RNG state are left as they were. Bad input raises ``ValueError`` / ``TypeError`` before
    any work, naming what is wrong.
    """
    config = config or CoRaConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, CoRaConfig):
        raise TypeError(f"config must be a CoRaConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    layers, skipped = quantizable_layers(model, config)
    device, dtype = check_model(model)
    data = CalibrationSet.gather(calib, config.calib_images, device)
    config = config.resolved(has_labels=data.has_labels)
    modes = module_modes(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    rng_devices = [device] if device.type == "cuda" else []
    # the global RNG is used by the search (seeded, so that dropout repeats): give the caller's back
    with torch.random.fork_rng(devices=rng_devices), kept_modes(model):
        float_model = model if dtype == torch.float32 else copy.deepcopy(model).float()
        if float_model is not model:
            layers = {n: float_model.get_submodule(n) for n in layers}
        probe_outputs(float_model, data, config)
        output = float_model if (inplace and float_model is model) else copy.deepcopy(float_model)
        # P: before anything is replaced (inplace=True); linear weights count only where linears are quantized
        weight_params = budget_weight_count(float_model, linear=config.quantize_linear)
        float_logits = _FloatLogits(float_model, data, config.output)
        # the block reconstruction runs the float model beside the converted one: in place, keep a float copy
        blocks = config.tune.loss in ("blocks", "blocks+ce") and config.tune.iterations > 0
        reference = copy.deepcopy(float_model) if blocks and output is float_model else float_model

        clock = _PhaseClock()
        widths = None
        if config.target_bits:
            widths = clock.run("widths", choose_layer_widths, float_model, layers, data, config, weight_params)
        base = clock.run("quantize", quantize_base, float_model, output, layers, data, config, weight_params, widths)
        ranks = clock.run("search", choose_ranks, float_model, base, data, config, float_logits, weight_params)
        storage = clock.run("build", build_layers, float_model, output, layers, base, ranks, data, config)
        breakdown = bits_breakdown([output.get_submodule(n) for n in base.weights], config.bits)
        tuning = clock.run("tune", tune_layers, reference, output, base, ranks, data, config, float_logits)
    for name, p in model.named_parameters():
        p.requires_grad_(grads[name])
    if dtype != torch.float32:
        restore_dtype(output, model, dtype)
        if inplace:
            output = transplant(output, model)
    for name, m in output.named_modules():  # every module keeps the caller's flag (new layers took their float layer's)
        if name in modes:
            m.training = modes[name]
    output.cora_report = make_report(
        config, skipped, base, ranks, storage, tuning, weight_params, len(data), time.perf_counter() - t0
    )
    output.cora_report.bits_breakdown = breakdown
    output.cora_report.phase_seconds = clock.seconds
    return output


class _PhaseClock:
    """Wall seconds of each phase of one conversion, by name (``ConversionReport.phase_seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, phase, *args):
        start = time.perf_counter()
        try:
            return phase(*args)
        finally:
            self.seconds[name] = time.perf_counter() - start
