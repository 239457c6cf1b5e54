"""HTTP load test of ``cora serve`` on loopback: closed and open loop, the CoRa checkpoint against the float model.

    python bench/serve_load.py                                  # starts the servers itself (CPU: about 4 minutes)
    python bench/serve_load.py --max-batch 1 8 32 --clients 32 --requests 3000 --time-cap 30
    python bench/serve_load.py --checkpoint r20_w4.safetensors  # or --accurate: the default quantization
    python bench/serve_load.py --url http://127.0.0.1:8000      # an already running server, nothing started

By default the script serves, one after the other and each as its own ``python -m cora serve``
subprocess on a free loopback port, (1) a CoRa checkpoint of ``cifar_resnet20`` (``--checkpoint``, or
made on the fly: a fast round-to-nearest conversion on 250 calibration images; ``--accurate``: the
default recipe) and (2) the float model (``--float cifar_resnet20``), for every ``--max-batch``. It
waits for the server's ready line (bounded by ``--ready-timeout``), sends SIGTERM at the end and kills
the server's process group if it does not exit in time, so no process is left behind.

Against each server: a few untimed warm-up requests, then
  closed loop  ``--clients`` threads, each sending its next request when the previous one returns;
               latency from send to response
  open loop    requests at ``--rate`` per second (``--arrivals poisson|uniform``) taken by a pool of
               ``--workers`` threads; latency from the *scheduled* send time, so time spent waiting for
               a free worker (client-side queueing) counts. The default rate is ``--rate-fraction`` (0.5)
               of the closed-loop throughput of the first model served at that max-batch (CoRa), so both
               models see the same offered load.
Each phase stops at ``--requests`` requests or ``--time-cap`` seconds, whichever comes first (in-flight
requests then get at most ``--request-timeout`` more seconds). Clients use only the standard library
(``http.client``, one keep-alive connection per thread). Payload: CIFAR-10 test images encoded as PNG,
``--images-per-request`` per request (1: a raw ``image/png`` body; more: JSON with base64 images).

Reported per phase: images/s (successful images over the phase's wall time), p50/p95/p99 latency of the
successful requests, 503 (overload) and other error counts, and the mean batch size the server formed,
taken from the difference of the batch counters in ``GET /v1/models`` before and after the phase
(empty when the server exposes none), and how the CoRa model's convs ran (``weights``: dense or packed,
from ``GET /v1/models``; the server runs ``cora serve``'s default, ``--deploy-weights auto``). The run's rows are appended to
``bench/results/serve_load_<device>.csv`` (``--out``) with machine, versions and commit; a Markdown
table and the CoRa / float ratios are printed. On a small machine the client threads share the CPU
cores with the server (``--num-cpus`` is passed to it): the rows say so.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import ROOT, append_csv, git_commit, machine, versions  # noqa: E402

CLASSIFY = "/v1/classify"
MODELS = "/v1/models"
READY_LINE = re.compile(r"cora serve: ready at (http://\S+)")
clock = time.perf_counter


# ------------------------------------------------------------------------------------------ statistics
def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default); nan if empty."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def arrival_offsets(n: int, rate: float, arrivals: str, seed: int = 0) -> list[float]:
    """Send times (s after the start) of ``n`` requests at ``rate`` per second: evenly spaced
    (``uniform``) or a Poisson process (``poisson``: exponential gaps of mean ``1/rate``). The first is at 0."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if arrivals == "uniform":
        return [i / rate for i in range(n)]
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be 'poisson' or 'uniform', got {arrivals!r}")
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class Sample:
    """One request: latency (s), HTTP status (0: no response, -1: a 200 whose body did not match), images."""

    latency: float
    status: int
    images: int


@dataclass
class LoadResult:
    """What one phase measured; ``wall`` runs from the phase's start to the last response."""

    mode: str
    samples: list = field(default_factory=list)
    wall: float = 0.0
    planned: int = 0
    capped: bool = False  # the time cap, not the request count, ended the phase
    concurrency: int = 0  # client threads
    rate: float | None = None  # open loop: offered requests per second
    max_lag: float = 0.0  # open loop: the latest a request left after its scheduled time (client saturation)


