"""The latency target: prune until the measured latency is a given fraction of the dense one.

MACs are a proxy; what a deployment pays is latency on its machine and runtime, and the two part
ways where widths suit the backend badly (odd channel counts in onnxruntime's kernels) or where
compute is not the bottleneck (memory-bound depthwise convs). :func:`prune_to_latency` therefore
searches the MACs target whose pruned model, *measured* on these inputs with
:func:`kcp_plugin.compare_latency` (dense and trial interleaved, fixed threads), keeps
``target`` of the dense latency: latency falls with the MACs kept, so a secant search on
``(MACs target, latency ratio)`` pairs, bracketed by the dense model ``(1, 1)``, converges in a
few trials. Each trial prunes a deep copy with the MACs search of :func:`kcp_plugin.prune`; the
chosen MACs target is then applied to the model itself (deterministic: same criterion, same
weights, same widths).

``round_to="auto"`` measures channel multiples (1, 8, 16) at the first trial's MACs target and
keeps the fastest: vectorised kernels often run a width of 64 faster than 61.

No structured-pruning library we know of has a latency target (NVIDIA ModelOpt constrains FLOPs
and parameters; torch-pruning has no target search at all); the measurement follows
:mod:`kcp_plugin.latency`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .graph import ForwardFn, default_forward
from .latency import BACKENDS, compare_latency
from .progress import progress_bar
from .safety import UnprunableError

__all__ = ["AUTO_ROUND_TO", "LatencyTarget", "prune_to_latency"]

logger = logging.getLogger(__name__)

# channel multiples tried by round_to="auto" (1: no rounding)
AUTO_ROUND_TO = (1, 8, 16)


@dataclass(frozen=True)
class LatencyTarget:
    """A latency target: keep ``ratio`` of the dense latency, within ``tolerance`` (absolute,
    as a fraction of the dense latency), measured with ``backend`` on ``threads`` threads over
    ``runs`` interleaved passes after ``warmup`` untimed ones."""

    ratio: float
    tolerance: float = 0.05
    backend: str = "torch"
    threads: int = 1
    runs: int = 10
    warmup: int = 3
    max_trials: int = 8


def check_latency_target(target: LatencyTarget, imports: bool = True) -> None:
    """Validate a latency target before anything is measured (``imports``: also that the
    backend's packages are installed).

    Raises:
        ValueError: a bad ratio, tolerance, backend, thread or run count.
        ImportError: ``backend="onnxruntime"`` without the ``deploy`` extra.
    """
    from .hints import did_you_mean

    if not isinstance(target.ratio, (int, float)) or not 0 < target.ratio <= 1:
        raise ValueError(f"target_latency_ratio must be in (0, 1], got {target.ratio!r}")
    if not 0 < target.tolerance <= 0.5:
        raise ValueError(f"latency_tolerance must be in (0, 0.5], got {target.tolerance!r}")
    if target.backend not in BACKENDS:
        raise ValueError(f"unknown latency_backend {target.backend!r}; valid: "
                         f"{', '.join(BACKENDS)}" + did_you_mean(target.backend, BACKENDS))
    for name, value, low in (("latency_threads", target.threads, 1),
                             ("latency_runs", target.runs, 3)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if imports and target.backend == "onnxruntime":
        from .export import require_deploy

        require_deploy()


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
    """Prune ``model`` in place until its measured latency is ``target.ratio`` of the dense one.

    Args:
        model: The model (pruned in place at the end only; trials prune deep copies).
        example_inputs: The inputs latency is measured on (and traced with).
        macs_prune: :func:`kcp_plugin.prune` (passed in to avoid an import cycle).
        target: The latency target and how to measure it.
        round_to: Channel multiple, ``None``, or ``"auto"`` (measured, see module doc).
        forward_fn: How to call the model (also for the timing).
        progress: Show a progress bar.
        prune_kwargs: Every other :func:`kcp_plugin.prune` argument (criterion, protections...).

    Returns:
        The final prune's :class:`kcp_plugin.PruneReport`, with ``target_latency_ratio``,
        ``latency_backend``, ``latency_before_ms`` / ``latency_after_ms``, ``round_to`` and
        ``latency_search`` (``(MACs target, round_to, latency kept)`` per trial; the last entry
        is the model itself, measured again after the prune, which the latency fields report)
        filled in.

    Raises:
        UnprunableError: the target is out of reach: even the smallest MACs the criterion
            reaches keep more latency than asked (the model is untouched).
    """
    fwd = forward_fn or default_forward
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
                    macs_prune(trial, example_inputs, target_macs_ratio=macs_ratio,
                               round_to=multiple if multiple > 1 else None,
                               forward_fn=forward_fn, progress=False, **prune_kwargs)
                except UnprunableError as exc:
                    raise UnprunableError(
                        f"target_latency_ratio={target.ratio}: the search needed a model with "
                        f"{macs_ratio:.3f} of the MACs, which this criterion and these settings "
                        f"cannot reach ({exc})") from exc
            dense, pruned = compare_latency([model, trial], example_inputs, fwd,
                                            warmup=target.warmup, runs=target.runs,
                                            threads=target.threads, backend=target.backend)
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
                raise UnprunableError(f"target_latency_ratio={target.ratio}: no channel "
                                      f"multiple of {AUTO_ROUND_TO} reaches {m:.3f} of the MACs")
            multiple = min(measured, key=measured.__getitem__)
        else:
            multiple = int(round_to or 1)
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
                    raise UnprunableError(
                        f"target_latency_ratio={target.ratio} is out of reach with this "
                        f"criterion and settings: at {hi[0]:.3f} of the MACs the latency is "
                        f"still {hi[1]:.3f} of dense ({target.backend}, {target.threads} "
                        f"thread(s)){limit}; ask for less, or let more be pruned "
                        "(max_pruning_ratio, fewer ignored_layers); for onnxruntime, "
                        "round_to='auto' often helps (odd widths run slowly there)")
                slope = (hi[1] - 1.0) / (hi[0] - 1.0) if hi[0] < 1.0 else 1.0
                point = max(low_end, hi[0] + (target.ratio - hi[1]) / max(slope, 0.2))
            else:  # secant inside the bracket
                (m0, l0), (m1, l1) = lo, hi
                point = m0 + (target.ratio - l0) * (m1 - m0) / (l1 - l0) if l1 != l0 \
                    else (m0 + m1) / 2
                point = min(max(point, m0 + 0.1 * (m1 - m0)), m1 - 0.1 * (m1 - m0))
        measured = [(m_, lat_) for m_, k_, lat_ in trials if k_ == multiple]
        if not measured:
            raise UnprunableError(f"target_latency_ratio={target.ratio}: no pruned model could "
                                  "be measured with these settings")
        macs_ratio, lat = min(measured, key=lambda t: abs(t[1] - target.ratio))
        if abs(lat - target.ratio) > target.tolerance:
            logger.warning("latency search stopped after %d trials at %.3f of the dense latency "
                           "(target %.3f +- %.3f)", len(trials), lat, target.ratio,
                           target.tolerance)
    finally:
        bar.close()
    dense_copy = copy.deepcopy(model)
    report = macs_prune(model, example_inputs, target_macs_ratio=macs_ratio,
                        round_to=multiple if multiple > 1 else None, forward_fn=forward_fn,
                        progress=progress, **prune_kwargs)
    # a second, independent measurement of what was chosen: on a loaded machine one
    # measurement can be an outlier, and the closest trial is the likeliest to be one
    dense, pruned = compare_latency([dense_copy, model], example_inputs, fwd,
                                    warmup=target.warmup, runs=target.runs,
                                    threads=target.threads, backend=target.backend)
    del dense_copy
    again = pruned.median_ms / dense.median_ms
    trials.append((macs_ratio, multiple, again))
    if abs(again - target.ratio) > target.tolerance:
        logger.warning("latency target %.3f: the pruned model measures %.3f of the dense latency "
                       "on a second measurement (%.3f in the search): the measurements are "
                       "unstable on this machine; raise latency_runs or measure on a quiet "
                       "machine", target.ratio, again, lat)
    report.target_latency_ratio = target.ratio
    report.latency_backend = target.backend
    report.latency_before_ms, report.latency_after_ms = dense.median_ms, pruned.median_ms
    report.round_to = multiple if multiple > 1 else None
    report.latency_search = trials
    return report
