"""Moved to :mod:`cora.zoo.paths` (core, not harness); this name is the same module, kept for old imports."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("cora.zoo.paths")
