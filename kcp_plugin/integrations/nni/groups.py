"""Coupled channel groups seen through NNI's masks: discovery, channel choice, mask conversion.

NNI describes pruning as per-layer masks (``{layer: {"weight": mask, "bias": mask}}``); torch-
pruning describes it as groups of coupled layers that lose the same channels. This module is
the bridge both ways, shared by the pruners (scores -> channels -> masks) and by
:func:`~kcp_plugin.integrations.nni.speedup` (masks -> channels -> physical pruning). It needs
only torch and torch-pruning.

A group is rooted at a conv / linear layer's output channels; its *members* are the layers whose
output channels (weight rows, bias entries, norm affine parameters) are that same channel set
(the root, the norm after it, every layer added to it by a residual, depthwise convs reading
it...); its *consumers* read the channels and lose input channels when they are removed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from ...depgraph import split_channel_groups

__all__ = [
    "ChannelGroup",
    "GroupRequest",
    "Member",
    "channel_masks",
    "coupled_groups",
    "masked_channels",
    "out_dim",
    "removal_from_masks",
    "select_channels",
]

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def out_dim(module: nn.Module) -> int:
    """The weight dimension that holds a layer's output channels (1 for transposed convs)."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) and module.transposed else 0


@dataclass
class Member:
    """A layer whose output channels belong to a group.

    Attributes:
        name: Qualified module name.
        module: The module.
        local: Its channel indices in the group, in group order.
        root: The root channel index of each entry of ``local``.
    """

    name: str
    module: nn.Module
    local: list[int]
    root: list[int]

    def to_root(self, channels: Iterable[int]) -> set[int]:
        """Root indices of some of this member's channels (those outside the group dropped)."""
        lookup = dict(zip(self.local, self.root))
        return {lookup[c] for c in channels if c in lookup}

    def to_local(self, root_channels: Iterable[int]) -> list[int]:
        """This member's channel indices for some root channels."""
        lookup = defaultdict(list)
        for loc, r in zip(self.local, self.root):
            lookup[r].append(loc)
        return sorted({loc for r in root_channels for loc in lookup.get(r, ())})


@dataclass
class ChannelGroup:
    """A set of coupled channels: one pruning decision applies to all its members.

    Attributes:
        index: Position in discovery order.
        root_name / root: The conv / linear layer whose output channels index the group.
        size: Number of root channels.
        ch_groups: Channel groups (grouped convs, group norms): channels are removed in the same
            positions of every one of the ``ch_groups`` equal slices.
        members: Layers whose output channels are the group's channels.
        consumers: Names of the layers that read the channels (they lose input channels).
        protected_by: Why the group must not be pruned (an output layer, an excluded layer,
            attention heads...), or None.
        tp_group: torch-pruning's group with all channels (for scoring).
    """

    index: int
    root_name: str
    root: nn.Module
    size: int
    ch_groups: int
    members: list[Member]
    consumers: list[str]
    protected_by: str | None = None
    tp_group: Any = field(default=None, repr=False)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def units(self) -> int:
        """Channels per channel group: the unit a decision is made in."""
        return self.size // self.ch_groups

    def expand(self, units: Iterable[int]) -> list[int]:
        """Root channels of some units (the same position in every channel group)."""
        n = self.units
        return sorted(u + j * n for u in units for j in range(self.ch_groups))


def _channel_groups(graph: tp.DependencyGraph, group: Any) -> int:
    # As torch-pruning's BasePruner detects them: grouped convs and group norms split the
    # channels into equal slices that must stay equal; depthwise convs do not.
    found = [1]
    for dep, _ in group:
        module = dep.target.module
        if not isinstance(module, nn.Module):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            found.append(int(pruner.get_out_channel_groups(module) or 1))
        else:
            found.append(int(pruner.get_in_channel_groups(module) or 1))
    return math.lcm(max(found), split_channel_groups(graph, group))


def _has_channel_tensor(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, k, None), torch.Tensor) for k in ("weight", "bias"))


