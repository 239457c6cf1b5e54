"""Conv geometry helpers against torch: output sizes, 'same' padding, padding modes."""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cora_kernels.geometry import (
    PADDING_MODES,
    ConvGeometry,
    check_conv_args,
    conv_output_size,
    explicit_padding,
    pad_input,
)
from cora_kernels.testing import Case, random_layer
from tests.tolerances import assert_close_rel


def _rng() -> random.Random:
    return random.Random(torch.randint(0, 2**31 - 1, ()).item())  # fresh each run


def test_conv_output_size_matches_f_conv2d():
    rng = _rng()
    checked = 0
    while checked < 60:
        h, w = rng.randint(1, 19), rng.randint(1, 19)
        k = (rng.randint(1, 5), rng.randint(1, 5))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        p = (rng.randint(0, 3), rng.randint(0, 3))
        d = (rng.randint(1, 3), rng.randint(1, 3))
        oh, ow = conv_output_size(h, w, k, s, p, d)
        x = torch.randn(1, 2, h, w)
        wt = torch.randn(3, 2, *k)
        if oh < 1 or ow < 1:
            with pytest.raises(RuntimeError):
                F.conv2d(x, wt, None, s, p, d)
            continue
        y = F.conv2d(x, wt, None, s, p, d)
        assert tuple(y.shape[-2:]) == (oh, ow), (h, w, k, s, p, d)
        checked += 1


def test_conv_output_size_accepts_ints_and_pairs():
    assert conv_output_size(9, 7, 3, 2, 1, 1) == conv_output_size(9, 7, (3, 3), (2, 2), (1, 1), (1, 1))
    assert conv_output_size(9, 7, [3, 1], [1, 2], [1, 0], [2, 1]) == (9 + 2 - 4 - 1 + 1, (7 - 1) // 2 + 1)
    assert Case(H=9, W=7, k=(3, 1), stride=(1, 2), padding=(1, 0), dilation=(2, 1)).out_hw() == (7, 4)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("k, d", [((2, 2), (1, 1)), ((4, 3), (1, 1)), ((3, 2), (2, 3)), ((4, 4), (2, 1)),
                                  ((1, 5), (1, 2)), ((3, 3), (1, 1))])
def test_same_padding_matches_f_conv2d_same(k, d):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 3, *k, dtype=torch.float64)
    y_ref = F.conv2d(x, w, None, 1, "same", d)
    lrtb = explicit_padding("same", k, d)
    assert sum(lrtb[:2]) == d[1] * (k[1] - 1) and sum(lrtb[2:]) == d[0] * (k[0] - 1)
    assert lrtb[0] <= lrtb[1] and lrtb[2] <= lrtb[3]  # the extra row / column goes after
    xp, pad = pad_input(x, lrtb, "zeros")
    y = F.conv2d(xp, w, None, 1, pad, d)
    assert y.shape == y_ref.shape == (2, 4, 9, 8)
    assert_close_rel(y, y_ref, torch.float64)
    # and the same sides as nn.Conv2d computes for its own padding modes
    conv = nn.Conv2d(3, 4, k, padding="same", dilation=d, padding_mode="reflect")
    assert tuple(conv._reversed_padding_repeated_twice) == lrtb


def test_explicit_padding_valid_and_pairs():
    assert explicit_padding("valid", (3, 5), (2, 1)) == (0, 0, 0, 0)
    assert explicit_padding((1, 2), (3, 5), (1, 1)) == (2, 2, 1, 1)
    assert explicit_padding(3, 3, 1) == (3, 3, 3, 3)
    with pytest.raises(ValueError, match="padding"):
        explicit_padding("full", (3, 3), (1, 1))


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("padding, k, d", [((1, 2), (3, 3), (1, 1)), ((0, 0), (3, 2), (1, 1)), ("valid", (2, 3), (1, 1)),
                                           ("same", (4, 3), (1, 2)), ("same", (3, 3), (2, 2)), ((2, 1), (1, 3), (2, 1))],
                         ids=str)
def test_pad_input_matches_nn_conv2d_padding_mode(mode, padding, k, d):
    conv = nn.Conv2d(3, 5, k, padding=padding, dilation=d, padding_mode=mode, bias=False).double()
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        y_ref = conv(x)
    lrtb = explicit_padding(conv.padding, conv.kernel_size, conv.dilation)
    xp, pad = pad_input(x, lrtb, mode)
    left, right, top, bottom = lrtb
    if mode == "zeros" and left == right and top == bottom:
        assert xp is x and pad == (top, left)  # left to the conv
    else:
        assert pad == (0, 0) and xp.shape[-2:] == (9 + top + bottom, 10 + left + right)
    with torch.no_grad():
        y = F.conv2d(xp, conv.weight, None, conv.stride, pad, conv.dilation)
    assert y.shape == y_ref.shape
    assert_close_rel(y, y_ref, torch.float64)


def test_pad_input_rejects_unknown_mode():
    with pytest.raises(ValueError, match="padding_mode"):
        pad_input(torch.randn(1, 1, 4, 4), (1, 1, 1, 1), "mirror")


def test_check_conv_args_returns_geometry():
    c = Case(N=2, C_in=5, C_out=6, H=7, W=6, k=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 1), rank=2)
    args, kw = random_layer(c, device="cpu")
    g = check_conv_args(*args, **{k: v for k, v in kw.items() if k != "relu"})
    oh, ow = c.out_hw()
    assert isinstance(g, ConvGeometry)
    assert (g.N, g.C_in, g.H, g.W, g.C_out, g.KH, g.KW) == (2, 5, 7, 6, 6, 3, 1)
    assert (g.stride, g.padding, g.dilation, g.OH, g.OW) == ((2, 1), (1, 0), (1, 1), oh, ow)
    assert (g.K, g.rank, g.groups, g.M) == (15, 2, 1, 2 * oh * ow)
