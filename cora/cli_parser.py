"""The command line's parser: the subcommands, their options, and the checks of each argument's value.

``build_parser()`` is what :func:`cora.cli.main` parses with; a bad value is an argparse error, reported by
:class:`_Parser` as one ``cora: error:`` line. ``CliError`` is a user error the command line finds itself.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["build_parser", "CliError", "DEVICES", "DEBUG_ENV"]

DEBUG_ENV = "CORA_DEBUG"  # "1": print the traceback of a failure before its error line
_SEED_MAX = 2**63 - 1
DEVICES = ("auto", "cuda", "cpu")


class CliError(Exception):
    """A user error found by the command line itself."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, notes: list[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._notes = notes

    def error(self, message: str) -> None:  # one clear line, no usage dump
        raise CliError(message)

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

    _add_quantize_parser(sub, common, notes)

    e = sub.add_parser("eval", parents=[common], help="evaluate a float model or a saved CoRa checkpoint")
    e.add_argument("model", nargs="?", default=None,
                   help="float model name; with --checkpoint it must be the checkpoint's own model (or names the model "
                        "of a checkpoint that records none)")
    e.add_argument("--weights", default=None, help="checkpoint of the float model (not with --checkpoint)")
    e.add_argument("--checkpoint", default=None, help="a checkpoint written by 'quantize --out'")

    _add_serve_parser(sub)
    return p


def _add_quantize_parser(sub, common: argparse.ArgumentParser, notes: list[str]) -> None:
    from .config import ADAPTER_DTYPES, FACTORIZATIONS, LOSSES, METHODS, RANGES, ROUNDINGS, SUPPORTED_BITS, TUNE_LOSSES

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
                   help="adapter tuning iterations after the ranks are fixed (default auto: 250 with labels, 100 per block for "
                        "the label-free block reconstruction; 0: off; --paper: 0); a value given here is always used")
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
                        "(auto then means uniform ranks, and the block reconstruction up to 3 bits; the labels still score the "
                        "evaluation)")
    q.add_argument("--quiet", action="store_true", help="no progress bars or lines")


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
