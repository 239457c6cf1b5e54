"""cora.payloads: request decoding, refusals with their HTTP status, preprocessing."""
import base64
import json

import numpy as np
import pytest
import torch

from cora.payloads import Limits, PayloadError, decode_image, decode_request, preprocess
from tests.cora.serve_helpers import jpeg, png, png_header_only

LIMITS = Limits(max_images=3, max_body_bytes=10_000, max_pixels=100 * 100)
RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
CIFAR_PRE = {"image_size": 32, "resize_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
             "class_names": None}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _status(fn, *args) -> int:
    with pytest.raises(PayloadError) as info:
        fn(*args)
    assert "\n" not in info.value.message and info.value.message
    return info.value.status


def test_one_image_bodies():
    assert decode_request(png(IMG), "image/png", LIMITS) == [png(IMG)]
    assert decode_request(jpeg(IMG), "image/jpeg; charset=binary", LIMITS) == [jpeg(IMG)]


def test_json_bodies():
    body = json.dumps({"images": [_b64(png(IMG)), _b64(jpeg(IMG))]}).encode()
    assert decode_request(body, "application/json", LIMITS) == [png(IMG), jpeg(IMG)]


@pytest.mark.parametrize("body, ctype, status", [
    (b"x", None, 415),
    (b"x", "text/plain", 415),
    (b"", "image/png", 400),
    (b"{", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b'{"images": "abc"}', "application/json", 400),
    (b'{"images": [1]}', "application/json", 400),
    (b'{"images": []}', "application/json", 400),
    (b'{"pictures": ["aGk="]}', "application/json", 400),
    (b'{"images": ["not base64!"]}', "application/json", 400),
    (json.dumps({"images": ["aGk="] * 4}).encode(), "application/json", 413),
    (b"x" * 10_001, "image/png", 413),
])
def test_request_refusals(body, ctype, status):
    assert _status(decode_request, body, ctype, LIMITS) == status


def test_image_refusals():
    good = png(IMG)
    corrupt = bytearray(good)
    corrupt[60:120] = bytes(60)  # inside the compressed data
    assert _status(decode_image, b"hello, not an image", LIMITS) == 400
    assert _status(decode_image, bytes(corrupt), LIMITS) == 400
    assert _status(decode_image, jpeg(IMG)[:300], LIMITS) == 400  # truncated JPEG
    assert _status(decode_image, png(np.zeros((101, 100, 3), np.uint8)), LIMITS) == 413
    assert _status(decode_image, png_header_only(1000, 1000), LIMITS) == 413
    # far over PIL's own decompression-bomb limit: still our 413, never a warning or a 500
    assert _status(decode_image, png_header_only(100_000, 100_000), Limits(max_pixels=2**62)) == 413
    gif = bytearray(b"GIF89a" + bytes(20))
    assert _status(decode_image, bytes(gif), LIMITS) == 400


def test_preprocess_matches_the_dataset_normalisation():
    from cora.experiments.data import NpzImageDataset

    x = preprocess(decode_image(png(IMG), LIMITS), CIFAR_PRE)
    ref = NpzImageDataset(IMG[None], np.zeros(1, np.int64)).images[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


def test_preprocess_resizes_and_crops_like_torchvision():
    from PIL import Image
    from torchvision import transforms

    pre = dict(CIFAR_PRE, image_size=24, resize_size=28)
    img = Image.fromarray(RNG.integers(0, 256, (50, 80, 3), dtype=np.uint8))
    tv = transforms.Compose([transforms.PILToTensor(), transforms.Resize(28, antialias=True), transforms.CenterCrop(24),
                             transforms.ConvertImageDtype(torch.float32), transforms.Normalize(pre["mean"], pre["std"])])
    x = preprocess(img, pre)
    assert x.shape == (3, 24, 24)
    torch.testing.assert_close(x, tv(img), rtol=0, atol=1.01 / 255 / 0.224)  # at most one grey level apart
