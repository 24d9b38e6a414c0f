"""Safety checks around torch-pruning: which groups are safe to prune, and is the result sound
(the recovery loop that uses them when a run breaks is :mod:`kcp_plugin.safety_net`).

torch-pruning traces a model once and trusts its index mapping; where the mapping is wrong
(channels split by sizes written in the forward code, reshapes by stored widths, parameters it
guesses the pruning dimension of), the pruned model crashes or silently computes something else.
Instead of per-architecture lists, :func:`kcp_plugin.prune` uses three generic checks from here:

* before pruning, every group the graph returns is validated (:func:`invalid_groups`): each
  member's indices must lie inside its channel dimension, and no member may pass through a
  split / cat whose parts could not be determined; a failing group is protected;
* layers whose channels are the model's input channels (a depthwise conv applied to the image)
  are protected like output layers (:func:`input_layers`);
* after pruning (each trial copy and the final model), the forward pass is verified
  (:func:`verify_outputs`: same output structure and shapes, finite values); when it fails, the
  pruner bisects over its groups to find the one responsible, protects it and prunes the rest.

A model that cannot reach its MACs target with what is safe is refused with
:class:`UnprunableError`, which names the protected layers, the operations that couple them
and the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from .errors import UnprunableError
from .nested import output_tensors

__all__ = [
    "UnprunableError",
    "ProtectedGroup",
    "input_layers",
    "invalid_groups",
    "unsafe_layers",
    "couplings",
    "describe_exception",
    "output_signature",
    "verify_outputs",
]

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

# Node types that change how channel indices map from one tensor to the next.
_COUPLING_NAMES = {
    ops.OPTYPE.SPLIT: "split/chunk",
    ops.OPTYPE.CONCAT: "cat",
    ops.OPTYPE.RESHAPE: "view/reshape",
    ops.OPTYPE.UNBIND: "unbind",
    ops.OPTYPE.SLICE: "slice",
    ops.OPTYPE.EXPAND: "expand",
    ops.OPTYPE.PARAMETER: "a raw parameter",
    ops.OPTYPE.CUSTOMIZED: "a custom layer",
    ops.OPTYPE.MHA: "multi-head attention",
}


@dataclass
class ProtectedGroup:
    """A channel group the safety net kept unpruned, and why.

    Attributes:
        root: Qualified name of the group's root layer (pass it in ``ignored_layers``).
        layers: Qualified names of the layers whose channels the group couples.
        couplings: Operations coupling them that torch-pruning maps channels through
            (``"split/chunk"``, ``"cat"``, ``"view/reshape"``...).
        reason: What went wrong when the group was pruned, or why it was not tried.
    """

    root: str
    layers: list[str]
    couplings: list[str]
    reason: str

    def describe(self) -> str:
        """One line for warnings and errors."""
        via = f" through {', '.join(self.couplings)}" if self.couplings else ""
        members = ", ".join(self.layers[:6]) + (" ..." if len(self.layers) > 6 else "")
        return f"{self.root} (coupled with {members}{via}): {self.reason}"


def couplings(group: Any) -> list[str]:
    """Names of the index-changing operations a group passes through (sorted, unique)."""
    found = set()
    for item in group.items:
        for node in (item.dep.source, item.dep.target):
            name = _COUPLING_NAMES.get(node.type)
            if name is None and node.grad_fn is not None and hasattr(node.grad_fn, "name"):
                if "PixelShuffle" in node.grad_fn.name() or "PixelUnshuffle" in \
                        node.grad_fn.name():
                    name = "pixel shuffle"
            if name:
                found.add(name)
    return sorted(found)


def group_layers(group: Any, names: dict[Any, str]) -> list[str]:
    """Qualified names of the modules (and raw parameters) a group touches, in group order."""
    out: list[str] = []
    for item in group.items:
        module = item.dep.target.module
        name = names.get(module)
        if name is not None and name not in out:
            out.append(name)
    return out


def describe_group(group: Any, names: dict[Any, str], reason: str) -> ProtectedGroup:
    """A :class:`ProtectedGroup` record for a torch-pruning group."""
    root = group[0].dep.target.module
    return ProtectedGroup(root=names.get(root, type(root).__name__),
                          layers=group_layers(group, names), couplings=couplings(group),
                          reason=reason)


def input_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Grouped / depthwise convs that read the model input directly.

    A depthwise conv's output channels are its input channels; applied to the image they are
    the image's channels, which pruning cannot change (the first layer would then expect fewer
    channels than the input has). Such layers are protected like output layers.
    """
    found = []
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
            continue
        if not node.inputs:  # nothing upstream in the graph: it reads a model input
            found.append(module)
    return found


