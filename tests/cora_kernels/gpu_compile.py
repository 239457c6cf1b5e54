"""Ahead-of-time compilation of the CoRa kernels for real GPUs (no GPU needed).

Runs the full Triton pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin via ptxas) for a target
``GPUTarget("cuda", cc, 32)`` and reads the resource usage of the cubin with cuobjdump.

It must run with ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` functions cannot
be compiled), so ``test_compile.py`` runs it as a subprocess:
``python tests/cora_kernels/gpu_compile.py JOBS_JSON`` prints one JSON result per job.  Without
arguments it prints a table of every config.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

if __name__ == "__main__":  # run as a script: make the repository importable, never interpret
    import sys

    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cora_kernels import tuning  # noqa: E402
from cora_kernels.conv_depthwise import _cora_conv2d_grouped_kernel  # noqa: E402
from cora_kernels.conv_fused import _cora_conv2d_kernel, _splitk_epilogue_kernel  # noqa: E402
from cora_kernels.dequantize import DEQUANT_BLOCK_K, DEQUANT_BLOCK_N, DEQUANT_WARPS, _dequant_weight_kernel  # noqa: E402

_TRITON_DIR = os.path.dirname(triton.__file__)
CUOBJDUMP = os.path.join(_TRITON_DIR, "backends", "nvidia", "bin", "cuobjdump")

_DT = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


@dataclass
class CompileResult:
    name: str
    cc: int
    reg: int
    stack: int
    shared: int
    ptx_shared: int
    has_mma: bool
    has_wgmma: bool

    def __str__(self):
        mma = "wgmma" if self.has_wgmma else ("mma" if self.has_mma else "NO-MMA")
        return (f"sm_{self.cc} {self.name:<48} REG={self.reg:<4} STACK={self.stack:<4} "
                f"SHARED={self.shared:<6} (dyn {self.ptx_shared}) {mma}")


def _act(act, epilogue: bool) -> int:
    """The kernels' ``ACT``: ``act`` when given, else relu (1) with the epilogue and none (0) without."""
    return (1 if epilogue else 0) if act is None else act


def _act_name(act) -> str:
    return "" if act is None else f" act{act}"


