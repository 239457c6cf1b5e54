"""The command line: ``cora quantize ...``, ``cora eval ...`` and ``cora serve ...`` (also ``python -m cora ...``).

The runs themselves live in :mod:`cora.experiments.pipeline`; this module parses, checks every
argument before any work, prints the results and turns every failure into one line.

Exit status and stderr
----------------------
* **0**: success. stdout holds the results (a table; with ``--json`` a JSON object as the last line).
* **2**: a user error, reported as one line ``cora: error: <what is wrong>`` on stderr: a bad or
  inconsistent argument, a missing or unreadable file (model weights, checkpoint, data, an image),
  a model or checkpoint that does not fit, an unusable ``--out``, and a checkpoint that could not be
  written at the end (see ``--out``). Internally: argument errors, ``ValueError`` (which includes
  :class:`cora.checkpoint.CheckpointError`), ``OSError`` (``FileNotFoundError``, ``PermissionError``,
  a full disk, ...) and running out of memory.
* **1**: anything else escaping the run is a bug in cora, reported as the one line ``cora: error:
  internal error: <Type>: <message> (set CORA_DEBUG=1 for the traceback)``.
* **130**: interrupted (Ctrl-C): ``cora: error: interrupted``.

No traceback is printed, unless the environment variable ``CORA_DEBUG`` is ``1`` (then the
traceback of any failure precedes its error line). Other stderr lines are progress (unless
``--quiet``) and ``cora: warning: ...`` lines (deprecated option values, Python warnings, one line
each). Every argument is checked before the first model is loaded, so a bad one costs nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

__all__ = ["main", "build_parser", "DEBUG_ENV"]

DEBUG_ENV = "CORA_DEBUG"  # "1": print the traceback of a failure before its error line
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_MAX_MESSAGE = 1000  # characters of one error line (a giant message is cut, CORA_DEBUG=1 shows it all)
_SEED_MAX = 2**63 - 1


class _CliError(Exception):
    """A user error found by the command line itself."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, notes: list[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._notes = notes

    def error(self, message: str) -> None:  # one clear line, no usage dump
        raise _CliError(message)

    def parse_args(self, args=None, namespace=None):
        """Parse; warnings of the type checks (deprecated names) are printed only when parsing succeeds."""
        ns, notes = self.parse_with_notes(args, namespace)
        for note in notes:
            print(note, file=sys.stderr)
        return ns

    def parse_with_notes(self, args=None, namespace=None) -> tuple[argparse.Namespace, list[str]]:
        if self._notes is None:
            return super().parse_args(args, namespace), []
        self._notes.clear()
        ns = super().parse_args(args, namespace)
        notes = list(self._notes)
        self._notes.clear()
        return ns, notes


def _number(text: str, kind: str, low: int, high: int | None = None) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if v < low or (high is not None and v > high):
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text}")
    return v


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {text}")
    return v


def _positive_int(text: str) -> int:
    return _number(text, "a positive integer", 1)


def _nonnegative_int(text: str) -> int:
    return _number(text, "an integer >= 0", 0)


def _port(text: str) -> int:
    return _number(text, "a port between 1 and 65535", 1, 65535)


def _float_number(text: str, kind: str, ok) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text}")
    return v


def _nonnegative_float(text: str) -> float:
    return _float_number(text, "a number >= 0", lambda v: v >= 0)


def _positive_float(text: str) -> float:
    return _float_number(text, "a number > 0", lambda v: v > 0)


def _seed(text: str) -> int:
    return _number(text, f"an integer between 0 and {_SEED_MAX}", 0, _SEED_MAX)


def _threads(text: str) -> int:
    most = 4 * (os.cpu_count() or 1)
    return _number(text, f"a number of threads between 1 and {most} (4 x the CPU count)", 1, most)


def _method_type(notes: list[str]):
    def method(text: str) -> str:
        from .config import DEPRECATED_METHODS, METHODS

        if text in DEPRECATED_METHODS:
            new = DEPRECATED_METHODS[text]
            notes.append(f"cora: warning: --method {text} is deprecated; it is now called --method {new}")
            return new
        if text not in METHODS:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(METHODS)})")
        return text

    method.__name__ = "method"
    return method


