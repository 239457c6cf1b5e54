"""Peer baselines through Brevitas: the same CIFAR models, calibration images and test set as CoRa.

Models: the CIFAR ResNets and ``cifar_shufflenetv2_x0_5`` (any name of ``cora.experiments.models``
with a CIFAR input spec); the arrays are normalised with the model's own mean / std
(``model_input_spec``), as ``python -m cora`` does.

Every Conv2d and the final Linear (first and last layers included) get a b-bit weight-only,
per-output-channel *asymmetric* (scale + integer zero point) Brevitas quantizer; activations
stay float; BatchNorm is not merged. Methods (``--methods``):

``rtn``        ``ShiftedUint8WeightPerChannelFloat`` at b bits: min-max range, round to nearest.
``mse``        ``ShiftedUint8WeightPerChannelFloatMSE``: scale and zero point searched to minimise
               the weight MSE, round to nearest.
``gptq``       min-max ranges + ``brevitas.graph.gptq.gptq_mode(act_order=True)`` over the
               calibration images (float activations while collecting the Hessians).
``gptq_mse``   the same GPTQ on the MSE ranges (extra row, not in the brief's list).
``adaround``   learned rounding, layer by layer (AdaRound-like), with Brevitas's ready-made flow:
               ``brevitas_examples.common.learned_round.LearnedRoundTrainer`` with the
               ``hard_sigmoid`` (AdaRound rectified sigmoid) parametrisation,
               loss = MSE to the float layer output (quantized inputs) + AdaRound's annealed
               rounding regulariser; ranges from the MSE quantizer (kept fixed).
``brecq``      the same learned rounding block by block (BRECQ-like): blocks are the stem conv,
               each residual BasicBlock (ShuffleNet: each InvertedResidual) and the final linear; loss = MSE to the float block
               output + the rounding regulariser summed over the block's layers (a small
               ``BlockLoss`` registered here, since Brevitas's ``round_reg`` only takes one layer).
               No Fisher weighting (plain MSE), so "BRECQ-like", not BRECQ.

Learned-rounding settings: ``--iters`` Adam steps per layer/block (lr 1e-3, batch 32 cached
samples, regulariser weight 0.01, beta annealed 20 -> 2 after a 20 % warm-up, i.e. Brevitas's
defaults with ``max_count`` = iters), fp32 (no AMP on CPU), last iterate kept.

Columns of the CSV (one row appended as soon as each run finishes):
``model, bits, method, acc, float_acc, bits_per_weight, steps, calib_images, seconds,
brevitas_version, torch_version, threads, machine``.

- ``acc``: top-1 % on the 10,000 test images; ``float_acc`` the unquantized model.
- ``bits_per_weight``: b plus the per-output-channel overhead of one fp16 scale and one b-bit
  zero point, spread over all quantized weights (conv + linear):
  ``b + (16 + b) * sum(C_out) / sum(weights)``. (Brevitas keeps the scale in fp32; fp16 is what a
  deployed kernel stores. With an fp32 scale add ``16 * sum(C_out) / sum(weights)``: 0.06 for
  ResNet-20.)
- ``steps``: optimizer steps in total (iters x layers or blocks); 0 for the closed-form methods.
- ``seconds``: wall-clock of the quantization (layer swap, range search, GPTQ or learned
  rounding, calibration passes included), not of the test evaluation.

Run single-threaded (the script sets ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``).
Needs ``brevitas`` (0.13.4 measured) and, for the learned-rounding methods, ``accelerate``
(imported by Brevitas's trainer; nothing is offloaded: the trainer's accelerate device-map step
is replaced by a no-op because everything stays on the CPU).

    python bench/peers.py                                   # the default grid
    python bench/peers.py --models cifar_resnet20 --bits 4 --methods rtn mse
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import csv
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from cora.experiments.data import cifar10_calibration, cifar10_test, evaluate, make_loader  # noqa: E402
from cora.experiments.models import build_model, model_input_spec  # noqa: E402

__all__ = ["METHODS", "quantize_with", "main"]

METHODS = ("rtn", "mse", "gptq", "gptq_mse", "adaround", "brecq")
DEFAULT_METHODS = ("rtn", "mse", "gptq", "gptq_mse", "adaround", "brecq")
# Written into the CSV's method column: says what was run.
METHOD_LABEL = {
    "rtn": "rtn_minmax",
    "mse": "mse_ranges_scale+zp",
    "gptq": "gptq_actorder_minmax",
    "gptq_mse": "gptq_actorder_mse_ranges",
    "adaround": "adaround_like_layerwise_brevitas_learned_round_hardsigmoid_mse_ranges",
    "brecq": "brecq_like_blockwise_per_resblock_brevitas_learned_round_hardsigmoid_mse_ranges",
}
CSV_COLUMNS = ["model", "bits", "method", "acc", "float_acc", "bits_per_weight", "steps",
               "calib_images", "seconds", "brevitas_version", "torch_version", "threads", "machine"]
SCALE_BITS = 16  # per-channel scale counted as fp16 in bits_per_weight (see module doc)
LR_BATCH = 32     # learned rounding: cached samples per Adam step
LR_LR = 1e-3      # learned rounding: Adam learning rate (Brevitas's default)
CALIB_BATCH = 100  # images per forward during GPTQ / caching
_DEFAULT_OUT = _REPO / "bench" / "results" / "peers.csv"

log = logging.getLogger("peers")


# ----------------------------------------------------------------------------- helpers
def _machine() -> str:
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, CPU only)"


def _normalisation(name: str) -> dict:
    """The model's own input mean and std for the CIFAR arrays (ImageNet's for the ResNets, CIFAR-10's
    for the ShuffleNet): the same preprocessing as ``python -m cora``."""
    spec = model_input_spec(name)
    return {"mean": spec["mean"], "std": spec["std"]}


def _quant_layer_map(bits: int, weight_quant) -> dict:
    import brevitas.nn as qnn

    common = dict(weight_quant=weight_quant, weight_bit_width=bits, input_quant=None,
                  output_quant=None, bias_quant=None, return_quant_tensor=False)
    return {nn.Conv2d: (qnn.QuantConv2d, dict(common)), nn.Linear: (qnn.QuantLinear, dict(common))}


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    return [m for m in model.modules() if isinstance(m, QuantWBIOL)]


def bits_per_weight(model: nn.Module, bits: int) -> float:
    layers = _quantized_layers(model)
    n_w = sum(m.weight.numel() for m in layers)
    n_ch = sum(m.weight.shape[0] for m in layers)
    return bits + (SCALE_BITS + bits) * n_ch / n_w


def _weight_quant(ranges: str):
    """The Brevitas weight quantizer for ``ranges`` ("minmax" or "mse").

    Min-max: ``ShiftedUint8WeightPerChannelFloat`` with its scale and zero point frozen as
    parameters taken from the float weights' statistics (``ParameterFromStatsFromParameter*``,
    as ``brevitas_examples``' ``ptq_common.quantize_model`` does). Needed, not cosmetic: with
    the default runtime-statistics scale, Brevitas 0.13.4's sliced ``quant_weight`` (used by
    GPTQ one column at a time) recomputes the min/max of the *slice* alone, and GPTQ then
    diverges (10 % accuracy measured). Round-to-nearest results are identical either way.
    MSE: ``ShiftedUint8WeightPerChannelFloatMSE`` (scale and zero point searched for the
    smallest weight MSE, then held as parameters).
    """
    from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.quant.shifted_scaled_int import (ShiftedUint8WeightPerChannelFloat,
                                                   ShiftedUint8WeightPerChannelFloatMSE)

    if ranges == "minmax":
        return ShiftedUint8WeightPerChannelFloat.let(
            scaling_impl=ParameterFromStatsFromParameterScaling,
            zero_point_impl=ParameterFromStatsFromParameterZeroPoint)
    if ranges == "mse":
        return ShiftedUint8WeightPerChannelFloatMSE
    raise ValueError(f"ranges must be 'minmax' or 'mse', got {ranges!r}")


def _swap_layers(model: nn.Module, bits: int, ranges: str) -> nn.Module:
    from brevitas.graph.quantize import layerwise_quantize

    wq = _weight_quant(ranges)
    model = layerwise_quantize(model, compute_layer_map=_quant_layer_map(bits, wq))
    n_float = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if n_float:
        raise RuntimeError(f"layers left in float: {n_float}")
    # Initialise every weight quantizer (the MSE search runs on the first quant_weight call).
    with torch.no_grad():
        for m in _quantized_layers(model):
            m.quant_weight()
    return model.eval()


def _gptq(model: nn.Module, loader) -> None:
    from brevitas.graph.gptq import gptq_mode

    model.eval()
    with torch.no_grad():
        with gptq_mode(model, act_order=True, use_quant_activations=False,
                       create_weight_orig=False) as gptq:
            gmodel = gptq.model
            for _ in range(gptq.num_layers):
                for images, _ in loader:
                    gmodel(images)
                gptq.update()


def _register_block_round_loss():
    """A BlockLoss for a whole block: AdaRound's rounding regulariser summed over its layers."""
    from brevitas_examples.common.learned_round.learned_round_method import (
        BLOCK_LOSS_REGISTRY, BlockLoss, RoundRegularisationLoss)

    if "round_reg_block" in BLOCK_LOSS_REGISTRY.get_registered_keys():
        return

    @BLOCK_LOSS_REGISTRY.register(names="round_reg_block")
    class BlockRoundRegularisationLoss(BlockLoss):
        def __init__(self, block: nn.Module, **kwargs) -> None:
            self.parts = [RoundRegularisationLoss(m, **kwargs) for m in _quantized_layers(block)]
            if not self.parts:
                raise ValueError("block without quantized layers")

        def __call__(self, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            return sum(p(pred, tgt) for p in self.parts)


def _soft_fraction(model: nn.Module) -> float:
    """Share of learned-rounding variables still strictly between 0 and 1 (not converged to a
    hard floor/ceil decision; evaluation thresholds them at 0.5)."""
    from brevitas.core.function_wrapper.learned_round import LearnedRoundSte

    soft = total = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LearnedRoundSte):
                impl = m.learned_round_impl
                p = torch.sigmoid(m.value) * (impl.learned_round_zeta - impl.learned_round_gamma)
                p = (p + impl.learned_round_gamma).clamp(0.0, 1.0)
                soft += int(((p > 0) & (p < 1)).sum())
                total += p.numel()
    return soft / max(total, 1)


