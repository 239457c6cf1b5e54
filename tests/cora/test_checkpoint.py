"""Saved CoRa models: safetensors + metadata round trips and rejection of bad files (cora/checkpoint.py)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cora import CoRaConfig, CoRaConv2d, QuantLinear, convert
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
    assert meta["cora_format_version"] == "2"
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


def _reference_digest(meta: dict, tensors: dict) -> str:
    """The version-2 digest written out from its documented definition (cora/checkpoint.py docstring),
    independently of the code, so that a change of the format cannot go unnoticed."""
    h = hashlib.sha256(b"cora-checkpoint-digest/2\n")

    def field(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    keys = sorted(k for k in meta if k != "cora_sha256")
    field(str(len(keys)).encode())
    for k in keys:
        field(k.encode())
        field(meta[k].encode())
    field(str(len(tensors)).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        field(name.encode())
        field(str(t.dtype).replace("torch.", "").encode())
        field(json.dumps(list(t.shape)).encode())
        field(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_raw(src):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite_meta(src, dst, *, sign=False, drop=(), **changes):
    """Copy ``src`` to ``dst`` with metadata ``changes`` (and keys in ``drop`` removed), as a well-formed
    safetensors file; ``sign``: recompute the digest, as a file written by another cora would have."""
    from safetensors.torch import save_file

    meta, tensors = _read_raw(src)
    meta.update(changes)
    for k in drop:
        meta.pop(k, None)
    if sign:
        meta["cora_sha256"] = _reference_digest(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_digest_is_the_documented_canonical_serialisation(saved):
    meta, tensors = _read_raw(saved)
    assert meta["cora_sha256"] == _reference_digest(meta, tensors)
    assert "tensor_sha256" not in meta  # a version-2 file cannot pass for a version-1 one


def test_edited_stride_in_header_raises(saved, tmp_path):
    """The user's report: one changed character in a layer's stride loaded silently as another model."""
    meta, _ = _read_raw(saved)
    layers = json.loads(meta["layers"])
    name = next(n for n, s in layers.items() if s["type"] == "CoRaConv2d" and s["stride"] == [1, 1])
    layers[name]["stride"] = [2, 2]
    bad = _rewrite_meta(saved, tmp_path / "stride.safetensors", layers=json.dumps(layers))
    with pytest.raises(CheckpointError, match="digest"):
        load(bad)
    with pytest.raises(CheckpointError, match="digest"):
        read_metadata(bad)
    # a byte flip in place, the file otherwise untouched
    data = bytearray(saved.read_bytes())
    needle = b'\\"stride\\": [1, 1]'
    pos = data.index(needle) + len(needle) - 2
    data[pos] ^= 0x03  # '1' -> '2'
    flipped = tmp_path / "flip.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        load(flipped)


def test_wrong_format_version_raises(saved, tmp_path):
    bad = _rewrite_meta(saved, tmp_path / "v.safetensors", sign=True, cora_format_version="3")
    with pytest.raises(CheckpointError, match="version '3' is not supported"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "p.safetensors", sign=True, pack_format_version="7")
    with pytest.raises(CheckpointError, match="packed-weight format 7"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "f.safetensors", cora_format="something-else")
    with pytest.raises(CheckpointError, match="not a CoRa"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "j.safetensors", sign=True, layers="{not json")
    with pytest.raises(CheckpointError, match="'layers' is not valid JSON"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "s.safetensors", sign=True, drop=("state_metadata",))
    with pytest.raises(CheckpointError, match="'state_metadata' is missing"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "d.safetensors", drop=("cora_sha256",))
    with pytest.raises(CheckpointError, match="no cora_sha256 digest"):
        load(bad)
    # the same edits without a new digest are damage
    bad = _rewrite_meta(saved, tmp_path / "u.safetensors", pack_format_version="7")
    with pytest.raises(CheckpointError, match="digest"):
        load(bad)
    # a rewrite that keeps everything valid still loads (the rewriting itself is sound)
    ok = _rewrite_meta(saved, tmp_path / "ok.safetensors")
    load(ok)
    ok = _rewrite_meta(saved, tmp_path / "ok2.safetensors", sign=True)
    load(ok)


def test_bad_layer_descriptions_raise_checkpoint_error(saved, tmp_path):
    """Even with a valid digest (a hand-made file), a description save would not write is a CheckpointError."""
    meta, _ = _read_raw(saved)
    layers = json.loads(meta["layers"])
    edits = {
        "adapter_dtype": "float64", "bits": True, "stride": [1], "padding": "full", "in_channels": -3,
        "groups": 5, "type": "Conv9d", "rank": 10**6,
    }
    name = "conv1"
    for key, value in edits.items():
        spec = dict(layers[name], **{key: value})
        bad = _rewrite_meta(saved, tmp_path / f"{key}.safetensors", sign=True, layers=json.dumps({**layers, name: spec}))
        with pytest.raises(CheckpointError, match="conv1"):
            load(bad)
    for value in ([], "x", {"conv1": 3}):
        bad = _rewrite_meta(saved, tmp_path / "l.safetensors", sign=True, layers=json.dumps(value))
        with pytest.raises(CheckpointError):
            load(bad)
    for key, value in (("report", {"ranks": {}}), ("report", [1]), ("architecture", {"nom": "x"}), ("state_metadata", [])):
        bad = _rewrite_meta(saved, tmp_path / "r.safetensors", sign=True, **{key: json.dumps(value)})
        with pytest.raises(CheckpointError, match="report|architecture|state_metadata"):
            load(bad)


def _v1_file(src, dst):
    """A version-1 checkpoint as the old cora wrote it: digest of the tensors only, no state metadata."""
    from safetensors.torch import save_file

    meta, tensors = _read_raw(src)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    del meta["cora_sha256"], meta["state_metadata"]
    meta.update(cora_format_version="1", tensor_sha256=h.hexdigest())
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_version_1_files_still_load_with_a_warning(qmodel, saved, tmp_path):
    old = _v1_file(saved, tmp_path / "v1.safetensors")
    with pytest.warns(UserWarning, match="version-1"):
        m = load(old)
    with torch.no_grad():
        assert torch.equal(m(_x()), qmodel(_x()))
    with pytest.warns(UserWarning):
        assert read_metadata(old)["state_metadata"] is None
    data = bytearray(old.read_bytes())
    data[-3] ^= 0x10
    bad = tmp_path / "v1bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        load(bad)
    # a version-2 file relabelled as version 1 has no version-1 digest
    relabelled = _rewrite_meta(saved, tmp_path / "relabel.safetensors", cora_format_version="1")
    with pytest.raises(CheckpointError, match="tensor_sha256"):
        load(relabelled)


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
    with pytest.raises(CheckpointError, match="digest"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "b.safetensors", sign=True, architecture=json.dumps({"name": "cifar_resnet20"}))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load(bad)
    bad = _rewrite_meta(saved, tmp_path / "c.safetensors", sign=True, architecture=json.dumps({"name": "no_such_net"}))
    with pytest.raises(CheckpointError, match="cannot rebuild"):
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


# ------------------------------------------------------------------------------ transactional load
def _fingerprint(model: nn.Module):
    """What must not change when a load fails: every module's name, type and id, every state entry."""
    modules = [(n, type(m), id(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    return modules, state, ids


def _assert_unchanged(model: nn.Module, before) -> None:
    modules, state, ids = _fingerprint(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    for k, v in state.items():
        assert v.dtype == before[1][k].dtype and torch.equal(v, before[1][k]), k
    assert ids == before[2]


def _distinct_skeleton(**kw) -> nn.Module:
    """A float skeleton whose every tensor differs from the checkpoint's, so a partial load would show."""
    m = cifar_resnet(8, **kw)
    with torch.no_grad():
        for name, t in m.state_dict(keep_vars=True).items():
            t.fill_(7 if t.dtype == torch.long else 0.25)
    return m


@pytest.mark.parametrize("make", [lambda: _distinct_skeleton(num_classes=100), lambda: cifar_resnet(14)],
                         ids=["100-classes", "deeper"])
def test_failed_load_into_wrong_model_changes_nothing(saved, make):
    model = make()
    before = _fingerprint(model)
    with pytest.raises(CheckpointError, match="does not match the model") as err:
        load(saved, model)
    _assert_unchanged(model, before)
    assert not hasattr(model, "cora_report")
    if model.linear.out_features == 100:
        assert "layer 'linear' model vs checkpoint: out_features 100 vs 10" in str(err.value)


def test_load_rolls_back_when_load_state_dict_fails(saved):
    """A failure inside load_state_dict (after the layers were swapped and most tensors copied, here a
    post-hook that also edits the tree) leaves the model exactly as it was."""
    model = _distinct_skeleton()
    old_bn1 = model.bn1

    def hook(module, incompatible):
        module.bn1 = nn.Identity()
        module.surprise = 1
        raise ValueError("version 3 is not supported")

    model.register_load_state_dict_post_hook(hook)
    before = _fingerprint(model)
    with pytest.raises(CheckpointError, match="version 3 is not supported.*unchanged"):
        load(saved, model)
    _assert_unchanged(model, before)
    assert model.bn1 is old_bn1 and not hasattr(model, "surprise")
    assert type(model.conv1) is nn.Conv2d and type(model.linear) is nn.Linear


def test_geometry_and_dtype_mismatch_raise_before_any_change(saved):
    model = _distinct_skeleton()
    model.layer2[0].conv1.stride = (1, 1)
    model.linear = nn.Linear(64, 10, bias=False)
    model.bn1 = nn.BatchNorm2d(32)
    before = _fingerprint(model)
    with pytest.raises(CheckpointError) as err:
        load(saved, model)
    msg = str(err.value)
    assert "'layer2.0.conv1'" in msg and "stride (1, 1) vs (2, 2)" in msg and "'linear'" in msg and "bias False vs True" in msg
    assert "bn1.weight: float32 [16] vs float32 [32]" in msg
    _assert_unchanged(model, before)
    model = cifar_resnet(8).double()  # load_state_dict would cast the float64 checkpoint silently
    with pytest.raises(CheckpointError, match="bn1.weight: float32 \\[16\\] vs float64 \\[16\\]"):
        load(saved, model)
    model = cifar_resnet(8)
    model.layer1 = nn.Sequential(nn.Identity())
    with pytest.raises(CheckpointError, match="'layer1.0.conv1' of the checkpoint does not exist"):
        load(saved, model)


def test_load_into_converted_model_and_bad_map_location(qmodel, saved):
    import copy

    m = load(saved, copy.deepcopy(qmodel))
    with torch.no_grad():
        assert torch.equal(m(_x()), qmodel(_x()))
    with pytest.raises(ValueError, match="map_location"):
        load(saved, map_location="not-a-device")


def _hand_made(model: nn.Module, names: list[str]) -> nn.Module:
    """Quantize some layers directly (much faster than convert, same checkpoint contents)."""
    torch.manual_seed(3)
    for n in names:
        layer = model.get_submodule(n)
        new = CoRaConv2d.from_conv(layer, bits=4, rank=2 if layer.groups == 1 else 0) if isinstance(layer, nn.Conv2d) \
            else QuantLinear.from_linear(layer, bits=8)
        model.set_submodule(n, new)
    return model.eval()


def test_mnasnet_keeps_state_dict_versions(tmp_path):
    """torchvision's MNASNet refuses a state dict without its version metadata (state_dict._metadata)."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    q = _hand_made(tvm.mnasnet0_5(weights=None), ["layers.0", "layers.3", "classifier.1"])
    q.cora_architecture = {"name": "mnasnet0_5"}
    path = save(q, tmp_path / "mnas.safetensors")
    assert read_metadata(path)["state_metadata"][""] == {"version": 2}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = q(x)
        assert torch.equal(load(path)(x), ref)
        assert torch.equal(load(path, tvm.mnasnet0_5(weights=None))(x), ref)


@pytest.mark.slow
def test_mnasnet_converted_round_trip(tmp_path):
    """The user's reproduction, through cora.convert (about 20 s on one CPU thread)."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    q = convert(tvm.mnasnet0_5(weights=None), torch.randn(8, 3, 64, 64),
                CoRaConfig(method="uniform", rounding="nearest", factorization="weight", sequential=False, refine=False,
                           tune_iterations=0, calib_images=8, stats_images=8, progress=False))
    q.cora_architecture = {"name": "mnasnet0_5"}
    path = save(q, tmp_path / "mnas.safetensors")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = q.eval()(x)  # load returns the model in eval mode; the float model was built in train mode
        assert torch.equal(load(path)(x), ref)
        assert torch.equal(load(path, tvm.mnasnet0_5(weights=None))(x), ref)


# ------------------------------------------------------------------------------ save refuses
def _refused(tmp_path, model, match, **kw):
    path = tmp_path / "refused" / "r.safetensors"
    with pytest.raises(ValueError, match=match):
        save(model, path, **kw)
    assert not (tmp_path / "refused").exists()  # nothing written, no folder made


def test_save_refuses_changed_dtypes(qmodel, tmp_path):
    import copy

    _refused(tmp_path, copy.deepcopy(qmodel).double(), "adapters are torch.float64.*before .double")
    q = copy.deepcopy(qmodel).half()
    _refused(tmp_path, q, "conv1.*bias is float16 \\[16\\]|bias is float16.*stores float32")
    q = copy.deepcopy(qmodel)
    q.linear.scale = q.linear.scale.double()
    _refused(tmp_path, q, "'linear': scale is float64 \\[10\\] but QuantLinear stores float16 \\[10\\]")


def test_save_refuses_deployed_model(qmodel, tmp_path):
    from cora.deploy import deploy

    hint = "save the converted model before deploying: cora.save(converted); cora.deploy(cora.load(path))"
    _refused(tmp_path, deploy(qmodel), re.escape(hint))


def test_save_refuses_reports_load_cannot_rebuild(qmodel, tmp_path):
    import copy
    import dataclasses

    from cora.convert import ConversionReport

    @dataclasses.dataclass
    class Extended(ConversionReport):
        extra: int = 0

    q = copy.deepcopy(qmodel)
    q.cora_report = Extended(**qmodel.cora_report.to_dict(), extra=1)
    _refused(tmp_path, q, "does not know: \\['extra'\\]")
    q.cora_report = qmodel.cora_report.to_dict()
    _refused(tmp_path, q, "is a dict, not a cora ConversionReport")
    q.cora_report = dataclasses.replace(qmodel.cora_report, trace=[torch.ones(1)])
    _refused(tmp_path, q, "cannot be written as JSON")


def test_save_refuses_non_tensor_state_and_odd_structures(qmodel, tmp_path):
    import copy

    class WithExtra(nn.Identity):
        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    q = copy.deepcopy(qmodel)
    q.extra = WithExtra()
    _refused(tmp_path, q, "not tensors \\(extra._extra_state\\)")
    q = copy.deepcopy(qmodel)
    q.again = q.conv1
    _refused(tmp_path, q, "shared under several names \\(conv1, again\\)")
    _refused(tmp_path, copy.deepcopy(qmodel.conv1), "the model itself is a CoRa layer")
    q = copy.deepcopy(qmodel)
    q.cora_architecture = {"name": "cifar_resnet20"}  # a name that does not rebuild this model
    rebuilt = re.escape("could not rebuild this model from architecture={'name': 'cifar_resnet20'}")
    _refused(tmp_path, q, rebuilt + ".*does not match")
    _refused(tmp_path, qmodel, "architecture must be None", architecture={"model": "cifar_resnet8"})


def test_report_written_by_save_always_loads(qmodel, tmp_path):
    m = load(save(qmodel, tmp_path / "r.safetensors"))
    assert m.cora_report == qmodel.cora_report


def test_save_leaves_the_global_rng_alone(qmodel, tmp_path):
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    save(qmodel, tmp_path / "rng.safetensors")  # builds a skeleton to check the architecture
    assert torch.equal(torch.rand(3), a)


# ------------------------------------------------------------------------------ atomic write
def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def test_user_tmp_file_survives_and_no_temporaries_are_left(qmodel, tmp_path):
    target = tmp_path / "m.safetensors"
    mine = tmp_path / "m.safetensors.tmp"
    mine.write_text("the user's own file")
    save(qmodel, target)
    save(qmodel, target)  # overwrite
    assert mine.read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.tmp"]


def test_failed_write_leaves_no_temporary_and_keeps_the_old_file(qmodel, tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "m.safetensors"
    save(qmodel, target)
    good = target.read_bytes()

    written = []

    def broken(tensors, filename, metadata=None):
        written.append(Path(filename))
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save(qmodel, target)
    with pytest.raises(OSError, match="disk full"):
        save(qmodel, tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert target.read_bytes() == good
    # a unique hidden temporary beside the target
    assert written[0].parent == tmp_path and written[0].name.startswith(".m.safetensors.") and written[0].suffix == ".tmp"
    assert written[1].name.startswith(".new.safetensors.") and written[0] != written[1]


def test_file_mode_is_what_open_would_give(qmodel, tmp_path):
    old = os.umask(0o027)
    try:
        path = save(qmodel, tmp_path / "m.safetensors")
        with open(tmp_path / "plain", "w"):
            pass
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640
        os.chmod(path, 0o604)  # overwriting keeps an existing file's mode, as open(path, "w") would
        save(qmodel, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o604
    finally:
        os.umask(old)
    assert _umask() == old


def test_save_checks_the_path_first(qmodel, tmp_path):
    with pytest.raises(ValueError, match="existing folder"):
        save(qmodel, tmp_path)
    with pytest.raises(ValueError, match="empty"):
        save(qmodel, "")
    assert list(tmp_path.iterdir()) == []


def test_load_of_a_folder_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load(tmp_path)


def test_odd_digest_values_raise_checkpoint_error(saved, tmp_path):
    """Whatever the digest field holds (here non-ASCII text, empty), the answer is a CheckpointError."""
    for value in ("é" * 64, "", "0" * 64):
        bad = _rewrite_meta(saved, tmp_path / "odd.safetensors", cora_sha256=value)
        with pytest.raises(CheckpointError, match="digest"):
            load(bad)


# --------------------------------------------------------------------------- preprocessing record
def test_preprocessing_recorded_from_the_architecture_and_restored(saved):
    from cora.experiments.models import CIFAR10_CLASSES, preprocessing_for

    meta = read_metadata(saved)
    assert meta["preprocessing"] == preprocessing_for("cifar_resnet8")
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["class_names"] == list(CIFAR10_CLASSES)
    assert load(saved).cora_preprocessing == meta["preprocessing"]


def test_preprocessing_given_or_from_the_model_and_validated(qmodel, tmp_path):
    import copy

    custom = {"image_size": 30, "resize_size": 36, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0],
              "class_names": [f"c{i}" for i in range(10)]}
    assert read_metadata(save(qmodel, tmp_path / "a.safetensors", preprocessing=custom))["preprocessing"] == custom
    m = copy.copy(qmodel)  # shares the layers; only the attribute differs
    m.cora_preprocessing = dict(custom, image_size=28)
    assert read_metadata(save(m, tmp_path / "b.safetensors"))["preprocessing"]["image_size"] == 28
    for bad, match in [(dict(custom, std=[1.0, 0.0, 1.0]), "std must be positive"),
                       (dict(custom, mean=[0.5, 0.5]), "mean must be 3"),
                       (dict(custom, resize_size=20), "resize_size"),
                       ({k: v for k, v in custom.items() if k != "class_names"}, "exactly the fields"),
                       (dict(custom, class_names=[]), "class_names"),
                       (dict(custom, image_size=True), "image_size")]:
        with pytest.raises(ValueError, match=match):
            save(qmodel, tmp_path / "bad.safetensors", preprocessing=bad)
    assert not (tmp_path / "bad.safetensors").exists()


def test_preprocessing_edits_are_refused_and_old_files_read_as_null(saved, tmp_path):
    meta, _ = _read_raw(saved)
    pre = json.loads(meta["preprocessing"])
    edited = _rewrite_meta(saved, tmp_path / "e.safetensors", preprocessing=json.dumps(dict(pre, image_size=64)))
    with pytest.raises(CheckpointError, match="digest"):
        load(edited)
    bad = _rewrite_meta(saved, tmp_path / "b.safetensors", sign=True, preprocessing=json.dumps(dict(pre, std=[0, 1, 1])))
    with pytest.raises(CheckpointError, match="preprocessing std must be positive"):
        load(bad)
    old = _rewrite_meta(saved, tmp_path / "o.safetensors", sign=True, drop=("preprocessing",))
    assert read_metadata(old)["preprocessing"] is None and load(old).cora_preprocessing is None


@pytest.mark.parametrize("adapter_dtype, tune", [("float16", 0), ("int8", 3)])
def test_w2_round_trip_and_deploy(tmp_path, adapter_dtype, tune):
    """2-bit weights (16 codes per int32 word) through convert, save, load and deploy; int8 adapters
    (with their scales, after tuning) too, counted at 8 bits plus their fp32 scales."""
    from cora.deploy import deploy
    from tests.tolerances import assert_close_rel

    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    q = convert(cifar_resnet(8).eval(), x, CoRaConfig(bits=2, method="uniform", rounding="nearest", factorization="weight",
                                                      calib_images=16, tune_iterations=tune, tune_loss="kl", progress=False,
                                                      adapter_dtype=adapter_dtype))
    assert q.conv1.bits == 2 and q.cora_report.bits == 2 and 2 < q.cora_report.equiv_bits < 4
    convs = [m for m in q.modules() if isinstance(m, CoRaConv2d) and m.rank]
    assert convs and all(m.adapter_int8 == (adapter_dtype == "int8") for m in convs)
    assert q.linear.rank > 0 and q.linear.adapter_int8 == (adapter_dtype == "int8")  # deploy keeps it as it is
    wide = 16 if adapter_dtype == "float16" else 8
    adapter_bits = sum(wide * m.adapter_params + (32 * (m.rank + m.out_channels) if wide == 8 else 0) for m in convs)
    assert adapter_bits == sum(m.adapter_bits() for m in convs)
    q.cora_architecture = {"name": "cifar_resnet8"}
    path = save(q, tmp_path / "w2.safetensors")
    assert {s["adapter_dtype"] for s in read_metadata(path)["layers"].values() if s["type"] == "CoRaConv2d"} == {adapter_dtype}
    back = load(path)
    for k, v in q.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert back.state_dict()[k].dtype == v.dtype and torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        want = q(_x())
        assert torch.equal(back(_x()), want)
        assert_close_rel(deploy(back)(_x()), want, torch.float32)


def test_linear_adapters_round_trip_and_files_from_before_them(qmodel, saved, tmp_path):
    """A QuantLinear's description records its rank and adapter dtype; its adapter and the report's
    budget_share come back exactly. A file from before linear adapters (no rank in the description, no
    adapter tensors, no budget_share in the report) still loads, as rank 0."""
    assert qmodel.linear.rank > 0 and "linear" in qmodel.cora_report.budget_share
    spec = read_metadata(saved)["layers"]["linear"]
    assert spec["rank"] == qmodel.linear.rank and spec["adapter_dtype"] == "float16"
    back = load(saved)
    assert back.linear.rank == qmodel.linear.rank
    for k in ("linear.adapter_a", "linear.adapter_b"):
        assert torch.equal(back.state_dict()[k], qmodel.state_dict()[k]), k
    assert back.cora_report.budget_share == qmodel.cora_report.budget_share
    with torch.no_grad():
        assert torch.equal(back(_x()), qmodel(_x()))
    # an old file: the same model with an adapter-free linear, its description and report as written then
    import copy

    old = copy.deepcopy(qmodel)
    old.linear.set_adapter(torch.zeros(0, 64), torch.zeros(10, 0))
    path = save(old, tmp_path / "rank0.safetensors")
    meta, tensors = _read_raw(path)
    assert not any(k.startswith("linear.adapter") for k in tensors)
    layers = json.loads(meta["layers"])
    layers["linear"] = {k: v for k, v in layers["linear"].items() if k not in ("rank", "adapter_dtype")}
    report = {k: v for k, v in json.loads(meta["report"]).items() if k != "budget_share"}
    legacy = _rewrite_meta(path, tmp_path / "legacy.safetensors", sign=True, layers=json.dumps(layers),
                           report=json.dumps(report))
    got = load(legacy)
    assert isinstance(got.linear, QuantLinear) and got.linear.rank == 0 and got.cora_report.budget_share == {}
    with torch.no_grad():
        assert torch.equal(got(_x()), old(_x()))
    # a bad rank, or half of the new fields: refused
    for bad in (dict(layers["linear"], rank=-1, adapter_dtype="float16"), dict(layers["linear"], adapter_dtype="float16")):
        bad_file = _rewrite_meta(path, tmp_path / "bad.safetensors", sign=True, layers=json.dumps(dict(layers, linear=bad)))
        with pytest.raises(CheckpointError, match="'linear'"):
            load(bad_file)