def summarize(result: LoadResult) -> dict:
    """images/s, latency percentiles (ms) of the successful requests, and the failure counts."""
    ok = [s for s in result.samples if s.status == 200]
    lat = [s.latency * 1e3 for s in ok]
    images = sum(s.images for s in ok)
    return {
        "requests_done": len(result.samples),
        "ok": len(ok),
        "n503": sum(s.status == 503 for s in result.samples),
        "errors": sum(s.status not in (200, 503) for s in result.samples),
        "images_per_s": images / result.wall if result.wall > 0 else float("nan"),
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
        "wall_s": result.wall,
    }


# ------------------------------------------------------------------------------------------ clients
@dataclass(frozen=True)
class Payload:
    """One request body and how many images it carries."""

    body: bytes
    content_type: str
    images: int


class Connection:
    """One keep-alive HTTP connection, owned by one client thread; reopened after any failure."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, payload: Payload) -> int:
        """Send ``payload``; the status (0 on a connection error or timeout, -1 for a 200 whose
        predictions do not match the images sent)."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.request("POST", path, body=payload.body, headers={"Content-Type": payload.content_type})
            resp = self.conn.getresponse()
            body = resp.read()
            if resp.will_close:
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            return 0
        if resp.status == 200 and not _predictions_match(body, payload.images):
            return -1
        return resp.status

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _predictions_match(body: bytes, images: int) -> bool:
    # a 200 must carry one prediction per image sent: anything else is counted as an error
    try:
        return len(json.loads(body)["predictions"]) == images
    except (ValueError, KeyError, TypeError):
        return False


class Tickets:
    """Request indices 0..n-1 handed out once each, in order, across threads."""

    def __init__(self, n: int) -> None:
        self._it, self._n, self._lock = itertools.count(), n, threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            i = next(self._it)
        return i if i < self._n else None


def _run_threads(target, n: int, join_timeout: float) -> None:
    # daemon threads joined against one deadline: a hung request can delay the phase, never stop the script
    threads = [threading.Thread(target=target, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + join_timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))


def closed_loop(url: str, payloads: list, clients: int, requests: int, time_cap: float,
                timeout: float = 30.0) -> LoadResult:
    """``clients`` threads, each sending its next request as soon as the previous one returned."""
    res = LoadResult("closed", planned=requests, concurrency=clients)
    tickets, start = Tickets(requests), clock()
    deadline, last = start + time_cap, [start]

    def client():
        conn = Connection(url, timeout)
        while (i := tickets.take()) is not None and clock() < deadline:
            p = payloads[i % len(payloads)]
            t0 = clock()
            status = conn.post(CLASSIFY, p)
            t1 = clock()
            res.samples.append(Sample(t1 - t0, status, p.images))
            last[0] = max(last[0], t1)
        conn.close()

    _run_threads(client, clients, time_cap + timeout + 5)
    res.wall, res.capped = last[0] - start, len(res.samples) < requests
    return res


def open_loop(url: str, payloads: list, rate: float, requests: int, time_cap: float, workers: int = 32,
              arrivals: str = "poisson", seed: int = 0, timeout: float = 30.0) -> LoadResult:
    """Requests at ``rate`` per second on a pool of ``workers`` threads; latency counts from the scheduled
    send time, so a request that waits for a free worker (the server is behind) pays for the wait."""
    res = LoadResult("open", planned=requests, concurrency=workers, rate=rate)
    offsets = arrival_offsets(requests, rate, arrivals, seed)
    tickets = Tickets(requests)
    start = clock() + 0.05  # every worker is up before the first send
    deadline, last, lag = start + time_cap, [start], [0.0]

    def worker():
        conn = Connection(url, timeout)
        while (i := tickets.take()) is not None:
            scheduled = start + offsets[i]
            if scheduled >= deadline:  # tickets come in schedule order: every later one is past it too
                break
            if (wait := scheduled - clock()) > 0:
                time.sleep(wait)
            lag[0] = max(lag[0], clock() - scheduled)
            p = payloads[i % len(payloads)]
            status = conn.post(CLASSIFY, p)
            t1 = clock()
            res.samples.append(Sample(t1 - scheduled, status, p.images))
            last[0] = max(last[0], t1)
        conn.close()

    _run_threads(worker, workers, time_cap + timeout + 5)
    res.wall, res.capped, res.max_lag = last[0] - start, len(res.samples) < requests, lag[0]
    return res


