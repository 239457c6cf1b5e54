"""``cora serve`` under faults, with real servers on loopback and closed-loop clients that stop by themselves:
a replica process SIGKILLed (one of two, and the only one), SIGTERM under load, a replica whose load fails.

Each test starts its own server and kills its whole process group at the end. Nothing asserts on elapsed
time: the waits poll a condition with a bound, and the measured times are printed (``-s`` shows them).
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.cora.serve_helpers import (ROOT, ClosedLoop, Server, free_port, make_checkpoint, png, replica_info,
                                      replica_pids, wait_for)

pytestmark = pytest.mark.slow

CLIENTS = 4
BASE_ARGS = ["--device", "cpu", "--num-cpus", "1", "--max-batch", "8", "--batch-wait-ms", "5"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "r20.safetensors")


@pytest.fixture
def body():
    return png(np.random.default_rng().integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _ok_count(load: ClosedLoop, since: float = 0.0) -> int:
    return sum(o.status == 200 and o.start >= since for o in load.snapshot())


def _report(name: str, outcomes: list, t_fault: float, extra: str = "") -> None:
    failed = [o for o in outcomes if o.status != 200]
    ok_after = [o.end for o in outcomes if o.status == 200 and o.start >= t_fault]
    again = f"{min(ok_after) - t_fault:.1f} s" if ok_after else "never"
    in_flight = sum(o.start < t_fault < o.end for o in outcomes)
    late = sum(o.start >= t_fault for o in failed)
    print(f"\n{name}: {len(outcomes)} requests, {in_flight} in flight at the fault, {len(failed)} failed "
          f"({late} of them sent after it) "
          f"({sorted({o.status or o.error.split(':')[0] for o in failed}, key=str)}), first answer started after "
          f"the fault came {again} after it{extra}; load average {os.getloadavg()[0]:.2f}")


def _kill_replica_under_load(ckpt, body, replicas: int, timeout: float) -> tuple[list, float, set]:
    """A server with ``replicas`` replicas under CLIENTS closed-loop clients; SIGKILL one replica process,
    wait for Serve's replacement to answer and for 20 more answers; the outcomes, kill time and old pids."""
    srv = Server([str(ckpt), *BASE_ARGS, "--replicas", str(replicas)])
    try:
        srv.wait_ready()
        pids = replica_pids(srv.url, replicas)
        load = ClosedLoop(srv.url, body, clients=CLIENTS, timeout=timeout)
        try:
            wait_for(lambda: _ok_count(load) >= 20, 120, "20 answers before the kill")
            victim = min(pids)
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: (replica_info(srv.url) or {}).get("pid") not in (None, *pids), 240,
                     "a replacement replica answering /v1/models", interval=0.1)
            t_new = time.monotonic()
            wait_for(lambda: _ok_count(load, since=t_new) >= 20, 120, "20 answers after the replacement")
        finally:
            outcomes = load.stop()
        print(f"\nreplacement answered /v1/models {t_new - t_kill:.1f} s after the SIGKILL")
        return outcomes, t_kill, pids
    finally:
        srv.kill()


def test_sigkill_one_of_two_replicas_under_load(ckpt, body):
    outcomes, t_kill, _ = _kill_replica_under_load(ckpt, body, replicas=2, timeout=30.0)
    _report("SIGKILL 1 of 2 replicas", outcomes, t_kill)
    failed = [o for o in outcomes if o.status != 200]
    assert not [o for o in failed if "timed out" in o.error], "a request hung until its timeout"
    # at most the killed replica's in-flight requests fail: with CLIENTS closed-loop clients, at most CLIENTS
    assert len(failed) <= CLIENTS, failed
    assert all(o.start >= t_kill - 30 for o in failed)  # none before the kill (30: a request's timeout)
    # the other replica answered while the killed one was being replaced
    assert any(o.status == 200 and o.start >= t_kill for o in outcomes)
    assert [o.status for o in sorted(outcomes, key=lambda o: o.start)[-20:]] == [200] * 20  # back to no errors


def test_sigkill_the_only_replica_under_load(ckpt, body):
    outcomes, t_kill, _ = _kill_replica_under_load(ckpt, body, replicas=1, timeout=90.0)
    _report("SIGKILL the only replica", outcomes, t_kill)
    assert not [o for o in outcomes if o.status is None and "timed out" in o.error], "a request hung"
    assert any(o.status == 200 and o.start >= t_kill for o in outcomes)  # Serve restarted it
    assert [o.status for o in sorted(outcomes, key=lambda o: o.start)[-20:]] == [200] * 20


def test_sigterm_under_load_finishes_in_flight_requests(ckpt, body):
    srv = Server([str(ckpt), *BASE_ARGS])
    try:
        srv.wait_ready()
        load = ClosedLoop(srv.url, body, clients=CLIENTS, timeout=60.0)
        try:
            wait_for(lambda: _ok_count(load) >= 20, 120, "20 answers before SIGTERM")
            t_term = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            rc = srv.proc.wait(150)
            t_exit = time.monotonic()
        finally:
            outcomes = load.stop()
    finally:
        srv.kill()
    _report("SIGTERM under load", outcomes, t_term, extra=f"; exit {rc} {t_exit - t_term:.1f} s after SIGTERM")
    assert rc == 0, "\n".join(srv.stderr[-20:])
    in_flight = [o for o in outcomes if o.start < t_term]
    assert [o.status for o in in_flight] == [200] * len(in_flight), [o for o in in_flight if o.status != 200]
    later = [o for o in outcomes if o.start >= t_term and o.status != 200]
    # refused cleanly: Serve's 503 while draining, or no listener any more; never a hang or a 5xx of the model
    assert all(o.status in (503, 404) or (o.status is None and "timed out" not in o.error) for o in later), later


def test_a_replica_that_cannot_load_fails_the_start_with_one_error_line(ckpt, tmp_path):
    """The CLI's pre-flight is skipped (settings built directly), so the corrupt file reaches the replicas."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(ckpt.read_bytes()[:-200])
    script = (
        "import sys\n"
        "from cora.cli import _fail\n"
        "from cora.serve import run\n"
        "from cora.serve_settings import ModelSource, ServeSettings\n"
        "from cora.experiments.models import preprocessing_for\n"
        "s = ServeSettings(source=ModelSource(checkpoint=sys.argv[1]), preprocessing=preprocessing_for('cifar_resnet20'),"
        " port=int(sys.argv[2]), metrics_port=int(sys.argv[3]), ready_timeout=240)\n"
        "try:\n"
        "    sys.exit(run(s))\n"
        "except BaseException as exc:\n"
        "    sys.exit(_fail(exc))\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(corrupt), str(free_port()), str(free_port())], cwd=ROOT,
                       capture_output=True, text=True, timeout=400, start_new_session=True)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("cora: error:")]
    print("\n" + "\n".join(errors))
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("cora: error: could not load the model: "), p.stderr[-3000:]
    assert str(corrupt) in errors[0]
