"""The GPU benchmark scripts rehearsed on the CPU: ``bench/conv_fused.py`` and ``bench/model_e2e.py`` with
``--dry-run`` (Triton interpreter, tiny shapes: every provider and strategy, the CSV, the summary), their
``--help`` without importing torch, and ``bench/gpu_check.sh``'s argument handling.  The whole
``bash bench/gpu_check.sh --dry-run`` takes minutes and is not run here."""
from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("CORA_STRATEGY", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{args} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script", ["bench/conv_fused.py", "bench/model_e2e.py"])
def test_help_is_fast_and_imports_no_torch(script):
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    out = _run(["-c", code], timeout=60).stdout
    assert "--dry-run" in out and "--time-cap" in out
    assert out.strip().endswith("torch imported: False")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_arguments():
    script = str(ROOT / "bench" / "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    res = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "--dry-run" in res.stdout and "TOTAL_CAP" in res.stdout
    res = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown argument" in res.stderr


@pytest.mark.slow  # ~10 s: the imports and the interpreter
def test_conv_fused_dry_run(tmp_path):
    out, tuning = tmp_path / "cf.csv", tmp_path / "tuning.json"
    res = _run(["bench/conv_fused.py", "--dry-run", "--models", "resnet18", "--max-hw", "6", "--out", str(out),
                "--tuning", str(tuning)])
    assert "summary" in res.stdout and "not a measurement" in res.stdout
    (row,) = _rows(out)
    assert row["dry_run"] == "True" and row["model"] == "resnet18" and row["batch"] == "1"
    assert row["chosen"].startswith("fused:") and row["fused_choice"].startswith("fused:")
    for name in ("cudnn", "unfused", "chosen", "fused", "dequant", "fp16w"):
        assert math.isfinite(float(row[f"{name}_us"])), name
    for name in ("chosen", "fused", "dequant", "fp16w"):
        assert float(row[f"err_{name}"]) < 1e-2, name
    assert tuning.is_file()  # written after the row (no entries under the interpreter)
    # --append adds rows under the same header
    _run(["bench/conv_fused.py", "--dry-run", "--models", "resnet18", "--max-hw", "6", "--out", str(out), "--append",
          "--providers", "dequant"])
    rows = _rows(out)
    assert len(rows) == 2 and math.isnan(float(rows[1]["fused_us"])) and math.isfinite(float(rows[1]["dequant_us"]))


@pytest.mark.slow  # ~10 s
def test_model_e2e_dry_run(tmp_path):
    out = tmp_path / "e2e.csv"
    res = _run(["bench/model_e2e.py", "--dry-run", "--models", "cifar_resnet8", "--image", "8", "--out", str(out),
                "--tune-seconds", "5"])
    assert "memory (bytes held" in res.stdout
    rows = {r["provider"]: r for r in _rows(out)}
    assert set(rows) == {"cudnn", "cora_w4_chosen", "cora_w4_fused", "cora_w4_dequant"}
    convs = 7  # cifar_resnet8: the stem and two convs in each of three blocks
    assert (rows["cora_w4_chosen"]["n_fused"], rows["cora_w4_chosen"]["n_dequant"]) == (str(convs), "0")
    assert (rows["cora_w4_dequant"]["n_fused"], rows["cora_w4_dequant"]["n_dequant"]) == ("0", str(convs))
    assert int(rows["cora_w4_dequant"]["scratch_bytes"]) > 0
    for r in rows.values():
        assert math.isfinite(float(r["median_ms"])) and r["dry_run"] == "True"
    packed = rows["cora_w4_fused"]
    assert int(packed["weight_bytes"]) < 0.35 * int(packed["fp16_bytes"])
    assert float(packed["rel_err_vs_converted"]) < 1e-4
