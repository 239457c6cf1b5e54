"""What the phases of ``convert`` hand each other, and what a conversion reports.

``QuantizedWeight`` (one layer's codes, scale and zero), ``BaseQuantization`` (phase 1's result),
``RankChoice`` (phase 2), ``TuneOutcome`` (phase 4) and ``ConversionReport`` (``model.cora_report``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .budget import AdaptedLayer
from .graph import StageChain
from .quantizer import dequantize

__all__ = ["ConversionReport", "QuantizedWeight", "BaseQuantization", "RankChoice", "TuneOutcome"]


@dataclass
class ConversionReport:
    """What a conversion did. Fractions are of ``P``, the weight parameters of every Conv2d and (with
    ``quantize_linear``) every Linear of the model (:func:`cora.budget.budget_weight_count`).

    ``budget_share``: each adapted layer's adapter parameters as a fraction of ``P`` (execution order;
    they add up to ``adapter_fraction``), so which layers carry how much of the budget is on record.
    """

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
    skipped: dict[str, str]  # layer name -> why it stays float (not quantized)
    config: dict
    continuous_budget: float | None = None
    trace: list = field(default_factory=list)
    tune_loss: str | None = None  # the loss the adapter tuning ran with (None: no tuning)
    tune_iterations: int = 0
    tune_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # what the conversion did differently from the config, and why
    no_adapter: dict[str, str] = field(default_factory=dict)  # quantized layers that get no adapter, and why
    budget_share: dict[str, float] = field(default_factory=dict)  # adapted layer -> its adapter parameters / P
    tune_norms: int = 0  # BatchNorm layers whose scale and shift the block reconstruction fitted and kept
    widths: dict[str, int] = field(default_factory=dict)  # quantized layer -> its width in bits
    # equiv_bits by what stores them: codes, wide (layers above ``bits``), scales, adapters (cora.budget.bits_breakdown)
    bits_breakdown: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds of each phase that ran

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
    """Phase 1's result: every chosen layer's quantized weight (execution order), the layers (convs and
    linears) that get an adapter with their factorized residuals, and the images the layer statistics came from."""

    weights: dict[str, QuantizedWeight]
    adapted: list[AdaptedLayer]
    statistics_images: torch.Tensor  # [n, C, H, W], a seeded subset of the calibration images
    without_statistics: set[str] = field(default_factory=set)  # layers too wide for input statistics
    no_adapter: dict[str, str] = field(default_factory=dict)  # quantized layers that get no adapter, and why
    chain: StageChain | None = None  # the model's stages (None: full forward passes for layer inputs)


@dataclass
class RankChoice:
    """Phase 2's result: one rank per adapted layer, and what the search did (zeros when it did not run)."""

    ranks: dict[str, int]
    iterations: int = 0
    seconds: float = 0.0
    continuous_budget: float | None = None
    trace: list = field(default_factory=list)


@dataclass
class TuneOutcome:
    """Phase 4's result: the loss the tuning ran with (None: it did not run or was not kept), its steps
    and seconds, and a warning when trained adapters were not kept."""

    loss: str | None = None
    iterations: int = 0
    seconds: float = 0.0
    warning: str | None = None
    norms: int = 0  # BatchNorms the block reconstruction fitted and kept
