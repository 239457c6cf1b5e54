"""How an encoded RGB image becomes a model's input: the one image transform.

A preprocessing record (``{"image_size", "resize_size", "mean", "std", "class_names"}``, what
:func:`cora.zoo.preprocessing_for` gives and a checkpoint stores) says which transform a model
needs; :func:`model_transform` builds it. Image folders (:mod:`cora.experiments.data`) and
``cora serve`` (:mod:`cora.payloads`) both use it, so training-side evaluation and serving see the
same pixels. torchvision is imported on first use.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["model_transform"]


def model_transform(image_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float]):
    """PIL RGB image -> float32 ``[3, image_size, image_size]``: the short side resized to
    ``resize_size`` (bilinear, antialiased), centre-cropped, scaled to [0, 1], normalised."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
