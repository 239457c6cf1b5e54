"""Shared pytest setup.

* Without a CUDA device, Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must be
  set before any kernel module imports Triton, so it is set here, at collection time.  With a GPU the
  environment is left alone.
* Hypothesis profiles: ``ci`` (selected when the ``CI`` environment variable is set, as ``.ci/run``
  does) is derandomized, so a CI run draws the same examples every time, and prints the blob that
  reproduces a failure; ``dev`` (local runs) draws new examples each run and prints the seed of a
  failing run (``pytest -p hypothesis --hypothesis-seed=<seed>`` repeats it).
* The shared folder (data and pretrained weights, ``../shared``): a test that fails because the
  folder is absent is reported as skipped, with the reason, on a local checkout; in CI its absence is
  a failure (a CI that silently skipped every real-model test would prove nothing).
"""
import os
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


settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if in_ci() else "dev")


def shared_folder_missing() -> bool:
    """Whether the shared folder this run would read (``CORA_SHARED``, else ``../shared``) is absent."""
    from cora.zoo.paths import resolve_shared

    return not resolve_shared().is_dir()


def pytest_report_header(config):
    profile = "ci (derandomized)" if in_ci() else "dev (random)"
    return f"hypothesis profile: {profile}; shared folder missing: {shared_folder_missing()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A ``FileNotFoundError`` from the shared-folder lookup while that folder is absent: a skip with the
    reason on a local checkout, a failure that says so in CI."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.excinfo is None or not call.excinfo.errisinstance(FileNotFoundError):
        return
    if "shared folder" not in str(call.excinfo.value) or not shared_folder_missing():
        return
    reason = f"needs the shared folder (data / pretrained weights), which is absent: {call.excinfo.value}"
    if in_ci():
        report.sections.append(("shared folder", "CI must have the shared folder; " + reason))
        return
    report.outcome = "skipped"
    report.longrepr = (str(item.path), item.location[1] or 0, "Skipped: " + reason.splitlines()[0])
