"""The one place that re-points an optimizer at a pruned model's parameters.

After a prune, torch-pruning has replaced every pruned parameter with a new object, so an
optimizer built before holds dead tensors (and their momentum / Adam moments). Rebuilding it from
scratch would lose that state and break learning-rate schedulers that hold the optimizer. Here
the same optimizer object is edited in place: each param group points at the live parameters and
per-parameter state tensors are sliced to the kept indices. Every training integration calls this.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from .tracking import lineage

__all__ = ["rebuild_optimizer"]


def _slice(value: torch.Tensor, hops: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    for dim, keep in hops:
        value = value.index_select(dim, keep.to(value.device))
    return value


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Point ``optimizer`` at ``model``'s current parameters, carrying state for kept indices.

    Parameters the model no longer has (removed entirely) are dropped from their groups;
    hyper-parameters, param-group structure and the optimizer object itself are unchanged, so
    learning-rate schedulers keep working. Per-parameter state tensors shaped like the old
    parameter (momentum, ``exp_avg``, ``exp_avg_sq``...) are sliced to the kept indices; other
    state (``step``) is copied.

    Args:
        optimizer: Optimizer built for the model before pruning.
        model: The pruned model.

    Returns:
        ``optimizer``, edited in place.

    Raises:
        RuntimeError: the optimizer holds parameters that the model replaced, but the pruning
            was not tracked (prune with :func:`kcp_plugin.prune` or inside
            :func:`kcp_plugin.track_pruning`). The optimizer is left unchanged then.
    """
    held = {p for g in optimizer.param_groups for p in g["params"]}
    live = list(dict.fromkeys(model.parameters()))
    live_set = set(live)
    replacement: dict[torch.Tensor, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = {}
    for param in live:
        if param in held:
            continue
        hops = lineage(param)
        # the most recent ancestor the optimizer still holds
        for j in range(len(hops) - 1, -1, -1):
            ancestor = hops[j][0]
            if ancestor is not None and ancestor in held:
                replacement[ancestor] = (param, [(d, k) for _, d, k in hops[j:]])
                break
    stale = [p for p in held if p not in live_set and p not in replacement]
    matched = {id(new) for new, _ in replacement.values()}
    orphans = [p for p in live if p not in held and id(p) not in matched]
    if stale and orphans:
        raise RuntimeError(
            f"the optimizer holds {len(stale)} parameters the model replaced, and "
            f"{len(orphans)} model parameters have no tracked lineage to them; prune with "
            "kcp_plugin.prune() or inside kcp_plugin.track_pruning() so that optimizer state "
            "can be carried"
        )
    new_state: defaultdict = defaultdict(dict)
    for group in optimizer.param_groups:
        params = []
        for old in group["params"]:
            if old in live_set:
                params.append(old)
                if old in optimizer.state:
                    new_state[old] = optimizer.state[old]
            elif old in replacement:
                new, hops = replacement[old]
                params.append(new)
                state = optimizer.state.get(old, {})
                new_state[new] = {
                    k: _slice(v, hops)
                    if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0
                    else v
                    for k, v in state.items()
                }
            # else: the parameter left the model entirely; drop it and its state
        group["params"] = params
    optimizer.state = new_state
    return optimizer
