"""The model as a chain of stages: the points where a forward pass can be cut and resumed.

Traced with ``torch.fx``, a model's forward is a list of nodes in execution order. A node is a *cut*
when its value is the only one computed so far that any later node still needs (parameters and
buffers read with ``get_attr`` do not count: they can be read again). Between two cuts lies a
*stage*; running the stages one after another, each on the previous stage's output, is the model's
forward pass. A residual block is one stage (its input feeds both branches), a plain chain of
layers is one stage per layer.

This is what makes layer-by-layer work linear in depth: the inputs of a stage are kept for the
calibration images, and a layer's inputs come from running its own stage only, not the whole model
from the images up to the layer (see :class:`cora.statistics.StagedInputs`).

The chain is built from the float model and run on any model with the same module names (the
partly quantized copy, the converted model): modules are looked up by name on the model given to
:meth:`StageChain.run`, so replaced layers are the ones that run. Models ``torch.fx`` cannot trace
(data-dependent control flow), or whose traced forward does not reproduce the model's own output
on a sample, get no chain (``None``); callers then fall back to full forward passes.

The value at a cut is a tensor, or a (nested) tuple / list / dict of tensors: a channel split
(ShuffleNet's ``chunk``) or a block with several outputs. Every tensor in it is batch-major, so the
value of a batch of images is cut into smaller batches, and batches are put together again, leaf by
leaf (:func:`map_tensors`, :func:`tensors_of`, :func:`batch_len`, :func:`cat_values`); a cut whose
value is anything else (a leaf that is no tensor, or a tensor without the batch as its first
dimension) is not used: its two stages run as one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ._modules_util import kept_modes

__all__ = ["StageChain", "trace_stages", "map_tensors", "tensors_of", "batch_len", "cat_values"]


def map_tensors(fn, value):
    """``value`` with ``fn`` applied to every tensor in it: a tensor, or tuples (named ones included),
    lists and dicts of them, nested; any other leaf is passed through as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(map_tensors(fn, v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, map_tensors(fn, v)) for k, v in value.items())
    return value


def tensors_of(value) -> list:
    """The leaves of ``value`` (see :func:`map_tensors`) in order, tensors and others alike."""
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in tensors_of(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in tensors_of(v)]
    return [value]


def batch_len(value) -> int:
    """The batch size of a stage value: the first dimension of its first tensor."""
    return next(t for t in tensors_of(value) if isinstance(t, torch.Tensor)).shape[0]


def cat_values(values: list):
    """Stage values of consecutive batches (all alike in structure) as the value of the whole batch:
    ``torch.cat`` along the first dimension, leaf by leaf (any other leaf is taken from the first)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(cat_values([v[i] for v in values]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(cat_values([v[i] for v in values]) for i in range(len(first)))
    if isinstance(first, dict):
        return type(first)((k, cat_values([v[k] for v in values])) for k in first)
    return first


def _batched(value, n: int) -> bool:
    """Whether every leaf of ``value`` is a tensor with ``n`` (the batch) as its first dimension."""
    leaves = tensors_of(value)
    return bool(leaves) and all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n for t in leaves)


class _LeafTracer(fx.Tracer):
    """fx's default tracer, plus the named layers as leaves (a ``Linear`` subclass from another
    library would otherwise be traced through, and its hooks would never fire)."""

    def __init__(self, leaves: set[nn.Module]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, qualname)


@dataclass
class StageChain:
    """A traced forward pass split at its cuts.

    ``stages[k]`` are the nodes stage ``k`` evaluates (in order; its last node is the value passed
    on, for the last stage the model's output node); ``inputs[k]`` the node whose value the stage
    starts from (the model's input for stage 0). ``layer_stage`` maps each layer name to the stage
    that calls it.
    """

    graph: fx.Graph
    stages: list[list[fx.Node]]
    inputs: list[fx.Node]
    layer_stage: dict[str, int]

    def __len__(self) -> int:
        return len(self.stages)

    def run(self, model: nn.Module, k: int, x):
        """The value stage ``k`` passes on, computed by ``model``'s modules from ``x`` (the value of
        ``inputs[k]``); for the last stage, the model's output. ``x`` is not modified (a stage may
        start with an in-place op, so it gets a copy)."""
        interp = fx.Interpreter(model, garbage_collect_values=False, graph=self.graph)
        interp.env = {self.inputs[k]: map_tensors(torch.Tensor.clone, x)}
        value = None
        for node in self.stages[k]:
            for arg in node.all_input_nodes:  # parameters / buffers read from an earlier stage
                if arg not in interp.env and arg.op == "get_attr":
                    interp.env[arg] = interp.run_node(arg)
            if node.op == "output":
                value = interp.fetch_args_kwargs_from_env(node)[0][0]
            else:
                value = interp.env[node] = interp.run_node(node)
        return value

    def forward(self, model: nn.Module, x):
        """The whole forward pass, stage by stage (what :func:`trace_stages` checks against the model)."""
        for k in range(len(self.stages)):
            x = self.run(model, k, x)
        return x


def _cuts(nodes: list[fx.Node]) -> list[int]:
    """Indices of the nodes after which only that node's value is still needed."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    cuts, live = [], set()
    for i, n in enumerate(nodes[:-1]):  # the output node ends the last stage
        if n.op != "get_attr":
            live.add(n)
        live = {m for m in live if last_use[m] > i}
        if live == {n}:
            cuts.append(i)
    return cuts


