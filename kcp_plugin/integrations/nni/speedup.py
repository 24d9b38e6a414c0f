"""Turn NNI masks into a physically smaller model through torch-pruning's dependency graph.

NNI 3.0's ``ModelSpeedup`` crashes on torch 2.14 inside its own tracer
(``AttributeError: 'NoneType' object has no attribute 'startswith'``), and where it runs (with an
fx-traced graph) it unions the masks of residual-coupled layers, so it under-prunes. This module
replaces it: each mask is read as a set of masked output channels, the channels are gathered per
coupled group of torch-pruning's dependency graph, and each group is pruned once, which also
trims every consumer's input channels. The prune is recorded in the model's pruning plan
(:mod:`kcp_plugin.plan`), so :func:`kcp_plugin.save_pruned` / :func:`kcp_plugin.load_pruned`
work on the result, and parameter lineage is tracked for :func:`kcp_plugin.rebuild_optimizer`.
It needs only torch and torch-pruning (not NNI).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ...attention import detect_num_heads
from ...graph import (
    ForwardFn,
    check_runs,
    checked_graph,
    count_macs_params,
    default_forward,
    output_layers,
)
from ...hints import did_you_mean
from ...plan import extend_plan
from ...report import SizeReport, layer_widths
from ...safety import UnprunableError, output_signature, unsafe_layers, verify_outputs
from ...snapshot import ModuleSnapshot
from ...tracking import track_pruning
from .groups import coupled_groups, masked_channels, removal_from_masks

__all__ = ["POLICIES", "SpeedupReport", "apply_masks", "speedup"]

logger = logging.getLogger(__name__)

POLICIES = ("all", "any")
Masks = dict[str, dict[str, Any]]


@dataclass
class SpeedupReport(SizeReport):
    """What :func:`speedup` did.

    Attributes:
        removed: Group root layer -> number of channels removed from the group.
        conflicts: Group root layer -> ``(channels masked by every member, by some member)``
            where coupled layers' masks disagree.
        kept_masked: Layer -> masked output channels left in place (zeroed, not removed):
            output layers, protected or conflicting groups.
        macs_before / macs_after / params_before / params_after: One forward pass on the
            example inputs, and parameter counts.
        widths_before / widths_after: Output width of every conv / linear layer.
        plan: The model's cumulative pruning plan afterwards.
    """

    removed: dict[str, int]
    conflicts: dict[str, tuple[int, int]]
    kept_masked: dict[str, int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """A before/after table for terminals and logs."""
        head = (f"speedup: {sum(self.removed.values())} channels removed in "
                f"{len(self.removed)} coupled groups")
        if self.conflicts:
            head += f"; masks disagreed in {len(self.conflicts)} groups"
        return head + "\n" + self.size_table()


def _check_masks(model: nn.Module, masks: Any) -> dict[str, nn.Module]:
    if not isinstance(masks, dict):
        raise TypeError("masks must be a dict {layer name: {'weight': mask, 'bias': mask}} as "
                        f"NNI's pruners return, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    out = {}
    for name, entry in masks.items():
        if name not in modules:
            raise ValueError(f"masks name a layer the model does not have: {name!r}"
                             f"{did_you_mean(name, modules)}")
        if not isinstance(entry, dict):
            raise TypeError(f"masks[{name!r}] must be a dict {{'weight': mask, 'bias': mask}}, "
                            f"got {type(entry).__name__}")
        module = modules[name]
        for key, mask in entry.items():
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"masks[{name!r}][{key!r}] must be a tensor or None")
            target = getattr(module, key, None)
            if not isinstance(target, torch.Tensor):
                raise ValueError(f"masks[{name!r}] masks {key!r}, which is not a parameter of "
                                 f"{type(module).__name__}: speedup reads weight/bias masks")
            if tuple(mask.shape) != tuple(target.shape):
                raise ValueError(f"mask {name}.{key} has shape {tuple(mask.shape)}, but the "
                                 f"tensor it masks has {tuple(target.shape)}")
        out[name] = module
    return out


def _check_unwrapped(model: nn.Module) -> None:
    wrapped = [n for n, m in model.named_modules() if "_nni_wrapper" in m._modules]
    if wrapped:
        raise ValueError(
            f"the model is still wrapped by an NNI compressor ({wrapped[0]!r}...): call "
            "pruner.unwrap_model() before speedup(model, masks, example_inputs)"
        )


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Multiply each masked parameter by its mask, in place (the "masked model" of NNI)."""
    modules = _check_masks(model, masks)
    for name, entry in masks.items():
        for key, mask in entry.items():
            if mask is not None:
                tensor = getattr(modules[name], key)
                tensor.mul_(mask.to(device=tensor.device, dtype=tensor.dtype))


