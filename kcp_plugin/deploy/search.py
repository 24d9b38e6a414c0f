"""The latency target: prune until the measured latency is a given fraction of the dense one.

MACs are a proxy; what a deployment pays is latency on its machine and runtime, and the two
part ways where widths suit the backend badly (odd channel counts in onnxruntime's or cuDNN's
kernels), where compute is not the bottleneck (memory-bound depthwise convs, small layers on a
big GPU), and where MACs are removed from layers that cost little time. Two allocations:

* ``"table"`` (default, :class:`TableAllocator`): HALP's approach for any net, criterion and
  backend. A latency table of the net's layers is measured on the backend
  (:mod:`.table`), every group's width is chosen by a knapsack on the criterion's scores
  against the table's costs (:mod:`.allocation`), and the result is verified end to end: each
  trial prunes a copy with the allocated widths and measures it against the dense model; the
  first trial calibrates the latency model (the non-layer part of the latency), later ones
  search the budget (secant) until the measurement is within tolerance.
* ``"uniform"`` (:func:`prune_to_latency`): one channel ratio for every group, the MACs target
  whose pruned copy keeps the latency searched by secant on measured ``(MACs target, latency
  ratio)`` pairs; ``round_to="auto"`` measures channel multiples (1, 8, 16) first.

No other structured-pruning library we know of has a measured latency target for any net
(NVIDIA ModelOpt constrains FLOPs and parameters; torch-pruning reports MACs ratios; HALP's code
is ResNet-only, torch 1.4, non-commercial).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from ..errors import TargetUnreachable
from ..graph import ForwardFn, default_forward
from ..progress import progress_bar
from ..run import Job, RunSettings, checked_run, group_scores, trial_copy
from ..safety import UnprunableError
from .allocation import VALUES, Allocation, allocate, plan_groups
from .backends import Backend, check_backend, default_multiples
from .latency import LatencyStats, compare_latency, fill_latency
from .table import LatencyModel, LatencyTable, trace_layers

__all__ = ["ALLOCATIONS", "AUTO_ROUND_TO", "LatencyTarget", "TableAllocator",
           "check_latency_target", "prune_to_latency"]

logger = logging.getLogger(__name__)

ALLOCATIONS = ("table", "uniform")
# channel multiples tried by round_to="auto" (1: no rounding)
AUTO_ROUND_TO = (1, 8, 16)


@dataclass(frozen=True)
class LatencyTarget:
    """A latency target: keep ``ratio`` of the dense latency, within ``tolerance`` (absolute,
    as a fraction of the dense latency), measured on ``backend``.

    Attributes:
        ratio: Fraction of the dense latency to keep, in (0, 1].
        tolerance: Allowed gap between measured and target fraction.
        backend: Where and how latency is measured.
        allocation: ``"table"`` (latency-table knapsack) or ``"uniform"`` (one ratio).
        max_trials: Pruned copies measured at most.
        levels: Latency-table grid points per prunable width (``"table"``).
        value: What the knapsack keeps (``"importance_macs"`` or ``"importance"``).
        macs_ratio: Also keep at most this fraction of the MACs (``"table"`` only).
    """

    ratio: float
    tolerance: float = 0.025
    backend: Backend = field(default_factory=Backend)
    allocation: str = "table"
    max_trials: int = 8
    levels: int = 6
    value: str = "importance_macs"
    macs_ratio: float | None = None


def check_latency_target(target: LatencyTarget, imports: bool = True) -> None:
    """Validate a latency target before anything is measured or pruned (``imports``: also
    that the backend's runtime is there).

    Raises:
        ValueError: a bad ratio, tolerance, allocation or backend (see
            :func:`kcp_plugin.deploy.backends.check_backend`).
        ImportError: ``"onnxruntime"`` without the ``deploy`` extra.
    """
    from ..hints import did_you_mean

    if not isinstance(target.ratio, (int, float)) or isinstance(target.ratio, bool) \
            or not 0 < target.ratio <= 1:
        raise ValueError(f"target_latency_ratio must be in (0, 1], got {target.ratio!r}")
    if not isinstance(target.tolerance, (int, float)) or not 0 < target.tolerance <= 0.5:
        raise ValueError(f"latency_tolerance must be in (0, 0.5], got {target.tolerance!r}")
    if target.allocation not in ALLOCATIONS:
        raise ValueError(f"unknown latency_allocation {target.allocation!r}; valid: "
                         f"{', '.join(ALLOCATIONS)}"
                         + did_you_mean(str(target.allocation), ALLOCATIONS))
    if target.value not in VALUES:
        raise ValueError(f"unknown allocation value {target.value!r}; valid: "
                         f"{', '.join(VALUES)}")
    if target.backend.runs < 3:
        raise ValueError(f"a latency target needs >= 3 timed passes per measurement, got "
                         f"runs={target.backend.runs}")
    check_backend(target.backend, imports=imports)


# ---------------------------------------------------------------------------- table allocation
class TableAllocator:
    """The ``allocate`` strategy of a latency target (``latency_allocation="table"``).

    Called by :func:`kcp_plugin.search.prune_to_target` with the prune's job and settings
    (protected layers, criterion, data), it scores the groups, builds the latency model of the
    dense net once (table measured or read from the cache, the dense model measured end to
    end), and searches the budget with measured trials (module docstring). The prune itself is
    then an ordinary run with the chosen per-group ratios.

    Attributes:
        latency_model: The calibrated :class:`~.table.LatencyModel` (after the first call).
        trials: One dict per measured trial: ``budget_ratio``, ``predicted`` and ``measured``
            latency ratios, ``macs`` (table layers' MACs kept).
        allocation: The chosen :class:`~.allocation.Allocation`.
    """

    def __init__(self, target: LatencyTarget, model: nn.Module, example_inputs: Any,
                 forward_fn: ForwardFn | None, progress: bool | None):
        self.target = target
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn or default_forward
        self.progress = progress
        self.dense = copy.deepcopy(model)  # the reference of the final measurement
        self.latency_model: LatencyModel | None = None
        self.dense_ms = math.nan
        self.trials: list[dict[str, Any]] = []
        self.allocation: Allocation | None = None
        self.budget = math.nan

    def _measure(self, dense: nn.Module, pruned: nn.Module) -> float:
        """Latency kept by ``pruned`` against ``dense``, passes interleaved."""
        d, p = compare_latency([dense, pruned], self.example_inputs, self.forward_fn,
                               backend=self.target.backend)
        return p.median_ms / d.median_ms

    def _build_model(self, job: Job, names: dict[nn.Module, str], groups: list) -> None:
        free_in, free_out = set(), set()
        for g in groups:
            for module, is_out, _ in g.members:
                (free_out if is_out else free_in).add(names.get(module))
        t = self.target
        calls = trace_layers(self.dense, self.example_inputs, self.forward_fn, t.backend.batch)
        table = LatencyTable(t.backend, levels=t.levels, progress=self.progress)
        lm = LatencyModel(table, [(c, c.name in free_in, c.name in free_out) for c in calls])
        dense_ms = compare_latency([job.model], self.example_inputs, self.forward_fn,
                                   backend=t.backend)[0].median_ms
        lm.add_measurement({}, dense_ms)
        self.latency_model, self.dense_ms = lm, dense_ms
        logger.info("latency table: %d layer calls, %d measured now; the layers explain %.0f%% "
                    "of the dense %.3f ms (%s)", len(calls), table.measured,
                    100 * lm.table_share, dense_ms, t.backend.describe())

    def __call__(self, job: Job, settings: RunSettings
                 ) -> tuple[float, dict[nn.Module, float], list[Any]]:
        t = self.target
        names = {m: n for n, m in job.model.named_modules()}
        groups = group_scores(job, replace(settings, progress=False), keep_hint=t.ratio)
        if not groups:
            raise TargetUnreachable(
                f"target_latency_ratio={t.ratio}: no channel group of this model can be pruned "
                "(all are protected or at max_pruning_ratio)")
        if self.latency_model is None:
            self._build_model(job, names, groups)
        lm = self.latency_model
        assert lm is not None
        plans = plan_groups(groups, names, lm, t.backend.channel_multiple(),
                            settings.max_pruning_ratio, t.value)
        dense_macs = sum(c.macs(c.cin, c.cout) for c, _, _ in lm.calls)
        self.trials = []
        tried: list[tuple[float, float, Allocation, dict[nn.Module, float]]] = []
        closest: tuple[float, nn.Module | None] | None = None
        budget = t.ratio
        bar = progress_bar(enabled=self.progress, total=t.max_trials,
                           desc="latency allocation")
        try:
            for trial_no in range(t.max_trials):
                dense_pred = lm.predict({})  # budgets are fractions of it (refits move it)
                alloc = allocate(plans, lm, budget * dense_pred, t.macs_ratio, dense_macs)
                extra = alloc.ratios(plans)
                predicted = alloc.predicted_ms / dense_pred
                trial_model = None
                if extra:
                    trial = trial_copy(job, {names[m]: r for m, r in extra.items()})
                    checked_run(trial, 0.0, {names[m]: r for m, r in extra.items()},
                                replace(settings, progress=False))
                    trial_model = trial.model
                    kept = self._measure(job.model, trial.model)
                    if trial_no == 0 and abs(kept / max(predicted, 1e-9) - 1) > 0.25:
                        # the calibration point sets the model for every later trial: a
                        # reading this far off the table is re-measured (median of three)
                        again = [kept, self._measure(job.model, trial.model),
                                 self._measure(job.model, trial.model)]
                        kept = sorted(again)[1]
                    widths = lm.widths_of(trial.model)
                    del trial
                else:
                    kept, widths = 1.0, {}
                if closest is None or abs(kept - t.ratio) < abs(closest[0] - t.ratio):
                    closest = (kept, trial_model)  # kept to re-measure before refusing
                # the first pruned point calibrates the model's non-layer terms; later points
                # only check it (a model refitted between trials would move the search's target)
                lm.add_measurement(widths, kept * self.dense_ms, refit=trial_no == 0)
                self.trials.append({"budget_ratio": round(budget, 4),
                                    "predicted": round(predicted, 4), "measured": round(kept, 4),
                                    "macs": round(alloc.macs / max(dense_macs, 1), 4),
                                    "reached": alloc.reached, "method": alloc.method})
                tried.append((budget, kept, alloc, extra))
                bar.update(1)
                bar.set_postfix(budget=f"{budget:.3f}", latency=f"{kept:.3f}")
                logger.info("latency allocation: budget %.3f -> predicted %.3f, measured %.3f "
                            "of the dense latency", budget, predicted, kept)
                if abs(kept - t.ratio) <= t.tolerance:
                    break
                if t.macs_ratio is not None and kept < t.ratio and alloc.reached:
                    break  # faster than asked: the MACs budget bound first, nothing to undo
                if not alloc.reached and kept > t.ratio:
                    break  # the steps ran out: nothing more to remove
                budget = self._next_budget(tried, trial_no)
                if budget is None:
                    break
        finally:
            bar.close()
        best = min(tried, key=lambda r: abs(r[1] - t.ratio))
        if best[1] > t.ratio + t.tolerance and closest is not None \
                and closest[1] is not None and best[1] < t.ratio + 3 * t.tolerance:
            # a near miss can be one noisy reading: the closest model measured twice more
            again = sorted([best[1], self._measure(job.model, closest[1]),
                            self._measure(job.model, closest[1])])[1]
            logger.info("latency allocation: the closest trial measured again: %.3f", again)
            i = tried.index(best)
            best = (best[0], again, best[2], best[3])
            tried[i] = best
        closest = None  # the trial model is not needed any more
        if best[1] > t.ratio + t.tolerance:
            raise TargetUnreachable(
                f"target_latency_ratio={t.ratio} is out of reach with this criterion and "
                f"settings: the allocation closest to it keeps {best[1]:.3f} of the dense "
                f"latency ({t.backend.describe()}); ask for a higher target_latency_ratio "
                f"(about {best[1]:.2f} or more here), or let more be pruned "
                "(max_pruning_ratio, fewer ignored_layers)")
        if abs(best[1] - t.ratio) > t.tolerance and not (t.macs_ratio is not None
                                                          and best[1] < t.ratio):
            logger.warning("latency allocation stopped after %d trials at %.3f of the dense "
                           "latency (target %.3f +- %.3f)", len(tried), best[1], t.ratio,
                           t.tolerance)
        self.allocation = best[2]
        self.budget = best[0]
        return 0.0, best[3], [(r["budget_ratio"], r["measured"]) for r in self.trials]

    def _next_budget(self, tried: list, trial_no: int) -> float | None:
        """The next budget (fraction of the predicted dense latency): after the calibration
        trial the target itself again, then secant on ``(budget, measured)`` bracketed by
        the trials on either side of the target (``(1, 1)``: the dense model)."""
        t = self.target
        if trial_no == 0:
            return t.ratio
        points = [(b, k) for b, k, _, _ in tried[1:]] + [(1.0, 1.0)]
        below = [p for p in points if p[1] < t.ratio]
        above = [p for p in points if p[1] >= t.ratio]
        hi = min(above) if above else (1.0, 1.0)
        if below:
            lo = max(below)
            (b0, k0), (b1, k1) = lo, hi
            nxt = b0 + (t.ratio - k0) * (b1 - b0) / (k1 - k0) if k1 != k0 else (b0 + b1) / 2
            nxt = min(max(nxt, b0 + 0.1 * (b1 - b0)), b1 - 0.1 * (b1 - b0))
        else:  # still too slow: extrapolate from the dense model through the closest trial
            b1, k1 = hi if hi[0] < 1.0 else points[-2] if len(points) > 1 else (1.0, 1.0)
            slope = (1.0 - k1) / (1.0 - b1) if b1 < 1.0 else 1.0
            nxt = b1 - (k1 - t.ratio) / max(slope, 0.2)
            if nxt <= 0.02:
                return None
        if any(abs(nxt - b) < 1e-4 for b, _, _, _ in tried):
            return None
        return nxt

    def finish(self, model: nn.Module, report: Any) -> None:
        """Measure the pruned ``model`` against the dense copy once more (the closest trial
        is the likeliest outlier), and fill the report's latency fields."""
        t = self.target
        dense, pruned = compare_latency([self.dense, model], self.example_inputs,
                                        self.forward_fn, backend=t.backend)
        kept = pruned.median_ms / dense.median_ms
        if abs(kept - t.ratio) > t.tolerance and not (t.macs_ratio is not None
                                                      and kept < t.ratio):
            # one reading off the search's: two more, and the median of the three is the figure
            runs = [(kept, dense, pruned)]
            for _ in range(2):
                d, p = compare_latency([self.dense, model], self.example_inputs,
                                       self.forward_fn, backend=t.backend)
                runs.append((p.median_ms / d.median_ms, d, p))
            kept, dense, pruned = sorted(runs, key=lambda r: r[0])[1]
        lm = self.latency_model
        if lm is not None:
            lm.add_measurement(lm.widths_of(model), kept * self.dense_ms, refit=False)
        macs_bound = t.macs_ratio is not None and self.allocation is not None \
            and kept < t.ratio - t.tolerance
        if macs_bound:
            logger.info("latency target %.3f: the MACs budget %.3f bound first; the pruned "
                        "model keeps %.3f of the dense latency", t.ratio, t.macs_ratio, kept)
        elif abs(kept - t.ratio) > t.tolerance:
            warnings.warn(
                f"latency target {t.ratio}: the pruned model measures {kept:.3f} of the dense "
                f"latency after the prune (median of three measurements), where the search "
                "measured it within the tolerance: the measurements are unstable on this "
                "machine; measure again (kcp_plugin.compare_latency), raise the backend's "
                "runs, or prune on a quiet machine", UserWarning, stacklevel=4)
        _fill_report(report, t, dense, pruned, None)
        report.latency_search = [(r["budget_ratio"], 0, r["measured"]) for r in self.trials]
        report.latency_search.append((self.budget, 0, kept))
        summary = lm.summary() if lm is not None else {}
        summary["trials"] = self.trials
        if lm is not None:
            share = lm.table_share
            errors = [abs(e) for e in lm.errors()[1:]]  # after the calibration trial
            summary["calibrated_max_abs_error"] = round(max(errors), 4) if errors else None
            summary["fallback"] = bool(share < 0.5 or (errors and max(errors) > 0.15))
            if summary["fallback"]:
                logger.warning(
                    "the latency table predicts this net poorly on %s (layers explain %.0f%% "
                    "of the latency%s): the widths were checked end to end instead",
                    t.backend.describe(), 100 * share,
                    f", prediction error up to {max(errors):.0%}" if errors else "")
        if self.allocation is not None:
            summary["predicted_widths"] = {k: list(v) for k, v in
                                           self.allocation.widths.items()}
        report.latency_model = summary


def _fill_report(report: Any, target: LatencyTarget, dense: LatencyStats, pruned: LatencyStats,
                 round_to: int | None) -> None:
    report.target_latency_ratio = target.ratio
    report.latency_allocation = target.allocation
    fill_latency(report, target.backend, dense, pruned)
    if round_to is not None:
        report.round_to = round_to


# --------------------------------------------------------------------------- uniform search
def prune_to_latency(
    model: nn.Module,
    example_inputs: Any,
    macs_prune: Callable[..., Any],
    target: LatencyTarget,
    round_to: int | str | None,
    forward_fn: ForwardFn | None,
    progress: bool | None,
    prune_kwargs: dict[str, Any],
) -> Any:
    """Prune ``model`` in place with one channel ratio until its measured latency is
    ``target.ratio`` of the dense one (``latency_allocation="uniform"``).

    Args:
        model: The model (pruned in place at the end only; trials prune deep copies).
        example_inputs: The inputs latency is measured on (and traced with).
        macs_prune: :func:`kcp_plugin.prune` (passed in to avoid an import cycle).
        target: The latency target and how to measure it.
        round_to: Channel multiple, ``None`` (the backend's default multiple, as for a MACs
            target), or ``"auto"`` (1, 8 and 16 measured, the fastest kept).
        forward_fn: How to call the model (also for the timing).
        progress: Show a progress bar.
        prune_kwargs: Every other :func:`kcp_plugin.prune` argument (criterion, protections...).

    Returns:
        The final prune's :class:`kcp_plugin.PruneReport`, with ``target_latency_ratio``,
        ``latency_backend`` / ``latency_setting``, ``latency_before_ms`` /
        ``latency_after_ms``, ``round_to`` and ``latency_search`` (``(MACs target, round_to,
        latency kept)`` per trial; the last entry is the model itself, measured again after
        the prune, which the latency fields report) filled in.

    Raises:
        TargetUnreachable: the target is out of reach: even the smallest MACs the criterion
            reaches keep more latency than asked (the model is untouched).
    """
    fwd = forward_fn or default_forward
    backend = target.backend
    trials: list[tuple[float, int, float]] = []
    stats_of: dict[tuple[float, int], Any] = {}
    bar = progress_bar(enabled=progress, total=target.max_trials + len(AUTO_ROUND_TO),
                       desc="searching latency")

    def kept(macs_ratio: float, multiple: int) -> float:
        """Latency kept by a copy pruned to ``macs_ratio`` of the MACs (measured)."""
        key = (round(macs_ratio, 6), multiple)
        if key not in stats_of:
            trial = copy.deepcopy(model)
            if macs_ratio < 1.0:
                try:
                    with warnings.catch_warnings():  # said once, by the final prune
                        warnings.simplefilter("ignore", UserWarning)
                        macs_prune(trial, example_inputs, target_macs_ratio=macs_ratio,
                                   round_to=multiple, forward_fn=forward_fn, progress=False,
                                   **prune_kwargs)
                except UnprunableError as exc:
                    raise TargetUnreachable(
                        f"target_latency_ratio={target.ratio}: the search needed a model with "
                        f"{macs_ratio:.3f} of the MACs, which this criterion and these settings "
                        f"cannot reach ({exc})") from exc
            dense, pruned = compare_latency([model, trial], example_inputs, fwd,
                                            backend=backend)
            stats_of[key] = (dense, pruned)
            ratio = pruned.median_ms / dense.median_ms
            trials.append((macs_ratio, multiple, ratio))
            bar.update(1)
            bar.set_postfix(macs=f"{macs_ratio:.3f}", latency=f"{ratio:.3f}")
            logger.info("latency search: %.3f of the MACs (round_to %d) keeps %.3f of the "
                        "latency (%s)", macs_ratio, multiple, ratio, pruned.describe())
        dense, pruned = stats_of[key]
        return pruned.median_ms / dense.median_ms

    try:
        # first guess: latency follows MACs
        m = target.ratio
        if round_to == "auto":
            measured = {}
            for k in AUTO_ROUND_TO:
                try:
                    measured[k] = kept(m, k)
                except UnprunableError:  # a multiple wider than the layers: cannot prune
                    logger.info("round_to %d cannot reach %.3f of the MACs; skipped", k, m)
            if not measured:
                raise TargetUnreachable(f"target_latency_ratio={target.ratio}: no channel "
                                        f"multiple of {AUTO_ROUND_TO} reaches {m:.3f} of the "
                                        "MACs")
            multiple = min(measured, key=measured.__getitem__)
        else:
            multiple = int(round_to or default_multiples(model, [], backend.channel_multiple())[0])
        lo: tuple[float, float] | None = None  # (MACs target, latency kept) below the target
        hi = (1.0, 1.0)  # the dense model
        floor = 0.1  # below a tenth of the MACs, a latency target is not what is wanted
        unreachable = 0.0  # MACs targets at or below this could not be pruned to
        point = m
        for _ in range(target.max_trials):
            try:
                lat: float | None = kept(point, multiple)
            except UnprunableError:  # these settings cannot prune that far: search above it
                unreachable, lat = max(unreachable, point), None
            if lat is not None:
                if abs(lat - target.ratio) <= target.tolerance:
                    break
                if lat > target.ratio:
                    hi = min(hi, (point, lat))
                else:
                    lo = max(lo, (point, lat)) if lo is not None else (point, lat)
            low_end = max(floor, unreachable + 0.02)
            if lo is None:  # no bracket yet: extrapolate towards 0 from the dense model
                if hi[0] <= low_end + 1e-9:
                    limit = (f"; these settings cannot prune below {unreachable:.3f} of the MACs"
                             if unreachable else "")
                    raise TargetUnreachable(
                        f"target_latency_ratio={target.ratio} is out of reach with this "
                        f"criterion and settings: at {hi[0]:.3f} of the MACs the latency is "
                        f"still {hi[1]:.3f} of dense ({backend.describe()}){limit}; ask for a "
                        "higher target_latency_ratio, or let more be pruned (max_pruning_ratio, "
                        "fewer ignored_layers); latency_allocation='table' chooses the widths "
                        "for latency")
                slope = (hi[1] - 1.0) / (hi[0] - 1.0) if hi[0] < 1.0 else 1.0
                point = max(low_end, hi[0] + (target.ratio - hi[1]) / max(slope, 0.2))
            else:  # secant inside the bracket
                (m0, l0), (m1, l1) = lo, hi
                point = m0 + (target.ratio - l0) * (m1 - m0) / (l1 - l0) if l1 != l0 \
                    else (m0 + m1) / 2
                point = min(max(point, m0 + 0.1 * (m1 - m0)), m1 - 0.1 * (m1 - m0))
        measured_pts = [(m_, lat_) for m_, k_, lat_ in trials if k_ == multiple]
        if not measured_pts:
            raise TargetUnreachable(f"target_latency_ratio={target.ratio}: no pruned model "
                                    "could be measured with these settings")
        macs_ratio, lat = min(measured_pts, key=lambda t: abs(t[1] - target.ratio))
        if lat > target.ratio + target.tolerance:
            raise TargetUnreachable(
                f"target_latency_ratio={target.ratio} is out of reach with this criterion and "
                f"settings: the closest pruned model keeps {lat:.3f} of the dense latency "
                f"({backend.describe()}, round_to {multiple}); ask for a higher "
                "target_latency_ratio, or let more be pruned (max_pruning_ratio, fewer "
                "ignored_layers); latency_allocation='table' chooses the widths for latency")
        if abs(lat - target.ratio) > target.tolerance:
            logger.warning("latency search stopped after %d trials at %.3f of the dense latency "
                           "(target %.3f +- %.3f)", len(trials), lat, target.ratio,
                           target.tolerance)
    finally:
        bar.close()
    dense_copy = copy.deepcopy(model)
    report = macs_prune(model, example_inputs, target_macs_ratio=macs_ratio,
                        round_to=multiple, forward_fn=forward_fn, progress=progress,
                        **prune_kwargs)
    # a second, independent measurement of what was chosen: on a loaded machine one
    # measurement can be an outlier, and the closest trial is the likeliest to be one
    dense, pruned = compare_latency([dense_copy, model], example_inputs, fwd, backend=backend)
    del dense_copy
    again = pruned.median_ms / dense.median_ms
    trials.append((macs_ratio, multiple, again))
    if abs(again - target.ratio) > target.tolerance:
        warnings.warn(
            f"latency target {target.ratio}: the pruned model measures {again:.3f} of the dense "
            f"latency on a second measurement ({lat:.3f} in the search): the measurements are "
            "unstable on this machine; raise the backend's runs or measure on a quiet machine",
            UserWarning, stacklevel=3)
    _fill_report(report, target, dense, pruned, multiple)
    report.latency_search = trials
    return report