def trace_stages(model: nn.Module, layer_names: list[str], sample: torch.Tensor) -> StageChain | None:
    """The stage chain of ``model`` (eval mode), or ``None`` when it cannot be built exactly.

    ``layer_names``: the layers the chain must locate (each must be called by exactly one node).
    ``sample``: a small input batch ``[n, C, H, W]``; the chain is used only if running it stage by
    stage gives exactly the model's own output on it.
    """
    leaves = {model.get_submodule(n) for n in layer_names}
    try:
        graph = _LeafTracer(leaves).trace(model)
    except Exception:  # any tracing failure (control flow on values, unsupported ops): no chain
        return None
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or nodes[-1].op != "output":
        return None
    calls: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    if any(calls.get(name, 0) > 1 for name in layer_names):
        return None  # a layer called twice has two inputs; the full-pass path handles it
    bounds = [index for index in _cuts(nodes) if index >= nodes.index(placeholders[0])]
    starts = [nodes.index(placeholders[0])] + bounds
    ends = bounds + [len(nodes) - 1]
    wanted = set(layer_names)
    stages, inputs, layer_stage = [], [], {}
    for s, e in zip(starts, ends):
        stage = [n for n in nodes[s + 1 : e + 1] if n.op != "placeholder"]
        if not stage:
            continue
        inputs.append(nodes[s])
        stages.append(stage)
        for n in stage:
            if n.op == "call_module" and n.target in wanted:
                layer_stage[n.target] = len(stages) - 1
    chain = StageChain(graph, stages, inputs, layer_stage)
    try:
        with torch.no_grad(), kept_modes(model, train=False):
            chain = _batched_cuts(chain, model, sample)
            same = _same(chain.forward(model, sample), model(sample))
    except Exception:
        return None
    return chain if same else None


def _batched_cuts(chain: StageChain, model: nn.Module, sample: torch.Tensor) -> StageChain:
    """``chain`` with every stage whose value on ``sample`` is not batch-major (:func:`_batched`) run
    together with the stage after it, so that the value at each cut can be cut into batches and put
    together again. The same chain when every cut is (a ResNet's, whose cuts are tensors)."""
    stages, inputs, x = [list(chain.stages[0])], [chain.inputs[0]], sample
    for k in range(len(chain) - 1):
        x = chain.run(model, k, x)
        if _batched(x, sample.shape[0]):
            stages.append(list(chain.stages[k + 1]))
            inputs.append(chain.inputs[k + 1])
        else:
            stages[-1] += chain.stages[k + 1]
    if len(stages) == len(chain):
        return chain
    layer_stage = {n.target: k for k, stage in enumerate(stages) for n in stage
                   if n.op == "call_module" and n.target in chain.layer_stage}
    return StageChain(chain.graph, stages, inputs, layer_stage)


def _same(a, b) -> bool:
    """Exact equality of two outputs (tensors, or tuples / lists / dicts of them)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
