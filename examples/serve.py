"""Serve a CoRa CIFAR ResNet: load (or quickly quantize), deploy, warm up, classify test batches.

    python examples/serve.py                              # quantize ResNet-20 from ../shared (W4, ~seconds)
    python examples/serve.py --checkpoint r20_w4.safetensors [--depth 20]   # depth if not recorded
    python examples/serve.py --depth 32 --bits 3 --batches 8 --batch-size 250 [--shared PATH]

Prints the accuracy of the deployed model on the first ``batches * batch_size`` images of the
CIFAR-10 test set (next to the converted model's, which it must match), and the weight bytes of the
fp16 float model vs the deployed quantized model, measured from the stored tensors.

The quick quantization is round-to-nearest with min-max per-channel ranges plus weight-space SVD
adapters at a 5% budget on 250 calibration images: a fast demo, not the best accuracy
(``cora.CoRaConfig()`` defaults are the accurate recipe).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import cora  # noqa: E402
from cora.experiments.data import cifar10_calibration, cifar10_test  # noqa: E402
from cora.deploy import deploy, warmup, weight_bytes  # noqa: E402
from cora.experiments.models import cifar_resnet, load_cifar_resnet  # noqa: E402


def mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a CoRa checkpoint saved with cora.save (skips quantizing)")
    ap.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth to quantize (20 or 32 in ../shared)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--shared", default=None, help="shared folder (default: CORA_SHARED or ../shared)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32

    t0 = time.perf_counter()
    if args.checkpoint:
        from cora.checkpoint import read_metadata

        arch = read_metadata(args.checkpoint).get("architecture") or {}
        name = arch.get("name", f"cifar_resnet{args.depth}") if isinstance(arch, dict) else f"cifar_resnet{args.depth}"
        if not name.startswith("cifar_resnet"):
            raise SystemExit(f"{args.checkpoint} holds a {name}, this example serves CIFAR ResNets")
        depth = int(name.removeprefix("cifar_resnet"))
        # the float architecture to fill (checkpoints without a recorded architecture need it), and the
        # fp16 byte count below
        float_model = cifar_resnet(depth)
        converted = cora.load(args.checkpoint, copy.deepcopy(float_model))
        print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s")
    else:
        float_model = load_cifar_resnet(args.depth, shared=args.shared)
        calib, _ = cifar10_calibration(250, shared=args.shared).tensors()
        cfg = cora.CoRaConfig(bits=args.bits, method="uniform", budget=0.05, rounding="nearest",
                              range_method="minmax", factorization="weight", sequential=False, refine=False,
                              progress=False, calib_images=250, tune_iterations=0)  # the fast path, for a demo
        converted = cora.convert(float_model, calib, cfg)
        print(f"quantized ResNet-{args.depth} to W{args.bits} in {time.perf_counter() - t0:.1f}s "
              f"({converted.cora_report.equiv_bits:.2f} bits per conv/linear weight incl. adapters)")
    converted = converted.to(dev).eval()

    model = deploy(converted).to(dev)
    print(f"deployed: {model.cora_deploy['blocks']} fused residual blocks, {model.cora_deploy['folded_bn']} "
          f"BatchNorms folded")
    warmup(model, [args.batch_size], (3, 32, 32), dev, dtype)  # autotunes on CUDA; must precede graph capture

    test = cifar10_test(shared=args.shared)
    images, labels = test.tensors()
    correct = agree = total = 0
    t_serve = 0.0
    with torch.no_grad():
        for i in range(args.batches):
            sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
            x, y = images[sl].to(dev, dtype), labels[sl]
            if x.shape[0] == 0:
                break
            t = time.perf_counter()
            pred = model(x).argmax(1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_serve += time.perf_counter() - t
            ref = converted(x.float()).argmax(1)
            correct += (pred.cpu() == y).sum().item()
            agree += (pred == ref).sum().item()
            total += y.numel()
    print(f"served {total} test images in {args.batches} batches on {dev} ({dtype}): "
          f"accuracy {100.0 * correct / total:.2f}%, same prediction as the converted model on "
          f"{100.0 * agree / total:.2f}% ({t_serve:.2f}s in the deployed model)")

    fp16 = weight_bytes(copy.deepcopy(float_model).half())
    q = weight_bytes(model)
    parts = ", ".join(f"{k} {mib(v)}" for k, v in q.items() if k != "total" and v)
    bits = next(m.bits for m in model.modules() if isinstance(m, cora.CoRaConv2d))
    print(f"weight bytes: fp16 model {mib(fp16['total'])}; deployed W{bits} "
          f"{mib(q['total'])} ({parts}): {fp16['total'] / q['total']:.2f}x smaller")
    return 0


if __name__ == "__main__":
    sys.exit(main())
