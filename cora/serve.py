"""``cora serve``: a cora checkpoint (or a float peer) behind HTTP, on Ray Serve.

Ray Serve does the serving: the HTTP proxy, replicas (fixed or autoscaled), dynamic batching
(``@serve.batch``), backpressure (``max_ongoing_requests`` per replica, ``max_queued_requests`` per
proxy), health checks and replacement of failed replicas, clusters (``--address``) and metrics. This
module adds the model (:mod:`cora.inference`), request checks (:mod:`cora.payloads`) and the API:

* ``POST /v1/classify``: one PNG/JPEG (``image/png``, ``image/jpeg``) or JSON ``{"images": [base64,
  ...]}`` -> ``{"predictions": [{"top": [{"index", "label", "prob"}, ...]}, ...], "model": {...}}``;
* ``GET /v1/models``: the model's :meth:`InferenceEngine.info` plus this replica's counters;
* ``GET /healthz``: 200 from a live replica; ``GET /readyz``: 200 while the application is RUNNING
  (Serve's own status), 503 otherwise.

A replica loads, deploys and warms the model up in its constructor: Serve routes to it only once
that is done, and a load that fails makes the deployment fail (``cora serve`` exits with the cause).
``check_health`` raises once the model has failed :data:`BROKEN_AFTER` calls in a row, so Serve
replaces the replica. Request bodies are decoded in a bounded thread pool per replica and the model
runs in its own single thread: the event loop only routes. Every error the replica writes is JSON
``{"error": "one line"}``; Ray's own refusals (backpressure) are its plain-text 503.
See ``docs/serving.md`` for the API, backpressure as a client sees it, scaling and metrics.
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
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .inference import InferenceEngine
from .payloads import PayloadError, decode_image, decode_request, preprocess
from .serve_settings import ServeSettings, ray_environment

__all__ = ["CoraServer", "run", "APP_NAME", "BROKEN_AFTER", "ModelLoadError", "load_engine"]

APP_NAME = "cora"
BROKEN_AFTER = 3  # model calls failing in a row before check_health reports the replica broken
SHUTDOWN_TIMEOUT_S = 60  # the most serve.shutdown may take before Ray is stopped anyway
# After SIGINT / SIGTERM the service keeps answering this long before Serve shuts down: serve.shutdown
# stops the HTTP proxy at once, which closed requests still in flight at the signal (3 of 4 in one CI run
# with the machine loaded); a request on this model takes milliseconds, a loaded machine's batch a second.
DRAIN_SECONDS = 3.0
HEALTH_CHECK_PERIOD_S = 2.0  # Serve's probe of each replica (its default is 10 s)
_DECODE_BOUNDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]

app = FastAPI(title="cora serve", docs_url=None, redoc_url=None, openapi_url=None)


class ModelLoadError(ValueError):
    """The replicas could not load the model; the message is one line naming the cause."""


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # unknown paths and methods: the same JSON error shape as everything else
    return _error(exc.status_code, exc.detail)


LOAD_FAILURE_MARK = "cora-load-failure:"  # finds the one line in Serve's DEPLOY_FAILED message


def load_engine(settings: ServeSettings) -> InferenceEngine:
    """The settings' model, built, deployed and warmed up (each batch bucket run once)."""
    kw = dict(device=settings.device, dtype=settings.dtype, max_batch=settings.max_batch)
    src = settings.source
    if src.checkpoint is not None:
        engine = InferenceEngine.from_checkpoint(src.checkpoint, deploy_weights=settings.deploy_weights, **kw)
    else:
        engine = InferenceEngine.from_float(src.float_model, src.weights, src.shared, **kw)
    engine.warm_up()
    return engine


def _app_status() -> str:
    """This application's status in Serve (``RUNNING``, ``DEPLOYING``, ...; ``MISSING`` if unknown)."""
    found = serve.status().applications.get(APP_NAME)
    return "MISSING" if found is None else str(getattr(found.status, "value", found.status))


