"""The MACs search: which channel ratio keeps a target fraction of a model's MACs.

Each trial prunes a deep copy (:func:`kcp_plugin.run.checked_run`) and counts its MACs; the
search is regula falsi on the ratio, then a group-by-group mix of the two bracketing ratios
where single channels are worth more than the tolerance.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch.nn as nn
import torch_pruning as tp

from .errors import TargetUnreachable, UnprunableError
from .graph import build_graph, count_macs_params
from .progress import progress_bar
from .run import BrokenRun, Job, RunSettings, checked_run, trial_copy
from .snapshot import ModuleSnapshot
from .tracking import track_pruning

__all__ = ["Outcome", "Target", "prune_to_target", "search_ratio"]

logger = logging.getLogger(__name__)


# ``allocate(job, settings) -> (channel ratio, per-layer ratios, trials)``: chooses the widths
# itself (latency-aware allocation, kcp_plugin.deploy.search.TableAllocator)
Allocate = Callable[[Job, RunSettings], tuple[float, dict[nn.Module, float], list[Any]]]


@dataclass(frozen=True)
class Target:
    """What a prune aims at: ``macs_ratio`` (fraction of ``macs_dense`` kept, within
    ``tolerance``) searched for, a fixed channel ``pruning_ratio``, or per-group widths
    chosen by an ``allocate`` strategy (which then owns the search)."""

    macs_ratio: float | None
    pruning_ratio: float | None
    macs_dense: int
    tolerance: float
    allocate: Allocate | None = None


@dataclass
class Outcome:
    """A finished prune: the channel ratio used, the search trials ``(ratio, MACs kept)``,
    MACs and parameters after, and the pruning history and attention attributes (the plan)."""

    ratio: float
    search: list[tuple[float, float]]
    macs: int
    params: int
    history: list
    attrs: dict[str, dict[str, Any]]


def prune_to_target(
    job: Job,
    names: dict[nn.Module, str],
    settings: RunSettings,
    target: Target,
    selected: dict[str, list[int]] | None,
) -> Outcome:
    """Search the ratio (if a MACs target is given), prune ``job.model`` and verify it.

    Raises:
        BrokenRun: a trial or the final prune crashed or broke the model's outputs.
    """
    # With local pruning, each layer's width depends only on the ratio, not on the scores,
    # so the MACs search can use a cheap scorer; the result is verified and, should the real
    # criterion leave some group alone, searched again with the real criterion.
    model, target_macs_ratio, macs0 = job.model, target.macs_ratio, target.macs_dense
    fast = target_macs_ratio is not None and not settings.global_pruning
    search: list[tuple[float, float]] = []
    snapshot = ModuleSnapshot(model)
    if target.allocate is not None:
        ratio, extra, search = target.allocate(job, settings)
        with track_pruning():
            history, attrs = checked_run(
                replace(job, ratio_dict={**extra, **job.ratio_dict}), ratio,
                {names[m]: v for m, v in extra.items()}, settings, record=selected)
        macs1, params1 = count_macs_params(model, settings.example_inputs, settings.forward_fn)
        return Outcome(ratio, search, macs1, params1, history, attrs)
    while True:
        if target_macs_ratio is not None:
            trial_settings = settings
            if fast:
                trial_settings = replace(
                    settings, importance=tp.importance.GroupMagnitudeImportance(),
                    loss_fn=None, data=None)
            ratio, extra, search = search_ratio(job, target_macs_ratio, macs0,
                                                target.tolerance, trial_settings)
            if settings.max_ratio_fallback is not None \
                    and max([ratio, *extra.values()]) > settings.max_pruning_ratio:
                # the search raised the default cap (and said so): the final run, and a search
                # again with the real criterion, prune under the cap its trials had
                settings = replace(settings, max_pruning_ratio=settings.max_ratio_fallback,
                                   max_ratio_fallback=None)
        else:
            ratio, extra = float(target.pruning_ratio or 0.0), {}
        with track_pruning():
            history, attrs = checked_run(
                replace(job, ratio_dict={**extra, **job.ratio_dict}), ratio,
                {names[m]: v for m, v in extra.items()}, settings, record=selected)
        macs1, params1 = count_macs_params(model, settings.example_inputs, settings.forward_fn)
        if fast and abs(macs1 / macs0 - target_macs_ratio) > target.tolerance:
            logger.info("criterion left some groups alone; searching with it instead")
            snapshot.restore()
            if selected is not None:
                selected.clear()
            fast = False
            continue
        return Outcome(ratio, search, macs1, params1, history, attrs)


def search_ratio(
    job: Job,
    target: float,
    macs0: int,
    tol: float,
    settings: RunSettings,
    max_trials: int = 14,
    pinned: dict[str, float] | None = None,
) -> tuple[float, dict[nn.Module, float], list[tuple[float, float]]]:
    """Find pruning settings whose pruned model keeps ``target`` of the MACs (within ``tol``).

    Each trial prunes a deep copy with the given criterion and settings. First the uniform
    channel ratio: MACs kept fall monotonically with it, roughly as ``(1 - r)^2``, so regula
    falsi on ``sqrt(MACs kept)`` brackets the answer in a few trials. On narrow networks one
    channel per layer can be worth more than the tolerance; then the two bracketing ratios are
    mixed: the first ``k`` groups (in graph order) get the higher one, and ``k`` is bisected,
    which moves the MACs in steps of single groups. One group can still jump over the target
    on its own (FPN's summed pyramid levels behind GroupNorms of 32 groups move 32 channels at
    a time, a sixth of the MACs): that group is then pinned at each of its two widths in turn
    and the ratio of all the others searched again (``pinned``: per-layer ratios by root
    name that every trial keeps).

    Raises:
        TargetUnreachable: no setting tried is within ``tol``; the message gives the closest
            one and the ``macs_tolerance`` that accepts it (the only way out that was tried).

    Returns:
        ``(ratio, extra per-layer ratios, trials as (ratio, MACs kept))``.
    """
    trials: list[tuple[float, float]] = []
    model = job.model
    pinned = dict(pinned or {})
    uniform: dict[float, float] = {}  # MACs kept by uniform ratios tried: none is tried twice

    def macs_kept(r: float, extra: dict[str, float] | None = None) -> float:
        extra = {**(extra or {}), **pinned}
        if r == 0.0 and not extra:
            return 1.0
        if not extra and r in uniform:
            return uniform[r]
        trial = trial_copy(job, extra)
        checked_run(trial, r, dict(extra), replace(
            settings, progress=False, max_pruning_ratio=max(r, settings.max_pruning_ratio)))
        kept = count_macs_params(trial.model, settings.example_inputs, settings.forward_fn)[0]
        trials.append((r, kept / macs0))
        if not extra:
            uniform[r] = kept / macs0
        bar.update(1)
        bar.set_postfix(ratio=f"{r:.3f}", macs=f"{kept / macs0:.3f}")
        return kept / macs0

    bar = progress_bar(enabled=settings.progress, total=max_trials + 8,
                       desc="searching channel ratio")
    try:
        lo, m_lo = 0.0, 1.0
        hi = settings.max_pruning_ratio
        modules = dict(model.named_modules())

        raised: list[str] = []  # the warning of a raised cap, given once the search succeeds

        def announce() -> None:
            for message in raised:
                warnings.warn(message, UserWarning, stacklevel=4)

        def found(r: float, extra: dict[str, float]) -> tuple[float, dict[nn.Module, float],
                                                              list[tuple[float, float]]]:
            announce()
            return r, {modules[n]: v for n, v in {**extra, **pinned}.items()}, trials

        if abs(1.0 - target) <= tol and not pinned:
            return found(0.0, {})
        # First guess: MACs kept ~ (1 - r)^2. Where it undershoots the target, it brackets the
        # answer with r = 0 and the trial at max_pruning_ratio is not needed (one trial of
        # the three a ResNet-50 took); where it lands within the tolerance, it is the answer.
        guess, m_hi = 1.0 - math.sqrt(target), None
        if 0.0 < guess < hi:
            m_guess = macs_kept(guess)
            if abs(m_guess - target) <= tol:
                return found(guess, {})
            if m_guess > target:
                lo, m_lo = guess, m_guess
            else:
                hi, m_hi = guess, m_guess
        if m_hi is None:
            m_hi = macs_kept(hi)
        if m_hi > target + tol:
            # MACs kept are not always monotonic in the ratio: where a block slices its output
            # at a stored width (GhostNet's out[:, :out_chs]), which channels go decides the
            # widths, and the largest ratio can keep more than smaller ones. A few coarse
            # ratios find a bracket in that case.
            for r in (0.3, 0.5, 0.7):
                if lo < r < hi:
                    m = macs_kept(r)
                    if m <= target + tol:
                        hi, m_hi = r, m
                        break
        fallback = settings.max_ratio_fallback
        if m_hi > target + tol and fallback is not None and hi < fallback and not pinned:
            # the cap is prune's default, not the user's: where only a higher one reaches the
            # target, use it and say so, rather than refuse and have the user search again
            m_fallback = _kept_unless_broken(macs_kept, fallback, m_hi)
            if m_fallback <= target + tol:
                raised.append(
                    f"target_macs_ratio={target} needs more than the default "
                    f"max_pruning_ratio={settings.max_pruning_ratio} (which keeps {m_hi:.3f} of "
                    f"the MACs): layers lose up to {fallback} of their channels instead "
                    f"({fallback} keeps {m_fallback:.3f}, tried); pass "
                    f"max_pruning_ratio={settings.max_pruning_ratio} to keep the cap and be "
                    "refused instead")
                lo, m_lo, hi, m_hi = hi, m_hi, fallback, m_fallback
                settings = replace(settings, max_pruning_ratio=fallback,
                                   max_ratio_fallback=None)
        if m_hi > target + tol:
            raise TargetUnreachable(_out_of_reach(job, target, tol, hi, m_hi, macs_kept))
        if abs(m_hi - target) <= tol:
            return found(hi, {})
        bracket = [(lo, m_lo), (hi, m_hi)]
        side = 0
        f_lo, f_hi = math.sqrt(m_lo), math.sqrt(m_hi)
        for _ in range(max_trials - 1):
            # regula falsi on sqrt(MACs) with the Illinois modification
            g_lo, g_hi = f_lo - math.sqrt(target), f_hi - math.sqrt(target)
            r = hi - g_hi * (hi - lo) / (g_hi - g_lo) if g_hi != g_lo else (lo + hi) / 2
            if not lo < r < hi or hi - lo < 1e-4:
                r = (lo + hi) / 2
            m = macs_kept(r)
            if abs(m - target) <= tol:
                return found(r, {})
            if m > target:
                lo, m_lo, f_lo = r, m, math.sqrt(m)
                if side == -1:
                    f_hi = math.sqrt(target) + (f_hi - math.sqrt(target)) / 2
                side = -1
            else:
                hi, m_hi, f_hi = r, m, math.sqrt(m)
                if side == 1:
                    f_lo = math.sqrt(target) + (f_lo - math.sqrt(target)) / 2
                side = 1
            bracket = [(lo, m_lo), (hi, m_hi)]
            if hi - lo < 1e-3:
                break
        # Mix the bracketing ratios group by group.
        (lo, m_lo), (hi, m_hi) = bracket
        roots = [n for n in _group_roots(model, job.protected, settings) if n not in pinned]
        best = min(bracket, key=lambda t: abs(t[1] - target))[1]
        a, b = 0, len(roots)
        while b - a > 1:
            k = (a + b) // 2
            extra = {roots[j]: hi for j in range(k)}
            m = macs_kept(lo, extra)
            best = m if abs(m - target) < abs(best - target) else best
            if abs(m - target) <= tol:
                return found(lo, extra)
            a, b = (k, b) if m > target else (a, k)
        if not pinned and a < len(roots):
            # roots[a] alone jumps over the target: pin it at each of its widths, and search
            # the ratio of the others again (they move in finer steps)
            for width in (lo, hi):
                try:
                    r, extra, more = search_ratio(job, target, macs0, tol, settings,
                                                  max_trials, pinned={roots[a]: width})
                except TargetUnreachable as exc:
                    closest = getattr(exc, "closest", None)
                    if closest is not None and abs(closest - target) < abs(best - target):
                        best = closest
                    continue
                announce()
                return r, extra, trials + more
        coarse = "" if not pinned else f" (also with {len(pinned)} group pinned)"
        error = TargetUnreachable(
            f"could not reach target_macs_ratio={target} within {tol}: the closest setting "
            f"tried{coarse} keeps {best:.4f} of the MACs (channel groups move in steps too "
            f"coarse for this tolerance; round_to={settings.round_to}); "
            f"macs_tolerance={math.ceil(abs(best - target) * 1000) / 1000 + 0.001:g} accepts it"
        )
        error.closest = best
        raise error
    finally:
        bar.close()


# The max_pruning_ratio a refusal tries before it suggests raising it. Not closer to 1:
# torch-pruning leaves a layer whole where a ratio would keep less than one of its channels
# (int(width * (1 - ratio)) == 0), so 0.97 prunes nothing of a 32-channel layer.
MAX_RATIO_TRIED = 0.95


def _kept_unless_broken(macs_kept: Callable[[float], float], ratio: float,
                        otherwise: float) -> float:
    """The MACs kept by a trial at ``ratio`` beyond the cap, or ``otherwise`` where that ratio
    breaks the model: then it is no way out to offer or take (and its BrokenRun must not reach
    the safety net, which would protect groups that break only at a ratio not asked for)."""
    try:
        return macs_kept(ratio)
    except (UnprunableError, BrokenRun):
        return otherwise


def _out_of_reach(job: Job, target: float, tol: float, hi: float, m_hi: float,
                  macs_kept: Callable[[float], float]) -> str:
    """The refusal of a target that pruning everything by ``max_pruning_ratio`` misses, with
    only ways out that were tried: a higher ``max_pruning_ratio`` if one more trial at
    ``MAX_RATIO_TRIED`` reaches the target, else the lowest target reached. (Protecting
    fewer layers is no tried way out: the host and the safety net protect what breaks.)"""
    msg = (f"target_macs_ratio={target} is out of reach: pruning every prunable layer by "
           f"max_pruning_ratio={hi} keeps {m_hi:.3f} of the MACs ({len(job.protected)} "
           "layers protected, a layer per kept group: ignored_layers, the model's input and "
           "output layers, and the root of each group the host library or the safety net "
           "keeps, which its warning counts as groups)")
    if hi < MAX_RATIO_TRIED:
        m_max = _kept_unless_broken(macs_kept, MAX_RATIO_TRIED, m_hi)
        if m_max <= target + tol:
            return (msg + f"; max_pruning_ratio={MAX_RATIO_TRIED} keeps {m_max:.3f} (tried): "
                    "raise max_pruning_ratio to reach the target")
        if m_max < m_hi:
            hi, m_hi = MAX_RATIO_TRIED, m_max
            msg += f"; even max_pruning_ratio={hi} keeps {m_hi:.3f} (tried)"
    lowest = math.ceil(m_hi * 1000) / 1000
    return (msg + f"; the lowest target reached is target_macs_ratio={lowest:g} (with "
            f"max_pruning_ratio={hi})")


def _group_roots(model: nn.Module, protected: list[nn.Module], settings: RunSettings) -> list:
    """Names of the root layers of the prunable groups, in torch-pruning's order."""
    graph = build_graph(model, settings.example_inputs, settings.forward_fn,
                        settings.output_transform)
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for p in protected for m in p.modules()]
    roots = []
    for group in graph.get_all_groups(ignored_layers=ignored,
                                      root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        root = group[0].dep.target.module
        if root in names:
            roots.append(names[root])
    return roots
