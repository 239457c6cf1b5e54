"""The command line (cora/cli.py): clear one-line errors, and one bounded end-to-end run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cora.cli import main

ROOT = Path(__file__).resolve().parents[2]

BAD_ARGS = {
    "bits5": ["quantize", "cifar_resnet20", "--bits", "5"],
    "budget_neg": ["quantize", "cifar_resnet20", "--budget", "-1"],
    "budget_zero": ["quantize", "cifar_resnet20", "--budget", "0"],
    "budget_big": ["quantize", "cifar_resnet20", "--budget", "1.5"],
    "budget_text": ["quantize", "cifar_resnet20", "--budget", "five"],
    "missing_weights": ["quantize", "cifar_resnet20", "--weights", "/nonexistent/dir/resnet20.th"],
    "depth22": ["quantize", "cifar_resnet22"],
    "unknown_model": ["quantize", "not_a_model_xyz"],
    "calib_zero": ["quantize", "cifar_resnet20", "--calib", "0"],
    "iters_neg": ["quantize", "cifar_resnet20", "--iters", "-3"],
    "tune_iters_neg": ["quantize", "cifar_resnet20", "--tune-iters", "-1"],
    "tune_loss_bad": ["quantize", "cifar_resnet20", "--tune-loss", "mse"],
    "no_command": [],
    "bad_method": ["quantize", "cifar_resnet20", "--method", "magic"],
    "eval_missing_ckpt": ["eval", "--checkpoint", "/nonexistent/ckpt.safetensors"],
    "eval_nothing": ["eval"],
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.mark.parametrize("key", list(BAD_ARGS))
def test_bad_arguments_exit_2_one_line(key, capsys):
    rc = main(BAD_ARGS[key])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("cora: error:"), err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines[0]) > len("cora: error: ") + 5  # says something


def test_error_messages_are_specific(capsys):
    main(BAD_ARGS["depth22"])
    err = capsys.readouterr().err
    assert "6n+2" in err and "22" in err
    main(BAD_ARGS["bits5"])
    assert "--bits" in capsys.readouterr().err
    main(BAD_ARGS["unknown_model"])
    assert "not_a_model_xyz" in capsys.readouterr().err
    main(BAD_ARGS["budget_neg"])
    assert "budget" in capsys.readouterr().err
    main(BAD_ARGS["missing_weights"])
    assert "resnet20.th" in capsys.readouterr().err


def test_corrupt_checkpoint_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cora: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("key", ["bits5", "budget_zero"])
def test_subprocess_error_exit_2(key):
    p = subprocess.run([sys.executable, "-m", "cora", *BAD_ARGS[key]], capture_output=True, text=True, env=_env(),
                       cwd=str(ROOT), timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("cora: error:"), p.stderr
    assert "Traceback" not in p.stderr


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--help"])
    assert exc.value.code == 0 and "--budget" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- end to end
KEYS = ("float_acc", "acc", "adapter_fraction", "equiv_bits", "iterations", "calib_images", "search_seconds", "ranks")


def _run(args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "cora", *args, "--threads", "1"], capture_output=True, text=True,
                       env=_env(), cwd=str(ROOT), timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    last = [l for l in p.stdout.splitlines() if l.strip()][-1]
    return json.loads(last)


@pytest.mark.slow
@pytest.mark.parametrize("rtn", [False, True], ids=["no_rtn", "rtn"])
def test_end_to_end_quantize_then_eval(tmp_path, rtn):
    ckpt = tmp_path / "ckpt.safetensors"
    args = ["quantize", "cifar_resnet20", "--bits", "4", "--calib", "160", "--iters", "5", "--tune-iters", "5", "--json",
            "--quiet",
            "--eval-split", "holdout", "--out", str(ckpt)]
    if not rtn:
        args += ["--no-rtn", "--method", "uniform"]  # uniform ranks; the other run takes the default (auto)
    res = _run(args)
    for k in KEYS:
        assert k in res, k
    assert ("rtn_acc" in res) == rtn
    assert res["adapter_fraction"] <= 0.05
    # the CIFAR calibration set has labels: auto = ranks searched by CE, adapters tuned by CE
    assert res["method"] == ("search" if rtn else "uniform") and res["loss"] == "ce"
    assert res["iterations"] == (5 if rtn else 0) and res["calib_images"] == 160
    assert res["tune_iterations"] == 5 and res["tune_loss"] == "ce"
    assert 0 <= res["acc"] <= 100 and 0 <= res["float_acc"] <= 100
    assert res["acc"] > 50 and res["float_acc"] > 50  # the pretrained model, not noise
    assert res["equiv_bits"] > 4
    assert len(res["ranks"]) == 19 and all(r >= 0 for r in res["ranks"].values())
    assert ckpt.is_file()
    back = _run(["eval", "--checkpoint", str(ckpt), "--eval-split", "holdout", "--json"])
    assert back["acc"] == res["acc"]
    assert back["eval_images"] == res["eval_images"]


@pytest.mark.parametrize("old,new", [("cora", "search"), ("heuristic", "uniform"), ("rtn", "none")])
def test_old_method_names_still_work_with_a_warning(old, new, capsys):
    from cora.cli import build_parser

    args = build_parser().parse_args(["quantize", "cifar_resnet20", "--method", old])
    assert args.method == new
    err = capsys.readouterr().err
    assert "deprecated" in err and f"--method {new}" in err
    assert build_parser().parse_args(["quantize", "cifar_resnet20", "--method", new]).method == new
    assert capsys.readouterr().err == ""
