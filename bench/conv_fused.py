"""Benchmark of the fused CoRa conv kernel on every unique conv of ResNet-18 / ResNet-50.

    python bench/conv_fused.py [--batches 1 8 64 256] [--bits 4 3] [--models resnet18 resnet50]
                               [--time-cap SECONDS] [--out bench/results/conv_fused_<device>.csv]

Providers (same process, same GPU, ``triton.testing.do_bench`` with a cold L2, fp16 activations in
channels_last):
  cudnn       F.conv2d, fp16 weights, channels_last, ``cudnn.benchmark = True``
  unfused     the CoRa layer written with cuDNN: dequantize the packed weights, conv, the two
              adapter convs, add
  fused       the fused Triton kernel (packed int4/int3 weights + low-rank branch, one launch)
  fused_fp16w the same kernel with dense fp16 weights (control: Triton conv vs fewer weight bytes)
The eager timings include the CPU time to issue each call whenever it exceeds the kernel's; so cudnn
and fused are also timed replayed from a CUDA graph (``*_graph_us``: GPU time alone, as ``cora serve``
runs them), and the CPU time to issue one eager call is reported (``*_host_us``).
Ranks from a 5% budget per layer: r = max(1, floor(0.05 * C_out*C_in*kh*kw / (C_in*kh*kw + C_out))).
Reports median and p20/p80 (µs), achieved TB/s and TFLOP/s, speed-ups, then a summary (geometric
means per batch size) printed last.  Without a GPU it says so and runs a short correctness sweep
through the Triton interpreter instead; it never pretends to time.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (add_tuning_option, gpu_run_header, host_time_us, load_tuning_file,  # noqa: E402
                      save_tuning_file, time_in_graph, write_csv)

# hand-listed fallback when torchvision is missing: (C_in, C_out, k, stride, padding, H_in)
_R18 = [(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (64, 128, 3, 2, 1, 56), (128, 128, 3, 1, 1, 28),
        (64, 128, 1, 2, 0, 56), (128, 256, 3, 2, 1, 28), (256, 256, 3, 1, 1, 14), (128, 256, 1, 2, 0, 28),
        (256, 512, 3, 2, 1, 14), (512, 512, 3, 1, 1, 7), (256, 512, 1, 2, 0, 14)]


def conv_shapes(model_name: str):
    """Unique (C_in, C_out, k, stride, padding, H_in) of a torchvision model at 224x224."""
    try:
        import torchvision
    except ImportError:
        if model_name == "resnet18":
            return list(_R18)
        raise SystemExit(f"torchvision is needed for {model_name}")
    model = getattr(torchvision.models, model_name)(weights=None).to("meta").eval()
    shapes = []

    def hook(mod, inp, out):
        s = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0], inp[0].shape[-1])
        if s not in shapes:
            shapes.append(s)

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return shapes


def budget_rank(c_in, c_out, k):
    return max(1, int(0.05 * c_out * c_in * k * k / (c_in * k * k + c_out)))


def make_layer(c_in, c_out, k, bits, r, device, seed=0):
    """Packed weights, scale, zero, fp16 adapter ``a`` ``[r, K]`` / ``b`` ``[C_out, r]`` and fp16 bias on ``device``."""
    from cora_kernels.testing import random_packed_weights

    g = torch.Generator().manual_seed(seed)
    planes, scale, zero, a, b = random_packed_weights(c_out, k * k * c_in, bits, r, g)
    bias = torch.randn(c_out, generator=g) * 0.1
    return ([p.to(device) for p in planes], scale.to(device), zero.to(device), a.half().to(device),
            b.half().to(device), bias.half().to(device))


def correctness_sweep():
    """No GPU: run a few small shapes through the interpreter and print rel errors vs the reference."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from cora_kernels.conv_fused import cora_conv2d_triton
    from cora_kernels.reference import cora_conv2d_reference
    from cora_kernels.testing import rel_err

    print("correctness sweep through the Triton interpreter (small shapes, not timed):")
    cases = [(8, 16, 3, 1, 1, 6, 4), (32, 24, 1, 2, 0, 8, 3), (3, 16, 7, 2, 3, 12, 4), (64, 32, 3, 2, 1, 6, 3)]
    worst = 0.0
    for c_in, c_out, k, s, p, h, bits in cases:
        r = budget_rank(c_in, c_out, k)
        planes, scale, zero, a, b, bias = make_layer(c_in, c_out, k, bits, r, "cpu")
        for dt in (torch.float32, torch.float16):
            x = torch.randn(2, c_in, h, h).to(dt).contiguous(memory_format=torch.channels_last)
            kw = dict(bits=bits, kernel_size=k, stride=s, padding=p, dilation=1, relu=True)
            y = cora_conv2d_triton(x, planes, scale, zero, a.float(), b.float(), bias.float(), **kw)
            yr = cora_conv2d_reference(x, planes, scale, zero, a.float(), b.float(), bias.float(), **kw,
                                       compute_dtype=torch.float64, out_dtype=torch.float64)
            err = rel_err(y, yr)
            worst = max(worst, err)
            print(f"  C_in={c_in:<3} C_out={c_out:<3} k={k} s={s} p={p} {h}x{h} int{bits} r={r:<2} "
                  f"{str(dt)[6:]:<8} rel err {err:.2e}")
    print(f"worst rel err {worst:.2e}")


