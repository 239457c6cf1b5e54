"""Benchmark of a CoRa conv per unique groups == 1 conv of ResNet-18 / ResNet-50 / MobileNetV2, by strategy.

    python bench/conv_fused.py [--batches 1 8 64 256] [--bits 4 3] [--models resnet18 resnet50 mobilenet_v2]
                               [--time-cap SECONDS] [--out bench/results/conv_fused_<device>.csv] [--append]
                               [--tuning FILE] [--profile-host CALLS] [--dry-run]

Providers (same process, same GPU, ``triton.testing.do_bench`` with a cold L2, fp16 activations in
channels_last):
  cudnn    F.conv2d, fp16 weights, channels_last, ``cudnn.benchmark = True``
  unfused  the CoRa layer written with cuDNN: dequantize the packed weights, conv, the two adapter convs, add
  chosen   ``cora_conv2d_triton(strategy=None)``: what the tuner picks for the shape (it times a handful of
           fused configs and the dequantize strategy; the pick is the ``chosen`` column)
  fused    ``strategy="fused"``: the fused Triton kernel alone (packed int4/int3 weights + low-rank branch,
           one launch; its config is the ``fused_choice`` column)
  dequant  ``strategy="dequant"``: a small Triton kernel writes Q(W) + B·A into a shared scratch buffer, then
           cuDNN (two launches)
  fp16w    the fused kernel with dense fp16 weights (control: Triton conv vs fewer weight bytes)
Eager timings include the CPU time to issue each call whenever it exceeds the kernel's; so cudnn, chosen,
fused and dequant are also timed replayed from a CUDA graph (``*_graph_us``: GPU time alone, as ``cora serve``
runs them), and the CPU time to issue one eager call is reported (``*_host_us``).  ``err_*``: relative error
of each CoRa provider against ``unfused`` on the same input (a sanity check, fp16 against fp16).
Ranks from a 5% budget per layer: r = max(1, floor(0.05 * C_out*C_in*kh*kw / (C_in*kh*kw + C_out))).
Reports median and p20/p80 (µs), achieved TB/s and TFLOP/s, speed-ups, then a summary (geometric means of
the CUDA-graph speed-ups against cuDNN per batch size) printed last.  ``--time-cap``: no new row starts
after that many seconds (rows so far are written).

``--dry-run``: on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set here before Triton is
imported), tiny shapes (``--layers-per-model`` first layers of each model, spatial size at most ``--max-hw``),
batch 1, every provider (cudnn is F.conv2d on the CPU; no graphs, no host times): the script's code paths,
not a measurement (its times are the interpreter's).  Without a GPU and without ``--dry-run`` it says so
and runs a short correctness sweep through the interpreter instead; it never pretends to time.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (add_tuning_option, append_csv, choice_text, cpu_time_ms, dry_run_header, gpu_run_header,  # noqa: E402
                      host_time_us, interpret_if, load_tuning_file, record_choices, save_tuning_file, time_in_graph,
                      write_csv)

# torch is imported in main(), after the arguments: --help stays fast and --dry-run can set TRITON_INTERPRET first

MODELS = ("resnet18", "resnet50", "mobilenet_v2")
PROVIDERS = ("cudnn", "unfused", "chosen", "fused", "dequant", "fp16w")  # chosen before fused: its tuning
GRAPH_PROVIDERS = ("cudnn", "chosen", "fused", "dequant")                # times the fused configs once
HOST_PROVIDERS = ("cudnn", "chosen", "fused")
CORA_PROVIDERS = ("chosen", "fused", "dequant", "fp16w")

# hand-listed fallback when torchvision is missing: (C_in, C_out, k, stride, padding, H_in)
_R18 = [(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (64, 128, 3, 2, 1, 56), (128, 128, 3, 1, 1, 28),
        (64, 128, 1, 2, 0, 56), (128, 256, 3, 2, 1, 28), (256, 256, 3, 1, 1, 14), (128, 256, 1, 2, 0, 28),
        (256, 512, 3, 2, 1, 14), (512, 512, 3, 1, 1, 7), (256, 512, 1, 2, 0, 14)]


def conv_shapes(model_name: str):
    """Unique (C_in, C_out, k, stride, padding, H_in) of the ``groups == 1`` convs of a torchvision model at
    224x224, in execution order (depthwise / grouped convs run the grouped kernel, not these strategies)."""
    import torch

    try:
        import torchvision
    except ImportError:
        if model_name == "resnet18":
            return list(_R18)
        raise SystemExit(f"torchvision is needed for {model_name}")
    model = getattr(torchvision.models, model_name)(weights=None).to("meta").eval()
    shapes = []

    def hook(mod, inp, out):
        if mod.groups != 1:
            return
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


def make_layer(c_in, c_out, k, bits, r, device, seed=0, dtype=None):
    """Packed weights, scale, zero, adapter ``a`` ``[r, K]`` / ``b`` ``[C_out, r]`` and bias on ``device``
    (the float ones in ``dtype``, default fp16)."""
    import torch

    from cora_kernels.testing import random_packed_weights

    dtype = dtype or torch.float16
    g = torch.Generator().manual_seed(seed)
    planes, scale, zero, a, b = random_packed_weights(c_out, k * k * c_in, bits, r, g)
    bias = torch.randn(c_out, generator=g) * 0.1
    return ([p.to(device) for p in planes], scale.to(device), zero.to(device), a.to(dtype).to(device),
            b.to(dtype).to(device), bias.to(dtype).to(device))


def correctness_sweep():
    """No GPU: run a few small shapes through the interpreter and print rel errors vs the reference."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

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
    """Where the CPU time of an eager call goes: ``calls`` calls of one layer (batch 1, fp16) through the public
    op under cProfile, the top functions by own time.  The calls are issued back to back, as a model's forward
    issues them."""
    import cProfile
    import pstats

    import torch

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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 64 256 (--dry-run: 1)")
    ap.add_argument("--bits", type=int, nargs="+", default=None, help="default 4 3 (--dry-run: 4)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS,
                    help="which providers to time (default all; cudnn and unfused are always run: the speed-ups "
                         "and errors are against them)")
    ap.add_argument("--time-cap", type=float, default=None, help="stop starting new rows after this many seconds")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/conv_fused_<device>.csv; "
                                                "--dry-run: conv_fused_dryrun.csv in the temp folder)")
    ap.add_argument("--append", action="store_true", help="append to --out instead of replacing it (new columns "
                                                          "are merged)")
    ap.add_argument("--rep-ms", type=float, default=40.0, help="do_bench's rep per eager timing (ms)")
    ap.add_argument("--graph-rep-ms", type=float, default=100.0, help="at least this many ms of graph replays")
    add_tuning_option(ap)
    ap.add_argument("--profile-host", type=int, default=0, metavar="CALLS",
                    help="after the table: cProfile CALLS eager calls of the first layer through the public op "
                         "(cora_kernels.cora_conv2d) and print where the CPU time goes")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, Triton interpreter, tiny shapes: exercise every code path, time nothing real")
    ap.add_argument("--layers-per-model", type=int, default=None, help="only the first N shapes of each model "
                                                                       "(default all; --dry-run: 1)")
    ap.add_argument("--max-hw", type=int, default=None, help="cap the input's spatial size (default none; "
                                                             "--dry-run: 8)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.batches = args.batches or ([1] if dry else [1, 8, 64, 256])
    args.bits = args.bits or ([4] if dry else [4, 3])
    if dry:
        args.layers_per_model = args.layers_per_model or 1
        args.max_hw = args.max_hw or 8
        if args.profile_host:
            print("--profile-host needs a GPU: ignored in a dry run")
            args.profile_host = 0
    args.providers = [p for p in PROVIDERS if p in set(args.providers) | {"cudnn", "unfused"}]
    return args


def select_shapes(args) -> list:
    """[(model, (C_in, C_out, k, stride, padding, H_in)), ...]: each shape once (its first model), at most
    ``--layers-per-model`` per model, H_in capped at ``--max-hw``."""
    shapes, seen = [], set()
    for mname in args.models:
        taken = 0
        for s in conv_shapes(mname):
            if args.layers_per_model is not None and taken >= args.layers_per_model:
                break
            if args.max_hw:
                s = (*s[:5], min(s[5], args.max_hw))
            if s in seen:
                continue
            seen.add(s)
            shapes.append((mname, s))
            taken += 1
    return shapes


def gm(rows, key):
    """Geometric mean of the positive, finite values of ``key`` in ``rows`` (nan when there are none)."""
    v = [r[key] for r in rows if isinstance(r.get(key), float) and r[key] == r[key] and 0 < r[key] < float("inf")]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def ratio(a, b):
    return a / b if b and b == b and a == a else float("nan")


def main(argv=None):
    args = parse_args(argv)
    interpret_if(args.dry_run)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: not timing anything; running a correctness sweep through the interpreter instead "
              "(--dry-run runs the benchmark's own code paths on tiny shapes).")
        correctness_sweep()
        return 0
    return bench(args)


