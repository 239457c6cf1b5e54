"""Calibration data: the images, their labels, the float model's logits, and the losses defined on them.

:class:`CalibrationSet` gathers whatever the caller passed (a DataLoader, an iterable of batches,
tensors) into one float32 image tensor and optional int64 labels. :class:`Objective` is the task
loss the rank search and the adapter tuning both minimise: cross-entropy to the labels, or KL to the
float model's logits. Whether labels are *required* is decided once, by
:meth:`cora.CoRaConfig.resolved`; an :class:`Objective` only checks that what it needs is there.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LOSSES

__all__ = ["CalibrationSet", "Objective", "materialize", "model_logits"]


def materialize(calib, limit: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather up to ``limit`` calibration samples into tensors ``(x [N, ...] float32, y [N] int64 or None)``.

    ``calib`` may be a DataLoader/iterable of ``(x, y)`` pairs or of bare ``x`` batches, a
    ``(x, y)`` tuple of tensors, or one tensor ``x``. Labels are kept only if every batch has them.
    """
    if isinstance(calib, torch.Tensor):
        batches: Iterable = [calib]
    elif isinstance(calib, (tuple, list)) and len(calib) == 2 and all(isinstance(t, torch.Tensor) for t in calib):
        batches = [tuple(calib)]
    else:
        batches = calib
    xs, ys, have_labels, count = [], [], True, 0
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(
            f"calibration data must be a DataLoader, an iterable of batches or tensors, got {type(calib).__name__}"
        ) from None
    for batch in iterator:
        if isinstance(batch, (tuple, list)):
            if not batch:
                continue
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        elif isinstance(batch, dict):
            x, y = batch.get("x", batch.get("image")), batch.get("y", batch.get("label"))
        else:
            x, y = batch, None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration batch holds {type(x).__name__}, expected a tensor")
        if x.dim() < 2 or x.shape[0] == 0:
            continue
        xs.append(x.detach())
        if y is None or not isinstance(y, torch.Tensor):
            have_labels = False
        else:
            ys.append(y.detach().reshape(-1))
        count += x.shape[0]
        if count >= limit:
            break
    if not xs:
        raise ValueError("the calibration set is empty")
    x = torch.cat(xs)[:limit].float()
    if not torch.isfinite(x).all():
        raise ValueError("calibration inputs contain NaN or Inf")
    y = torch.cat(ys)[:limit].long() if have_labels and ys else None
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"calibration labels ({y.shape[0]}) and inputs ({x.shape[0]}) differ in number")
    return x, y


@dataclass
class CalibrationSet:
    """The calibration images ``[N, ...]`` float32 and labels ``[N]`` int64 (or None), on one device."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    @classmethod
    def gather(cls, calib, limit: int, device: torch.device | str = "cpu") -> "CalibrationSet":
        """The first ``limit`` samples of ``calib`` (see :func:`materialize`), moved to ``device``."""
        x, y = materialize(calib, limit)
        return cls(x.to(device), y.to(device) if y is not None else None)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def statistics_subset(self, n: int, seed: int) -> torch.Tensor:
        """A seeded random subset of at most ``n`` images for layer statistics (never the first ``n``,
        which may be sorted by class)."""
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.images[pick.to(self.images.device)]


@torch.no_grad()
def model_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """The model's outputs on ``inputs`` in eval mode (float32 ``[N, classes]``); the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(inputs[i : i + batch_size]).float() for i in range(0, inputs.shape[0], batch_size)])
    finally:
        model.train(was_training)


class Objective:
    """The task loss on a batch of calibration images: ``objective(outputs, idx)`` -> scalar tensor.

    ``kind="ce"``: cross-entropy of ``outputs`` (logits ``[B, classes]``) to ``labels[idx]``
    (int64 ``[N]``); ``kind="kl"``: ``KL(softmax(teacher_logits[idx]) || softmax(outputs))``, batch mean,
    with ``teacher_logits`` the float model's eval-mode logits ``[N, classes]``. ``idx`` indexes the
    calibration images the batch was drawn from. Outputs are taken in float32.
    """

    def __init__(self, kind: str, *, labels: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None) -> None:
        if kind not in LOSSES:
            raise ValueError(f"loss {kind!r}; choose one of {LOSSES}")
        if kind == "ce" and labels is None:
            raise ValueError("the cross-entropy loss needs labelled calibration data; pass (images, labels) or use 'kl'")
        if kind == "kl" and teacher_logits is None:
            raise ValueError("the KL loss needs the float model's logits on the calibration images")
        self.kind, self.labels, self.teacher_logits = kind, labels, teacher_logits

    def __call__(self, outputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = outputs.float()
        if self.kind == "ce":
            return F.cross_entropy(out, self.labels[idx])
        teacher = self.teacher_logits[idx].float()
        return F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")

    def __repr__(self) -> str:
        return f"Objective({self.kind!r})"
