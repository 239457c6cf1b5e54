"""The sections of :class:`cora.config.CoRaConfig`, one frozen dataclass per phase, and their checks.

* :class:`QuantizerConfig` -- the base quantization (granularity, ranges, rounding, statistics);
* :class:`AdapterConfig` -- how residual adapters are factorized, refined and stored;
* :class:`SearchConfig` -- the Butterworth rank search (``method="search"``);
* :class:`TuneConfig` -- the adapter tuning after the ranks are fixed.

A field whose value is decided from the rest of the config is ``None`` (or the string ``"auto"``
where the choice is between names); :meth:`cora.config.CoRaConfig.resolved` is the one place that
decides it. A value the user set is never replaced: a combination that cannot work is refused here
or there, with one message. The measurements behind the defaults are next to the constants.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from cora_kernels.packing import SUPPORTED_BITS  # noqa: F401  (one source of the widths; cora.config re-exports it)

METHODS = ("auto", "search", "uniform", "none")
DEPRECATED_METHODS = {"cora": "search", "heuristic": "uniform", "rtn": "none"}
LOSSES = ("kl", "ce")  # what the search and the tuning run; both sections also take "auto"
# the tuning also fits the adapters block by block, label-free ("blocks"), or does that and then "ce"
TUNE_LOSSES = LOSSES + ("blocks", "blocks+ce")
# Label-free block reconstruction by default up to this width, with these steps per block and learning
# rate. ResNet-20, 2,000 held-back calibration images, defaults otherwise: W2 62.65 without it; 74.95
# at 250 steps, lr 1e-3; 75.55 at 100 steps, lr 3e-3 (and 2.5x faster); W3 80.15 -> 80.20 and W4
# 81.50 -> 81.35 at 200 steps, lr 1e-3 (noise, for minutes more), so not above 2 bits -- until the
# BatchNorms were fitted with the adapters (TuneConfig.norms). All 3,400 held-back images, label-free
# defaults otherwise, adapters-only -> with norms: W2 5 % 81.74 -> 82.41 (norm lr x0.3: 82.09), W2 no
# adapters 78.09 -> 78.59; W3 5 % 84.82 (no tuning) -> 85.21, W3 no adapters 84.53 -> 85.41. So up to
# 3 bits, norms on, budget 0 included.
LABEL_FREE_BLOCKS_MAX_BITS = 3
# 2-bit ranges (range_method="auto", GPTQ rounding): the MSE search clips hard at 2 bits, which the base alone
# cannot afford (ResNet-20 W2 base alone, 2,000 held-back images: 54.05 MSE, 72.75 min-max), but its
# larger, structured residual is what enough adapters reclaim. ResNet-20 W2 label-free defaults, the
# same 2,000 held-back images (python -m cora quantize cifar_resnet20 --bits 2 --no-labels --range R
# --budget B --eval-split holdout --eval-limit 2000): budget 2.5 %: 77.55 MSE, 79.80 min-max;
# 5 %: 82.00 MSE, 80.45 min-max. So MSE from a 5 % budget up, min-max below it.
TWO_BIT_MSE_MIN_BUDGET = 0.05
# With labels, the block reconstruction (BatchNorms too) before the cross-entropy tuning, up to this
# width: ResNet-20 W2 5 %, labelled defaults otherwise, all 3,400 held-back images: 85.76 -> 86.88
# (float 85.85 on them; the labelled tuning also fits the images' domain). Not measured at 3 bits,
# where the labelled defaults already sit on the W8 control.
LABELLED_BLOCKS_MAX_BITS = 2
BLOCKS_ITERATIONS, BLOCKS_LR = 100, 3e-3
# the end-to-end tuning's steps and rate (and those of the ce phase of "blocks+ce") when left to "auto"
END_TO_END_ITERATIONS, END_TO_END_LR = 250, 1e-3
GRANULARITIES = ("channel", "tensor")
RANGES = ("auto", "mse", "minmax", "std")
ROUNDINGS = ("gptq", "nearest")
FACTORIZATIONS = ("activation", "weight")
BUDGET_MODES = ("project", "penalty")
OPTIMIZERS = ("adam", "sgd")
BN_MODES = ("train", "eval")
ADAPTER_DTYPES = ("float16", "bfloat16", "float32", "int8")  # int8: per-row fp32 scales


def _bad(msg: str) -> None:
    raise ValueError(f"invalid CoRaConfig: {msg}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        _bad(f"{name}={value!r}; choose one of {allowed}")


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        _bad(f"{name}={value!r} must be an integer >= {low}")


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        _bad(f"{name}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        _bad(f"{name}={value!r} must be True or False")


@dataclass(frozen=True)
class QuantizerConfig:
    """The base quantization of every chosen layer.

    ``granularity``: one scale per output ``channel`` or per ``tensor``. ``range_method``: ``mse`` (a
    coarse-to-fine search over both ends of the range), ``minmax``, ``std`` (``mean ± std_k·std``, the
    paper's) or ``auto`` (:meth:`range_for`: ``minmax`` for a 2-bit layer rounded by GPTQ when the
    adapter budget is below :data:`TWO_BIT_MSE_MIN_BUDGET`, ``mse`` otherwise). ``rounding``: ``gptq``
    (error-compensating, from the layer's input statistics; ``gptq_damp`` is its dampening as a fraction
    of the mean diagonal, ``gptq_act_order`` its column order) or ``nearest``. ``sequential``:
    statistics from the inputs the already-quantized model produces, layer by layer. ``stats_images``: a
    seeded subset of the calibration images for the layer input statistics (GPTQ, activation-aware
    adapters). ``max_stats_features``: a layer whose im2col width ``K = C_in·kh·kw`` (or linear
    ``in_features``) is larger gets no input statistics (their ``[K, K]`` float64 matrices would need
    ``8·K²`` bytes each, 5 GB for VGG's 25,088-wide classifier): it is rounded to nearest with a
    weight-space adapter, and the report says so.
    """

    granularity: str = "channel"
    range_method: str = "auto"
    std_k: float = 5.0
    rounding: str = "gptq"
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    sequential: bool = True
    stats_images: int = 512
    max_stats_features: int = 8192  # 512 MiB per float64 [K, K] matrix at the limit

    def range_for(self, bits: int, adapter_budget: float = 1.0) -> str:
        """The range method of a ``bits``-wide layer: ``range_method``, or for ``auto`` ``minmax`` for a
        2-bit layer rounded by GPTQ in a conversion whose adapter budget (0 without adapters) is below
        :data:`TWO_BIT_MSE_MIN_BUDGET`, ``mse`` otherwise (see there for the measurements)."""
        if self.range_method != "auto":
            return self.range_method
        small = adapter_budget < TWO_BIT_MSE_MIN_BUDGET
        return "minmax" if bits <= 2 and self.rounding == "gptq" and small else "mse"

    def __post_init__(self) -> None:
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("range_method", self.range_method, RANGES)
        _choice("rounding", self.rounding, ROUNDINGS)
        _positive("std_k", self.std_k)
        _positive("gptq_damp", self.gptq_damp, allow_zero=True)
        _bool("gptq_act_order", self.gptq_act_order)
        _bool("sequential", self.sequential)
        _int("stats_images", self.stats_images, 1)
        _int("max_stats_features", self.max_stats_features, 1)


@dataclass(frozen=True)
class AdapterConfig:
    """The residual adapters: ``factorization`` ``activation`` (best rank-r for the layer's output on
    the calibration inputs) or ``weight`` (the paper's SVD of ``W - Q(W)``); ``refine`` re-fits each
    adapter, once the ranks are fixed, to map the inputs it really sees to the float outputs (it needs
    ``activation``: ``refine=True`` with ``weight`` is refused; None: on with ``activation``, off with
    ``weight``); ``dtype`` is how A and B are stored (and counted in the equivalent bits; ``int8``
    adds one float32 scale per rank and per output channel). The budget counts parameters whatever
    the dtype."""

    factorization: str = "activation"
    refine: bool | None = None
    dtype: str = "float16"

    def __post_init__(self) -> None:
        _choice("factorization", self.factorization, FACTORIZATIONS)
        if self.refine is not None:
            _bool("refine", self.refine)
        if self.refine and self.factorization != "activation":
            _bad("refine=True re-fits activation-aware adapters and needs factorization='activation' "
                 "(with factorization='weight' use refine=False or leave it None)")
        _choice("adapter_dtype", self.dtype, ADAPTER_DTYPES)


@dataclass(frozen=True)
class SearchConfig:
    """The differentiable rank search: one Butterworth cutoff per adapted conv.

    ``loss``: ``ce`` (cross-entropy with labels), ``kl`` (to the float model's logits, no labels) or
    ``auto`` (ce with labels, else kl). ``budget_mode``: ``project`` (the cutoffs are projected onto the
    budget after every step) or ``penalty`` (the paper's ``gamma·exp(relu(Bud - Bud*))``).
    ``optimizer``: ``adam`` (gradients clipped to ``±grad_clip``) or ``sgd`` (normalised momentum
    steps). ``rho_init`` None starts at the uniform allocation that fills the budget. ``bn_mode``: the
    BatchNorm mode during the search (the returned model always keeps the float statistics).
    """

    loss: str = "auto"
    budget_mode: str = "project"
    optimizer: str = "adam"
    iterations: int = 250
    batch_size: int = 32
    lr: float = 0.01
    order: int = 4
    gamma: float = 1.0
    grad_clip: float = 0.2
    rho_init: float | None = 0.9
    bn_mode: str = "train"

    def __post_init__(self) -> None:
        _choice("loss", self.loss, ("auto",) + LOSSES)
        _choice("budget_mode", self.budget_mode, BUDGET_MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("search_bn", self.bn_mode, BN_MODES)
        _int("iterations", self.iterations, 1)
        _int("batch_size", self.batch_size, 1)
        _int("order", self.order, 1)
        _positive("lr", self.lr)
        _positive("gamma", self.gamma, allow_zero=True)
        _positive("grad_clip", self.grad_clip)
        if self.rho_init is not None:
            _positive("rho_init", self.rho_init)
            if self.rho_init > 1.0:
                _bad(f"rho_init={self.rho_init!r} must be in (0, 1]")


@dataclass(frozen=True)
class TuneConfig:
    """Tuning of the adapters (only A and B move, and with ``norms`` BatchNorm affines) after the ranks are fixed.

    ``iterations`` 0 turns it off. ``loss``: ``ce`` (end to end, labels required), ``kl`` (end to end,
    to the float logits), ``blocks`` (label-free block reconstruction, :mod:`cora.reconstruct`:
    ``iterations`` steps per block), ``blocks+ce`` (the block reconstruction at ``BLOCKS_ITERATIONS``
    steps per block and ``BLOCKS_LR``, then ``ce``; labels required) or ``auto`` (with labels blocks+ce
    at 2 bits, ce above; without labels, blocks up to 3 bits and no tuning at 4 bits and above unless
    ``iterations`` asks for steps (then blocks), chosen on held-back calibration images).
    ``iterations`` / ``lr`` None: the loss's own (``BLOCKS_ITERATIONS`` per block at ``BLOCKS_LR`` for
    ``blocks``, ``END_TO_END_ITERATIONS`` at ``END_TO_END_LR`` otherwise; 0 steps where ``auto`` turns
    the tuning off). Adam with a cosine decay from ``lr``, batches of ``batch_size``
    calibration images. ``norms`` (the block reconstruction only): fit each block's
    BatchNorm scale and shift with its adapters, also when there are none (budget 0, method ``none``);
    they are float parameters the model has anyway, so the equivalent bits do not change.
    """

    iterations: int | None = None
    loss: str = "auto"
    lr: float | None = None
    batch_size: int = 64
    norms: bool = True

    def __post_init__(self) -> None:
        if self.iterations is not None:
            _int("tune_iterations", self.iterations, 0)
        _choice("tune_loss", self.loss, ("auto",) + TUNE_LOSSES)
        if self.lr is not None:
            _positive("tune_lr", self.lr)
        _int("tune_batch_size", self.batch_size, 1)
        _bool("tune_norms", self.norms)