def bench(args) -> int:
    import torch
    import torch.nn.functional as F

    from cora_kernels.conv_fused import cora_conv2d_triton, dense_gemm_weight
    from cora_kernels.packing import from_gemm_layout
    from cora_kernels.reference import dequantize_weight
    from cora_kernels.testing import rel_err

    dry = args.dry_run
    if dry:
        dev = torch.device("cpu")
        meta, out_csv = dry_run_header("conv_fused", args.out, "tiny shapes")
    else:
        from triton.testing import do_bench

        torch.backends.cudnn.benchmark = True
        dev = torch.device("cuda")
        meta, out_csv = gpu_run_header("conv_fused", dev, args.out)
    dtype = torch.float16
    load_tuning_file(args.tuning)

    def timed(fn):
        """(median, p20, p80) µs of eager calls."""
        if dry:
            return [v * 1e3 for v in cpu_time_ms(fn, reps=1)]
        fn()  # warm-up outside the timing
        torch.cuda.synchronize()
        return [v * 1e3 for v in do_bench(fn, warmup=min(10.0, args.rep_ms / 4), rep=args.rep_ms,
                                          quantiles=[0.5, 0.2, 0.8])]

    t0 = time.time()
    rows = []
    shapes = select_shapes(args)
    print(f"# {len(shapes)} shapes ({', '.join(args.models)}), batches {args.batches}, bits {args.bits}, "
          f"providers {' '.join(args.providers)}", flush=True)
    hdr = (f"{'model':<13}{'C_in':>5}{'C_out':>6}{'k':>3}{'s':>3}{'H':>5}{'N':>5}{'b':>3}{'r':>4} "
           f"{'cudnn':>8}{'unfus':>8}{'chosen':>8}{'fused':>8}{'deq':>8}{'fp16w':>8} |{'graph: cudnn':>13}"
           f"{'chosen':>8}{'fused':>8}{'deq':>8}{'xF':>6}{'xC':>6} {'host':>5}  chosen")
    print(hdr)
    capped = False
    for batch in args.batches:
        for bits in args.bits:
            for mname, (c_in, c_out, k, s, p, h) in shapes:
                if args.time_cap and time.time() - t0 > args.time_cap:
                    capped = True
                    break
                row_t0 = time.time()
                r = budget_rank(c_in, c_out, k)
                planes, scale, zero, a, b, bias = make_layer(c_in, c_out, k, bits, r, dev, dtype=dtype)
                x = torch.randn(batch, c_in, h, h, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
                shape4 = (c_out, c_in, k, k)
                w16 = dequantize_weight(planes, scale, zero, bits, shape4, dtype).contiguous(
                    memory_format=torch.channels_last)
                a4 = from_gemm_layout(a, (r, c_in, k, k)).contiguous(memory_format=torch.channels_last)
                b4 = b[:, :, None, None].contiguous()
                dense = dense_gemm_weight(planes, scale, zero, bits, k * k * c_in, dtype)
                conv = dict(stride=s, padding=p)
                kw = dict(bits=bits, kernel_size=k, stride=s, padding=p, dilation=1)

                def p_cudnn():
                    return F.conv2d(x, w16, bias, **conv)

                def p_unfused():
                    w = dequantize_weight(planes, scale, zero, bits, shape4, dtype)
                    y = F.conv2d(x, w, bias, **conv)
                    return y + F.conv2d(F.conv2d(x, a4, None, **conv), b4)

                fns = {
                    "cudnn": p_cudnn,
                    "unfused": p_unfused,
                    "chosen": lambda: cora_conv2d_triton(x, planes, scale, zero, a, b, bias, **kw),
                    "fused": lambda: cora_conv2d_triton(x, planes, scale, zero, a, b, bias, **kw, strategy="fused"),
                    "dequant": lambda: cora_conv2d_triton(x, planes, scale, zero, a, b, bias, **kw,
                                                          strategy="dequant"),
                    "fp16w": lambda: cora_conv2d_triton(x, planes, scale, zero, a, b, bias, **kw, dense_weight=dense),
                }
                nan3 = [float("nan")] * 3
                res, errs, picks = {}, {}, {}
                y_ref = p_unfused()
                tune_s = float("nan")
                for name in args.providers:
                    fn = fns[name]
                    try:
                        # the first call tunes (chosen: fused configs and the dequant path; fused: reuses them)
                        t1 = time.perf_counter()
                        with record_choices() as seen:
                            y = fn()
                        if not dry:
                            torch.cuda.synchronize()
                        if name == "chosen":
                            tune_s = time.perf_counter() - t1
                        if name in ("chosen", "fused"):
                            picks[name] = choice_text(seen[-1]) if seen else "-"
                        if name in CORA_PROVIDERS:
                            errs[name] = rel_err(y.float(), y_ref.float())
                        res[name] = timed(fn)
                    except Exception as e:  # keep going; record the failure
                        print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
                        res[name] = nan3
                # the kernels replayed from a CUDA graph (how cora serve runs them): GPU time alone; and the CPU
                # time one eager call takes to issue, which the eager timings above include whenever it is longer
                if not dry:
                    for name in [n for n in GRAPH_PROVIDERS if n in args.providers]:
                        try:
                            res[f"{name}_graph"] = [v * 1e3 for v in time_in_graph(
                                fns[name], do_bench, min_rep_ms=args.graph_rep_ms)]
                        except Exception as e:
                            print(f"  {name} graph failed: {type(e).__name__}: {e}", flush=True)
                            res[f"{name}_graph"] = nan3
                    for name in [n for n in HOST_PROVIDERS if n in args.providers]:
                        try:
                            res[f"{name}_host"] = [host_time_us(fns[name])] * 3
                        except Exception as e:
                            print(f"  {name} host time failed: {type(e).__name__}: {e}", flush=True)
                            res[f"{name}_host"] = nan3
                oh = y_ref.shape[-1]
                K = k * k * c_in
                M = batch * oh * oh
                flops = 2 * M * c_out * K + 2 * M * r * (K + c_out)
                wbytes = sum(pl.numel() * 4 for pl in planes) + 2 * r * (K + c_out) + 8 * c_out
                nbytes = x.numel() * 2 + wbytes + y_ref.numel() * 2
                row = dict(model=mname, C_in=c_in, C_out=c_out, k=k, stride=s, padding=p, H=h, batch=batch,
                           bits=bits, rank=r, M=M, K=K, flops=flops, bytes=nbytes, chosen=picks.get("chosen", ""),
                           fused_choice=picks.get("fused", ""), tune_s=tune_s, dry_run=dry, **meta)
                for name in PROVIDERS + tuple(f"{n}_graph" for n in GRAPH_PROVIDERS) + tuple(
                        f"{n}_host" for n in HOST_PROVIDERS):
                    med, p20, p80 = res.get(name, nan3)
                    row.update({f"{name}_us": med, f"{name}_p20_us": p20, f"{name}_p80_us": p80})
                for name in CORA_PROVIDERS:
                    row[f"err_{name}"] = errs.get(name, float("nan"))
                t_f = row["fused_us"]
                row["tbps_fused"] = nbytes / (t_f * 1e-6) / 1e12 if t_f == t_f else float("nan")
                row["tflops_fused"] = flops / (t_f * 1e-6) / 1e12 if t_f == t_f else float("nan")
                row["speedup_vs_cudnn"] = ratio(row["cudnn_us"], t_f)  # eager, fused kernel (as before)
                row["speedup_vs_unfused"] = ratio(row["unfused_us"], t_f)
                row["speedup_vs_fp16w"] = ratio(row["fp16w_us"], t_f)
                row["graph_speedup_vs_cudnn"] = ratio(row["cudnn_graph_us"], row["fused_graph_us"])  # fused
                row["graph_speedup_chosen_vs_cudnn"] = ratio(row["cudnn_graph_us"], row["chosen_graph_us"])
                row["graph_speedup_dequant_vs_cudnn"] = ratio(row["cudnn_graph_us"], row["dequant_graph_us"])
                row["row_s"] = time.time() - row_t0
                rows.append(row)
                save_tuning_file(args.tuning)
                print(f"{mname:<13}{c_in:>5}{c_out:>6}{k:>3}{s:>3}{h:>5}{batch:>5}{bits:>3}{r:>4} "
                      + "".join(f"{row[f'{n}_us']:>8.1f}" for n in PROVIDERS) + " |"
                      + f"{row['cudnn_graph_us']:>13.1f}"
                      + "".join(f"{row[f'{n}_graph_us']:>8.1f}" for n in ("chosen", "fused", "dequant"))
                      + f"{row['graph_speedup_vs_cudnn']:>6.2f}{row['graph_speedup_chosen_vs_cudnn']:>6.2f}"
                      + f" {row['fused_host_us']:>5.0f}  {row['chosen'] or '-'}", flush=True)
            if capped:
                break
        if capped:
            break
    (append_csv if args.append else write_csv)(rows, out_csv)
    if args.profile_host and shapes and not dry:
        profile_host(shapes[0][1], args.bits[0], args.profile_host, torch.device("cuda"))
    if capped:
        print(f"# time cap of {args.time_cap:.0f}s reached: {len(rows)} rows measured")
    print(f"# CSV: {out_csv} ({len(rows)} rows{', appended' if args.append else ''}) in {time.time() - t0:.0f}s")
    worst = {n: max([r_[f"err_{n}"] for r_ in rows if r_[f"err_{n}"] == r_[f"err_{n}"]], default=float("nan"))
             for n in CORA_PROVIDERS}
    print("# worst rel err against unfused: " + ", ".join(f"{n} {v:.1e}" for n, v in worst.items()))
    which = "eager, interpreter: not a measurement" if dry else "CUDA graphs"
    print(f"\nsummary (geometric means of speed-ups against cuDNN fp16, {which}; chosen: the tuner's pick per shape):")
    print(f"{'batch':>6}{'bits':>5}{'rows':>6}{'fused':>8}{'chosen':>8}{'dequant':>9}{'picked dequant':>16}"
          f"{'fused eager':>13}{'fused vs unfused':>18}")
    kind = "speedup_vs_cudnn" if dry else "graph_speedup_vs_cudnn"
    for batch in args.batches:
        for bits in args.bits:
            sel = [r_ for r_ in rows if r_["batch"] == batch and r_["bits"] == bits]
            if not sel:
                continue
            if dry:
                for r_ in sel:
                    r_["_c"] = ratio(r_["cudnn_us"], r_["chosen_us"])
                    r_["_d"] = ratio(r_["cudnn_us"], r_["dequant_us"])
            ck, dk = ("_c", "_d") if dry else ("graph_speedup_chosen_vs_cudnn", "graph_speedup_dequant_vs_cudnn")
            n_deq = sum(1 for r_ in sel if r_["chosen"] == "dequant")
            print(f"{batch:>6}{bits:>5}{len(sel):>6}{gm(sel, kind):>8.2f}{gm(sel, ck):>8.2f}{gm(sel, dk):>9.2f}"
                  f"{f'{n_deq}/{len(sel)}':>16}{gm(sel, 'speedup_vs_cudnn'):>13.2f}{gm(sel, 'speedup_vs_unfused'):>18.2f}")
    failed = [n for n in CORA_PROVIDERS
              if n in args.providers and rows and all(r_[f"{n}_us"] != r_[f"{n}_us"] for r_ in rows)]
    if failed:
        print(f"# every row failed for: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