@serve.deployment(name="CoraServer")
@serve.ingress(app)
class CoraServer:
    """One replica: the engine (loaded and warm when the constructor returns), its two executors,
    the batcher and the counters. ``settings``: the checked :class:`ServeSettings`."""

    def __init__(self, settings: ServeSettings) -> None:
        import ray
        from ray.serve import metrics

        self.settings = settings
        torch.set_num_threads(settings.num_threads)
        try:
            self.engine = load_engine(settings)
        except Exception as exc:  # one line Serve's failure message carries to `cora serve`
            raise ModelLoadError(f"{LOAD_FAILURE_MARK} {settings.source.describe()}: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())}") from exc
        # decoding: bounded pool (at most max_ongoing requests wait for it); the model: one thread of its own
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="cora-decode")
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="cora-model")
        self.failed_in_a_row = 0
        info = self.engine.info()  # what every answer names: fixed once loaded, so built once, not per request
        self.model_summary = {k: info[k] for k in ("architecture", "float", "bits", "equiv_bits", "checkpoint_sha256")}
        self.stats = {"requests": 0, "images": 0, "batches": 0, "largest_batch": 0, "batch_sizes": {}}
        ctx = ray.get_runtime_context()
        self.replica = {"actor_id": ctx.get_actor_id(), "node_id": ctx.get_node_id(), "pid": os.getpid()}
        self.classify_batch.set_max_batch_size(settings.max_batch)
        self.classify_batch.set_batch_wait_timeout_s(settings.batch_wait_s)
        # only what Ray does not export itself (requests, latency and batch size are Ray Serve's own)
        self.m_images = metrics.Counter("cora_images_total", description="images classified (a request may hold many)")
        self.m_decode = metrics.Histogram("cora_decode_seconds", description="decoding and preprocessing one request",
                                          boundaries=_DECODE_BOUNDS)

    def check_health(self) -> None:
        """Serve's periodic probe: raising makes Serve replace this replica."""
        if self.failed_in_a_row >= BROKEN_AFTER:
            raise RuntimeError(f"the model failed {self.failed_in_a_row} calls in a row")

    def __del__(self) -> None:
        for pool in (getattr(self, "decode_pool", None), getattr(self, "model_pool", None)):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------------------- probes and info
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        status = await asyncio.to_thread(_app_status)
        if status == "RUNNING":
            return JSONResponse({"status": "ready"})
        return _error(503, f"application status {status}", retry_after=1)

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        s = self.settings
        return JSONResponse({"models": [self.engine.info()], "stats": dict(self.stats, replica=self.replica),
                             "limits": s.limits.__dict__, "top_k": s.top_k,
                             "backpressure": {"max_ongoing_requests": s.max_ongoing, "max_queued_requests": s.max_queued}})

    # -------------------------------------------------------------------------- classify
    @app.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        loop = asyncio.get_running_loop()
        try:
            body = await self._read_body(request)
            images = await loop.run_in_executor(self.decode_pool, self._decode, body, request.headers.get("content-type"))
        except PayloadError as exc:
            return _error(exc.status, exc.message)
        try:
            results = await asyncio.gather(*(self.classify_batch(x) for x in images))
        except Exception as exc:  # the model failed on this request's batch: this request fails
            return _error(500, f"inference failed: {type(exc).__name__}: {exc}")
        self.stats["requests"] += 1
        self.m_images.inc(len(images))
        preds = [{"top": [{"index": i, "label": self.engine.label(i), "prob": p} for i, p in top]} for top in results]
        return JSONResponse({"predictions": preds, "model": self.model_summary})

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is over the limit, before reading the rest."""
        limit = self.settings.limits.max_body_bytes
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

    def _decode(self, body: bytes, content_type: str | None) -> list[torch.Tensor]:
        """(decode pool) The request's images as model inputs ``[3, S, S]`` float32; raises PayloadError."""
        t0 = time.perf_counter()
        limits, pre = self.settings.limits, self.engine.preprocessing
        encoded = decode_request(body, content_type, limits)  # JSON, base64, header sizes
        many = len(encoded) > 1
        out = [preprocess(decode_image(data, limits, f"images[{i}]" if many else "image"), pre)
               for i, data in enumerate(encoded)]
        self.m_decode.observe(time.perf_counter() - t0)
        return out

    def _predict(self, images: torch.Tensor) -> list[list[tuple[int, float]]]:
        """(model thread) One model call; counts failures in a row for :meth:`check_health`."""
        try:
            out = self.engine.predict(images, self.settings.top_k)
        except Exception:
            self.failed_in_a_row += 1
            raise
        self.failed_in_a_row = 0
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # both replaced from the settings in __init__
    async def classify_batch(self, images: list[torch.Tensor]) -> list[list[tuple[int, float]]]:
        """Many requests' images ``[3, S, S]`` float32 -> their top-k, one model call in the model thread."""
        n = len(images)
        self.stats["batches"] += 1
        self.stats["images"] += n
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
        self.stats["batch_sizes"][str(n)] = self.stats["batch_sizes"].get(str(n), 0) + 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.model_pool, self._predict, torch.stack(images))


# ------------------------------------------------------------------------------------ running it
def deployment_options(settings: ServeSettings) -> dict:
    """Ray Serve's options for the settings: replicas (fixed or autoscaled), resources, backpressure."""
    opts = dict(
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.gpus_per_replica},
        max_ongoing_requests=settings.max_ongoing,  # what one replica holds: the batcher fills from these
        max_queued_requests=settings.max_queued,  # waiting at each proxy / handle beyond that; then 503
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_wait_loop_s=0.5,  # in-flight requests finish; no need to poll every 2 s
        graceful_shutdown_timeout_s=20,
    )
    if settings.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing,
            # quicker than Serve's defaults (30 s look-back, 30 s up, 600 s down): a step in load shows in seconds
            "look_back_period_s": 10.0, "upscale_delay_s": 3.0, "downscale_delay_s": 15.0,
        }
    else:
        opts["num_replicas"] = settings.replicas
    return opts


