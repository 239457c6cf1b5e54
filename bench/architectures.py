"""Beyond the CIFAR ResNets: convert, deploy and measure real architectures (random weights).

For each architecture, in its own process (so that the peak memory is its own): the torchvision
model with random weights, BatchNorm statistics fitted on random images (eval mode), converted with
the label-free defaults on ``--calib`` random images, then deployed. Columns of the CSV:

``arch, size, calib, convs, quantized_convs, with_adapter, fused_path, grouped_path, deployed_convs, linears,
adapter_fraction, equiv_bits, seconds, peak_rss_mb, err_cora, err_rtn, deploy_err, threads, torch, commit``

- ``quantized_convs`` / ``with_adapter``: convs replaced by ``CoRaConv2d``, and those with a rank > 0
  adapter; ``fused_path`` / ``grouped_path``: those the fused implicit-GEMM kernel runs on CUDA
  (``groups == 1``) and those the direct grouped kernel runs (depthwise and grouped convs).
- ``deployed_convs``: ``DeployedConv`` modules after :func:`cora.deploy` (a conv with its BatchNorm
  folded and/or ReLU / residual add fused into one launch).
- ``seconds``: the conversion's wall-clock; ``peak_rss_mb``: the process's peak resident memory
  (model, conversion and evaluation together; the baseline of an idle ``import cora`` is about 400 MB).
- ``err_cora`` / ``err_rtn``: relative output error ``||y - y_float|| / ||y_float||`` on 8 other random
  images, of the converted model and of a plain round-to-nearest control (min-max ranges, no adapters)
  at the same bits. Random weights: this is a stand-in for accuracy, not accuracy.
- ``deploy_err``: the deployed model against the converted one (reference path on the CPU).

    python bench/architectures.py                                  # the table in bench/README.md
    python bench/architectures.py --archs resnet50 vgg11_bn --size 224 --calib 32 --out bench/results/arch_224.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cora, not an installed one

ARCHS = [
    "resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "regnet_y_400mf", "convnext_tiny", "densenet121", "shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5",
    "googlenet", "vgg11_bn", "alexnet",
]
EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
FIELDS = ["arch", "size", "calib", "convs", "quantized_convs", "with_adapter", "fused_path", "grouped_path", "deployed_convs",
          "linears",
          "adapter_fraction", "equiv_bits", "seconds", "peak_rss_mb", "err_cora", "err_rtn", "deploy_err",
          "threads", "torch", "commit"]


def _rel(y, ref) -> float:
    return float((y - ref).norm() / ref.norm())


def measure(arch: str, size: int, calib: int, bits: int) -> dict:
    """One architecture, in this process (see the module docstring)."""
    import torch

    import cora
    from cora.deploy import DeployedConv
    from _harness import random_model

    model, images, probe = random_model(arch, size, calib, **EXTRA_KWARGS.get(arch, {}))
    with torch.no_grad():
        y_float = model(probe)
    t0 = time.perf_counter()
    q = cora.convert(model, images, cora.CoRaConfig(bits=bits, calib_images=calib, stats_images=calib, progress=False))
    seconds = time.perf_counter() - t0
    rtn = cora.convert(model, images, cora.CoRaConfig(bits=bits, method="none", rounding="nearest", range_method="minmax",
                                                      calib_images=calib, progress=False))
    layers = [m for m in q.modules() if isinstance(m, cora.CoRaConv2d)]
    with torch.no_grad():
        y_q, y_rtn = q(probe), rtn(probe)
        deployed = cora.deploy(q, weights="packed")  # the op's reference path, as the columns say
        y_dep = deployed(probe)
    rep = q.cora_report
    return {
        "arch": arch, "size": size, "calib": calib,
        "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
        "quantized_convs": len(layers),
        "with_adapter": sum(m.rank > 0 for m in layers),
        "fused_path": sum(m.groups == 1 for m in layers),
        "grouped_path": sum(m.groups > 1 for m in layers),
        "deployed_convs": sum(isinstance(m, DeployedConv) for m in deployed.modules()),
        "linears": sum(isinstance(m, cora.QuantLinear) for m in q.modules()),
        "adapter_fraction": round(rep.adapter_fraction, 4), "equiv_bits": round(rep.equiv_bits, 3),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "err_cora": round(_rel(y_q, y_float), 4), "err_rtn": round(_rel(y_rtn, y_float), 4),
        "deploy_err": f"{_rel(y_dep, y_q):.1e}",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--calib", type=int, default=32, help="random calibration images (default 32)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", default="bench/results/architectures.csv")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process: print one JSON row
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.archs[0], args.size, args.calib, args.bits)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _harness import git_commit

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for arch in args.archs:
            cmd = [sys.executable, __file__, "--one", "--archs", arch, "--size", str(args.size),
                   "--calib", str(args.calib), "--bits", str(args.bits)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if res.returncode != 0:
                print(f"{arch}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["commit"] = git_commit()
            writer.writerow(row)
            f.flush()
            print(", ".join(f"{k}={row[k]}" for k in FIELDS[:17]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
