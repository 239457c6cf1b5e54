"""Request bodies of ``cora serve``: decoding, validation and preprocessing (no Ray here).

``POST /v1/classify`` takes either one encoded image (``Content-Type: image/png`` or
``image/jpeg``) or ``application/json`` ``{"images": ["<base64 PNG/JPEG>", ...]}`` (1 to
``max_images`` images). Everything here runs per request, before batching, so a bad body fails
only its own request. Every refusal is a :class:`PayloadError` carrying the HTTP status and a
one-line message:

* 415: a missing or other content type;
* 400: an empty body, bad JSON, a JSON value that is not ``{"images": [str, ...]}``, bad base64,
  bytes that are not a PNG/JPEG, a corrupt or truncated PNG/JPEG;
* 413: more than ``max_images`` images, a body over ``max_body_bytes``, an image over
  ``max_pixels`` pixels (checked from the header, before the pixels are decoded).

Defaults (:class:`Limits`): 64 images, 8 MiB of body, 4096 x 4096 pixels.
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import warnings
from dataclasses import dataclass

import torch

__all__ = ["PayloadError", "Limits", "decode_request", "decode_image", "preprocess", "IMAGE_TYPES"]

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}  # content type -> PIL format


class PayloadError(Exception):
    """A request refused before it reached the model: ``status`` (HTTP) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


@dataclass(frozen=True)
class Limits:
    """What one request may hold: images per request, bytes of body, pixels per image (width x height)."""

    max_images: int = 64
    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def _media_type(content_type: str | None) -> str:
    # "image/png; charset=..." -> "image/png"
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_request(body: bytes, content_type: str | None, limits: Limits) -> list[bytes]:
    """The encoded images of one request body (1 to ``limits.max_images`` byte strings).

    Checks the content type, the body size and the JSON structure; the images themselves are
    checked by :func:`decode_image`. Raises :class:`PayloadError`.
    """
    media = _media_type(content_type)
    if media not in IMAGE_TYPES and media != "application/json":
        shown = media or "none"
        raise PayloadError(415, f"unsupported content type {shown!r}: send image/png, image/jpeg or application/json")
    if len(body) > limits.max_body_bytes:
        raise PayloadError(413, f"body of {len(body)} bytes is over the limit of {limits.max_body_bytes} bytes")
    if not body:
        raise PayloadError(400, "empty body")
    if media != "application/json":
        return [body]
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(400, f"body is not valid JSON: {exc}") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise PayloadError(400, 'JSON body must be {"images": ["<base64 PNG or JPEG>", ...]}')
    if not images:
        raise PayloadError(400, '"images" is empty: send at least one image')
    if len(images) > limits.max_images:
        raise PayloadError(413, f"{len(images)} images in one request, over the limit of {limits.max_images}")
    out = []
    for i, text in enumerate(images):
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise PayloadError(400, f"images[{i}] is not valid base64") from None
        if not out[-1]:
            raise PayloadError(400, f"images[{i}] is empty")
    return out


def decode_image(data: bytes, limits: Limits, where: str = "image"):
    """One PNG/JPEG as an RGB ``PIL.Image`` (fully decoded).

    The size is read from the header and checked against ``limits.max_pixels`` before any pixel
    is decoded; PIL's own decompression-bomb check is turned into an error too (never just a
    warning). Raises :class:`PayloadError` (400 not an image / corrupt, 413 too many pixels).
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])  # header only
            w, h = img.size
            if w * h > limits.max_pixels:
                raise PayloadError(413, f"{where} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
            img.load()  # the pixels: a truncated or corrupt file fails here
            return img.convert("RGB")
    except PayloadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadError(413, f"{where} is too large to decode: {exc}") from None
    except Image.UnidentifiedImageError:
        raise PayloadError(400, f"{where} is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's errors for damaged files
        raise PayloadError(400, f"{where} is a corrupt or truncated image: {exc}") from None


def preprocess(img, pre: dict) -> torch.Tensor:
    """An RGB ``PIL.Image`` as the model's input: float32 ``[3, S, S]``, ``S = pre["image_size"]``.

    torchvision's ``Resize(resize_size)`` (the short side, bilinear, antialiased) + ``CenterCrop(image_size)``
    + ``ToTensor`` (scaled to [0, 1]) + ``Normalize(mean, std)``: the transforms the evaluation
    harness applies to image folders, so a served image gets exactly the model's own input.
    """
    return _transform(pre)(img)


@functools.lru_cache(maxsize=8)
def _cached_transform(image_size: int, resize_size: int, mean: tuple, std: tuple):
    from .preprocessing import model_transform

    return model_transform(image_size, resize_size, mean, std)


def _transform(pre: dict):
    return _cached_transform(int(pre["image_size"]), int(pre["resize_size"]), tuple(pre["mean"]), tuple(pre["std"]))
