"""Accuracy against equivalent bits per weight: CoRa's bits x budget frontier, with and without labels, against the peers.

One run is one point (model, bits, adapter budget, labels): ``cora.experiments.pipeline.quantize_and_evaluate``,
the function behind ``python -m cora quantize MODEL --bits B --budget F [--no-labels] --json`` (same
config: our defaults, seed 0, 250 search / tuning iterations), evaluated on the 10,000 shared test images.
Budget 0 means no adapters: ``--method none`` (the config's budget must be in (0, 1], and ``none``
ignores it). ``labels`` no is ``--no-labels``: the conversion gets the calibration images only (auto then
means uniform ranks, and block reconstruction of the adapters and BatchNorms up to 3 bits, budget 0
included, no tuning above); yes: ranks searched by CE and adapters tuned by CE on the labels. At budget 0
both are the base plus the BatchNorms' block reconstruction up to the width where each mode runs it
(labelled: 2 bits, the first phase of ``blocks+ce``; label-free: 3 bits), the base alone above.

Grid (default): cifar_resnet20, cifar_resnet32 and cifar_shufflenetv2_x0_5, bits {2, 3, 4} x budget
{0, 0.025, 0.05, 0.10} x labels {yes, no} = 72 points, plus one W8 control per model and label mode (our defaults at bits 8,
budget 0.05: almost no quantization error to reclaim, so it shows what the labelled search and tuning
add by fitting the calibration images' domain; ``--no-control`` leaves them out): 78 runs.

    python bench/frontier.py                                    # the whole sweep (hours on 2 cores), then the plot
    python bench/frontier.py --models cifar_resnet20 --bits 4 --budgets 0 0.05 --labels no \\
        --calib 50 --eval-limit 200 --out /tmp/f.csv --png /tmp/f.png              # a quick check
    python bench/frontier.py --plot-only                        # redraw the PNG from the CSV

**Mixed precision** (``--target-bits T [T ...]``): points of ``python -m cora quantize MODEL --bits W
--target-bits T``, W the widest of ``--bits``: every layer gets one of the two widths around what ``T``
leaves for the codes, so that the equivalent bits are at most ``T`` (``cora.precision``). They are run
for every budget and label mode given, and tagged ``<tag>-t<T>`` (their ``bits`` column is W); the
plot draws them in their own colour, one line per budget and label mode joining the targets.

**Resumable.** Every finished run is appended at once to ``--out`` (default ``bench/results/frontier.csv``),
keyed by ``(model, bits, budget, labels, tag)``; a rerun skips the keys already there, so an interrupted
sweep resumes where it stopped. ``--force`` reruns them (the new row replaces the old). ``tag`` names the
settings that change the numbers: ``c<calib>`` plus ``-e<eval limit>`` with ``--eval-limit`` and
``-s<seed>`` for a seed other than 0 (the full rows are ``c1600``). The plot and the table only take rows
of the tag the arguments give, so quick checks never mix with full rows.

**The plot** (``--png``, default ``bench/results/frontier.png``; needs matplotlib: ``pip install -e
".[bench]"``): one column per model, its lower panel the same points zoomed on the region within
``ZOOM_POINTS`` of the float model (where the points of interest are), x = equivalent bits per weight
(``report.equiv_bits``: codes, scales, zero points and fp16 adapters), y = top-1 %. Ours in colour (one
colour per bit width; circles and solid lines with labels, triangles and dotted lines without; each line
joins the budgets of one bit width and label mode, each point is marked with its budget); the peers of ``bench/results/peers.csv``
(Brevitas, no labels, full test set) in grey, one marker per method (nudged sideways by 0.02 bits per
method so that they do not hide each other); the float model as a dashed black
line and the W8 controls as dash-dotted purple lines (horizontal: they sit at ~8.9 bits).

Columns of the CSV:
``model, bits, budget, labels, tag, acc, float_acc, equiv_bits, adapter_fraction, method, loss,
tune_loss, iterations, tune_iterations, calib_images, eval_images, seed, quantize_seconds,
run_seconds, device, threads, torch_version, machine, commit``.

- ``acc`` / ``float_acc``: top-1 % of the converted / float model on the ``eval_images`` test images.
- ``method`` / ``loss`` / ``tune_loss``: what ``auto`` resolved to (``report.method``, the search loss of
  the report's config, ``report.tune_loss``); ``iterations`` / ``tune_iterations``: search / tuning steps.
- ``quantize_seconds``: the conversion alone (the CLI's "quantize time"); ``run_seconds``: the whole
  point (loading, conversion, evaluation, the float model's evaluation on the first point of a model in
  a process). The sweep's run time is the sum of ``run_seconds``, printed at the end.
- ``commit``: ``bench/_harness.git_commit()`` when the row ran (a resumed sweep can span commits).
- ``codes_bits, wide_bits, scale_bits, adapter_bits``: ``equiv_bits`` by part (``report.bits_breakdown``:
  codes at the base width, what layers left wider add, scales and zero points, adapters); empty in rows
  written before these columns existed.

The table puts each point beside the best peer of ``--peers`` at no more equivalent bits (the comparison
at equal equivalent bits; a peer's bits count its fp16 scales and zero points, no adapters).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ROOT, append_csv, git_commit, machine  # noqa: E402
from frontier_plot import (  # noqa: E402  (the plot lives in its own module; these names stay reachable here)
    PEER_FAMILIES, ZOOM_POINTS, PlotError, peer_label, read_peers, zoom_range,
)
from frontier_plot import _pyplot, plot as _plot  # noqa: E402

__all__ = ["COLUMNS", "config_tag", "target_tag", "target_of", "row_key", "read_rows", "store_row", "plan", "pending",
           "best_peer_at", "plot", "main", "PEER_FAMILIES", "ZOOM_POINTS", "peer_label", "read_peers", "zoom_range"]

MODELS = ("cifar_resnet20", "cifar_resnet32", "cifar_shufflenetv2_x0_5")
BITS = (2, 3, 4)
BUDGETS = (0.0, 0.025, 0.05, 0.10)
CONTROL_BITS, CONTROL_BUDGET = 8, 0.05  # the W8 control of bench/accuracy.py
DEFAULT_CALIB = 1600
DEFAULT_OUT = ROOT / "bench" / "results" / "frontier.csv"
DEFAULT_PNG = ROOT / "bench" / "results" / "frontier.png"
PEERS_CSV = ROOT / "bench" / "results" / "peers.csv"
COLUMNS = ["model", "bits", "budget", "labels", "tag", "acc", "float_acc", "equiv_bits", "adapter_fraction",
           "method", "loss", "tune_loss", "iterations", "tune_iterations", "calib_images", "eval_images", "seed",
           "quantize_seconds", "run_seconds", "device", "threads", "torch_version", "machine", "commit",
           "codes_bits", "wide_bits", "scale_bits", "adapter_bits"]
BREAKDOWN_COLUMNS = {"codes": "codes_bits", "wide": "wide_bits", "scales": "scale_bits", "adapters": "adapter_bits"}
LABEL_MODES = {"yes": (True,), "no": (False,), "both": (True, False)}


class FrontierError(Exception):
    """A user error: printed as one ``frontier: error:`` line, exit 2."""


# ----------------------------------------------------------------------------- the cache
def config_tag(calib: int = DEFAULT_CALIB, eval_limit: int | None = None, seed: int = 0) -> str:
    """The short tag of the settings that change the numbers besides the key's own fields."""
    tag = f"c{calib}"
    if eval_limit:
        tag += f"-e{eval_limit}"
    if seed:
        tag += f"-s{seed}"
    return tag


