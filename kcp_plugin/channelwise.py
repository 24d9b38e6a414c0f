"""Per-channel tensors torch-pruning does not know about, pruned with the channels they follow.

Two kinds of layer otherwise make part of a net silently unprunable (a channel group whose
pruned forward fails is protected, so nothing is pruned there and nothing says why):

* **frozen norms**: torchvision's ``FrozenBatchNorm2d``, transformers' ``DetrFrozenBatchNorm2d``
  and their kind keep ``weight`` / ``bias`` / ``running_mean`` / ``running_var`` as *buffers*;
  torch-pruning treats the module as an element-wise operation and never slices them. Any leaf
  module of a type torch-pruning has no pruner for, all of whose tensors (parameters and
  buffers) are one-dimensional of one length ``C``, is pruned here like a BatchNorm
  (:class:`ChannelwisePruner`, registered per type by :func:`channelwise_pruners`);
* **per-channel parameters a layer owns**: timm's weight-standardized ``ScaledStdConv2d`` keeps a
  ``gain`` of shape ``[C_out, 1, 1, 1]`` beside its weight; torch-pruning's conv pruner slices
  the weight and bias only. :func:`companions` names such tensors (any parameter or buffer of a
  conv / linear layer, other than weight and bias, with one value per output channel) and
  :func:`prune_companions` slices them; the plugin's DepGraph group calls it after every
  prune, so replaying a plan does the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

__all__ = ["ChannelwisePruner", "channelwise_pruners", "companions", "prune_companions",
           "out_channels"]

_COUNT_ATTRS = ("num_features", "num_channels")


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in (*module._parameters.items(), *module._buffers.items())
            if t is not None]


def _is_channelwise(module: nn.Module) -> bool:
    """A leaf of a type torch-pruning has no pruner for, whose tensors are all 1-D of one
    length (at least 2)."""
    if next(module.children(), None) is not None:
        return False
    if ops.module2type(module) != ops.OPTYPE.ELEMENTWISE:
        return False
    tensors = _tensors(module)
    sizes = {tuple(t.shape) for _, t in tensors}
    return bool(tensors) and len(sizes) == 1 and len(next(iter(sizes))) == 1 \
        and next(iter(sizes))[0] > 1


class ChannelwisePruner(tp.pruner.BasePruningFunc):
    """Prunes every 1-D tensor of a per-channel module (a frozen norm) like a BatchNorm: the
    same indices in and out."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        size = self.get_out_channels(layer)
        keep = sorted(set(range(size)) - {int(i) for i in idxs})
        for name, tensor in list(layer._parameters.items()):
            if tensor is not None:
                setattr(layer, name, self._prune_parameter_and_grad(tensor, keep, 0))
        for name, tensor in list(layer._buffers.items()):
            if tensor is not None:
                layer._buffers[name] = tensor[keep]
        for attr in _COUNT_ATTRS:
            if getattr(layer, attr, None) == size:
                setattr(layer, attr, len(keep))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(_tensors(layer)[0][1].shape[0])

    get_in_channels = get_out_channels


def channelwise_pruners(model: nn.Module) -> dict[type, tp.pruner.BasePruningFunc]:
    """``{type: ChannelwisePruner()}`` for the per-channel module types of ``model`` (every
    instance of the type must qualify: torch-pruning looks pruners up by type)."""
    verdict: dict[type, bool] = {}
    for module in model.modules():
        kind = type(module)
        if ops.module2type(module) != ops.OPTYPE.ELEMENTWISE or kind.__module__.startswith(
                "torch.nn."):
            continue
        if next(module.children(), None) is not None or not _tensors(module):
            continue
        verdict[kind] = verdict.get(kind, True) and _is_channelwise(module)
    pruner = ChannelwisePruner()
    return {kind: pruner for kind, ok in verdict.items() if ok}


def out_channels(module: nn.Module) -> int | None:
    """Output channels of a conv / linear layer (None for other layers)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def companions(module: nn.Module) -> list[str]:
    """Names of a conv / linear layer's tensors besides weight and bias that hold one value per
    output channel (``[C_out]``, ``[C_out, 1, 1, 1]``...): timm's ``ScaledStdConv2d.gain``."""
    c = out_channels(module)
    if c is None or c < 2:
        return []
    return [n for n, t in _tensors(module) if n not in ("weight", "bias")
            and t.dim() >= 1 and t.shape[0] == c and t.numel() == c]


def prune_companions(module: nn.Module, names: list[str], size: int,
                     idxs: Sequence[int]) -> None:
    """Slice ``module``'s companion tensors ``names`` (``size`` channels before the prune) to
    the channels left after ``idxs`` were removed; parameters keep their lineage."""
    keep = sorted(set(range(size)) - {int(i) for i in idxs})
    helper = ChannelwisePruner()
    for name in names:
        tensor = getattr(module, name)
        if tensor.shape[0] != size:
            continue
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, helper._prune_parameter_and_grad(tensor, keep, 0))
        else:
            module._buffers[name] = tensor[keep]


def group_companions(group: Any, out_fn: Any) -> list[tuple[nn.Module, list[str], int, list]]:
    """The companion tensors a DepGraph group's out-channel members carry, with each layer's
    channel count before the prune and the indices it loses (``out_fn(handler)`` tells an
    out-channel pruning function)."""
    found = []
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, nn.Module) and out_fn(dep.handler):
            names = companions(module)
            if names:
                found.append((module, names, out_channels(module), list(idxs)))
    return found
