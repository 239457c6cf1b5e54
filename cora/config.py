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

"Auto" is a value of its own: the string ``auto`` where the choice is between names (``method``,
``loss``, ``tune_loss``, ``range_method``), ``None`` where it is a number or a switch
(``tune_iterations``, ``tune_lr``, ``refine``). :meth:`CoRaConfig.resolved` decides every one of
them in one place; a value the user set is never replaced, and a combination that cannot work is
refused with one message.

Why the defaults are what they are (each was chosen on the calibration images held back from the
search, never on the test set) is recorded in ``bench/README.md``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field

from .config_sections import (  # noqa: F401  (the constants are part of this module's names)
    ADAPTER_DTYPES,
    BLOCKS_ITERATIONS,
    BLOCKS_LR,
    BN_MODES,
    BUDGET_MODES,
    DEPRECATED_METHODS,
    END_TO_END_ITERATIONS,
    END_TO_END_LR,
    FACTORIZATIONS,
    GRANULARITIES,
    LABEL_FREE_BLOCKS_MAX_BITS,
    LABELLED_BLOCKS_MAX_BITS,
    LOSSES,
    METHODS,
    OPTIMIZERS,
    RANGES,
    ROUNDINGS,
    SUPPORTED_BITS,
    TUNE_LOSSES,
    TWO_BIT_MSE_MIN_BUDGET,
    AdapterConfig,
    QuantizerConfig,
    SearchConfig,
    TuneConfig,
    _bad,
    _bool,
    _choice,
    _int,
)

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
# The width of grouped / depthwise convs (no adapter there) by default. The pretrained CIFAR ShuffleNetV2 x0.5
# (19 depthwise convs, 2.7 % of its weights), label-free defaults, the 3,400 held-back calibration images (float
# 89.91): W4 88.97 -> 89.38 (5.030 -> 5.150 equivalent bits), W3 87.47 -> 88.12 (4.018 -> 4.168), W2 69.32 -> 77.59
# (3.007 -> 3.187). At equal bits the width beats adapters: W3 depthwise at 3 bits, budget 6 % (4.180 bits) 87.32.
# Its depthwise convs alone at 2 bits (every other layer float) cost 4.6-5.9 points. bench/README.md,
# "Depthwise quantization decided on a trained model".
GROUPED_BITS = 8
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
        """This config with every "auto" decided; the one place "auto" is resolved and labels are checked.

        ``method`` auto: search with labels, uniform without. ``search.loss`` auto: ce with labels, kl
        without. ``tune.loss`` auto: with labels blocks+ce up to :data:`LABELLED_BLOCKS_MAX_BITS` (the block
        reconstruction at its own steps and rate, then ce), ce above; without, blocks up to
        :data:`LABEL_FREE_BLOCKS_MAX_BITS`, and above it no tuning (``tune.iterations`` 0) unless the user
        set steps, which then run as blocks. ``tune.iterations`` / ``tune.lr`` None: the loss's own
        (:data:`BLOCKS_ITERATIONS` per block at :data:`BLOCKS_LR` for blocks, :data:`END_TO_END_ITERATIONS`
        at :data:`END_TO_END_LR` otherwise). ``adapter.refine`` None: on with the activation-aware
        factorization. Only those "auto" values change: every value the user set comes back as it was.
        Raises ``ValueError`` when an explicit cross-entropy loss would run without labels.
        """
        self._check_labels(has_labels)
        changes: dict = {}
        if self.method == "auto":
            changes["method"] = "search" if has_labels else "uniform"
        if self.search.loss == "auto":
            changes["loss"] = "ce" if has_labels else "kl"
        tune_loss = self.tune.loss if self.tune.loss != "auto" else self._auto_tune_loss(has_labels)
        if tune_loss is None:  # "auto" turned the tuning off: no steps were asked for
            tune_loss, changes["tune_iterations"] = "kl", 0
        changes["tune_loss"] = tune_loss
        blocks = tune_loss == "blocks"
        if self.tune.iterations is None and "tune_iterations" not in changes:
            changes["tune_iterations"] = BLOCKS_ITERATIONS if blocks else END_TO_END_ITERATIONS
        if self.tune.lr is None:
            changes["tune_lr"] = BLOCKS_LR if blocks else END_TO_END_LR
        if self.adapter.refine is None:
            changes["refine"] = self.adapter.factorization == "activation"
        return self.replace(**changes)

    def _auto_tune_loss(self, has_labels: bool) -> str | None:
        """What ``tune_loss="auto"`` means here; None: no tuning (label-free, wide, no steps asked for)."""
        if has_labels:
            return "blocks+ce" if self.typical_bits <= LABELLED_BLOCKS_MAX_BITS else "ce"
        if self.typical_bits <= LABEL_FREE_BLOCKS_MAX_BITS or self.tune.iterations:
            return "blocks"
        return None

    def _check_labels(self, has_labels: bool) -> None:
        """Refuse an explicit cross-entropy loss that would run without labels (one message)."""
        if has_labels:
            return
        if self.method == "search" and self.search.loss == "ce":
            raise ValueError("loss='ce' needs labelled calibration data; pass (images, labels) or use loss='kl' (or 'auto')")
        tunes = self.tune.iterations is None or self.tune.iterations > 0
        if self.method != "none" and tunes and self.tune.loss in ("ce", "blocks+ce"):
            raise ValueError(
                f"tune_loss={self.tune.loss!r} needs labelled calibration data; pass (images, labels) or use "
                "tune_loss='kl' or 'blocks' (or 'auto')"
            )

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
        adapter = d.get("adapter") if isinstance(d.get("adapter"), dict) else d
        if adapter.get("refine") is True and adapter.get("factorization") == "weight":
            # written when refine=True was silently not done with weight-space adapters: record what was done
            adapter["refine"] = False
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
