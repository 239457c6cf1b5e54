"""Layer input statistics, execution order and BatchNorm re-estimation (cora/statistics.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cora.statistics import collect_hessians, execution_order, layer_input_rows, paired_moments, reestimate_batchnorm
from tests.tolerances import rel_err

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- the H behind "activation"
ROW_CONVS = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(3, 5), stride=2, padding=(1, 2)),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=(2, 4), padding="same"),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, stride=2, padding=1, padding_mode="circular"),
    dict(kernel_size=1, stride=2),
]


@pytest.mark.parametrize("opts", ROW_CONVS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_layer_input_rows_are_the_im2col_of_the_conv(opts):
    """rows @ W_flat^T reproduces the conv output, so H = rows^T rows / n is the right second moment."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, bias=False, **opts)
    x = torch.randn(2, 3, 9, 10)
    rows = layer_input_rows(conv, x)
    with torch.no_grad():
        y = conv(x)
    assert rows.shape == (y.shape[0] * y.shape[2] * y.shape[3], conv.weight[0].numel())
    y_rows = (rows @ conv.weight.detach().reshape(5, -1).T).reshape(y.shape[0], y.shape[2], y.shape[3], 5).permute(0, 3, 1, 2)
    assert rel_err(y_rows, y) <= 1e-5
    # a random subset is a subset of those rows
    sub = layer_input_rows(conv, x, max_rows=7, generator=torch.Generator().manual_seed(1))
    assert sub.shape == (min(7, rows.shape[0]), rows.shape[1])
    for r in sub:
        assert (rows - r).abs().sum(1).min() == 0
    # ... at exactly the positions the generator picks (rows in (image, out row, out column) order)
    if rows.shape[0] > 7:
        pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(1))[:7]
        assert torch.equal(sub, rows[pick])
    # collect_hessians with no subsampling is exactly E[x x^T] over all rows
    model = torch.nn.Sequential(conv)
    h = collect_hessians(model, {"0": conv}, x, batch_size=1, max_rows=10**9)["0"]
    ref = rows.double().T @ rows.double() / rows.shape[0]
    assert rel_err(h, ref) <= 1e-6


def test_bn_reestimate_sees_the_spread_between_sorted_batches():
    """Calibration sets sorted by class: averaged per-batch variances would miss the spread between
    batches; the re-estimation shuffles first, so the statistics are those of the whole set."""
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(64, 3, 4, 4, generator=g) + 3.0, torch.randn(64, 3, 4, 4, generator=g) - 3.0])
    bn = nn.Sequential(nn.BatchNorm2d(3)).eval()
    assert reestimate_batchnorm(bn, x, batch_size=32) == 1
    whole = x.transpose(0, 1).flatten(1)
    assert torch.allclose(bn[0].running_mean, whole.mean(1), atol=0.3)
    assert torch.allclose(bn[0].running_var, whole.var(1), rtol=0.1)  # ~10, not ~1
    assert not bn.training and bn[0].momentum == 0.1


class _Branchy(nn.Module):
    """Layers registered in another order than they run; ``unused`` never runs."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(4, 4, 1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.early = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


def test_execution_order_follows_the_forward_pass():
    m = _Branchy()
    names = ["late", "unused", "early"]
    assert execution_order(m, names, torch.randn(1, 3, 6, 6)) == ["early", "late", "unused"]


def test_paired_moments_of_identical_models_equal_the_hessian():
    """With the same model on both sides, H_qq = H_fq = E[x xᵀ]; a layer never reached gives (None, None)."""
    torch.manual_seed(2)
    m = _Branchy().eval()
    x = torch.randn(6, 3, 6, 6)
    h_qq, h_fq = paired_moments(m, m, "late", x, max_rows=10**9)
    h = collect_hessians(m, {"late": m.late}, x, max_rows=10**9)["late"]
    assert rel_err(h_qq, h) <= 1e-9 and rel_err(h_fq, h) <= 1e-9
    assert paired_moments(m, m, "unused", x) == (None, None)