def build_parser() -> argparse.ArgumentParser:
    from .config import ADAPTER_DTYPES, FACTORIZATIONS, LOSSES, METHODS, RANGES, ROUNDINGS, SUPPORTED_BITS, TUNE_LOSSES

    notes: list[str] = []
    p = _Parser(prog="python -m cora", description="CoRa: low-bit ConvNets with searched low-rank residual adapters.",
                notes=notes,
                epilog=f"Exit status: 0 success, 2 a user error (one 'cora: error:' line), 1 an internal error, "
                       f"130 interrupted. {DEBUG_ENV}=1 prints the traceback of a failure.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--shared", default=None,
                        help="folder with data/ and models/ (default: $CORA_SHARED or ../shared beside the checkout)")
    common.add_argument("--data", default=None,
                        help="ImageNet-style image folder (for non-CIFAR models; CIFAR models always use the shared arrays)")
    common.add_argument("--threads", type=_threads, default=None,
                        help="CPU threads for torch (default: every core this process may use); results do not depend "
                             "on it beyond float summation order")
    common.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model runs: the whole conversion and the evaluation (auto, the default: cuda "
                             "when a GPU is available, else cpu). The checkpoint format does not depend on it")
    common.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    common.add_argument("--eval-split", choices=("test", "holdout"), default="test",
                        help="evaluate on the test set (default; an --data folder: all of it) or on the held-out "
                             "calibration images, those the calibration does not use (CIFAR: 5000 - --calib; an --data "
                             "folder: the images not picked for calibration); refused when none are left. 'eval' holds "
                             "out from a checkpoint's own calibration, for a float model from the default --calib 1600")
    common.add_argument("--eval-limit", type=_positive_int, default=None, metavar="N",
                        help="evaluate on at most N images: the first of the split, class-balanced (the classes take "
                             "turns); the reported eval_images says how many")

    q = sub.add_parser("quantize", parents=[common], help="quantize a model and report accuracy")
    q.add_argument("model", help="cifar_resnet20, cifar_resnet32, ... (depth 6n+2), cifar_shufflenetv2_x0_5 or a "
                                 "torchvision name (resnet18, ...)")
    q.add_argument("--weights", default=None, help="checkpoint of the float model (default: the shared one)")
    q.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    q.add_argument("--grouped-bits", type=int, choices=SUPPORTED_BITS, default=None,
                   help="width of the grouped and depthwise convs, which get no adapter (default 8, --paper: --bits): "
                        "near float for 0.03-0.16 more bits per weight on the depthwise models (bench/README.md)")
    q.add_argument("--target-bits", type=_positive_float, default=None, metavar="B",
                   help="mixed precision: each layer gets one of the two widths around what B leaves for the codes (at "
                        "most --bits), chosen so that the equivalent bits per weight, adapters included, are at most B "
                        "(default: every layer at --bits)")
    q.add_argument("--budget", type=_budget, default=0.05, help="adapter parameters as a fraction of the conv and linear weights")
    q.add_argument("--method", type=_method_type(notes), default=None, metavar="{" + ",".join(METHODS) + "}",
                   help="search: searched ranks; uniform: same fraction of the full rank per layer; none: no adapters; "
                        "auto (default): search with labelled calibration data, else uniform (--paper: search). "
                        "The old names cora / heuristic / rtn still work")
    q.add_argument("--paper", action="store_true",
                   help="the published recipe (per-tensor mean±5std, nearest, weight SVD, CE + penalty)")
    q.add_argument("--per-tensor", action="store_true", help="one scale per tensor instead of per output channel")
    q.add_argument("--loss", choices=("auto",) + LOSSES, default=None,
                   help="search loss (default auto: ce with labels, else kl; paper: ce)")
    q.add_argument("--factorization", choices=FACTORIZATIONS, default=None)
    q.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default=None,
                   help="how adapters are stored (default float16; int8: per-row float32 scales, counted in the "
                        "equivalent bits; the budget counts parameters either way)")
    q.add_argument("--rounding", choices=ROUNDINGS, default=None)
    q.add_argument("--range", dest="range_method", choices=RANGES, default=None)
    q.add_argument("--calib", type=_positive_int, default=1600,
                   help="calibration images (default 1600; CIFAR: a multiple of 10, at most 5000)")
    q.add_argument("--iters", type=_positive_int, default=250, help="search iterations (default 250)")
    q.add_argument("--tune-iters", type=_nonnegative_int, default=None,
                   help="adapter tuning iterations after the ranks are fixed (default 250; 0: off; --paper: 0)")
    q.add_argument("--tune-lr", type=_positive_float, default=None,
                   help="adapter tuning learning rate (default 1e-3; 3e-3 for the label-free block reconstruction)")
    q.add_argument("--tune-loss", choices=("auto",) + TUNE_LOSSES, default=None,
                   help="adapter tuning loss (default auto: with the calibration labels ce, at 2 bits blocks+ce, the block"
                        " reconstruction first; without them blocks, the label-free block reconstruction, up to 3 bits,"
                        " and no tuning above)")
    q.add_argument("--no-tune-norms", action="store_true",
                   help="the block reconstruction fits the adapters only (default: the BatchNorm scale and shift too)")
    q.add_argument("--bn-reestimate", action="store_true",
                   help="re-estimate BatchNorm statistics on the calibration images (default: keep the float model's)")
    q.add_argument("--seed", type=_seed, default=0)
    q.add_argument("--skip", action="append", default=[], help="layer name or pattern to keep in float (repeatable)")
    q.add_argument("--out", default=None, metavar="FILE",
                   help="write the quantized model to this checkpoint (safetensors). Checked before any work: an empty "
                        "name, an existing folder or a folder that cannot be written is refused at once. If writing "
                        "still fails at the end (disk full, ...), nothing is left under FILE, the results are printed "
                        "all the same (with --json too) and the model is saved to a new file cora-<model>-*.safetensors "
                        "in the temp folder ($TMPDIR, else /tmp) instead; the error line says where, and the exit status is 2")
    q.add_argument("--no-rtn", action="store_true", help="skip the RTN baseline")
    q.add_argument("--no-eval-cache", action="store_true",
                   help="measure the float and RTN accuracies again even when the same model and data were measured "
                        "before (default: taken from the cache, $CORA_CACHE_DIR or ~/.cache/cora, keyed by digests of "
                        "the weights, the data and the RTN settings)")
    q.add_argument("--no-labels", action="store_true",
                   help="calibrate as a user without labels would: the conversion gets the calibration images only "
                        "(auto then means uniform ranks and no tuning; the labels still score the evaluation)")
    q.add_argument("--quiet", action="store_true", help="no progress bars or lines")

    e = sub.add_parser("eval", parents=[common], help="evaluate a float model or a saved CoRa checkpoint")
    e.add_argument("model", nargs="?", default=None,
                   help="float model name; with --checkpoint it must be the checkpoint's own model (or names the model "
                        "of a checkpoint that records none)")
    e.add_argument("--weights", default=None, help="checkpoint of the float model (not with --checkpoint)")
    e.add_argument("--checkpoint", default=None, help="a checkpoint written by 'quantize --out'")

    _add_serve_parser(sub)
    return p


