"""What every benchmark script shares: the commit it ran on, the GPU run's header and the CSV it writes."""
from __future__ import annotations

import csv
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "git_commit", "gpu_run_header", "write_csv", "append_csv", "machine", "versions"]


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
