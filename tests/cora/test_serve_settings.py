"""cora.serve_settings (the typed settings record, no Ray) and the replica's health check (no server)."""
import argparse

import pytest
import torch

from cora.payloads import Limits
from cora.serve_settings import ModelSource, ServeSettings, ServeSettingsError, ray_environment

CIFAR_PRE = {"image_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
             "class_names": [f"c{i}" for i in range(10)]}
SRC = ModelSource(checkpoint="/x/r20.safetensors")


def _settings(**kw) -> ServeSettings:
    return ServeSettings(source=SRC, preprocessing=CIFAR_PRE, **kw)


def test_defaults_are_valid_and_frozen():
    s = _settings()
    assert not s.autoscaling and s.most_replicas == 1 and s.max_ongoing >= s.max_batch
    with pytest.raises(AttributeError):
        s.port = 1


@pytest.mark.parametrize("kw, words", [
    ({"top_k": 11}, "--top-k"),
    ({"max_batch": 0}, "max_batch"),
    ({"max_ongoing": 8, "max_batch": 16}, "--max-ongoing"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda", "gpus_per_replica": 0.0}, "--gpus-per-replica"),
    ({"gpus_per_replica": 1.0}, "--gpus-per-replica"),
    ({"min_replicas": 1, "max_replicas": 2}, "together"),
    ({"min_replicas": 3, "max_replicas": 2, "target_ongoing": 2.0}, "min <= max"),
    ({"min_replicas": 1, "max_replicas": 2, "target_ongoing": 1000.0}, "--target-ongoing"),
    ({"metrics_port": 8000, "port": 8000}, "--metrics-port"),
    ({"limits": Limits(max_pixels=10**9, max_request_pixels=10**9)}, "decompression-bomb"),
    ({"proxy_location": "Disabled"}, "proxy location"),
])
def test_invalid_settings_are_refused_with_one_line(kw, words):
    with pytest.raises(ServeSettingsError) as info:
        _settings(**kw)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_model_source_needs_exactly_one_model():
    with pytest.raises(ServeSettingsError):
        ModelSource()
    with pytest.raises(ServeSettingsError):
        ModelSource(checkpoint="a", float_model="b")
    with pytest.raises(ServeSettingsError):
        ModelSource(checkpoint="a", weights="w")
    assert ModelSource(float_model="cifar_resnet20").describe() == "float cifar_resnet20"


def test_autoscaling_reserves_for_the_most_replicas():
    s = _settings(min_replicas=1, max_replicas=3, target_ongoing=4.0)
    assert s.autoscaling and s.most_replicas == 3


def test_ray_environment_loopback_and_usage_stats():
    assert ray_environment(_settings()) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    assert ray_environment(_settings(address="127.0.0.1:6379")) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert ray_environment(_settings(address="10.0.0.5:6379")) == {}


def test_deployment_options_map_the_settings():
    pytest.importorskip("ray.serve")
    from cora.serve import deployment_options

    fixed = deployment_options(_settings(replicas=3, max_ongoing=40, max_queued=7, num_cpus=2.0))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 40 and fixed["max_queued_requests"] == 7
    assert fixed["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    auto = deployment_options(_settings(min_replicas=1, max_replicas=4, target_ongoing=3.0))
    assert "num_replicas" not in auto
    cfg = auto["autoscaling_config"]
    assert (cfg["min_replicas"], cfg["max_replicas"], cfg["target_ongoing_requests"]) == (1, 4, 3.0)


def test_check_health_fails_after_the_model_fails_in_a_row():
    pytest.importorskip("ray.serve")
    from cora.serve import BROKEN_AFTER, CoraServer

    class Engine:
        fail = True

        def predict(self, images, top_k):
            if self.fail:
                raise RuntimeError("device lost")
            return [[(0, 1.0)]] * len(images)

    # cora's replica class (under Serve's ingress wrapper), without loading a model
    cls = next(c for c in CoraServer.func_or_class.__mro__ if "check_health" in c.__dict__)
    replica = object.__new__(cls)
    replica.engine, replica.settings, replica.failed_in_a_row = Engine(), _settings(), 0
    x = torch.rand(2, 3, 32, 32)
    for _ in range(BROKEN_AFTER - 1):
        with pytest.raises(RuntimeError):
            replica._predict(x)
        replica.check_health()  # not yet broken: one bad batch must not cost the replica
    replica.engine.fail = False
    replica._predict(x)  # a success resets the count
    replica.engine.fail = True
    for _ in range(BROKEN_AFTER):
        with pytest.raises(RuntimeError):
            replica._predict(x)
    with pytest.raises(RuntimeError, match="in a row"):
        replica.check_health()


def test_cli_arguments_become_settings(tmp_path):
    from cora.cli import build_parser, resolve_device
    from cora.serve_settings import settings_from_args
    from tests.cora.serve_helpers import free_port, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "r20.safetensors")
    port, mport = free_port(), free_port()
    args = build_parser().parse_args(["serve", str(ckpt), "--device", "cpu", "--port", str(port), "--metrics-port",
                                      str(mport), "--max-batch", "8", "--min-replicas", "1", "--max-replicas", "2",
                                      "--target-ongoing", "4"])
    args.replicas = 1
    s = settings_from_args(args, resolve_device)
    assert isinstance(args, argparse.Namespace) and s.source.checkpoint == str(ckpt.resolve())
    assert s.max_ongoing == 16 and s.autoscaling and s.device == "cpu" and s.dtype == "float32"
    assert s.limits.max_pixels == 512 * 512 and s.limits.max_request_pixels == 16 * 512 * 512  # sized for 32 x 32
    assert s.preprocessing["image_size"] == 32
