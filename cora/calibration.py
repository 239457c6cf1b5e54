"""Calibration data: the images, their labels, the float model's logits, and the losses defined on them.

:class:`CalibrationSet` gathers whatever the caller passed (a DataLoader, an iterable of batches,
tensors) into one float32 image tensor and optional int64 labels, checking them on the way. Labels
are integer class indices, one per image; exactly one-hot rows ``[N, classes]`` (0/1, one 1 per
row, any dtype) are converted to indices, anything else is refused with a message. Their range is
checked against the model's number of outputs by :meth:`CalibrationSet.check_labels`.
:class:`Objective` is the task loss the rank search and the adapter tuning both minimise:
cross-entropy to the labels, or KL to the float model's logits. Whether labels are *required* is
decided once, by :meth:`cora.CoRaConfig.resolved`; an :class:`Objective` only checks that what it
needs is there. :func:`select_output` picks the logits out of a model that returns a tuple or dict.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._modules_util import kept_modes
from .config import LOSSES

__all__ = ["CalibrationSet", "Objective", "materialize", "model_logits", "select_output"]


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
        if x.dim() < 2:
            raise ValueError(
                f"calibration images must have a batch dimension ([N, C, H, W] for a conv net), got shape {list(x.shape)}"
            )
        if x.shape[0] == 0:
            continue
        xs.append(x.detach())
        if y is None or not isinstance(y, torch.Tensor):
            have_labels = False
        else:
            ys.append(_class_indices(y.detach(), x.shape[0], len(xs) - 1))
        count += x.shape[0]
        if count >= limit:
            break
    if not xs:
        raise ValueError("the calibration set is empty")
    x = torch.cat(xs)[:limit].float()
    if not torch.isfinite(x).all():
        raise ValueError("calibration inputs contain NaN or Inf")
    y = torch.cat(ys)[:limit] if have_labels and ys else None
    return x, y


def _class_indices(y: torch.Tensor, n_images: int, batch: int) -> torch.Tensor:
    """Labels of one batch as int64 class indices ``[n_images]``; one-hot rows are converted, anything
    else that is not one integer class index per image is refused with a message."""
    where = f"calibration labels (batch {batch})"
    if y.dim() == 2 and y.shape[0] == n_images and y.shape[1] > 1:
        one_hot = bool(((y == 0) | (y == 1)).all()) and bool((y.sum(dim=1) == 1).all())
        if not one_hot:
            raise ValueError(f"{where}: shape {list(y.shape)} is neither class indices [N] nor one-hot rows [N, classes]")
        return y.argmax(dim=1)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise ValueError(f"{where}: expected class indices of shape [N], got shape {list(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"{where}: expected integer class indices, got {y.dtype} (cast whole-number labels with .long())"
        )
    if y.shape[0] != n_images:
        raise ValueError(f"{where}: {y.shape[0]} labels for {n_images} images; give exactly one label per image")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{where}: class indices must be >= 0, found {int(y.min())}")
    return y.long()


def select_output(out, output=None) -> torch.Tensor:
    """The logits in what a model returned: ``out`` itself when ``output`` is None (it must then be a
    tensor), else ``out[output]`` (an index into a tuple or list, or a key of a dict)."""
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        kind = type(out).__name__
        size = f" of {len(out)}" if isinstance(out, (tuple, list, dict)) else ""
        keys = f" (keys {sorted(map(str, out))})" if isinstance(out, dict) else ""
        raise ValueError(
            f"the model returns a {kind}{size}{keys}, not a tensor of logits; choose the logits with "
            f"CoRaConfig(output=...) (an index or a key)"
        )
    try:
        picked = out[output]
    except (IndexError, KeyError, TypeError):
        raise ValueError(f"output={output!r} does not select anything in the model's {type(out).__name__}") from None
    if not isinstance(picked, torch.Tensor):
        raise ValueError(f"output={output!r} selects a {type(picked).__name__}, not a tensor of logits")
    return picked


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

    def check_labels(self, num_classes: int) -> None:
        """Raise ``ValueError`` when a label is not a class index of a model with ``num_classes`` outputs."""
        if self.labels is not None and self.labels.numel() and int(self.labels.max()) >= num_classes:
            raise ValueError(
                f"calibration labels go up to {int(self.labels.max())} but the model has {num_classes} outputs "
                f"(class indices must be in [0, {num_classes - 1}])"
            )

    def statistics_subset(self, n: int, seed: int) -> torch.Tensor:
        """A seeded random subset of at most ``n`` images for layer statistics (never the first ``n``,
        which may be sorted by class)."""
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.images[pick.to(self.images.device)]


@torch.no_grad()
def model_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 250, output=None) -> torch.Tensor:
    """The model's outputs on ``inputs`` in eval mode (float32 ``[N, classes]``); every module's mode is
    restored. ``output`` picks the logits from a model that returns a tuple or dict (:func:`select_output`)."""
    with kept_modes(model, train=False):
        return torch.cat([
            select_output(model(inputs[i : i + batch_size]), output).float() for i in range(0, inputs.shape[0], batch_size)
        ])


class Objective:
    """The task loss on a batch of calibration images: ``objective(outputs, idx)`` -> scalar tensor.

    ``kind="ce"``: cross-entropy of ``outputs`` (logits ``[B, classes]``) to ``labels[idx]``
    (int64 ``[N]``); ``kind="kl"``: ``KL(softmax(teacher_logits[idx]) || softmax(outputs))``, batch mean,
    with ``teacher_logits`` the float model's eval-mode logits ``[N, classes]``. ``idx`` indexes the
    calibration images the batch was drawn from. Outputs are taken in float32; ``output`` picks the
    logits from a model that returns a tuple or dict (:func:`select_output`).
    """

    def __init__(
        self, kind: str, *, labels: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None, output=None
    ) -> None:
        if kind not in LOSSES:
            raise ValueError(f"loss {kind!r}; choose one of {LOSSES}")
        if kind == "ce" and labels is None:
            raise ValueError("the cross-entropy loss needs labelled calibration data; pass (images, labels) or use 'kl'")
        if kind == "kl" and teacher_logits is None:
            raise ValueError("the KL loss needs the float model's logits on the calibration images")
        self.kind, self.labels, self.teacher_logits, self.output = kind, labels, teacher_logits, output

    def __call__(self, outputs, idx: torch.Tensor) -> torch.Tensor:
        out = select_output(outputs, self.output).float()
        if self.kind == "ce":
            return F.cross_entropy(out, self.labels[idx])
        teacher = self.teacher_logits[idx].float()
        return F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")

    def __repr__(self) -> str:
        return f"Objective({self.kind!r})"