def _learned_round(model: nn.Module, loader, iters: int, mode: str, lr: float = LR_LR) -> int:
    """Brevitas's LearnedRoundTrainer on CPU; returns the number of blocks optimised."""
    import brevitas_examples.common.learned_round.learned_round_trainer as lrt
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL
    from brevitas_examples.common.learned_round.learned_round_args import (
        HandlerSpec, LossArgs, OptimizerArgs, TrainerConfig, TrainingArgs)
    from brevitas_examples.common.learned_round.learned_round_method import LearnedRoundArgs
    from brevitas_examples.imagenet_classification.ptq.learned_round_utils import (
        CacheVision, vision_block_forward, vision_forward)

    from torchvision.models.shufflenetv2 import InvertedResidual

    from cora.experiments.models import CifarBasicBlock

    _register_block_round_loss()
    # Everything stays on the CPU: skip the accelerate device-map dispatch the trainer does
    # before each cache fill (it only matters for models spread over GPUs/CPU).
    lrt.offload_model = lambda m, *a, **k: m
    lrt.remove_hooks = lambda m: None

    if mode == "layerwise":
        def is_block(m, name):
            return isinstance(m, QuantWBIOL)
        reg = LossArgs(cls="round_reg", kwargs={"max_count": iters})
    else:
        def is_block(m, name):
            return isinstance(m, (CifarBasicBlock, InvertedResidual, QuantWBIOL))
        reg = LossArgs(cls="round_reg_block", kwargs={"max_count": iters})
    cfg = TrainerConfig(
        training_args=TrainingArgs(
            optimizers_args=[OptimizerArgs(target_params="learned_round", optimizer_cls="Adam",
                                           lr=lr)],
            batch_size=LR_BATCH,
            iters=iters,
            losses_args=[reg, LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1})],
            loss_scaling_factor=1.0,
            use_best_model=False,
            use_amp=False,
            fast_update=False,
        ),
        training_handlers=[HandlerSpec(name="learned_round", config=LearnedRoundArgs(
            learned_round_param="hard_sigmoid", learned_round_kwargs={}))],
    )
    blocks: list[nn.Module] = []

    def get_blocks(m):
        blocks[:] = lrt.get_blocks(m, block_check_fn=is_block)
        return blocks

    model.eval()
    lrt.LearnedRoundTrainer(config=cfg).train(
        model=model, model_forward=vision_forward, block_forward=vision_block_forward,
        data_loader=loader, cache=CacheVision(), get_blocks_fn=get_blocks, keep_gpu=True)
    model.eval()
    log.info("learned rounding (%s, %d iters/block, lr %g): %.1f %% of the rounding variables "
             "still soft at the end", mode, iters, lr, 100 * _soft_fraction(model))
    return len(blocks)


