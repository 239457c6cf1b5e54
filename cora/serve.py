"""``cora serve``: a cora checkpoint (or a float peer) behind HTTP, on Ray Serve.

Ray Serve does the serving: the HTTP proxy, replicas (``--replicas``, ``--gpus-per-replica``),
dynamic batching (``@serve.batch``), the outer queue bound, clusters (``--address``) and its own
Prometheus metrics. This module only adds the model (:mod:`cora.inference`), request checks
(:mod:`cora.payloads`) and the API:

* ``POST /v1/classify``: one PNG/JPEG (``image/png``, ``image/jpeg``) or JSON ``{"images": [base64,
  ...]}`` -> ``{"predictions": [{"top": [{"index", "label", "prob"}, ...]}, ...], "model": {...}}``;
* ``GET /v1/models``: the model's :meth:`InferenceEngine.info` plus this replica's counters;
* ``GET /healthz``: 200 while the replica is alive; ``GET /readyz``: 200 once warm-up is done, 503 before.

Every error is JSON ``{"error": "one line"}``. Backpressure: each replica admits at most
``--max-queued`` images waiting for the model; beyond that it answers 503 with ``Retry-After``
at once (Ray's own 503 for a full proxy queue is plain text, so the replica counts itself and
Ray's ``max_queued_requests`` stays as the outer bound). Warm-up runs in a background thread
started by the replica's constructor, so ``/healthz`` and ``/readyz`` answer during it.

Metrics (``ray.serve.metrics``, exported by Ray's metrics agent with Serve's own, names prefixed
``ray_``): ``cora_requests_total{status}``, ``cora_request_latency_seconds``, ``cora_batch_size``,
``cora_queue_depth``.
"""
# no `from __future__ import annotations`: FastAPI must see the real `Request` annotation of the
# endpoints after Serve rewrites their signatures
import asyncio
import logging
import math
import os
import signal
import sys
import threading
import time
import urllib.request

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .inference import InferenceEngine
from .payloads import Limits, PayloadError, decode_image, decode_request, preprocess

__all__ = ["CoraServer", "run", "WARMUP_DELAY_ENV", "APP_NAME"]

APP_NAME = "cora"
# tests only: seconds each replica sleeps before its warm-up, so that /readyz can be seen at 503
WARMUP_DELAY_ENV = "CORA_SERVE_WARMUP_DELAY"
SHUTDOWN_TIMEOUT_S = 60  # the most serve.shutdown may take before Ray is stopped anyway
RETRY_AFTER_S = 1  # what a 503 tells the client to wait, seconds
_LATENCY_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