def _compile(fn, signature, constexprs, attrs_names, cc, num_warps, num_stages):
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in attrs_names}
    for k in constexprs:
        signature[k] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    res = {}
    for key in ("REG", "STACK", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", out)
        res[key] = int(m.group(1)) if m else -1
    return res


def compile_conv(cfg: tuning.ConvConfig, *, cc: int, bits: int = 4, dtype: str = "fp16", r_pad: int = 16,
                 split_k: int = 1, aligned: bool = True, epilogue: bool = True, adapter: str = "fp16",
                 act: int | None = None) -> CompileResult:
    """Compile ``_cora_conv2d_kernel`` for one config, specialised like a ResNet layer at run time
    (channels_last activations: unit channel stride; C_in, C_out and strides divisible by 16).
    ``adapter``: ``"fp16"`` adapters, or ``"int8"`` ones with fp32 per-row scales.  ``act``: the
    activation code (``geometry.activation_code``); None: relu with the epilogue, none without."""
    dt = _DT[dtype]
    ad = "i8" if adapter == "int8" else "fp16"
    ptr = {"x_ptr": f"*{dt}", "w0_ptr": "*i32" if bits != 16 else f"*{dt}", "w1_ptr": "*i32" if bits != 16 else f"*{dt}",
           "scale_ptr": "*fp32", "zero_ptr": "*fp32", "a_ptr": f"*{ad}", "b_ptr": f"*{ad}",
           "sa_ptr": "*fp32", "sb_ptr": "*fp32",
           "bias_ptr": "*fp32", "oscale_ptr": "*fp32", "oshift_ptr": "*fp32", "res_ptr": f"*{dt}",
           "out_ptr": f"*{dt}", "ws_ptr": "*fp32"}
    ints = ["M", "C_in", "H", "W", "C_out", "OH", "OW", "KW", "R", "n_cblk", "total_steps", "steps_per_split",
            "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "sxn", "sxh", "sxw", "sar",
            "sbn", "son", "soh", "sow", "srn", "srh", "srw"]
    sig = dict(ptr)
    sig.update({n: "i32" for n in ints})
    consts = dict(sxc=1, sak=1, sbr=1, soc=1, src=1,
                  BITS=bits, ALIGNED=aligned and bits != 16, R_PAD=r_pad, ADAPTER_Q=adapter == "int8",
                  HAS_BIAS=epilogue, HAS_BN=epilogue,
                  HAS_RES=epilogue, ACT=_act(act, epilogue), SPLIT_K=split_k,
                  DOT_PREC="tf32x3" if dtype == "fp32" else "tf32", UPCAST=False,
                  BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)
    div16 = list(ptr) + ["C_in", "C_out", "sxn", "sxh", "sxw", "sbn", "son", "soh", "sow", "srn", "srh", "srw"]
    k = _compile(_cora_conv2d_kernel, sig, consts, div16, cc, cfg.num_warps, cfg.num_stages)
    use = resource_usage(k.asm["cubin"])
    ptx = k.asm["ptx"]
    name = (f"conv {cfg} b{bits} {dtype} r{r_pad} sk{split_k}{'' if aligned else ' gather'}"
            f"{' int8-adapter' if adapter == 'int8' else ''}{_act_name(act)}")
    return CompileResult(name, cc, use["REG"], use["STACK"], use["SHARED"], k.metadata.shared,
                         bool(re.search(r"\bmma\.sync", ptx)), "wgmma" in ptx)


def compile_reduce(*, cc: int, dtype: str = "fp16", act: int | None = None) -> CompileResult:
    dt = _DT[dtype]
    cfg = tuning.REDUCE_CONFIG
    sig = {"ws_ptr": "*fp32", "bias_ptr": "*fp32", "oscale_ptr": "*fp32", "oshift_ptr": "*fp32",
           "res_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
    sig.update({n: "i32" for n in ["M", "C_out", "OH", "OW", "split_k", "son", "soh", "sow", "srn", "srh", "srw"]})
    consts = dict(soc=1, src=1, HAS_BIAS=True, HAS_BN=True, HAS_RES=True, ACT=_act(act, True),
                  UPCAST=False, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N)
    k = _compile(_splitk_epilogue_kernel, sig, consts, ["ws_ptr", "out_ptr", "res_ptr", "C_out"], cc,
                 cfg.num_warps, cfg.num_stages)
    use = resource_usage(k.asm["cubin"])
    return CompileResult(f"splitk_epilogue {dtype}{_act_name(act)}", cc, use["REG"], use["STACK"], use["SHARED"],
                         k.metadata.shared, False, False)


def compile_grouped(cfg: tuning.DepthwiseConfig, *, cc: int, bits: int = 4, dtype: str = "fp16",
                    mode: int = 0, epilogue: bool = True, act: int | None = None) -> CompileResult:
    """Compile ``_cora_conv2d_grouped_kernel`` for one tile config (any kernel size: the tap loop is
    dynamic), specialised like a MobileNet layer at run time (channels_last activations and output:
    unit channel stride; C_out and the strides divisible by 16).  ``mode``: the kernel's ``MODE``, 0
    depthwise, 1 depthwise with a channel multiplier, 2 general grouped (a loop over the group's
    input channels)."""
    dt = _DT[dtype]
    ptr = {"x_ptr": f"*{dt}", "w0_ptr": "*i32", "w1_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16",
           "bias_ptr": "*fp32", "oscale_ptr": "*fp32", "oshift_ptr": "*fp32", "res_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
    ints = ["M", "H", "W", "C_out", "OH", "OW", "CIG", "COG", "KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w",
            "dil_h", "dil_w", "sxn", "sxh", "sxw", "son", "soh", "sow", "srn", "srh", "srw"]
    sig = dict(ptr)
    sig.update({n: "i32" for n in ints})
    consts = dict(sxc=1, soc=1, src=1, BITS=bits, MODE=mode,
                  HAS_BIAS=epilogue, HAS_BN=epilogue, HAS_RES=epilogue, ACT=_act(act, epilogue), UPCAST=False,
                  BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C)
    div16 = list(ptr) + ["C_out", "sxn", "sxh", "sxw", "son", "soh", "sow", "srn", "srh", "srw"]
    kern = _compile(_cora_conv2d_grouped_kernel, sig, consts, div16, cc, cfg.num_warps, 1)
    use = resource_usage(kern.asm["cubin"])
    name = (f"{('depthwise', 'depthwise-mult', 'grouped')[mode]} {cfg} b{bits} {dtype}"
            f"{'' if epilogue else ' no-epilogue'}{_act_name(act)}")
    return CompileResult(name, cc, use["REG"], use["STACK"], use["SHARED"], kern.metadata.shared, False, False)


def compile_dequant(*, cc: int, bits: int = 4, dtype: str = "fp16", r_pad: int = 16, adapter: str = "fp16",
                    bn: bool = True) -> CompileResult:
    """Compile the dequantize strategy's ``_dequant_weight_kernel`` (its one fixed tile): packed codes plus
    the adapter product (a 3xTF32 ``tl.dot``), the folded BatchNorm scale and the effective bias."""
    dt = _DT[dtype]
    ad = "i8" if adapter == "int8" else "fp16"
    ptr = {"w0_ptr": "*i32", "w1_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "a_ptr": f"*{ad}",
           "b_ptr": f"*{ad}", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*fp32", "oscale_ptr": "*fp32",
           "oshift_ptr": "*fp32", "out_w_ptr": f"*{dt}", "out_b_ptr": f"*{dt}"}
    sig = dict(ptr)
    sig.update({n: "i32" for n in ["K", "C_out", "R", "sar", "sbn"]})
    consts = dict(sak=1, sbr=1, BITS=bits, R_PAD=r_pad, ADAPTER_Q=adapter == "int8", HAS_BIAS=True, HAS_BN=bn,
                  WRITE_BIAS=True, UPCAST=False, DOT_PREC="tf32x3", BLOCK_K=DEQUANT_BLOCK_K, BLOCK_N=DEQUANT_BLOCK_N)
    kern = _compile(_dequant_weight_kernel, sig, consts, list(ptr) + ["K", "C_out", "sar", "sbn"], cc, DEQUANT_WARPS, 1)
    use = resource_usage(kern.asm["cubin"])
    name = f"dequant b{bits} {dtype} r{r_pad}{' int8-adapter' if adapter == 'int8' else ''}{'' if bn else ' no-bn'}"
    ptx = kern.asm["ptx"]
    return CompileResult(name, cc, use["REG"], use["STACK"], use["SHARED"], kern.metadata.shared,
                         bool(re.search(r"\bmma\.sync", ptx)), "wgmma" in ptx)


def depthwise_config_named(name: str) -> tuning.DepthwiseConfig:
    return {c.name: c for c in (*tuning.DEPTHWISE_CONFIGS, tuning.DEPTHWISE_INTERPRETER_CONFIG)}[name]


def all_conv_configs():
    return list(tuning.CONV_CONFIGS) + [tuning.FALLBACK_CONFIG]


def run_job(job: dict) -> dict:
    job = dict(job)
    kind = job.pop("kind")
    try:
        if kind == "reduce":
            res = compile_reduce(**job)
        elif kind == "dequant":
            res = compile_dequant(**job)
        elif kind == "grouped":
            res = compile_grouped(depthwise_config_named(job.pop("cfg")), **job)
        else:
            cfg = tuning.config_named(job.pop("cfg"))
            res = compile_conv(cfg, **job)
        return {"ok": True, **res.__dict__}
    except Exception as e:  # report, the test fails with the message
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) > 1:
        for job in json.loads(open(sys.argv[1]).read()):
            print("RESULT " + json.dumps({"job": job, "res": run_job(job)}), flush=True)
    else:
        for cc in (80, 90):
            for cfg in all_conv_configs():
                for bits in (4, 3, 16):
                    print(compile_conv(cfg, cc=cc, bits=bits), flush=True)
            print(compile_reduce(cc=cc), flush=True)
            for cfg in tuning.DEPTHWISE_CONFIGS:
                for bits in (4, 3, 2, 8):
                    print(compile_grouped(cfg, cc=cc, bits=bits), flush=True)
