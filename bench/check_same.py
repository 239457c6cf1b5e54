"""Behaviour fingerprint: convert ResNet-20 with the defaults and digest what came out.

    python bench/check_same.py --out bench/results/check_same_<label>.json

Runs on one CPU thread (float sums in a fixed order) and writes, for each run below, the ranks, a
SHA-256 of the converted model's state dict (every tensor's name, dtype, shape and bytes) and of its
logits on 500 held-back calibration images (reference path), plus, for the labelled runs, of the
deployed model's logits on 2 of those images through the real Triton kernel under the interpreter.
Two checkouts that print the same digests converted bit-identically. Runs:

* ``r20_w4_labels``, ``r20_w3_labels``: ``CoRaConfig(bits=b)`` with the 1,600 labelled images
  (ranks searched by CE, adapters tuned by CE);
* ``r20_w4_nolabels``, ``r20_w3_nolabels``: the same images without labels (uniform ranks, no tuning).

About 4-5 minutes here. Needs the shared folder (``--shared``, ``CORA_SHARED`` or ``../shared``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the deployed check runs the Triton kernel on CPU tensors

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import git_commit  # noqa: E402

import cora  # noqa: E402

# The experiment harness's home after the layout change, or before it the flat modules. Decided by what
# this checkout's package holds: an import attempt could pick up another checkout's editable install.
if (Path(cora.__file__).parent / "experiments").is_dir():
    from cora.experiments.data import cifar10_calibration
    from cora.experiments.models import load_cifar_resnet, model_input_spec

    def _normalisation(name: str) -> dict:
        """The model's own input mean / std for the CIFAR arrays (as python -m cora uses them)."""
        spec = model_input_spec(name)
        return {"mean": spec["mean"], "std": spec["std"]}
else:  # the flat layout knew the ResNets only, trained with ImageNet's mean / std (its default)
    from cora.data import cifar10_calibration
    from cora.models import load_cifar_resnet

    def _normalisation(name: str) -> dict:
        return {}


def tensor_digest(tensors: dict) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor; other entries (the layers' extra state) as JSON."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        if not isinstance(tensors[name], torch.Tensor):
            h.update(name.encode())
            h.update(json.dumps(tensors[name], sort_keys=True, default=str).encode())
            continue
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 250]) for i in range(0, x.shape[0], 250)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--shared", default=None)
    p.add_argument("--runs", nargs="+", default=["r20_w4_labels", "r20_w3_labels", "r20_w4_nolabels", "r20_w3_nolabels"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    norm = _normalisation("cifar_resnet20")
    calib = cifar10_calibration(1600, shared=args.shared, **norm)
    probe = cifar10_calibration(1600, shared=args.shared, split="holdout", **norm).images[:500]
    float_model = load_cifar_resnet(20, shared=args.shared)
    result = {"commit": git_commit(), "cora": str(Path(cora.__file__).parent), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "runs": {}}
    for run in args.runs:
        bits = int(run.split("_w")[1][0])
        labelled = run.endswith("_labels")
        data = (calib.images, calib.labels) if labelled else calib.images
        t = time.perf_counter()
        q = cora.convert(float_model, data, cora.CoRaConfig(bits=bits, progress=False))
        seconds = time.perf_counter() - t
        rec = {
            "ranks": q.cora_report.ranks,
            "adapter_fraction": q.cora_report.adapter_fraction,
            "equiv_bits": q.cora_report.equiv_bits,
            "state_dict_sha256": tensor_digest(q.state_dict()),
            "logits_sha256": tensor_digest({"logits": logits(q, probe)}),
        }
        if labelled:
            os.environ["CORA_BACKEND"] = "triton"  # only here: the conversion itself runs the reference path
            try:
                rec["deployed_triton_logits_sha256"] = tensor_digest({"logits": logits(cora.deploy(q), probe[:2])})
            finally:
                del os.environ["CORA_BACKEND"]
        result["runs"][run] = rec
        print(f"{run}: {seconds:.1f} s  state {rec['state_dict_sha256'][:16]}  logits {rec['logits_sha256'][:16]}"
              + (f"  deployed {rec['deployed_triton_logits_sha256'][:16]}" if labelled else ""), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
