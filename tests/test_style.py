"""The code style that setup.cfg sets (flake8 / pycodestyle), checked over the whole checkout."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_flake8_is_clean():
    pytest.importorskip("flake8")
    p = subprocess.run([sys.executable, "-m", "flake8", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
