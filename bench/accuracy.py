"""CIFAR-10 accuracy table: RTN, the paper's recipe, searched / uniform ranks, adapter tuning, our defaults (budget 5%).

    python bench/accuracy.py                       # ResNet-20 and -32, W4 and W3, all rows (~30 min on 2 cores)
    python bench/accuracy.py --models cifar_resnet20 --bits 3 --rows ours

Writes ``bench/results/accuracy.csv`` (one row per run, with the machine, versions and commit) and
prints a Markdown table. Accuracies are top-1 on the 10,000 shared test images unless
``--eval-split holdout`` (the calibration images held back from the search: 3,400 at the default 1,600; use that split,
never the test set, to choose settings).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import git_commit  # noqa: E402
from cora import CoRaConfig  # noqa: E402
from cora.experiments.pipeline import quantize_and_evaluate  # noqa: E402

ROWS = {
    # name: (description, config factory(bits, common keyword arguments))
    "rtn": ("RTN (per-channel min-max, nearest)",
            lambda b, a: CoRaConfig(bits=b, method="none", rounding="nearest", range_method="minmax", **a)),
    "rtn_paper": ("RTN (paper quantizer: per-tensor, mean±5std)", lambda b, a: CoRaConfig.paper(b, method="none", **a)),
    "base": ("our base alone (MSE ranges + GPTQ, no adapters)", lambda b, a: CoRaConfig(bits=b, method="none", **a)),
    "paper": ("CoRa, paper settings (per-tensor k=5, weight SVD, CE + penalty, searched ranks)",
              lambda b, a: CoRaConfig.paper(b, **a)),
    "search_weight_svd": ("our base + ranks searched by KL, paper's weight-space SVD adapters, no tuning",
                          lambda b, a: CoRaConfig(bits=b, method="search", loss="kl", factorization="weight",
                                                  tune_iterations=0, **a)),
    "search": ("our base + ranks searched by KL (no labels), no tuning",
               lambda b, a: CoRaConfig(bits=b, method="search", loss="kl", tune_iterations=0, **a)),
    "uniform": ("our base + uniform ranks, no tuning (the defaults without labels)",
                lambda b, a: CoRaConfig(bits=b, method="uniform", tune_iterations=0, **a)),
    "tuned_kl": ("our base + uniform ranks + adapters tuned by KL to the float logits (no labels)",
                 lambda b, a: CoRaConfig(bits=b, method="uniform", tune_loss="kl", **a)),
    "tuned_ce_uniform": ("our base + uniform ranks + adapters tuned by CE on the calibration labels",
                         lambda b, a: CoRaConfig(bits=b, method="uniform", tune_loss="ce", **a)),
    "ours": ("our defaults with labels: our base + ranks searched by CE + adapters tuned by CE",
             lambda b, a: CoRaConfig(bits=b, **a)),
    # The defaults on a W8 base (almost no quantization loss to reclaim): what the labelled search and
    # tuning add by fitting the calibration images' domain. Runs once per model, whatever --bits says.
    "control_w8": ("control: the defaults on a W8 base (domain fit, not quantization recovery)",
                   lambda b, a: CoRaConfig(bits=8, **a)),
    "control_w8_uniform": ("control: W8 base + uniform ranks + CE tuning",
                           lambda b, a: CoRaConfig(bits=8, method="uniform", tune_loss="ce", **a)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet32"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-split", choices=("test", "holdout"), default="test")
    p.add_argument("--shared", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "accuracy.csv"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(budget=args.budget, seed=args.seed, progress=False)
    env = dict(
        machine=f"{platform.machine()} {os.cpu_count()} cpus",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        commit=git_commit(),
    )
    out_rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["model", "bits", "row", "description", "split", "acc", "float_acc", "adapter_fraction", "equiv_bits", "iterations",
              "calib_images", "search_seconds", "tune_loss", "tune_iterations", "tune_seconds", "quantize_seconds", "budget",
              "seed",
              "ranks", "machine", "threads", "torch", "commit"]
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for model in args.models:
            float_acc = None
            for bits in args.bits:
                for row in args.rows:
                    if row.startswith("control_w8") and bits != args.bits[0]:
                        continue  # bit-width independent: once per model
                    desc, make = ROWS[row]
                    cfg = make(bits, common)
                    t = time.perf_counter()
                    _, res = quantize_and_evaluate(model, cfg, shared=args.shared, eval_split=args.eval_split,
                                                   with_float=float_acc is None, with_rtn=False)
                    float_acc = res.get("float_acc", float_acc)
                    rec = dict(model=model, bits=cfg.bits, row=row, description=desc, split=args.eval_split,
                               acc=round(res["acc"], 2),
                               float_acc=round(float_acc, 2), adapter_fraction=round(res["adapter_fraction"], 4),
                               equiv_bits=round(res["equiv_bits"], 3), iterations=res["iterations"],
                               calib_images=res["calib_images"],
                               search_seconds=round(res["search_seconds"], 1), tune_loss=res["tune_loss"] or "",
                               tune_iterations=res["tune_iterations"], tune_seconds=round(res["tune_seconds"], 1),
                               quantize_seconds=round(res["quantize_seconds"], 1),
                               budget=args.budget, seed=args.seed, ranks=json.dumps(res["ranks"]), **env)
                    writer.writerow(rec)
                    fh.flush()
                    out_rows.append(rec)
                    print(f"{model} W{cfg.bits} {row:16s} acc {rec['acc']:6.2f}  frac {rec['adapter_fraction']:.4f}  "
                          f"bits {rec['equiv_bits']:.3f}  search {rec['search_seconds']:5.1f}s  "
                          f"all {rec['quantize_seconds']:5.1f}s "
                          f"[{time.perf_counter() - t:.0f}s]", flush=True)
    print(f"\nwrote {out}\n")
    print("| model | bits | row | top-1 % | adapter fraction | equiv. bits | search it. | tuning it. | images | search s "
          "| tuning s | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        print(f"| {r['model']} (float {r['float_acc']}) | W{r['bits']} | {r['description']} | {r['acc']:.2f} | "
              f"{r['adapter_fraction']:.4f} | "
              f"{r['equiv_bits']:.3f} | {r['iterations']} | {r['tune_iterations']} | {r['calib_images']} | "
              f"{r['search_seconds']} | "
              f"{r['tune_seconds']} | {r['quantize_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
