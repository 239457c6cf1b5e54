"""``convert``: the one public verb that turns a float model into a CoRa model, as five phases.

::

    float model + calibration images
      1. quantize_base   every chosen layer, in execution order: ranges, then GPTQ (or nearest) rounding
                         on the inputs of the partly quantized model; the residual W - Q(W) of each
                         adapted conv is factorized (residual.py)
      2. choose_ranks    uniform ranks, or the Butterworth search (search.py), under the budget (budget.py)
      3. build_layers    CoRaConv2d / QuantLinear in place of every chosen layer; with ``refine``, each
                         adapter re-fitted on the inputs it really sees
      4. tune_layers     all adapters trained jointly, end to end (tune.py), when the config asks for it
      5. make_report     ranks, adapter fraction, equivalent bits, timings -> ``model.cora_report``

The model copies involved are named by role: ``float_model`` (the caller's, only read),
``output`` (what is returned), ``partly_quantized`` (phase 1: a float copy whose layers turn
quantized one by one), ``search_copy`` (phase 2) and ``float_reference`` (phase 3).
"""
from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ._modules_util import set_submodule
from .budget import AdaptedLayer, adapter_fraction, conv_weight_count, uniform_ranks
from .calibration import CalibrationSet, Objective, model_logits
from .config import CoRaConfig
from .modules import CoRaConv2d, QuantLinear
from .progress import progress_bar
from .quantizer import compute_qparams, dequantize, gptq_quantize, quantize
from .residual import adapter_from_factors, factorize_residual, regression_residual
from .search import search_ranks
from .statistics import collect_hessians, execution_order, paired_moments, reestimate_batchnorm
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


@dataclass
class QuantizedWeight:
    """One layer's base quantization: ``W_q = scale * (codes - zero)``.

    ``codes`` uint8 in the PyTorch weight layout (``[C_out, C_in/groups, kh, kw]`` or ``[C_out, C_in]``);
    ``scale`` and ``zero`` float32 ``[C_out]``.
    """

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """``W_q`` float32, the weight's shape."""
        return dequantize(self.codes, self.scale, self.zero)


@dataclass
class BaseQuantization:
    """Phase 1's result: every chosen layer's quantized weight (execution order), the convs that get an
    adapter with their factorized residuals, and the images the layer statistics came from."""

    weights: dict[str, QuantizedWeight]
    adapted: list[AdaptedLayer]
    statistics_images: torch.Tensor  # [n, C, H, W], a seeded subset of the calibration images


@dataclass
class RankChoice:
    """Phase 2's result: one rank per adapted conv, and what the search did (zeros when it did not run)."""

    ranks: dict[str, int]
    iterations: int = 0
    seconds: float = 0.0
    continuous_budget: float | None = None
    trace: list = field(default_factory=list)


@dataclass
class TuneOutcome:
    """Phase 4's result: the loss the tuning ran with (None: it did not run), its steps and seconds."""

    loss: str | None = None
    iterations: int = 0
    seconds: float = 0.0