def invalid_groups(
    graph: tp.DependencyGraph, ignored: Iterable[nn.Module], names: dict[Any, str],
) -> list[tuple[nn.Module, ProtectedGroup]]:
    """Groups whose traced index mapping is inconsistent, with their root layers.

    A group is inconsistent when a member's indices fall outside that member's channel count
    on the side being pruned (torch-pruning mapped an index through a split / cat / reshape to
    a channel that does not exist, or the plugin's graph dropped such indices: ``clipped``),
    when it passes through a split / cat the graph could not map (``unmapped``) or a split
    into fixed unequal widths, or when magnitude importance cannot read the members' weights
    at the traced indices; and a root whose group torch-pruning fails to trace
    (``untraced_roots``: the error is named).
    """
    ignored = list(ignored)
    ignored_set = set(ignored)
    unmapped = {id(n) for n in getattr(graph, "unmapped", [])}
    probe = tp.importance.GroupMagnitudeImportance()
    fixed = {id(n): n for n in getattr(graph, "fixed_splits", [])}
    bad = []
    for group in graph.get_all_groups(ignored_layers=list(ignored),
                                      root_module_types=list(ROOT_TYPES)):
        reason = None
        for target, idx, width in getattr(group, "clipped", ()):
            reason = (f"torch-pruning maps channel {idx} onto "
                      f"{names.get(target.module, target.name)}, which has {width} channels")
            break
        for item in ([] if reason else group.items):
            dep = item.dep
            if id(dep.target) in unmapped or id(dep.source) in unmapped:
                reason = "it passes through a split or cat whose parts could not be traced"
                break
            stored = getattr(graph, "stored_sizes", None)
            if stored is not None and stored.problem(dep.target):  # kcp_plugin.stored_sizes
                reason = stored.problem(dep.target)
                break
            if id(dep.target) in fixed:
                sizes = fixed[id(dep.target)].module.split_sizes
                reason = (f"the forward code splits these channels into parts of fixed, unequal "
                          f"widths {list(sizes)} (torch.split by sizes), which pruning cannot "
                          "change")
                break
            if dep.target.type == ops.OPTYPE.PARAMETER or not item.idxs:
                continue
            out = graph.is_out_channel_pruning_fn(dep.handler)
            try:
                width = (graph.get_out_channels if out else graph.get_in_channels)(
                    dep.target.module)
            except Exception:  # a pruner that cannot tell: nothing to check against
                width = None
            if width is None:
                continue
            if max(item.idxs) >= width or min(item.idxs) < 0:
                side = "output" if out else "input"
                reason = (f"torch-pruning maps channel {max(item.idxs)} onto "
                          f"{names.get(dep.target.module, dep.target.name)}, whose {side} has "
                          f"{width} channels")
                break
        if reason is None:
            try:  # the cheapest criterion reads every member's weights by the traced indices
                probe(group)
            except Exception as exc:  # an index torch-pruning mapped past a weight
                reason = ("reading its members' weights at the traced channel indices fails "
                          f"({describe_exception(exc)})")
        if reason is not None:
            bad.append((group[0].dep.target.module, describe_group(group, names, reason)))
    for module, exc in getattr(graph, "untraced_roots", []):
        if module in ignored_set:
            continue
        name = names.get(module, type(module).__name__)
        bad.append((module, ProtectedGroup(
            root=name, layers=[name], couplings=[],
            reason=f"torch-pruning fails tracing its channel group ({describe_exception(exc)})")))
    return bad


def unsafe_layers(graph: tp.DependencyGraph, names: dict[Any, str]) -> dict[nn.Module, str]:
    """Layers whose channel groups must not be pruned, with the reason, for mask-based
    pruners (NNI): the layers reading the model input and the roots of inconsistent groups."""
    found = {m: "a layer reading the model input's channels" for m in input_layers(graph)}
    for root, record in invalid_groups(graph, list(found), names):
        found.setdefault(root, f"unsafe to prune: {record.reason}")
    return found


def output_signature(model: nn.Module, example_inputs: Any,
                     forward_fn: Callable[[nn.Module, Any], Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of every output tensor of an eval-mode forward pass (modes restored)."""
    from .graph import preserved_modes

    with torch.no_grad(), preserved_modes(model):
        model.eval()
        out = forward_fn(model, example_inputs)
    return {k: tuple(v.shape) for k, v in output_tensors(out).items()}


def verify_outputs(model: nn.Module, example_inputs: Any,
                   forward_fn: Callable[[nn.Module, Any], Any],
                   signature: dict[str, tuple[int, ...]]) -> str | None:
    """Run the pruned model; return what is wrong with its outputs, or ``None`` if sound.

    Checked: the forward pass runs, every output of the unpruned model is still there with the
    same shape, and every output value is finite.
    """
    from .graph import preserved_modes

    try:
        with torch.no_grad(), preserved_modes(model):
            model.eval()
            out = forward_fn(model, example_inputs)
    except Exception as exc:  # the point of the check: any failure of the pruned forward
        return f"the pruned forward fails: {describe_exception(exc)}"
    found = output_tensors(out)
    for key, shape in signature.items():
        if key not in found:
            return f"output {key} is missing after pruning"
        if tuple(found[key].shape) != shape:
            return (f"output {key} has shape {tuple(found[key].shape)} after pruning, "
                    f"{shape} before")
        value = found[key]
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"output {key} has non-finite values after pruning"
    return None


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line, the message cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"
