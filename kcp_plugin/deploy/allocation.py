"""Latency-aware width allocation: which groups lose how many channels under a latency budget.

HALP (Shen et al., NeurIPS 2022) chooses layer widths by a knapsack: each group of channels
has a value (its importance) and a cost (the latency it adds, from a lookup table at the
current widths), and the widths that keep the most value within the latency budget win;
channels are removed in hardware-aligned groups and, inside a layer, in importance order.
This module does the same for any DepGraph group of any net with any registered criterion:

* **value**: the criterion's score of each channel (:func:`kcp_plugin.run.group_scores`),
  normalised per group to mean 1 (criteria score on scales that differ between layers), times
  the MACs a channel of the group carries (``value="importance_macs"``, the default: the
  capacity kept per unit of latency) or not (``value="importance"``, HALP's);
* **cost**: :class:`~.table.LatencyModel` at the widths the group and its neighbours have now
  (a conv's cost depends on both its input and output widths, owned by different groups);
* **steps**: each group loses channels in steps of the backend's channel multiple
  (:func:`~.table.width_step`: finer for narrow groups, whole channel groups for grouped convs),
  the first step making the width a multiple; at most ``max_pruning_ratio`` of a group goes;
* **search**: greedy on value lost per millisecond saved, looking 1, 2 and 4 steps ahead (GPU
  kernels run in tiles, so one step can save nothing where two save a tile), until the
  predicted latency is within the budget (and the MACs within a MACs budget, if one is given);
* **bounds**: the best single ratio on the same steps within the budget is computed first; no
  group keeps less than :data:`FLOOR` of the width it leaves that group (a channel of a
  full-resolution layer saves the most time, and on the segmentation benchmark an unbounded
  greedy cut the trunk to a sliver that fine-tuning did not recover from), and where that ratio
  loses less value than the greedy's solution it is kept instead (the greedy is myopic where a
  conv's cost couples two groups).

The greedy is the classic knapsack heuristic (exact for divisible items); HALP solves a 0/1
knapsack by dynamic programming on a fixed latency grid, which the coupled costs here (a
group's cost changes with its neighbours' widths) do not allow. The result is a per-group
ratio, applied by torch-pruning's pruner through ``pruning_ratio_dict``, so everything else
(safety net, plan, attention bookkeeping) is the ordinary prune.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.nn as nn

from ..run import ScoredGroup
from .table import LatencyModel, width_step

__all__ = ["FLOOR", "VALUES", "Allocation", "GroupPlan", "allocate", "plan_groups"]

VALUES = ("importance_macs", "importance")
# no group keeps less than this fraction of the width the best single ratio leaves it (0.5 and
# 0.75 / 0.9 were compared on the segmentation benchmark: docs/deploy.md)
FLOOR = 0.75


@dataclass
class GroupPlan:
    """A group as the allocation sees it.

    Attributes:
        group: The scored group.
        effects: ``(layer name, "in" | "out", channels per unit)``: what removing one unit of
            the group removes from each table layer's widths.
        step: Units per step (keeps the group's width on the backend's multiple; a first
            step of the remainder brings an odd width onto it).
        max_units: Most units that may go (``max_pruning_ratio``, and one step left).
        values: Value lost by removing each unit, in removal order (lowest score first).
        fixed: Units the user's ``pruning_ratio_dict`` removes (the group is not allocated).
    """

    group: ScoredGroup
    effects: list[tuple[str, str, float]]
    step: int
    max_units: int
    values: list[float]
    fixed: int | None = None


@dataclass
class Allocation:
    """The widths chosen under a budget.

    Attributes:
        removed: Units removed per group (index into the plans).
        predicted_ms: The latency model's prediction at these widths.
        macs: MACs of the table layers at these widths.
        reached: Whether the budget(s) were met (False: no step that saves latency is left).
        widths: Each table layer's ``(cin, cout)`` at these widths.
        method: ``"greedy"`` (the knapsack) or ``"uniform"`` (one ratio on the multiples,
            kept where it loses less value than the greedy's solution).
    """

    removed: list[int]
    predicted_ms: float
    macs: int
    reached: bool
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    method: str = "greedy"

    def ratios(self, plans: Sequence[GroupPlan]) -> dict[nn.Module, float]:
        """Per-layer ratios for torch-pruning's ``pruning_ratio_dict`` that remove exactly
        these units: ``keep = int(units * (1 - r))`` there, so ``r = (removed - 0.5) /
        units`` keeps ``units - removed``."""
        out: dict[nn.Module, float] = {}
        for plan, k in zip(plans, self.removed):
            if k <= 0 or plan.fixed is not None:
                continue
            r = (k - 0.5) / plan.group.units
            for layer in plan.group.out_layers:
                out[layer] = r
        return out


def plan_groups(groups: Sequence[ScoredGroup], names: dict[nn.Module, str],
                model: LatencyModel, multiple: int, max_pruning_ratio: float,
                value: str = "importance_macs") -> list[GroupPlan]:
    """The groups as allocation items: effects on the table's layers, steps, values.

    Raises:
        ValueError: an unknown ``value``.
    """
    if value not in VALUES:
        raise ValueError(f"unknown allocation value {value!r}; valid: {', '.join(VALUES)}")
    calls: dict[str, list] = {}
    for call, _, _ in model.calls:
        calls.setdefault(call.name, []).append(call)
    plans = []
    for g in groups:
        units = g.units
        effects = []
        macs_per_unit = 0.0
        for module, is_out, n in g.members:
            name = names.get(module)
            if name not in calls:
                continue
            per_unit = n / units
            effects.append((name, "out" if is_out else "in", per_unit))
            for call in calls[name]:
                if call.depthwise and not is_out:
                    continue  # one channel of a depthwise conv: counted once, on its output
                dense = call.macs(call.cin, call.cout)
                macs_per_unit += dense * per_unit / (call.cout if is_out else call.cin)
        channel_step = width_step(g.channels, multiple, g.ch_groups)
        step = max(1, channel_step // g.ch_groups)
        max_units = min(int(math.floor(units * max_pruning_ratio)), units - step)
        imp = g.importance.clamp_min(0)
        mean = float(imp.mean()) if len(imp) else 0.0
        norm = sorted((float(v) / mean if mean > 0 else 1.0) for v in imp)
        weight = g.ch_groups * (macs_per_unit if value == "importance_macs" else 1.0)
        values = [v * weight for v in norm]
        fixed = None
        if g.user_ratio is not None:
            fixed = units - int(units * (1 - g.user_ratio))
        plans.append(GroupPlan(g, effects, step, max(0, max_units), values, fixed))
    return plans


def allocate(plans: Sequence[GroupPlan], model: LatencyModel, budget_ms: float,
             macs_budget: float | None = None, dense_macs: int | None = None,
             floor: float = FLOOR) -> Allocation:
    """Greedy knapsack: remove the steps of least value per millisecond saved until the
    predicted latency is at most ``budget_ms`` (and the table layers' MACs at most
    ``macs_budget`` of ``dense_macs``, if given).

    First the best single ratio within the budget (every group on its steps) is found: it
    bounds the greedy (no group keeps less than ``floor`` times the width that ratio leaves
    it) and is kept instead where it loses less value than the greedy's solution.

    Args:
        plans: From :func:`plan_groups`.
        model: The latency model (its current fit is used).
        budget_ms: Latency budget, in the model's milliseconds.
        macs_budget: Fraction of the dense MACs to keep at most, or None.
        dense_macs: The table layers' dense MACs (needed with ``macs_budget``).
        floor: Fraction of the uniform solution's width every group keeps at least.

    Returns:
        The :class:`Allocation` (``reached=False`` if the budgets could not be met: the widths
        are then the furthest the steps went).
    """
    calls: dict[str, list] = {}
    for call, free_in, free_out in model.calls:
        calls.setdefault(call.name, []).append((call, free_in, free_out))
    removed = [p.fixed or 0 for p in plans]
    cut_in: dict[str, float] = {}
    cut_out: dict[str, float] = {}
    s, b, _ = model.coef
    macs_cap = None if macs_budget is None or dense_macs is None else macs_budget * dense_macs

    def apply(k: int, units: int, sign: int) -> None:
        for name, side, per_unit in plans[k].effects:
            cut = cut_out if side == "out" else cut_in
            cut[name] = cut.get(name, 0.0) + sign * units * per_unit

    def widths_of(name: str) -> tuple[int, int]:
        call = calls[name][0][0]
        cin = int(round(call.cin - cut_in.get(name, 0.0)))
        cout = int(round(call.cout - cut_out.get(name, 0.0)))
        if call.depthwise:  # one width: whichever side the group recorded, both follow it
            return min(cin, cout), min(cin, cout)
        return cin, cout

    def layer_cost(name: str) -> tuple[float, float]:
        cin, cout = widths_of(name)
        ms = sum(model.table.cost(c, fi, fo, cin, cout) for c, fi, fo in calls[name])
        macs = sum(c.macs(cin, cout) for c, _, _ in calls[name])
        return s * ms + b * sum(c.out_per_channel * cout for c, _, _ in calls[name]), macs

    def total() -> tuple[float, int]:
        ms, macs = 0.0, 0
        for name in calls:
            t, m = layer_cost(name)
            ms, macs = ms + t, macs + m
        return ms + model.coef[2], int(macs)

    def evaluate(vector: list[int]) -> tuple[float, int]:
        """Predicted latency and MACs with ``vector`` units removed per group (the state)."""
        cut_in.clear()
        cut_out.clear()
        for k, units in enumerate(vector):
            if units:
                apply(k, units, 1)
        removed[:] = vector
        return total()

    def fits(pred_ms: float, macs_now: int) -> bool:
        return pred_ms <= budget_ms and (macs_cap is None or macs_now <= macs_cap)

    def uniform(ratio: float) -> list[int]:
        """One ratio for every group, kept widths on each group's step."""
        out = []
        for p in plans:
            if p.fixed is not None:
                out.append(p.fixed)
                continue
            keep = p.group.units - int(p.group.units * ratio)
            keep = max(keep - keep % p.step, p.group.units - p.max_units)
            out.append(min(p.group.units - keep, p.max_units))
        return out

    def lost(vector: list[int]) -> float:
        return sum(sum(p.values[:units]) for p, units in zip(plans, vector) if p.fixed is None)

    # the best single ratio within the budget (bisection: latency falls with the ratio)
    lo, hi = 0.0, 1.0
    best_uniform = None
    for _ in range(20):
        mid = (lo + hi) / 2
        vector = uniform(mid)
        pred_u, macs_u = evaluate(vector)
        if fits(pred_u, macs_u):
            best_uniform, hi = (vector, pred_u, macs_u), mid
        else:
            lo = mid
    # the greedy may not thin a group below `floor` of what that ratio leaves it: a channel of
    # a high-resolution layer saves the most time, and a trunk cut to a sliver is a bottleneck
    # fine-tuning does not recover from (seen on the segmentation benchmark)
    limit = [p.max_units for p in plans]
    if best_uniform is not None:
        for k, p in enumerate(plans):
            keep = p.group.units - best_uniform[0][k]
            least = max(p.step, math.ceil(floor * keep))
            limit[k] = max(0, min(p.max_units, p.group.units - least))

    def candidates(k: int) -> list[tuple[float, float, float, int]]:
        """Group k's next moves, 1, 2 or 4 steps (the first step brings the kept width onto the
        multiple): ``(value lost, ms saved, MACs saved, units)`` of those that save time."""
        p = plans[k]
        if p.fixed is not None:
            return []
        names = {name for name, _, _ in p.effects}
        before = [layer_cost(n) for n in names]
        head = (p.group.units - removed[k]) % p.step or p.step
        moves = []
        for n_steps in (1, 2, 4):
            amount = head + (n_steps - 1) * p.step
            if removed[k] + amount > limit[k]:
                break
            apply(k, amount, 1)
            after = [layer_cost(n) for n in names]
            apply(k, amount, -1)
            saved = sum(t for t, _ in before) - sum(t for t, _ in after)
            macs_saved = sum(m for _, m in before) - sum(m for _, m in after)
            lost_value = sum(p.values[removed[k]:removed[k] + amount])
            if saved > 1e-12:
                moves.append((lost_value, saved, macs_saved, amount))
        return moves

    by_layer: dict[str, set[int]] = {}
    for k, p in enumerate(plans):
        for name, _, _ in p.effects:
            by_layer.setdefault(name, set()).add(k)
    neighbours = {k: set().union(*(by_layer[n] for n, _, _ in p.effects)) if p.effects else {k}
                  for k, p in enumerate(plans)}
    pred, macs = evaluate([p.fixed or 0 for p in plans])
    cand = {k: candidates(k) for k in range(len(plans))}
    while not fits(pred, macs):
        latency_bound = pred > budget_ms
        moves = [(k, mv) for k, mvs in cand.items() for mv in mvs]
        if not latency_bound:  # only the MACs budget is left: value lost per MAC saved
            moves = [(k, mv) for k, mv in moves if mv[2] > 0]
        if not moves:
            break
        if latency_bound:
            # the move that crosses the budget: the least value among those that reach it
            # (the best-ratio move could overshoot it by a whole block of layers)
            finishing = [(k, mv) for k, mv in moves if pred - mv[1] <= budget_ms
                         and (macs_cap is None or macs - mv[2] <= macs_cap)]
            if finishing:
                best_k, best = min(finishing, key=lambda t: t[1][0])
            else:
                best_k, best = min(moves, key=lambda t: t[1][0] / t[1][1])
        else:
            best_k, best = min(moves, key=lambda t: t[1][0] / t[1][2])
        amount = best[3]
        apply(best_k, amount, 1)
        removed[best_k] += amount
        for k in neighbours[best_k]:
            cand[k] = candidates(k)
        pred, macs = total()
    greedy = (list(removed), pred, macs, fits(pred, macs))
    chosen, method = greedy, "greedy"
    if best_uniform is not None and (not greedy[3] or lost(best_uniform[0]) < lost(greedy[0])):
        chosen, method = (best_uniform[0], best_uniform[1], best_uniform[2], True), "uniform"
    pred, macs = evaluate(chosen[0])
    widths = {name: widths_of(name) for name in calls}
    return Allocation(list(chosen[0]), pred, macs, chosen[3], widths, method)
