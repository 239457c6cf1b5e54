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
  ``max_pixels`` pixels, or images whose pixels add up to more than ``max_request_pixels`` (all
  read from the PNG / JPEG headers by this module, before PIL decodes a pixel).

The per-request pixel bound caps the decode work one request can cause (images x pixels), whatever
its image count. :func:`limits_for` sizes the defaults for the served model's input size.
Everything here is thread-safe (no process-wide state is changed): ``cora serve`` decodes in a
thread pool.
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import struct
from dataclasses import dataclass

import torch

__all__ = ["PayloadError", "Limits", "limits_for", "decode_request", "image_size", "check_sizes", "decode_image", "preprocess",
           "IMAGE_TYPES"]

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}  # content type -> PIL format


class PayloadError(Exception):
    """A request refused before it reached the model: ``status`` (HTTP) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


@dataclass(frozen=True)
class Limits:
    """What one request may hold: images, bytes of body, pixels (width x height) per image and in all.

    Defaults: 64 images, 8 MiB, 4096 x 4096 pixels per image, 16 such images' pixels per request;
    ``cora serve`` uses :func:`limits_for` instead (sized for the model).
    """

    max_images: int = 64
    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_request_pixels: int = 16 * 4096 * 4096

    def __post_init__(self) -> None:
        for name in ("max_images", "max_body_bytes", "max_pixels", "max_request_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(f"Limits.max_request_pixels {self.max_request_pixels} is below max_pixels "
                             f"{self.max_pixels}: no image at the per-image limit could be sent")


def limits_for(resize_size: int) -> Limits:
    """Defaults sized for a model whose input is resized to ``resize_size`` (its short side).

    An image may be up to 8x the model's resize size per side (at least 512 x 512, at most
    4096 x 4096: downscaling more is wasted decode work); one request may carry 64 images but
    only 16 images' worth of those pixels.
    """
    side = min(4096, max(512, 8 * int(resize_size)))
    return Limits(max_images=64, max_body_bytes=8 * 1024 * 1024, max_pixels=side * side,
                  max_request_pixels=16 * side * side)


def _media_type(content_type: str | None) -> str:
    # "image/png; charset=..." -> "image/png"
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_request(body: bytes, content_type: str | None, limits: Limits) -> list[bytes]:
    """The encoded images of one request body (1 to ``limits.max_images`` byte strings).

    Checks the content type, the body size, the JSON structure and the images' sizes from their headers
    (:func:`check_sizes`); the pixels are checked by :func:`decode_image`. Raises :class:`PayloadError`.
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
        check_sizes([body], limits)
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
    check_sizes(out, limits)
    return out


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR or a JPEG's first SOF marker; ``None`` if neither is found.

    Read here (not by PIL) so that the size is checked before PIL sees the image: PIL's own
    decompression-bomb check warns through the process-wide warning filters, which threads share.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def check_sizes(encoded: list[bytes], limits: Limits, many: bool | None = None) -> None:
    """Refuse (413) an image over ``max_pixels`` or a request over ``max_request_pixels``, from the headers
    alone. An image whose header cannot be read is left to :func:`decode_image` (it refuses it with 400)."""
    many = len(encoded) > 1 if many is None else many
    total = 0
    for i, data in enumerate(encoded):
        size = image_size(data)
        if size is None:
            continue
        w, h = size
        where = f"images[{i}]" if many else "image"
        if w * h > limits.max_pixels:
            raise PayloadError(413, f"{where} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
        total += w * h
        if total > limits.max_request_pixels:
            raise PayloadError(413, f"the request's images add up to more than {limits.max_request_pixels} pixels "
                                    f"(the limit per request)")


def decode_image(data: bytes, limits: Limits, where: str = "image"):
    """One PNG/JPEG as an RGB ``PIL.Image`` (fully decoded); thread-safe.

    The size is read from the header (:func:`image_size`) and checked against ``limits.max_pixels``
    before PIL opens the image; PIL's own decompression-bomb error is a 413 too. Raises
    :class:`PayloadError` (400 not an image / corrupt, 413 too many pixels).
    """
    from PIL import Image

    size = image_size(data)
    if size is not None and size[0] * size[1] > limits.max_pixels:
        w, h = size
        raise PayloadError(413, f"{where} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])  # header only
        w, h = img.size
        if w * h > limits.max_pixels:  # (a header image_size did not find)
            raise PayloadError(413, f"{where} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
        img.load()  # the pixels: a truncated or corrupt file fails here
        return img.convert("RGB")
    except PayloadError:
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadError(413, f"{where} is too large to decode: {exc}") from None
    except Image.UnidentifiedImageError:
        raise PayloadError(400, f"{where} is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:  # PIL's errors for damaged files
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
