"""cora.payloads: request decoding, refusals with their HTTP status, preprocessing."""
import base64
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cora.payloads import (Limits, PayloadError, check_sizes, decode_image, decode_request, image_size, limits_for,
                           preprocess)
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
    assert _status(decode_image, png_header_only(100_000, 100_000), Limits(max_pixels=2**62, max_request_pixels=2**62)) == 413
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


@pytest.mark.parametrize("shape", [(7, 13), (32, 32), (300, 41)])
def test_image_size_from_the_header(shape):
    arr = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    h, w = shape
    assert image_size(png(arr)) == (w, h)
    assert image_size(jpeg(arr)) == (w, h)
    assert image_size(png_header_only(70_000, 3)) == (70_000, 3)
    assert image_size(b"GIF89a" + bytes(20)) is None and image_size(jpeg(arr)[:4]) is None


def test_request_pixel_budget_counts_every_image():
    limits = Limits(max_images=8, max_body_bytes=10**6, max_pixels=100 * 100, max_request_pixels=3 * 100 * 100)
    check_sizes([png_header_only(100, 100)] * 3, limits)  # exactly at the budget
    with pytest.raises(PayloadError) as info:
        check_sizes([png_header_only(100, 100)] * 4, limits)
    assert info.value.status == 413 and "per request" in info.value.message
    body = json.dumps({"images": [_b64(png_header_only(100, 100))] * 4}).encode()
    assert _status(decode_request, body, "application/json", limits) == 413  # before any pixel is decoded
    with pytest.raises(ValueError):
        Limits(max_pixels=100, max_request_pixels=99)


def test_limits_for_scale_with_the_model_input():
    small, large = limits_for(32), limits_for(256)
    assert small.max_pixels == 512 * 512 and large.max_pixels == 2048 * 2048
    assert limits_for(10_000).max_pixels == 4096 * 4096
    for lim in (small, large):
        assert lim.max_request_pixels == 16 * lim.max_pixels < lim.max_images * lim.max_pixels


def test_decoding_in_threads_leaves_the_warning_filters_alone():
    from PIL import Image

    bomb = png_header_only(12_000, 12_000)  # over PIL's bomb limit (and ours): 413, no process-wide change
    goods = [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    before = list(warnings.filters)
    lim = Limits(max_pixels=Image.MAX_IMAGE_PIXELS)

    def one(i):
        if i % 3 == 0:
            return _status(decode_image, bomb, lim)
        return np.asarray(decode_image(png(goods[i % 8]), lim)).tolist() == goods[i % 8].tolist()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(4) as pool:
            out = list(pool.map(one, range(48)))
    assert warnings.filters[len(warnings.filters) - len(before):] == before
    assert all(o == 413 for o in out[::3]) and all(o is True for i, o in enumerate(out) if i % 3)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
