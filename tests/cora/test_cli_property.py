"""A property of the command line over random argument lists (hypothesis): every invocation ends
either with exit status 0 and a JSON object as the last stdout line, or with exit status 2 and
exactly one ``cora: error:`` line (the last on stderr; any other stderr line is a ``cora: warning:``);
never a traceback. An argument list with an invalid part must fail, one without must succeed.

Valid runs are kept cheap: ResNet-8 (random weights) on 10 or 20 calibration images, 1 or 2 search
iterations, at most 1 tuning iteration, no RTN baseline, at most 20 evaluation images (--eval-limit).
MAX_EXAMPLES (30) invocations per run, about a third of them valid (1-2.5 s each; the failing ones take
milliseconds): 10-30 s in all on one CPU thread here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cora.cli import main

MAX_EXAMPLES = 30


def _values(flag, values):
    return [[flag, v] for v in values]


# option -> the argument lists it may add ({tmp}: the test's folder); VALID ones are cheap
VALID = {
    "bits": _values("--bits", ["2", "3", "4", "8"]) + [[]],
    "budget": _values("--budget", ["0.05", "1", "1e-6", "0.5", "0.02"]) + [[]],
    "method": _values("--method", ["auto", "search", "uniform", "none", "cora", "heuristic", "rtn"]) + [[]],
    "loss": _values("--loss", ["auto", "kl", "ce"]) + [[]],
    "tune_loss": _values("--tune-loss", ["auto", "kl", "ce"]) + [[]],
    "seed": [["--seed", "0"], ["--seed", "7"], ["--seed", str(2**63 - 1)]] + [[]],
    "calib": _values("--calib", ["10", "20"]),
    "iters": _values("--iters", ["1", "2"]),
    "tune_iters": _values("--tune-iters", ["0", "1"]),
    "paper": [["--paper"], []],
    "per_tensor": [["--per-tensor"], []],
    "bn": [["--bn-reestimate"], []],
    "choices": [["--factorization", "weight"], ["--factorization", "activation"], ["--rounding", "nearest"],
                ["--range", "minmax"], ["--range", "std"], []],
    "skip": [["--skip", "conv1"], ["--skip", "layer1.*"], ["--skip", "linear"], ["--skip", "layer2.0.conv?", "--skip", "conv1"],
             []],
    "eval_split": _values("--eval-split", ["test", "holdout"]),
    "eval_limit": _values("--eval-limit", ["10", "20"]),
    "out": [["--out", "{tmp}/ok/model.safetensors"], []],
}
INVALID = {
    "bits": _values("--bits", ["5", "0", "four", "-4", "", "4.0"]),
    "budget": _values("--budget", ["0", "-0.1", "1.5", "nan", "inf", "-inf", "abc", ""]),
    "method": _values("--method", ["magic", "", "SEARCH"]),
    "loss": _values("--loss", ["mse", ""]),
    "tune_loss": _values("--tune-loss", ["l2", "CE"]),
    "seed": _values("--seed", ["-1", str(2**64), "1.5", "x"]),
    "calib": _values("--calib", ["0", "15", "5010", "-10", "ten", "1e3"]),
    "iters": _values("--iters", ["0", "-1", "1.5", ""]),
    "tune_iters": _values("--tune-iters", ["-1", "x", "0.5"]),
    "skip": [["--skip", "nomatch"], ["--skip", ""], ["--skip", "*"], ["--skip", "conv1", "--skip", "zzz*"]],
    "eval_split": _values("--eval-split", ["train", ""]),
    "eval_limit": _values("--eval-limit", ["0", "-5", "many"]),
    "out": [["--out", ""], ["--out", "{tmp}"], ["--out", "{tmp}/a_file.txt/model.safetensors"]],
    "threads": _values("--threads", ["0", "-1", str(2**31), "two"]),
    "bogus": [["--frobnicate"], ["--bits"], ["extra_positional"], ["--calib", "10", "--calib"], ["-x"]],
    "model": [["--weights", "{tmp}/missing.th"], ["--weights", "{tmp}"], ["--data", "{tmp}"]],
}


@st.composite
def invocations(draw):
    """(argument list with {tmp} placeholders, whether it has an invalid part)."""
    parts = {k: draw(st.sampled_from(v)) for k, v in VALID.items()}
    broken = draw(st.sampled_from([True, True, False]))  # about two thirds fail on purpose
    if broken:
        for key in draw(st.lists(st.sampled_from(sorted(INVALID)), min_size=1, max_size=2, unique=True)):
            parts[key] = draw(st.sampled_from(INVALID[key]))
    order = draw(st.permutations(sorted(parts)))
    argv = ["quantize", "cifar_resnet8", "--weights", "{tmp}/resnet8.th"]
    for key in order:
        argv += parts[key]
    return argv + ["--threads", "1", "--no-rtn", "--json", "--quiet"], broken


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from cora.experiments.models import cifar_resnet

    root = tmp_path_factory.mktemp("cli_property")
    torch.manual_seed(0)
    torch.save({"state_dict": cifar_resnet(8).state_dict()}, root / "resnet8.th")
    (root / "a_file.txt").write_text("not a folder")
    return root


@pytest.mark.slow
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=invocations())
def test_every_invocation_succeeds_with_json_or_fails_with_one_line(case, workdir, capsys):
    template, broken = case
    argv = [a.replace("{tmp}", str(workdir)) for a in template]
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, (argv, err)
    lines = [l for l in err.splitlines() if l.strip()]
    if rc == 0:
        assert not broken, (argv, "an invalid argument list succeeded")
        assert not any(l.startswith("cora: error:") for l in lines), (argv, err)
        result = json.loads(out.strip().splitlines()[-1])
        assert isinstance(result, dict) and 0 <= result["acc"] <= 100
        assert result["calib_images"] == int(argv[argv.index("--calib") + 1])
        assert result["eval_images"] == int(argv[argv.index("--eval-limit") + 1])
        if "--out" in argv:
            assert Path(result["checkpoint"]).is_file()
    else:
        assert rc == 2, (argv, rc, err)
        assert broken, (argv, "a valid argument list failed", err)
        errors = [l for l in lines if l.startswith("cora: error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)
        assert all(l.startswith("cora: warning:") for l in lines[:-1]), (argv, err)
        assert not (workdir / "ok").exists()  # nothing written for a failed run
    for f in (workdir / "ok").glob("*"):
        f.unlink()
    if (workdir / "ok").exists():
        (workdir / "ok").rmdir()
