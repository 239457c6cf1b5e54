"""Epilogue fusion found by tracing: ``CoRaConv2d [-> BatchNorm2d] [-> + residual] [-> activation]``.

:func:`cora.deploy` first rewrites the blocks it knows by type (ResNet blocks and stems, which keeps
their module structure). Whatever else a model computes is found here from its ``torch.fx`` graph,
not from class names, so blocks of any library are fused when their dataflow fits and left alone
otherwise:

* a ``CoRaConv2d`` call whose value goes only to
* an eval-mode ``nn.BatchNorm2d`` of exactly that type (folded into the fp32 epilogue; or timm's
  ``BatchNormAct2d``, whose own activation is then the fused one and ends the chain), then only to
* an addition of one other tensor computed earlier (the residual of a ResNet or inverted-residual
  block; its shape is checked when the layer runs, see :class:`cora.deployed.DeployedConv`), then only to
* one activation the epilogue computes (:data:`ACTIVATION_MODULES` / :data:`ACTIVATION_FUNCTIONS`:
  ReLU, ReLU6, SiLU, Hardswish, exact GELU, Sigmoid and Hardsigmoid, as modules of exactly those types, functions or
  tensor methods),

each step optional, becomes one :class:`~cora.deployed.DeployedConv` call. That is the epilogue's own
order, ``act((conv + adapter + bias) * bn_scale + bn_shift + residual)``; any other order (an
activation before the add, a BatchNorm subclass other than timm's that applies its own activation, a
value used twice, a conv called twice) stops the match there, so nothing is ever fused that the
epilogue would compute differently. Eval-mode identities (``nn.Identity``, dropout, torchvision's
stochastic depth) between the steps are passed over.

Chains of modules alone (no add, module activations) are fused in place: the model keeps its class, the
conv's name holds the :class:`~cora.deployed.DeployedConv` and the BatchNorm's and activation's an
``nn.Identity``. Any other chain needs the forward changed: the result is then a
``torch.fx.GraphModule`` with the same submodule names. A model with nothing to fuse, or that
``torch.fx`` cannot trace (data-dependent control flow), is returned unchanged.
"""
from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .deployed import DeployedBasicBlock, DeployedBottleneck, DeployedConv, DeployedLinear, _foldable
from .modules import CoRaConv2d, QuantLinear

__all__ = ["ACTIVATION_MODULES", "ACTIVATION_FUNCTIONS", "FusionPlan", "fuse_traced", "module_activation"]

# module type (exact) -> the op's activation name
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.GELU: "gelu",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
}
# function or tensor-method name -> the op's activation name
ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu",
    torch.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid",
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid",
}
_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class FusionPlan:
    """One fused conv: ``chain``, the nodes it swallows in execution order (BatchNorm, the add, the activation
    and any eval-mode identities between them), the BatchNorm / add / activation nodes among them (None when
    absent), the residual node and the activation's name."""

    conv: fx.Node
    chain: list[fx.Node] = field(default_factory=list)
    bn: fx.Node | None = None
    add: fx.Node | None = None
    residual: fx.Node | None = None
    act: fx.Node | None = None
    activation: str | None = None

    @property
    def tail(self) -> fx.Node:
        """The node whose value the fused conv computes."""
        return self.chain[-1] if self.chain else self.conv

    @property
    def fuses(self) -> bool:
        return any(n is not None for n in (self.bn, self.add, self.act))


class _Tracer(fx.Tracer):
    """fx's tracer with CoRa's layers and the deployed blocks as leaves (their forwards call the custom op)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaves = (CoRaConv2d, QuantLinear, DeployedConv, DeployedBasicBlock, DeployedBottleneck, DeployedLinear)
        timm_bn = isinstance(m, nn.BatchNorm2d) and type(m).__module__.startswith("timm.")  # a call, not its insides
        return isinstance(m, leaves) or timm_bn or super().is_leaf_module(m, qualname)


def module_activation(m) -> str | None:
    """The op's name for an activation module the epilogue computes exactly (exact types: a subclass's forward
    may differ; GELU only in its exact erf form), else None."""
    name = ACTIVATION_MODULES.get(type(m))
    return None if name == "gelu" and m.approximate != "none" else name


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _activation(node: fx.Node, modules: dict[str, nn.Module], value: fx.Node) -> str | None:
    """The op's name for ``node`` when it is a supported activation applied to ``value`` alone."""
    if node.op == "call_module":
        name = module_activation(modules.get(node.target))
        return name if name and node.args == (value,) and not node.kwargs else None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        name = ACTIVATION_FUNCTIONS[node.target]
        if not node.args or node.args[0] is not value or len(node.args) > 2:
            return None
        extra = dict(node.kwargs)
        if len(node.args) == 2:  # F.relu(x, inplace) / F.gelu(x, approximate) by position
            extra["approximate" if name == "gelu" else "inplace"] = node.args[1]
        if extra.get("approximate", "none") != "none" or set(extra) - {"inplace", "approximate"}:
            return None
        return name
    if node.op == "call_method" and node.target in ACTIVATION_FUNCTIONS and node.args == (value,) and not node.kwargs:
        return ACTIVATION_FUNCTIONS[node.target]
    return None