def target_tag(tag: str, target: float) -> str:
    """The tag of a mixed-precision point: ``tag`` plus ``-t<target>``."""
    return f"{tag}-t{float(target):g}"


def target_of(row: dict) -> float | None:
    """The target of a mixed-precision row or point (from its tag), None for a uniform one."""
    tag = row["tag"]
    return float(tag.rsplit("-t", 1)[1]) if "-t" in tag else None


def _budget_text(budget) -> str:
    return f"{float(budget):g}"  # "0.05" whether it came from argparse or from the CSV


def _as_bool(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def row_key(row: dict) -> tuple:
    """``(model, bits, budget, labels, tag)`` of a CSV row or of a planned point, normalised."""
    return (row["model"], int(row["bits"]), _budget_text(row["budget"]), _as_bool(row["labels"]), row["tag"])


def read_rows(path) -> list[dict]:
    """The rows of the CSV at ``path`` (none when it does not exist yet)."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rewrite(rows: list[dict], path: Path) -> None:
    """Write ``rows`` to ``path`` through a temporary file renamed into place (an interrupt leaves the old file)."""
    fields = list(COLUMNS) + [k for r in rows for k in r if k not in COLUMNS]
    fields = list(dict.fromkeys(fields))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in fields} for r in rows)
    os.replace(tmp, path)


def store_row(row: dict, path) -> None:
    """Save one finished run at once: appended, or replacing the row of the same key (``--force``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read_rows(path)
    key = row_key(row)
    if any(row_key(r) == key for r in old):
        _rewrite([r for r in old if row_key(r) != key] + [row], path)
    else:
        append_csv([row], path)


def plan(models, bits, budgets, label_modes, control: bool = True, tag: str = config_tag(), targets=()) -> list[dict]:
    """The points of the sweep in run order: per model, the grid (or with ``targets`` the mixed-precision
    points at the widest of ``bits``), then the W8 control per label mode."""
    points = []
    for model in models:
        for labels in label_modes:
            if targets:
                points += [dict(model=model, bits=max(bits), budget=float(f), labels=labels, tag=target_tag(tag, t))
                           for t in targets for f in budgets]
            else:
                points += [dict(model=model, bits=b, budget=float(f), labels=labels, tag=tag) for b in bits for f in budgets]
        if control:
            points += [dict(model=model, bits=CONTROL_BITS, budget=CONTROL_BUDGET, labels=labels, tag=tag)
                       for labels in label_modes]
    return points


def pending(points: list[dict], done_rows: list[dict], force: bool = False) -> list[dict]:
    """The points still to run: all with ``force``, else those whose key is not in ``done_rows``."""
    if force:
        return list(points)
    done = {row_key(r) for r in done_rows}
    return [p for p in points if row_key(p) not in done]


# ----------------------------------------------------------------------------- one run
def make_config(bits: int, budget: float, calib: int, seed: int, target_bits: float | None = None):
    """The CLI's config for ``--bits B --budget F --calib N --seed S [--target-bits T] --quiet``; budget 0 is
    ``--method none``."""
    from cora import CoRaConfig

    common = dict(bits=bits, calib_images=calib, seed=seed, target_bits=target_bits, progress=False)
    if budget == 0:
        return CoRaConfig(method="none", **common)  # the budget must be > 0 and "none" ignores it
    return CoRaConfig(budget=budget, **common)


def run_point(point: dict, args, env: dict, float_cache: dict) -> dict:
    """Convert and evaluate one point through the CLI's pipeline; the CSV row."""
    from cora.experiments.pipeline import quantize_and_evaluate

    t = time.perf_counter()
    cfg = make_config(point["bits"], point["budget"], args.calib, args.seed, target_of(point))
    need_float = point["model"] not in float_cache
    _, res = quantize_and_evaluate(point["model"], cfg, shared=args.shared, eval_limit=args.eval_limit,
                                   with_float=need_float, with_rtn=False, device=env["device"],
                                   labels=point["labels"])
    if need_float:
        float_cache[point["model"]] = res["float_acc"]
    row = dict(
        point, budget=_budget_text(point["budget"]), acc=round(res["acc"], 2),
        float_acc=round(float_cache[point["model"]], 2), equiv_bits=round(res["equiv_bits"], 4),
        adapter_fraction=round(res["adapter_fraction"], 4), method=res["method"], loss=res["loss"],
        tune_loss=res["tune_loss"] or "", iterations=res["iterations"], tune_iterations=res["tune_iterations"],
        calib_images=res["calib_images"], eval_images=res["eval_images"], seed=args.seed,
        quantize_seconds=round(res["quantize_seconds"], 1), run_seconds=round(time.perf_counter() - t, 1),
        device=env["device"], threads=env["threads"], torch_version=env["torch_version"],
        machine=env["machine"], commit=env["commit"],
        **{col: round(res.get("bits_breakdown", {}).get(part, 0.0), 4) for part, col in BREAKDOWN_COLUMNS.items()})
    return {k: row[k] for k in COLUMNS}  # the CSV's column order


def _environment(args) -> dict:
    import torch

    from cora.inference import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device).type
    except ValueError as e:
        raise FrontierError(str(e)) from None
    return dict(device=device, threads=torch.get_num_threads(), torch_version=torch.__version__,
                machine=machine(), commit=git_commit())


def sweep(todo: list[dict], args) -> float:
    """Run every point of ``todo``, storing each row as soon as it is done; returns the wall seconds."""
    if not todo:
        return 0.0
    env = _environment(args)
    float_cache: dict = {}
    t0 = time.perf_counter()
    for i, point in enumerate(todo, 1):
        try:
            row = run_point(point, args, env, float_cache)
        except ValueError as e:  # the pipeline's refusal of a setting (e.g. --calib not a multiple of 10)
            raise FrontierError(f"{_describe(point)}: {e}") from None
        store_row(row, args.out)
        print(f"[{i}/{len(todo)}] {_describe(point)}: acc {row['acc']:.2f}  equiv bits {row['equiv_bits']:.3f}  "
              f"adapters {row['adapter_fraction']:.4f}  {row['method']}  quantize {row['quantize_seconds']} s  "
              f"run {row['run_seconds']} s", flush=True)
    return time.perf_counter() - t0


def _describe(p: dict) -> str:
    labels = "labels" if _as_bool(p["labels"]) else "no labels"
    return f"{p['model']} {_width_text(p)} budget {_budget_text(p['budget'])} {labels}"


def _width_text(p: dict) -> str:
    t = target_of(p)
    return f"W{p['bits']}" if t is None else f"mixed W<={p['bits']} at {t:g} bits"


# ----------------------------------------------------------------------------- the table
def selected(rows: list[dict], models, tag: str) -> list[dict]:
    """The rows of ``tag`` for ``models``, in a stable reading order."""
    out = [r for r in rows if (r["tag"] == tag or r["tag"].startswith(tag + "-t")) and r["model"] in models]
    return sorted(out, key=lambda r: (r["model"], target_of(r) is not None, int(r["bits"]), not _as_bool(r["labels"]),
                                      float(r["budget"]), target_of(r) or 0.0))


def best_peer_at(bits: float, peers: list[dict]) -> dict | None:
    """The most accurate peer row storing at most ``bits`` equivalent bits per weight (None: none that small):
    the comparison at equal equivalent bits."""
    fits = [p for p in peers if float(p["bits_per_weight"]) <= bits + 1e-9]
    return max(fits, key=lambda p: float(p["acc"]), default=None)


def _breakdown_text(r: dict) -> str:
    """``codes + wide + scales + adapters`` of a row, or '-' for a row written before the columns existed."""
    vals = [r.get(col) for col in BREAKDOWN_COLUMNS.values()]
    return "-" if any(v in (None, "") for v in vals) else " + ".join(f"{float(v):.2f}" for v in vals)


def print_table(rows: list[dict], peers_path=PEERS_CSV) -> float:
    """Print the points as a Markdown table, each beside the best peer of ``peers_path`` at no more equivalent
    bits; returns the sum of their ``run_seconds``."""
    print("| model | bits | budget | labels | top-1 % | float % | equiv. bits | codes + wider + scales + adapters | "
          "best peer at <= these bits | adapter fraction | method | quantize s | run s | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    peers = {m: read_peers(peers_path, m) for m in {r["model"] for r in rows}}
    for r in rows:
        best = best_peer_at(float(r["equiv_bits"]), peers[r["model"]])
        peer = "-" if best is None else f"{float(best['acc']):.2f} ({peer_label(best['method'])[0]} W{best['bits']})"
        print(f"| {r['model']} | {_width_text(r)} | {r['budget']} | {'yes' if _as_bool(r['labels']) else 'no'} | "
              f"{float(r['acc']):.2f} | {float(r['float_acc']):.2f} | {float(r['equiv_bits']):.3f} | "
              f"{_breakdown_text(r)} | {peer} | {float(r['adapter_fraction']):.4f} | {r['method']} | "
              f"{r['quantize_seconds']} | {r['run_seconds']} | {r['commit']} |")
    total = sum(float(r["run_seconds"] or 0) for r in rows)
    print(f"\n{len(rows)} points; sweep run time (sum of run_seconds): {total:.0f} s = {total / 3600:.2f} h")
    return total


def plot(rows: list[dict], peers_path, png, models, tag: str) -> Path:
    """Draw the frontier of ``rows`` (one tag) and the peers to ``png`` (:mod:`frontier_plot`); returns its path."""
    try:
        return _plot(rows, peers_path, png, models, tag)
    except PlotError as e:
        raise FrontierError(str(e)) from None


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS,
                   help="the W8 control runs on its own (--no-control leaves it out)")
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="0 = no adapters (--method none)")
    p.add_argument("--labels", choices=tuple(LABEL_MODES), default="both")
    p.add_argument("--target-bits", nargs="+", type=float, default=[], metavar="T",
                   help="mixed-precision points instead of the grid: --target-bits T at the widest of --bits")
    p.add_argument("--no-control", action="store_true", help="leave out the W8 control runs")
    p.add_argument("--calib", type=int, default=DEFAULT_CALIB, help="calibration images (CIFAR: a multiple of 10)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rerun points already in the CSV")
    p.add_argument("--plot-only", action="store_true", help="redraw from the CSV, run nothing")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the CSV (read for the cache, appended to)")
    p.add_argument("--png", default=str(DEFAULT_PNG))
    p.add_argument("--peers", default=str(PEERS_CSV), help="the peers' CSV (bench/peers.py)")
    p.add_argument("--shared", default=None, help="folder with data/ and models/ (default: $CORA_SHARED or ../shared)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="as the CLI: auto = cuda when available")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if any(not 0 <= b <= 1 for b in args.budgets):
        p.error("--budgets must be in [0, 1]")
    if any(not t > 0 for t in args.target_bits):
        p.error("--target-bits must be positive")
    if args.plot_only and args.no_plot:
        p.error("--plot-only and --no-plot contradict each other")
    return args


def run(args) -> int:
    tag = config_tag(args.calib, args.eval_limit, args.seed)
    if not args.no_plot:
        try:
            _pyplot()  # a missing matplotlib fails now, not after hours of runs
        except PlotError as e:
            raise FrontierError(str(e)) from None
    if not args.plot_only:
        points = plan(args.models, args.bits, args.budgets, LABEL_MODES[args.labels], not args.no_control, tag,
                      args.target_bits)
        todo = pending(points, read_rows(args.out), args.force)
        print(f"# tag {tag}: {len(points)} points, {len(points) - len(todo)} already in {args.out}, {len(todo)} to run")
        wall = sweep(todo, args)
        if todo:
            print(f"# this invocation: {wall:.0f} s for {len(todo)} runs")
    rows = selected(read_rows(args.out), args.models, tag)
    print()
    print_table(rows, args.peers)
    if not args.no_plot:
        print(f"wrote {plot(rows, args.peers, args.png, args.models, tag)}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except FrontierError as e:
        print(f"frontier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frontier: interrupted; finished runs are in {args.out}, a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
