"""``bench/frontier.py`` without any conversion: the cache (keys, skip, ``--force``, replacing a row) and
``--plot-only`` on a tiny synthetic CSV (that part only where matplotlib is installed)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str):
    """Import a script of the checkout by path (bench/ is not a package)."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fr = _load("bench/frontier.py")


def _row(model="cifar_resnet20", bits=4, budget=0.05, labels=False, tag="c1600", acc=80.0, **extra) -> dict:
    """A finished run as ``run_point`` returns it (only the fields the plot and the table read)."""
    row = dict(model=model, bits=bits, budget=fr._budget_text(budget), labels=labels, tag=tag, acc=acc, float_acc=81.03,
               equiv_bits=bits + 0.052 + 16 * budget, adapter_fraction=budget, method="uniform" if budget else "none",
               loss="kl", tune_loss="", iterations=0, tune_iterations=0, calib_images=1600, eval_images=10000, seed=0,
               quantize_seconds=1.0, run_seconds=2.5, device="cpu", threads=1, torch_version="x",
               machine="test machine", commit="abc1234")
    row.update(extra)
    return row


def test_tag_names_every_setting_that_changes_the_numbers():
    assert fr.config_tag() == "c1600"
    assert fr.config_tag(50, 200) == "c50-e200"
    assert fr.config_tag(1600, None, 3) == "c1600-s3"


def test_key_is_the_same_for_a_planned_point_and_its_csv_row(tmp_path):
    point = fr.plan(["cifar_resnet20"], [4], [0.05], (False,), control=False)[0]
    path = tmp_path / "f.csv"
    fr.store_row(_row(), path)
    (stored,) = fr.read_rows(path)  # strings now: "4", "0.05", "False"
    assert fr.row_key(stored) == fr.row_key(point) == ("cifar_resnet20", 4, "0.05", False, "c1600")
    assert fr.row_key(dict(stored, budget="0.050", labels="True"))[2:4] == ("0.05", True)


def test_plan_covers_the_grid_and_one_control_per_model_and_label_mode():
    points = fr.plan(fr.MODELS, fr.BITS, fr.BUDGETS, (True, False))
    assert len(points) == 3 * (3 * 4 * 2 + 2)  # ResNet-20, ResNet-32, ShuffleNetV2
    keys = [fr.row_key(p) for p in points]
    assert len(set(keys)) == len(keys)
    controls = [p for p in points if p["bits"] == fr.CONTROL_BITS]
    assert {(p["model"], p["labels"]) for p in controls} == {(m, lab) for m in fr.MODELS for lab in (True, False)}
    assert not fr.plan(["m"], [4], [0], (True,), control=False)[0]["budget"]


def test_mixed_precision_points_have_their_own_keys_and_reach_the_config():
    points = fr.plan(["cifar_resnet20"], [2, 3, 4], [0, 0.05], (False,), control=False, targets=[2.5, 2.85])
    assert len(points) == 4 and {p["bits"] for p in points} == {4}
    assert {p["tag"] for p in points} == {"c1600-t2.5", "c1600-t2.85"}
    uniform = fr.plan(["cifar_resnet20"], [4], [0, 0.05], (False,), control=False)
    assert not {fr.row_key(p) for p in points} & {fr.row_key(p) for p in uniform}  # never the W4 points' rows
    assert [fr.target_of(p) for p in points] == [2.5, 2.5, 2.85, 2.85] and fr.target_of(uniform[0]) is None
    cfg = fr.make_config(4, 0.0, 1600, 0, fr.target_of(points[0]))
    assert cfg.target_bits == 2.5 and cfg.method == "none" and cfg.bits == 4
    rows = [_row(), _row(tag="c1600-t2.5"), _row(tag="c50-t2.5")]
    assert [r["tag"] for r in fr.selected(rows, ["cifar_resnet20"], "c1600")] == ["c1600", "c1600-t2.5"]


def test_pending_skips_cached_keys_and_force_reruns_them(tmp_path):
    path = tmp_path / "f.csv"
    points = fr.plan(["cifar_resnet20"], [4], [0, 0.05], (False,), control=False)
    fr.store_row(_row(budget=0.0), path)
    fr.store_row(_row(budget=0.05, tag="c50-e200"), path)  # another tag: not the same point
    todo = fr.pending(points, fr.read_rows(path))
    assert [p["budget"] for p in todo] == [0.05]
    assert fr.pending(points, fr.read_rows(path), force=True) == points


def test_store_row_appends_and_a_rerun_replaces_its_row(tmp_path):
    path = tmp_path / "sub" / "f.csv"
    fr.store_row(_row(budget=0.0, acc=70.0), path)
    fr.store_row(_row(budget=0.05, acc=75.0), path)
    fr.store_row(_row(budget=0.0, acc=71.5), path)  # --force: same key
    rows = fr.read_rows(path)
    assert [(r["budget"], r["acc"]) for r in rows] == [("0.05", "75.0"), ("0", "71.5")]
    assert list(rows[0]) == fr.COLUMNS


