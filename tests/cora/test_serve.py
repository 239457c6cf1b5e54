"""``cora serve`` end to end: a real server (Ray Serve on this machine's CPU), real HTTP, standard-library
clients. Two servers: the main one (batching, accuracy, refusals, metrics, SIGTERM) and a small one
(warm-up delayed through CORA_SERVE_WARMUP_DELAY, a tiny queue: readiness and overload)."""
import base64
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import cora
from cora.experiments.data import NpzImageDataset, load_npz
from tests.cora.serve_helpers import ROOT, Server, jpeg, make_checkpoint, png, png_header_only, request

# the real-server tests are slow: each Ray Serve start-up takes 20-30 s on the 2-core CPU machine
slow = pytest.mark.slow

N_IMAGES = 100
CUSTOM_METRICS = ("ray_cora_requests_total", "ray_cora_request_latency_seconds", "ray_cora_batch_size",
                  "ray_cora_queue_depth")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "r20.safetensors")


@pytest.fixture(scope="module")
def cifar():
    images, labels = load_npz("data/cifar10_test.npz")
    return images[:N_IMAGES], labels[:N_IMAGES]


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server([str(ckpt), "--device", "cpu", "--num-cpus", "1", "--max-batch", "8", "--batch-wait-ms", "20",
                  "--max-queued", "64", "--max-images", "4", "--max-body-bytes", "50000", "--max-pixels", "1000000"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


def _offline_top1(ckpt, images: np.ndarray) -> list[int]:
    model = cora.deploy(cora.load(ckpt))
    with torch.no_grad():
        return model(NpzImageDataset(images, np.zeros(len(images), np.int64)).images).argmax(1).tolist()


def _classify(srv, data, ctype, timeout=60):
    """``(status, headers, decoded JSON body)``; a body that is not JSON comes back as text (Ray's own
    proxy answers its outer backpressure bound with a plain-text 503 + Retry-After)."""
    status, headers, body = request(srv.url + "/v1/classify", data, ctype, timeout=timeout)
    try:
        return status, headers, json.loads(body) if body else None
    except ValueError:
        return status, headers, body.decode("utf-8", "replace")


def _json_error(status, headers, doc, expected):
    assert status == expected, (status, doc)
    assert headers.get("Content-Type", "").startswith("application/json")
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"] and "\n" not in doc["error"]


@slow
def test_ready_line_and_probes(server):
    assert server.ready_line.startswith(f"cora serve: ready at {server.url} (")
    assert f"metrics at http://127.0.0.1:{server.metrics_port}/metrics" in server.ready_line
    assert request(server.url + "/healthz")[0] == 200
    assert request(server.url + "/readyz")[0] == 200
    status, _, body = request(server.url + "/v1/models")
    info = json.loads(body)["models"][0]
    assert status == 200 and info["architecture"] == "cifar_resnet20" and info["bits"] == 4
    assert info["checkpoint_sha256"] == cora.checkpoint.read_metadata(server.proc.args[4])["cora_sha256"]
    assert info["batch_buckets"] == [1, 2, 4, 8] and info["device"] == "cpu" and info["accuracy"] is None


@slow
def test_concurrent_requests_match_the_offline_model(server, ckpt, cifar):
    images, _ = cifar
    bodies = [png(a) for a in images]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: _classify(server, b, "image/png"), bodies))
    assert [a[0] for a in answers] == [200] * N_IMAGES
    served = [a[2]["predictions"][0]["top"][0]["index"] for a in answers]
    assert served == _offline_top1(ckpt, images)
    first = answers[0][2]
    top = first["predictions"][0]["top"]
    assert len(top) == 5 and [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    assert all(isinstance(t["label"], str) for t in top) and first["model"]["architecture"] == "cifar_resnet20"
    stats = json.loads(request(server.url + "/v1/models")[2])["stats"]
    assert stats["largest_batch"] > 1, stats  # the batcher did combine requests
    assert stats["images"] >= N_IMAGES


@slow
def test_json_body_with_several_images(server, cifar):
    images, _ = cifar
    body = json.dumps({"images": [base64.b64encode(png(images[i])).decode() for i in range(3)]}).encode()
    status, _, doc = _classify(server, body, "application/json")
    assert status == 200 and len(doc["predictions"]) == 3
    single = [_classify(server, png(images[i]), "image/png")[2]["predictions"][0] for i in range(3)]
    assert [p["top"][0]["index"] for p in doc["predictions"]] == [p["top"][0]["index"] for p in single]


@slow
def test_bad_requests_fail_alone(server, cifar):
    images, _ = cifar
    good_png = png(images[0])
    corrupt = bytearray(good_png)
    corrupt[60:200] = bytes(140)
    b64 = base64.b64encode(good_png).decode()
    bad = [
        (b"this is not an image", "image/png", 400),
        (bytes(corrupt), "image/png", 400),
        (jpeg(images[1])[:250], "image/jpeg", 400),
        (good_png, "text/plain", 415),
        (good_png, None, 415),
        (b"", "image/png", 400),
        (json.dumps({"images": [b64] * 5}).encode(), "application/json", 413),
        (b"\x89PNG" + bytes(60_000), "image/png", 413),
        (png_header_only(2000, 2000), "image/png", 413),
        (b'{"images": ["%%% not base64"]}', "application/json", 400),
        (b'{"images": [', "application/json", 400),
        (b'{"pictures": []}', "application/json", 400),
    ]
    jobs = [(body, ctype, expected) for body, ctype, expected in bad] + [(png(images[i]), "image/png", 200)
                                                                         for i in range(8)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda j: _classify(server, j[0], j[1]), jobs))
    for (body, ctype, expected), (status, headers, doc) in zip(jobs, answers):
        if expected == 200:
            assert status == 200 and doc["predictions"][0]["top"][0]["index"] in range(10)
        else:
            _json_error(status, headers, doc, expected)
    status, headers, body = request(server.url + "/no/such/path")
    _json_error(status, headers, json.loads(body), 404)


