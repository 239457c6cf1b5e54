"""What every benchmark script shares: the commit it ran on, the GPU run's header and the CSV it writes."""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "git_commit", "gpu_run_header", "write_csv"]


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
