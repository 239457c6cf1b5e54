"""End-to-end benchmark: whole torchvision models, cuDNN fp16 against deployed CoRa, CUDA graphs, by strategy.

    python bench/model_e2e.py [--models resnet18 resnet50 mobilenet_v2 cifar_shufflenetv2_x0_5] [--batches 1 8 64 256]
                              [--bits 4] [--strategies chosen fused] [--tune-seconds S] [--time-cap SECONDS]
                              [--out bench/results/model_e2e_<device>.csv] [--tuning FILE] [--dry-run]

Models have random weights (speed does not depend on them); ``cifar_*`` models (the CIFAR ShuffleNetV2 x0.5 by
default: 37 pointwise / dense convs on the fused kernel, 19 depthwise on the grouped one; channel shuffle, split
and concat in PyTorch) run at 32x32, the others at 224x224 (``--image`` sets both).  Providers, in one process on one GPU,
fp16 activations in channels_last, each captured in a CUDA graph after a warm-up outside capture:
  cudnn             the float model in fp16, ``cudnn.benchmark = True``
  cora_wB_chosen    ``cora.convert`` (B bits, 5% adapter budget, uniform ranks, round to nearest, min-max
                    ranges, weight-space SVD; random calibration images) then ``cora.deploy`` (BatchNorm folded,
                    activations and residual adds fused), warmed up with ``cora.warmup``: every groups == 1 conv
                    runs what the tuner picks for its shape and batch (the fused kernel or dequantize + cuDNN);
                    ``n_fused`` / ``n_dequant`` count the picks of one forward pass
  cora_wB_fused     the same deployed model with ``CORA_STRATEGY=fused`` while it is warmed up and captured:
                    the fused kernel alone
  cora_wB_dequant   (``--strategies ... dequant``) the same with ``CORA_STRATEGY=dequant``
Tuning runs inside ``cora_kernels.tuning.tuning_budget``: each model gets ``--tune-seconds`` in all (its check at
batch 1 and every warm-up; past it the untimed rules decide); ``tune_s`` is what that row's warm-up spent,
``model_tune_s`` the model's total so far.  All models are converted first, then measured batch by batch (in
the order of ``--batches``) across the models, so a time cap keeps every model's first batches.
Memory: ``weight_bytes`` (``cora.deploy.weight_bytes``: packed codes, scales, adapters, folded BatchNorm) plus
``scratch_bytes`` (``cora_kernels.scratch.scratch_bytes``: the dequantize strategy's shared buffers held by
the process at that row, every stream's, every model's so far: an upper bound) against ``fp16_bytes`` (the
float model in fp16): ``mem_ratio`` (target <= 0.35); ``mem_ratio_one_buffer`` counts one buffer of the model's
largest dense conv weight instead.
Reports per (model, batch, provider): graph-replay latency median and p20/p80 (``triton.testing.do_bench``),
images/s, peak GPU memory; a CSV with device, torch/triton versions and git commit; a summary printed last.
``--time-cap``: no new model or row starts after that many seconds (rows so far are written).

``--dry-run``: on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set before Triton is imported),
a tiny input (``--image 16``; cifar_resnet20 and a narrow mobilenet_v2 by default), batch 1, fp32, no graphs
(one timed eager call, the interpreter's time, not a measurement), the deployed models on the Triton backend:
the script's code paths.  Without a GPU and without ``--dry-run`` it says so in one line and does not time
anything: it reports the measured weight bytes (fp16 model vs deployed W4/W3 with adapters) and checks the
deployed model against the converted one on a tiny batch through the reference path.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (add_tuning_option, dry_run_header, gpu_run_header, interpret_if, load_tuning_file,  # noqa: E402
                      record_choices, save_tuning_file, strategy_env, time_in_graph, write_csv)

# torch, cora and cora_kernels are imported after the arguments: --help stays fast and --dry-run can set
# TRITON_INTERPRET before Triton is imported

IMAGE = (3, 224, 224)
DEVICE = "cuda"  # the timed path always runs on CUDA (a module constant only so its bookkeeping can be dry-run)
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "cifar_shufflenetv2_x0_5")
CIFAR_IMAGE = 32  # cifar_* models run at their own resolution unless --image says otherwise
STRATEGIES = ("chosen", "fused", "dequant")
_ENV = {"chosen": "auto", "fused": "fused", "dequant": "dequant"}  # CORA_STRATEGY per provider
MEM_TARGET = 0.35


DRY_MODELS = ("cifar_resnet20", "mobilenet_v2")  # the interpreter runs a 224-wide ResNet for minutes per pass
DRY_KWARGS = {"mobilenet_v2": {"width_mult": 0.25}}


def float_model(name: str, **kwargs):
    """``name`` with random weights (``cora.experiments.models.build_model``: torchvision names and
    cifar_resnet{6n+2}; ``kwargs`` to the constructor) and mild random BatchNorm statistics."""
    import torch

    from cora.experiments.models import build_model

    torch.manual_seed(0)
    model = build_model(name, weights=False, **kwargs).eval()
    # mild random BatchNorm statistics so that folding is not the identity map in the checks
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.75, 1.25)
                m.bias.normal_(0.0, 0.1)
    return model


def convert_model(model, bits: int, calib):
    import cora

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
    import torch

    from cora.deploy import deploy, weight_bytes
    from cora_kernels.testing import rel_err

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


# ------------------------------------------------------------------------------------------ GPU (and its dry run)
def time_graph(model, x, do_bench, min_rep_ms: float = 100.0):
    """Capture ``model(x)`` in a CUDA graph; (median, p20, p80) ms of its replay and peak memory."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    q = time_in_graph(lambda: model(x), do_bench, min_rep_ms=min_rep_ms)
    return q, torch.cuda.max_memory_allocated()


