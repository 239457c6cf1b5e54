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

import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from .cli_parser import DEBUG_ENV, DEVICES, CliError, build_parser

__all__ = ["main", "build_parser", "DEBUG_ENV"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_MAX_MESSAGE = 1000  # characters of one error line (a giant message is cut, CORA_DEBUG=1 shows it all)


def resolve_device(choice: str):
    """``--device`` as a ``torch.device``: ``auto`` is CUDA when available, else the CPU; ``cuda``
    without a usable GPU is a user error."""
    from .inference import resolve_device as resolve  # the one device rule, shared with cora serve's engine

    if choice not in DEVICES:
        raise CliError(f"--device must be one of {', '.join(DEVICES)}, got {choice!r}")
    try:
        return resolve(choice)
    except ValueError:  # the only one left: cuda without a usable GPU
        raise CliError(f"--device {choice}: no CUDA GPU is available to torch here (use --device cpu)") from None


def _check_data_option(name: str, args) -> None:
    if args.data is not None and name.startswith("cifar_"):
        raise CliError(f"--data is for non-CIFAR models: {name} is calibrated and evaluated on the shared CIFAR-10 arrays")


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
        raise CliError("--weights is for float models; a checkpoint holds its own weights (drop --weights or --checkpoint)")
    meta = read_metadata(args.checkpoint)
    arch, report = meta.get("architecture"), meta.get("report")
    recorded = arch.get("name") if isinstance(arch, dict) else None
    calib_images = report.get("calib_images") if isinstance(report, dict) else None
    if recorded is None:
        if args.model is None:
            raise CliError(f"{args.checkpoint} records no model name: name it (cora eval MODEL --checkpoint FILE)")
        return args.model, False, calib_images
    if args.model is not None and args.model != recorded:
        raise CliError(f"{args.checkpoint} holds a quantized {recorded}, not {args.model}: "
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
        raise CliError("eval needs a model name or --checkpoint FILE")
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
        raise CliError("--replicas is a fixed count; autoscaling uses --min-replicas/--max-replicas instead")
    args.replicas = args.replicas or 1
    settings = settings_from_args(args, resolve_device)  # every check, before Ray is imported
    for name, value in ray_environment(settings).items():  # read by Ray when it is imported
        os.environ.setdefault(name, value)
    try:
        from .serve import run
    except ImportError as exc:
        raise CliError(f"cora serve needs Ray Serve: pip install 'cora[serve]' ({exc})") from None
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
    if isinstance(exc, (CliError, ValueError, OSError)):
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
