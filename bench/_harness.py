"""What every benchmark script shares: the commit it ran on, the GPU run's header and the CSV it writes."""
from __future__ import annotations

import csv
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "git_commit", "gpu_run_header", "write_csv", "append_csv", "machine", "versions", "time_in_graph",
           "host_time_us", "add_tuning_option", "load_tuning_file", "save_tuning_file", "graph_stream", "record_choices",
           "choice_text", "strategy_env", "cpu_time_ms", "interpret_if"]


def git_commit() -> str:
    """Short hash of the checked-out commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def dry_run_header(prefix: str, out: str | None, what: str) -> tuple[dict, str]:
    """Metadata of a CPU dry run (the Triton interpreter; printed with ``what``, the sizes used) and its CSV
    path (``out`` or ``<tmp>/<prefix>_dryrun.csv``): the code paths of a GPU run, not a measurement."""
    import os
    import tempfile

    import torch

    meta = dict(device="cpu (Triton interpreter, dry run)", torch=torch.__version__, commit="dry-run")
    print(f"# dry run: CPU, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}, {what}; "
          f"the times below are the interpreter's, not a measurement")
    return meta, out or os.path.join(tempfile.gettempdir(), f"{prefix}_dryrun.csv")


def gpu_run_header(prefix: str, device, out: str | None) -> tuple[dict, str]:
    """Metadata of a GPU run (device name, torch/triton versions, commit; printed) and its CSV path.

    The path is ``out`` or ``bench/results/<prefix>_<device name>.csv``; its folder is created.
    """
    import torch
    import triton

    name = torch.cuda.get_device_name(device)
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, commit=git_commit())
    print(f"# {meta}")
    path = out or str(ROOT / "bench" / "results" / f"{prefix}_{name.replace(' ', '_').replace('/', '_')}.csv")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return meta, path


def write_csv(rows: list[dict], path) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path``; nothing is written for no rows."""
    if not rows:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def machine() -> str:
    """The host's CPU model and core count (e.g. "AMD EPYC 7763 64-Core Processor, 2 cores")."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def versions(*packages: str) -> dict:
    """``{package: version}`` of installed distributions, "absent" for those that are not installed."""
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def append_csv(rows: list[dict], path) -> None:
    """Append ``rows`` to ``path``, keeping earlier runs; a header that differs (new columns) is merged and the
    file rewritten with the union of the columns, old rows getting empty cells."""
    if not rows:
        return
    path = Path(path)
    old: list[dict] = []
    fields = list(rows[0].keys())
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if old_fields != fields:
                old = list(reader)
                fields = old_fields + [k for k in fields if k not in old_fields]
            else:
                old = None  # same header: a plain append
    if old is None:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerows(rows)
        return
    write_csv([{k: r.get(k, "") for k in fields} for r in old + rows], path)


_GRAPH_STREAM = None


def graph_stream():
    """The one side stream on which :func:`time_in_graph` warms up and captures (created on first use).

    Warm-up and capture share it, so whatever the warm-up set up lazily for that stream (allocator pools, the
    dequantize strategy's scratch buffer of ``cora_kernels.scratch``) is in place when the capture starts; one
    stream for the whole process also means one pool of such buffers, not one per graph timed."""
    global _GRAPH_STREAM
    import torch

    if _GRAPH_STREAM is None:
        _GRAPH_STREAM = torch.cuda.Stream()
    return _GRAPH_STREAM


def time_in_graph(fn, do_bench, *, min_rep_ms: float = 100.0, stream=None) -> list[float]:
    """(median, p20, p80) ms of ``fn()`` replayed from a CUDA graph: the GPU's time alone, no launch overhead.

    ``fn`` is warmed up twice on ``stream`` (default :func:`graph_stream`; autotuning, allocator, scratch
    buffers) and captured on that same stream; the number of timed replays adapts to ``fn``'s duration (at
    least ``min_rep_ms`` of replays, ~20 of them).  ``do_bench`` is ``triton.testing.do_bench``.
    """
    import time

    import torch

    side = stream if stream is not None else graph_stream()
    torch.cuda.synchronize()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, stream=side):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t) * 1e3
    rep = min(2000.0, max(float(min_rep_ms), 20 * est_ms))
    q = do_bench(graph.replay, warmup=max(min(25.0, min_rep_ms), 3 * est_ms), rep=rep, quantiles=[0.5, 0.2, 0.8])
    del graph
    return q


def host_time_us(fn, calls: int = 50) -> float:
    """Mean CPU time (µs) to issue one ``fn()`` without waiting for the GPU: the launch overhead that a CUDA graph
    removes.  The queue is drained before and after; ``calls`` launches do not fill it."""
    import time

    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return host


def add_tuning_option(ap) -> None:
    """``--tuning FILE``: the kernel launch choices read from FILE at the start (when it exists) and written back
    after every row, so the compile-and-time cost of autotuning is paid once per GPU model, also across runs
    that a time limit stops."""
    ap.add_argument("--tuning", default=None, metavar="FILE",
                    help="JSON of tuned launch choices: read first if it exists, rewritten after every row")


def load_tuning_file(path) -> None:
    """Merge the tuned choices of ``path`` (when given and present) and say how many were read."""
    if path and Path(path).is_file():
        from cora_kernels.tuning import load_tuning

        print(f"# tuned launch choices read from {path}: {load_tuning(path)}")


def save_tuning_file(path) -> None:
    """Write this process's tuned choices to ``path`` (when given), replacing it atomically."""
    if path:
        from cora_kernels.tuning import save_tuning

        tmp = Path(f"{path}.tmp")
        save_tuning(tmp)
        os.replace(tmp, path)


