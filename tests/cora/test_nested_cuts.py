"""Stage values that are not one tensor: a channel split (a tuple), a dict or a list at a cut.

ShuffleNetV2 cuts its graph at ``x.chunk(2, 1)``, so the value a stage passes on is a tuple; the
label-free block reconstruction (the W3 / W2 default) once put such values together with
``torch.cat`` and crashed (issue 22). Every path that keeps or runs stage values now works leaf by
leaf over tuples, lists and dicts (:mod:`cora.graph`), and a cut whose value is not batch-major is
not used.
"""
from __future__ import annotations

import collections

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import cora
from cora.graph import batch_len, cat_values, map_tensors, tensors_of, trace_stages
from cora.reconstruct import _run_all
from tests.helpers import randomise_bn
from tests.tolerances import assert_close_rel


def _halves_dict(x):
    c = x.shape[1] // 2
    return {"left": x[:, :c], "right": x[:, c:]}


def _halves_list(x):
    c = x.shape[1] // 2
    return [x[:, :c], x[:, c:]]


# traced as one call whose value (a dict, a list) is the only one live after it: a cut
torch.fx.wrap("_halves_dict")
torch.fx.wrap("_halves_list")


class SplitBlock(nn.Module):
    """Half the channels pass, the other half go through a conv (ShuffleNetV2's unit, without the shuffle)."""

    def __init__(self, c: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c // 2)

    def forward(self, x):
        if self.kind == "tuple":
            a, b = x.chunk(2, dim=1)
        elif self.kind == "dict":
            parts = _halves_dict(x)
            a, b = parts["left"], parts["right"]
        else:
            parts = _halves_list(x)
            a, b = parts[0], parts[1]
        return torch.cat([a, F.relu(self.bn(self.conv(b)))], 1)


class SplitNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(SplitBlock(8, kind), SplitBlock(8, kind))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _images(n: int, seed: int, size: int = 10) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_leafwise_helpers_keep_the_structure():
    Pair = collections.namedtuple("Pair", "a b")
    g = torch.Generator().manual_seed(0)
    pair = Pair(torch.randn(6, generator=g), None)
    value = (torch.randn(6, 2, generator=g), {"k": [torch.randn(6, 3, generator=g)], "p": pair})
    assert batch_len(value) == 6
    parts = [map_tensors(lambda t: t[i : i + 4], value) for i in range(0, 6, 4)]
    assert batch_len(parts[0]) == 4 and batch_len(parts[1]) == 2
    whole = cat_values(parts)
    assert isinstance(whole, tuple) and isinstance(whole[1]["k"], list) and isinstance(whole[1]["p"], Pair)
    leaves, original = tensors_of(whole), tensors_of(value)
    assert leaves[-1] is None and len(leaves) == len(original) == 4
    assert all(torch.equal(x, y) for x, y in zip(leaves[:3], original[:3]))
    assert torch.equal(cat_values([value[0][:1], value[0][1:]]), value[0])  # a tensor: torch.cat itself


@pytest.mark.parametrize("kind", ["tuple", "dict", "list"])
def test_a_cut_may_carry_a_tuple_dict_or_list(kind):
    torch.manual_seed(0)
    model = randomise_bn(SplitNet(kind), seed=1)
    x = _images(7, 2)
    chain = trace_stages(model, _layers(model), x[:2])
    assert chain is not None
    types = {"tuple": tuple, "dict": dict, "list": list}
    values, v = [], x[:2]
    for k in range(len(chain)):
        v = chain.run(model, k, v)
        values.append(v)
    assert any(isinstance(v, types[kind]) for v in values[:-1])  # the split is a cut: the path under test
    with torch.no_grad():  # the whole chain run 3 images at a time, values put together leaf by leaf
        want = torch.cat([model(x[i : i + 3]) for i in range(0, 7, 3)])  # the same batches: exact
        assert torch.equal(_run_all(chain, model, list(range(len(chain))), x, 3), want)


class Transposed(nn.Module):
    """A value with the batch not first, alone at a cut: it cannot be cut into batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.conv1(x).transpose(0, 1)
        return self.conv2(y.transpose(0, 1).relu())


def test_a_cut_whose_value_is_not_batch_major_is_not_used():
    torch.manual_seed(0)
    model = Transposed().eval()
    chain = trace_stages(model, ["conv1", "conv2"], _images(2, 3))
    v = _images(2, 3)
    for k in range(len(chain) - 1):
        v = chain.run(model, k, v)
        assert all(t.shape[0] == 2 for t in tensors_of(v)), k  # every cut's value is batch-major
    x = _images(5, 4)
    with torch.no_grad():
        want = torch.cat([model(x[i : i + 2]) for i in range(0, 5, 2)])
        assert torch.equal(_run_all(chain, model, list(range(len(chain))), x, 2), want)


@pytest.mark.parametrize("kind", ["tuple", "dict", "list"])
def test_label_free_w3_default_reconstructs_through_a_split(kind, tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(SplitNet(kind), seed=1)
    images = _images(16, 5)
    # the default label-free W3 path (uniform ranks, GPTQ, block reconstruction), steps cut short
    q = cora.convert(model, images, cora.CoRaConfig(bits=3, calib_images=16, tune_iterations=3, progress=False))
    rep = q.cora_report
    assert rep.tune_loss == "blocks" and rep.tune_iterations > 0 and not rep.warnings, (rep.tune_loss, rep.warnings)
    _check_deploy_and_round_trip(q, SplitNet(kind), _images(4, 6), tmp_path)


def _check_deploy_and_round_trip(q: nn.Module, fresh_float: nn.Module, x: torch.Tensor, tmp_path, **save_kw):
    with torch.no_grad():
        want = q(x)
        assert_close_rel(cora.deploy(q)(x), want, torch.float32)
    path = tmp_path / "model.safetensors"
    cora.save(q, path, **save_kw)
    loaded = [cora.load(path, fresh_float)] + ([cora.load(path)] if save_kw.get("architecture") else [])
    for m in loaded:
        with torch.no_grad():
            assert torch.equal(m(x), want)


SHUFFLENET = {"name": "shufflenet_v2_x0_5", "kwargs": {"num_classes": 10}}


@pytest.mark.slow
@pytest.mark.parametrize("bits,labels", [(3, False), (2, False), (4, True)])
def test_shufflenet_v2_defaults(bits, labels, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.shufflenet_v2_x0_5(num_classes=10), seed=1)
    images = _images(8, 7, size=32)
    calib = (images, torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(8))) if labels else images
    cfg = cora.CoRaConfig(bits=bits, calib_images=8, tune_iterations=2, progress=False)
    if labels:
        cfg = cfg.replace(iterations=2)
    q = cora.convert(model, calib, cfg)
    rep = q.cora_report
    assert rep.tune_loss == ("ce" if labels else "blocks"), rep.tune_loss
    _check_deploy_and_round_trip(q, torchvision.models.shufflenet_v2_x0_5(num_classes=10), _images(2, 9, size=32),
                                 tmp_path, architecture=SHUFFLENET)
