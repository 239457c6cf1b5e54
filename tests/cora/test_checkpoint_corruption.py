"""Damaged checkpoints (cora/checkpoint.py): any change to any byte of the file either leaves the loaded
model's outputs bit-identical or makes load raise CheckpointError, never another exception, never a
different model.

One small model (CIFAR ResNet-8, converted without tuning) is saved once for the module; each example
writes a damaged copy and loads it. Examples per run (max_examples, hypothesis picks them anew each
run): byte changes 600, splices 300, truncations 200, insertions 300, deletions 200, JSON edits 150,
plus every key and nested key of the metadata changed once and deleted once (test_every_metadata_field_is_covered:
about 680 files). About 15 s together on one CPU thread (up to twice that on a busy machine).
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from cora import CoRaConfig, convert
from cora.checkpoint import CheckpointError, load, save
from cora.experiments.models import cifar_resnet

torch.set_num_threads(1)

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Saved:
    """The saved file, its layout and the reference outputs."""

    def __init__(self, path, workdir):
        self.path, self.workdir = path, workdir
        self.data = path.read_bytes()
        self.header_end = 8 + int.from_bytes(self.data[:8], "little")
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        self.x = x
        with torch.no_grad():
            self.ref = load(path)(x)
        self.n = 0

    def regions(self) -> dict[str, tuple[int, int]]:
        return {"length": (0, 8), "header": (8, self.header_end), "data": (self.header_end, len(self.data))}

    def outcome(self, data: bytes) -> str:
        """Load ``data`` as a checkpoint: "rejected" (CheckpointError) or "same" (bit-identical outputs)."""
        self.n += 1
        path = self.workdir / f"bad{self.n % 2}.safetensors"
        path.write_bytes(data)
        try:
            model = load(path)
        except CheckpointError as exc:
            assert str(exc).strip(), "a CheckpointError must say what is wrong"
            _event("rejected")
            return "rejected"
        with torch.no_grad():
            out = model(self.x)
        assert torch.equal(out, self.ref), "a damaged checkpoint loaded as a different model"
        _event("loaded, outputs identical")
        return "same"


def _event(what: str) -> None:
    if currently_in_test_context():  # statistics (--hypothesis-show-statistics) of the property tests
        event(what)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = cifar_resnet(8).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = convert(m, x, CoRaConfig(method="uniform", rounding="nearest", factorization="weight", calib_images=16,
                                 tune_iterations=0, progress=False))
    q.cora_architecture = {"name": "cifar_resnet8"}
    d = tmp_path_factory.mktemp("corrupt")
    return Saved(save(q, d / "m.safetensors"), d)


# Offsets: pick a region first (the 8-byte length, the JSON header, the tensor data), then a place in it,
# so that the small header regions are hit as often as the large data region.
_REGION = st.sampled_from(["length", "header", "header", "data", "data"])


def _offset(ckpt: Saved, region: str, frac: float, *, end_inclusive: bool = False) -> int:
    lo, hi = ckpt.regions()[region]
    return min(hi - (0 if end_inclusive else 1), lo + int(frac * (hi - lo)))


_FRAC = st.floats(0, 1, exclude_max=True)


@settings(max_examples=600, **_SETTINGS)
@given(region=_REGION, frac=_FRAC, mask=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]) | st.integers(1, 255))
def test_byte_changes(ckpt, region, frac, mask):
    data = bytearray(ckpt.data)
    data[_offset(ckpt, region, frac)] ^= mask
    ckpt.outcome(bytes(data))


@settings(max_examples=300, **_SETTINGS)
@given(src_region=_REGION, src=_FRAC, dst_region=_REGION, dst=_FRAC, length=st.integers(1, 256))
def test_splices(ckpt, src_region, src, dst_region, dst, length):
    """A chunk of the file copied over another place (same length: the file size does not change)."""
    data = bytearray(ckpt.data)
    a, b = _offset(ckpt, src_region, src), _offset(ckpt, dst_region, dst)
    b = b if b != a else (a + length) % len(data)
    chunk = bytes(data[a:a + length])[: len(data) - b]
    data[b:b + len(chunk)] = chunk
    assume(bytes(data) != ckpt.data)  # a chunk copied over an equal one changes nothing: draw again
    ckpt.outcome(bytes(data))


@settings(max_examples=200, **_SETTINGS)
@given(region=_REGION, frac=_FRAC)
def test_truncations(ckpt, region, frac):
    cut = _offset(ckpt, region, frac)
    assert cut < len(ckpt.data)
    assert ckpt.outcome(ckpt.data[:cut]) == "rejected"


@settings(max_examples=300, **_SETTINGS)
@given(region=st.sampled_from(["length", "header", "header", "data", "data", "end"]), frac=_FRAC,
       inserted=st.binary(min_size=1, max_size=16) | st.sampled_from([b" ", b"\n", b"0", b"{}", b'"', b"\x00" * 8]))
def test_insertions(ckpt, region, frac, inserted):
    at = len(ckpt.data) if region == "end" else _offset(ckpt, region, frac, end_inclusive=True)
    ckpt.outcome(ckpt.data[:at] + inserted + ckpt.data[at:])


@settings(max_examples=200, **_SETTINGS)
@given(region=_REGION, frac=_FRAC, length=st.integers(1, 64))
def test_deletions(ckpt, region, frac, length):
    at = _offset(ckpt, region, frac)
    ckpt.outcome(ckpt.data[:at] + ckpt.data[at + length:])


# ------------------------------------------------------------------------------ JSON edits of the header
def _raw(ckpt: Saved):
    from safetensors import safe_open

    with safe_open(str(ckpt.path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _paths(obj, prefix=()):
    """Every key (dicts) and index (lists) inside ``obj``, depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