def random_model(arch: str, size: int, calib: int, **kwargs):
    """A torchvision ``arch`` with random weights (seed 0) and BatchNorm statistics fitted on random images,
    in eval mode, with ``calib`` calibration images and 8 probe images ``[N, 3, size, size]`` (seeded):
    ``(model, images, probe)``. The random-weight stand-in of the architecture benchmarks."""
    import torch
    import torchvision

    from cora.statistics import reestimate_batchnorm

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(calib, 3, size, size, generator=gen)
    probe = torch.randn(8, 3, size, size, generator=gen)
    reestimate_batchnorm(model, torch.randn(32, 3, size, size, generator=gen), batch_size=16)
    return model.eval(), images, probe


# ---------------------------------------------------------------------------------------------- strategies
class record_choices:
    """``with record_choices() as seen:`` -- every launch choice the Triton conv makes inside the block, in
    order: ``seen`` is a list of ``cora_kernels.tuning.TuneChoice`` (strategy, config, split-K) returned by
    ``cora_kernels.tuning.select_config``.  Calls forced by ``strategy="dequant"`` / ``CORA_STRATEGY=dequant``
    with no tuner involved are not seen.  Wraps the module attribute that the launcher calls; restores it."""

    def __enter__(self) -> list:
        from cora_kernels import tuning

        self._mod = tuning
        self._orig = tuning.select_config
        seen: list = []
        orig = self._orig

        def wrapped(*args, **kwargs):
            choice = orig(*args, **kwargs)
            seen.append(choice)
            return choice

        tuning.select_config = wrapped
        return seen

    def __exit__(self, *exc) -> None:
        self._mod.select_config = self._orig


def choice_text(choice) -> str:
    """``dequant`` or ``fused:<config name>/split<k>`` for a ``TuneChoice`` (``-`` for None)."""
    if choice is None:
        return "-"
    if choice.strategy != "fused" or choice.config is None:
        return choice.strategy
    return f"fused:{choice.config.name}/split{choice.split_k}"


class strategy_env:
    """``with strategy_env("fused"):`` -- ``CORA_STRATEGY`` set inside the block (read by the kernels at call
    time: warm-up, tuning and capture inside the block follow it), restored to what it was afterwards."""

    def __init__(self, value: str | None):
        self.value = value

    def __enter__(self):
        self._old = os.environ.get("CORA_STRATEGY")
        if self.value is None:
            os.environ.pop("CORA_STRATEGY", None)
        else:
            os.environ["CORA_STRATEGY"] = self.value
        return self

    def __exit__(self, *exc) -> None:
        if self._old is None:
            os.environ.pop("CORA_STRATEGY", None)
        else:
            os.environ["CORA_STRATEGY"] = self._old


def cpu_time_ms(fn, reps: int = 2) -> list[float]:
    """(median, min, max) ms of ``reps`` plain calls after one untimed call: the dry runs' stand-in for the GPU
    timings (under the Triton interpreter these numbers measure the interpreter, nothing else)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(times), min(times), max(times)]


def interpret_if(dry_run: bool) -> None:
    """For a ``--dry-run``: ``TRITON_INTERPRET=1`` (the Triton kernels run on CPU tensors), which Triton reads
    when it is imported; SystemExit if Triton was already imported without it."""
    import sys

    if not dry_run:
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before Triton is imported; run the script in a "
                         "fresh process (or set TRITON_INTERPRET=1 yourself)")
    os.environ["TRITON_INTERPRET"] = "1"
