"""cora: low-bit (int4/int3) ConvNet weights with searched low-rank residual adapters (CoRa).

One verb, one config: ``cora.convert(model, calibration_data, cora.CoRaConfig(bits=4))`` returns
the model with every conv replaced by a :class:`CoRaConv2d` (and every linear by a
:class:`QuantLinear`); :func:`deploy` gives its inference form, :func:`save` / :func:`load` persist
it. The pipeline's modules, in the order it runs: ``quantizer`` -> ``residual`` -> ``budget`` ->
``search`` -> ``tune`` -> ``convert``; see ``docs/architecture.md``.

Importing the package never touches CUDA.
"""
from cora_kernels.ops import Backend

from .calibration import CalibrationSet, Objective
from .checkpoint import CheckpointError, load, save
from .config import AdapterConfig, CoRaConfig, QuantizerConfig, SearchConfig, TuneConfig
from .convert import ConversionReport, convert, quantizable_layers
from .deploy import deploy, warmup
from .modules import CoRaConv2d, QuantLinear
from .quantizer import compute_qparams, dequantize, fake_quantize, gptq_quantize, quantize
from .residual import ResidualFactors, adapter_from_factors, factorize_residual
from .tune import TuneReport, tune_adapters

__version__ = "0.1.0"

__all__ = [
    "CoRaConfig",
    "QuantizerConfig",
    "AdapterConfig",
    "SearchConfig",
    "TuneConfig",
    "convert",
    "ConversionReport",
    "quantizable_layers",
    "deploy",
    "warmup",
    "save",
    "load",
    "CheckpointError",
    "CoRaConv2d",
    "QuantLinear",
    "Backend",
    "CalibrationSet",
    "Objective",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
    "ResidualFactors",
    "factorize_residual",
    "adapter_from_factors",
    "tune_adapters",
    "TuneReport",
    "__version__",
]