app = FastAPI(title="cora serve", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # unknown paths and methods: the same JSON error shape as everything else
    return _error(exc.status_code, exc.detail)


class _Ticket:
    """One request's images in the queue: how many a batch has taken, and whether it has left."""

    __slots__ = ("n", "started", "closed")

    def __init__(self, n: int) -> None:
        self.n, self.started, self.closed = n, 0, False


@serve.deployment(name="CoraServer")
@serve.ingress(app)
class CoraServer:
    """One replica: the engine, the per-replica queue bound, the batcher and the counters.

    ``source``: ``{"checkpoint": path}`` or ``{"float": name, "weights": ..., "shared": ...}``;
    ``settings``: ``device``, ``dtype``, ``deploy_weights`` (a checkpoint's, see :class:`InferenceEngine`),
    ``max_batch``, ``batch_wait_s``, ``max_queued``, ``top_k``, ``num_threads`` and the :class:`Limits` fields.
    """

    def __init__(self, source: dict, settings: dict) -> None:
        from ray.serve import metrics

        self.settings = settings
        self.limits = Limits(settings["max_images"], settings["max_body_bytes"], settings["max_pixels"])
        self.engine: InferenceEngine | None = None
        self.failure: str | None = None  # why loading or warm-up failed (the replica stays up to say so)
        self.waiting = 0  # images admitted and not yet handed to the model
        self.stats = {"requests": 0, "images": 0, "batches": 0, "largest_batch": 0, "batch_sizes": {}}
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.classify_batch.set_max_batch_size(settings["max_batch"])
        self.classify_batch.set_batch_wait_timeout_s(settings["batch_wait_s"])
        self.m_requests = metrics.Counter("cora_requests_total", description="classify requests by HTTP status",
                                          tag_keys=("status",))
        self.m_latency = metrics.Histogram("cora_request_latency_seconds", description="classify latency, seconds",
                                           boundaries=_LATENCY_BOUNDS)
        self.m_batch = metrics.Histogram("cora_batch_size", description="images per model call",
                                         boundaries=[float(b) for b in range(1, settings["max_batch"] + 1)])
        self.m_queue = metrics.Gauge("cora_queue_depth", description="images waiting for the model in this replica")
        self.m_queue.set(0)
        if settings.get("num_threads"):
            torch.set_num_threads(int(settings["num_threads"]))
        # load + warm up off the constructor: the replica answers /healthz and /readyz meanwhile
        threading.Thread(target=self._prepare, args=(source,), name="cora-warmup", daemon=True).start()

    def _prepare(self, source: dict) -> None:
        try:
            delay = float(os.environ.get(WARMUP_DELAY_ENV) or 0)
            if delay > 0:
                time.sleep(delay)
            kw = dict(device=self.settings["device"], dtype=self.settings["dtype"], max_batch=self.settings["max_batch"])
            if "checkpoint" in source:
                engine = InferenceEngine.from_checkpoint(source["checkpoint"], deploy_weights=self.settings.get(
                    "deploy_weights", "auto"), **kw)
            else:
                engine = InferenceEngine.from_float(source["float"], source.get("weights"), source.get("shared"), **kw)
            engine.warm_up()
            self.engine = engine  # published only once warm: `ready` below reads it
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready

    # -------------------------------------------------------------------------- probes and info
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if self.ready:
            return JSONResponse({"status": "ready"})
        return _error(503, f"model failed to load: {self.failure}" if self.failure else "warming up", retry=True)

    def readiness(self) -> dict:
        """For :func:`run`, through a deployment handle: this replica's id and state."""
        return {"replica": self.replica_id, "ready": self.ready, "failure": self.failure}

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        info = self.engine.info() if self.engine is not None else {"ready": False}
        stats = dict(self.stats, queue_depth=self.waiting, replica=self.replica_id)
        return JSONResponse({"models": [info], "stats": stats, "limits": self.limits.__dict__,
                             "top_k": self.settings["top_k"], "max_queued": self.settings["max_queued"]})

    # -------------------------------------------------------------------------- classify
    @app.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        response = await self._classify(request)
        self.m_requests.inc(tags={"status": str(response.status_code)})
        self.m_latency.observe(time.perf_counter() - t0)
        return response

    async def _classify(self, request: Request) -> JSONResponse:
        if not self.ready:
            return _error(503, f"model failed to load: {self.failure}" if self.failure else "warming up", retry=True)
        try:
            body = await self._read_body(request)
            encoded = decode_request(body, request.headers.get("content-type"), self.limits)
        except PayloadError as exc:
            return _error(exc.status, exc.message)
        n = len(encoded)
        if self.waiting + n > self.settings["max_queued"]:  # bounded queue: refuse now, never wait unbounded
            return _error(503, f"server busy ({self.waiting} images queued, limit {self.settings['max_queued']})",
                          retry=True)
        ticket = _Ticket(n)
        self._admit(n)
        try:
            # decode per request, off the event loop, before batching: a bad image fails only this request
            images = await asyncio.to_thread(self._decode_all, encoded)
            results = await asyncio.gather(*(self.classify_batch((x, ticket)) for x in images))
        except PayloadError as exc:
            return _error(exc.status, exc.message)
        except Exception as exc:  # the model failed on this request's batch: this request fails, the replica lives
            return _error(500, f"inference failed: {type(exc).__name__}: {exc}")
        finally:
            # whatever no batch has taken yet (decoding failed, the client went away) leaves the queue now
            ticket.closed = True
            self._admit(-(n - ticket.started))
        self.stats["requests"] += 1
        info = self.engine.info()
        model = {k: info[k] for k in ("architecture", "float", "bits", "equiv_bits", "checkpoint_sha256")}
        preds = [{"top": [{"index": i, "label": self.engine.label(i), "prob": p} for i, p in top]} for top in results]
        return JSONResponse({"predictions": preds, "model": model})

    def _admit(self, n: int) -> None:
        self.waiting += n
        self.m_queue.set(self.waiting)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is over the limit, before reading the rest."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadError(413, f"body of {declared} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode_all(self, encoded: list[bytes]) -> list[torch.Tensor]:
        pre = self.engine.preprocessing
        many = len(encoded) > 1
        return [preprocess(decode_image(data, self.limits, f"images[{i}]" if many else "image"), pre)
                for i, data in enumerate(encoded)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # both replaced from the options in __init__
    async def classify_batch(self, items: list[tuple[torch.Tensor, _Ticket]]) -> list[list[tuple[int, float]]]:
        """Many requests' images ``[3, S, S]`` float32 (with their request's ticket) -> their top-k,
        one model call (in a thread)."""
        n = len(items)
        for _, ticket in items:  # these leave the queue (runs on the event loop, like _classify)
            if not ticket.closed:
                ticket.started += 1
                self._admit(-1)
        images = [x for x, _ in items]
        self.stats["batches"] += 1
        self.stats["images"] += n
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        self.stats["batch_sizes"][str(n)] = self.stats["batch_sizes"].get(str(n), 0) + 1
        self.m_batch.observe(n)
        # the model runs in a thread: the event loop keeps accepting, decoding and refusing requests
        return await asyncio.to_thread(self.engine.predict, torch.stack(images), self.settings["top_k"])


# ------------------------------------------------------------------------------------ running it
def _deployment(source: dict, settings: dict, opts):
    from ray.serve.config import BackpressureConfig

    # a replica must see every request it may queue itself (the batcher collects from them, and the
    # replica answers the JSON 503); +16: room for probes and /v1/models while its queue is full
    ongoing = settings["max_queued"] + 2 * settings["max_batch"] + 16
    return CoraServer.options(
        num_replicas=opts.replicas,
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.gpus_per_replica},
        max_ongoing_requests=ongoing,
        # the outer bound: requests waiting in Ray's proxy when every replica holds `ongoing` (Ray answers
        # 503 + Retry-After, plain text). Generous (4x), so that the replica's own JSON 503 is what clients
        # normally meet: Ray's count was seen to trip at 40 concurrent requests with a bound of 24 + 24
        max_queued_requests=4 * ongoing * opts.replicas,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        graceful_shutdown_wait_loop_s=0.5,  # in-flight requests finish; no need to poll every 2 s
        graceful_shutdown_timeout_s=20,
    ).bind(source, settings)


def _wait_ready(handle, replicas: int, timeout_s: float, stop: threading.Event) -> bool:
    """Until every replica says it is warm (through the handle: the router spreads the calls over
    the replicas, so asking a few times per replica reaches all of them); raises on failure or timeout.
    False: ``stop`` was set (SIGINT/SIGTERM during start-up)."""
    deadline = time.monotonic() + timeout_s
    ready: set[str] = set()
    while not stop.is_set():
        answers = [r.result(timeout_s=max(1.0, deadline - time.monotonic()))
                   for r in [handle.readiness.remote() for _ in range(4 * replicas)]]
        for a in answers:
            if a["failure"]:
                raise RuntimeError(f"replica {a['replica']} could not load the model: {a['failure']}")
            if a["ready"]:
                ready.add(a["replica"])
        if len(ready) >= replicas:
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ready)} of {replicas} replicas ready after {timeout_s:.0f} s")
        time.sleep(0.2)
    return False