def quantize_with(method: str, model: nn.Module, bits: int, calib, iters: int,
                  lr: float = LR_LR) -> tuple[nn.Module, int]:
    """Quantize ``model`` (float, eval) in place with one peer method; returns (model, steps)."""
    loader = make_loader(calib, batch_size=CALIB_BATCH)
    if method == "rtn":
        return _swap_layers(model, bits, "minmax"), 0
    if method == "mse":
        return _swap_layers(model, bits, "mse"), 0
    if method in ("gptq", "gptq_mse"):
        model = _swap_layers(model, bits, "minmax" if method == "gptq" else "mse")
        _gptq(model, loader)
        return model.eval(), 0
    if method in ("adaround", "brecq"):
        model = _swap_layers(model, bits, "mse")
        n_blocks = _learned_round(model, loader, iters,
                                  "layerwise" if method == "adaround" else "blockwise", lr)
        return model, iters * n_blocks
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# ----------------------------------------------------------------------------- CLI
def _append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def _table(rows: list[dict]) -> str:
    head = f"{'model':<15} {'W':>2} {'method':<24} {'acc':>6} {'float':>6} {'bpw':>6} {'steps':>6} {'sec':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<15} {r['bits']:>2} {r['method'][:24]:<24} {r['acc']:>6.2f} "
                     f"{r['float_acc']:>6.2f} {r['bits_per_weight']:>6.3f} {r['steps']:>6} "
                     f"{r['seconds']:>7.1f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/peers.py",
        description="Brevitas peer baselines (RTN, MSE ranges, GPTQ, AdaRound-like, BRECQ-like) on "
                    "the pretrained CIFAR-10 models: weight-only, per-channel asymmetric, every "
                    "conv and the final linear at b bits, activations float, BN not merged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet32"],
                   help="model names (cifar_resnet<6n+2>, cifar_shufflenetv2_x0_5)")
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3], help="weight bit widths")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                   help="peer methods, run in this order for each model and bit width")
    p.add_argument("--calib", type=int, default=1600,
                   help="calibration images (class-balanced 'search' split of cifar10_calib.npz)")
    p.add_argument("--iters", type=int, default=300,
                   help="learned-rounding Adam steps per layer (adaround) or per block (brecq)")
    p.add_argument("--shared", default=None, help="shared data folder (None: $CORA_SHARED, else ../shared next to the repo)")
    p.add_argument("--out", default=str(_DEFAULT_OUT.relative_to(_REPO)),
                   help="CSV to append rows to (header written if new); relative paths are "
                        "taken from the repository root")
    p.add_argument("--log", default=None, help="log file (default: peers.log next to --out)")
    p.add_argument("--lr", type=float, default=LR_LR,
                   help="learned-rounding Adam learning rate (a non-default value is appended to "
                        "the method name in the CSV, e.g. '..._lr0.01')")
    p.add_argument("--seed", type=int, default=0, help="seed for the learned-rounding sampler")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if not out.is_absolute():
        out = _REPO / out
    log_path = Path(args.log) if args.log else out.with_name("peers.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout),
                                  logging.FileHandler(log_path, mode="a")])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import brevitas

    meta = dict(brevitas_version=brevitas.__version__, torch_version=torch.__version__,
                threads=torch.get_num_threads(), machine=_machine())
    log.info("peers: %s | models=%s bits=%s methods=%s calib=%d iters=%d lr=%g",
             " ".join(sys.argv), args.models, args.bits, args.methods, args.calib, args.iters,
             args.lr)
    log.info("brevitas %s, torch %s, %d thread(s), %s", meta["brevitas_version"],
             meta["torch_version"], meta["threads"], meta["machine"])
    rows = []
    t_all = time.perf_counter()
    for name in args.models:
        norm = _normalisation(name)
        test = cifar10_test(shared=args.shared, **norm)
        calib = cifar10_calibration(n=args.calib, shared=args.shared, split="search", **norm)
        float_acc = evaluate(build_model(name, shared=args.shared), test)
        log.info("%s float: %.2f", name, float_acc)
        for bits in args.bits:
            for method in args.methods:
                torch.manual_seed(args.seed)
                model = build_model(name, shared=args.shared)
                t0 = time.perf_counter()
                try:
                    model, steps = quantize_with(method, model, bits, calib, args.iters, args.lr)
                except Exception as e:  # keep the grid going; the log says what failed
                    log.exception("%s W%d %s failed: %s", name, bits, method, e)
                    continue
                seconds = time.perf_counter() - t0
                acc = evaluate(model, test)
                label = METHOD_LABEL[method]
                if method in ("adaround", "brecq") and args.lr != LR_LR:
                    label += f"_lr{args.lr:g}"
                row = dict(model=name, bits=bits, method=label, acc=round(acc, 2),
                           float_acc=round(float_acc, 2),
                           bits_per_weight=round(bits_per_weight(model, bits), 4), steps=steps,
                           calib_images=len(calib), seconds=round(seconds, 1), **meta)
                _append_row(out, row)
                rows.append(row)
                log.info("%s W%d %-10s acc %.2f (float %.2f) bpw %.3f steps %d %.1f s%s", name,
                         bits, method, acc, float_acc, row["bits_per_weight"], steps, seconds,
                         f" (iters/block {args.iters})" if steps else "")
    log.info("total wall-clock %.1f s\n%s", time.perf_counter() - t_all, _table(rows))
    return rows


if __name__ == "__main__":
    main()
