"""Small helpers for walking and editing module trees."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["set_submodule"]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root`` by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
