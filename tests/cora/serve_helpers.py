"""What the serving tests share: a small checkpoint made fast, encoded images, a standard-library
HTTP client, a ``cora serve`` subprocess with bounded waits, and a closed-loop load that stops by itself."""
from __future__ import annotations

import io
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def make_checkpoint(path: Path, *, preprocessing: bool = True) -> Path:
    """ResNet-20 W4, uniform ranks, no search and no tuning (about 2 s on the CPU)."""
    import cora
    from cora.experiments.data import cifar10_calibration
    from cora.experiments.pipeline import load_float_model

    calib = cifar10_calibration(100).images[:64]
    config = cora.CoRaConfig(method="uniform", rounding="nearest", range_method="minmax", factorization="weight",
                             sequential=False, refine=False, tune_iterations=0, calib_images=64, progress=False)
    q = cora.convert(load_float_model("cifar_resnet20"), calib, config)
    if preprocessing:
        q.cora_architecture = {"name": "cifar_resnet20"}
    else:  # no architecture and no record: the checkpoint has preprocessing null
        q.cora_architecture = None
    return cora.save(q, path)


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` RGB pixels (the data is one empty row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, data: bytes | None = None, content_type: str | None = None, timeout: float = 30.0):
    """``(status, headers, body bytes)``; HTTP errors are answers too, connection errors raise."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class Server:
    """``python -m cora serve ARGS`` in its own session; stdout/stderr collected by threads."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cora", "serve", *args, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()
        self.ready_line: str | None = None

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 150.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("cora serve: ready at"):
                self.ready_line = line
                return line
        raise AssertionError(f"no ready line within {timeout} s (exit {self.proc.poll()}); stderr: "
                             + "\n".join(self.stderr[-20:]))

    def stop(self, timeout: float = 90.0) -> tuple[int, float]:
        """SIGTERM; ``(exit status, seconds it took)``. Killed (whole session) if over ``timeout``."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: Ray's processes with it
            except ProcessLookupError:
                pass
            self.proc.wait(30)


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition()`` until it returns something truthy (returned); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def replica_info(url: str, timeout: float = 10.0) -> dict | None:
    """``/v1/models``' ``stats.replica`` (``pid``, ``actor_id``, ``node_id``) of whichever replica answered."""
    import json

    try:
        status, _, body = request(url + "/v1/models", timeout=timeout)
    except OSError:
        return None
    return json.loads(body)["stats"]["replica"] if status == 200 else None


def replica_pids(url: str, want: int, timeout: float = 120.0) -> set[int]:
    """Ask ``/v1/models`` until ``want`` different replica processes have answered."""
    seen: set[int] = set()

    def enough():
        info = replica_info(url)
        if info is not None:
            seen.add(info["pid"])
        return len(seen) >= want

    wait_for(enough, timeout, f"{want} replicas answering /v1/models (seen {seen})", interval=0.05)
    return seen


@dataclass
class Outcome:
    """One request of a :class:`ClosedLoop`: monotonic start / end, HTTP status (None: connection error or
    timeout) and the error text."""

    start: float
    end: float
    status: int | None
    error: str = ""


@dataclass
class ClosedLoop:
    """``clients`` threads, each posting ``body`` again as soon as its last answer came, until :meth:`stop`
    or ``max_seconds``; each request times out after ``timeout`` s, so every thread ends by itself."""

    url: str
    body: bytes
    clients: int = 4
    timeout: float = 30.0
    max_seconds: float = 300.0
    outcomes: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + self.max_seconds
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()

    def _client(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            t0 = time.monotonic()
            try:
                status, _, _ = request(self.url + "/v1/classify", self.body, "image/png", timeout=self.timeout)
                out = Outcome(t0, time.monotonic(), status)
            except OSError as exc:
                out = Outcome(t0, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)  # a refused connection returns at once: do not spin
            with self._lock:
                self.outcomes.append(out)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.outcomes)

    def stop(self) -> list:
        """Stop the clients and wait for them (each ends within its request timeout); all outcomes."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread did not end after its timeout"
        return self.snapshot()