@slow
def test_metrics_show_the_custom_metrics(server):
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray's agent exports every few seconds
        try:
            text = request(url, timeout=5)[2].decode()
        except OSError:
            text = ""
        if all(name in text for name in CUSTOM_METRICS):
            break
        time.sleep(1)
    missing = [name for name in CUSTOM_METRICS if name not in text]
    assert not missing, f"not exported within 60 s: {missing}"
    assert 'status="200"' in text and "ray_serve_" in text  # by status; and Ray Serve's own metrics


@slow
def test_sigterm_stops_cleanly(server):
    # last test on this server (tests run in file order)
    rc, seconds = server.stop(timeout=90)
    assert rc == 0, "\n".join(server.stderr[-20:])
    assert seconds < 60
    print(f"\n{server.ready_line}\nstopped {seconds:.1f} s after SIGTERM")


@slow
def test_readiness_and_overload(ckpt, cifar):
    images, _ = cifar
    srv = Server([str(ckpt), "--device", "cpu", "--num-cpus", "1", "--max-batch", "2", "--batch-wait-ms", "300",
                  "--max-queued", "4", "--max-images", "4"], env={"CORA_SERVE_WARMUP_DELAY": "8"})
    try:
        # (d) before warm-up ends: /readyz 503 (JSON, Retry-After), /healthz 200; then 200
        seen_503, refused, deadline = False, 0, time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                status, headers, body = request(srv.url + "/readyz", timeout=5)
            except OSError:  # the proxy is not listening yet
                status = None
            if status == 503 and body.startswith(b"{"):
                _json_error(status, headers, json.loads(body), 503)
                assert headers.get("Retry-After")
                assert request(srv.url + "/healthz", timeout=5)[0] == 200
                c_status, c_headers, c_doc = _classify(srv, png(images[0]), "image/png", timeout=10)
                if c_status == 503:  # (200: the warm-up ended between the two requests)
                    _json_error(c_status, c_headers, c_doc, 503)
                    refused += 1
                seen_503 = True
            if status == 200:
                break
            assert srv.proc.poll() is None, "\n".join(srv.stderr[-20:])
            time.sleep(0.2)
        assert seen_503 and refused > 0 and status == 200
        srv.wait_ready(timeout=60)
        # (c) far more concurrent requests than --max-queued 4 allows: some 503 + Retry-After, no hang
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda a: _classify(srv, png(a), "image/png", timeout=30), list(images[:40])))
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0, statuses
        for status, headers, doc in answers:
            if status == 503:
                assert int(headers["Retry-After"]) >= 1
                if not isinstance(doc, str):  # the replica's refusal (Ray's outer bound answers in plain text)
                    _json_error(status, headers, doc, 503)
        assert any(isinstance(doc, dict) and status == 503 for status, _, doc in answers), answers  # the replica's bound
        assert request(srv.url + "/healthz", timeout=10)[0] == 200
        assert _classify(srv, png(images[0]), "image/png", timeout=30)[0] == 200
        rc, seconds = srv.stop(timeout=90)
        assert rc == 0 and seconds < 60
    finally:
        srv.kill()


def test_cli_refuses_bad_serve_arguments_before_starting_ray(ckpt, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(ckpt.read_bytes()[:-100])
    script = (
        "import sys, json\n"
        "from cora.cli import main\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    out.append(main(argv))\n"
        "print(json.dumps({'codes': out, 'ray': 'ray' in sys.modules}))\n"
    )
    cases = [
        ["serve", str(tmp_path / "missing.safetensors")],
        ["serve", str(corrupt)],
        ["serve", str(ckpt), "--port", "0"],
        ["serve", str(ckpt), "--port", "70000"],
        ["serve", str(ckpt), "--port", "http"],
        ["serve"],
        ["serve", str(ckpt), "--float", "cifar_resnet20"],
        ["serve", str(ckpt), "--top-k", "11"],
        ["serve", str(ckpt), "--max-images", "9", "--max-queued", "8"],
        ["serve", str(ckpt), "--deploy-weights", "int4"],
        ["serve", "--float", "cifar_resnet20", "--deploy-weights", "packed"],
    ]
    if not torch.cuda.is_available():
        cases.append(["serve", str(ckpt), "--device", "cuda"])
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    errors = p.stderr.strip().splitlines()
    assert result["codes"] == [2] * len(cases), p.stderr
    assert len(errors) == len(cases) and all(e.startswith("cora: error: ") for e in errors), errors
    assert result["ray"] is False  # every refusal came before Ray was imported, let alone started
    assert time.monotonic() - t0 < 60


def test_port_in_use_is_refused(ckpt):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "cora", "serve", str(ckpt), "--port", str(port), "--device", "cpu"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("cora: error: --port") and len(p.stderr.splitlines()) == 1


def test_import_cora_does_not_import_ray():
    code = "import sys, cora, cora.cli; cora.cli.build_parser(); print('ray' in sys.modules, 'fastapi' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["False", "False"], p.stderr
