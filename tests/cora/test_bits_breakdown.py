"""The equivalent bits split by what stores them (cora.budget.bits_breakdown), in the report and the CLI table."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cora import CoRaConfig, convert
from cora.budget import BITS_PARTS, bits_breakdown
from cora.cli import _table
from cora.modules import CoRaConv2d, QuantLinear

torch.set_num_threads(1)


def _depthwise_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 12, 1), nn.Flatten(), nn.Linear(12 * 8 * 8, 5),
    ).eval()


@pytest.mark.parametrize("grouped_bits", [None, 8])
def test_report_breakdown_counts_each_part_and_adds_up(grouped_bits):
    """codes at the base width, the depthwise conv's extra bits at 8, per-channel fp16 scale + b-bit zero, fp16 adapters."""
    model = _depthwise_model()
    x = torch.randn(24, 3, 8, 8)
    cfg = CoRaConfig(bits=3, grouped_bits=grouped_bits, method="uniform", calib_images=24, rounding="nearest",
                     tune_iterations=0, progress=False)
    q = convert(model, x, cfg)
    rep = q.cora_report
    parts = rep.bits_breakdown
    assert tuple(parts) == BITS_PARTS
    layers = [q.get_submodule(n) for n in rep.quantized]
    n = {name: model.get_submodule(name).weight.numel() for name in rep.quantized}
    total = sum(n.values())
    assert parts["codes"] == pytest.approx(3.0)
    wide = (8 - 3) * n["2"] / total if grouped_bits else 0.0
    assert parts["wide"] == pytest.approx(wide)
    channels = {name: model.get_submodule(name).weight.shape[0] for name in rep.quantized}
    scales = sum((16 + q.get_submodule(k).bits) * c for k, c in channels.items()) / total
    assert parts["scales"] == pytest.approx(scales)
    adapters = sum(16 * m.rank * (m.weight_shape[0] + math.prod(m.weight_shape[1:])) for m in layers) / total
    assert parts["adapters"] == pytest.approx(adapters) and parts["adapters"] > 0
    assert sum(parts.values()) == pytest.approx(rep.equiv_bits)
    assert "of which" in _table({**_cli_result(rep), "bits_breakdown": parts})


def _cli_result(rep) -> dict:
    return dict(model="m", bits=rep.bits, method=rep.method, budget=rep.budget, float_acc=80.0, acc=79.5,
                adapter_fraction=rep.adapter_fraction, equiv_bits=rep.equiv_bits, iterations=0, calib_images=24,
                eval_images=10, eval_split="test", search_seconds=0.0, tune_iterations=0, quantize_seconds=1.0)


def test_narrow_layers_int8_adapters_and_per_tensor_scales():
    """A layer narrower than the base width counts its own codes (no negative 'wide'); int8 adapters count
    their float32 scales; a per-tensor layer pays one scale and zero."""
    torch.manual_seed(1)
    conv, lin, adapted = nn.Conv2d(6, 10, 3), nn.Linear(20, 7), nn.Conv2d(4, 5, 1)
    wide = CoRaConv2d.from_conv(conv, 8)
    narrow = QuantLinear.from_linear(lin, 2, codes=torch.randint(0, 4, (7, 20), dtype=torch.uint8),
                                     scale=torch.full((7,), 0.1), zero=torch.full((7,), 1.0))
    int8 = CoRaConv2d.from_conv(adapted, 4, 2, adapter_dtype="int8")
    parts = bits_breakdown([wide, narrow, int8], bits=4)
    n_conv, n_lin, n_ad = conv.weight.numel(), lin.weight.numel(), adapted.weight.numel()
    total = n_conv + n_lin + n_ad
    assert parts["codes"] == pytest.approx((4 * n_conv + 2 * n_lin + 4 * n_ad) / total)
    assert parts["wide"] == pytest.approx(4 * n_conv / total)
    assert parts["adapters"] * total == pytest.approx(8 * 2 * (4 + 5) + 32 * (2 + 5))  # int8 codes + fp32 row scales
    assert sum(parts.values()) * total == pytest.approx(sum(m.storage_bits() for m in (wide, narrow, int8)))
    # per channel: fp16 scale + b-bit zero; the linear's range is one per tensor
    assert parts["scales"] * total == pytest.approx((16 + 8) * 10 + (16 + 2) * 1 + (16 + 4) * 5)


def test_no_layers():
    assert bits_breakdown([], 4) == dict.fromkeys(BITS_PARTS, 0.0)