class _FloatLogits:
    """The float model's logits on the calibration images, computed once, on first use (KL losses)."""

    def __init__(self, float_model: nn.Module, data: CalibrationSet) -> None:
        self.float_model, self.data, self._logits = float_model, data, None

    def get(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = model_logits(self.float_model, self.data.images)
        return self._logits

    def objective(self, kind: str) -> Objective:
        if kind == "ce":
            return Objective("ce", labels=self.data.labels)
        return Objective("kl", teacher_logits=self.get())


# ---------------------------------------------------------------------------------------- layers
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
        why = f" (skipped: {sorted(skipped)})" if skipped else ""
        raise ValueError("the model has no Conv2d or Linear layer to quantize" + why)
    return chosen, skipped


def _layer_bits(name: str, config: CoRaConfig) -> int:
    for pattern, b in config.layer_bits:
        if _matches(name, (pattern,)):
            return b
    return config.bits


# ---------------------------------------------------------------------------------------- phases
def quantize_base(
    float_model: nn.Module, output: nn.Module, layers: dict[str, nn.Module], data: CalibrationSet,
    config: CoRaConfig, skipped: dict[str, str],
) -> BaseQuantization:
    """Phase 1: ranges and rounding of every chosen layer, in execution order, and the residual factors.

    ``layers``: name -> float layer of ``float_model``. With sequential GPTQ each layer's statistics
    come from the inputs the partly quantized model produces (every earlier layer already rounded).
    Grouped convs are quantized without an adapter (recorded in ``skipped``).
    """
    q, adapters = config.quantizer, config.method != "none"
    needs_statistics = q.rounding == "gptq" or (config.adapter.factorization == "activation" and adapters)
    order = execution_order(output, list(layers), data.images[:1])
    stats_images = data.statistics_subset(q.stats_images, config.seed)
    layers = {n: layers[n] for n in order}
    sequential = q.sequential and needs_statistics
    if sequential or not needs_statistics:
        hessians = {}
    else:
        hessians = collect_hessians(output, {n: output.get_submodule(n) for n in layers}, stats_images)
    partly_quantized = copy.deepcopy(float_model) if sequential else None
    device = data.images.device
    weights: dict[str, QuantizedWeight] = {}
    adapted: list[AdaptedLayer] = []
    with progress_bar(len(layers), "quantize", config.progress) as bar:
        for name, mod in layers.items():
            bits = _layer_bits(name, config)
            w = mod.weight.detach().float().cpu()
            scale, zero = compute_qparams(w, bits, per_channel=q.granularity == "channel", method=q.range_method, std_k=q.std_k)
            if sequential and getattr(mod, "groups", 1) == 1:
                h = paired_moments(float_model, partly_quantized, name, stats_images, seed=config.seed)[0]
            else:
                h = hessians.get(name)
            h = h.cpu() if h is not None else None  # None: the layer never runs on these images
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
            if isinstance(mod, nn.Conv2d) and adapters:
                if mod.groups != 1:
                    skipped[name] = "grouped/depthwise conv: quantized without adapter"
                else:
                    # without input statistics (a layer the calibration data never reaches): weight-space SVD
                    method = config.adapter.factorization if h is not None else "weight"
                    adapted.append(AdaptedLayer(name, qw, factorize_residual(w - qw, method=method, hessian=h)))
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
    return BaseQuantization(weights, adapted, stats_images)


def choose_ranks(
    float_model: nn.Module, base: BaseQuantization, data: CalibrationSet, config: CoRaConfig, float_logits: _FloatLogits,
    conv_params: int,
) -> RankChoice:
    """Phase 2: the adapter rank of every adapted conv, under ``config.budget`` (a resolved config).

    ``conv_params``: the float model's conv weight count, which the budget is a fraction of.
    """
    adapted = base.adapted
    if config.method == "uniform" and adapted:
        return RankChoice(uniform_ranks(adapted, config.budget, conv_params))
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
        search_copy, adapted, data.images, objective, budget=config.budget, conv_params=conv_params,
        settings=config.search, seed=config.seed, progress=config.progress,
    )
    return RankChoice(rep.ranks, rep.iterations, rep.seconds, rep.continuous_budget, rep.trace)


def build_layers(
    float_model: nn.Module, output: nn.Module, layers: dict[str, nn.Module], base: BaseQuantization,
    ranks: RankChoice, data: CalibrationSet, config: CoRaConfig,
) -> tuple[int, int]:
    """Phase 3: replace every chosen layer of ``output`` by its ``CoRaConv2d`` / ``QuantLinear``, in order.

    With ``adapter.refine`` (and the activation-aware factorization), each adapter is re-fitted on the
    inputs it will really see (every earlier layer final) to reproduce the float outputs. With
    ``bn_reestimate`` the BatchNorm statistics are then re-estimated on the calibration images.
    Returns ``(bits stored, weights)`` over the chosen layers, for the equivalent bits.
    """
    factors = {l.name: l.factors for l in base.adapted}
    refine = config.adapter.refine and config.adapter.factorization == "activation"
    float_reference = copy.deepcopy(float_model) if refine and any(ranks.ranks.values()) else None
    total_bits = total_weights = 0
    with progress_bar(len(base.weights), "build", config.progress and float_reference is not None) as bar:
        for name, qw in base.weights.items():
            mod = layers[name]
            if isinstance(mod, nn.Conv2d):
                r = ranks.ranks.get(name, 0)
                adapter = None
                h_qq = h_fq = None
                if r and float_reference is not None:
                    h_qq, h_fq = paired_moments(float_reference, output, name, base.statistics_images, seed=config.seed)
                if h_qq is not None:
                    w = mod.weight.detach().float().cpu()
                    target = regression_residual(w, qw.dequantized(), h_qq.cpu(), h_fq.cpu())
                    adapter = adapter_from_factors(factorize_residual(target, method="activation", hessian=h_qq.cpu()), r)
                elif r:
                    adapter = adapter_from_factors(factors[name], r)
                new = CoRaConv2d.from_conv(
                    mod, qw.bits, codes=qw.codes, scale=qw.scale, zero=qw.zero, adapter=adapter,
                    adapter_dtype=config.adapter.dtype,
                )
            else:
                new = QuantLinear.from_linear(mod, qw.bits, codes=qw.codes, scale=qw.scale, zero=qw.zero)
            new.train(mod.training)
            total_bits += new.storage_bits()
            total_weights += mod.weight.numel()
            set_submodule(output, name, new)
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
    del float_reference
    if config.bn_reestimate:  # asked for: BatchNorm statistics of the quantized model on the calibration images
        reestimate_batchnorm(output, data.images, batch_size=config.tune.batch_size, seed=config.seed)
    return total_bits, total_weights