# ------------------------------------------------------------------------------------------ server stats
def get_json(url: str, path: str, timeout: float = 10.0) -> dict | None:
    """``GET url+path`` as JSON, or None when it fails (the stats are optional)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def batch_counters(info: dict | None) -> tuple[float, float] | None:
    """``(batches, images)`` counted by the server since it started, found in ``GET /v1/models``'s
    ``stats`` (``batches`` / ``images``, or a ``batch_sizes`` histogram ``{size: count}``); None if absent."""
    stats = (info or {}).get("stats")
    if not isinstance(stats, dict):
        return None
    hist = stats.get("batch_sizes")
    if isinstance(hist, dict) and hist:
        try:
            return float(sum(hist.values())), float(sum(int(k) * v for k, v in hist.items()))
        except (TypeError, ValueError):
            return None
    b, n = stats.get("batches"), stats.get("images")
    if isinstance(b, (int, float)) and isinstance(n, (int, float)):
        return float(b), float(n)
    return None


def mean_batch(before: dict | None, after: dict | None) -> float:
    """Images per formed batch during a phase, from the server's counters before and after it (nan if none)."""
    a, b = batch_counters(before), batch_counters(after)
    if a is None or b is None or b[0] <= a[0]:
        return float("nan")
    return (b[1] - a[1]) / (b[0] - a[0])


# ------------------------------------------------------------------------------------------ payloads
def encode_png(image) -> bytes:
    """uint8 HWC RGB array -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_payloads(pngs: list, per_request: int) -> list:
    """Request bodies: a raw ``image/png`` body for one image per request, else JSON ``{"images": [base64...]}``."""
    if per_request == 1:
        return [Payload(p, "image/png", 1) for p in pngs]
    groups = [pngs[i:i + per_request] for i in range(0, len(pngs) - per_request + 1, per_request)]
    return [Payload(json.dumps({"images": [base64.b64encode(p).decode() for p in g]}).encode(), "application/json",
                    len(g)) for g in groups]


def cifar_payloads(bodies: int, per_request: int, shared=None) -> list:
    """``bodies`` distinct request bodies of CIFAR-10 test images (PNG), cycled through by the clients."""
    from cora.experiments.data import TEST_FILE, load_npz

    images, _ = load_npz(TEST_FILE, shared)
    n = min(len(images), bodies * per_request)
    return make_payloads([encode_png(images[i]) for i in range(n)], per_request)


# ------------------------------------------------------------------------------------------ servers
def free_ports(n: int) -> list:
    """``n`` distinct loopback ports nobody listens on right now (all bound at once, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """``python -m cora serve ARGS`` on a free loopback port (and a free metrics port), as a context manager.

    Entering starts it in its own process group and waits (at most ``ready_timeout`` s) for its ready
    line; leaving sends SIGTERM, waits ``grace`` s, then kills the whole process group (only
    processes this server started). The output goes to ``log`` (a path) and the last lines are kept.
    """

    def __init__(self, args: list, ready_timeout: float = 180.0, grace: float = 30.0, log: str | None = None) -> None:
        self.port, metrics = free_ports(2)
        self.cmd = [sys.executable, "-m", "cora", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port),
                    "--metrics-port", str(metrics)]
        self.ready_timeout, self.grace, self.log = ready_timeout, grace, log
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready_s = float("nan")
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        t0 = clock()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, env=env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_s = clock() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read(self) -> None:
        sink = open(self.log, "a") if self.log else None
        try:
            for line in self.proc.stdout:
                self.lines = (self.lines + [line.rstrip()])[-40:]
                if sink:
                    sink.write(line)
                    sink.flush()
                m = READY_LINE.search(line)
                if m and not self._ready.is_set():
                    self.url = m.group(1)
                    self._ready.set()
        finally:
            if sink:
                sink.close()

    def _wait_ready(self) -> None:
        end = clock() + self.ready_timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n"
                                   + "\n".join(self.lines[-15:]))
            if clock() > end:
                raise RuntimeError(f"the server was not ready after {self.ready_timeout:.0f}s:\n"
                                   + "\n".join(self.lines[-15:]))

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the process group after ``grace`` s; the server's exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                print(f"# the server did not stop within {self.grace:.0f}s of SIGTERM: killing its process group")
        if _kill_group(self.proc.pid):  # its group is its own pid (start_new_session): only what it started
            print("# the server left processes behind after it exited: killed them")
        self.proc.wait()
        return self.proc.returncode


