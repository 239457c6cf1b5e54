"""Small helpers for walking and editing module trees."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn

__all__ = ["module_modes", "kept_modes"]


def module_modes(model: nn.Module) -> dict[str, bool]:
    """The ``training`` flag of every submodule, by name (``""`` is the model itself)."""
    return {name: m.training for name, m in model.named_modules()}


@contextlib.contextmanager
def kept_modes(*models: nn.Module, train: bool | None = None) -> Iterator[None]:
    """Set every module of ``models`` to ``train`` (False: eval, True: train, None: leave) inside the
    block, and give every module back its own ``training`` flag afterwards.

    ``model.train(flag)`` alone would set all submodules to the top-level flag when restoring, and a
    BatchNorm the caller froze with ``.eval()`` inside a model in train mode would come back training.
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        if train is not None:
            for model in models:
                model.train(train)
        yield
    finally:
        for m, flag in saved:
            m.training = flag
