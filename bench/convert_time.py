"""Conversion time against depth: CIFAR ResNet-20, -32, -44, -56, labelled and label-free defaults.

    PYTHONPATH=. python bench/convert_time.py --threads 1 --iters 25 --tune-iters 25

Times ``cora.convert`` alone (no evaluation) on the 1,600 calibration images, per depth and per default
(labelled W4: searched ranks and CE tuning; label-free W3: uniform ranks and the block reconstruction),
wall and process CPU seconds and each phase's wall seconds (``ConversionReport.phase_seconds``). Every
depth uses the architecture's random initial weights (seeded): ResNet-44 / 56 have no pretrained
checkpoint here and the cost does not depend on the values. ``--iters`` / ``--tune-iters`` lower the
search and tuning step counts (every step costs the same at any count, so the shape of the curve is
kept; the totals at the default counts are larger). Writes ``bench/results/convert_time.csv`` (one row
per run, appended) and, with ``--plot``, ``bench/results/convert_time.png`` from the CSV's rows.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cora import CoRaConfig, convert  # noqa: E402
from cora.experiments.models import build_model  # noqa: E402
from cora.experiments.pipeline import calibration_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"labelled": (4, True), "label-free": (3, False)}  # name -> (bits, labels)


def run(depth: int, default: str, iters: int | None, tune_iters: int | None) -> dict:
    bits, labels = DEFAULTS[default]
    torch.manual_seed(0)
    model = build_model(f"cifar_resnet{depth}", weights=False).eval()
    images, y = calibration_data("cifar_resnet20", 1600)
    counts = {k: v for k, v in (("iterations", iters), ("tune_iterations", tune_iters)) if v is not None}
    config = CoRaConfig(bits=bits, progress=False, **counts)
    wall, cpu = time.perf_counter(), time.process_time()
    q = convert(model, (images, y) if labels else images, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rep = q.cora_report
    row = dict(depth=depth, blocks=(depth - 2) // 2, default=default, bits=bits, threads=torch.get_num_threads(),
               search_iters=rep.iterations, tune_loss=rep.tune_loss, tune_iters=rep.tune_iterations,
               wall_s=round(wall, 1), cpu_s=round(cpu, 1), load=round(os.getloadavg()[0], 2),
               **{f"{k}_s": round(v, 1) for k, v in rep.phase_seconds.items()})
    print(row, flush=True)
    return row


def plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 4))
    for default in DEFAULTS:
        pts = sorted((int(r["depth"]), float(r["cpu_s"])) for r in rows if r["default"] == default)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{default} (CPU s)")
    ax.set_xlabel("ResNet depth (CIFAR, 3 stages of (depth-2)/6 blocks)")
    ax.set_ylabel("convert CPU seconds (1 thread)")
    search = sorted({r["search_iters"] for r in rows if r["default"] == "labelled"})
    ax.set_title(f"convert against depth, random weights; labelled: {'/'.join(search)} search steps and as many "
                 f"CE steps; label-free: block reconstruction (steps in the CSV)", fontsize=7)
    ax.set_xticks([20, 32, 44, 56])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[20, 32, 44, 56])
    p.add_argument("--defaults", nargs="+", choices=list(DEFAULTS), default=list(DEFAULTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--tune-iters", type=int, default=None)
    p.add_argument("--csv", default=str(RESULTS / "convert_time.csv"))
    p.add_argument("--plot", action="store_true", help="draw bench/results/convert_time.png from the CSV")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    csv_path = Path(args.csv)
    if not args.plot_only:
        for default in args.defaults:
            for depth in args.depths:
                row = run(depth, default, args.iters, args.tune_iters)
                new = not csv_path.exists()
                csv_path.parent.mkdir(parents=True, exist_ok=True)
                with open(csv_path, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
                    if new:
                        w.writeheader()
                    w.writerow(row)
    if args.plot or args.plot_only:
        plot(csv_path, RESULTS / "convert_time.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
