from __future__ import annotations

import pytest
import torch

from cora.zoo import paths
from cora.zoo.registry import (
    CifarBasicBlock,
    OptionAShortcut,
    build_model,
    cifar_resnet,
    load_cifar_resnet,
    model_input_spec,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("depth", [0, 7, 9, 19, 21, -4, 2, "20", 20.0])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)


@pytest.mark.parametrize("depth,blocks", [(8, 1), (20, 3), (32, 5), (56, 9)])
def test_structure(depth, blocks):
    m = cifar_resnet(depth)
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == blocks
    assert all(isinstance(b, CifarBasicBlock) for b in m.layer2)
    # Shortcuts never carry parameters.
    for stage in (m.layer1, m.layer2, m.layer3):
        for b in stage:
            assert not list(b.shortcut.parameters())
    assert isinstance(m.layer2[0].shortcut, OptionAShortcut)
    assert isinstance(m.layer1[0].shortcut, torch.nn.Identity)


def test_resnet20_params_and_forward():
    m = cifar_resnet(20)
    n = sum(p.numel() for p in m.parameters())
    assert n == 269_722  # the "0.27M" of He et al.
    y = m.eval()(torch.randn(4, 3, 32, 32))
    assert y.shape == (4, 10) and y.dtype == torch.float32


def test_option_a_shortcut():
    x = torch.randn(2, 16, 32, 32)
    y = OptionAShortcut(8)(x)
    assert y.shape == (2, 32, 16, 16)
    # Original channels in the middle, zeros on both sides.
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    blk = CifarBasicBlock(16, 32, stride=2)
    assert blk(x).shape == (2, 32, 16, 16)


@pytest.mark.parametrize("depth", [20, 32])
def test_load_shared_checkpoints(depth):
    m = load_cifar_resnet(depth)
    assert not m.training
    raw = torch.load(paths.find_glob(f"models/resnet{depth}-*.th"), map_location="cpu")["state_dict"]
    sd = m.state_dict()
    for k, v in raw.items():
        assert torch.equal(sd[k.removeprefix("module.")], v)
    assert build_model(f"cifar_resnet{depth}").linear.weight.shape == (10, 64)


def test_wrong_depth_checkpoint(tmp_path):
    path = tmp_path / "r20.th"
    torch.save({"state_dict": {"module." + k: v for k, v in cifar_resnet(20).state_dict().items()}}, path)
    with pytest.raises(ValueError, match="checkpoint has 3 blocks per stage.*cifar_resnet32 expects 5") as e:
        load_cifar_resnet(32, weights=path)
    assert "missing keys" in str(e.value) and "layer1.3.conv1.weight" in str(e.value)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_cifar_resnet(14, weights=path)
    assert load_cifar_resnet(20, weights=path).layer3[2].bn2.weight.shape == (64,)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.th"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_cifar_resnet(20, weights=bad)
    odd = tmp_path / "odd.th"
    torch.save([1, 2, 3], odd)
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_cifar_resnet(20, weights=odd)


def test_missing_checkpoint_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("CORA_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_cifar_resnet(44)
    assert str(tmp_path / "models" / "resnet44-*.th") in str(e.value)
    with pytest.raises(FileNotFoundError, match="CORA_SHARED"):
        load_cifar_resnet(20, weights=tmp_path / "nope.th")


def test_fresh_cifar_model_without_weights():
    m = build_model("cifar_resnet110", weights=False)
    assert len(m.layer3) == 18


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models(name, tmp_path):
    m = build_model(name)
    assert not m.training
    y = m(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1000)
    # A local state-dict file is loaded (no download ever).
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    m2 = build_model(name, weights=path)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_name():
    with pytest.raises(ValueError, match="cifar_resnet20.*resnet18"):
        build_model("resnet20")
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("cifar_resnet21")


def test_input_spec():
    s = model_input_spec("cifar_resnet20")
    assert s["mean"] == (0.485, 0.456, 0.406) and s["std"] == (0.229, 0.224, 0.225)
    assert s["image_size"] == 32 and s["num_classes"] == 10
    t = model_input_spec("resnet50")
    assert t["image_size"] == 224 and t["mean"] == s["mean"] and t["std"] == s["std"]
    with pytest.raises(ValueError):
        model_input_spec("nonsense")


def test_torchvision_model_kwargs():
    m = build_model("googlenet", weights=False, aux_logits=False, init_weights=False)
    assert m.aux1 is None and not m.training
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert build_model("resnet18", num_classes=10).fc.out_features == 10
    with pytest.raises(ValueError, match=r"cannot build resnet18\(bogus=1\).*bogus"):
        build_model("resnet18", bogus=1)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", num_classes="ten")


def test_cifar_model_kwargs():
    assert build_model("cifar_resnet8", weights=False, num_classes=5).linear.out_features == 5
    with pytest.raises(ValueError, match="cifar_resnet20 takes no keyword argument.*aux_logits.*num_classes"):
        build_model("cifar_resnet20", weights=False, aux_logits=False)
    with pytest.raises(ValueError, match=r"does not fit cifar_resnet20\(num_classes=5\).*linear.weight \(10, 64\) vs \(5, 64\)"):
        build_model("cifar_resnet20", num_classes=5)  # the shared 10-class weights


def test_wrong_torchvision_weights_one_line(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(build_model("squeezenet1_0").state_dict(), path)
    with pytest.raises(ValueError) as e:
        build_model("squeezenet1_1", weights=path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 800
    assert msg.startswith(f"{path} does not fit squeezenet1_1: ")
    assert "12 missing keys (features.6.squeeze.weight," in msg and "12 unexpected keys (features.5.squeeze.weight," in msg
    assert "10 shape mismatches" in msg and "features.0.weight (96, 3, 7, 7) vs (64, 3, 3, 3)" in msg
    # the same architecture with other class counts: shapes only
    torch.save(build_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit resnet18: 2 shape mismatches.*fc.weight \(10, 512\) vs \(1000, 512\)"):
        build_model("resnet18", weights=path)
    assert build_model("resnet18", weights=path, num_classes=10).fc.out_features == 10
