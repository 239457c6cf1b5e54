"""Moved to :mod:`cora.zoo.cifar_resnet` (core, not harness); this name is the same module, kept for old imports."""
import sys

from cora.zoo import cifar_resnet as _moved

sys.modules[__name__] = _moved