def profile_host(shape, bits: int, calls: int, dev) -> None:
    """Where the CPU time of an eager fused call goes: ``calls`` calls of one layer (batch 1, fp16) through
    the public op under cProfile, the top functions by own time.  The GPU is left to catch up after each
    call would hide nothing: the calls are issued back to back, as a model's forward issues them."""
    import cProfile
    import pstats

    from cora_kernels import cora_conv2d

    c_in, c_out, k, s, p, h = shape
    planes, scale, zero, a, b, bias = make_layer(c_in, c_out, k, bits, budget_rank(c_in, c_out, k), dev)
    x = torch.randn(1, c_in, h, h, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    kw = dict(bits=bits, kernel_size=k, stride=s, padding=p, dilation=1)
    cora_conv2d(x, planes, scale, zero, a, b, bias, **kw)  # tuned before profiling
    host = host_time_us(lambda: cora_conv2d(x, planes, scale, zero, a, b, bias, **kw), calls)
    print(f"\nhost time per eager call through cora_conv2d, C_in={c_in} C_out={c_out} k={k} H={h}: {host:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        cora_conv2d(x, planes, scale, zero, a, b, bias, **kw)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--time-cap", type=float, default=None, help="stop starting new rows after this many seconds")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/conv_fused_<device>.csv)")
    add_tuning_option(ap)
    ap.add_argument("--profile-host", type=int, default=0, metavar="CALLS",
                    help="after the table: cProfile CALLS eager calls of the first layer through the public op "
                         "(cora_kernels.cora_conv2d) and print where the CPU time goes")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA GPU here: not timing anything; running a correctness sweep through the interpreter instead.")
        correctness_sweep()
        return 0

    import torch.nn.functional as F
    from triton.testing import do_bench

    from cora_kernels.conv_fused import cora_conv2d_triton, dense_gemm_weight
    from cora_kernels.packing import from_gemm_layout
    from cora_kernels.reference import dequantize_weight

    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    meta, out_csv = gpu_run_header("conv_fused", dev, args.out)
    load_tuning_file(args.tuning)
    t0 = time.time()
    rows = []
    shapes = []
    for mname in args.models:
        for s in conv_shapes(mname):
            if s not in [x[1] for x in shapes]:
                shapes.append((mname, s))
    hdr = (f"{'model':<9}{'C_in':>5}{'C_out':>6}{'k':>3}{'s':>3}{'H':>5}{'N':>5}{'b':>3}{'r':>4} "
           f"{'cudnn':>9}{'unfused':>9}{'fused':>9}{'fp16w':>9} {'x cudnn':>8}{'x unf':>7}{'TB/s':>6}{'TFLOP/s':>8}"
           f"{'cudnn g':>9}{'fused g':>9}{'x cudnn g':>10}{'host':>7}")
    print(hdr)
    capped = False
    for batch in args.batches:
        for bits in args.bits:
            for mname, (c_in, c_out, k, s, p, h) in shapes:
                if args.time_cap and time.time() - t0 > args.time_cap:
                    capped = True
                    break
                r = budget_rank(c_in, c_out, k)
                planes, scale, zero, a, b, bias = make_layer(c_in, c_out, k, bits, r, dev)
                x = torch.randn(batch, c_in, h, h, device=dev, dtype=torch.float16).contiguous(
                    memory_format=torch.channels_last)
                shape4 = (c_out, c_in, k, k)
                w16 = dequantize_weight(planes, scale, zero, bits, shape4, torch.float16).contiguous(
                    memory_format=torch.channels_last)
                a4 = from_gemm_layout(a, (r, c_in, k, k)).contiguous(memory_format=torch.channels_last)
                b4 = b[:, :, None, None].contiguous()
                dense = dense_gemm_weight(planes, scale, zero, bits, k * k * c_in, torch.float16)
                conv = dict(stride=s, padding=p)
                kw = dict(bits=bits, kernel_size=k, stride=s, padding=p, dilation=1)

                def p_cudnn():
                    return F.conv2d(x, w16, bias, **conv)

                def p_unfused():
                    w = dequantize_weight(planes, scale, zero, bits, shape4, torch.float16)
                    y = F.conv2d(x, w, bias, **conv)
                    return y + F.conv2d(F.conv2d(x, a4, None, **conv), b4)

                def p_fused():
                    return cora_conv2d_triton(x, planes, scale, zero, a, b, bias, **kw)

                def p_fp16w():
                    return cora_conv2d_triton(x, planes, scale, zero, a, b, bias, **kw, dense_weight=dense)

                res = {}
                for name, fn in (("cudnn", p_cudnn), ("unfused", p_unfused), ("fused", p_fused), ("fp16w", p_fp16w)):
                    try:
                        fn()  # warm up / autotune outside the timing
                        torch.cuda.synchronize()
                        q = do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
                        res[name] = [v * 1e3 for v in q]  # ms -> µs
                    except Exception as e:  # keep going; record the failure
                        print(f"  {name} failed: {type(e).__name__}: {e}")
                        res[name] = [float("nan")] * 3
                # the same two kernels replayed from a CUDA graph (how cora serve runs them): GPU time alone;
                # and the CPU time one eager call takes to issue, which the eager timings above include
                # whenever it is longer than the kernel
                for name, fn in (("cudnn", p_cudnn), ("fused", p_fused)):
                    try:
                        res[f"{name}_graph"] = [v * 1e3 for v in time_in_graph(fn, do_bench)]
                        res[f"{name}_host"] = [host_time_us(fn)] * 3
                    except Exception as e:
                        print(f"  {name} graph failed: {type(e).__name__}: {e}")
                        res[f"{name}_graph"] = res[f"{name}_host"] = [float("nan")] * 3
                y = p_fused()
                oh = y.shape[-1]
                K = k * k * c_in
                M = batch * oh * oh
                flops = 2 * M * c_out * K + 2 * M * r * (K + c_out)
                wbytes = sum(pl.numel() * 4 for pl in planes) + 2 * r * (K + c_out) + 8 * c_out
                nbytes = x.numel() * 2 + wbytes + y.numel() * 2
                t_f = res["fused"][0]
                row = dict(model=mname, C_in=c_in, C_out=c_out, k=k, stride=s, padding=p, H=h, batch=batch,
                           bits=bits, rank=r, M=M, K=K, flops=flops, bytes=nbytes, **meta)
                for name, (med, p20, p80) in res.items():
                    row.update({f"{name}_us": med, f"{name}_p20_us": p20, f"{name}_p80_us": p80})
                row["tbps_fused"] = nbytes / (t_f * 1e-6) / 1e12
                row["tflops_fused"] = flops / (t_f * 1e-6) / 1e12
                row["speedup_vs_cudnn"] = res["cudnn"][0] / t_f
                row["speedup_vs_unfused"] = res["unfused"][0] / t_f
                row["speedup_vs_fp16w"] = res["fp16w"][0] / t_f
                row["graph_speedup_vs_cudnn"] = res["cudnn_graph"][0] / res["fused_graph"][0]
                rows.append(row)
                save_tuning_file(args.tuning)
                print(f"{mname:<9}{c_in:>5}{c_out:>6}{k:>3}{s:>3}{h:>5}{batch:>5}{bits:>3}{r:>4} "
                      f"{res['cudnn'][0]:>9.1f}{res['unfused'][0]:>9.1f}{t_f:>9.1f}{res['fp16w'][0]:>9.1f} "
                      f"{row['speedup_vs_cudnn']:>8.2f}{row['speedup_vs_unfused']:>7.2f}{row['tbps_fused']:>6.2f}"
                      f"{row['tflops_fused']:>8.1f}{res['cudnn_graph'][0]:>9.1f}{res['fused_graph'][0]:>9.1f}"
                      f"{row['graph_speedup_vs_cudnn']:>10.2f}{res['fused_host'][0]:>7.0f}", flush=True)
            if capped:
                break
        if capped:
            break
    write_csv(rows, out_csv)
    if args.profile_host and shapes:
        profile_host(shapes[0][1], args.bits[0], args.profile_host, dev)
    if capped:
        print(f"# time cap of {args.time_cap:.0f}s reached: {len(rows)} rows measured")
    print(f"# CSV: {out_csv}")
    print("\nsummary (geometric means of speed-ups of the fused kernel, per batch size):")
    print(f"{'batch':>6}{'bits':>5}{'rows':>6}{'vs cudnn':>10}{'vs unfused':>12}{'vs fp16w':>10}{'graphs vs cudnn':>17}")
    for batch in args.batches:
        for bits in args.bits:
            sel = [r_ for r_ in rows if r_["batch"] == batch and r_["bits"] == bits]
            if not sel:
                continue

            def gm(key):
                v = [r_[key] for r_ in sel if r_[key] == r_[key] and r_[key] > 0]
                return math.exp(sum(math.log(x_) for x_ in v) / len(v)) if v else float("nan")

            print(f"{batch:>6}{bits:>5}{len(sel):>6}{gm('speedup_vs_cudnn'):>10.2f}{gm('speedup_vs_unfused'):>12.2f}"
                  f"{gm('speedup_vs_fp16w'):>10.2f}{gm('graph_speedup_vs_cudnn'):>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
