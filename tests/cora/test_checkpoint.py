"""Saved CoRa models: safetensors + metadata round trips and rejection of bad files (cora/checkpoint.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from cora import CoRaConfig, CoRaConv2d, convert
from cora.checkpoint import CheckpointError, load, read_metadata, save
from cora.experiments.models import build_model, cifar_resnet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    m = cifar_resnet(8).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 32, 32, generator=g)
    # nearest rounding + weight SVD: the fastest conversion that still gives adapters
    q = convert(m, x, CoRaConfig(method="uniform", rounding="nearest", factorization="weight", calib_images=32,
                                 tune_iterations=3, tune_loss="kl", progress=False))
    q.cora_architecture = {"name": "cifar_resnet8"}
    return q


@pytest.fixture(scope="module")
def saved(qmodel, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save(qmodel, path)
    return path


def _x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_recorded_config_rebuilds_and_reruns(qmodel, saved):
    """The config a checkpoint records (resolved, versioned) rebuilds with CoRaConfig.from_dict and
    converts to the same model again."""
    meta = read_metadata(saved)
    config = CoRaConfig.from_dict(meta["config"])
    assert config.to_dict() == meta["config"] == load(saved).cora_report.config
    assert config.method == "uniform" and config.tune.loss == "kl"
    torch.manual_seed(0)
    m = cifar_resnet(8).eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    again = convert(m, x, config)
    for k, v in qmodel.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(again.state_dict()[k], v), k


def test_build_model_supports_name():
    m = build_model("cifar_resnet8", weights=False)
    assert isinstance(m, nn.Module)


def test_round_trip_by_name_bit_identical(qmodel, saved):
    assert saved.is_file() and not saved.with_name(saved.name + ".tmp").exists()
    m = load(saved)
    assert not m.training
    x = _x()
    with torch.no_grad():
        assert torch.equal(m(x), qmodel(x))
    for k, v in qmodel.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(m.state_dict()[k], v), k
    assert m.cora_report.ranks == qmodel.cora_report.ranks
    assert m.cora_report.adapter_fraction == qmodel.cora_report.adapter_fraction
    assert m.cora_architecture == {"name": "cifar_resnet8"}
    for n, mod in qmodel.named_modules():
        if isinstance(mod, CoRaConv2d):
            assert m.get_submodule(n).rank == mod.rank and m.get_submodule(n).bits == mod.bits


def test_round_trip_with_caller_model(qmodel, tmp_path):
    path = save(qmodel, tmp_path / "sub" / "m.safetensors", architecture=None)
    meta = read_metadata(path)
    assert meta["cora_format"] == "cora-checkpoint"
    assert meta["architecture"] == {"name": "cifar_resnet8"}  # from model.cora_architecture
    skeleton = cifar_resnet(8)  # random float weights: all must be overwritten
    m = load(path, skeleton)
    x = _x()
    with torch.no_grad():
        assert torch.equal(m(x), qmodel(x))


def test_no_architecture_needs_model(qmodel, tmp_path):
    import copy

    q = copy.deepcopy(qmodel)
    del q.cora_architecture
    path = save(q, tmp_path / "noarch.safetensors")
    with pytest.raises(CheckpointError, match="architecture"):
        load(path)
    m = load(path, cifar_resnet(8))
    with torch.no_grad():
        assert torch.equal(m(_x()), qmodel(_x()))


def test_metadata_contents(saved, qmodel):
    meta = read_metadata(saved)
    assert meta["cora_format_version"] == "1"
    assert isinstance(meta["layers"], dict) and "conv1" in meta["layers"]
    assert meta["layers"]["conv1"]["type"] == "CoRaConv2d"
    assert meta["report"]["ranks"] == qmodel.cora_report.ranks
    assert meta["config"]["method"] == "uniform"


def test_truncated_file_raises(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 20):
        bad = tmp_path / f"trunc{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load(bad)


def test_flipped_tensor_bytes_raise_digest_mismatch(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len
    assert len(data) > start + 100
    for pos in (start + 3, (start + len(data)) // 2, len(data) - 1):
        bad_data = bytearray(data)
        bad_data[pos] ^= 0x5A
        bad = tmp_path / f"flip{pos}.safetensors"
        bad.write_bytes(bytes(bad_data))
        with pytest.raises(CheckpointError, match="digest"):
            load(bad)


def _rewrite_meta(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_wrong_format_version_raises(saved, tmp_path):
    bad = _rewrite_meta(saved, tmp_path / "v.safetensors", cora_format_version="2")
    with pytest.raises(CheckpointError, match="version"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "p.safetensors", pack_format_version="7")
    with pytest.raises(CheckpointError, match="format"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "f.safetensors", cora_format="something-else")
    with pytest.raises(CheckpointError, match="not a CoRa"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "j.safetensors", layers="{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load(bad)
    # a rewrite that keeps everything valid still loads (the rewriting itself is sound)
    ok = _rewrite_meta(saved, tmp_path / "ok.safetensors")
    load(ok)


def test_pickle_file_raises(qmodel, tmp_path):
    path = tmp_path / "pickle.safetensors"
    torch.save(qmodel.state_dict(), path)
    with pytest.raises(CheckpointError):
        load(path)
    path2 = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(3)}, path2)
    with pytest.raises(CheckpointError):
        read_metadata(path2)


def test_plain_safetensors_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a CoRa"):
        load(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.safetensors")


def test_mismatched_architecture_raises(saved, tmp_path):
    with pytest.raises(CheckpointError):
        load(saved, cifar_resnet(14))  # more blocks: extra float layers are missing from the file
    bad = _rewrite_meta(saved, tmp_path / "a.safetensors", architecture=json.dumps({"name": "cifar_resnet20"}))
    with pytest.raises(CheckpointError):
        load(bad)
    with pytest.raises(CheckpointError):
        load(saved, nn.Sequential(nn.Conv2d(3, 16, 3)))


def test_save_unconverted_model_raises(tmp_path):
    with pytest.raises(ValueError, match="convert"):
        save(cifar_resnet(8), tmp_path / "x.safetensors")


def test_cifar_resnet20_pretrained_round_trip(tmp_path):
    """A checkpoint of the pretrained model with BN num_batches_tracked (0-dim tensors) saves and loads."""
    from cora.experiments.models import load_cifar_resnet

    m = load_cifar_resnet(20)
    assert any(v.dim() == 0 for v in m.state_dict().values())
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = convert(m, x, CoRaConfig(method="none", rounding="nearest", range_method="minmax", calib_images=16, progress=False))
    q.cora_architecture = {"name": "cifar_resnet20"}
    path = save(q, tmp_path / "r20.safetensors")
    back = load(path)
    with torch.no_grad():
        assert torch.equal(back(x[:4]), q(x[:4]))


def test_mobilenet_round_trip_grouped_and_linear_bits(tmp_path):
    """Grouped (depthwise) convs without adapters, a 3-bit linear, torchvision names rebuilt."""
    torch.manual_seed(0)
    m = build_model("mobilenet_v2")
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    cfg = CoRaConfig(bits=3, method="uniform", range_method="minmax", rounding="nearest", factorization="weight",
                     calib_images=4, tune_iterations=0, progress=False, layer_bits=(("classifier.*", 8),))
    q = convert(m, x, cfg)
    q.cora_architecture = {"name": "mobilenet_v2"}
    path = save(q, tmp_path / "mnv2.safetensors")
    back = load(path)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert back.get_submodule("classifier.1").bits == 8
    assert back.get_submodule("features.1.conv.0.0").groups == 32
