"""Classify images with a running ``cora serve``: encode them, POST them, print the top-k.

Start a server first (it needs the serve extra, ``pip install -e ".[serve]"``), for example on a
checkpoint written by ``cora quantize``, and wait for its ``cora serve: ready at ...`` line:

    python -m cora quantize cifar_resnet20 --bits 4 --out r20_w4.safetensors
    python -m cora serve r20_w4.safetensors                  # or: python -m cora serve --float cifar_resnet20

Then, in another shell:

    python examples/serve.py cat.png dog.jpg                 # your own PNG / JPEG files
    python examples/serve.py --cifar 4                       # the first 4 CIFAR-10 test images (shared folder)
    python examples/serve.py --cifar 4 --top-k 3 --url http://127.0.0.1:8000

One image is sent as a raw ``image/png`` (or ``image/jpeg``) body; several go in one request as JSON
``{"images": ["<base64>", ...]}``. The reply is ``{"predictions": [{"top": [{"index", "label", "prob"},
...]}, ...], "model": {...}}``; the server decides how many classes it returns (``cora serve --top-k``),
``--top-k`` here only prints fewer. Only the standard library talks to the server; Pillow encodes the
CIFAR-10 arrays.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def read_files(paths: list) -> list:
    """``(name, bytes, content type)`` of image files, the type from the extension."""
    out = []
    for p in paths:
        kind = TYPES.get(os.path.splitext(p)[1].lower())
        if kind is None:
            raise SystemExit(f"{p}: send .png, .jpg or .jpeg files")
        with open(p, "rb") as f:
            out.append((p, f.read(), kind))
    return out


def cifar_images(n: int, shared=None) -> list:
    """The first ``n`` CIFAR-10 test images as PNG: ``(name with its true class, bytes, "image/png")``."""
    from PIL import Image

    from cora.experiments.data import CIFAR10_CLASSES, TEST_FILE, load_npz

    images, labels = load_npz(TEST_FILE, shared)
    out = []
    for i in range(min(n, len(images))):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        out.append((f"cifar test #{i} ({CIFAR10_CLASSES[labels[i]]})", buf.getvalue(), "image/png"))
    return out


def request_body(images: list) -> tuple[bytes, str]:
    """One image: its own bytes and type; several: the JSON list of base64 strings."""
    if len(images) == 1:
        return images[0][1], images[0][2]
    doc = {"images": [base64.b64encode(data).decode("ascii") for _, data, _ in images]}
    return json.dumps(doc).encode(), "application/json"


def classify(url: str, images: list, timeout: float = 60.0) -> dict:
    """POST the images to ``url``/v1/classify; the JSON reply. An HTTP error exits with the server's message."""
    body, kind = request_body(images)
    req = urllib.request.Request(url.rstrip("/") + "/v1/classify", data=body, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the server's errors are JSON {"error": "..."}
        detail = e.read().decode(errors="replace")
        raise SystemExit(f"{url}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"{url}: cannot connect ({e.reason}); is `python -m cora serve ...` running?") from None


def show(images: list, reply: dict, top_k: int) -> None:
    """Print each image's top-k: probability, class index and label."""
    model = reply.get("model", {})
    what = "float" if model.get("float") else f"W{model.get('bits')} ({model.get('equiv_bits')} equivalent bits)"
    print(f"model: {model.get('architecture')} {what}")
    for (name, _, _), pred in zip(images, reply["predictions"]):
        top = ", ".join(f"{t['label'] or t['index']} {t['prob']:.3f}" for t in pred["top"][:top_k])
        print(f"{name}: {top}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="PNG / JPEG files to classify")
    ap.add_argument("--cifar", type=int, default=0, help="also send the first N CIFAR-10 test images")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    ap.add_argument("--top-k", type=int, default=5, help="classes to print per image (at most what the server sends)")
    ap.add_argument("--shared", default=None, help="shared folder with data/ (default: CORA_SHARED or ../shared)")
    args = ap.parse_args(argv)
    images = read_files(args.files) + (cifar_images(args.cifar, args.shared) if args.cifar > 0 else [])
    if not images:
        ap.error("give image files or --cifar N")
    show(images, classify(args.url, images), args.top_k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