def _add_serve_parser(sub) -> None:
    from .deploy import WEIGHTS
    from .inference import DTYPES

    s = sub.add_parser("serve", help="serve a checkpoint (or a float model) over HTTP on Ray Serve",
                       description="Serve image classification over HTTP: POST /v1/classify, GET /v1/models, "
                                   "/healthz, /readyz; Prometheus metrics from Ray's metrics agent. Stops on "
                                   "SIGINT/SIGTERM. docs/serving.md has the API, backpressure and scaling.")
    s.set_defaults(json=False, threads=None)  # main() reads these for every command
    s.add_argument("checkpoint", nargs="?", default=None, help="a cora checkpoint (written by 'quantize --out')")
    s.add_argument("--float", dest="float_model", default=None, metavar="MODEL",
                   help="serve the float model MODEL instead of a checkpoint (the peer to compare with)")
    s.add_argument("--weights", default=None, help="with --float: the float model's weights (default: the shared ones)")
    s.add_argument("--shared", default=None, help="with --float: folder with models/ (default: $CORA_SHARED or ../shared)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--device", choices=DEVICES, default="auto", help="auto (default: cuda when available), cuda or cpu")
    s.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="activation dtype (auto, the default: float16 on CUDA, float32 on the CPU)")
    s.add_argument("--deploy-weights", choices=WEIGHTS, default="auto",
                   help="how the checkpoint's convs run: dense (effective float32 weights computed once, one conv "
                        "each), packed (the codes as stored: the fused kernels on CUDA), auto (default: dense on "
                        "the CPU, packed on CUDA)")
    s.add_argument("--max-batch", type=_positive_int, default=32, help="largest batch one model call takes (default 32)")
    s.add_argument("--batch-wait-ms", type=_nonnegative_float, default=5.0,
                   help="how long a batch waits to fill up, milliseconds (default 5)")
    s.add_argument("--replicas", type=_positive_int, default=None, help="fixed number of model replicas (default 1)")
    s.add_argument("--min-replicas", type=_positive_int, default=None,
                   help="autoscaling: fewest replicas (with --max-replicas and --target-ongoing)")
    s.add_argument("--max-replicas", type=_positive_int, default=None, help="autoscaling: most replicas")
    s.add_argument("--target-ongoing", type=_positive_float, default=None,
                   help="autoscaling: requests per replica the autoscaler aims at")
    s.add_argument("--gpus-per-replica", type=_nonnegative_float, default=None,
                   help="GPUs per replica, fractions allowed (default: 1 on CUDA, 0 on the CPU)")
    s.add_argument("--num-cpus", type=_positive_float, default=1.0, help="CPUs per replica (default 1)")
    s.add_argument("--decode-threads", type=_positive_int, default=2,
                   help="threads per replica decoding request images (default 2)")
    s.add_argument("--max-ongoing", type=_positive_int, default=None,
                   help="requests one replica holds at once (Ray Serve's max_ongoing_requests; default 2 x --max-batch)")
    s.add_argument("--max-queued", type=_positive_int, default=64,
                   help="requests waiting at Ray's proxy when every replica is full; beyond that: 503 (Ray Serve's "
                        "max_queued_requests; default 64)")
    s.add_argument("--address", default=None,
                   help="join a running Ray cluster (e.g. auto, or HOST:6379 of 'ray start --head') instead of starting one")
    s.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly"), default="EveryNode",
                   help="where Ray Serve runs HTTP proxies: every node with a replica (default) or the head node only")
    s.add_argument("--top-k", type=_positive_int, default=5, help="classes per prediction (default 5, at most the class count)")
    s.add_argument("--metrics-port", type=_port, default=8001,
                   help="port of Ray's Prometheus metrics export, local Ray only (default 8001)")
    s.add_argument("--max-images", type=_positive_int, default=None, help="images per JSON request (default 64)")
    s.add_argument("--max-body-bytes", type=_positive_int, default=None, help="bytes per request body (default 8 MiB)")
    s.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="pixels (width x height) per image, read from the header before decoding (default: "
                        "(8 x the model's resize size)^2, within 512^2..4096^2)")
    s.add_argument("--max-request-pixels", type=_positive_int, default=None,
                   help="pixels of all a request's images together (default 16 x --max-pixels' default)")
    s.add_argument("--ready-timeout", type=_positive_float, default=600.0,
                   help="seconds to wait for every replica to load and warm up (default 600)")


