"""What widening the grouped / depthwise convs costs (``CoRaConfig(grouped_bits=...)``), random weights.

Grouped and depthwise convs get no adapter (``bench/README.md``, "Depthwise and grouped convs" says
why); the fix left for their error is a wider width. For each torchvision architecture (random
weights, BatchNorm statistics fitted on random images, eval mode, ``--size`` inputs), a plain
round-to-nearest conversion (min-max ranges, no adapters) at ``--bits``, once as it is and once with
``grouped_bits=--grouped-bits``. Columns of the CSV:

``arch, grouped_convs, grouped_weight_share, bits, grouped_bits, equiv_bits, equiv_bits_widened,
err, err_widened, commit``

- ``grouped_weight_share``: weights of the ``groups > 1`` convs over every Conv2d and Linear weight.
- ``equiv_bits`` / ``equiv_bits_widened``: the reports' equivalent bits per weight (codes, scales and
  zero points of every layer).
- ``err`` / ``err_widened``: ``||y - y_float|| / ||y_float||`` on 8 other random images. Random weights:
  a stand-in, and an uninformative one for these models (see the README section).

    python bench/grouped_bits.py --out bench/results/grouped_bits.csv

**A trained model** (``--model cifar_shufflenetv2_x0_5``): what quantizing the depthwise convs costs in
accuracy, measured on the calibration images held back from the search (``5000 - 1600``, never the test
set). Only the ``groups > 1`` convs are converted (every other layer skipped, so stays float), round to
nearest, no adapters, at each of ``--widths`` with each of ``--variants`` (granularity/range: ``channel/minmax``,
``channel/mse``, ``tensor/mse``, ...). Columns of its CSV (default ``results/grouped_bits_<model>.csv``):

``model, grouped_convs, grouped_weight_share, width, granularity, range, acc, float_acc, eval_images, commit``

    python bench/grouped_bits.py --model cifar_shufflenetv2_x0_5
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cora, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))

ARCHS = ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "shufflenet_v2_x0_5", "regnet_y_400mf"]
FIELDS = ["arch", "grouped_convs", "grouped_weight_share", "bits", "grouped_bits", "equiv_bits", "equiv_bits_widened",
          "err", "err_widened", "commit"]


def measure(arch: str, size: int, bits: int, grouped_bits: int, calib: int = 32) -> dict:
    """One architecture (see the module docstring)."""
    import torch

    import cora
    from _harness import random_model

    model, images, probe = random_model(arch, size, calib)
    with torch.no_grad():
        y = model(probe)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    row = {"arch": arch, "grouped_convs": len(grouped), "bits": bits, "grouped_bits": grouped_bits,
           "grouped_weight_share": round(sum(m.weight.numel() for m in grouped) / sum(w.numel() for w in weights), 4)}
    rtn = dict(bits=bits, method="none", rounding="nearest", range_method="minmax", calib_images=calib, progress=False)
    for suffix, extra in (("", {}), ("_widened", {"grouped_bits": grouped_bits})):
        q = cora.convert(model, images, cora.CoRaConfig(**rtn, **extra))
        with torch.no_grad():
            row["err" + suffix] = round(float((q(probe) - y).norm() / y.norm()), 4)
        row["equiv_bits" + suffix] = round(q.cora_report.equiv_bits, 3)
    return row


REAL_FIELDS = ["model", "grouped_convs", "grouped_weight_share", "width", "granularity", "range", "acc", "float_acc",
               "eval_images", "commit"]
VARIANTS = ("channel/minmax", "channel/mse", "tensor/mse")


def depthwise_only(name: str, widths, variants, shared=None, calib: int = 1600):
    """Rows of the trained-model study (see the module docstring), one per width and variant, as they finish."""
    import torch

    import cora
    from cora.experiments.data import evaluate
    from cora.experiments.models import build_model
    from cora.experiments.pipeline import calibration_data, evaluation_data

    model = build_model(name, shared=shared).eval()
    images, _ = calibration_data(name, calib, shared)
    held_back = evaluation_data(name, shared, None, "holdout", calib_images=calib)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    grouped = [n for n, m in convs.items() if getattr(m, "groups", 1) > 1]
    share = sum(convs[n].weight.numel() for n in grouped) / sum(m.weight.numel() for m in convs.values())
    base = {"model": name, "grouped_convs": len(grouped), "grouped_weight_share": round(share, 4),
            "float_acc": round(evaluate(model, held_back), 2), "eval_images": len(held_back)}
    skip = [n for n in convs if n not in grouped]
    for width in widths:
        for variant in variants:
            granularity, ranges = variant.split("/")
            cfg = cora.CoRaConfig(bits=width, method="none", rounding="nearest", range_method=ranges,
                                  granularity=granularity, calib_images=calib, skip=skip, progress=False)
            q = cora.convert(model, images, cfg)
            yield {**base, "width": width, "granularity": granularity, "range": ranges,
                   "acc": round(evaluate(q, held_back), 2)}


def _real_main(args) -> int:
    from _harness import git_commit

    out = Path(args.out or f"bench/results/grouped_bits_{args.model}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REAL_FIELDS)
        writer.writeheader()
        for row in depthwise_only(args.model, args.widths, args.variants, args.shared):
            writer.writerow({**row, "commit": git_commit()})
            f.flush()
            print(", ".join(f"{k}={row[k]}" for k in REAL_FIELDS[:-1]), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--grouped-bits", type=int, default=8)
    p.add_argument("--out", default=None, help="CSV (default results/grouped_bits.csv; with --model "
                   "results/grouped_bits_<model>.csv)")
    p.add_argument("--model", default=None, help="a trained model by name: the held-back accuracy study instead")
    p.add_argument("--widths", nargs="+", type=int, default=[2, 3, 4, 8], help="--model: depthwise widths")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="--model: granularity/range pairs")
    p.add_argument("--shared", default=None, help="shared data folder (default: $CORA_SHARED or ../shared)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.model:
        return _real_main(args)
    args.out = args.out or "bench/results/grouped_bits.csv"
    from _harness import git_commit

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for arch in args.archs:
            row = {**measure(arch, args.size, args.bits, args.grouped_bits), "commit": git_commit()}
            writer.writerow(row)
            print(", ".join(f"{k}={row[k]}" for k in FIELDS[:-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