def _deploy(settings: ServeSettings, stop: threading.Event) -> bool:
    """``serve.run`` in a thread (it blocks until every replica is constructed, or the deployment failed);
    False: ``stop`` was set first. Raises :class:`ModelLoadError` / ``TimeoutError``."""
    from ray.serve.schema import LoggingConfig

    result: dict = {}

    def deploy() -> None:
        try:
            serve.run(CoraServer.options(**deployment_options(settings)).bind(settings), name=APP_NAME,
                      route_prefix="/", logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False))
            result["ok"] = True
        except Exception as exc:  # noqa: BLE001 - carried to the main thread
            result["error"] = exc

    worker = threading.Thread(target=deploy, name="cora-deploy", daemon=True)
    worker.start()
    deadline = time.monotonic() + settings.ready_timeout
    while worker.is_alive():
        if stop.is_set():
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicas were not all up within --ready-timeout {settings.ready_timeout:g} s")
        worker.join(0.2)
    if "error" in result:
        text = "\n".join([str(result["error"]), *_deployment_messages()])
        lines = [ln for ln in text.splitlines() if LOAD_FAILURE_MARK in ln]
        if lines:
            raise ModelLoadError("could not load the model: " + lines[-1].split(LOAD_FAILURE_MARK, 1)[1].strip())
        raise RuntimeError(f"Ray Serve could not deploy: {' '.join(text.split())[:500]}")
    return True


def _deployment_messages() -> list[str]:
    """Serve's status messages of this application's deployments (a failed constructor's traceback is there)."""
    try:
        found = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001 - only used to word an error better
        return []
    return [] if found is None else [d.message for d in found.deployments.values() if d.message]


def _http_ready(url: str, timeout_s: float, stop: threading.Event) -> None:
    """Until the proxy routes /readyz to a replica (it learns the route a moment after serve.run returns)."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.2)


def _start_ray(settings: ServeSettings) -> None:
    import ray

    init = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False, configure_logging=True)
    if settings.address:
        ray.init(address=settings.address, **init)
        return
    # the node's address (127.0.0.1) and usage statistics: see serve_settings.ray_environment, applied before
    # Ray is imported; ray.init has no public argument for the metrics port (`ray start` has --metrics-export-port)
    for name, value in ray_environment(settings).items():
        os.environ.setdefault(name, value)
    ray.init(num_cpus=max(1, math.ceil(settings.num_cpus * settings.most_replicas)),
             _metrics_export_port=settings.metrics_port, **init)


def _ready_line(settings: ServeSettings, url: str, t0: float) -> str:
    metrics = (f"http://127.0.0.1:{settings.metrics_port}/metrics" if not settings.address
               else "each node's Ray metrics agent (see the cluster's ray start --metrics-export-port)")
    replicas = (f"{settings.min_replicas}-{settings.max_replicas} replicas (autoscaling)" if settings.autoscaling
                else f"{settings.replicas} replica(s)")
    return (f"cora serve: ready at {url} ({settings.source.describe()}, {replicas}, device {settings.device}, "
            f"max batch {settings.max_batch}, {time.perf_counter() - t0:.1f} s from start to ready; metrics at {metrics})")


def run(settings: ServeSettings) -> int:
    """Start Ray (local on 127.0.0.1, or join ``settings.address``), deploy, serve until SIGINT/SIGTERM.

    Returns 0 after a clean stop; raises :class:`ModelLoadError` when the replicas cannot load the model.
    """
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    t0 = time.perf_counter()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's INFO lines say nothing the ready line doesn't
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _start_ray(settings)
        for s in previous:  # ray.init may install its own handlers: ours decide how to stop
            signal.signal(s, lambda *_: stop.set())
        serve.start(proxy_location=settings.proxy_location, http_options=HTTPOptions(host=settings.host, port=settings.port),
                    logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False))
        url = f"http://{settings.host}:{settings.port}"
        if not _deploy(settings, stop):
            print("cora serve: stopped before it was ready", file=sys.stderr, flush=True)
            return 0  # the finally below shuts down
        _http_ready(url, settings.ready_timeout, stop)
        if not stop.is_set():
            print(_ready_line(settings, url, t0), flush=True)
        while not stop.wait(0.5):
            pass
        print(f"cora serve: stopping (finishing in-flight requests, {DRAIN_SECONDS:g} s)", file=sys.stderr, flush=True)
        time.sleep(DRAIN_SECONDS)  # the proxy still routes: what was sent before the signal is answered
    finally:
        _shutdown(previous)
    return 0


def _shutdown(previous: dict) -> None:
    import ray

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
