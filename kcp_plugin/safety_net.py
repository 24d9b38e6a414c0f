"""The safety net around a prune: when a run breaks the model, find the channel group
responsible by bisection, keep it, and prune the rest.

torch-pruning traces some models inconsistently (see :mod:`kcp_plugin.depgraph`); the checks
in :mod:`kcp_plugin.safety` catch what can be seen before pruning, this catches what only a
pruned forward shows.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch.nn as nn

from .run import (
    BrokenRun,
    GroupEntry,
    Job,
    RunSettings,
    all_group_entries,
    run_pruner,
    trial_copy,
)
from .safety import ProtectedGroup, UnprunableError, describe_exception, verify_outputs
from .search import Outcome, Target, prune_to_target
from .snapshot import ModuleSnapshot

__all__ = ["MAX_PROTECTED", "find_culprit", "listing", "prune_protecting"]

# At most this many groups are protected one by one after failing verification.
MAX_PROTECTED = 24


def listing(records: list[ProtectedGroup], advice: bool = True) -> str:
    """The protected groups as an indented list for an error or warning ("" if none).

    ``advice=False`` for a refusal: its own message says which ways out were tried, and the
    general advice of the warning (untried there) would contradict it."""
    if not records:
        return ""
    tail = ("\n(these groups stay unpruned; passing their roots in ignored_layers skips the "
            "checks next time but prunes nothing more: to reach a lower MACs or latency target, "
            "prune the other layers harder with max_pruning_ratio, or ask for less)") if advice \
        else "\n(the groups the safety net kept unpruned)"
    return "".join(f"\n  - {r.describe()}" for r in records) + tail


def prune_protecting(
    job: Job,
    names: dict[nn.Module, str],
    snapshot: ModuleSnapshot,
    auto: list[ProtectedGroup],
    settings: RunSettings,
    target: Target,
    selected: dict[str, list[int]] | None,
) -> Outcome:
    """:func:`prune_to_target`, and on a broken run: restore ``job.model`` from ``snapshot``,
    find the group responsible, append it to ``job.protected`` (its record to ``auto``),
    retry.

    Returns:
        :func:`prune_to_target`'s result.

    Raises:
        UnprunableError: no single group is responsible (the run's own error is its
            ``__cause__``), or more than :data:`MAX_PROTECTED` groups break.
    """
    for _attempt in range(MAX_PROTECTED + 1):
        try:
            return prune_to_target(job, names, settings, target, selected)
        except BrokenRun as broken:
            snapshot.restore()
            if selected is not None:
                selected.clear()
            found = find_culprit(job, broken)
            if found is None:
                # not reproducible group by group, or failing with no group pruned (the
                # criterion's own error, torch-pruning's pruner on an inconsistent group):
                # the plugin's refusal, with the original error as its cause, model restored
                raise UnprunableError(
                    f"pruning breaks this model ({broken.reason}), and no single channel "
                    "group could be found responsible: the run fails with no group pruned, or "
                    "only with several pruned together (the failure may be in the criterion "
                    "or in torch-pruning's pruner itself). The model is unchanged. Not tried: "
                    "ignored_layers=[...] around the failing operation (see the traceback of "
                    "this error's cause), or another criterion"
                    + listing(auto, advice=False), auto) from broken.__cause__
            for module, record in found:
                job.protected.append(module)
                auto.append(record)
    raise UnprunableError(
        f"more than {MAX_PROTECTED} channel groups of this model break when pruned; "
        "torch-pruning cannot trace it reliably" + listing(auto, advice=False), auto)


def find_culprit(job: Job, broken: BrokenRun
                 ) -> list[tuple[nn.Module, ProtectedGroup]] | None:
    """The channel group whose pruning breaks the model, found by bisection on copies, with
    its look-alikes.

    The pruner yields its groups in a fixed order; pruning only the first ``k`` of them
    (``k`` bisected between a prefix that works and one that breaks) finds the group after
    which the model breaks. Groups of the same structure elsewhere (the same layers of
    another block: names equal up to their numbers, the same couplings) fail the same way,
    since what breaks is how torch-pruning traces that structure; unless one run shows the
    culprit alone was the problem, they are protected with it rather than found one bisection
    at a time (a Twins-SVT had 20 such groups: 133 trial prunes, 3 minutes). A look-alike that
    would not have failed costs width only, and its record says it was protected as one.

    Returns:
        ``[(protectable layer, record)]``, the culprit first, or ``None`` if the failure does
        not depend on the groups.
    """
    by_name = dict(job.model.named_modules())
    seen: list[GroupEntry] = []
    scoring: list[GroupEntry] = []
    settings = broken.settings  # the same criterion and options as the run that broke

    def trial(limit: int | None) -> str | None:
        trial = trial_copy(job, broken.extra)
        log = seen if limit is None else None
        try:
            run_pruner(trial, broken.ratio, replace(settings, progress=False),
                       limit=limit, groups_seen=log, scoring_failed=scoring)
        except Exception as exc:
            return describe_exception(exc)
        return verify_outputs(trial.model, settings.example_inputs, settings.forward_fn,
                              settings.signature)

    reason = trial(None)
    if reason is None:
        return None
    if scoring and scoring[0][0] in by_name:
        # torch-pruning raised while scoring a group, before pruning any: that group is the
        # one to blame (its layers, not a prefix of pruned groups)
        culprit, last = scoring[0], f"torch-pruning fails scoring its channels: {reason}"
    else:
        if not seen or trial(0) is not None:  # fails with no group pruned: none is to blame
            return None
        lo, hi = 0, len(seen)  # trial(lo) works, trial(hi) breaks
        last = reason
        while hi - lo > 1:
            mid = (lo + hi) // 2
            problem = trial(mid)
            if problem is None:
                lo = mid
            else:
                hi, last = mid, problem
        culprit = seen[hi - 1]
    root, layers, coupled = culprit
    found = [(by_name[root], ProtectedGroup(root=root, layers=layers, couplings=coupled,
                                            reason=last))]
    shape = _structure(culprit)
    protected = set(job.protected)
    # look-alikes among every group, not only those pruned before the failure: the pruner
    # stops at the first group that raises, and its look-alikes come after it (Sequencer2D's
    # 18 LSTM groups took 127 trial prunes when found one at a time)
    try:
        everyone = all_group_entries(job, broken.ratio, replace(settings, progress=False))
    except Exception:  # the trace itself fails: the groups seen are all there is
        everyone = []
    siblings, named = [], {root}
    for e in [*seen, *everyone]:
        if e[0] not in named and e[0] in by_name and by_name[e[0]] not in protected \
                and _structure(e) == shape:
            siblings.append(e)
            named.add(e[0])
    if siblings:  # one run tells whether the culprit alone was the problem
        alone = replace(job, protected=[*job.protected, by_name[root]])
        copy = trial_copy(alone, broken.extra)
        try:
            run_pruner(copy, broken.ratio, replace(settings, progress=False))
            works = verify_outputs(copy.model, settings.example_inputs, settings.forward_fn,
                                   settings.signature) is None
        except Exception:
            works = False
        if works:
            siblings = []
    found += [(by_name[e[0]], ProtectedGroup(
        root=e[0], layers=e[1], couplings=e[2],
        reason=f"the same structure as {root}, which breaks: {last}")) for e in siblings]
    return found


def _structure(entry: GroupEntry) -> tuple:
    """A group's layers with the numbers in their names blanked (``blocks.3.attn.q`` ->
    ``blocks.#.attn.q``), and its couplings: equal for the same layers in another block."""
    root, layers, coupled = entry
    blank = re.compile(r"\d+")
    return (blank.sub("#", root), tuple(sorted(blank.sub("#", n) for n in layers)),
            tuple(sorted(coupled)))