def test_a_rerun_of_a_finished_sweep_runs_nothing(tmp_path, monkeypatch, capsys):
    path = tmp_path / "f.csv"
    for budget in (0.0, 0.05):
        fr.store_row(_row(budget=budget), path)
    monkeypatch.setattr(fr, "run_point", lambda *a, **k: pytest.fail("a cached point was run again"))
    rc = fr.main(["--models", "cifar_resnet20", "--bits", "4", "--budgets", "0", "0.05", "--labels", "no",
                  "--no-control", "--no-plot", "--out", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 already in" in out and "0 to run" in out
    assert "sweep run time (sum of run_seconds): 5 s" in out


def test_force_reruns_and_replaces(tmp_path, monkeypatch):
    path = tmp_path / "f.csv"
    fr.store_row(_row(budget=0.05, acc=70.0), path)
    calls = []

    def fake_run(point, args, env, float_cache):
        calls.append(fr.row_key(point))
        return _row(budget=point["budget"], acc=79.0)

    monkeypatch.setattr(fr, "run_point", fake_run)
    monkeypatch.setattr(fr, "_environment", lambda args: {})
    args = ["--models", "cifar_resnet20", "--bits", "4", "--budgets", "0.05", "--labels", "no", "--no-control",
            "--no-plot", "--out", str(path)]
    assert fr.main(args) == 0 and calls == []
    assert fr.main(args + ["--force"]) == 0 and len(calls) == 1
    assert [r["acc"] for r in fr.read_rows(path)] == ["79.0"]


def test_plot_only_draws_a_png_from_a_tiny_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, peers, png = tmp_path / "f.csv", tmp_path / "peers.csv", tmp_path / "f.png"
    for bits in (3, 4):
        for labels in (True, False):
            for budget in (0.0, 0.05, 0.1):
                fr.store_row(_row(bits=bits, labels=labels, budget=budget, acc=75 + bits + 10 * budget + labels), path)
    fr.store_row(_row(bits=8, labels=True, budget=0.05, acc=84.2), path)
    fr.store_row(_row(bits=4, budget=0.05, tag="c50-e200", acc=10.0), path)  # a quick check: must not be drawn
    for target in (2.5, 2.85):  # two mixed-precision points: drawn as their own line
        fr.store_row(_row(bits=4, budget=0.0, tag=f"c1600-t{target}", acc=78.0 + target, equiv_bits=target - 0.01), path)
    peers.write_text("model,bits,method,acc,float_acc,bits_per_weight\n"
                     "cifar_resnet20,4,rtn_minmax,79.4,81.03,4.052\n"
                     "cifar_resnet20,3,gptq_actorder_minmax,80.5,81.03,3.0494\n"
                     "cifar_resnet20,3,brecq_like_blockwise_x_lr0.01,81.29,81.03,3.0494\n")
    rc = fr.main(["--plot-only", "--models", "cifar_resnet20", "--out", str(path), "--peers", str(peers),
                  "--png", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "15 points" in out  # 12 grid points, the control and the 2 mixed ones, not the c50-e200 row
    assert "mixed W<=4 at 2.85 bits" in out


def test_peer_labels_are_short():
    assert fr.peer_label("gptq_actorder_mse_ranges") == ("GPTQ-MSE", "d")
    assert fr.peer_label("brecq_like_blockwise_per_resblock_x_lr0.01")[0] == "BRECQ-like (lr 0.01)"


def test_missing_matplotlib_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert fr.main(["--plot-only", "--out", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("frontier: error: plotting needs matplotlib")


def test_best_peer_at_equal_bits_and_the_breakdown_in_the_table(tmp_path, capsys):
    """Each point sits beside the best peer storing no more bits; rows with the breakdown columns show them."""
    peers = [dict(model="m", bits=b, method=m, acc=a, float_acc=83.0, bits_per_weight=bpw)
             for b, m, a, bpw in ((4, "rtn_minmax", 79.7, 4.232), (4, "gptq_actorder_minmax", 81.9, 4.232),
                                  (3, "gptq_actorder_minmax", 77.0, 3.22))]
    assert fr.best_peer_at(4.1, peers)["acc"] == 77.0  # the W4 peers store more than 4.1 bits
    assert fr.best_peer_at(4.232, peers)["method"] == "gptq_actorder_minmax" and fr.best_peer_at(3.0, peers) is None
    path = tmp_path / "peers.csv"
    path.write_text("model,bits,method,acc,float_acc,bits_per_weight\n"
                    "cifar_resnet20,3,gptq_actorder_minmax,80.34,81.03,3.0494\n")
    parts = dict(codes_bits=3.0, wide_bits=0.25, scale_bits=0.05, adapter_bits=0.8)
    fr.print_table([_row(bits=3, **parts), _row(bits=2, budget=0.0)], path)
    out = capsys.readouterr().out
    assert "| 3.00 + 0.25 + 0.05 + 0.80 | 80.34 (GPTQ W3) |" in out
    assert "| - | - |" in out  # W2 without adapters: no breakdown columns, no peer that small


def test_zoom_range_holds_the_points_near_the_float_model():
    rows = [_row(acc=80.5), _row(bits=2, acc=40.0), _row(bits=3, acc=78.0)]
    peers = [dict(acc="79.0", float_acc="81.03"), dict(acc="12.0", float_acc="81.03")]
    lo, hi = fr.zoom_range(rows, peers)
    assert lo == pytest.approx(77.5) and hi == pytest.approx(81.53)  # 78.0 - 0.5 and the float model + 0.5
    assert fr.zoom_range([], []) == (0.0, 100.0)
