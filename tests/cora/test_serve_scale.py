"""``cora serve`` scaling with real servers on loopback: Serve's autoscaling under a 1 -> 16 client step and
back, and a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, Ray's own test tooling, both
nodes on 127.0.0.1) with replicas on both nodes, one node killed under load and a node added back.

Each test starts what it uses and stops it at the end; the waits poll a condition with a bound; measured
times are printed (``-s``), never asserted.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.cora.serve_helpers import (ROOT, ClosedLoop, Server, make_checkpoint, png, replica_info, replica_pids,
                                      request, wait_for)

pytestmark = pytest.mark.slow

ARGS = ["--device", "cpu", "--num-cpus", "1", "--max-batch", "8", "--batch-wait-ms", "5"]

CLUSTER_SCRIPT = """
import os, sys
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
from ray.cluster_utils import Cluster
node = dict(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
cluster = Cluster(initialize_head=True, head_node_args=node)
worker = cluster.add_node(**node)
cluster.wait_for_nodes()
print("cluster", cluster.address, cluster.head_node.node_id, worker.node_id, flush=True)
for line in sys.stdin:
    if line.strip() == "kill-worker":
        cluster.remove_node(worker, allow_graceful=False)
        print("killed", flush=True)
    elif line.strip() == "add-worker":
        worker = cluster.add_node(**node)
        cluster.wait_for_nodes()
        print("added", worker.node_id, flush=True)
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("scale") / "r20.safetensors")


@pytest.fixture
def body():
    return png(np.random.default_rng().integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_autoscaling_follows_a_client_step_up_and_back(ckpt, body):
    srv = Server([str(ckpt), *ARGS, "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing", "2"])
    try:
        srv.wait_ready()
        (first,) = replica_pids(srv.url, 1)
        load = ClosedLoop(srv.url, body, clients=1, timeout=60)
        try:
            wait_for(lambda: len([o for o in load.snapshot() if o.status == 200]) >= 20, 120, "20 answers, 1 client")
            step = ClosedLoop(srv.url, body, clients=15, timeout=60)  # 1 -> 16 clients
            t_step = time.monotonic()
            try:
                pids = replica_pids(srv.url, 2, timeout=240)  # Serve added a replica
                t_up = time.monotonic()
            finally:
                outcomes = step.stop()
        finally:
            outcomes += load.stop()
        t_idle = time.monotonic()
        wait_for(lambda: sum(_alive(p) for p in pids) == 1, 240, "back to one replica process")
        t_down = time.monotonic()
        ended = [p for p in pids if not _alive(p)]
        assert replica_info(srv.url) is not None  # the one left answers
    finally:
        srv.kill()
    failed = [o for o in outcomes if o.status != 200]
    print(f"\nautoscaling: 2nd replica answered {t_up - t_step:.1f} s after the step to 16 clients; back to 1 replica "
          f"{t_down - t_idle:.1f} s after the load stopped (replica process {ended} ended, first was {first}); "
          f"{len(outcomes)} requests, {len(failed)} failed; load average {os.getloadavg()[0]:.2f}")
    assert not failed, failed[:5]


class _TestCluster:
    """A head node and a worker node (1 CPU each) from ``ray.cluster_utils.Cluster`` in a subprocess."""

    def __init__(self) -> None:
        # both nodes are this machine: without Serve's preference for the proxy's own node, requests reach both
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
        self.proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        fields = self._line("cluster")
        self.address, self.head_id, self.worker_id = fields[1:4]

    def _line(self, first: str) -> list:
        while True:  # bounded by the tests' timeouts: the script prints this line or dies (EOF)
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the test cluster ended before printing {first!r}")
            if line.startswith(first):
                return line.split()

    def command(self, what: str, reply: str) -> list:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._line(reply)

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _nodes_answering(url: str, want: set, timeout: float) -> set:
    seen: set = set()
    last: list = []

    def all_seen():
        try:
            status, _, body = request(url + "/v1/models", timeout=10)
        except OSError as exc:
            last[:] = [repr(exc)]
            return False
        last[:] = [status, body[:300]]
        if status == 200:
            seen.add(json.loads(body)["stats"]["replica"]["node_id"])
        return want <= seen

    try:
        wait_for(all_seen, timeout, "replicas answering", interval=0.05)
    except AssertionError:
        raise AssertionError(f"replicas on nodes {want} not all answering within {timeout} s: seen {seen}, "
                             f"last answer {last}") from None
    return seen


def test_two_node_cluster_serves_from_both_and_survives_losing_a_node(ckpt, body):
    cluster = _TestCluster()
    srv = None
    try:
        srv = Server([str(ckpt), *ARGS, "--replicas", "2", "--address", cluster.address,
                      "--proxy-location", "HeadOnly"])
        srv.wait_ready(timeout=240)
        _nodes_answering(srv.url, {cluster.head_id, cluster.worker_id}, 120)  # one replica on each node
        load = ClosedLoop(srv.url, body, clients=4, timeout=60)
        try:
            wait_for(lambda: sum(o.status == 200 for o in load.snapshot()) >= 20, 120, "20 answers before")
            t_kill = time.monotonic()
            cluster.command("kill-worker", "killed")
            wait_for(lambda: sum(o.status == 200 and o.start > t_kill + 1 for o in load.snapshot()) >= 20, 120,
                     "20 answers from the head node's replica after the worker node died")
            new_worker = cluster.command("add-worker", "added")[1]
            t_added = time.monotonic()
            _nodes_answering(srv.url, {cluster.head_id, new_worker}, 240)  # Serve placed the replica again
            t_back = time.monotonic()
        finally:
            outcomes = load.stop()
        rc = srv.stop(timeout=120)[0]
    finally:
        if srv is not None:
            srv.kill()
        cluster.stop()
    failed = [o for o in outcomes if o.status != 200]
    print(f"\nworker node killed under load: {len(outcomes)} requests, {len(failed)} failed "
          f"({sorted({o.status or o.error.split(':')[0] for o in failed}, key=str)}); a replica on the new node "
          f"answered {t_back - t_added:.1f} s after it joined; load average {os.getloadavg()[0]:.2f}")
    assert rc == 0
    assert not [o for o in failed if "timed out" in o.error], "a request hung"
    assert len(failed) <= 4, failed  # at most the dead node's in-flight requests (4 closed-loop clients)
    assert all(o.start >= t_kill - 60 for o in failed)
