"""The model behind ``cora serve``: load, deploy, warm up, predict (no Ray here).

:class:`InferenceEngine` holds one deployed model on one device and answers batches of
preprocessed images with their top-k classes. Batches are padded to a fixed set of sizes, the
*buckets* (powers of two up to ``max_batch``, plus ``max_batch``), so that on CUDA one CUDA graph
per bucket can be captured once and replayed for every request: no autotuning, allocation or
Python-level launch overhead per batch. On the CPU the same buckets are used (no graphs), which
keeps the padding logic the same everywhere and testable without a GPU.

A checkpoint is deployed with ``deploy_weights`` (``deploy(weights=...)``, :data:`cora.deploy.WEIGHTS`):
``"auto"`` (default) is dense weights on the CPU (one ``F.conv2d`` per conv on effective weights computed
once) and packed codes on CUDA (the fused kernels); ``"dense"`` / ``"packed"`` force one
(``cora serve --deploy-weights``).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["InferenceEngine", "batch_buckets", "bucket_for", "resolve_device", "DTYPES"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes: 1, 2, 4, ... up to ``max_batch``, plus ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``n`` images."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} images are more than the largest batch ({buckets[-1]})")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cuda`` or ``cpu`` as a ``torch.device``;
    ``ValueError`` for cuda without a usable GPU or another device type. The CLI uses it too."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available to torch here")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device}")
    return device


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32  # fp16 where the kernels are fast
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class InferenceEngine:
    """A deployed classifier: ``predict(images [n, 3, S, S] float32 CPU) -> top-k per image``.

    Build it with :meth:`from_checkpoint` (a cora checkpoint with a preprocessing record) or
    :meth:`from_float` (the float peer, by model name). Call :meth:`warm_up` once before serving.
    ``predict`` may be called from any thread; calls are serialised (one model, one set of CUDA
    graphs and static buffers).
    """

    def __init__(self, model: nn.Module, preprocessing: dict, *, info: dict, device="auto", dtype=None,
                 max_batch: int = 32) -> None:
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.buckets = batch_buckets(int(max_batch))
        self.max_batch = self.buckets[-1]
        self.preprocessing = preprocessing
        size = int(preprocessing["image_size"])
        self.input_shape = (3, size, size)
        # channels_last suits the CUDA kernels' NHWC tiles; the CPU reference path prefers NCHW
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self._info = dict(info)
        if info.get("float"):
            self.model = model.to(self.device, self.dtype, memory_format=self.memory_format).eval()
        else:  # the deployed op takes fp16/bf16/fp32 inputs; its buffers keep their stored dtypes (fp32 epilogue)
            self.model = model.to(self.device).eval()
        self.class_names = preprocessing.get("class_names")
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.ready = False
        self.warmup_seconds: float | None = None

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_checkpoint(cls, path: str | Path, *, deploy_weights: str = "auto", **kwargs) -> InferenceEngine:
        """Load a cora checkpoint (digest verified, architecture rebuilt) and deploy it with
        ``deploy_weights`` (``"auto"``: dense on the CPU, packed on CUDA; see the module docstring).

        Raises ``ValueError`` for a checkpoint without a preprocessing record (it cannot say how an
        image becomes its input) or a bad ``deploy_weights``, :class:`cora.CheckpointError` for a damaged one.
        """
        from .checkpoint import load, read_metadata
        from .deploy import WEIGHTS, deploy

        if deploy_weights not in WEIGHTS:
            raise ValueError(f"deploy_weights must be one of {', '.join(WEIGHTS)}, got {deploy_weights!r}")
        device = resolve_device(kwargs.get("device", "auto"))
        meta = read_metadata(path)
        pre = meta.get("preprocessing")
        if pre is None:
            raise ValueError(f"{path} records no preprocessing (image size, mean/std): re-save it with "
                             f"cora.save(model, path, preprocessing=...) to serve it")
        model = load(path)
        report = meta.get("report") or {}
        arch = meta.get("architecture") or {}
        info = {
            "architecture": arch.get("name"),
            "float": False,
            "bits": report.get("bits"),
            "adapter_fraction": report.get("adapter_fraction"),
            "equiv_bits": report.get("equiv_bits"),
            "checkpoint": str(path),
            "checkpoint_sha256": meta.get("cora_sha256"),
            # measured when it was quantized (cora quantize --out records it; null when the file has none)
            "accuracy": meta.get("evaluation"),
        }
        # the checkpoint loads on the CPU: "auto" is decided by the serving device, not by where it loaded
        model = deploy(model, weights="packed" if deploy_weights == "auto" and device.type != "cpu" else deploy_weights)
        info["weights"] = model.cora_deploy["weights"]
        return cls(model, pre, info=info, **kwargs)

    @classmethod
    def from_float(cls, name: str, weights=None, shared=None, **kwargs) -> InferenceEngine:
        """The float model ``name`` (what one would serve without cora), with its own preprocessing."""
        from .zoo import load_float_model, preprocessing_for

        model = load_float_model(name, weights, shared)
        info = {"architecture": name, "float": True, "bits": None, "adapter_fraction": None, "equiv_bits": None,
                "checkpoint": None, "checkpoint_sha256": None, "accuracy": None, "weights": None}
        return cls(model, preprocessing_for(name), info=info, **kwargs)

    # ------------------------------------------------------------------------------ warm-up
    def warm_up(self) -> float:
        """Prepare every bucket; returns the seconds it took. Sets ``ready``.

        CUDA: ``cora.warmup`` on every bucket first (kernel autotuning launches, times and
        synchronises, which must not happen inside a capture; bounded by ``CORA_TUNE_SECONDS``), then one
        CUDA graph per bucket over a static input buffer, the largest bucket first, all in one graph
        memory pool (the smaller graphs reuse the largest one's activation memory: they never replay at
        the same time). CPU: one plain forward per bucket.
        """
        from .deploy import warmup

        t0 = time.perf_counter()
        with self._lock:
            warmup(self.model, self.buckets, self.input_shape, self.device, self.dtype, memory_format=self.memory_format)
            if self.device.type == "cuda":
                pool = torch.cuda.graph_pool_handle()
                for b in sorted(self.buckets, reverse=True):
                    self._graphs[b] = self._capture(b, pool)
        self.warmup_seconds = time.perf_counter() - t0
        self.ready = True
        return self.warmup_seconds

    def _capture(self, batch: int, pool=None):
        """One CUDA graph for ``batch`` images, in the graph memory pool ``pool`` (None: its own):
        ``(graph, static input, static logits)``."""
        static_in = torch.zeros(batch, *self.input_shape, device=self.device, dtype=self.dtype)
        static_in = static_in.contiguous(memory_format=self.memory_format)
        # PyTorch's recipe: a few eager iterations on a side stream before capturing, so that lazy
        # initialisation (cuBLAS handles, allocator pools) does not happen inside the capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                self.model(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), torch.no_grad():
            static_out = self.model(static_in)
        torch.cuda.synchronize(self.device)
        return graph, static_in, static_out

    # ------------------------------------------------------------------------------ serving
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[n, classes]`` (CPU) of float32 images ``[n, 3, S, S]``, 1 <= n <= max_batch.

        The batch is padded with zeros to its bucket; the padding rows are dropped.
        """
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"images must be [n, {', '.join(map(str, self.input_shape))}], got {list(images.shape)}")
        n = images.shape[0]
        b = bucket_for(n, self.buckets)
        with self._lock, torch.no_grad():
            if b in self._graphs:
                graph, static_in, static_out = self._graphs[b]
                static_in.zero_()  # padding rows: zeros, never a previous batch's images
                static_in[:n].copy_(images, non_blocking=True)
                graph.replay()
                out = static_out[:n].float().cpu()  # a copy: the next replay overwrites static_out
            else:
                x = torch.zeros(b, *self.input_shape, dtype=self.dtype, device=self.device)
                x[:n] = images.to(self.device, self.dtype)
                out = self.model(x.contiguous(memory_format=self.memory_format))[:n].float().cpu()
        return out

    def predict(self, images: torch.Tensor, top_k: int = 5) -> list[list[tuple[int, float]]]:
        """Top-k ``(class index, probability)`` per image, most probable first (softmax in float32)."""
        probs = torch.softmax(self.logits(images), dim=1)
        k = max(1, min(int(top_k), probs.shape[1]))
        p, idx = probs.topk(k, dim=1)
        return [list(zip(i.tolist(), q.tolist())) for i, q in zip(idx, p)]

    def label(self, index: int) -> str | None:
        names = self.class_names
        return names[index] if names is not None and 0 <= index < len(names) else None

    def info(self) -> dict:
        """What ``GET /v1/models`` shows: the model (architecture, bits, adapter fraction, equivalent
        bits, checkpoint digest, recorded accuracy or None, float or not) and how it runs here (device,
        dtype, buckets, CUDA graphs, ``weights``: ``"dense"`` or ``"packed"``, None for a float model)."""
        return {**self._info, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "batch_buckets": list(self.buckets), "image_size": self.input_shape[1],
                "num_classes": len(self.class_names) if self.class_names else None,
                "cuda_graphs": bool(self._graphs), "ready": self.ready, "warmup_seconds": self.warmup_seconds}
