"""The command line (cora/cli.py): every failure is one ``cora: error:`` line, exit status 2 (user
errors), 1 (internal errors) or 130 (interrupted), no traceback, nothing written where ``--out``
points; and one bounded end-to-end run."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch

from cora.cli import main

ROOT = Path(__file__).resolve().parents[2]

# cheap settings; the bad invocations below fail before any work, whatever they are.  --device cpu: the results
# these tests compare were recorded on the CPU, and "auto" would take a GPU where there is one (a later
# --device in an invocation wins); test_quantize_on_cuda runs the command on a GPU.
CHEAP = ["--calib", "10", "--iters", "1", "--tune-iters", "1", "--no-rtn", "--quiet", "--threads", "1", "--eval-split", "holdout",
         "--device", "cpu"]
# the cheapest valid run: ResNet-8 (random weights, see Resources.r8_weights) on 10 images, 20 evaluated
FAST = [*CHEAP, "--eval-limit", "20"]


@pytest.fixture(autouse=True)
def _private_eval_cache(tmp_path_factory, monkeypatch):
    """quantize caches its float / RTN accuracies (cora.experiments.eval_cache): here in a folder of this
    module's own, never the user's cache (subprocesses inherit it through _env)."""
    monkeypatch.setenv("CORA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "eval_cache"))


class Resources:
    """Files the bad invocations need, made once per module and only when asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @cached_property
    def r8_weights(self) -> Path:
        from cora.experiments.models import cifar_resnet

        torch.manual_seed(0)
        path = self.root / "resnet8.th"
        torch.save({"state_dict": cifar_resnet(8).state_dict()}, path)
        return path

    @cached_property
    def checkpoint(self) -> Path:
        """A quantized ResNet-8, written by the command line itself."""
        path = self.root / "ckpt" / "r8.safetensors"
        assert main(["quantize", "cifar_resnet8", "--weights", str(self.r8_weights), *FAST, "--out", str(path)]) == 0
        return path

    @cached_property
    def checkpoint_without_name(self) -> Path:
        from cora.checkpoint import load, save

        model = load(self.checkpoint)
        model.cora_architecture = None
        path = self.root / "ckpt" / "r8_anonymous.safetensors"
        save(model, path, architecture=None)
        return path

    def _images(self, name: str, corrupt: bool) -> Path:
        from PIL import Image

        rng = np.random.default_rng(0)
        root = self.root / name
        for c in ("cat", "dog"):
            (root / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
        if corrupt:
            (root / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
        return root

    @cached_property
    def images(self) -> Path:
        return self._images("images", corrupt=False)

    @cached_property
    def corrupt_images(self) -> Path:
        return self._images("corrupt_images", corrupt=True)

    @cached_property
    def empty_folder(self) -> Path:
        (self.root / "empty").mkdir()
        return self.root / "empty"

    @cached_property
    def squeezenet1_0_weights(self) -> Path:
        """A torchvision state dict of the wrong architecture for squeezenet1_1."""
        import torchvision

        path = self.root / "squeezenet1_0.pt"
        torch.save(torchvision.models.get_model("squeezenet1_0").state_dict(), path)
        return path

    @cached_property
    def a_file(self) -> Path:
        path = self.root / "a_file.txt"
        path.write_text("a file, not a folder")
        return path


@pytest.fixture(scope="module")
def res(tmp_path_factory) -> Resources:
    return Resources(tmp_path_factory.mktemp("cli_resources"))


def _q(*args):  # a quantize invocation that would be cheap-ish if it got past its error
    return ["quantize", "cifar_resnet20", *CHEAP, *args]


# name -> (argv builder: (Resources, tmp_path) -> list, a piece of the expected message, or a builder of it)
BAD = {
    # arguments
    "bits5": (lambda r, t: ["quantize", "cifar_resnet20", "--bits", "5"], "--bits"),
    "budget_neg": (lambda r, t: ["quantize", "cifar_resnet20", "--budget", "-1"], "budget"),
    "budget_zero": (lambda r, t: ["quantize", "cifar_resnet20", "--budget", "0"], "budget"),
    "budget_big": (lambda r, t: ["quantize", "cifar_resnet20", "--budget", "1.5"], "budget"),
    "budget_text": (lambda r, t: ["quantize", "cifar_resnet20", "--budget", "five"], "budget"),
    "budget_nan": (lambda r, t: ["quantize", "cifar_resnet20", "--budget", "nan"], "budget"),
    "calib_zero": (lambda r, t: ["quantize", "cifar_resnet20", "--calib", "0"], "--calib"),
    "device_unknown": (lambda r, t: _q("--device", "tpu"), "--device"),
    "no_labels_with_ce": (lambda r, t: _q("--no-labels", "--method", "search", "--loss", "ce"), "labelled calibration data"),
    "no_labels_tune_ce": (lambda r, t: _q("--no-labels", "--tune-loss", "ce"), "labelled calibration data"),
    "calib_not_multiple_of_10": (lambda r, t: _q("--calib", "15"), "multiple of 10"),
    "calib_too_many": (lambda r, t: _q("--calib", "5010"), "multiple of 10"),
    "iters_neg": (lambda r, t: ["quantize", "cifar_resnet20", "--iters", "-3"], "--iters"),
    "tune_iters_neg": (lambda r, t: ["quantize", "cifar_resnet20", "--tune-iters", "-1"], "--tune-iters"),
    "tune_iters_text": (lambda r, t: ["quantize", "cifar_resnet20", "--tune-iters", "x"], "--tune-iters"),
    "tune_loss_bad": (lambda r, t: ["quantize", "cifar_resnet20", "--tune-loss", "mse"], "--tune-loss"),
    "tune_lr_zero": (lambda r, t: ["quantize", "cifar_resnet20", "--tune-lr", "0"], "--tune-lr"),
    "bad_method": (lambda r, t: ["quantize", "cifar_resnet20", "--method", "magic"], "magic"),
    "seed_neg": (lambda r, t: ["quantize", "cifar_resnet20", "--seed", "-1"], "--seed"),
    "seed_huge": (lambda r, t: _q("--seed", str(2**64)), "--seed"),
    "threads_zero": (lambda r, t: _q("--threads", "0"), "--threads"),
    "threads_absurd": (lambda r, t: _q("--threads", str(2**31)), "--threads"),
    "eval_limit_zero": (lambda r, t: _q("--eval-limit", "0"), "--eval-limit"),
    "eval_split_bad": (lambda r, t: _q("--eval-split", "train"), "--eval-split"),
    "bogus_flag": (lambda r, t: _q("--frobnicate"), "--frobnicate"),
    "no_command": (lambda r, t: [], "command"),
    "bad_command": (lambda r, t: ["convert", "cifar_resnet20"], "convert"),
    "quantize_no_model": (lambda r, t: ["quantize"], "model"),
    "skip_no_match": (lambda r, t: _q("--skip", "nomatch"), "nomatch"),
    "skip_everything": (lambda r, t: _q("--skip", "*"), "no Conv2d or Linear layer"),
    "skip_empty": (lambda r, t: _q("--skip", ""), "skip"),
    # models and weights
    "depth22": (lambda r, t: ["quantize", "cifar_resnet22"], "6n+2"),
    "unknown_model": (lambda r, t: ["quantize", "not_a_model_xyz"], "not_a_model_xyz"),
    "missing_weights": (lambda r, t: ["quantize", "cifar_resnet20", "--weights", "/nonexistent/dir/resnet20.th"], "resnet20.th"),
    "weights_a_folder": (lambda r, t: _q("--weights", str(t)), "could not find"),
    "weights_wrong_depth": (lambda r, t: _q("--weights", str(r.r8_weights)), "blocks per stage"),
    "tv_weights_wrong_arch": (lambda r, t: ["quantize", "squeezenet1_1", "--weights", str(r.squeezenet1_0_weights),
                                            "--data", str(r.images), *CHEAP], "does not fit squeezenet1_1"),
    "eval_tv_weights_wrong_arch": (lambda r, t: ["eval", "squeezenet1_1", "--weights", str(r.squeezenet1_0_weights),
                                                 "--data", str(r.images), "--threads", "1"], "missing keys"),
    "shared_empty": (lambda r, t: _q("--shared", str(r.empty_folder)), "could not find"),
    # data
    "holdout_calib_all": (lambda r, t: _q("--calib", "5000"), "no held-out images"),
    "data_for_cifar": (lambda r, t: _q("--data", str(r.images)), "--data"),
    "tv_without_data": (lambda r, t: ["quantize", "squeezenet1_1", *CHEAP], "--data"),
    "data_missing": (lambda r, t: ["quantize", "squeezenet1_1", "--data", str(t / "nope"), *CHEAP], "does not exist"),
    "data_empty": (lambda r, t: ["eval", "squeezenet1_1", "--data", str(r.empty_folder)], "no images"),
    "data_corrupt_image_quantize": (lambda r, t: ["quantize", "squeezenet1_1", "--data", str(r.corrupt_images), *CHEAP],
                                    "1.png"),
    "data_corrupt_image_eval": (lambda r, t: ["eval", "squeezenet1_1", "--data", str(r.corrupt_images), "--threads", "1"],
                                "1.png"),
    "data_holdout_empty": (lambda r, t: ["quantize", "squeezenet1_1", "--data", str(r.images), *CHEAP], "no held-out images"),
    # --out: refused before any work
    "out_empty": (lambda r, t: _q("--out", ""), "empty"),
    "out_existing_folder": (lambda r, t: _q("--out", str(r.root)), "folder"),
    "out_under_a_file": (lambda r, t: _q("--out", str(r.a_file / "model.safetensors")), "a_file.txt"),
    "out_trailing_separator": (lambda r, t: _q("--out", str(t / "newdir") + os.sep), "newdir"),
    # eval
    "eval_nothing": (lambda r, t: ["eval"], "--checkpoint"),
    "eval_missing_ckpt": (lambda r, t: ["eval", "--checkpoint", "/nonexistent/ckpt.safetensors"], "ckpt.safetensors"),
    "eval_ckpt_a_folder": (lambda r, t: ["eval", "--checkpoint", str(t)], lambda r, t: str(t)),
    "eval_model_not_the_checkpoints": (lambda r, t: ["eval", "cifar_resnet20", "--checkpoint", str(r.checkpoint)],
                                       "cifar_resnet8"),
    "eval_checkpoint_and_weights": (lambda r, t: ["eval", "--checkpoint", str(r.checkpoint), "--weights", str(r.r8_weights)],
                                    "--weights"),
    "eval_checkpoint_records_no_name": (lambda r, t: ["eval", "--checkpoint", str(r.checkpoint_without_name)],
                                        "records no model name"),
    "eval_checkpoint_data_for_cifar": (lambda r, t: ["eval", "--checkpoint", str(r.checkpoint), "--data", str(r.images)],
                                       "--data"),
}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check_one_error_line(rc: int, out: str, err: str, code: int = 2) -> str:
    assert rc == code, (rc, out, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("cora: error:"), err
    assert len(lines[0]) > len("cora: error: ") + 5  # says something
    assert "Traceback" not in err and "Traceback" not in out
    return lines[0]


@pytest.mark.parametrize("key", list(BAD))
def test_bad_invocation_one_line_exit_2_nothing_written(key, res, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CORA_DEBUG", raising=False)
    build, expected = BAD[key]
    argv = build(res, tmp_path)
    out_target = tmp_path / "out" / "model.safetensors"
    if argv[:1] == ["quantize"] and "--out" not in argv:
        argv = [*argv, "--out", str(out_target)]
    watched = [tmp_path, res.root]
    before = [_files(d) for d in watched]
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    line = _check_one_error_line(rc, out, err)
    assert (expected(res, tmp_path) if callable(expected) else expected) in line, line
    assert len(line) < 1200, line  # a summary, not a dump
    assert not out_target.parent.exists()
    assert [_files(d) for d in watched] == before  # nothing created: no checkpoint, no temporaries, no folders


@pytest.mark.parametrize("key", [k for k in BAD if k.startswith("out_")] + ["data_for_cifar", "seed_huge", "threads_absurd"])
def test_refused_before_any_work(key, res, tmp_path, monkeypatch, capsys):
    """A bad --out (or option) is refused before the model is even loaded, not after the quantization."""
    import cora.experiments.pipeline as pipeline

    def work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(pipeline, "load_float_model", work)
    monkeypatch.setattr(pipeline, "quantize_and_evaluate", work)
    build, expected = BAD[key]
    rc = main(build(res, tmp_path))
    line = _check_one_error_line(rc, *capsys.readouterr())
    assert expected in line


def test_error_messages_are_specific(res, tmp_path, capsys):
    main(["quantize", "squeezenet1_1", "--weights", str(res.squeezenet1_0_weights), "--data", str(res.images), *CHEAP])
    err = capsys.readouterr().err
    # the file, the model, and a summary: counts, the first few names, the shape mismatches
    assert str(res.squeezenet1_0_weights) in err and "squeezenet1_1" in err
    assert "12 missing keys" in err and "12 unexpected keys" in err and "shape mismatches" in err
    assert "features.0.weight (96, 3, 7, 7) vs (64, 3, 3, 3)" in err
    main(["eval", "squeezenet1_1", "--data", str(res.corrupt_images)])
    assert str(res.corrupt_images / "dog" / "1.png") in capsys.readouterr().err
    main(_q("--calib", "5000"))
    err = capsys.readouterr().err
    assert "5000" in err and "--eval-split test" in err


def test_help_exits_zero(capsys):
    assert main(["quantize", "--help"]) == 0
    assert "--budget" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "CORA_DEBUG" in capsys.readouterr().out


# ------------------------------------------------------------------------- exit status policy
def test_internal_error_exit_1_one_line(monkeypatch, capsys):
    import cora.experiments.pipeline as pipeline

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(pipeline, "quantize_and_evaluate", broken)
    monkeypatch.delenv("CORA_DEBUG", raising=False)
    rc = main(["quantize", "cifar_resnet20"])
    out, err = capsys.readouterr()
    line = _check_one_error_line(rc, out, err, code=1)
    assert line == ("cora: error: internal error: TypeError: unsupported operand type(s) for +: 'int' and 'NoneType' "
                    "(set CORA_DEBUG=1 for the traceback)")


@pytest.mark.parametrize("exc,code", [(TypeError("bad type"), 1), (RuntimeError("shape mismatch"), 1), (KeyError("key"), 1),
                                      (ValueError("bad value"), 2), (OSError(errno.ENOSPC, "No space left on device"), 2),
                                      (PermissionError(errno.EACCES, "Permission denied"), 2), (MemoryError(), 2),
                                      (KeyboardInterrupt(), 130)])
def test_every_exception_is_one_line(exc, code, monkeypatch, capsys):
    import cora.experiments.pipeline as pipeline

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(pipeline, "quantize_and_evaluate", fail)
    monkeypatch.delenv("CORA_DEBUG", raising=False)
    rc = main(["quantize", "cifar_resnet20"])
    out, err = capsys.readouterr()
    line = _check_one_error_line(rc, out, err, code=code)
    if code == 130:
        assert line == "cora: error: interrupted"


def test_cora_debug_prints_the_traceback(monkeypatch, capsys):
    import cora.experiments.pipeline as pipeline

    monkeypatch.setenv("CORA_DEBUG", "1")
    assert main(["quantize", "cifar_resnet20", "--calib", "15", "--threads", "1"]) == 2  # user errors too
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("cora: error: cannot calibrate on 15 CIFAR-10 images (--calib)")

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(pipeline, "quantize_and_evaluate", broken)
    assert main(["quantize", "cifar_resnet20"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("cora: error: internal error: TypeError: a bug")


def test_python_warnings_are_one_line(monkeypatch, capsys):
    import warnings

    import cora.experiments.pipeline as pipeline

    def noisy(*args, **kwargs):
        warnings.warn("something odd\nover two lines", UserWarning)
        raise ValueError("and then it failed")

    monkeypatch.setattr(pipeline, "quantize_and_evaluate", noisy)
    assert main(["quantize", "cifar_resnet20"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["cora: warning: UserWarning: something odd over two lines", "cora: error: and then it failed"]


def test_deprecated_method_warning_only_when_parsing_succeeds(capsys):
    assert main(["quantize", "cifar_resnet20", "--method", "cora", "--bits", "5"]) == 2
    _check_one_error_line(2, *capsys.readouterr())


# ------------------------------------------------------------------------- --out at the end
def test_late_save_failure_keeps_the_results(res, tmp_path, monkeypatch, capsys):
    """The disk fills up while the checkpoint is written: nothing is left under --out, the results
    are printed (JSON last), the model is saved to the temp folder and the error line says where."""
    import safetensors.torch

    real = safetensors.torch.save_file
    out = tmp_path / "results" / "model.safetensors"
    out.parent.mkdir()

    def disk_full(tensors, filename, *args, **kwargs):
        if Path(filename).parent == out.parent:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    rescue = tmp_path / "tmp"
    rescue.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(rescue))
    rc = main(["quantize", "cifar_resnet8", "--weights", str(res.r8_weights), *FAST, "--json", "--out", str(out)])
    stdout, err = capsys.readouterr()
    line = _check_one_error_line(rc, stdout, err)
    assert f"could not write the checkpoint {out}" in line and "No space left on device" in line
    saved = list(rescue.glob("cora-cifar_resnet8-*.safetensors"))
    assert len(saved) == 1 and f"saved to {saved[0]} instead" in line
    assert list(rescue.iterdir()) == saved
    assert list(out.parent.iterdir()) == []  # no checkpoint, no temporary
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == str(saved[0]) and "No space left" in result["checkpoint_error"]
    assert "acc" in result and result["eval_images"] == 20
    assert "cifar_resnet8  (20 holdout images)" in stdout
    # where the time went: one line, and the same in the JSON (the conversion's phases included)
    assert {"load", "float", "convert", "eval", "total"} <= set(result["seconds"])
    assert {"quantize", "search", "build", "tune"} <= set(result["seconds"]["phases"])
    assert len([l for l in stdout.splitlines() if l.strip().startswith("time ")]) == 1

    from cora.checkpoint import load

    assert load(saved[0]).cora_report.calib_images == 10


def test_late_save_failure_nowhere_to_rescue(res, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    rescue = tmp_path / "tmp"
    rescue.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(rescue))
    out = tmp_path / "new" / "deeper" / "model.safetensors"
    rc = main(["quantize", "cifar_resnet8", "--weights", str(res.r8_weights), *FAST, "--json", "--out", str(out)])
    stdout, err = capsys.readouterr()
    line = _check_one_error_line(rc, stdout, err)
    assert "failed too" in line and "results printed are all that is left" in line
    assert not (tmp_path / "new").exists() and list(rescue.iterdir()) == []  # the folders made for it are gone too
    assert "checkpoint" not in json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- eval
def test_eval_checkpoint_model_name(res, capsys):
    assert main(["eval", "cifar_resnet8", "--checkpoint", str(res.checkpoint), "--eval-limit", "20", "--json"]) == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert same["model"] == "cifar_resnet8" and same["eval_images"] == 20 and same["eval_split"] == "test"
    # a checkpoint that records no model: MODEL names it
    assert main(["eval", "cifar_resnet8", "--checkpoint", str(res.checkpoint_without_name), "--eval-limit", "20",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] == same["acc"]


def test_eval_holdout_of_a_checkpoint_is_its_own_complement(res, capsys, monkeypatch):
    import cora.experiments.data as data

    checkpoint = res.checkpoint  # made (and evaluated) before evaluate is replaced
    seen = []
    monkeypatch.setattr(data, "evaluate", lambda model, ds, **kw: seen.append(ds) or 50.0)  # the set, not the accuracy
    assert main(["eval", "--checkpoint", str(checkpoint), "--eval-split", "holdout", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_images"] == 5000 - 10 == len(seen[0])
    # the checkpoint was calibrated on the first image of each class: none of them is evaluated
    calib = data.cifar10_calibration(10)
    assert not (seen[0].images[:, None] == calib.images[None]).flatten(2).all(2).any()


def test_checkpoint_with_model_kwargs(res, tmp_path, capsys):
    """A checkpoint that records constructor arguments is rebuilt with them."""
    from cora.checkpoint import load, save

    model = load(res.checkpoint)
    path = tmp_path / "kw.safetensors"
    save(model, path, architecture={"name": "cifar_resnet8", "kwargs": {"num_classes": 10}})
    assert main(["eval", "--checkpoint", str(path), "--eval-limit", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_images"] == 10


# ------------------------------------------------------------------------- python -m cora
def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CORA_DEBUG", None)
    env.update(extra)
    return env


@pytest.mark.parametrize("key", ["bits5", "out_existing_folder"])
def test_subprocess_error_exit_2(key, res, tmp_path):
    argv = BAD[key][0](res, tmp_path)
    before = _files(res.root)
    p = subprocess.run([sys.executable, "-m", "cora", *argv], capture_output=True, text=True, env=_env(),
                       cwd=str(ROOT), timeout=120)
    line = _check_one_error_line(p.returncode, p.stdout, p.stderr)
    assert BAD[key][1] in line
    assert _files(res.root) == before


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
    # the first 100 / 150 held-out images of each class (all 4,840: test_pipeline.py, without the model runs)
    limit = ["--eval-limit", "1000" if not rtn else "1500"]
    args += limit
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
    assert res["eval_images"] == (1500 if rtn else 1000)
    assert 0 <= res["acc"] <= 100 and 0 <= res["float_acc"] <= 100
    assert res["acc"] > 50 and res["float_acc"] > 50  # the pretrained model, not noise
    assert res["equiv_bits"] > 4
    assert len(res["ranks"]) == 20 and all(r >= 0 for r in res["ranks"].values())  # 19 convs and the linear head
    assert ckpt.is_file()
    from cora.checkpoint import read_metadata

    recorded = read_metadata(ckpt)["evaluation"]  # what cora serve shows as the model's accuracy
    assert recorded["acc"] == res["acc"] and recorded["eval_images"] == res["eval_images"]
    back = _run(["eval", "--checkpoint", str(ckpt), "--eval-split", "holdout", "--json", *limit])
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


def test_tuning_options_reach_the_config():
    from cora.cli import _config, build_parser

    parse = lambda *extra: _config(build_parser().parse_args(["quantize", "cifar_resnet20", *extra]))  # noqa: E731
    default = parse()
    assert default.tune.norms is True and default.tune.lr is None  # None: the tuning loss's own rate
    changed = parse("--tune-lr", "0.004", "--no-tune-norms")
    assert changed.tune.norms is False and changed.tune.lr == 0.004
    assert default.grouped_bits == 8 and parse("--grouped-bits", "3").grouped_bits == 3
    assert parse("--paper").grouped_bits is None
    assert default.target_bits is None and parse("--target-bits", "2.85").target_bits == 2.85


def test_device_cuda_without_a_gpu_is_one_error_line(capsys, monkeypatch):
    import torch

    from cora.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (_q("--device", "cuda"), ["eval", "cifar_resnet20", "--device", "cuda"]):
        rc = main(command)
        captured = capsys.readouterr()
        line = _check_one_error_line(rc, captured.out, captured.err)
        assert "--device cuda" in line and "no CUDA GPU" in line


def test_device_auto_resolves_to_what_is_available(monkeypatch):
    import torch

    from cora.cli import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda") == torch.device("cuda")


def test_no_labels_calibrates_without_them(res, capsys):
    """--no-labels: the conversion sees images only, so auto means uniform ranks and, for the explicit --tune-iters
    (kept, not turned off), block reconstruction; with labels the same run searches and tunes by cross-entropy."""
    runs = {}
    for flag in ([], ["--no-labels"]):
        assert main(["quantize", "cifar_resnet8", "--weights", str(res.r8_weights), *FAST, "--json", *flag]) == 0
        runs[bool(flag)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs[True]["labels"] is False and runs[True]["method"] == "uniform" and runs[True]["loss"] == "kl"
    assert runs[True]["tune_loss"] == "blocks" and runs[True]["tune_iterations"] > 0
    assert runs[False]["labels"] is True and runs[False]["method"] == "search" and runs[False]["tune_loss"] == "ce"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_on_cuda(res, tmp_path, capsys):
    """The main command on a GPU end to end (conversion, evaluation of the deployed model, checkpoint), and
    the checkpoint it writes evaluates the same on the CPU."""
    path = tmp_path / "r8_cuda.safetensors"
    argv = ["quantize", "cifar_resnet8", "--weights", str(res.r8_weights), *FAST, "--device", "cuda", "--out", str(path),
            "--json"]
    assert main(argv) == 0
    assert path.is_file()
    assert main(["eval", "--checkpoint", str(path), "--eval-split", "holdout", "--eval-limit", "20", "--device", "cpu",
                 "--threads", "1"]) == 0


def test_quantize_takes_the_float_accuracy_from_the_cache_the_second_time(res, capsys):
    runs = []
    for extra in ([], [], ["--no-eval-cache"]):
        assert main(["quantize", "cifar_resnet8", "--weights", str(res.r8_weights), *FAST, "--json", *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    first, second, fresh = runs
    assert second["cached"] == ["float"] and second["float_acc"] == first["float_acc"]
    assert fresh["cached"] == [] and fresh["float_acc"] == first["float_acc"]
