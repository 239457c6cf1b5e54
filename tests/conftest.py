"""Shared pytest setup.

* Without a CUDA device, Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must be
  set before any kernel module imports Triton, so it is set here, at collection time.  With a GPU the
  environment is left alone.
* Hypothesis: one seed per session, in the header and beside every failing test
  (``--hypothesis-seed=<seed>`` repeats the run). In CI (the ``CI`` environment variable set, as
  ``.ci/run`` does) the seed is fixed (1) and the ``ci`` profile keeps no example database, so every CI
  run draws the same examples; local runs (profile ``dev``) draw a new seed each time. Both print
  the blob that reproduces a failing example.
* The shared folder (data and pretrained weights, ``../shared``): a test that fails because the
  folder is absent is reported as skipped, with the reason, on a local checkout; in CI its absence is
  a failure (a CI that silently skipped every real-model test would prove nothing).
"""
import functools
import os
import random
import sys

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# make ``import tests.tolerances`` work however pytest was started
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def in_ci() -> bool:
    """Whether this run is CI's: ``CI`` set to anything but empty / ``0`` / ``false``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


settings.register_profile("ci", print_blob=True, database=None)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if in_ci() else "dev")
CI_SEED = 1  # not 0: hypothesis reads a falsy seed option as "none given"


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own pytest_configure reads --hypothesis-seed
def pytest_configure(config):
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = CI_SEED if in_ci() else random.randrange(1, 2**32)


@functools.lru_cache(maxsize=1)
def shared_folder_missing() -> bool:
    """Whether the shared folder this run reads (``CORA_SHARED``, else ``../shared``) is absent; decided once,
    at the start, so a test that points ``CORA_SHARED`` elsewhere cannot turn its own failure into a skip."""
    from cora.zoo.paths import resolve_shared

    return not resolve_shared().is_dir()


def pytest_report_header(config):
    profile = "ci (fixed seed)" if in_ci() else "dev (random seed)"
    seed = config.getoption("hypothesis_seed", None)
    return (f"hypothesis profile {profile}, seed {seed} (repeat: --hypothesis-seed={seed}); "
            f"shared folder missing: {shared_folder_missing()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A ``FileNotFoundError`` from the shared-folder lookup while that folder is absent: a skip with the
    reason on a local checkout, a failure that says so in CI."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        seed = item.config.getoption("hypothesis_seed", None)
        report.sections.append(("hypothesis seed", f"this session's seed: {seed}; repeat with --hypothesis-seed={seed}"))
    if not report.failed or call.excinfo is None or not call.excinfo.errisinstance(FileNotFoundError):
        return
    if "shared folder" not in str(call.excinfo.value) or not shared_folder_missing():
        return
    from cora.zoo.paths import resolve_shared

    first = str(call.excinfo.value).splitlines()[0].removesuffix("; looked in:")
    reason = f"needs the shared folder (data / pretrained weights), absent at {resolve_shared()}: {first}"
    if in_ci():
        report.sections.append(("shared folder", "CI must have the shared folder; " + reason))
        return
    report.outcome = "skipped"
    report.longrepr = (str(item.path), item.location[1] or 0, "Skipped: " + reason)


@pytest.fixture(autouse=True)
def _private_eval_cache(tmp_path_factory, monkeypatch):
    """`cora quantize` caches baseline accuracies; tests keep theirs in a temporary folder, never in ~/.cache."""
    if "CORA_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("CORA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cora-cache"))
