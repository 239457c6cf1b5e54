"""End-to-end benchmark: whole torchvision ResNets, cuDNN fp16 vs deployed CoRa W4 / W3, CUDA graphs.

    python bench/model_e2e.py [--models resnet18 resnet50] [--batches 1 8 64 256] [--bits 4 3]
                              [--time-cap SECONDS] [--out bench/results/model_e2e_<device>.csv]

Models have random weights (speed does not depend on them).  Providers, in one process on one GPU,
fp16 activations in channels_last, each captured in a CUDA graph after a warm-up outside capture:
  cudnn   the float model in fp16, ``cudnn.benchmark = True``
  cora_wB ``cora.convert`` (B bits, 5% adapter budget, uniform ranks, round to nearest, min-max
          ranges, weight-space SVD; random calibration images) then ``cora.deploy`` (BatchNorm folded,
          ReLU and residual adds fused: one launch per conv), warmed up with ``cora.deploy.warmup``
Reports per (model, batch, provider): graph-replay latency median and p20/p80
(``triton.testing.do_bench``), images/s, weight bytes (measured from the stored tensors) and peak GPU
memory; a CSV with device, torch/triton versions and git commit; a summary printed last.

Without a GPU it says so in one line and does not time anything: it reports the measured weight
bytes (fp16 model vs deployed W4/W3 with adapters) and checks the deployed model against the
converted one on a tiny batch through the reference path.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (add_tuning_option, gpu_run_header, load_tuning_file, save_tuning_file,  # noqa: E402
                      time_in_graph, write_csv)

import cora  # noqa: E402
from cora.deploy import deploy, warmup, weight_bytes  # noqa: E402
from cora_kernels.testing import rel_err  # noqa: E402

IMAGE = (3, 224, 224)
DEVICE = "cuda"  # the timed path always runs on CUDA (a module constant only so its bookkeeping can be dry-run)


def float_model(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    # mild random BatchNorm statistics so that folding is not the identity map in the checks
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.75, 1.25)
                m.bias.normal_(0.0, 0.1)
    return model


def convert_model(model: torch.nn.Module, bits: int, calib: torch.Tensor) -> torch.nn.Module:
    cfg = cora.CoRaConfig(bits=bits, method="uniform", budget=0.05, rounding="nearest", range_method="minmax",
                          factorization="weight", sequential=False, refine=False, progress=False,
                          calib_images=calib.shape[0], tune_iterations=0)  # random weights: nothing to tune for
    return cora.convert(model, calib, cfg).eval()


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def bytes_line(label: str, wb: dict) -> str:
    parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in wb.items() if k != "total" and v)
    return f"  {label:<14}{fmt_bytes(wb['total'])}   ({parts} MiB)"


# ------------------------------------------------------------------------------------------ no GPU
def cpu_report(args) -> int:
    """Weight bytes and a reference-path correctness check; never timed."""
    os.environ.setdefault("CORA_BACKEND", "reference")
    worst = 0.0
    ok = True
    summary = []
    for name in args.models:
        t0 = time.perf_counter()
        fm = float_model(name)
        fp16 = weight_bytes(copy.deepcopy(fm).half())
        calib = torch.randn(8, 3, 64, 64)  # the uniform-rank, weight-SVD conversion only needs shapes from it
        print(f"{name}: weight bytes (measured from the stored tensors)")
        print(bytes_line("fp16 model", fp16))
        row = {"model": name, "fp16": fp16["total"]}
        for bits in args.bits:
            conv = convert_model(fm, bits, calib)
            dep = deploy(conv, weights="packed")  # the stored form: packed codes
            wb = weight_bytes(dep)
            print(bytes_line(f"CoRa W{bits} deployed", wb))
            x = torch.randn(2, 3, 64, 64)
            with torch.no_grad():
                err = rel_err(dep(x), conv(x))
            worst = max(worst, err)
            ok &= err <= 1e-4
            print(f"    deployed vs converted (reference path, 2x3x64x64, fp32): rel err {err:.2e}"
                  f" {'ok' if err <= 1e-4 else 'FAIL (> 1e-4)'}; adapters {conv.cora_report.adapter_fraction:.1%}"
                  f" of conv weights")
            row[f"w{bits}"] = wb["total"]
        print(f"  ({time.perf_counter() - t0:.1f}s)")
        summary.append(row)
    print("\nsummary (no GPU: weight bytes only, nothing timed):")
    print(f"{'model':<10}{'fp16':>14}" + "".join(f"{'W' + str(b):>14}{'x smaller':>10}" for b in args.bits))
    for row in summary:
        line = f"{row['model']:<10}{fmt_bytes(row['fp16']):>14}"
        for b in args.bits:
            line += f"{fmt_bytes(row[f'w{b}']):>14}{row['fp16'] / row[f'w{b}']:>10.2f}"
        print(line)
    print(f"worst deployed-vs-converted rel err {worst:.2e} ({'ok' if ok else 'FAIL'})")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ GPU
def time_graph(model, x, do_bench):
    """Capture ``model(x)`` in a CUDA graph; (median, p20, p80) ms of its replay and peak memory."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    q = time_in_graph(lambda: model(x), do_bench)
    return q, torch.cuda.max_memory_allocated()


