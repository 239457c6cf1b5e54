"""Label-free block reconstruction of the adapters (cora.reconstruct)."""
from __future__ import annotations

import copy
import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import cora
from cora.config import BLOCKS_LR
from cora.graph import trace_stages
from cora.layout import preferred_layout
from cora.reconstruct import adapter_blocks, reconstruct_blocks
from tests.helpers import randomise_bn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.blocks = nn.Sequential(Block(12), Block(12))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


@functools.lru_cache(maxsize=1)
def _converted_once():
    torch.manual_seed(0)
    model = randomise_bn(Net(), seed=1)
    images = torch.randn(32, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    # fast settings: the reconstruction, not the base, is under test
    q = cora.convert(model, images, cora.CoRaConfig(bits=2, method="uniform", budget=0.2, calib_images=32, rounding="nearest",
                                                    sequential=False, refine=False, progress=False))
    return model, q, images


def _converted():
    model, q, images = _converted_once()
    return model, copy.deepcopy(q), images


def test_blocks_group_a_layer_with_the_stages_after_it():
    model, q, images = _converted()
    chain = trace_stages(model, list(q.cora_report.quantized), images[:2])
    adapted = {n for n, r in q.cora_report.ranks.items() if r > 0}
    blocks = adapter_blocks(chain, adapted)
    assert sorted(n for _, names in blocks for n in names) == sorted(adapted)
    assert [k for stages, _ in blocks for k in stages] == list(range(len(chain)))  # every stage once, in order
    first_block = dict((n, i) for i, (_, names) in enumerate(blocks) for n in names)
    assert first_block["blocks.0.conv1"] == first_block["blocks.0.conv2"]  # one residual block
    stem_stages = blocks[first_block["stem"]][0]
    assert len(stem_stages) > 1  # the stem conv takes its BatchNorm and ReLU along
    assert first_block["head"] == len(blocks) - 1  # the linear head has an adapter too: the last block


def test_reconstruction_reduces_the_block_error_and_moves_only_adapters():
    model, q, images = _converted()
    chain = trace_stages(model, list(q.cora_report.quantized), images[:2])
    before = copy.deepcopy(q)
    rep = reconstruct_blocks(q, model, chain, images, iterations=60, lr=3e-3, batch_size=16)
    assert rep.blocks == 4 and rep.iterations == 240  # stem, two residual blocks, the linear head
    assert rep.last_loss < rep.first_loss
    # 256 fresh images: with 16 the gain (~2 % of a ~1 % error) was within the sampling noise
    x = torch.randn(256, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
        err_before = (before(x) - ref).norm() / ref.norm()
        err_after = (q(x) - ref).norm() / ref.norm()
    assert err_after < err_before  # fresh images: the model as a whole got closer to the float one
    sd_before, sd_after = before.state_dict(), q.state_dict()
    tensors = [k for k, v in sd_before.items() if isinstance(v, torch.Tensor)]
    changed = {k for k in tensors if not torch.equal(sd_before[k], sd_after[k])}
    assert changed and all(".adapter_" in k for k in changed), changed
    assert {"head.adapter_a", "head.adapter_b"} <= changed  # the linear adapter was fitted as well
    for name, r in before.cora_report.ranks.items():
        assert q.get_submodule(name).rank == r


def test_a_block_that_does_not_improve_keeps_its_adapters():
    model, q, images = _converted()
    chain = trace_stages(model, list(q.cora_report.quantized), images[:2])
    before = copy.deepcopy(q)
    rep = reconstruct_blocks(q, model, chain, images, iterations=5, lr=10.0, batch_size=16)  # a wild step size
    assert rep.last_loss <= rep.first_loss
    sd_before, sd_after = before.state_dict(), q.state_dict()
    kept = [k for k, v in sd_before.items() if ".adapter_" in k and isinstance(v, torch.Tensor) and torch.equal(v, sd_after[k])]
    assert kept  # at least one block rejected its diverged fit


def test_norms_fit_batchnorm_scale_and_shift_with_the_adapters():
    model, q, images = _converted()
    chain = trace_stages(model, list(q.cora_report.quantized), images[:2])
    before, float_before = copy.deepcopy(q), copy.deepcopy(model)
    rep = reconstruct_blocks(q, model, chain, images, iterations=60, lr=3e-3, batch_size=16, norms=True)
    assert rep.last_loss < rep.first_loss and rep.norms > 0
    sd_before, sd_after = before.state_dict(), q.state_dict()
    changed = {k for k, v in sd_before.items() if isinstance(v, torch.Tensor) and not torch.equal(v, sd_after[k])}
    assert any(k.endswith("bn1.weight") for k in changed) and any(k.endswith("bn1.bias") for k in changed)
    assert any(".adapter_" in k for k in changed)
    # the running statistics, the codes and the float model are not touched
    assert not any(k.endswith(("running_mean", "running_var")) or ".codes" in k for k in changed), changed
    assert _same_tensors(model, float_before)


def test_norms_alone_reconstruct_a_model_without_adapters():
    model, _, images = _converted_once()
    cfg = _fast(method="none", tune_loss="blocks", tune_iterations=40, tune_lr=3e-3)
    q = cora.convert(model, images, cfg)
    plain = cora.convert(model, images, cfg.replace(tune_iterations=0))
    assert q.cora_report.tune_loss == "blocks" and not any(q.cora_report.ranks.values())
    assert 0 < q.cora_report.tune_norms <= 5  # the report says how many of the 5 BatchNorms were kept fitted
    assert plain.cora_report.tune_loss is None and plain.cora_report.tune_norms == 0
    x = torch.randn(256, 3, 10, 10, generator=torch.Generator().manual_seed(6))  # fresh images
    with torch.no_grad():
        ref = model(x)
        err_plain = (plain(x) - ref).norm() / ref.norm()
        err_tuned = (q(x) - ref).norm() / ref.norm()
    assert err_tuned < err_plain
    off = cora.convert(model, images, cfg.replace(tune_norms=False))  # nothing to fit: norms off, no adapters
    assert off.cora_report.tune_loss is None
    assert _same_tensors(off, plain)


def test_in_place_conversion_reconstructs_against_the_float_model_too(monkeypatch):
    monkeypatch.setattr(sys.modules["cora.convert"], "BLOCKS_ITERATIONS", 10)
    model, _, images = _converted_once()
    labels = torch.randint(0, 5, (images.shape[0],), generator=torch.Generator().manual_seed(3))
    for loss, calib in (("blocks", images), ("blocks+ce", (images, labels))):
        cfg = _fast(tune_loss=loss, tune_iterations=10, tune_lr=3e-3)
        copied = cora.convert(model, calib, cfg)
        in_place = cora.convert(copy.deepcopy(model), calib, cfg, inplace=True)
        assert copied.cora_report.tune_loss == loss and _same_tensors(copied, in_place), loss


def test_blocks_then_ce_without_adapters_reports_the_blocks_phase(monkeypatch):
    monkeypatch.setattr(sys.modules["cora.convert"], "BLOCKS_ITERATIONS", 10)
    model, _, images = _converted_once()
    labels = torch.randint(0, 5, (images.shape[0],), generator=torch.Generator().manual_seed(3))
    rep = cora.convert(model, (images, labels), _fast(method="none", tune_loss="blocks+ce")).cora_report
    # the stem and the two residual blocks hold BatchNorms; the head has neither a BatchNorm nor an adapter
    assert rep.tune_loss == "blocks" and rep.tune_iterations == 10 * 3 and not any(rep.ranks.values())


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k, v in sa.items() if isinstance(v, torch.Tensor)]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in keys)