@pytest.fixture(scope="module")
def header(ckpt):
    meta, tensors = _raw(ckpt)
    targets = []
    for key, value in sorted(meta.items()):
        targets.append((key, ()))
        try:
            decoded = json.loads(value)
        except ValueError:
            continue
        targets.extend((key, p) for p in _paths(decoded))
    return meta, tensors, targets


def _changed(v, delta: int):
    """``v`` changed in kind: a number moved, a bool flipped, a string altered, a container emptied or filled."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + delta
    if isinstance(v, float):
        return v + delta if v + delta != v else -v - 1.0
    if isinstance(v, str):
        return v[:-1] + chr(ord(v[-1]) ^ 1) if v else "x"
    if v is None:
        return 0
    return type(v)() if v else ({"x": 1} if isinstance(v, dict) else [0])


def _edit(meta: dict, key: str, path: tuple, kind: str, delta: int) -> dict:
    meta = dict(meta)
    if not path:
        if kind == "delete":
            del meta[key]
        else:
            meta[key] = _changed(meta[key], delta)
        return meta
    doc = json.loads(meta[key])
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = _changed(parent[path[-1]], delta)
    meta[key] = json.dumps(doc)
    return meta


def _with_metadata(ckpt: Saved, meta: dict) -> bytes:
    """The saved file with ``meta`` as its metadata, laid out as save_file lays it out (the same tensor
    entries and data, the JSON header padded with spaces to a multiple of 8): a well-formed file, built
    in a fraction of save_file's time (test_every_metadata_field_is_covered writes hundreds)."""
    header = json.loads(ckpt.data[8:ckpt.header_end])
    header["__metadata__"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + ckpt.data[ckpt.header_end:]


def _check_edit(ckpt: Saved, header, key, path, kind, delta, *, fast: bool = False) -> None:
    """Write the edited metadata into a well-formed file; load must reject it (or, for an edit that
    changes no stored string, give the same model)."""
    from safetensors.torch import save_file

    meta, tensors, _ = header
    edited = _edit(meta, key, path, kind, delta)
    out = ckpt.workdir / "edited.safetensors"
    if fast:
        out.write_bytes(_with_metadata(ckpt, edited))
    else:
        save_file(tensors, str(out), metadata=edited)  # a well-formed file: only the digest can tell
    if edited == meta:
        assert ckpt.outcome(out.read_bytes()) == "same"
        return
    with pytest.raises(CheckpointError) as err:
        load(out)
    assert str(err.value).strip()


@settings(max_examples=150, **_SETTINGS)
@given(data=st.data(), kind=st.sampled_from(["change", "delete"]), delta=st.integers(1, 1000) | st.integers(-1000, -1))
def test_json_edits(ckpt, header, data, kind, delta):
    key, path = data.draw(st.sampled_from(header[2]), label="field")
    _check_edit(ckpt, header, key, path, kind, delta)


def test_every_metadata_field_is_covered(ckpt, header):
    """Each top-level key and each nested key of the JSON fields, changed and deleted (hundreds of files)."""
    targets = header[2]
    top = {"cora_format", "cora_format_version", "module_format_version", "pack_format_version", "architecture", "layers",
           "state_metadata", "config", "report", "preprocessing", "evaluation",
           "cora_sha256"}
    assert {k for k, p in targets if not p} == top
    assert len(targets) > 300
    # the fast writer makes the files save_file makes: the unedited metadata loads, edits read back
    from safetensors import safe_open

    assert ckpt.outcome(_with_metadata(ckpt, header[0])) == "same"
    key, path = next(t for t in targets if t[0] == "layers" and len(t[1]) == 2)
    edited = _edit(header[0], key, path, "change", 1)
    (ckpt.workdir / "fast.safetensors").write_bytes(_with_metadata(ckpt, edited))
    with safe_open(str(ckpt.workdir / "fast.safetensors"), framework="pt") as f:
        assert f.metadata() == edited and all(torch.equal(f.get_tensor(k), header[1][k]) for k in header[1])
    for key, path in targets:
        for kind in ("change", "delete"):
            _check_edit(ckpt, header, key, path, kind, 1, fast=True)
