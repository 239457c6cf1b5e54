"""The scratch buffer of the dequantize strategy: one per (device, host thread), shared by the layers.

The *dequantize then vendor conv* strategy (:mod:`cora_kernels.dequantize`) writes a layer's effective
weight ``Q(W) + B·A`` (BatchNorm scale folded in) in the activation dtype, then calls ``F.conv2d`` on it.
That weight lives only until the conv has read it, so every layer of a model can use the same bytes:
memory stays near the packed size plus the largest layer's dense weight, not a dense copy per layer.

Why this is safe:

* layers that share a buffer run one after the other on one CUDA stream, so the next layer's
  dequantization is ordered after the previous layer's conv by the stream itself;
* when the same thread goes on with another stream (PyTorch's CUDA-graph recipe warms up on a side
  stream, then captures on the graph's own stream), the new stream first waits for the last one that used
  the buffer (``wait_stream``; not during a capture, which starts from a synchronised device);
* host threads get buffers of their own (two threads that issue work to one stream could otherwise
  interleave one layer's dequantization between another's dequantization and conv);
* inside one CUDA graph the layers are recorded, and replayed, in order: the graph keeps the buffer's
  address, so a buffer that a capture used is never freed while the process lives (it is retired, not
  released, when a larger layer needs a bigger one).  Growing during a capture is refused: warm up
  (run the model once) before capturing, which :func:`cora.warmup` does.

:func:`scratch_bytes` reports what is held (``cora.weight_bytes`` and the end-to-end benchmark count
it beside the packed weights); :func:`release_scratch` drops the buffers no capture has used.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["scratch_tensor", "scratch_bytes", "release_scratch"]

_ALIGN = 256  # bytes: every view starts on an aligned address (the buffer's start is aligned by the allocator)


class _Slot:
    __slots__ = ("buf", "captured", "stream")

    def __init__(self, buf: torch.Tensor, stream=None):
        self.buf = buf
        self.captured = False
        self.stream = stream  # the CUDA stream that used the buffer last


_SLOTS: dict[tuple, _Slot] = {}
_RETIRED: list[torch.Tensor] = []  # buffers a CUDA graph may still address: kept for the process's life
_LOCK = threading.Lock()


def _key(device: torch.device) -> tuple:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ("cuda", index, threading.get_ident())
    return (device.type, device.index, threading.get_ident())


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def scratch_tensor(shapes: list[tuple[int, ...]], dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Contiguous tensors of ``shapes`` in ``dtype`` on ``device``, views of this thread's and stream's
    scratch buffer (valid until the next call from the same thread and stream).

    The buffer grows to the largest request seen.  During a CUDA-graph capture a request that does
    not fit raises RuntimeError (run the model once before capturing).
    """
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = [int(torch.Size(s).numel()) * elem for s in shapes]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    key = _key(device)
    capturing = _capturing(device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    with _LOCK:
        slot = _SLOTS.get(key)
        if slot is None or slot.buf.numel() < total:
            if capturing:
                raise RuntimeError(
                    "cora: the dequantize strategy's scratch buffer must grow during a CUDA-graph capture; "
                    "run the model once before capturing (cora.warmup does)")
            if slot is not None and slot.captured:
                _RETIRED.append(slot.buf)
            old_stream = slot.stream if slot is not None else None
            slot = _SLOTS[key] = _Slot(torch.empty(total, dtype=torch.uint8, device=device), old_stream)
        if stream is not None and slot.stream is not None and slot.stream != stream and not capturing:
            stream.wait_stream(slot.stream)  # the last user's conv may still be reading the buffer
        slot.stream = stream
        if capturing:
            slot.captured = True
        buf = slot.buf
    return [buf[o:o + n].view(dtype).view(s) for o, n, s in zip(offsets, sizes, shapes)]


def scratch_bytes(device=None) -> int:
    """Bytes held by scratch buffers (all devices, or those on ``device``), retired ones included."""
    want = None if device is None else torch.device(device)

    def on(t: torch.Tensor) -> bool:
        return want is None or (t.device.type == want.type and (want.index is None or t.device.index == want.index))

    with _LOCK:
        held = [s.buf for s in _SLOTS.values()] + _RETIRED
        return sum(t.numel() for t in held if on(t))


def release_scratch() -> None:
    """Drop every scratch buffer that no CUDA-graph capture has used (they are allocated again on demand)."""
    with _LOCK:
        for key in [k for k, s in _SLOTS.items() if not s.captured]:
            del _SLOTS[key]
