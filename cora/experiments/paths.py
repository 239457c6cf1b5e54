"""Moved to :mod:`cora.zoo.paths` (core, not harness); this name is the same module, kept for old imports."""
import sys

from cora.zoo import paths as _moved

sys.modules[__name__] = _moved