def tune_layers(
    output: nn.Module, ranks: RankChoice, data: CalibrationSet, config: CoRaConfig, float_logits: _FloatLogits
) -> TuneOutcome:
    """Phase 4: joint, end-to-end tuning of the adapters of ``output`` (a resolved config decides if it runs)."""
    t = config.tune
    if config.method == "none" or not t.iterations or not any(ranks.ranks.values()):
        return TuneOutcome()
    rep = tune_adapters(
        output, data.images, float_logits.objective(t.loss), iterations=t.iterations, lr=t.lr,
        batch_size=t.batch_size, seed=config.seed, progress=config.progress,
    )
    return TuneOutcome(t.loss, rep.iterations, rep.seconds)


def make_report(
    config: CoRaConfig, skipped: dict[str, str], base: BaseQuantization,
    ranks: RankChoice, storage: tuple[int, int], tuning: TuneOutcome, conv_params: int, calib_images: int, seconds: float,
) -> ConversionReport:
    """Phase 5: the :class:`ConversionReport` (the resolved config, so "auto" choices are on record)."""
    total_bits, total_weights = storage
    return ConversionReport(
        method=config.method,
        bits=config.bits,
        budget=config.budget,
        ranks=dict(ranks.ranks),
        adapter_fraction=adapter_fraction(ranks.ranks, base.adapted, conv_params) if base.adapted else 0.0,
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
    )


# ---------------------------------------------------------------------------------------- the verb
def convert(model: nn.Module, calib, config: CoRaConfig | None = None, *, inplace: bool = False) -> nn.Module:
    """Quantize ``model``'s convs to ``CoRaConv2d`` (with adapters) and linears to ``QuantLinear``.

    ``calib``: calibration data, a DataLoader of ``(images, labels)``, of bare image batches, or
    tensors; the first ``config.calib_images`` samples are used. Labels change what the "auto" config
    choices do (:meth:`CoRaConfig.resolved`) and are required for an explicit ``loss``/``tune_loss="ce"``.
    Runs on the device the model is on. Returns the converted model (a copy unless ``inplace=True``;
    BatchNorm statistics are kept unless ``config.bn_reestimate``) with the :class:`ConversionReport`
    as ``model.cora_report``.
    """
    config = config or CoRaConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    float_model = model
    layers, skipped = quantizable_layers(float_model, config)
    data = CalibrationSet.gather(calib, config.calib_images, next(float_model.parameters()).device)
    config = config.resolved(has_labels=data.has_labels)
    output = float_model if inplace else copy.deepcopy(float_model)
    was_training = float_model.training
    conv_params = conv_weight_count(float_model)  # before anything is replaced (inplace=True)
    float_logits = _FloatLogits(float_model, data)

    base = quantize_base(float_model, output, layers, data, config, skipped)
    ranks = choose_ranks(float_model, base, data, config, float_logits, conv_params)
    storage = build_layers(float_model, output, layers, base, ranks, data, config)
    tuning = tune_layers(output, ranks, data, config, float_logits)
    output.train(was_training)
    output.cora_report = make_report(
        config, skipped, base, ranks, storage, tuning, conv_params, len(data), time.perf_counter() - t0
    )
    return output
