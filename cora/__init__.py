"""cora: low-bit (int4/int3) ConvNet weights with searched low-rank residual adapters (CoRa).

Importing the package never touches CUDA.
"""
from .checkpoint import CheckpointError, load, save
from .config import CoRaConfig
from .convert import ConversionReport, convert, quantizable_layers
from .deploy import deploy, warmup
from .modules import CoRaConv2d, QuantLinear
from .quantizer import compute_qparams, dequantize, fake_quantize, gptq_quantize, quantize
from .residual import ResidualFactors, adapter_from_factors, factorize_residual
from .tune import TuneReport, tune_adapters

__version__ = "0.1.0"

__all__ = [
    "CoRaConfig",
    "save",
    "load",
    "CheckpointError",
    "ConversionReport",
    "convert",
    "deploy",
    "warmup",
    "quantizable_layers",
    "CoRaConv2d",
    "QuantLinear",
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
