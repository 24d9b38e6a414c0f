"""Per-channel weight views of the members of a torch-pruning group.

A group couples the producers of a set of channels (conv filters, linear rows, norm scales) with
their consumers (the kernels that read those channels). Criteria that compare channels need each
member as a matrix with one row per channel of that layer; this module is the one place that knows
how conv / transposed conv / grouped conv / linear weights are laid out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

CONSUMER_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)
PRODUCER_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels)
NORM_FNS = (
    function.prune_batchnorm_out_channels,
    function.prune_layernorm_out_channels,
    function.prune_groupnorm_out_channels,
)


class MemberView(NamedTuple):
    """One group member seen as rows, one per channel of the layer.

    Attributes:
        rows: ``[channels_of_layer, features]`` float32 matrix.
        idxs: Which rows belong to this group (local channel indices of the layer).
        root_idxs: For each entry of ``idxs``, the root channel it maps to.
        side: ``"consumer"`` (kernels reading the channel), ``"producer"`` (filters writing it)
            or ``"norm"`` (a per-channel scalar).
        layer: The module, for logging.
    """

    rows: torch.Tensor
    idxs: list[int]
    root_idxs: list[int]
    side: str
    layer: nn.Module


def consumer_rows(layer: nn.Module) -> torch.Tensor | None:
    """Kernel clusters of a layer: row ``c`` holds every kernel that reads input channel ``c``.

    For a grouped conv only the filters of channel ``c``'s group read it, so row ``c`` has
    ``out_channels / groups`` kernels; depthwise convs therefore have one kernel per row.
    """
    w = layer.weight.detach()
    if isinstance(layer, nn.modules.conv._ConvNd):
        if layer.transposed:  # [C_in, N/g, k...]: input channel c owns w[c]
            return w.flatten(1).float()
        g = layer.groups
        n, c_per_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        w = w.reshape(g, n // g, c_per_g, *k).transpose(1, 2)  # [g, C/g, N/g, k...]
        return w.reshape(g * c_per_g, -1).float()
    if isinstance(layer, nn.Linear):
        return w.t().float()
    return None


def producer_rows(layer: nn.Module) -> torch.Tensor | None:
    """Filters of a layer: row ``n`` holds the weights that write output channel ``n``."""
    w = layer.weight.detach()
    if isinstance(layer, nn.modules.conv._ConvNd):
        if not layer.transposed:  # [N, C/g, k...]
            return w.flatten(1).float()
        g = layer.groups
        c_in, n_per_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        w = w.reshape(g, c_in // g, n_per_g, *k).transpose(1, 2)  # [g, N/g, C/g, k...]
        return w.reshape(g * n_per_g, -1).float()
    if isinstance(layer, nn.Linear):
        return w.float()
    return None


def _norm_rows(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().float().reshape(-1, 1)


_SIDES = (("consumer", CONSUMER_FNS, consumer_rows), ("producer", PRODUCER_FNS, producer_rows),
          ("norm", NORM_FNS, _norm_rows))


def member_views(
    group: tp.dependency.Group, sides: tuple[str, ...] = ("consumer", "producer", "norm")
) -> list[MemberView]:
    """The members of ``group`` on the given ``sides`` whose weights read as per-channel rows.

    Rows are only built for the requested sides (building them copies weights).
    """
    wanted = [(side, fns, fn_rows) for side, fns, fn_rows in _SIDES if side in sides]
    views = []
    for i, (dep, idxs) in enumerate(group):
        layer, fn = dep.layer, dep.pruning_fn
        match = next(((side, rows_of) for side, fns, rows_of in wanted if fn in fns), None)
        if match is None:
            continue
        side, rows_of = match
        root_idxs = group[i].root_idxs
        if len(idxs) == 0 or None in root_idxs:
            continue
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            continue
        rows = rows_of(layer)
        if rows is None or rows.shape[0] <= max(idxs):
            continue
        views.append(MemberView(rows, idxs, root_idxs, side, layer))
    return views


def scatter_mean(
    parts: list[tuple[torch.Tensor, list[int], float]], n_root: int
) -> torch.Tensor:
    """Combine per-member scores onto root channels.

    Each part is ``(scores, root_idxs, weight)``. Within a part, repeated root indices (a linear
    layer after a flatten sees each channel ``H*W`` times) are averaged, so no member outweighs
    another by its fan-in; parts are then averaged with their weights.
    """
    total = torch.zeros(n_root)
    wsum = torch.zeros(n_root)
    for scores, root_idxs, weight in parts:
        idx = torch.as_tensor(root_idxs, dtype=torch.long)
        s = torch.zeros(n_root).index_add_(0, idx, scores.float().cpu())
        c = torch.zeros(n_root).index_add_(0, idx, torch.ones(len(root_idxs)))
        seen = c > 0
        total[seen] += weight * s[seen] / c[seen]
        wsum[seen] += weight
    return total / wsum.clamp_min(1e-12)
