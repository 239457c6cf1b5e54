"""Random CoRa layers for the kernel tests (fresh random inputs, realistic magnitudes)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cora_kernels.packing import pack_codes


@dataclass
class Case:
    N: int = 2
    C_in: int = 5
    C_out: int = 7
    H: int = 7
    W: int = 6
    k: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (1, 1)
    dilation: tuple = (1, 1)
    bits: int = 4
    rank: str | int = "odd"  # 0, 1, "odd", "full" or an int
    dtype: torch.dtype = torch.float32
    bias: bool = False
    bn: bool = False
    res: bool = False
    relu: bool = False
    channels_last: bool = False
    split_k: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def K(self):
        return self.k[0] * self.k[1] * self.C_in

    def out_hw(self):
        oh = (self.H + 2 * self.padding[0] - self.dilation[0] * (self.k[0] - 1) - 1) // self.stride[0] + 1
        ow = (self.W + 2 * self.padding[1] - self.dilation[1] * (self.k[1] - 1) - 1) // self.stride[1] + 1
        return oh, ow

    def r(self) -> int:
        full = min(self.C_out, self.K)
        return {"odd": min(3, full), "full": full}.get(self.rank, self.rank)

    def __str__(self):
        return (f"N{self.N} C{self.C_in}->{self.C_out} {self.H}x{self.W} k{self.k} s{self.stride} p{self.padding} "
                f"d{self.dilation} b{self.bits} r{self.r()} {str(self.dtype)[6:]} bias{int(self.bias)} "
                f"bn{int(self.bn)} res{int(self.res)} relu{int(self.relu)} cl{int(self.channels_last)} "
                f"sk{self.split_k}")


DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter


def make_layer(c: Case, seed: int | None = None, device=DEFAULT_DEVICE):
    """Returns (args, kwargs) for cora_conv2d / cora_conv2d_reference."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())
    qmax = 2**c.bits - 1
    codes = torch.randint(0, qmax + 1, (c.C_out, c.K), generator=g)
    planes = pack_codes(codes, c.bits)
    scale = (torch.rand(c.C_out, generator=g) + 0.5) / (qmax * c.K**0.5)
    zero = torch.randint(0, qmax + 1, (c.C_out,), generator=g).to(torch.float32)
    r = c.r()
    a = b = None
    if r > 0:
        # a residual-sized adapter: about a quarter of the main branch's output
        a = torch.randn(r, c.K, generator=g) / c.K**0.5
        b = torch.randn(c.C_out, r, generator=g) * (0.25 / r**0.5)
    x = torch.randn(c.N, c.C_in, c.H, c.W, generator=g).to(c.dtype)
    if c.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    oh, ow = c.out_hw()
    kw = dict(bits=c.bits, kernel_size=c.k, stride=c.stride, padding=c.padding, dilation=c.dilation, relu=c.relu)
    bias = torch.randn(c.C_out, generator=g) * 0.1 if c.bias else None
    if c.bn:
        kw["out_scale"] = torch.rand(c.C_out, generator=g) + 0.5
        kw["out_shift"] = torch.randn(c.C_out, generator=g) * 0.1
    if c.res:
        kw["residual"] = torch.randn(c.N, c.C_out, oh, ow, generator=g).to(c.dtype)
    mv = lambda t: t.to(device) if t is not None else None  # noqa: E731
    args = (mv(x), [mv(p) for p in planes], mv(scale), mv(zero), mv(a), mv(b), mv(bias))
    kw = {k: (mv(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return args, kw