def _kill_group(pgid: int) -> bool:
    """SIGKILL every process left in group ``pgid``; whether there was any."""
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False  # nothing left in the group


# ------------------------------------------------------------------------------------------ the run
def make_checkpoint(folder: str, accurate: bool, shared=None) -> tuple[str, float]:
    """A CoRa checkpoint of cifar_resnet20 in ``folder`` (fast round-to-nearest, or the default recipe); its
    path and the conversion seconds."""
    import cora
    from cora.experiments.data import cifar10_calibration
    from cora.experiments.pipeline import load_float_model

    t0 = clock()
    model = load_float_model("cifar_resnet20", shared=shared)
    calib = cifar10_calibration(1600 if accurate else 250, shared=shared)  # a multiple of 10: class-balanced
    if accurate:  # the defaults with labels: ranks searched and adapters tuned by CE
        cfg = cora.CoRaConfig(progress=False)
        data = (calib.images, calib.labels)
    else:  # a fast conversion, good enough to time serving
        cfg = cora.CoRaConfig(method="uniform", rounding="nearest", range_method="minmax", factorization="weight",
                              sequential=False, refine=False, tune_iterations=0, calib_images=250, progress=False)
        data = calib.images
    qmodel = cora.convert(model, data, cfg)
    qmodel.cora_architecture = {"name": "cifar_resnet20"}
    path = os.path.join(folder, "cifar_resnet20_w4.safetensors")
    cora.save(qmodel, path)
    return path, clock() - t0


def run_phases(url: str, payloads: list, args, rate: float | None) -> tuple[list, float]:
    """Warm-up, closed loop and open loop against one server: ``[(LoadResult, mean batch), ...]`` and the
    open-loop rate used (``rate``; None: ``--rate`` or ``--rate-fraction`` of this closed loop's requests/s)."""
    closed_loop(url, payloads, args.clients, args.warmup, args.time_cap, args.request_timeout)  # untimed
    before = get_json(url, MODELS)
    res = closed_loop(url, payloads, args.clients, args.requests, args.time_cap, args.request_timeout)
    after = get_json(url, MODELS)
    out = [(res, mean_batch(before, after))]
    if rate is None:
        rate = args.rate if args.rate is not None else \
            args.rate_fraction * summarize(res)["images_per_s"] / args.images_per_request
    if rate > 0:
        res = open_loop(url, payloads, rate, args.requests, args.time_cap, args.workers, args.arrivals, args.seed,
                        args.request_timeout)
        out.append((res, mean_batch(after, get_json(url, MODELS))))
    return out, rate


def server_args(kind: str, checkpoint: str, max_batch: int, args) -> list:
    """The ``cora serve`` arguments for the CoRa checkpoint or the float model."""
    model = [checkpoint] if kind == "cora" else ["--float", args.float_model]
    return [*model, "--device", args.device, "--max-batch", str(max_batch), "--batch-wait-ms",
            str(args.batch_wait_ms), "--num-cpus", str(args.num_cpus), *args.serve_arg]