def speedup(
    model: nn.Module,
    masks: Masks,
    example_inputs: Any,
    *,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable | None = None,
    policy: str = "all",
    protect_outputs: bool = True,
    customized_pruners: dict[Any, Any] | None = None,
    unwrapped_parameters: dict[nn.Parameter, int] | None = None,
) -> SpeedupReport:
    """Physically remove the channels NNI masks zero out, in place.

    Works with masks of this package's NNI pruners (coupled by construction) and of NNI's own
    pruners (``L1NormPruner``... which mask each layer independently). The masks are first
    multiplied into the weights (so the model computes what NNI's masked model computes), then
    every coupled group of torch-pruning's dependency graph loses the channels its members mask:

    * ``policy="all"`` (default): a channel is removed only if every member of its group that
      has a mask masks it. When the masks are coupled (this package's pruners mask the norm
      layers too) the output equals the masked model's up to float rounding; when they
      disagree, the channels some member keeps stay (zeroed where masked) and a warning counts
      them.
    * ``policy="any"``: a channel is removed if one member masks it (prunes more than the
      masks say; outputs then differ from the masked model).

    A channel whose conv is masked but whose BatchNorm is not outputs a constant in the masked
    model; removing it drops that constant (NNI's speedup does the same). Output layers (the
    model's logits) and attention qkv projections keep their channels; their masks stay
    applied. If anything fails, the model is restored exactly.

    Args:
        model: An unwrapped model (``pruner.unwrap_model()`` first).
        masks: ``{layer name: {"weight": mask, "bias": mask}}``, as ``pruner.compress()``
            returns.
        example_inputs: Inputs for tracing (tensor, tuple or dict).
        forward_fn: ``forward_fn(model, example_inputs)`` if not ``model(x)``.
        output_transform: Maps outputs to tensors for tracing (torch-pruning's).
        policy: ``"all"`` or ``"any"``, see above.
        protect_outputs: Keep the channels of layers whose outputs are model outputs.
        customized_pruners / unwrapped_parameters: As for :func:`kcp_plugin.prune`.

    Returns:
        A :class:`SpeedupReport`; the model's pruning plan is extended as well.

    Raises:
        ValueError / TypeError: bad masks or arguments (the model is untouched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    _check_unwrapped(model)
    modules = _check_masks(model, masks)
    fwd = forward_fn or default_forward
    check_runs(model, example_inputs, fwd)
    graph = checked_graph(model, example_inputs, fwd, output_transform,
                          customized_pruners=customized_pruners,
                          unwrapped_parameters=unwrapped_parameters)
    protected: dict[nn.Module, str] = {}
    if protect_outputs:
        protected.update({m: "a model output layer" for m in output_layers(graph)})
    protected.update({m: "an attention qkv projection" for m in detect_num_heads(model)})
    for module, reason in unsafe_layers(graph, {m: n for n, m in model.named_modules()}).items():
        protected.setdefault(module, reason)
    signature = output_signature(model, example_inputs, fwd)
    groups = coupled_groups(model, graph, protected)
    masked = {name: masked_channels(modules[name], masks[name], name) for name in masks}
    masked = {name: chans for name, chans in masked.items() if chans is not None}

    removals, conflicts = [], {}
    removed_local: dict[str, set[int]] = {}
    for group in groups:
        if not any(masked.get(m.name) for m in group.members):
            continue
        if group.protected_by:
            logger.info("masks on the group of %r are applied but its channels are kept: %s",
                        group.root_name, group.protected_by)
            chosen: list[int] = []
        else:
            chosen, conflict = removal_from_masks(group, masked, policy)
            if conflict:
                conflicts[group.root_name] = conflict
            if chosen:
                removals.append((group, chosen))
        for member in group.members:
            removed_local.setdefault(member.name, set()).update(member.to_local(chosen))
    kept = {name: len(chans - removed_local.get(name, set()))
            for name, chans in masked.items() if chans - removed_local.get(name, set())}
    if conflicts:
        root, (every, some) = next(iter(conflicts.items()))
        logger.warning(
            "masks of coupled layers disagree in %d groups (e.g. the group of %r: %d channels "
            "masked by every member, %d by some). policy=%r %s. NNI's own pruners mask layers "
            "independently; kcp_plugin's NNI pruners produce coupled masks.", len(conflicts),
            root, every, some, policy,
            "removed only the channels every member masks; the rest stay, zeroed"
            if policy == "all" else "removed every channel one member masks")

    macs0, params0 = count_macs_params(model, example_inputs, fwd)
    widths0 = layer_widths(model)
    snapshot = ModuleSnapshot(model)
    backup = {(name, key): getattr(modules[name], key).detach().clone()
              for name, entry in masks.items() for key, mask in entry.items() if mask is not None}
    try:
        apply_masks(model, masks)
        with track_pruning():
            for group, chosen in removals:
                pruner = graph.get_pruner_of_module(group.root)
                graph.get_pruning_group(group.root, pruner.prune_out_channels, chosen).prune()
        plan = extend_plan(model, graph.pruning_history(), {})
        problem = verify_outputs(model, example_inputs, fwd, signature)
        if problem is not None:
            raise UnprunableError(
                f"the masks cannot be applied physically: {problem}; the model is restored "
                "(mask fewer layers, or exclude the layers around that operation)")
        macs1, params1 = count_macs_params(model, example_inputs, fwd)
    except BaseException:
        snapshot.restore()
        with torch.no_grad():
            for (name, key), value in backup.items():
                getattr(modules[name], key).copy_(value)
        raise
    return SpeedupReport(
        removed={g.root_name: len(c) for g, c in removals}, conflicts=conflicts,
        kept_masked=kept, macs_before=macs0, macs_after=macs1, params_before=params0,
        params_after=params1, widths_before=widths0, widths_after=layer_widths(model),
        plan=plan,
    )