def _fast(**kw) -> cora.CoRaConfig:
    settings = dict(bits=2, method="uniform", budget=0.2, calib_images=32, rounding="nearest", sequential=False,
                    refine=False, progress=False)
    return cora.CoRaConfig(**{**settings, **kw})


def test_convert_runs_it_as_the_tuning_phase():
    model, _, images = _converted_once()
    rep = cora.convert(model, images, _fast(tune_loss="blocks", tune_iterations=4)).cora_report
    assert rep.tune_loss == "blocks" and rep.tune_iterations == 4 * 4  # four blocks hold adapters (one the linear head)
    assert not rep.warnings


def test_blocks_then_cross_entropy_runs_both_phases(monkeypatch):
    monkeypatch.setattr(sys.modules["cora.convert"], "BLOCKS_ITERATIONS", 20)  # the blocks phase's own steps, cut short
    model, _, images = _converted_once()
    labels = torch.randint(0, 5, (images.shape[0],), generator=torch.Generator().manual_seed(3))
    q = cora.convert(model, (images, labels), _fast(tune_loss="blocks+ce", tune_iterations=3))
    rep = q.cora_report
    # the stem, two residual blocks and the head: 4 blocks of 20 steps, then 3 ce steps
    assert rep.tune_loss == "blocks+ce" and rep.tune_iterations == 4 * 20 + 3, rep.tune_iterations
    blocks_only = cora.convert(model, (images, labels), _fast(tune_loss="blocks", tune_iterations=20, tune_lr=BLOCKS_LR))
    assert not _same_tensors(q, blocks_only)  # the cross-entropy steps moved the adapters further


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > -1e9:  # control flow on a value: torch.fx cannot trace it
            y = F.relu(y)
        return self.head(y.mean((2, 3)))


def test_untraceable_model_falls_back_to_end_to_end_kl_with_a_warning():
    torch.manual_seed(0)
    images = torch.randn(32, 3, 8, 8)
    rep = cora.convert(Untraceable().eval(), images, _fast(tune_loss="blocks", tune_iterations=3)).cora_report
    assert rep.tune_loss == "kl" and rep.tune_iterations == 3
    assert any("block reconstruction needs a model torch.fx can trace" in w for w in rep.warnings), rep.warnings


class ViewHead(nn.Module):
    """Flattens a 4x4 feature map with ``view``, which a channels-last tensor refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        return self.head(y.view(y.shape[0], -1))


def test_preferred_layout_is_channels_last_only_where_the_model_computes_the_same():
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert preferred_layout(Net().eval(), images) == torch.channels_last
    assert preferred_layout(ViewHead().eval(), images) == torch.contiguous_format  # view() raises on it
    assert preferred_layout(nn.Flatten().eval(), images) == torch.channels_last  # a logical reshape is fine
    assert preferred_layout(Net().eval(), torch.randn(4, 3, 8)) == torch.contiguous_format  # not a 4-D batch


def test_a_model_that_needs_the_contiguous_layout_is_still_reconstructed():
    torch.manual_seed(0)
    model = randomise_bn(ViewHead(), seed=1).eval()
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    rep = cora.convert(model, images, _fast(tune_loss="blocks", tune_iterations=3)).cora_report
    assert rep.tune_loss == "blocks" and rep.tune_iterations > 0, rep.warnings