def gpu_bench(args) -> int:
    from triton.testing import do_bench

    torch.backends.cudnn.benchmark = True
    dev = torch.device(DEVICE)
    meta, out_csv = gpu_run_header("model_e2e", dev, args.out)
    load_tuning_file(args.tuning)
    t0 = time.time()
    rows, capped = [], False
    cl = torch.channels_last

    def over():
        return args.time_cap is not None and time.time() - t0 > args.time_cap

    print(f"{'model':<9}{'provider':<9}{'batch':>6}{'median ms':>11}{'p20':>9}{'p80':>9}{'img/s':>10}"
          f"{'weights MiB':>12}{'peak MiB':>10}{'rel err':>9}")
    for name in args.models:
        if over():
            capped = True
            break
        fm = float_model(name)
        providers = {}
        m16 = copy.deepcopy(fm).half().to(dev).to(memory_format=cl)
        providers["cudnn"] = (m16, weight_bytes(m16), float("nan"))
        calib = torch.randn(8, *IMAGE)
        for bits in args.bits:
            if over():
                capped = True
                break
            conv = convert_model(fm.to(dev), bits, calib).to(dev)
            dep = deploy(conv).to(dev)
            # fused deployed model vs the converted model (op per conv + torch BN/ReLU/add), both fp16 at
            # batch 1 (the shapes warmed up for the first timed batch anyway)
            x = torch.randn(1, *IMAGE, device=dev, dtype=torch.float16).contiguous(memory_format=cl)
            with torch.no_grad():
                err = rel_err(dep(x), conv(x))
            del conv
            providers[f"cora_w{bits}"] = (dep, weight_bytes(dep), err)
        fm.cpu()
        for batch in args.batches:
            for prov, (model, wb, err) in providers.items():
                if over():
                    capped = True
                    break
                try:
                    if prov != "cudnn":  # autotune every layer shape of this batch, outside capture
                        warmup(model, [batch], IMAGE, dev, torch.float16, memory_format=cl)
                    x = torch.randn(batch, *IMAGE, device=dev, dtype=torch.float16).contiguous(memory_format=cl)
                    (med, p20, p80), peak = time_graph(model, x, do_bench)
                except Exception as e:  # keep going; record the failure
                    print(f"  {name} {prov} batch {batch} failed: {type(e).__name__}: {e}")
                    med = p20 = p80 = float("nan")
                    peak = 0
                row = dict(model=name, provider=prov, batch=batch, median_ms=med, p20_ms=p20, p80_ms=p80,
                           images_per_s=batch / (med * 1e-3), weight_bytes=wb["total"], peak_mem_bytes=peak,
                           rel_err_vs_converted=err, **{f"bytes_{k}": v for k, v in wb.items() if k != "total"},
                           **meta)
                rows.append(row)
                save_tuning_file(args.tuning)
                print(f"{name:<9}{prov:<9}{batch:>6}{med:>11.3f}{p20:>9.3f}{p80:>9.3f}{row['images_per_s']:>10.0f}"
                      f"{wb['total'] / 2**20:>12.2f}{peak / 2**20:>10.0f}{err:>9.1e}", flush=True)
                torch.cuda.empty_cache()
            if capped:
                break
        del providers
        torch.cuda.empty_cache()
        if capped:
            break
    write_csv(rows, out_csv)
    if capped:
        print(f"# time cap of {args.time_cap:.0f}s reached: {len(rows)} rows measured")
    print(f"# CSV: {out_csv}")
    print("\nsummary (CUDA graphs, fp16 channels_last; speed-up = cuDNN fp16 latency / CoRa latency):")
    provs = [f"cora_w{b}" for b in args.bits]
    print(f"{'model':<10}{'batch':>6}{'cudnn ms':>10}" + "".join(f"{p + ' ms':>14}{'x':>7}" for p in provs))
    for name in args.models:
        for batch in args.batches:
            sel = {r["provider"]: r for r in rows if r["model"] == name and r["batch"] == batch}
            if "cudnn" not in sel:
                continue
            base = sel["cudnn"]["median_ms"]
            line = f"{name:<10}{batch:>6}{base:>10.3f}"
            for p in provs:
                t = sel[p]["median_ms"] if p in sel else float("nan")
                line += f"{t:>14.3f}{base / t:>7.2f}"
            print(line)
    for name in args.models:
        sel = {r["provider"]: r["weight_bytes"] for r in rows if r["model"] == name}
        if sel:
            print(f"{name} weight bytes: " + ", ".join(f"{p} {v / 2**20:.2f} MiB" for p, v in sel.items()))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--time-cap", type=float, default=None, help="stop starting new rows after this many seconds")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/model_e2e_<device>.csv)")
    add_tuning_option(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: not timing anything; reporting weight bytes and a reference-path correctness check.")
        return cpu_report(args)
    return gpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
