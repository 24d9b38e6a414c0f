"""One-call structural pruning: validate, protect outputs, search a MACs target, prune
atomically."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .attention import detect_num_heads
from .deploy.backends import Backend, as_backend, check_fits, default_multiples, unavailable
from .deploy.latency import compare_latency, fill_latency
from .deploy.search import LatencyTarget, TableAllocator, check_latency_target, prune_to_latency
from .errors import TargetUnreachable, upstream_error
from .graph import (
    ForwardFn,
    LayerRef,
    check_runs,
    checked_graph,
    count_macs_params,
    default_forward,
    output_layers,
    resolve_layers,
)
from .hosts import adapters_for, host_forward, host_pruners
from .plan import extend_plan
from .registry import importance_info, list_importances
from .report import PruneReport, layer_widths
from .run import Job, RunSettings, copy_model
from .safety import UnprunableError, input_layers, invalid_groups, output_signature
from .safety_net import listing, prune_protecting
from .search import MAX_RATIO_TRIED, Outcome, Target
from .snapshot import ModuleSnapshot
from .stats import StatsImportance, StepFn, check_batches

__all__ = ["LATENCY_ARGS", "check_latency_arguments", "prune", "resolve_importance",
           "UnprunableError"]

logger = logging.getLogger(__name__)

# max_pruning_ratio when the caller gives none (a MACs search may raise it to MAX_RATIO_TRIED)
_DEFAULT_MAX_RATIO = 0.9


def resolve_importance(
    importance: str | tp.importance.Importance, importance_kwargs: dict[str, Any] | None = None
) -> tuple[tp.importance.Importance, str, bool]:
    """Turn a registry name or an Importance into ``(importance, description, requires_grad)``.

    Raises:
        ValueError: unknown name, bad arguments, or kwargs given with an instance.
    """
    if isinstance(importance, str):
        info = importance_info(importance)
        from .registry import get_importance

        imp = get_importance(info.name, **(importance_kwargs or {}))
        return imp, info.name, info.requires_grad
    if importance_kwargs:
        raise ValueError("importance_kwargs only apply when importance is a registry name")
    if not callable(importance):
        raise TypeError(
            "importance must be a registry name (see kcp_plugin.list_importances()) or a "
            f"torch_pruning Importance, got {type(importance).__name__}"
        )
    needs_grad = isinstance(
        importance, (tp.importance.GroupTaylorImportance, tp.importance.GroupHessianImportance)
    )
    return importance, criterion_name(importance), needs_grad


def criterion_name(importance: tp.importance.Importance) -> str:
    """How messages and reports name a criterion given as an instance: its registry name if
    its class is a registered factory (``FisherImportance()`` -> ``"fisher"``), else its class
    name (``GroupTaylorImportance``), never the default ``repr`` with a memory address."""
    cls = type(importance)
    for name in list_importances():
        if importance_info(name).factory is cls:
            return name
    return cls.__name__


def _check_ratio(name: str, value: float | None, low: float, high: float, closed: bool) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    ok = low < value <= high if closed else low <= value < high
    if not ok:
        interval = f"({low}, {high}]" if closed else f"[{low}, {high})"
        raise ValueError(f"{name} must be in {interval}, got {value}")


@contextlib.contextmanager
def _no_raw_errors(doing: str = "pruning") -> Iterator[None]:
    """A raw error from inside torch-pruning becomes an :class:`UnprunableError` naming the
    upstream function (``errors.upstream_error``). A context manager, not a wrapper: the
    warnings ``prune`` issues keep pointing at the caller."""
    try:
        yield
    except Exception as exc:
        converted = upstream_error(exc, doing)
        if converted is None:
            raise
        raise converted from exc


def prune(
    model: nn.Module,
    example_inputs: Any,
    importance: str | tp.importance.Importance = "kcp",
    *,
    target_macs_ratio: float | None = None,
    pruning_ratio: float | None = None,
    ignored_layers: Iterable[LayerRef] | None = None,
    iterative_steps: int = 1,
    round_to: int | None = None,
    forward_fn: ForwardFn | None = None,
    output_transform: Callable | None = None,
    global_pruning: bool = False,
    isomorphic: bool = False,
    num_heads: dict[LayerRef, int] | str | None = "auto",
    prune_num_heads: bool = False,
    head_pruning_ratio: float = 0.0,
    pruning_ratio_dict: dict[LayerRef, float] | None = None,
    max_pruning_ratio: float | None = None,
    importance_kwargs: dict[str, Any] | None = None,
    loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    data: Iterable[Any] | None = None,
    data_steps: int | None = None,
    step_fn: StepFn | None = None,
    protect_outputs: bool = True,
    macs_tolerance: float = 0.02,
    unwrapped_parameters: dict[nn.Parameter, int] | None = None,
    customized_pruners: dict[Any, Any] | None = None,
    progress: bool | None = None,
    dry_run: bool = False,
    target_latency_ratio: float | None = None,
    latency_backend: str | Backend | dict[str, Any] | None = None,
    latency_allocation: str = "table",
    latency_tolerance: float = 0.025,
    latency_threads: int | None = None,
    latency_runs: int | None = None,
) -> PruneReport:
    """Prune ``model`` in place with a registered criterion and report what changed.

    Every argument is validated, and ``example_inputs`` are run through the model, before the
    model is touched. If anything fails part-way (including ``KeyboardInterrupt``), the model is
    restored exactly, with its original parameter objects.

    Args:
        model: The model to prune, in place.
        example_inputs: Inputs for tracing: a tensor, a tuple/list of positional inputs, or a
            dict of keyword inputs (or anything ``forward_fn`` accepts).
        importance: Registry name (``kcp_plugin.list_importances()``) or an ``Importance``.
        target_macs_ratio: Fraction of MACs to keep, in (0, 1]; the channel pruning ratio is
            searched until the result is within ``macs_tolerance`` of it.
        pruning_ratio: Channel pruning ratio in [0, 1) (instead of a MACs target).
        ignored_layers: Layers never pruned: modules, qualified names, or module types.
        iterative_steps: Prune in this many steps, re-scoring on the current weights each step.
        round_to: Keep channel counts multiples of this (hardware-friendly widths). Default
            (None) with a MACs target: the channel multiple of ``latency_backend`` (8 on the
            CPU runtimes, 32 on CUDA; :meth:`kcp_plugin.Backend.channel_multiple`), lowered
            for narrow nets (a quarter of the multiple until the median layer is 8 multiples
            wide) and dropped to 1 if the target is out of reach with it; ``report.round_to``
            says which. ``round_to=1`` never rounds (torch-pruning's behaviour); a fixed
            ``pruning_ratio`` is not rounded unless asked. With
            ``latency_allocation="uniform"`` also ``"auto"``: 1, 8 and 16 are measured and the
            fastest is kept.
        forward_fn: ``forward_fn(model, example_inputs)`` if the model is not called as
            ``model(x)`` / ``model(*x)`` / ``model(**x)``.
        output_transform: Maps the model output to tensors for tracing (torch-pruning's).
        global_pruning: Rank channels across layers instead of per layer.
        isomorphic: Isomorphic global ranking (torch-pruning; requires ``global_pruning``).
        num_heads: ``"auto"`` finds attention heads (timm's fused ``qkv`` + ``num_heads``,
            separate ``query`` / ``key`` / ``value`` or ``q_proj`` ... projections with
            ``num_attention_heads`` / ``num_heads``; see :mod:`kcp_plugin.attention`); or a
            dict from projection layers (modules or names) to head counts; or ``None``.
        prune_num_heads: Also remove whole attention heads (``head_pruning_ratio`` of them).
        head_pruning_ratio: Fraction of heads removed when ``prune_num_heads`` is set.
        pruning_ratio_dict: Per-layer channel ratios (modules or names as keys).
        max_pruning_ratio: No layer loses more than this fraction of its channels. None (the
            default): 0.9, which a MACs target search raises to 0.95, with a warning, when only
            that reaches the target; a value given is kept (a target beyond it is refused).
        importance_kwargs: Arguments for the registered criterion.
        loss_fn: ``loss_fn(model) -> loss`` for gradient-based criteria (``taylor``; for
            ``hessian`` return per-sample losses). Called once per pruning step.
        data: Batches for data-driven criteria (``fisher``, ``cdc``...; ``(inputs, targets)``
            by default): statistics are collected on the current model before every pruning
            step (see :func:`kcp_plugin.collect`). Without ``data``, such a criterion must have
            collected its statistics already, and ``iterative_steps`` must be 1.
        data_steps: Batches per collection (default: all of ``data``).
        step_fn: ``step_fn(model, batch) -> loss`` for the collection, replacing the default
            cross-entropy step (see :func:`kcp_plugin.stats.default_step`).
        protect_outputs: Never prune layers whose channels are model outputs (classifier heads,
            segmentation/stereo output convs).
        macs_tolerance: Allowed gap between achieved and target MACs fraction.
        unwrapped_parameters: Raw parameters to prune with their pruning dim (torch-pruning's).
        customized_pruners: Pruners for custom layer types (torch-pruning's).
        progress: Show progress bars (default: only on a terminal).
        dry_run: Leave ``model`` untouched: prune a deep copy and report, in
            ``report.selected``, the output channels of each layer that would be removed (used
            by soft-pruning schedules; needs ``iterative_steps=1``).
        target_latency_ratio: Fraction of the dense *latency* to keep, in (0, 1], measured on
            ``latency_backend`` with ``example_inputs`` (at the backend's batch), within
            ``latency_tolerance``; see :mod:`kcp_plugin.deploy.search`. May be combined with
            ``target_macs_ratio`` (a MACs budget on top, ``latency_allocation="table"``).
        latency_backend: Where latency is measured: ``"torch"`` (eager CPU, the default),
            ``"onnxruntime"`` (exported, ``deploy`` extra) or ``"cuda"``, or a
            :class:`kcp_plugin.Backend` record (device, dtype, batch, threads, runs), or a dict
            of its fields. With a MACs target it sets the default channel multiple, and the
            pruned model is measured against the dense one on it (``report.latency_*``), with
            a warning if it is slower.
        latency_allocation: How a latency target chooses widths: ``"table"`` (default:
            per-group widths by a knapsack on the criterion's scores against a latency table
            measured on the backend, verified end to end) or ``"uniform"`` (one channel ratio
            for all groups, searched on measured latency).
        latency_tolerance: Allowed gap between measured and target latency fraction.
        latency_threads / latency_runs: Deprecated: give ``threads`` / ``runs`` in the
            ``latency_backend`` record.

    Returns:
        A :class:`PruneReport`; the model's cumulative pruning plan is also kept on the model for
        :func:`kcp_plugin.save_pruned`.

    Raises:
        ValueError / TypeError: invalid arguments (the model is untouched).
        kcp_plugin.errors.CriterionError: a gradient or data-driven criterion could not score
            the unpruned model with ``loss_fn`` / ``data`` / ``step_fn`` (or its labels); nothing
            is pruned.
        kcp_plugin.errors.UnprunableError: the target is out of reach, or pruning breaks the
            model and no single channel group can be blamed (the model is restored).
    """
    backend = _latency_backend(latency_backend, latency_threads, latency_runs)
    check_latency_arguments(
        target_latency_ratio, backend, latency_allocation, target_macs_ratio=target_macs_ratio,
        pruning_ratio=pruning_ratio, imports=True,
        prune_kwargs=dict(round_to=round_to, global_pruning=global_pruning,
                          isomorphic=isomorphic, dry_run=dry_run,
                          latency_tolerance=latency_tolerance))
    # the cap in force; a MACs search may raise it (to MAX_RATIO_TRIED) only if none was given
    cap = _DEFAULT_MAX_RATIO if max_pruning_ratio is None else max_pruning_ratio
    allocator: TableAllocator | None = None
    if target_latency_ratio is not None:
        latency = LatencyTarget(target_latency_ratio, latency_tolerance, backend,
                                latency_allocation, macs_ratio=target_macs_ratio)
        if latency_allocation == "uniform":
            others = dict(
                importance=importance, ignored_layers=ignored_layers,
                iterative_steps=iterative_steps, output_transform=output_transform,
                global_pruning=global_pruning, isomorphic=isomorphic, num_heads=num_heads,
                prune_num_heads=prune_num_heads, head_pruning_ratio=head_pruning_ratio,
                pruning_ratio_dict=pruning_ratio_dict,
                # a latency target keeps the default cap: no MACs-search fallback in its trials
                max_pruning_ratio=cap,
                importance_kwargs=importance_kwargs, loss_fn=loss_fn, data=data,
                data_steps=data_steps, step_fn=step_fn, protect_outputs=protect_outputs,
                macs_tolerance=macs_tolerance, unwrapped_parameters=unwrapped_parameters,
                customized_pruners=customized_pruners)
            # every other argument is checked before anything is measured or pruned
            _validate(model=model, target_macs_ratio=target_latency_ratio, pruning_ratio=None,
                      round_to=None if round_to in ("auto", None) else round_to, dry_run=False,
                      forward_fn=forward_fn, **{k: v for k, v in others.items()
                                                 if k not in _NOT_VALIDATED})
            fwd = host_forward(model, forward_fn) or default_forward
            check_runs(model, example_inputs, fwd)
            check_fits(model, example_inputs, backend, fwd)
            return prune_to_latency(model, example_inputs, prune, latency, round_to, forward_fn,
                                    progress, others)
    if target_latency_ratio is not None and target_macs_ratio is None:
        macs_target_for_validation = target_latency_ratio  # validated as a fraction
    else:
        macs_target_for_validation = target_macs_ratio
    req = _validate(
        model=model, target_macs_ratio=macs_target_for_validation, pruning_ratio=pruning_ratio,
        pruning_ratio_dict=pruning_ratio_dict, max_pruning_ratio=max_pruning_ratio,
        macs_tolerance=macs_tolerance, head_pruning_ratio=head_pruning_ratio,
        iterative_steps=iterative_steps, round_to=None if round_to == 1 else round_to,
        dry_run=dry_run, isomorphic=isomorphic, global_pruning=global_pruning,
        forward_fn=forward_fn, importance=importance, importance_kwargs=importance_kwargs,
        loss_fn=loss_fn, data=data, step_fn=step_fn, data_steps=data_steps,
        ignored_layers=ignored_layers, num_heads=num_heads)
    imp, imp_name, ignored, ratio_dict, heads = (req.importance, req.name, req.ignored,
                                                  req.ratio_dict, req.heads)
    hosts = adapters_for(model)  # timm & co.: refusals, custom pruners, protected blocks
    for host in hosts:
        host.check(model)
    customized_pruners = host_pruners(model, customized_pruners)
    fwd = host_forward(model, forward_fn) or default_forward
    check_runs(model, example_inputs, fwd)
    measure_after = latency_backend is not None and not dry_run
    if measure_after and target_latency_ratio is None:
        missing = unavailable(backend)
        if missing:  # the widths still follow the backend: only the measurement is skipped
            warnings.warn(f"the pruned model is not timed on {backend.name}: {missing}; its "
                          f"widths are rounded for that backend all the same (its channel "
                          f"multiple, {backend.channel_multiple()}, lowered for narrow layers: "
                          "report.round_to says which was used)", UserWarning, stacklevel=2)
            measure_after = False
    if measure_after or target_latency_ratio is not None:
        check_fits(model, example_inputs, backend, fwd)
    for host in hosts:
        ignored += [m for m in host.protected(model, example_inputs, fwd, customized_pruners)
                    if m not in ignored]
    # Tracing runs the model once more in eval mode (modes restored), no weight changes.
    with _no_raw_errors("tracing the model"):
        graph = checked_graph(model, example_inputs, fwd, output_transform,
                              unwrapped_parameters=unwrapped_parameters,
                              customized_pruners=customized_pruners)
        names = {m: n for n, m in model.named_modules()}
        outputs = output_layers(graph) if protect_outputs else []
        inputs = input_layers(graph)
        fixed = list(ignored) + [m for m in outputs + inputs if m not in ignored]
        checks = invalid_groups(graph, fixed, names)
        signature = output_signature(model, example_inputs, fwd)
        del graph
        macs0, params0 = count_macs_params(model, example_inputs, fwd)  # a dry run's copy: same

    # ---------------------------------------------------------------- pruning
    if dry_run:  # everything below happens on a copy; module references follow by name
        model, remap = copy_model(model)
        fixed = [remap[m] for m in fixed]
        checks = [(remap[m], record) for m, record in checks]
        heads = {remap[m]: h for m, h in heads.items()}
        ratio_dict = {remap[m]: v for m, v in ratio_dict.items()}
        names = {m: n for n, m in model.named_modules()}
    selected: dict[str, list[int]] | None = {} if dry_run else None
    for host in hosts:  # before the snapshot: a retry after a restore must still see it
        host.before_prune(model, example_inputs)
    snapshot = ModuleSnapshot(model)
    auto = [record for _, record in checks]  # groups the safety net keeps, and why
    protected = fixed + [m for m, _ in checks]
    settings = RunSettings(
        example_inputs=example_inputs, importance=imp, forward_fn=fwd,
        output_transform=output_transform, global_pruning=global_pruning,
        isomorphic=isomorphic, prune_num_heads=prune_num_heads,
        head_pruning_ratio=head_pruning_ratio, max_pruning_ratio=cap,
        iterative_steps=iterative_steps, round_to=None if round_to == 1 else round_to,
        unwrapped_parameters=unwrapped_parameters, customized_pruners=customized_pruners,
        loss_fn=loss_fn, progress=progress,
        data=None if data is None else (data, data_steps, step_fn), signature=signature,
        max_ratio_fallback=(MAX_RATIO_TRIED if max_pruning_ratio is None
                            and target_latency_ratio is None else None))
    if round_to is None and target_macs_ratio is not None and target_latency_ratio is None:
        multiples = default_multiples(model, fixed, backend.channel_multiple())
    else:
        multiples = [settings.round_to or 1]
    # what the caller will compare the result with, on the backend they named
    dense_copy = copy.deepcopy(model) if measure_after and target_latency_ratio is None else None
    try:
        widths0 = layer_widths(model)
        job = Job(model, protected, heads, ratio_dict)
        if target_latency_ratio is not None:
            allocator = TableAllocator(latency, model, example_inputs, fwd, progress)
            target = Target(target_macs_ratio, None, macs0, macs_tolerance, allocate=allocator)
            done = prune_protecting(job, names, snapshot, auto, settings, target, selected)
            used = None
        else:
            target = Target(target_macs_ratio, pruning_ratio, macs0, macs_tolerance)
            done, used = _prune_rounded(job, names, snapshot, auto, settings, target, selected,
                                        multiples)
        if not dry_run:
            for host in hosts:
                for name, values in host.after_prune(model, example_inputs).items():
                    done.attrs.setdefault(name, {}).update(values)
        plan = extend_plan(model, done.history, done.attrs, example_inputs)
    except UnprunableError as exc:
        snapshot.restore()
        if auto and not exc.protected:  # the search's refusal: name what the net kept
            raise type(exc)(f"{exc}{listing(auto, advice=False)}", auto) from exc
        exc.protected = list(auto)
        raise
    except BaseException as exc:
        snapshot.restore()
        converted = upstream_error(exc, "pruning")
        if converted is None:
            raise
        converted.protected = list(auto)
        raise converted from exc
    if auto:
        warnings.warn(
            f"kcp_plugin kept {len(auto)} channel group(s) unpruned, since pruning them would "
            "break the model:" + listing(auto), UserWarning, stacklevel=2)
    report = PruneReport(
        importance=imp_name,
        macs_before=macs0, macs_after=done.macs, params_before=params0,
        params_after=done.params, pruning_ratio=done.ratio, target_macs_ratio=target_macs_ratio,
        iterative_steps=iterative_steps, widths_before=widths0,
        widths_after=layer_widths(model), protected=sorted(names[m] for m in fixed),
        search=done.search, plan=plan, selected=selected,
        auto_protected=[asdict(r) for r in auto],
    )
    report.round_to = used
    if allocator is not None:
        allocator.finish(model, report)
    elif dense_copy is not None:
        _measure_against_dense(dense_copy, model, example_inputs, fwd, backend, report)
    return report


def _prune_rounded(job: Job, names: dict[nn.Module, str], snapshot: ModuleSnapshot,
                   auto: list, settings: RunSettings, target: Target,
                   selected: dict[str, list[int]] | None, multiples: list[int]
                   ) -> tuple[Outcome, int | None]:
    """:func:`prune_protecting` with the first channel multiple that reaches the target
    (``multiples`` from coarse to 1; only a refusal for reachability moves to the next)."""
    for k, m in enumerate(multiples):
        try:
            done = prune_protecting(job, names, snapshot, auto,
                                    replace(settings, round_to=m if m > 1 else None), target,
                                    selected)
            return done, (m if m > 1 else None)
        except TargetUnreachable as exc:
            if k == len(multiples) - 1:
                raise
            snapshot.restore()
            if selected is not None:
                selected.clear()
            logger.info("round_to=%d cannot reach the target (%s); trying round_to=%d", m,
                        str(exc).splitlines()[0], multiples[k + 1])
    raise AssertionError("unreachable")  # the loop returns or raises


def _measure_against_dense(dense: nn.Module, model: nn.Module, example_inputs: Any,
                           fwd: ForwardFn, backend: Backend, report: PruneReport) -> None:
    """Time the pruned model against its dense copy on the backend the caller named, fill
    the report's latency fields, and warn if the prune made it slower."""
    before, after = compare_latency([dense, model], example_inputs, fwd, backend=backend)
    fill_latency(report, backend, before, after)
    if after.median_ms > before.median_ms:
        warnings.warn(
            f"the pruned model is slower than the dense one on {backend.describe()}: "
            f"{after.describe()} against {before.describe()}, at {report.macs_ratio:.0%} of the "
            "MACs. Widths that suit this backend matter more than MACs here: ask for a latency "
            "target instead (target_latency_ratio=..., latency_allocation='table')",
            UserWarning, stacklevel=3)


# prune()'s latency arguments: who takes them as its own arguments (the schedule, the
# integrations) refuses them inside a dict of further prune() arguments
LATENCY_ARGS = ("target_latency_ratio", "latency_backend", "latency_allocation",
                "latency_threads", "latency_runs")


def check_latency_arguments(
    target_latency_ratio: Any = None,
    latency_backend: str | Backend | dict[str, Any] | None = None,
    latency_allocation: Any = "table",
    *,
    target_macs_ratio: Any = None,
    pruning_ratio: Any = None,
    prune_kwargs: dict[str, Any] | None = None,
    owner: str | None = None,
    imports: bool = False,
) -> Backend | None:
    """Validate the latency arguments of a prune, without a model: the one check of them for
    :func:`prune`, :class:`kcp_plugin.schedule.PruningScheduler` and the integrations (which
    call it when their config, entrypoint or schedule is built, before any model exists).

    Args:
        target_latency_ratio: Fraction of the dense latency to keep (None: no latency target).
        latency_backend: A name, a dict of :class:`kcp_plugin.Backend` fields or a record
            (None: the default, eager torch on the CPU).
        latency_allocation: ``"table"`` or ``"uniform"``.
        target_macs_ratio: With a latency target, a MACs cap (``"table"`` only).
        pruning_ratio: A fixed channel ratio, which no latency target may accompany.
        prune_kwargs: The other :func:`prune` arguments given (``round_to``,
            ``global_pruning``, ``isomorphic``, ``dry_run``, ``latency_tolerance`` are read).
        owner: Who takes the latency arguments as its own (``"PruningHook"``,
            ``"kcp_pruned"``...): they are then refused inside ``prune_kwargs``, and every
            message starts with the owner's name.
        imports: With a latency target, also check that its runtime is there (a GPU for
            ``"cuda"``, onnxruntime installed). A MACs target on a backend this machine cannot
            run needs only its channel multiple (:func:`prune` skips the timing and warns).

    Returns:
        The backend record; None when neither a latency target nor a backend is given
        (nothing is measured).

    Raises:
        ValueError / TypeError: a bad ratio, backend or allocation, a latency argument inside
            ``prune_kwargs``, or an option that conflicts with the latency target (each
            message names the valid choices).
        ImportError: ``"onnxruntime"`` without the ``deploy`` extra (``imports``).
    """
    try:
        return _check_latency_arguments(target_latency_ratio, latency_backend,
                                        latency_allocation, target_macs_ratio, pruning_ratio,
                                        dict(prune_kwargs or {}), owner, imports)
    except (ValueError, TypeError) as exc:
        if owner is None or type(exc) not in (ValueError, TypeError):
            raise
        raise type(exc)(f"{owner}: {exc}") from None


def _check_latency_arguments(ratio: Any, spec: Any, allocation: Any, macs_ratio: Any,
                             pruning_ratio: Any, others: dict[str, Any], owner: str | None,
                             imports: bool) -> Backend | None:
    if owner is not None:
        own = sorted(set(others) & set(LATENCY_ARGS))
        if own:
            raise ValueError(f"{', '.join(own)} cannot be set in prune_kwargs: give "
                             "target_latency_ratio, latency_backend and latency_allocation as "
                             f"{owner}'s own arguments (threads and runs inside "
                             "latency_backend)")
    backend = as_backend(spec)
    tolerance = others.get("latency_tolerance", 0.025)
    if ratio is None:
        # checked even when unused, so that a typo is not silently ignored
        check_latency_target(LatencyTarget(1.0, tolerance, backend, allocation), imports=False)
        unused = [name for name, value, default in (
            ("latency_allocation", allocation, "table"), ("latency_tolerance", tolerance, 0.025))
            if value != default]
        if unused:
            warnings.warn(f"{' and '.join(unused)} only apply to a latency target "
                          "(target_latency_ratio): ignored here", UserWarning, stacklevel=4)
        if others.get("round_to") == "auto":
            raise ValueError("round_to='auto' picks the channel multiple by measuring latency: "
                             "it needs target_latency_ratio with latency_allocation='uniform'")
        return None if spec is None else backend
    if pruning_ratio is not None:
        raise ValueError("target_latency_ratio replaces pruning_ratio: give one target")
    if others.get("dry_run"):
        raise ValueError("a latency target cannot be a dry run (dry_run=True)")
    check_latency_target(LatencyTarget(ratio, tolerance, backend, allocation,
                                       macs_ratio=macs_ratio), imports=imports)
    if allocation == "uniform" and macs_ratio is not None:
        raise ValueError("target_macs_ratio (a MACs budget) combines with "
                         "latency_allocation='table' only: latency_allocation='uniform' "
                         "searches the MACs target itself; give target_latency_ratio alone")
    bad = [k for k in ("round_to", "global_pruning", "isomorphic")
           if others.get(k) not in (None, False)]
    if allocation == "table" and bad:
        raise ValueError(f"{', '.join(bad)}: latency_allocation='table' chooses every group's "
                         "width itself, on the backend's channel multiple "
                         f"({backend.channel_multiple()}), so round_to does not apply, nor "
                         "global_pruning / isomorphic; use latency_allocation='uniform' to set "
                         "them")
    return backend


def _latency_backend(spec: Any, threads: int | None, runs: int | None) -> Backend:
    """The backend record of :func:`prune`'s latency arguments (the deprecated
    ``latency_threads`` / ``latency_runs`` folded in, with a FutureWarning)."""
    if threads is not None or runs is not None:
        warnings.warn("latency_threads / latency_runs are deprecated: pass "
                      "latency_backend=kcp_plugin.Backend(name, threads=..., runs=...)",
                      FutureWarning, stacklevel=3)
    return as_backend(spec, threads=threads, runs=runs)


# prune() arguments _validate does not take
_NOT_VALIDATED = ("output_transform", "prune_num_heads", "protect_outputs",
                  "unwrapped_parameters", "customized_pruners")


@dataclass
class _Request:
    """A validated :func:`prune` call: the criterion and the user's layer references
    resolved to modules."""

    importance: tp.importance.Importance
    name: str
    ignored: list[nn.Module]
    ratio_dict: dict[nn.Module, float]
    heads: dict[nn.Module, int]


def _validate(*, model: Any, target_macs_ratio: float | None, pruning_ratio: float | None,
              pruning_ratio_dict: Any, max_pruning_ratio: float | None, macs_tolerance: float,
              head_pruning_ratio: float, iterative_steps: Any, round_to: Any, dry_run: bool,
              isomorphic: bool, global_pruning: bool, forward_fn: Any, importance: Any,
              importance_kwargs: Any, loss_fn: Any, data: Any, step_fn: Any, data_steps: Any,
              ignored_layers: Any, num_heads: Any) -> _Request:
    """Check every :func:`prune` argument, before the model is touched.

    Raises:
        ValueError / TypeError: naming the argument, what was given and what is valid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if target_macs_ratio is None and pruning_ratio is None and not pruning_ratio_dict:
        raise ValueError("give one of target_macs_ratio (fraction of MACs kept) or pruning_ratio")
    if target_macs_ratio is not None and pruning_ratio is not None:
        raise ValueError("give target_macs_ratio or pruning_ratio, not both")
    _check_ratio("target_macs_ratio", target_macs_ratio, 0.0, 1.0, closed=True)
    _check_ratio("pruning_ratio", pruning_ratio, 0.0, 1.0, closed=False)
    _check_ratio("max_pruning_ratio", max_pruning_ratio, 0.0, 1.0, closed=True)
    _check_ratio("macs_tolerance", macs_tolerance, 0.0, 0.5, closed=True)
    _check_ratio("head_pruning_ratio", head_pruning_ratio, 0.0, 1.0, closed=False)
    if not isinstance(iterative_steps, int) or isinstance(iterative_steps, bool) \
            or iterative_steps < 1:
        raise ValueError(f"iterative_steps must be an integer >= 1, got {iterative_steps!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be None or an integer >= 1, got {round_to!r}")
    if dry_run and iterative_steps != 1:
        raise ValueError("dry_run selects channels in one step: use iterative_steps=1")
    if isomorphic and not global_pruning:
        raise ValueError("isomorphic=True ranks channels globally: set global_pruning=True")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError("forward_fn must be callable as forward_fn(model, example_inputs)")
    if data is not None:
        check_batches(data)  # one batch given as data: refused before anything runs
    imp, imp_name, needs_grad = resolve_importance(importance, importance_kwargs)
    if needs_grad and loss_fn is None:
        raise ValueError(
            f"importance {imp_name!r} reads gradients: pass loss_fn=lambda model: <loss>"
        )
    if isinstance(imp, StatsImportance):
        if data is None and not imp.collected:
            raise ValueError(
                f"importance {imp_name!r} scores channels from data: pass data=<batches> "
                "(and data_steps=...) to prune(), or collect first with "
                "kcp_plugin.collect(model, batches, importance)"
            )
        if data is None and iterative_steps > 1:
            raise ValueError(
                f"importance {imp_name!r} must collect statistics again after every pruning "
                "step: pass data=<batches> for iterative_steps > 1"
            )
        if data is not None and iterative_steps > 1 and iter(data) is data:
            raise ValueError("data is a one-shot iterator, but iterative_steps > 1 collects "
                             "before every step: pass a list or a DataLoader")
    elif data is not None or step_fn is not None:
        raise ValueError(f"data / step_fn are for data-driven criteria; {imp_name!r} does not "
                         "use them")
    if data_steps is not None and (not isinstance(data_steps, int) or data_steps < 1):
        raise ValueError(f"data_steps must be None or a positive integer, got {data_steps!r}")
    ignored = resolve_layers(model, ignored_layers, "ignored_layers")
    ratio_dict = {}
    for key, value in (pruning_ratio_dict or {}).items():
        _check_ratio(f"pruning_ratio_dict[{key!r}]", value, 0.0, 1.0, closed=False)
        (layer,) = resolve_layers(model, [key], "pruning_ratio_dict")
        ratio_dict[layer] = float(value)
    if num_heads == "auto":
        heads = detect_num_heads(model)
    elif num_heads is None:
        heads = {}
    elif isinstance(num_heads, dict):
        heads = {}
        for key, value in num_heads.items():
            (layer,) = resolve_layers(model, [key], "num_heads")
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"num_heads[{key!r}] must be a positive integer, got {value!r}")
            heads[layer] = value
    else:
        raise ValueError(f"num_heads must be 'auto', None or a dict, got {num_heads!r}")
    return _Request(imp, imp_name, ignored, ratio_dict, heads)
