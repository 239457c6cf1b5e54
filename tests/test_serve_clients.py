"""The serving clients: ``bench/serve_load.py`` (statistics, pacing, bounds, server lifecycle) and
``examples/serve.py``, against a stand-in HTTP server from the standard library (no Ray, no model).

The stand-in answers ``POST /v1/classify`` like ``cora serve`` (one prediction per image sent) after a
fixed delay, every ``fail_every``-th request with 503, and ``GET /v1/models`` with batch counters.
"""
from __future__ import annotations

import base64
import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str):
    """Import a script of the checkout by path (bench/ and examples/ are not packages)."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


sl = _load("bench/serve_load.py")


class StandIn(ThreadingHTTPServer):
    """``cora serve``'s API shape: fixed ``delay`` per request, 503 for every ``fail_every``-th request."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0, fail_every: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay, self.fail_every = delay, fail_every
        self.count, self.images, self.lock = 0, 0, threading.Lock()
        self.content_types: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the load generator expects

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv = self.server
        self._reply(200, {"models": [{"device": "standin"}], "stats": {"batches": srv.count, "images": srv.images}})

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.headers["Content-Type"]
        n = len(json.loads(body)["images"]) if kind == "application/json" else 1
        with srv.lock:
            srv.count += 1
            srv.images += n
            i = srv.count
            srv.content_types.append(kind)
        time.sleep(srv.delay)
        if srv.fail_every and i % srv.fail_every == 0:
            self._reply(503, {"error": "busy"})
        else:
            self._reply(200, {"predictions": [{"top": [{"index": 3, "label": "cat", "prob": 0.9}]}] * n,
                              "model": {"architecture": "standin", "float": True}})


@pytest.fixture
def standin(request):
    delay, fail_every = getattr(request, "param", (0.0, 0))
    srv = StandIn(delay, fail_every)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


PNG = sl.Payload(b"\x89PNG fake", "image/png", 1)


# ------------------------------------------------------------------------------------------ pure statistics
def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 1000):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 95, 99, 100):
            assert sl.percentile(xs, q) == pytest.approx(np.percentile(xs, q), rel=1e-12)
    assert np.isnan(sl.percentile([], 50))


def test_arrivals_uniform_and_poisson():
    assert sl.arrival_offsets(5, 10.0, "uniform") == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    t = sl.arrival_offsets(20000, 50.0, "poisson", seed=1)
    gaps = np.diff(t)
    assert t[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)  # exponential gaps of mean 1/rate
    assert gaps.std() == pytest.approx(1 / 50.0, rel=0.05)  # ... and std 1/rate (not evenly spaced)
    assert t == sl.arrival_offsets(20000, 50.0, "poisson", seed=1)  # seeded: reproducible
    with pytest.raises(ValueError):
        sl.arrival_offsets(3, 0.0, "uniform")
    with pytest.raises(ValueError):
        sl.arrival_offsets(3, 1.0, "bursty")


def test_summary_counts_and_rates():
    res = sl.LoadResult("closed", wall=2.0)
    failed = [sl.Sample(5.0, 503, 2), sl.Sample(9.0, 0, 2), sl.Sample(1.0, -1, 2)]
    res.samples = [sl.Sample(0.01 * (i + 1), 200, 2) for i in range(10)] + failed
    s = sl.summarize(res)
    assert (s["ok"], s["n503"], s["errors"], s["requests_done"]) == (10, 1, 2, 13)
    assert s["images_per_s"] == pytest.approx(10 * 2 / 2.0)  # successful images only
    assert s["p50_ms"] == pytest.approx(55.0) and s["p99_ms"] == pytest.approx(99.1)  # failures not in latency


