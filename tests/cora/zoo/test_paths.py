from __future__ import annotations

from pathlib import Path

import pytest

from cora.zoo import paths


def test_default_resolution_finds_shared_data():
    root = paths.resolve_shared()
    assert (root / "data" / "cifar10_test.npz").is_file()
    assert paths.find_file("data/cifar10_test.npz").is_file()


def test_explicit_root_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "elsewhere"))
    assert paths.resolve_shared(tmp_path) == tmp_path
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.npz").write_bytes(b"")
    assert paths.find_file("data/x.npz", root=tmp_path) == tmp_path / "data" / "x.npz"


def test_env_override(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    f = tmp_path / "models" / "resnet20-00000000.th"
    f.write_bytes(b"")
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    assert paths.resolve_shared() == tmp_path
    assert paths.find_glob("models/resnet20-*.th") == f
    assert paths.find_file("models/resnet20-00000000.th") == f


def test_existing_path_taken_as_is(tmp_path, monkeypatch):
    f = tmp_path / "weights.th"
    f.write_bytes(b"")
    assert paths.find_file(f) == f
    monkeypatch.chdir(tmp_path)
    assert paths.find_file("weights.th") == Path("weights.th")


def test_missing_file_message_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        paths.find_file("data/nope.npz")
    msg = str(e.value)
    assert str(tmp_path / "data" / "nope.npz") in msg
    assert "CORA_SHARED" in msg and "--shared" in msg
    # a folder the user named is authoritative: no silent fallback to the default one
    assert str(paths._REPO_ROOT.parent / "shared" / "data" / "nope.npz") not in msg


def test_env_var_is_not_replaced_by_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        paths.find_file("data/cifar10_test.npz")


def test_default_locations_listed_without_env(monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        paths.find_file("data/nope.npz")
    assert str(paths._REPO_ROOT.parent / "shared" / "data" / "nope.npz") in str(e.value)


def test_missing_glob_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet44-"):
        paths.find_glob("models/resnet44-*.th", root=tmp_path)


def test_old_harness_names_are_the_core_modules():
    """``cora.experiments.models`` / ``.cifar_resnet`` / ``.paths`` (before the registry became core) are the
    very modules of :mod:`cora.zoo`, so old imports and monkeypatches reach the code that runs."""
    import cora.experiments.cifar_resnet
    import cora.experiments.models
    import cora.experiments.paths
    import cora.zoo.cifar_resnet
    import cora.zoo.registry

    assert cora.experiments.models is cora.zoo.registry
    assert cora.experiments.cifar_resnet is cora.zoo.cifar_resnet
    assert cora.experiments.paths is paths
