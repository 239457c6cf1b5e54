"""The command line: ``cora quantize ...`` and ``cora eval ...`` (also ``python -m cora ...``).

Every failure the user can fix is one ``cora: error: ...`` line on stderr and exit status 2.
The runs themselves live in :mod:`cora.experiments.pipeline`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, no usage dump
        raise _CliError(message)


class _CliError(Exception):
    pass


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _method(text: str) -> str:
    from .config import DEPRECATED_METHODS, METHODS

    if text in DEPRECATED_METHODS:
        new = DEPRECATED_METHODS[text]
        print(f"cora: warning: --method {text} is deprecated; it is now called --method {new}", file=sys.stderr)
        return new
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(METHODS)})")
    return text


def build_parser() -> argparse.ArgumentParser:
    from .config import FACTORIZATIONS, LOSSES, METHODS, RANGES, ROUNDINGS, SUPPORTED_BITS

    p = _Parser(prog="python -m cora", description="CoRa: low-bit ConvNets with searched low-rank residual adapters.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--shared", default=None,
                        help="folder with data/ and models/ (default: $CORA_SHARED or ../shared beside the checkout)")
    common.add_argument("--data", default=None, help="ImageNet-style image folder (for non-CIFAR models)")
    common.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    common.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    common.add_argument("--eval-split", choices=("test", "holdout"), default="test",
                        help="evaluate on the test set (default) or on the calibration images held back from the search")

    q = sub.add_parser("quantize", parents=[common], help="quantize a model and report accuracy")
    q.add_argument("model", help="cifar_resnet20, cifar_resnet32, ... (depth 6n+2) or a torchvision name (resnet18, ...)")
    q.add_argument("--weights", default=None, help="checkpoint of the float model (default: the shared one)")
    q.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    q.add_argument("--budget", type=_budget, default=0.05, help="adapter parameters as a fraction of the conv parameters")
    q.add_argument("--method", type=_method, default=None, metavar="{" + ",".join(METHODS) + "}",
                   help="search: searched ranks; uniform: same fraction of the full rank per layer; none: no adapters; "
                        "auto (default): search with labelled calibration data, else uniform (--paper: search). "
                        "The old names cora / heuristic / rtn still work")
    q.add_argument("--paper", action="store_true",
                   help="the published recipe (per-tensor mean±5std, nearest, weight SVD, CE + penalty)")
    q.add_argument("--per-tensor", action="store_true", help="one scale per tensor instead of per output channel")
    q.add_argument("--loss", choices=("auto",) + LOSSES, default=None,
                   help="search loss (default auto: ce with labels, else kl; paper: ce)")
    q.add_argument("--factorization", choices=FACTORIZATIONS, default=None)
    q.add_argument("--rounding", choices=ROUNDINGS, default=None)
    q.add_argument("--range", dest="range_method", choices=RANGES, default=None)
    q.add_argument("--calib", type=_positive_int, default=1600, help="calibration images (default 1600)")
    q.add_argument("--iters", type=_positive_int, default=250, help="search iterations (default 250)")
    q.add_argument("--tune-iters", type=int, default=None,
                   help="adapter tuning iterations after the ranks are fixed (default 250; 0: off; --paper: 0)")
    q.add_argument("--tune-loss", choices=("auto",) + LOSSES, default=None,
                   help="adapter tuning loss (default auto: ce with the calibration labels, no tuning without)")
    q.add_argument("--bn-reestimate", action="store_true",
                   help="re-estimate BatchNorm statistics on the calibration images (default: keep the float model's)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--skip", action="append", default=[], help="layer name or pattern to keep in float (repeatable)")
    q.add_argument("--out", default=None, help="write the quantized model to this checkpoint (safetensors)")
    q.add_argument("--no-rtn", action="store_true", help="skip the RTN baseline")
    q.add_argument("--quiet", action="store_true", help="no progress bars or lines")

    e = sub.add_parser("eval", parents=[common], help="evaluate a float model or a saved CoRa checkpoint")
    e.add_argument("model", nargs="?", default=None, help="float model name (omit with --checkpoint)")
    e.add_argument("--weights", default=None)
    e.add_argument("--checkpoint", default=None, help="a checkpoint written by 'quantize --out'")
    return p


def _config(args):
    from .config import CoRaConfig

    overrides = dict(
        budget=args.budget,
        calib_images=args.calib,
        iterations=args.iters,
        seed=args.seed,
        skip=tuple(args.skip),
        progress=not args.quiet,
    )
    if args.tune_iters is not None:
        if args.tune_iters < 0:
            raise _CliError(f"--tune-iters must be >= 0, got {args.tune_iters}")
        overrides["tune_iterations"] = args.tune_iters
    for key in ("method", "loss", "factorization", "rounding", "range_method", "tune_loss"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.per_tensor:
        overrides["granularity"] = "tensor"
    if args.bn_reestimate:
        overrides["bn_reestimate"] = True
    return CoRaConfig.paper(args.bits, **overrides) if args.paper else CoRaConfig(bits=args.bits, **overrides)


def _table(res: dict) -> str:
    rows = [("float accuracy", f"{res['float_acc']:.2f} %")]
    if "rtn_acc" in res:
        rows.append((f"RTN W{res['bits']} accuracy", f"{res['rtn_acc']:.2f} %"))
    rows += [
        (f"{res['method']} W{res['bits']} accuracy", f"{res['acc']:.2f} %"),
        ("adapter fraction", f"{res['adapter_fraction']:.4f} (budget {res['budget']:.4f})"),
        ("equivalent bits", f"{res['equiv_bits']:.3f}"),
        ("search iterations", str(res["iterations"])),
        ("calibration images", str(res["calib_images"])),
        ("search time", f"{res['search_seconds']:.1f} s"),
        ("adapter tuning", f"{res['tune_iterations']} iterations ({res['tune_loss']}), {res['tune_seconds']:.1f} s"
         if res.get("tune_iterations") else "off"),
        ("quantize time (all)", f"{res['quantize_seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    head = f"{res['model']}  ({res['eval_images']} {res['eval_split']} images)"
    lines = [head] + [f"  {k:<{width}}  {v}" for k, v in rows]
    searched_ce = res.get("method") == "search" and res.get("loss") == "ce"
    if res.get("tune_loss") == "ce" or searched_ce:  # say why the result can beat the float model
        lines.append("  note: the calibration labels were used (CE), which also fits the model to the calibration images'\n"
                     "  domain: compare with the same run at --bits 8 rather than with the float model (README, Results)")
    return "\n".join(lines)


def _quantize(args) -> dict:
    from .checkpoint import save
    from .experiments.pipeline import quantize_and_evaluate

    config = _config(args)
    qmodel, res = quantize_and_evaluate(
        args.model, config, weights=args.weights, shared=args.shared, data_dir=args.data,
        eval_split=args.eval_split, with_rtn=not args.no_rtn,
    )
    print(_table(res))
    if args.out:
        path = save(qmodel, args.out)
        res["checkpoint"] = str(path)
        print(f"saved {path}")
    return res


def _eval(args) -> dict:
    from .experiments.data import evaluate
    from .experiments.pipeline import evaluation_data, load_float_model

    if args.checkpoint:
        from .checkpoint import load

        model = load(args.checkpoint)
        name = (model.cora_architecture or {}).get("name")
        if name is None:
            raise ValueError("the checkpoint records no model name; evaluate it from Python with cora.load(path, model)")
    elif args.model:
        name = args.model
        model = load_float_model(name, args.weights, args.shared)
    else:
        raise ValueError("eval needs a model name or --checkpoint FILE")
    ds = evaluation_data(name, args.shared, args.data, args.eval_split)
    acc = evaluate(model, ds)
    print(f"{name}: top-1 {acc:.2f} % on {len(ds)} {args.eval_split} images")
    res = {"model": name, "acc": acc, "eval_images": len(ds), "eval_split": args.eval_split}
    if args.checkpoint:
        res["checkpoint"] = args.checkpoint
    return res


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    try:
        args = build_parser().parse_args(argv)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        res = _quantize(args) if args.command == "quantize" else _eval(args)
    except _CliError as exc:
        print(f"cora: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        msg = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"cora: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, sort_keys=True))
    return 0