# ------------------------------------------------------------------------------------ checks
DEVICES = ("auto", "cuda", "cpu")


def resolve_device(choice: str):
    """``--device`` as a ``torch.device``: ``auto`` is CUDA when available, else the CPU; ``cuda``
    without a usable GPU is a user error."""
    from .inference import resolve_device as resolve  # the one device rule, shared with cora serve's engine

    if choice not in DEVICES:
        raise _CliError(f"--device must be one of {', '.join(DEVICES)}, got {choice!r}")
    try:
        return resolve(choice)
    except ValueError:  # the only one left: cuda without a usable GPU
        raise _CliError(f"--device {choice}: no CUDA GPU is available to torch here (use --device cpu)") from None


def _check_data_option(name: str, args) -> None:
    if args.data is not None and name.startswith("cifar_"):
        raise _CliError(f"--data is for non-CIFAR models: {name} is calibrated and evaluated on the shared CIFAR-10 arrays")


def _check_out(text: str) -> Path:
    from . import checkpoint

    return Path(checkpoint.check_output_path(text))


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
    if args.grouped_bits is not None:
        overrides["grouped_bits"] = args.grouped_bits
    if args.target_bits is not None:
        overrides["target_bits"] = args.target_bits
    if args.tune_iters is not None:
        overrides["tune_iterations"] = args.tune_iters
    if args.tune_lr is not None:
        overrides["tune_lr"] = args.tune_lr
    if args.no_tune_norms:
        overrides["tune_norms"] = False
    for key in ("method", "loss", "factorization", "rounding", "range_method", "tune_loss", "adapter_dtype"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.per_tensor:
        overrides["granularity"] = "tensor"
    if args.bn_reestimate:
        overrides["bn_reestimate"] = True
    return CoRaConfig.paper(args.bits, **overrides) if args.paper else CoRaConfig(bits=args.bits, **overrides)


# ------------------------------------------------------------------------------------ output
def _breakdown_row(parts: dict | None) -> list[tuple[str, str]]:
    """The equivalent bits by part (cora.budget.bits_breakdown) as one table row; none without a breakdown."""
    if not parts:
        return []
    names = {"codes": "codes", "wide": "wider layers", "scales": "scales/zeros", "adapters": "adapters"}
    return [("  of which", ", ".join(f"{names[k]} {v:.3f}" for k, v in parts.items() if k in names))]


def _table(res: dict) -> str:
    rows = [("float accuracy", f"{res['float_acc']:.2f} %")]
    if "rtn_acc" in res:
        rows.append((f"RTN W{res['bits']} accuracy", f"{res['rtn_acc']:.2f} %"))
    rows += [
        (f"{res['method']} W{res['bits']} accuracy", f"{res['acc']:.2f} %"),
        ("adapter fraction", f"{res['adapter_fraction']:.4f} (budget {res['budget']:.4f})"),
        ("equivalent bits", f"{res['equiv_bits']:.3f}"),
        *_breakdown_row(res.get("bits_breakdown")),
        ("search iterations", str(res["iterations"])),
        ("calibration images", str(res["calib_images"])),
        ("evaluation images", f"{res['eval_images']} ({res['eval_split']})"),
        ("search time", f"{res['search_seconds']:.1f} s"),
        ("adapter tuning", f"{res['tune_iterations']} iterations ({res['tune_loss']}), {res['tune_seconds']:.1f} s"
         + (f", {res['tune_norms']} BatchNorms fitted" if res.get("tune_norms") else "")
         if res.get("tune_iterations") else "off"),
        ("quantize time (all)", f"{res['quantize_seconds']:.1f} s"),
    ]
    if res.get("seconds"):
        rows.append(("time", _time_summary(res)))
    width = max(len(k) for k, _ in rows)
    head = f"{res['model']}  ({res['eval_images']} {res['eval_split']} images)"
    lines = [head] + [f"  {k:<{width}}  {v}" for k, v in rows]
    searched_ce = res.get("method") == "search" and res.get("loss") == "ce"
    if res.get("tune_loss") in ("ce", "blocks+ce") or searched_ce:  # say why the result can beat the float model
        lines.append("  note: the calibration labels were used (CE), which also fits the model to the calibration images'\n"
                     "  domain: compare with the same run at --bits 8 rather than with the float model (README, Results)")
    return "\n".join(lines)


def _time_summary(res: dict) -> str:
    """Where the wall time went, on one line: loading, the baselines (cached or not), each phase of the
    conversion, the evaluation, and the total."""
    sec, cached = res["seconds"], set(res.get("cached", ()))
    parts = [f"load {sec['load']:.1f}"]
    for key in ("float", "rtn"):
        if key in sec:
            parts.append(f"{key} {sec[key]:.1f}" + (" (cached)" if key in cached else ""))
    phases = ", ".join(f"{k} {v:.1f}" for k, v in sec.get("phases", {}).items())
    parts.append(f"convert {sec['convert']:.1f}" + (f" ({phases})" if phases else ""))
    parts.append(f"eval {sec['eval']:.1f}")
    total = f"; total {sec['total']:.1f} s" if "total" in sec else " s"
    return ", ".join(parts) + total


def default_threads() -> int:
    """Every core this process may run on (its CPU affinity where the OS tells it, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if len(msg) > _MAX_MESSAGE:
        msg = msg[:_MAX_MESSAGE] + f" ... ({len(msg)} characters; {DEBUG_ENV}=1 shows them all)"
    return msg


# ------------------------------------------------------------------------------------ saving
def _rescue(model, name: str) -> tuple[Path | None, str | None]:
    """Save to a new file in the temp folder; ``(path, None)`` or ``(None, why not)``."""
    from .checkpoint import save

    try:
        fd, tmp = tempfile.mkstemp(prefix=f"cora-{name}-", suffix=".safetensors")
        os.close(fd)
    except OSError as exc:
        return None, _one_line(exc)
    try:
        return Path(save(model, Path(tmp))), None
    except Exception as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None, f"{type(exc).__name__}: {_one_line(exc)}"


def _write_checkpoint(model, out: Path, name: str, res: dict) -> str | None:
    """Write ``model`` to ``out``; on failure save it to the temp folder instead. Returns the error
    line's message (``None`` on success); ``res`` gets ``checkpoint`` (where it went) and on failure
    ``checkpoint_error``."""
    from .checkpoint import save

    try:
        path = Path(save(model, out))  # atomic: on failure no partial file, temporary or new folder
    except Exception as exc:
        error = f"could not write the checkpoint {out} ({type(exc).__name__}: {_one_line(exc)})"
        rescued, why = _rescue(model, name)
        if rescued is not None:
            res["checkpoint"] = str(rescued)
            print(f"saved {rescued} (instead of {out})")
            error += f"; the quantized model was saved to {rescued} instead"
        else:
            error += f"; saving it to the temp folder failed too ({why}): the results printed are all that is left"
        res["checkpoint_error"] = error
        return error
    res["checkpoint"] = str(path)
    print(f"saved {path}")
    return None


# ------------------------------------------------------------------------------------ commands
def _quantize(args) -> tuple[dict, str | None]:
    from .experiments.pipeline import quantize_and_evaluate

    out = _check_out(args.out) if args.out is not None else None  # before any work
    _check_data_option(args.model, args)
    device = resolve_device(args.device)
    config = _config(args)
    start = time.perf_counter()
    qmodel, res = quantize_and_evaluate(
        args.model, config, weights=args.weights, shared=args.shared, data_dir=args.data,
        eval_split=args.eval_split, eval_limit=args.eval_limit, with_rtn=not args.no_rtn, device=device,
        labels=not args.no_labels, eval_cache=not args.no_eval_cache,
    )
    res["seconds"]["total"] = time.perf_counter() - start
    print(_table(res))
    error = _write_checkpoint(qmodel, out, args.model, res) if out is not None else None
    return res, error


def _checkpoint_model(args) -> tuple[str, bool, int | None]:
    """From the checkpoint's metadata: the model's name (MODEL checked against the recorded one),
    whether the name is recorded, and how many calibration images it was converted with."""
    from .checkpoint import read_metadata

    if args.weights is not None:
        raise _CliError("--weights is for float models; a checkpoint holds its own weights (drop --weights or --checkpoint)")
    meta = read_metadata(args.checkpoint)
    arch, report = meta.get("architecture"), meta.get("report")
    recorded = arch.get("name") if isinstance(arch, dict) else None
    calib_images = report.get("calib_images") if isinstance(report, dict) else None
    if recorded is None:
        if args.model is None:
            raise _CliError(f"{args.checkpoint} records no model name: name it (cora eval MODEL --checkpoint FILE)")
        return args.model, False, calib_images
    if args.model is not None and args.model != recorded:
        raise _CliError(f"{args.checkpoint} holds a quantized {recorded}, not {args.model}: "
                        f"drop MODEL or name the checkpoint's model")
    return recorded, True, calib_images


def _eval(args) -> tuple[dict, None]:
    from .experiments.data import evaluate
    from .experiments.pipeline import evaluation_data, load_float_model

    if args.checkpoint is not None:
        name, recorded, calib_images = _checkpoint_model(args)
    elif args.model is not None:
        name, recorded, calib_images = args.model, False, None
    else:
        raise _CliError("eval needs a model name or --checkpoint FILE")
    _check_data_option(name, args)
    device = resolve_device(args.device)
    # held out: a checkpoint's own calibration images, a float model's the default calibration's (1600)
    ds = evaluation_data(name, args.shared, args.data, args.eval_split, calib_images=calib_images or 1600,
                         limit=args.eval_limit)
    if args.checkpoint is None:
        model = load_float_model(name, args.weights, args.shared)
    else:
        from .checkpoint import load
        from .zoo import build_model

        model = load(args.checkpoint) if recorded else load(args.checkpoint, build_model(name, weights=False))
    acc = evaluate(model.to(device), ds, device=device)
    print(f"{name}: top-1 {acc:.2f} % on {len(ds)} {args.eval_split} images ({device.type})")
    res = {"model": name, "acc": acc, "eval_images": len(ds), "eval_split": args.eval_split, "device": device.type}
    if args.checkpoint is not None:
        res["checkpoint"] = args.checkpoint
    return res, None


def _serve(args) -> tuple[dict, None]:
    from .serve_settings import ray_environment, settings_from_args

    if args.replicas is not None and args.min_replicas is not None:
        raise _CliError("--replicas is a fixed count; autoscaling uses --min-replicas/--max-replicas instead")
    args.replicas = args.replicas or 1
    settings = settings_from_args(args, resolve_device)  # every check, before Ray is imported
    for name, value in ray_environment(settings).items():  # read by Ray when it is imported
        os.environ.setdefault(name, value)
    try:
        from .serve import run
    except ImportError as exc:
        raise _CliError(f"cora serve needs Ray Serve: pip install 'cora[serve]' ({exc})") from None
    run(settings)
    return {"served": True}, None


# ------------------------------------------------------------------------------------ main
# each command returns (results for --json, an error line or None)
COMMANDS = {"quantize": _quantize, "eval": _eval, "serve": _serve}


def _run_command(args) -> tuple[dict, str | None]:
    """The command, on ``--threads`` torch threads (default every core; serve sets its replicas' own), the
    caller's thread count given back afterwards (main() may run in a longer-lived process)."""
    if args.command == "serve":
        return COMMANDS[args.command](args)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        return COMMANDS[args.command](args)
    finally:
        torch.set_num_threads(before)


def _classify(exc: BaseException) -> tuple[int, str]:
    """The exit status and the error line's message for an exception (see the module doc)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, (_CliError, ValueError, OSError)):
        return EXIT_USAGE, _one_line(exc)
    torch = sys.modules.get("torch")
    oom = (MemoryError,) + ((torch.cuda.OutOfMemoryError,) if torch is not None else ())
    if isinstance(exc, oom):
        return EXIT_USAGE, f"out of memory ({_one_line(exc)}): try fewer calibration images or a smaller model"
    return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {_one_line(exc)} (set {DEBUG_ENV}=1 for the traceback)"


def _fail(exc: BaseException) -> int:
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(exc)
    code, message = _classify(exc)
    print(f"cora: error: {message}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cora: warning: {category.__name__}: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line each, like the rest of stderr
            try:
                args, notes = build_parser().parse_with_notes(argv)
            except SystemExit as exc:  # --help
                return exc.code if isinstance(exc.code, int) else EXIT_OK
            for note in notes:
                print(note, file=sys.stderr)
            res, error = _run_command(args)
    except BaseException as exc:  # every failure is one line (SystemExit of --help returned above)
        if isinstance(exc, SystemExit):
            raise
        return _fail(exc)
    if args.json:
        print(json.dumps(res, sort_keys=True))
    if error is not None:
        print(f"cora: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
