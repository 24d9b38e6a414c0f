"""Which of the teacher's channels a pruned student's feature holds.

A student made by pruning the teacher keeps a subset of each layer's channels. Comparing its
feature with the teacher's *kept* channels needs no adapter: the teacher's map, indexed by the
kept channels, is what the student's channel ``i`` was before the prune. The kept indices come
from the student's pruning plan (:mod:`kcp_plugin.plan`), so they survive save / resume: the plan
is replayed on a copy of the teacher whose channel-owning parameter holds each channel's own
index, and the indices left are read back.

A feature layer is a module whose output channels a parameter owns (conv, transposed conv,
linear, norm layers); a container (a residual block, a stage) is compared at the last such layer
executed inside it whose output has the container's shape, found by one traced forward (for a
residual block, its last norm: the sum it returns shares that norm's channel indices).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..graph import ForwardFn, default_forward
from ..hints import did_you_mean
from ..nested import map_tensors
from ..plan import apply_plan, get_plan

__all__ = ["FeatureLayer", "resolve_feature_layers", "kept_channels", "channel_axis", "owner_dim",
           "layer_hint"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class FeatureLayer:
    """A distilled layer: ``name`` (what the user named: its output is compared) and ``owner``
    (the layer inside it whose parameter owns the output channels)."""

    name: str
    owner: str


def owner_dim(module: nn.Module) -> int | None:
    """Dimension of ``module.weight`` indexing its output channels, or None if it has none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1 if module.groups == 1 else None
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return 0
    if isinstance(module, _NORMS) and weight.dim() == 1:
        return 0
    return None


def channel_axis(module: nn.Module, feature: torch.Tensor) -> int:
    """Axis of ``feature`` (the output of ``module``'s owner) holding channels: 1 for maps,
    the last one for linear layers and layer norms (tokens ``[N, L, C]``)."""
    if isinstance(module, (nn.Linear, nn.LayerNorm)) or feature.dim() == 2:
        return feature.dim() - 1
    return 1


def layer_hint(name: str, modules: Any) -> str:
    """Close matches among ``modules``' qualified names, those ending in ``.name`` first
    (``layer3`` -> ``backbone.layer3``): layers are named as ``model.named_modules()`` names
    them."""
    names = [n for n in modules if n]
    ending = [n for n in names if n.endswith("." + name)][:3]
    close = [n for n in did_you_mean(name, names, otherwise="").removeprefix(
        "; close matches: ").split(", ") if n and n not in ending]
    hints = ending + close
    return ("; close matches: " + ", ".join(hints[:3]) if hints else "") + \
        " (names as model.named_modules() gives them)"


def resolve_feature_layers(model: nn.Module, names: Iterable[str], example_inputs: Any,
                           forward_fn: ForwardFn | None = None,
                           role: str = "teacher") -> list[FeatureLayer]:
    """Each named layer with the layer that owns its output channels.

    Raises:
        ValueError: a name the model does not have (with close matches), or a layer whose
            output channels no parameter owns (an activation, a container ending in a concat):
            distil it through ``adapter=True``, or name a layer inside it.
    """
    modules = dict(model.named_modules())
    names = list(names)
    for name in names:
        if name not in modules:
            raise ValueError(f"distillation layer {name!r} does not exist in the {role}"
                             f"{layer_hint(name, modules)}")
    out, pending = [], []
    for name in names:
        if owner_dim(modules[name]) is not None:
            out.append(FeatureLayer(name, name))
        else:
            pending.append(name)
            out.append(None)
    if pending:
        owners = _trace_owners(model, pending, example_inputs, forward_fn or default_forward)
        for i, name in enumerate(names):
            if out[i] is None:
                if owners.get(name) is None:
                    raise ValueError(
                        f"distillation layer {name!r} ({type(modules[name]).__name__}): no "
                        "layer inside it owns its output channels (its output is not the shape "
                        "of a conv / linear / norm output it runs), so the teacher's kept "
                        "channels are unknown there; name a conv or norm layer, or set "
                        "adapter=True to compare through a learned 1x1 adapter")
                out[i] = FeatureLayer(name, owners[name])
    return out


