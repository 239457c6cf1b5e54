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
           "host_time_us", "add_tuning_option", "load_tuning_file", "save_tuning_file"]


def git_commit() -> str:
    """Short hash of the checked-out commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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


def time_in_graph(fn, do_bench) -> list[float]:
    """(median, p20, p80) ms of ``fn()`` replayed from a CUDA graph: the GPU's time alone, no launch overhead.

    ``fn`` is warmed up twice on a side stream (autotuning, allocator) before the capture; the number of timed
    replays adapts to ``fn``'s duration (at least ~20).  ``do_bench`` is ``triton.testing.do_bench``.
    """
    import time

    import torch

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t) * 1e3
    rep = min(2000.0, max(100.0, 20 * est_ms))
    q = do_bench(graph.replay, warmup=max(25.0, 3 * est_ms), rep=rep, quantiles=[0.5, 0.2, 0.8])
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