def model_device(info: dict | None, fallback: str) -> str:
    """The device the server reports in ``GET /v1/models`` (``models[0].device``), else ``fallback``."""
    models = (info or {}).get("models") or [{}]
    dev = models[0].get("device") if isinstance(models[0], dict) else None
    return str(dev) if dev else fallback


def model_weights(info: dict | None) -> str:
    """How the served model's convs run (``models[0].weights`` of ``GET /v1/models``: dense, packed; empty for a
    float model or a server that does not say)."""
    models = (info or {}).get("models") or [{}]
    return str((models[0].get("weights") if isinstance(models[0], dict) else None) or "")


def make_row(label: str, target: str, max_batch, res: LoadResult, mbatch: float, ready_s: float, args,
             weights: str = "") -> dict:
    """One CSV row: the configuration, what was measured, and the run's metadata."""
    s = summarize(res)
    return dict(model=label, target=target, weights=weights, max_batch=max_batch, batch_wait_ms=args.batch_wait_ms,
                mode=res.mode,
                client_threads=res.concurrency, arrivals=args.arrivals if res.mode == "open" else "",
                offered_rate=round(res.rate, 2) if res.rate else "", planned=res.planned, capped=res.capped,
                images_per_request=args.images_per_request, **{k: _round(v) for k, v in s.items()},
                max_send_lag_ms=_round(res.max_lag * 1e3) if res.mode == "open" else "",
                mean_batch=_round(mbatch), mean_batch_source="GET /v1/models stats (delta over the phase)",
                ready_s=_round(ready_s))


def _round(v, nd: int = 2):
    return "" if isinstance(v, float) and math.isnan(v) else (round(v, nd) if isinstance(v, float) else v)


def base_meta(args, device: str) -> dict:
    """Machine, versions, commit and how the machine was shared; the same in every row of a run."""
    v = versions("torch", "triton", "ray", "pillow")
    return dict(machine=machine(), device=device, server_num_cpus=args.num_cpus if not args.url else "",
                sharing=f"client threads share the machine's {os.cpu_count()} cores with the server",
                torch=v["torch"], triton=v["triton"], ray=v["ray"], pillow=v["pillow"],
                python=sys.version.split()[0], commit=git_commit(), run=time.strftime("%Y-%m-%dT%H:%M:%S"))


def serve_all(args, payloads: list) -> tuple[list, str]:
    """Start each (model, max-batch) server in turn and load it; the rows and the device they ran on."""
    rows, device, t0 = [], args.device, clock()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint, secs = make_checkpoint(tmp, args.accurate, args.shared)
            print(f"# converted cifar_resnet20 ({'default recipe' if args.accurate else 'fast RTN'}) in {secs:.1f}s")
        for mb in args.max_batch:
            rate = args.rate
            for kind in ("cora", "float"):
                if args.total_cap is not None and clock() - t0 > args.total_cap:
                    print(f"# --total-cap {args.total_cap:.0f}s reached: {kind} max-batch {mb} not served")
                    continue
                target = os.path.basename(checkpoint) if kind == "cora" else f"--float {args.float_model}"
                with Server(server_args(kind, checkpoint, mb, args), args.ready_timeout, log=args.server_log) as srv:
                    print(f"# {kind} max-batch {mb}: ready in {srv.ready_s:.1f}s at {srv.url}", flush=True)
                    info = get_json(srv.url, MODELS)
                    device, weights = model_device(info, device), model_weights(info)
                    phases, rate = run_phases(srv.url, payloads, args, rate)  # the next model gets the same rate
                    for res, mbatch in phases:
                        rows.append(make_row(kind, target, mb, res, mbatch, srv.ready_s, args, weights))
                        print(_line(rows[-1]), flush=True)
    return rows, device


def _line(r: dict) -> str:
    return (f"  {r['mode']:<6} {r['images_per_s']:>8} img/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
            f"ok {r['ok']}  503 {r['n503']}  errors {r['errors']}  mean batch {r['mean_batch'] or '-'}")


COLUMNS = [("model", "model"), ("max_batch", "max batch"), ("mode", "mode"), ("client_threads", "threads"),
           ("offered_rate", "offered req/s"), ("requests_done", "requests"), ("images_per_s", "images/s"),
           ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("n503", "503"), ("errors", "errors"),
           ("mean_batch", "mean batch"), ("ready_s", "ready s")]