def test_mean_batch_from_the_server_counters():
    before = {"stats": {"batches": 10, "images": 10}}
    assert sl.mean_batch(before, {"stats": {"batches": 15, "images": 40}}) == pytest.approx(6.0)
    hist_a = {"stats": {"batch_sizes": {"1": 4, "8": 1}}}
    hist_b = {"stats": {"batch_sizes": {"1": 4, "8": 3, "16": 1}}}
    assert sl.mean_batch(hist_a, hist_b) == pytest.approx((16 + 16) / 3)
    assert np.isnan(sl.mean_batch(None, hist_b)) and np.isnan(sl.mean_batch(hist_a, hist_a))


def test_payloads_raw_png_or_json_groups():
    pngs = [bytes([i]) * 5 for i in range(7)]
    one = sl.make_payloads(pngs, 1)
    assert [p.content_type for p in one] == ["image/png"] * 7 and one[2].body == pngs[2]
    three = sl.make_payloads(pngs, 3)  # two full groups; the leftover image is not sent alone
    assert [p.images for p in three] == [3, 3]
    assert [base64.b64decode(s) for s in json.loads(three[1].body)["images"]] == pngs[3:6]


# ------------------------------------------------------------------------------------------ against the stand-in
@pytest.mark.parametrize("standin", [(0.02, 0)], indirect=True)
def test_closed_loop_concurrency_and_latency(standin):
    res = sl.closed_loop(standin.url, [PNG], clients=4, requests=40, time_cap=10)
    s = sl.summarize(res)
    assert s["ok"] == 40 and not res.capped and standin.count == 40
    assert s["p50_ms"] >= 20.0  # never faster than the server's delay
    assert 0 < s["images_per_s"] <= 4 / 0.02 * 1.05  # 4 clients x 1 / 20 ms at most (no lower bound: machine load)


@pytest.mark.parametrize("standin", [(0.01, 0)], indirect=True)
def test_closed_loop_time_cap_bounds_the_phase(standin):
    res = sl.closed_loop(standin.url, [PNG], clients=2, requests=10**6, time_cap=0.5)
    # capped: 2 clients x 0.5 s / 10 ms = 100 requests at the very most (no elapsed-time bound: machine load)
    assert res.capped and 0 < len(res.samples) <= 2 * 0.5 / 0.01 + 2


@pytest.mark.parametrize("standin", [(0.002, 0)], indirect=True)
def test_open_loop_keeps_the_rate(standin):
    res = sl.open_loop(standin.url, [PNG], rate=100.0, requests=60, time_cap=10, workers=8, arrivals="uniform")
    s = sl.summarize(res)
    assert s["ok"] == 60 and not res.capped
    assert res.wall >= 0.59  # the last send is scheduled at 0.59 s: paced, never sooner
    assert s["images_per_s"] <= 60 / 0.59  # paced, not as fast as possible (no lower bound: machine load)


@pytest.mark.parametrize("standin", [(0.03, 0)], indirect=True)
def test_open_loop_counts_the_queueing(standin):
    # one worker, 100 requests/s offered, 33/s served: each request waits for the ones before it
    res = sl.open_loop(standin.url, [PNG], rate=100.0, requests=20, time_cap=10, workers=1, arrivals="uniform")
    s = sl.summarize(res)
    assert s["ok"] == 20
    # the last request is scheduled at 0.19 s and done at ~20 x 30 ms = 0.6 s: its latency is ~0.4 s, not 30 ms
    assert s["p99_ms"] > 300 and max(x.latency for x in res.samples) > 0.3
    assert res.max_lag > 0.3


@pytest.mark.parametrize("standin", [(0.0, 0)], indirect=True)
def test_open_loop_time_cap(standin):
    res = sl.open_loop(standin.url, [PNG], rate=50.0, requests=10**4, time_cap=0.4, workers=4, arrivals="uniform")
    assert res.capped
    assert 18 <= len(res.samples) <= 21  # sends scheduled before 0.4 s at 50/s


@pytest.mark.parametrize("standin", [(0.0, 3)], indirect=True)
def test_503_and_connection_errors_are_counted(standin):
    s = sl.summarize(sl.closed_loop(standin.url, [PNG], clients=1, requests=9, time_cap=10))
    assert (s["ok"], s["n503"], s["errors"]) == (6, 3, 0)
    port = sl.free_ports(1)[0]  # nobody listens there
    s = sl.summarize(sl.closed_loop(f"http://127.0.0.1:{port}", [PNG], clients=2, requests=4, time_cap=10, timeout=2))
    assert (s["ok"], s["errors"]) == (0, 4)