def coupled_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    protected: dict[nn.Module, str] | None = None,
) -> list[ChannelGroup]:
    """Every channel group of ``model`` rooted at a conv / linear layer, in graph order.

    Args:
        model: The model the graph was built on.
        graph: Its torch-pruning dependency graph.
        protected: Modules that must keep their output channels, with the reason (shown in
            messages); a group with such a member is marked ``protected_by``.
    """
    protected = protected or {}
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(root_module_types=list(ROOT_TYPES)):
        root = group[0].dep.target.module
        if root not in names:
            continue
        members: list[Member] = []
        consumers: list[str] = []
        reason = None
        for i, (dep, idxs) in enumerate(group):
            module = dep.target.module
            name = names.get(module) if isinstance(module, nn.Module) else None
            if name is None:
                continue
            if not graph.is_out_channel_pruning_fn(dep.handler):
                consumers.append(name)
                continue
            if module in protected and reason is None:
                reason = f"{name!r} is {protected[module]}"
            if not _has_channel_tensor(module):
                continue
            root_idxs = list(getattr(group[i], "root_idxs", idxs))
            if None in root_idxs or len(root_idxs) != len(idxs):
                reason = reason or f"the channel mapping of {name!r} is not one-to-one"
                continue
            members.append(Member(name, module, [int(j) for j in idxs],
                                  [int(j) for j in root_idxs]))
        size = len(group[0].idxs)
        ch = _channel_groups(graph, group)
        if size % ch:
            reason = reason or f"its {size} channels do not split into {ch} channel groups"
            ch = 1
        groups.append(ChannelGroup(len(groups), names[root], root, size, ch, members,
                                   consumers, reason, group))
    return groups


# ---------------------------------------------------------------------------- masks <-> channels
def masked_channels(module: nn.Module, masks: dict[str, Any], name: str = "") -> set[int] | None:
    """Output channels an NNI mask removes entirely from ``module``.

    A channel counts as masked when its whole weight slice is zero in the weight mask (filter
    pruning, as NNI reads its own masks). A bias left unmasked on such a channel only adds a
    constant (NNI leaves BatchNorm biases unmasked); removing the channel drops it.
    Partially masked channels (fine-grained masks) are not counted.

    Returns:
        The masked channel indices, or None when there is no weight mask to read.

    Raises:
        ValueError: a mask's shape differs from the tensor it masks.
    """
    weight = getattr(module, "weight", None)
    wmask = masks.get("weight")
    if wmask is None or not isinstance(weight, torch.Tensor):
        return None
    for key, mask in masks.items():
        target = getattr(module, key, None)
        if mask is not None and isinstance(target, torch.Tensor) \
                and tuple(mask.shape) != tuple(target.shape):
            raise ValueError(f"mask {name or type(module).__name__}.{key} has shape "
                             f"{tuple(mask.shape)}, but the tensor it masks has "
                             f"{tuple(target.shape)}")
    dim = out_dim(module) if wmask.dim() > 1 else 0
    rows = wmask.detach().transpose(0, dim).reshape(wmask.shape[dim], -1)
    zero = ~(rows != 0).any(dim=1)
    return {int(i) for i in zero.nonzero().flatten()}


def channel_masks(module: nn.Module, channels: Iterable[int],
                  targets: Iterable[str] = ("weight", "bias")) -> dict[str, torch.Tensor]:
    """NNI masks (ones, with zeros on ``channels``) for a module's weight and bias."""
    idx = torch.as_tensor(sorted(set(channels)), dtype=torch.long)
    out = {}
    for key in targets:
        tensor = getattr(module, key, None)
        if not isinstance(tensor, torch.Tensor):
            continue
        mask = torch.ones_like(tensor, dtype=tensor.dtype)
        if len(idx):
            dim = out_dim(module) if tensor.dim() > 1 else 0
            mask.index_fill_(dim, idx.to(mask.device), 0)
        out[key] = mask
    return out


def removal_from_masks(
    group: ChannelGroup, masked: dict[str, set[int]], policy: str = "all"
) -> tuple[list[int], tuple[int, int] | None]:
    """Root channels of ``group`` to remove, given each member's masked channels.

    Args:
        group: The group.
        masked: Member name -> masked output channels (members without a mask are absent).
        policy: ``"all"``: remove a channel only if every masked member masks it (the result
            never drops a channel some member keeps); ``"any"``: if one member masks it.

    Returns:
        ``(root channels, conflict)``: ``conflict`` is ``(masked by all, masked by some)`` when
        the members disagree, else None. At least one unit (channel, or channel-group slice)
        is always kept.
    """
    votes = [m.to_root(masked[m.name]) for m in group.members if m.name in masked]
    if not votes:
        return [], None
    every = set.intersection(*votes)
    some = set.union(*votes)
    conflict = (len(every), len(some)) if every != some else None
    chosen = every if policy == "all" else some
    n = group.units
    test = all if policy == "all" else any
    units = [u for u in range(n)
             if test(u + j * n in chosen for j in range(group.ch_groups))]
    if len(units) >= n:
        units = units[1:]
    return group.expand(units), conflict