def markdown(rows: list) -> str:
    """The rows as a Markdown table."""
    out = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def ratios(rows: list) -> str:
    """CoRa / float per (max-batch, mode), from rows of the same run: images/s, p50, p99 and time to ready."""
    by = {(r["model"], r["max_batch"], r["mode"]): r for r in rows}
    out = ["| max batch | mode | images/s CoRa/float | p50 CoRa/float | p99 CoRa/float | ready CoRa/float |",
           "|---|---|---|---|---|---|"]
    for (model, mb, mode), c in by.items():
        f = by.get(("float", mb, mode))
        if model != "cora" or f is None:
            continue
        cells = [_ratio(c, f, k) for k in ("images_per_s", "p50_ms", "p99_ms", "ready_s")]
        out.append(f"| {mb} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _ratio(a: dict, b: dict, key: str) -> str:
    try:
        return f"{float(a[key]) / float(b[key]):.2f}"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="load this running server instead of starting any")
    ap.add_argument("--label", default="server", help="the model column for --url")
    ap.add_argument("--checkpoint", default=None, help="the CoRa checkpoint to serve (default: convert one now)")
    ap.add_argument("--accurate", action="store_true", help="convert with the default recipe (slower) instead of RTN")
    ap.add_argument("--float", dest="float_model", default="cifar_resnet20", help="the float model to compare against")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--device", default="auto", help="passed to cora serve: auto|cuda|cpu")
    ap.add_argument("--num-cpus", type=int, default=1, help="passed to cora serve")
    ap.add_argument("--serve-arg", action="append", default=[], help="one more cora serve argument (repeatable)")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop client threads")
    ap.add_argument("--workers", type=int, default=32, help="open-loop worker threads")
    ap.add_argument("--rate", type=float, default=None, help="open-loop requests/s (0: no open loop)")
    ap.add_argument("--rate-fraction", type=float, default=0.5, help="default rate: this fraction of closed-loop req/s")
    ap.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    ap.add_argument("--requests", type=int, default=1500, help="requests per phase (at most)")
    ap.add_argument("--time-cap", type=float, default=15.0, help="seconds per phase (at most)")
    ap.add_argument("--total-cap", type=float, default=None, help="start no new server after this many seconds")
    ap.add_argument("--warmup", type=int, default=32, help="untimed requests before the phases")
    ap.add_argument("--request-timeout", type=float, default=30.0)
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--bodies", type=int, default=256, help="distinct request bodies, cycled through")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for a server's ready line")
    ap.add_argument("--server-log", default=None, help="append the servers' output to this file")
    ap.add_argument("--shared", default=None, help="shared folder (default: CORA_SHARED or ../shared)")
    ap.add_argument("--out", default=None, help="CSV to append to (default bench/results/serve_load_<device>.csv)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the servers' cleanup on SIGTERM too
    t0 = clock()
    payloads = cifar_payloads(args.bodies, args.images_per_request, args.shared)
    if args.url:
        device = model_device(get_json(args.url, MODELS), args.device)
        phases, _ = run_phases(args.url, payloads, args, None)
        rows = [make_row(args.label, args.url, "", res, mb, float("nan"), args) for res, mb in phases]
    else:
        rows, device = serve_all(args, payloads)
    meta = base_meta(args, device)
    rows = [{**r, **meta} for r in rows]
    name = "cpu" if device == "cpu" else re.sub(r"[^A-Za-z0-9_.-]+", "_", device)
    out = args.out or str(ROOT / "bench" / "results" / f"serve_load_{name}.csv")
    append_csv(rows, out)
    print(f"\n# {meta['machine']}; device {device}; {meta['sharing']}; server --num-cpus {args.num_cpus}")
    print(markdown(rows))
    if not args.url:
        print("\nCoRa / float, same run:\n" + ratios(rows))
    print(f"\n# {len(rows)} rows appended to {out} ({clock() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