def test_a_200_with_the_wrong_predictions_is_an_error(standin):
    bad = sl.Payload(b"x", "image/png", 2)  # the stand-in answers one prediction for a raw image
    s = sl.summarize(sl.closed_loop(standin.url, [bad], clients=1, requests=3, time_cap=10))
    assert (s["ok"], s["errors"]) == (0, 3)


@pytest.mark.parametrize("standin", [(0.002, 0)], indirect=True)
def test_main_with_url_writes_rows_and_a_table(standin, tmp_path, capsys, monkeypatch):
    pngs = [b"p%d" % i for i in range(4)]
    monkeypatch.setattr(sl, "cifar_payloads", lambda bodies, per, shared=None: sl.make_payloads(pngs, per))
    out = tmp_path / "rows.csv"
    args = ["--url", standin.url, "--requests", "30", "--time-cap", "5", "--clients", "3", "--workers", "4",
            "--warmup", "2", "--images-per-request", "2", "--out", str(out)]
    assert sl.main(args) == 0
    assert sl.main(args) == 0  # appended, not replaced
    rows = list(csv.DictReader(open(out)))
    assert [r["mode"] for r in rows] == ["closed", "open"] * 2
    assert all(r["ok"] == "30" and r["device"] == "standin" and r["commit"] for r in rows)
    assert float(rows[0]["mean_batch"]) == pytest.approx(2.0)  # the stand-in counts one batch per request
    assert "application/json" in standin.content_types
    assert "| server | " in capsys.readouterr().out


def test_server_lifecycle_ready_line_and_nothing_left_behind(tmp_path):
    # a fake `cora serve`: prints the ready line, starts a child that ignores SIGTERM, exits on SIGTERM
    fake = tmp_path / "fake_serve.py"
    fake.write_text(textwrap.dedent("""
        import signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
                                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        open(sys.argv[1], "w").write(str(child.pid))
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        print("cora serve: ready at http://127.0.0.1:1234 (fake)", flush=True)
        time.sleep(60)
    """))
    pidfile = tmp_path / "child.pid"
    srv = sl.Server([], ready_timeout=20, grace=5)
    srv.cmd = [sys.executable, str(fake), str(pidfile)]
    with srv:
        assert srv.url == "http://127.0.0.1:1234" and srv.ready_s < 20
    assert srv.proc.returncode == 0
    child = int(pidfile.read_text())
    end = time.monotonic() + 5
    while _alive(child) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(child)  # the child in the server's process group was killed too


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_server_that_dies_before_ready_is_reported(tmp_path):
    srv = sl.Server([], ready_timeout=20, grace=1)
    srv.cmd = [sys.executable, "-c", "print('cora: error: no such checkpoint'); raise SystemExit(2)"]
    with pytest.raises(RuntimeError, match="no such checkpoint"):
        srv.__enter__()


# ------------------------------------------------------------------------------------------ the scripts
@pytest.mark.parametrize("script", ["bench/serve_load.py", "bench/serve_engine.py", "examples/serve.py"])
def test_scripts_help(script):
    p = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


def test_example_prints_the_top_k(standin, tmp_path, capsys):
    ex = _load("examples/serve.py")
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG not decoded by the stand-in")
    assert ex.main([str(img), "--url", standin.url, "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "a.png: cat 0.900" in out and standin.content_types == ["image/png"]
    assert ex.main([str(img), str(img), "--url", standin.url]) == 0  # two images: one JSON request
    assert standin.content_types[-1] == "application/json"
    port = sl.free_ports(1)[0]
    with pytest.raises(SystemExit, match="cannot connect"):
        ex.main([str(img), "--url", f"http://127.0.0.1:{port}"])
