"""``cora serve`` end to end: a real server (Ray Serve on this machine's CPU), real HTTP, standard-library
clients. The main server comes from a fixture that starts it again whenever a test left it dead or not
answering, so any order or subset of these tests passes; the overload test starts its own small server.
Faults (replica killed, SIGTERM under load, a failed load) are in test_serve_faults.py."""
import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import cora
from cora.experiments.data import NpzImageDataset, load_npz
from tests.cora.serve_helpers import ROOT, Server, jpeg, make_checkpoint, png, png_header_only, request, wait_for

# the real-server tests are slow: each Ray Serve start-up takes 15-30 s on the 2-core CPU machine
slow = pytest.mark.slow

N_IMAGES = 100
CUSTOM_METRICS = ("ray_cora_images_total", "ray_cora_decode_seconds")
# Ray Serve's own, which cora's docs point to for requests, latency and batch size
RAY_METRICS = ("ray_serve_num_http_requests", "ray_serve_http_request_latency_ms", "ray_serve_actual_batch_size")
MAIN_ARGS = ["--device", "cpu", "--num-cpus", "1", "--max-batch", "8", "--batch-wait-ms", "20", "--max-images", "4",
             "--max-body-bytes", "50000", "--max-pixels", "1000000", "--max-request-pixels", "1000000"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "r20.safetensors")


@pytest.fixture(scope="module")
def cifar():
    images, labels = load_npz("data/cifar10_test.npz")
    return images[:N_IMAGES], labels[:N_IMAGES]


@pytest.fixture(scope="module")
def _main_server(ckpt):
    holder: dict = {}
    yield holder
    if holder.get("srv") is not None:
        holder["srv"].kill()


def _answers(srv) -> bool:
    try:
        return srv.proc.poll() is None and request(srv.url + "/readyz", timeout=10)[0] == 200
    except OSError:
        return False


@pytest.fixture
def server(_main_server, ckpt):
    """The main server, started again if an earlier test left it dead or not ready."""
    srv = _main_server.get("srv")
    if srv is None or not _answers(srv):
        if srv is not None:
            srv.kill()
        srv = Server([str(ckpt), *MAIN_ARGS])
        _main_server["srv"] = srv
        srv.wait_ready()
    return srv


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
    assert json.loads(request(server.url + "/readyz")[2]) == {"status": "ready"}  # from Serve's application status
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
        # each image under --max-pixels, together over --max-request-pixels: refused before any decoding
        (json.dumps({"images": [base64.b64encode(png_header_only(600, 600)).decode()] * 3}).encode(),
         "application/json", 413),
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
def test_metrics_show_the_custom_and_rays_metrics(server, cifar):
    images, _ = cifar
    assert _classify(server, png(images[0]), "image/png")[0] == 200
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    wanted, last = CUSTOM_METRICS + RAY_METRICS, {"missing": None}

    def exported():  # Ray's agent exports every few seconds
        try:
            text = request(url, timeout=5)[2].decode()
        except OSError:
            return None
        last["missing"] = [name for name in wanted if name not in text]
        return None if last["missing"] else text

    try:
        text = wait_for(exported, 90, f"all of {wanted} at {url}", interval=1)
    except AssertionError:
        raise AssertionError(f"not exported within 90 s: {last['missing']}") from None
    assert "ray_cora_requests_total" not in text  # Ray counts requests itself (ray_serve_num_http_requests)


@slow
def test_overload_is_refused_by_serve_with_503(ckpt, cifar):
    images, _ = cifar
    # a replica holds 2 requests, its proxy queues 2 more: 40 at once must meet Serve's 503
    srv = Server([str(ckpt), "--device", "cpu", "--num-cpus", "1", "--max-batch", "2", "--batch-wait-ms", "300",
                  "--max-ongoing", "2", "--max-queued", "2"])
    try:
        srv.wait_ready()
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda a: _classify(srv, png(a), "image/png", timeout=60), list(images[:40])))
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0, statuses
        assert all("backpressure" in doc for status, _, doc in answers if status == 503), answers
        assert request(srv.url + "/healthz", timeout=10)[0] == 200
        assert _classify(srv, png(images[0]), "image/png", timeout=30)[0] == 200
        assert srv.stop(timeout=90)[0] == 0
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
        ["serve", str(ckpt), "--max-batch", "16", "--max-ongoing", "8"],
        ["serve", str(ckpt), "--min-replicas", "1", "--max-replicas", "2"],
        ["serve", str(ckpt), "--min-replicas", "2", "--max-replicas", "1", "--target-ongoing", "2"],
        ["serve", str(ckpt), "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing", "500"],
        ["serve", str(ckpt), "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing", "2"],
        ["serve", str(ckpt), "--max-pixels", "1000", "--max-request-pixels", "999"],
        ["serve", str(ckpt), "--max-pixels", str(2 ** 40)],
        ["serve", str(ckpt), "--deploy-weights", "int4"],
        ["serve", "--float", "cifar_resnet20", "--deploy-weights", "packed"],
    ]
    if not torch.cuda.is_available():
        cases.append(["serve", str(ckpt), "--device", "cuda"])
    p = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    errors = p.stderr.strip().splitlines()
    assert result["codes"] == [2] * len(cases), p.stderr
    assert len(errors) == len(cases) and all(e.startswith("cora: error: ") for e in errors), errors
    assert result["ray"] is False  # every refusal came before Ray was imported, let alone started


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