def _timm_bn_act(m) -> str | None:
    """For timm's ``BatchNormAct2d`` (a BatchNorm2d subclass whose forward is the eval BatchNorm, then ``drop``,
    then ``act``), in eval mode with running statistics, a no-op ``drop`` and an activation the epilogue computes:
    that activation's name ("" for ``nn.Identity``); None for anything else, which is then not folded."""
    t = type(m)
    if t.__name__ != "BatchNormAct2d" or not t.__module__.startswith("timm.") or m.training:
        return None
    if m.running_mean is None or m.running_var is None or set(dict(m.named_children())) != {"drop", "act"}:
        return None
    if not (type(m.drop) is nn.Identity or (isinstance(m.drop, nn.modules.dropout._DropoutNd) and not m.drop.training)):
        return None
    return "" if type(m.act) is nn.Identity else module_activation(m.act)


def _identity(node: fx.Node, modules: dict[str, nn.Module], value: fx.Node) -> bool:
    """Whether ``node`` returns ``value`` unchanged in eval mode: ``nn.Identity``, an eval-mode dropout module,
    torchvision's ``stochastic_depth(value, p, mode, training=False)``."""
    if node.op == "call_module":
        m = modules.get(node.target)
        dropout = isinstance(m, nn.modules.dropout._DropoutNd) and not m.training
        return (type(m) is nn.Identity or dropout) and node.args == (value,) and not node.kwargs
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "stochastic_depth" \
            and getattr(node.target, "__module__", "").startswith("torchvision."):
        args = dict(zip(("input", "p", "mode", "training"), node.args), **node.kwargs)
        return args.get("input") is value and args.get("training", True) is False
    return False