def _http_ready(url: str, timeout_s: float) -> None:
    """Until the proxy routes /readyz (it learns the route a moment after serve.run returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.2)


def run(opts) -> int:
    """Start Ray (local, or join ``opts.address``), deploy, wait until ready, serve until SIGINT/SIGTERM.

    ``opts`` holds the CLI's (already checked) options: ``source`` (dict), ``settings`` (dict, see
    :class:`CoraServer`), ``host``, ``port``, ``replicas``, ``num_cpus``, ``gpus_per_replica``,
    ``address``, ``metrics_port``, ``ready_timeout``. Returns the exit status (0 after a clean stop).
    """
    import ray
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    t0 = time.perf_counter()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's INFO lines say nothing the ready line doesn't
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    init = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False, configure_logging=True)
    try:
        if opts.address:
            ray.init(address=opts.address, **init)
        else:
            # the proxy and controller take 0 CPUs: only the replicas need reserving
            ray.init(num_cpus=max(1, math.ceil(opts.num_cpus * opts.replicas)), _metrics_export_port=opts.metrics_port,
                     **init)
        for s in previous:  # ray.init may install its own handlers: ours decide how to stop
            signal.signal(s, lambda *_: stop.set())
        serve.start(http_options=HTTPOptions(host=opts.host, port=opts.port),
                    logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False))
        handle = serve.run(_deployment(opts.source, opts.settings, opts), name=APP_NAME, route_prefix="/",
                           logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False))
        if not _wait_ready(handle, opts.replicas, opts.ready_timeout, stop):
            print("cora serve: stopped before it was ready", file=sys.stderr, flush=True)
            return 0  # the finally below shuts down
        url = f"http://{opts.host}:{opts.port}"
        _http_ready(url, 60)
        metrics = (f"http://127.0.0.1:{opts.metrics_port}/metrics" if not opts.address
                   else "each node's Ray metrics agent (see the cluster's ray start --metrics-export-port)")
        what = opts.source.get("checkpoint") or f"float {opts.source['float']}"
        cfg = opts.settings
        print(f"cora serve: ready at {url} ({what}, {opts.replicas} replica(s), device {cfg['device']}, "
              f"max batch {cfg['max_batch']}, {time.perf_counter() - t0:.1f} s from start to ready; metrics at {metrics})",
              flush=True)
        while not stop.wait(0.5):
            pass
        print("cora serve: stopping (finishing in-flight requests)", file=sys.stderr, flush=True)
    finally:
        for s in previous:  # a second Ctrl-C during shutdown must not leave Ray half-stopped
            signal.signal(s, signal.SIG_IGN)
        # serve.shutdown lets in-flight requests finish (graceful_shutdown_*); bounded, since it waits
        # on Ray's control store forever if that is gone (a signal sent to the whole process group)
        stopper = threading.Thread(target=serve.shutdown, name="cora-serve-shutdown", daemon=True)
        if ray.is_initialized():  # (ray.init itself may have failed)
            stopper.start()
            stopper.join(SHUTDOWN_TIMEOUT_S)
        if stopper.is_alive():
            print(f"cora: warning: Ray Serve did not stop within {SHUTDOWN_TIMEOUT_S} s; stopping Ray",
                  file=sys.stderr, flush=True)
        ray.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
