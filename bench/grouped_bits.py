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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--grouped-bits", type=int, default=8)
    p.add_argument("--out", default="bench/results/grouped_bits.csv")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
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