class hidden_tuning_cache:
    """``with hidden_tuning_cache():`` -- the tuner's cache (``cora_kernels.tuning.TUNING_CACHE``) emptied inside the
    block and its entries put back after it.  For the forced strategies: a deployed conv's prepared launcher
    (``cora_kernels.prepared``) settles on a cached choice without asking the tuner, whatever ``CORA_STRATEGY``
    says, so with the cache in view a "fused only" model would run the layers cached as dequant by dequant."""

    def __enter__(self):
        from cora_kernels.tuning import TUNING_CACHE

        self.cache = TUNING_CACHE
        self.saved = TUNING_CACHE.items()
        TUNING_CACHE.clear()
        return self

    def __exit__(self, *exc) -> None:
        for key, choice in self.saved:
            if key not in self.cache:
                self.cache.put(key, choice)


def settled_picks(model, batch: int) -> list:
    """The strategies the deployed convs' prepared launchers have settled on for inputs of ``batch`` images
    (``cora_kernels.prepared`` plans: private attributes, read defensively; [] where there are none)."""
    out = []
    for m in model.modules():
        plans = getattr(getattr(m, "_prepared", None), "_plans", None) or {}
        for key, plan in plans.items():
            choice = getattr(plan, "choice", None)
            try:
                same_batch = key[0][0] == batch
            except (TypeError, IndexError):
                same_batch = False
            if choice is not None and same_batch:
                out.append(choice.strategy)
    return out