# ---------------------------------------------------------------------------- channel choice
@dataclass
class GroupRequest:
    """How much of one group to prune.

    Attributes:
        group: The group.
        ratio: Fraction of its channels to mask.
        min_ratio / max_ratio: Bounds (``max_ratio`` also caps global ranking).
        global_id: Groups with the same id are ranked together (NNI's ``global_group_id``);
            ``ratio`` then applies to their channels in total.
    """

    group: ChannelGroup
    ratio: float
    min_ratio: float = 0.0
    max_ratio: float = 1.0
    global_id: int | str | None = None


def _bounds(n_units: int, req: GroupRequest) -> tuple[int, int]:
    hi = min(int(n_units * req.max_ratio + 1e-9), n_units - 1)
    lo = min(int(n_units * req.min_ratio + 1e-9), hi)
    return lo, hi


def _unit_scores(group: ChannelGroup, scores: torch.Tensor, masked: set[int]) -> torch.Tensor:
    n = group.units
    s = scores.detach().float().cpu().reshape(group.ch_groups, n).mean(0)
    s = torch.nan_to_num(s, nan=math.inf)
    forced = [u for u in range(n) if all(u + j * n in masked for j in range(group.ch_groups))]
    if forced:
        s[forced] = -math.inf  # channels masked before stay masked (AGP keeps them pruned)
    return s


def select_channels(
    requests: list[GroupRequest],
    scores: dict[int, torch.Tensor],
    masked: dict[int, set[int]] | None = None,
) -> dict[int, list[int]]:
    """Choose the channels to mask in each requested group (lowest scores first).

    Local requests prune ``int(units * ratio)`` units of their group; requests sharing a
    ``global_id`` prune ``int(channels * ratio)`` channels in total, taken in ascending score
    order across the groups (scores are comparable because torch-pruning's criteria normalise
    each group), never more than a group's ``max_ratio``. Channels already masked (``masked``)
    go first, so a growing ratio (AGP) only ever adds channels. Every group keeps one unit.

    Args:
        requests: One per group to prune.
        scores: Group index -> one score per root channel (higher = more important).
        masked: Group index -> root channels masked so far.

    Returns:
        Group index -> root channels to mask.
    """
    masked = masked or {}
    chosen: dict[int, list[int]] = {}
    by_global: dict[Any, list[GroupRequest]] = defaultdict(list)
    for req in requests:
        if req.group.index not in scores:
            continue
        if req.global_id is not None:
            by_global[req.global_id].append(req)
            continue
        g = req.group
        s = _unit_scores(g, scores[g.index], masked.get(g.index, set()))
        lo, hi = _bounds(g.units, req)
        k = max(lo, min(int(g.units * req.ratio + 1e-9), hi))
        units = torch.argsort(s, stable=True)[:k].tolist()
        chosen[g.index] = g.expand(units)
    for reqs in by_global.values():
        ratio = max(r.ratio for r in reqs)
        target = int(sum(r.group.size for r in reqs) * ratio + 1e-9)
        picked: dict[int, list[int]] = {}
        candidates = []
        count = 0
        for req in reqs:
            g = req.group
            s = _unit_scores(g, scores[g.index], masked.get(g.index, set()))
            order = torch.argsort(s, stable=True).tolist()
            lo, hi = _bounds(g.units, req)
            picked[g.index] = order[:lo]
            count += lo * g.ch_groups
            candidates += [(float(s[u]), g.index, u, hi, g.ch_groups) for u in order[lo:]]
        candidates.sort(key=lambda t: (t[0], t[1], t[2]))
        for _, gi, u, hi, ch in candidates:
            if count >= target:
                break
            if len(picked[gi]) >= hi:
                continue
            picked[gi].append(u)
            count += ch
        groups = {r.group.index: r.group for r in reqs}
        for gi, units in picked.items():
            chosen[gi] = groups[gi].expand(units)
    return chosen