def _residual(node: fx.Node, value: fx.Node, order: dict[fx.Node, int], conv: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``value + other`` (or ``other + value``) with ``other`` a tensor computed
    before ``conv`` (so it exists when the fused conv runs)."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2 or node.kwargs:  # alpha= or out= change the meaning
        return None
    a, b = node.args
    other = b if a is value else a if b is value else None
    if not isinstance(other, fx.Node) or other is value or order.get(other, len(order)) >= order[conv]:
        return None
    if node.op == "call_method" and node.args[0] is not value:  # other.add_(value) would write into other
        return None
    if node.op == "call_function" and node.target is operator.iadd and node.args[0] is not value:
        return None
    return other


def plan_fusions(gm: fx.GraphModule) -> list[FusionPlan]:
    """Every fusable ``CoRaConv2d [-> BN] [-> + residual] [-> act]`` chain of a traced model (see the module
    docstring), in graph order; chains that would fuse nothing beyond the conv are left out."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    calls = _module_calls(gm)
    plans = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) is not CoRaConv2d:
            continue
        if len(node.args) != 1 or node.kwargs or calls[node.target] != 1:  # a shared conv keeps its other uses
            continue
        plan = FusionPlan(conv=node)

        def step():  # the tail's only user, past eval-mode identities (swallowed with the chain)
            nxt = _only_user(plan.tail)
            while nxt is not None and _identity(nxt, modules, plan.tail):
                plan.chain.append(nxt)
                nxt = _only_user(nxt)
            return nxt

        nxt = step()
        mod = modules.get(nxt.target) if nxt is not None and nxt.op == "call_module" else None
        bn_act = _timm_bn_act(mod) if mod is not None else None
        if mod is not None and ((_foldable(mod) and not mod.training) or bn_act is not None) \
                and nxt.args == (plan.tail,) and not nxt.kwargs:
            plan.bn = nxt
            plan.chain.append(nxt)
            if bn_act:  # its activation comes right after its BatchNorm, before any add: the chain ends here
                plan.act, plan.activation = nxt, bn_act
            nxt = None if bn_act else step()
        other = _residual(nxt, plan.tail, order, node) if nxt is not None else None
        if other is not None:
            plan.add, plan.residual = nxt, other
            plan.chain.append(nxt)
            nxt = step()
        name = _activation(nxt, modules, plan.tail) if nxt is not None else None
        if name is not None:
            plan.act, plan.activation = nxt, name
            plan.chain.append(nxt)
        while plan.chain and plan.chain[-1] not in (plan.bn, plan.add, plan.act):
            plan.chain.pop()  # identities after the last fused step stay in the graph
        if plan.fuses:
            plans.append(plan)
    return plans


def _module_calls(gm: fx.GraphModule) -> collections.Counter:
    """How many times the graph calls each submodule (by name)."""
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def _trace(model: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.GraphModule(model, _Tracer().trace(model), class_name=type(model).__name__)
    except Exception:  # data-dependent control flow and the like: the model cannot be fused by tracing
        return None


def _in_place(plan: FusionPlan, calls: collections.Counter) -> bool:
    """Whether the chain can be fused without changing any forward: no residual add, and the conv, BatchNorm and
    activation are modules called once (they become the DeployedConv and two ``nn.Identity``)."""
    nodes = [plan.conv, *plan.chain]
    return plan.add is None and all(n.op == "call_module" and calls[n.target] == 1 for n in nodes)


def fuse_traced(model: nn.Module, stats: dict) -> nn.Module:
    """``model`` with every chain of :func:`plan_fusions` replaced by one :class:`~cora.deployed.DeployedConv`.

    Chains made of modules alone (conv, BatchNorm, activation module; no residual add) are fused in place: the
    conv's name holds the DeployedConv, the BatchNorm's and activation's an ``nn.Identity``, and the model keeps
    its class and forward. When other chains remain (a residual add, a functional activation), the result is a
    ``torch.fx.GraphModule`` (same submodule names, ``cora_*`` attributes copied) whose graph calls the
    DeployedConv with the residual and skips the fused nodes. ``stats`` gets ``traced_fusions`` (chains fused),
    adds the BatchNorms folded to ``folded_bn`` and sets ``traced`` (False when ``torch.fx`` could not trace the
    model, which is then returned unchanged).
    """
    stats.setdefault("traced_fusions", 0)
    gm = _trace(model)
    stats["traced"] = gm is not None
    if gm is None:
        return model
    plans = plan_fusions(gm)
    calls = _module_calls(gm)
    for plan in [p for p in plans if _in_place(p, calls)]:
        bn = model.get_submodule(plan.bn.target) if plan.bn is not None else None
        conv = model.get_submodule(plan.conv.target)
        model.set_submodule(plan.conv.target, DeployedConv(conv, bn, activation=plan.activation))
        for n in plan.chain:
            model.set_submodule(n.target, nn.Identity())
        stats["folded_bn"] += int(bn is not None)
        stats["traced_fusions"] += 1
    if all(_in_place(p, calls) for p in plans):
        return model
    gm = _trace(model)  # the in-place fusions are leaves now; what is left needs the graph
    fused_into: dict[fx.Node, fx.Node] = {}  # an earlier chain's erased tail -> its conv node
    for plan in plan_fusions(gm):
        conv = gm.get_submodule(plan.conv.target)
        bn = gm.get_submodule(plan.bn.target) if plan.bn is not None else None
        deployed = DeployedConv(conv, bn, activation=plan.activation, check_residual=plan.residual is not None)
        gm.set_submodule(plan.conv.target, deployed)
        if plan.residual is not None:
            plan.conv.kwargs = {"residual": fused_into.get(plan.residual, plan.residual)}
        plan.tail.replace_all_uses_with(plan.conv)
        fused_into[plan.tail] = plan.conv
        for n in reversed(plan.chain):  # from the tail back: each node's only user is erased before it
            gm.graph.erase_node(n)
        stats["folded_bn"] += int(bn is not None)
        stats["traced_fusions"] += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    for key, value in vars(model).items():  # the report, architecture, preprocessing a checkpoint carries
        if key.startswith("cora_"):
            setattr(gm, key, value)
    return gm