def largest_dense_bytes(model, elem: int = 2) -> int:
    """Bytes of one dense weight plus bias of the model's largest groups == 1 conv in ``elem``-byte floats: what
    one scratch buffer of the dequantize strategy must hold at least."""
    import torch

    sizes = [m.weight.numel() + m.out_channels for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    return max(sizes, default=0) * elem


def bench(args) -> int:
    import torch

    from cora.deploy import deploy, warmup, weight_bytes
    from cora_kernels.scratch import scratch_bytes
    from cora_kernels.testing import rel_err
    from cora_kernels.tuning import tuning_budget

    dry = args.dry_run
    cl = torch.channels_last

    def image_of(name: str) -> tuple[int, int, int]:
        """The input of ``name``: ``--image`` when given, else 32x32 for a CIFAR model and the default size otherwise."""
        side = args.image or (CIFAR_IMAGE if name.startswith("cifar_") and not dry else args.default_image)
        return (3, side, side)

    if dry:
        dev, dtype = torch.device("cpu"), torch.float32
        meta, out_csv = dry_run_header("model_e2e", args.out, f"fp32, {image_of(DRY_MODELS[0])[-1]}px, no graphs")
    else:
        from triton.testing import do_bench

        torch.backends.cudnn.benchmark = True
        dev, dtype = torch.device(DEVICE), torch.float16
        meta, out_csv = gpu_run_header("model_e2e", dev, args.out)
    load_tuning_file(args.tuning)
    t0 = time.time()
    rows, capped = [], False

    def over():
        return args.time_cap is not None and time.time() - t0 > args.time_cap

    def measure(model, x):
        """((median, p20, p80) ms, peak bytes): graph replay on the GPU, one eager call in a dry run."""
        if dry:  # one call, already warmed up: the interpreter is slow
            t = time.perf_counter()
            with torch.no_grad():
                model(x)
            ms = (time.perf_counter() - t) * 1e3
            return [ms] * 3, 0
        return time_graph(model, x, do_bench, args.graph_rep_ms)

    spent = {}  # tuning seconds per model: each model has --tune-seconds in all, over every warm-up it gets

    def budget_for(name):
        return tuning_budget(max(0.0, args.tune_seconds - spent.get(name, 0.0)))

    # every model converted and deployed first (small on a GPU), then batch by batch across the models: a time cap
    # keeps every model's first batches rather than one model's every batch
    built = {}
    for name in args.models:
        if over():
            capped = True
            break
        t_model = time.time()
        kwargs = DRY_KWARGS.get(name, {}) if dry else {}
        if kwargs:
            print(f"# {name}: {kwargs} (dry run: a narrow model the interpreter runs in seconds)")
        fm = float_model(name, **kwargs)
        image = image_of(name)
        fp16_bytes = weight_bytes(copy.deepcopy(fm).half())["total"]
        one_buffer = largest_dense_bytes(fm, torch.empty((), dtype=dtype).element_size())
        m16 = copy.deepcopy(fm).to(dtype).to(dev).to(memory_format=cl)
        providers = {"cudnn": (m16, weight_bytes(m16), float("nan"), None)}
        calib = torch.randn(8, *image)
        for bits in args.bits:
            t_conv = time.time()
            conv = convert_model(fm.to(dev), bits, calib).to(dev)
            dep = deploy(conv, backend="triton", weights="packed").to(dev)
            convert_s = time.time() - t_conv
            # the deployed model (one op per conv) against the converted model (op per conv + torch BN, activations,
            # adds), batch 1; what this tunes counts in the model's tuning time
            x = torch.randn(1, *image, device=dev, dtype=dtype).contiguous(memory_format=cl)
            with torch.no_grad(), strategy_env("auto"), budget_for(name) as budget:
                err = rel_err(dep(x).float(), conv(x).float())
            spent[name] = spent.get(name, 0.0) + budget.spent
            del conv
            print(f"# {name} W{bits}: converted and deployed in {convert_s:.1f}s, deployed vs converted rel err "
                  f"{err:.1e} ({time.time() - t_model:.0f}s so far)", flush=True)
            for strat in args.strategies:
                providers[f"cora_w{bits}_{strat}"] = (dep, weight_bytes(dep), err, strat)
        fm.cpu()
        built[name] = (providers, fp16_bytes, one_buffer, image)

    print(f"{'model':<15}{'provider':<17}{'batch':>6}{'median ms':>11}{'p20':>9}{'p80':>9}{'img/s':>9}"
          f"{'weights MiB':>12}{'scratch':>8}{'mem x':>7}{'peak MiB':>9}{'tune s':>7}{'fused/deq':>10}{'rel err':>9}")
    for batch in args.batches:
        for name, (providers, fp16_bytes, one_buffer, image) in built.items():
            for prov, (model, wb, err, strat) in providers.items():
                if over():
                    capped = True
                    break
                tune_s, n_fused, n_deq = 0.0, 0, 0
                t_row = time.time()
                try:
                    x = torch.randn(batch, *image, device=dev, dtype=dtype).contiguous(memory_format=cl)
                    if strat is None:
                        (med, p20, p80), peak = measure(model, x)
                    else:
                        # CORA_STRATEGY is read at call time: warm-up (tuning) and capture both under it; .to() drops
                        # the convs' prepared launchers, whose plans keep the choice made under another strategy;
                        # a forced strategy runs with the tuner's cache out of view (hidden_tuning_cache)
                        model.to(dev)
                        forced = strat != "chosen"
                        with strategy_env(_ENV[strat]), (hidden_tuning_cache() if forced else contextlib.nullcontext()):
                            with budget_for(name) as budget:
                                try:
                                    warmup(model, [batch], image, dev, dtype, memory_format=cl)
                                finally:
                                    tune_s = budget.spent
                                    spent[name] = spent.get(name, 0.0) + tune_s
                            # the picks of one forward pass: plans settled on a choice, plus the calls that ask
                            with torch.no_grad(), record_choices() as seen:
                                model(x)
                            picks = settled_picks(model, batch) + [c.strategy for c in seen]
                            n_fused, n_deq = picks.count("fused"), picks.count("dequant")
                            (med, p20, p80), peak = measure(model, x)
                except Exception as e:  # keep going; record the failure
                    print(f"  {name} {prov} batch {batch} failed: {type(e).__name__}: {e}", flush=True)
                    med = p20 = p80 = float("nan")
                    peak = 0
                scratch = scratch_bytes(dev) if strat is not None else 0
                total = wb["total"] + scratch
                row = dict(model=name, provider=prov, strategy=strat or "", batch=batch, image=image[-1],
                           median_ms=med, p20_ms=p20, p80_ms=p80, images_per_s=batch / (med * 1e-3),
                           weight_bytes=wb["total"], scratch_bytes=scratch, fp16_bytes=fp16_bytes,
                           mem_ratio=total / fp16_bytes,
                           mem_ratio_one_buffer=(wb["total"] + (one_buffer if strat else 0)) / fp16_bytes,
                           peak_mem_bytes=peak, tune_s=tune_s, model_tune_s=spent.get(name, 0.0),
                           tune_budget_s=args.tune_seconds, n_fused=n_fused, n_dequant=n_deq,
                           rel_err_vs_converted=err, row_s=time.time() - t_row, dry_run=dry,
                           **{f"bytes_{k}": v for k, v in wb.items() if k != "total"}, **meta)
                rows.append(row)
                save_tuning_file(args.tuning)
                write_csv(rows, out_csv)  # after every row: a run stopped by a time limit keeps its rows
                print(f"{name:<15}{prov:<17}{batch:>6}{med:>11.3f}{p20:>9.3f}{p80:>9.3f}{row['images_per_s']:>9.0f}"
                      f"{wb['total'] / 2**20:>12.2f}{scratch / 2**20:>8.2f}{row['mem_ratio']:>7.3f}"
                      f"{peak / 2**20:>9.0f}{tune_s:>7.1f}{f'{n_fused}/{n_deq}':>10}{err:>9.1e}", flush=True)
                if not dry:
                    torch.cuda.empty_cache()
            if capped:
                break
        if capped:
            break
    for name in built:
        print(f"# {name}: tuning {spent.get(name, 0.0):.1f}s of a {args.tune_seconds:.0f}s budget", flush=True)
    write_csv(rows, out_csv)
    if capped:
        print(f"# time cap of {args.time_cap:.0f}s reached: {len(rows)} rows measured")
    print(f"# CSV: {out_csv} ({len(rows)} rows) in {time.time() - t0:.0f}s")
    how = "eager on the CPU, interpreter: not a measurement" if dry else "CUDA graphs, fp16 channels_last"
    print(f"\nsummary ({how}; x = cuDNN fp16 latency / CoRa latency; fused/deq = the picks of one forward pass):")
    provs = [f"cora_w{b}_{s}" for b in args.bits for s in args.strategies]
    print(f"{'model':<15}{'batch':>6}{'cudnn ms':>10}" + "".join(f"{p + ' ms':>22}{'x':>6}" for p in provs)
          + f"{'picks (chosen)':>16}")
    for name in args.models:
        for batch in args.batches:
            sel = {r["provider"]: r for r in rows if r["model"] == name and r["batch"] == batch}
            if "cudnn" not in sel:
                continue
            base = sel["cudnn"]["median_ms"]
            line = f"{name:<15}{batch:>6}{base:>10.3f}"
            for p in provs:
                t = sel[p]["median_ms"] if p in sel else float("nan")
                line += f"{t:>22.3f}{base / t if t == t and t else float('nan'):>6.2f}"
            ch = sel.get(f"cora_w{args.bits[0]}_chosen")
            picks = f"{ch['n_fused']}/{ch['n_dequant']}" if ch else "-"
            line += f"{picks:>16}"
            print(line)
    print("\nmemory (bytes held for the weights; target: CoRa <= 0.35 of fp16):")
    for name in args.models:
        sel = [r for r in rows if r["model"] == name and r["strategy"]]
        if not sel:
            continue
        last = sel[-1]
        print(f"{name:<15} fp16 {last['fp16_bytes'] / 2**20:.2f} MiB, CoRa packed {last['weight_bytes'] / 2**20:.2f} MiB"
              f" + scratch held {max(r['scratch_bytes'] for r in sel) / 2**20:.2f} MiB -> "
              f"{max(r['mem_ratio'] for r in sel):.3f} of fp16 (one buffer of the largest layer: "
              f"{last['mem_ratio_one_buffer']:.3f}); tuning {last['model_tune_s']:.1f}s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"torchvision names or cifar_resnet{{6n+2}} (default {' '.join(MODELS)}; --dry-run: "
                         f"{' '.join(DRY_MODELS)}, mobilenet_v2 at width_mult 0.25)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 64 256 (--dry-run: 1)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--strategies", nargs="+", default=None, choices=STRATEGIES,
                    help="CoRa providers: chosen (the tuner's pick per conv), fused, dequant (forced by CORA_STRATEGY); "
                         "default chosen fused (--dry-run: all three)")
    ap.add_argument("--tune-seconds", type=float, default=None,
                    help="tuning budget per model (default: CORA_TUNE_SECONDS, else 60)")
    ap.add_argument("--time-cap", type=float, default=None, help="stop starting new rows after this many seconds")
    ap.add_argument("--graph-rep-ms", type=float, default=100.0, help="at least this many ms of graph replays")
    ap.add_argument("--image", type=int, default=None, help="input size (default 224, cifar_* models 32; --dry-run: 16)")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/model_e2e_<device>.csv; "
                                                "--dry-run: model_e2e_dryrun.csv in the temp folder)")
    add_tuning_option(ap)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, Triton interpreter, tiny input, batch 1, no graphs: exercise the code paths")
    args = ap.parse_args(argv)
    args.batches = args.batches or ([1] if args.dry_run else [1, 8, 64, 256])
    args.models = args.models or list(DRY_MODELS if args.dry_run else MODELS)
    args.strategies = args.strategies or (list(STRATEGIES) if args.dry_run else ["chosen", "fused"])
    args.default_image = 16 if args.dry_run else IMAGE[-1]
    interpret_if(args.dry_run)
    import torch

    if args.tune_seconds is None:
        from cora_kernels.environment import tune_seconds

        args.tune_seconds = tune_seconds()
    if args.dry_run:
        return bench(args)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: not timing anything; reporting weight bytes and a reference-path correctness check "
              "(--dry-run runs the benchmark's own code paths).")
        return cpu_report(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
