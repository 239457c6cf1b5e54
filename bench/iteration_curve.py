"""Held-back accuracy against the adapter-tuning (and rank-search) iterations: what the defaults are chosen on.

    PYTHONPATH=. python bench/iteration_curve.py --bits 4 --tune 0 60 125 250 --search 250

Converts ResNet-20 with the labelled defaults except the counts under study: for each search count, one
conversion without tuning; then, from a copy of it, the CE adapter tuning at each tuning count (its own
cosine schedule over that many steps), each scored on the 3,400 held-back calibration images (never the
test set; ``--test`` adds each point's test accuracy, for the record). Prints one line per point and,
with ``--csv``, appends them to a CSV. One seed: the spread between counts is the comparison (same
ranks, same starting adapters); single-run noise of a held-back accuracy is not measured here.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cora import CoRaConfig, convert  # noqa: E402
from cora.calibration import Objective  # noqa: E402
from cora.experiments.pipeline import calibration_data, evaluate_model, evaluation_data, load_float_model  # noqa: E402
from cora.tune import tune_adapters  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--search", type=int, nargs="+", default=[250])
    p.add_argument("--tune", type=int, nargs="+", default=[0, 60, 125, 250])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--test", action="store_true",
                   help="also score each point on the 10,000 test images (reported, never used to choose)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_float_model(args.model)
    images, labels = calibration_data(args.model, 1600)
    held = evaluation_data(args.model, split="holdout", calib_images=1600)
    test = evaluation_data(args.model, split="test") if args.test else None
    cpu = torch.device("cpu")
    rows = []
    for search in args.search:
        t = time.process_time()
        base = convert(model, (images, labels), CoRaConfig(bits=args.bits, iterations=search, tune_iterations=0, progress=False))
        search_cpu = time.process_time() - t
        for tune in args.tune:
            q = copy.deepcopy(base)
            t = time.process_time()
            if tune:
                tune_adapters(q, images, Objective("ce", labels=labels), iterations=tune, lr=1e-3, batch_size=64, seed=0)
            row = dict(model=args.model, bits=args.bits, search_iters=search, tune_iters=tune,
                       holdout_acc=round(evaluate_model(q, held, cpu), 2), held_images=len(held),
                       convert_cpu_s=round(search_cpu, 1), tune_cpu_s=round(time.process_time() - t, 1),
                       test_acc=round(evaluate_model(q, test, cpu), 2) if test is not None else "",
                       load=round(os.getloadavg()[0], 2))
            print(row, flush=True)
            rows.append(row)
    if args.csv and rows:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
