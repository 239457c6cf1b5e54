"""``cora serve`` soak (opt-in: ``CORA_SERVE_SOAK=1``): a steady request rate for ``CORA_SERVE_SOAK_SECONDS``
(default 300) against one replica; nothing may be lost and the replica's resident memory may grow by less
than 5 % between the end of a warm-up minute and the end. The p99 latency of each minute is printed (``-s``),
not asserted (timings depend on the machine's load).

    CORA_SERVE_SOAK=1 python -m pytest -q -s tests/cora/test_serve_soak.py
"""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.cora.serve_helpers import Outcome, Server, make_checkpoint, png, replica_pids, request

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("CORA_SERVE_SOAK") != "1", reason="opt-in: CORA_SERVE_SOAK=1")]

SECONDS = float(os.environ.get("CORA_SERVE_SOAK_SECONDS", "300"))
RATE = float(os.environ.get("CORA_SERVE_SOAK_RATE", "10"))  # requests per second
WARM_S = 60.0  # memory is compared from the end of this first minute (allocator and caches settle)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _paced(url: str, body: bytes, rate: float, seconds: float, on_tick) -> list:
    """Requests sent at ``rate`` per second for ``seconds`` (each by a pool thread, 60 s timeout);
    ``on_tick(elapsed)`` is called about once a second from the pacing thread."""
    outcomes, lock = [], threading.Lock()

    def one(t_sched: float) -> None:
        try:
            status = request(url + "/v1/classify", body, "image/png", timeout=60)[0]
            out = Outcome(t_sched, time.monotonic(), status)
        except OSError as exc:
            out = Outcome(t_sched, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
        with lock:
            outcomes.append(out)

    t0, n, next_tick = time.monotonic(), int(rate * seconds), 1.0
    with ThreadPoolExecutor(32) as pool:
        for i in range(n):
            t_sched = t0 + i / rate
            time.sleep(max(0.0, t_sched - time.monotonic()))
            pool.submit(one, t_sched)
            if time.monotonic() - t0 >= next_tick:
                on_tick(time.monotonic() - t0)
                next_tick += 1.0
    return outcomes


def test_soak_steady_rate(tmp_path):
    ckpt = make_checkpoint(tmp_path / "r20.safetensors")
    body = png(np.random.default_rng().integers(0, 256, (32, 32, 3), dtype=np.uint8))
    srv = Server([str(ckpt), "--device", "cpu", "--num-cpus", "1", "--max-batch", "8", "--batch-wait-ms", "5"])
    try:
        srv.wait_ready()
        (pid,) = replica_pids(srv.url, 1)
        rss: dict = {}

        def tick(elapsed: float) -> None:
            if "warm" not in rss and elapsed >= WARM_S:
                rss["warm"] = _rss_bytes(pid)

        t0 = time.monotonic()
        outcomes = _paced(srv.url, body, RATE, SECONDS, tick)
        rss["end"] = _rss_bytes(pid)
        assert srv.stop(timeout=120)[0] == 0
    finally:
        srv.kill()
    lost = [o for o in outcomes if o.status != 200]
    growth = rss["end"] / rss["warm"] - 1
    minutes = {}
    for o in outcomes:
        minutes.setdefault(int((o.start - t0) // 60), []).append(o.end - o.start)
    p99 = {m: float(np.percentile(v, 99)) for m, v in sorted(minutes.items())}
    print(f"\nsoak: {len(outcomes)} requests at {RATE:g}/s for {SECONDS:g} s, {len(lost)} lost; replica RSS "
          f"{rss['warm'] / 2**20:.1f} MiB after {WARM_S:g} s -> {rss['end'] / 2**20:.1f} MiB ({100 * growth:+.2f} %); "
          f"p99 per minute (s): {', '.join(f'{v:.3f}' for v in p99.values())}; load average {os.getloadavg()[0]:.2f}")
    assert len(outcomes) == int(RATE * SECONDS) and not lost, lost[:5]
    assert growth < 0.05
