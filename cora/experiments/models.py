"""Moved to :mod:`cora.zoo.registry` (core, not harness); this name is the same module, kept for old imports."""
import sys

from cora.zoo import registry as _moved

sys.modules[__name__] = _moved