@torch.no_grad()
def _trace_owners(model: nn.Module, names: list[str], example_inputs: Any,
                  forward_fn: ForwardFn) -> dict[str, str | None]:
    modules = dict(model.named_modules())
    seen: list[tuple[str, tuple[int, ...]]] = []  # channel owners in execution order
    outputs: dict[str, tuple[int, ...]] = {}
    handles = []

    def leaf_hook(name: str):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                seen.append((name, tuple(out.shape)))
        return hook

    def container_hook(name: str):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outputs[name] = (len(seen), tuple(out.shape))
        return hook

    for name in names:
        prefix = f"{name}." if name else ""
        for sub, m in modules.items():
            if sub.startswith(prefix) and sub != name and owner_dim(m) is not None:
                handles.append(m.register_forward_hook(leaf_hook(sub)))
        handles.append(modules[name].register_forward_hook(container_hook(name)))
    was = model.training
    model.eval()
    try:
        forward_fn(model, example_inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    owners: dict[str, str | None] = {}
    for name in names:
        owners[name] = None
        if name not in outputs:
            continue
        end, shape = outputs[name]
        prefix = f"{name}." if name else ""
        for sub, sub_shape in reversed(seen[:end]):
            if sub.startswith(prefix) and sub_shape == shape:
                owners[name] = sub
                break
    return owners


def kept_channels(teacher: nn.Module, student: nn.Module, owners: Iterable[str],
                  example_inputs: Any, forward_fn: ForwardFn | None = None
                  ) -> dict[str, torch.Tensor]:
    """The teacher's channel indices each owner layer of ``student`` still holds, in order.

    The student's plan must extend the teacher's (the teacher is the model before the prunes
    the student went through). Returns ``{owner: LongTensor [C_student]}``.

    Raises:
        ValueError: the student's plan does not start with the teacher's (not pruned from
            it), or the replay does not reproduce the student's widths.
    """
    owners = list(dict.fromkeys(owners))
    t_plan, s_plan = get_plan(teacher), get_plan(student)
    n = len(t_plan["history"])
    if s_plan["history"][:n] != t_plan["history"]:
        raise ValueError("the student was not pruned from this teacher: its pruning plan does "
                         "not start with the teacher's")
    t_modules = dict(teacher.named_modules())
    if len(s_plan["history"]) == n:
        return {o: torch.arange(t_modules[o].weight.shape[owner_dim(t_modules[o])])
                for o in owners}
    probe = copy.deepcopy(teacher)
    for m in probe.modules():  # a frozen teacher's parameters: the graph traces autograd
        m._forward_hooks.clear()
    probe.requires_grad_(True)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in probe.parameters()):
        # channel indices above 256 are not exact in half precision
        probe.float()
        example_inputs = map_tensors(
            example_inputs, lambda t: t.float() if t.is_floating_point() else t)
    p_modules = dict(probe.named_modules())
    with torch.no_grad():
        for o in owners:
            weight, dim = p_modules[o].weight, owner_dim(p_modules[o])
            shape = [1] * weight.dim()
            shape[dim] = weight.shape[dim]
            index = torch.arange(weight.shape[dim], dtype=weight.dtype, device=weight.device)
            weight.copy_(index.reshape(shape).expand_as(weight))
    suffix = dict(s_plan, history=s_plan["history"][n:])
    apply_plan(probe, suffix, example_inputs, forward_fn)
    s_modules = dict(student.named_modules())
    out = {}
    for o in owners:
        weight, dim = p_modules[o].weight, owner_dim(p_modules[o])
        idx = weight.detach().movedim(dim, 0).reshape(weight.shape[dim], -1)[:, 0]
        idx = idx.round().long().cpu()
        width = s_modules[o].weight.shape[dim]
        if len(idx) != width:
            raise ValueError(f"replaying the student's plan on the teacher gives {o!r} "
                             f"{len(idx)} channels, the student has {width}")
        out[o] = idx
    return out
