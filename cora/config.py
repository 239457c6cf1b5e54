"""The one validated configuration object for :func:`cora.convert`, in sections that follow the pipeline.

``CoRaConfig`` holds what the whole conversion needs (bit width, method, budget, calibration size,
seed, which layers) and one frozen section per phase:

* :class:`QuantizerConfig` -- the base quantization (granularity, ranges, rounding, statistics);
* :class:`AdapterConfig` -- how residual adapters are factorized, refined and stored;
* :class:`SearchConfig` -- the Butterworth rank search (``method="search"``);
* :class:`TuneConfig` -- the end-to-end adapter tuning after the ranks are fixed.

Flat keywords stay a convenience: ``CoRaConfig(bits=3, iterations=100, tune_iterations=0)`` sets
``search.iterations`` and ``tune.iterations`` (:data:`FLAT_FIELDS` lists every alias), and the
same aliases read (``config.iterations``) and :meth:`CoRaConfig.replace`. :meth:`CoRaConfig.to_dict`
gives a nested, versioned dict (what checkpoints record) and :meth:`CoRaConfig.from_dict` rebuilds
the config from it, or from the flat dicts of version 1.

Method names: ``search`` (ranks from the differentiable search), ``uniform`` (the same fraction of
the full rank at every layer), ``none`` (no adapters; the base quantizer alone), ``auto``. The
earlier names ``cora``, ``heuristic`` and ``rtn`` still work and warn.

Why the defaults are what they are (each was chosen on the calibration images held back from the
search, never on the test set) is recorded in ``bench/README.md``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field

from cora_kernels.packing import SUPPORTED_BITS

__all__ = [
    "CoRaConfig",
    "QuantizerConfig",
    "AdapterConfig",
    "SearchConfig",
    "TuneConfig",
    "LayerDefaults",
    "LAYER_DEFAULTS",
    "CONFIG_VERSION",
    "SUPPORTED_BITS",
    "METHODS",
    "DEPRECATED_METHODS",
    "LOSSES",
    "TUNE_LOSSES",
    "LABEL_FREE_BLOCKS_MAX_BITS",
    "LABELLED_BLOCKS_MAX_BITS",
    "GROUPED_BITS",
    "FLAT_FIELDS",
    "GRANULARITIES",
    "RANGES",
    "ROUNDINGS",
    "FACTORIZATIONS",
]

CONFIG_VERSION = 2  # 1: the flat dict of cora 0.1.0 (still read by from_dict)
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
# The width of grouped / depthwise convs (no adapter there) by default. The pretrained CIFAR ShuffleNetV2 x0.5
# (19 depthwise convs, 2.7 % of its weights), label-free defaults, the 3,400 held-back calibration images (float
# 89.91): W4 88.97 -> 89.38 (5.030 -> 5.150 equivalent bits), W3 87.47 -> 88.12 (4.018 -> 4.168), W2 69.32 -> 77.59
# (3.007 -> 3.187). At equal bits the width beats adapters: W3 depthwise at 3 bits, budget 6 % (4.180 bits) 87.32.
# Its depthwise convs alone at 2 bits (every other layer float) cost 4.6-5.9 points. bench/README.md,
# "Depthwise quantization decided on a trained model".
GROUPED_BITS = 8
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
    adapter, once the ranks are fixed, to map the inputs it really sees to the float outputs (needs
    ``activation``); ``dtype`` is how A and B are stored (and counted in the equivalent bits; ``int8``
    adds one float32 scale per rank and per output channel). The budget counts parameters whatever
    the dtype."""

    factorization: str = "activation"
    refine: bool = True
    dtype: str = "float16"

    def __post_init__(self) -> None:
        _choice("factorization", self.factorization, FACTORIZATIONS)
        _bool("refine", self.refine)
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
    at 2 bits, ce above; without labels, blocks up to 3 bits and no tuning at 4 bits and above, chosen
    on held-back calibration images). Adam with a cosine decay from ``lr``, batches of ``batch_size``
    calibration images. ``norms`` (the block reconstruction only): fit each block's
    BatchNorm scale and shift with its adapters, also when there are none (budget 0, method ``none``);
    they are float parameters the model has anyway, so the equivalent bits do not change.
    """

    iterations: int = 250
    loss: str = "auto"
    lr: float = 1e-3
    batch_size: int = 64
    norms: bool = True

    def __post_init__(self) -> None:
        _int("tune_iterations", self.iterations, 0)
        _choice("tune_loss", self.loss, ("auto",) + TUNE_LOSSES)
        _positive("tune_lr", self.lr)
        _int("tune_batch_size", self.batch_size, 1)
        _bool("tune_norms", self.norms)


_SECTIONS = {"quantizer": QuantizerConfig, "adapter": AdapterConfig, "search": SearchConfig, "tune": TuneConfig}

# Flat keyword -> (section, field). The flat names are those of cora 0.1.0's flat config.
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    **{f.name: ("quantizer", f.name) for f in dataclasses.fields(QuantizerConfig)},
    "factorization": ("adapter", "factorization"),
    "refine": ("adapter", "refine"),
    "adapter_dtype": ("adapter", "dtype"),
    **{f.name: ("search", f.name) for f in dataclasses.fields(SearchConfig) if f.name != "bn_mode"},
    "search_bn": ("search", "bn_mode"),
    "tune_iterations": ("tune", "iterations"),
    "tune_loss": ("tune", "loss"),
    "tune_lr": ("tune", "lr"),
    "tune_norms": ("tune", "norms"),
    "tune_batch_size": ("tune", "batch_size"),
}


def _patterns(skip) -> tuple[str, ...]:
    """``skip`` as a tuple of name patterns; one string is one pattern (not its characters)."""
    if isinstance(skip, str):
        skip = (skip,)
    try:
        skip = tuple(skip)
    except TypeError:
        _bad(f"skip={skip!r} must be a layer name or pattern, or a sequence of them")
    for p in skip:
        if not isinstance(p, str) or not p:
            _bad(f"skip entries must be non-empty layer names or patterns, got {p!r}")
    return skip


def _layer_bits(layer_bits) -> tuple[tuple[str, int], ...]:
    """``layer_bits`` as ``((pattern, bits), ...)``, from pairs or a ``{pattern: bits}`` dict, validated."""
    if isinstance(layer_bits, dict):
        layer_bits = tuple(layer_bits.items())
    try:
        pairs = [tuple(x) for x in layer_bits]
    except TypeError:
        _bad(f"layer_bits={layer_bits!r} must be (pattern, bits) pairs or a {{pattern: bits}} dict")
    out = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            _bad(f"layer_bits entry {pair!r} must be a (pattern, bits) pair")
        pattern, b = pair
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b not in SUPPORTED_BITS:
            _bad(f"layer_bits for {pattern!r}: {b!r} not supported; choose one of {SUPPORTED_BITS}")
        out.append((pattern, int(b)))
    return tuple(out)


def _canonical_method(method, *, warn: bool = True):
    if isinstance(method, str) and method in DEPRECATED_METHODS:
        new = DEPRECATED_METHODS[method]
        if warn:
            warnings.warn(f"method={method!r} is deprecated; it is now called {new!r}", DeprecationWarning, stacklevel=4)
        return new
    return method


@dataclass(frozen=True, init=False)
class CoRaConfig:
    """Everything a conversion needs; validated on construction.

    Top level: ``bits`` (every quantized layer unless ``layer_bits`` says otherwise), ``method``
    (``auto``: ``search`` with labelled calibration data, ``uniform`` without; see :meth:`resolved`),
    ``budget`` (adapter parameters as a fraction of the weight parameters of every Conv2d and, with
    ``quantize_linear``, every Linear layer (:func:`cora.budget.budget_weight_count`); held exactly),
    ``calib_images``, ``seed``, ``skip`` (names or fnmatch patterns left in float; one string is one
    pattern), ``layer_bits`` (``(pattern, bits)`` pairs or a ``{pattern: bits}`` dict; a pattern
    that matches no layer is an error at conversion), ``grouped_bits`` (the width of convs with
    ``groups > 1``, depthwise ones included, which get no adapter; a ``layer_bits`` pattern still wins;
    None: ``bits``; default 8, :data:`GROUPED_BITS` says why), ``target_bits`` (mixed precision,
    :mod:`cora.precision`: every other layer gets one of the two widths around the bits left for the
    codes, at most ``bits``, so that ``equiv_bits``, adapters included, is at most this; the "auto"
    choices then follow ``floor(target_bits)``; None: every layer at ``bits``), ``quantize_linear`` (Linear layers quantized, with
    adapters, and counted in the budget; False: left float, not counted), ``bn_reestimate``
    (re-estimate BatchNorm statistics on the calibration images after building; off: the float
    statistics are kept), ``output`` (for a model that returns a tuple or dict: the index or key of
    its logits; None: the model returns a tensor), ``progress``. Then the four sections. Use
    :meth:`paper` for the published recipe.
    """

    bits: int = 4
    method: str = "auto"
    budget: float = 0.05
    calib_images: int = 1600
    seed: int = 0
    skip: tuple[str, ...] = ()
    layer_bits: tuple[tuple[str, int], ...] = ()
    grouped_bits: int | None = GROUPED_BITS
    target_bits: float | None = None
    quantize_linear: bool = True
    bn_reestimate: bool = False
    output: int | str | None = None
    progress: bool = True
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    version: int = CONFIG_VERSION

    def __init__(self, **kwargs) -> None:
        sections = {name: kwargs.pop(name, None) for name in _SECTIONS}
        flat: dict[str, dict] = {name: {} for name in _SECTIONS}
        for key in [k for k in kwargs if k in FLAT_FIELDS]:
            section, name = FLAT_FIELDS[key]
            flat[section][name] = kwargs.pop(key)
        top = {f.name for f in dataclasses.fields(self) if f.name not in _SECTIONS}
        unknown = sorted(set(kwargs) - top)
        if unknown:
            raise TypeError(f"CoRaConfig got unknown field(s) {unknown}")
        for f in dataclasses.fields(self):
            if f.name in _SECTIONS:
                cls, given = _SECTIONS[f.name], sections[f.name]
                if given is None:
                    given = cls()
                elif isinstance(given, dict):
                    given = cls(**given)
                elif not isinstance(given, cls):
                    _bad(f"{f.name} must be a {cls.__name__} or a dict, got {type(given).__name__}")
                value = dataclasses.replace(given, **flat[f.name]) if flat[f.name] else given
            elif f.name in kwargs:
                value = kwargs[f.name]
            else:
                value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        object.__setattr__(self, "method", _canonical_method(self.method))
        if self.version != CONFIG_VERSION:
            _bad(f"version={self.version!r}; this cora writes version {CONFIG_VERSION} (use from_dict for older dicts)")
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            _bad(f"bits={self.bits!r} not supported; choose one of {SUPPORTED_BITS}")
        if self.grouped_bits is not None and (isinstance(self.grouped_bits, bool) or self.grouped_bits not in SUPPORTED_BITS):
            _bad(f"grouped_bits={self.grouped_bits!r} not supported; choose None or one of {SUPPORTED_BITS}")
        if self.target_bits is not None:
            t = self.target_bits
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (math.isfinite(t) and t > 0):
                _bad(f"target_bits={t!r} must be None or a positive number of bits per weight")
            if self.adapter.dtype == "int8":
                _bad("target_bits with adapter_dtype='int8' is not supported (int8 adapters' scales depend on the ranks)")
        _choice("method", self.method, METHODS)
        if isinstance(self.budget, bool) or not (isinstance(self.budget, numbers.Real) and 0.0 < self.budget <= 1.0):
            _bad(f"budget={self.budget!r} must be in (0, 1]")
        _int("calib_images", self.calib_images, 1)
        _int("seed", self.seed, 0)
        for name in ("quantize_linear", "bn_reestimate", "progress"):
            _bool(name, getattr(self, name))
        if self.output is not None and (isinstance(self.output, bool) or not isinstance(self.output, (int, str))):
            _bad(f"output={self.output!r} must be None, an index (int) or a key (str) of the model's outputs")
        object.__setattr__(self, "skip", _patterns(self.skip))
        object.__setattr__(self, "layer_bits", _layer_bits(self.layer_bits))

    def __getattr__(self, name: str):
        # flat aliases (``config.iterations`` -> ``config.search.iterations``); only called for names
        # that are not real attributes
        if name in FLAT_FIELDS:
            section, field_name = FLAT_FIELDS[name]
            return getattr(object.__getattribute__(self, section), field_name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ derived configs
    @classmethod
    def paper(cls, bits: int = 4, **overrides) -> "CoRaConfig":
        """The published recipe: per-tensor mean ± 5·std ranges, round to nearest, weight-space SVD,
        searched ranks by CE with the exp budget penalty, no refinement and no tuning."""
        base = dict(
            bits=bits,
            method="search",
            granularity="tensor",
            range_method="std",
            std_k=5.0,
            rounding="nearest",
            factorization="weight",
            sequential=False,
            refine=False,
            loss="ce",
            budget_mode="penalty",
            optimizer="adam",
            search_bn="train",
            tune_iterations=0,
            grouped_bits=None,  # every conv at ``bits``
        )
        base.update(overrides)
        return cls(**base)

    def resolved(self, has_labels: bool) -> "CoRaConfig":
        """This config with every "auto" choice made; the one place labels are checked against the losses.

        With labels: ``method`` search, ``search.loss`` ce, ``tune.loss`` blocks+ce at 2 bits (the block
        reconstruction at its own steps and rate, then ce), ce above. Without: uniform, kl,
        and ``tune.loss`` blocks up to ``bits`` 3 (block reconstruction; 100 steps per block at lr 3e-3 when
        ``tune.iterations`` and ``tune.lr`` are left at their end-to-end defaults) or no tuning
        (``tune.iterations=0``) at 4 bits and above. Raises ``ValueError`` when an explicit
        cross-entropy loss would run without labels.
        """
        adapters = self.method != "none"
        if not has_labels:
            if self.method == "search" and self.search.loss == "ce":
                raise ValueError("loss='ce' needs labelled calibration data; pass (images, labels) or use loss='kl' (or 'auto')")
            if adapters and self.tune.iterations and self.tune.loss in ("ce", "blocks+ce"):
                raise ValueError(
                    f"tune_loss={self.tune.loss!r} needs labelled calibration data; pass (images, labels) or use "
                    "tune_loss='kl' or 'blocks' (or 'auto')"
                )
        changes: dict = {}
        if self.method == "auto":
            changes["method"] = "search" if has_labels else "uniform"
        if self.search.loss == "auto":
            changes["loss"] = "ce" if has_labels else "kl"
        if self.tune.loss == "auto":
            if has_labels:
                changes["tune_loss"] = "blocks+ce" if self.typical_bits <= LABELLED_BLOCKS_MAX_BITS else "ce"
            elif self.typical_bits <= LABEL_FREE_BLOCKS_MAX_BITS:
                changes["tune_loss"] = "blocks"
                # the end-to-end defaults (250 steps, lr 1e-3) are not the blocks' (per block): left at
                # their defaults, they become the blocks' own
                if self.tune.iterations == TuneConfig.iterations and self.tune.lr == TuneConfig.lr:
                    changes["tune_iterations"], changes["tune_lr"] = BLOCKS_ITERATIONS, BLOCKS_LR
            else:
                changes["tune_loss"], changes["tune_iterations"] = "kl", 0
        return self.replace(**changes) if changes else self

    @property
    def typical_bits(self) -> int:
        """The width the "auto" choices follow: ``bits``, or with ``target_bits`` its floor (within 2..``bits``)."""
        if self.target_bits is None:
            return self.bits
        return max(2, min(self.bits, math.floor(self.target_bits)))

    def replace(self, **changes) -> "CoRaConfig":
        """A copy with some fields changed (top-level, section or flat alias names), validated again."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        current.update(changes)
        return type(self)(**current)

    # ------------------------------------------------------------------ dicts
    def to_dict(self) -> dict:
        """A nested, JSON-ready dict with ``version``; :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["layer_bits"] = [list(x) for x in self.layer_bits]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CoRaConfig":
        """Rebuild a config from :meth:`to_dict` (a checkpoint's ``config``), or from a version-1 flat dict.

        Version-1 method names (``cora``, ``heuristic``, ``rtn``) are mapped without a warning: they
        are what older checkpoints and result files recorded.
        """
        if not isinstance(d, dict):
            raise TypeError(f"CoRaConfig.from_dict expects a dict, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", 1)
        if version == 1:
            d.pop("extras", None)
        elif version != CONFIG_VERSION:
            raise ValueError(f"config version {version!r} is not supported (this cora reads 1 and {CONFIG_VERSION})")
        d["method"] = _canonical_method(d.get("method", "auto"), warn=False)
        d["layer_bits"] = tuple(tuple(x) for x in d.get("layer_bits", ()))
        d["skip"] = tuple(d.get("skip", ()))
        if isinstance(d.get("tune"), dict) and "norms" not in d["tune"]:
            # written before the BatchNorms were fitted: record what was done
            d["tune"] = {**d["tune"], "norms": False}
        return cls(**d)


@dataclass(frozen=True)
class LayerDefaults:
    """Defaults of the data-free, one-layer constructors ``CoRaConv2d.from_conv`` / ``QuantLinear.from_linear``.

    They differ from the config's on purpose: a single layer built without calibration data has no
    input statistics, so the activation-aware factorization and GPTQ (which need them) are not
    available; the adapter factorizes the weight-space residual (the paper's SVD) and the codes are
    round-to-nearest on the real (min-max) range, the plain drop-in a user expects. Granularity,
    ``std_k`` and the adapter storage are the config's.
    """

    per_channel: bool = QuantizerConfig.granularity == "channel"
    range_method: str = "minmax"
    std_k: float = QuantizerConfig.std_k
    factorization: str = "weight"
    adapter_dtype: str = AdapterConfig.dtype
    conv_bits: int = CoRaConfig.bits
    linear_bits: int = 8  # a Linear built alone keeps 8 bits: it carries the logits


LAYER_DEFAULTS = LayerDefaults()
