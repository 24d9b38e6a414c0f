"""One-call structural pruning: validate, protect outputs, search a MACs target, prune
atomically."""

from __future__ import annotations

import copy
import difflib
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .attention import detect_num_heads, sync_attention_attrs
from .depgraph import Pruner
from .graph import (
    ForwardFn,
    build_graph,
    check_runs,
    checked_graph,
    count_macs_params,
    default_forward,
    output_layers,
    preserved_modes,
)
from .hosts import adapters_for, host_forward, host_pruners
from .plan import extend_plan
from .progress import progress_bar
from .registry import importance_info
from .report import PruneReport, layer_widths
from .safety import (
    ROOT_TYPES,
    ProtectedGroup,
    UnprunableError,
    couplings,
    describe_exception,
    group_layers,
    input_layers,
    invalid_groups,
    output_signature,
    verify_outputs,
)
from .snapshot import ModuleSnapshot
from .stats import StatsImportance, StepFn, collect
from .tracking import track_pruning

__all__ = ["prune", "resolve_importance", "UnprunableError"]

logger = logging.getLogger(__name__)

LayerRef = nn.Module | str | type


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
    return importance, repr(importance), needs_grad


def _resolve_layers(
    model: nn.Module, refs: Iterable[LayerRef] | None, what: str
) -> list[nn.Module]:
    """Modules named by ``refs``: module objects, qualified names, or module types (all of them)."""
    if refs is None:
        return []
    if isinstance(refs, (nn.Module, str, type)):
        refs = [refs]
    named = dict(model.named_modules())
    members = {id(m) for m in named.values()}
    out: list[nn.Module] = []
    for ref in refs:
        if isinstance(ref, str):
            if ref not in named:
                close = difflib.get_close_matches(ref, list(named), n=3)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise ValueError(f"{what}: the model has no layer named {ref!r}{hint}")
            out.append(named[ref])
        elif isinstance(ref, type) and issubclass(ref, nn.Module):
            out.extend(m for m in named.values() if isinstance(m, ref))
        elif isinstance(ref, nn.Module):
            if id(ref) not in members:
                raise ValueError(f"{what}: {type(ref).__name__} object is not part of the model")
            out.append(ref)
        else:
            raise TypeError(f"{what}: expected modules, layer names or module types, got {ref!r}")
    return out


def _check_ratio(name: str, value: float | None, low: float, high: float, closed: bool) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    ok = low < value <= high if closed else low <= value < high
    if not ok:
        interval = f"({low}, {high}]" if closed else f"[{low}, {high})"
        raise ValueError(f"{name} must be in {interval}, got {value}")


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
    max_pruning_ratio: float = 0.9,
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
        round_to: Keep channel counts multiples of this (hardware-friendly widths).
        forward_fn: ``forward_fn(model, example_inputs)`` if the model is not called as
            ``model(x)`` / ``model(*x)`` / ``model(**x)``.
        output_transform: Maps the model output to tensors for tracing (torch-pruning's).
        global_pruning: Rank channels across layers instead of per layer.
        isomorphic: Isomorphic global ranking (torch-pruning; requires ``global_pruning``).
        num_heads: ``"auto"`` finds timm-style attention (``qkv`` + ``num_heads``); or a dict
            from qkv layers (modules or names) to head counts; or ``None``.
        prune_num_heads: Also remove whole attention heads (``head_pruning_ratio`` of them).
        head_pruning_ratio: Fraction of heads removed when ``prune_num_heads`` is set.
        pruning_ratio_dict: Per-layer channel ratios (modules or names as keys).
        max_pruning_ratio: No layer loses more than this fraction of its channels.
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

    Returns:
        A :class:`PruneReport`; the model's cumulative pruning plan is also kept on the model for
        :func:`kcp_plugin.save_pruned`.

    Raises:
        ValueError / TypeError: invalid arguments (the model is untouched).
    """
    # ---------------------------------------------------------------- validation, no mutation
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
    ignored = _resolve_layers(model, ignored_layers, "ignored_layers")
    ratio_dict = {}
    for key, value in (pruning_ratio_dict or {}).items():
        _check_ratio(f"pruning_ratio_dict[{key!r}]", value, 0.0, 1.0, closed=False)
        (layer,) = _resolve_layers(model, [key], "pruning_ratio_dict")
        ratio_dict[layer] = float(value)
    if num_heads == "auto":
        heads = detect_num_heads(model)
    elif num_heads is None:
        heads = {}
    elif isinstance(num_heads, dict):
        heads = {}
        for key, value in num_heads.items():
            (layer,) = _resolve_layers(model, [key], "num_heads")
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"num_heads[{key!r}] must be a positive integer, got {value!r}")
            heads[layer] = value
    else:
        raise ValueError(f"num_heads must be 'auto', None or a dict, got {num_heads!r}")
    hosts = adapters_for(model)  # timm & co.: refusals, custom pruners, protected blocks
    for host in hosts:
        host.check(model)
    customized_pruners = host_pruners(model, customized_pruners)
    fwd = host_forward(model, forward_fn) or default_forward
    check_runs(model, example_inputs, fwd)
    for host in hosts:
        ignored += [m for m in host.protected(model, example_inputs, fwd, customized_pruners)
                    if m not in ignored]
    # Tracing runs the model once more in eval mode (modes restored), no weight changes.
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

    # ---------------------------------------------------------------- pruning
    if dry_run:  # everything below happens on a copy; module references follow by name
        model, remap = _copy_model(model)
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
    try:
        macs0, params0 = count_macs_params(model, example_inputs, fwd)
        widths0 = layer_widths(model)
        settings = dict(
            example_inputs=example_inputs, importance=imp, forward_fn=fwd,
            output_transform=output_transform, global_pruning=global_pruning,
            isomorphic=isomorphic, prune_num_heads=prune_num_heads,
            head_pruning_ratio=head_pruning_ratio, max_pruning_ratio=max_pruning_ratio,
            iterative_steps=iterative_steps,
            round_to=round_to, unwrapped_parameters=unwrapped_parameters,
            customized_pruners=customized_pruners, loss_fn=loss_fn, progress=progress,
            data=None if data is None else (data, data_steps, step_fn),
            signature=signature,
        )
        for _attempt in range(_MAX_PROTECTED + 1):
            try:
                ratio, search, macs1, params1, history, attrs = _prune_to_target(
                    model, names, protected, heads, ratio_dict, settings, target_macs_ratio,
                    pruning_ratio, macs0, macs_tolerance, selected)
                break
            except _Broken as broken:
                snapshot.restore()
                if selected is not None:
                    selected.clear()
                found = _find_culprit(model, names, protected, heads, ratio_dict, broken)
                if found is None and isinstance(broken.__cause__, Exception):
                    # not reproducible group by group, or failing with no group pruned (e.g.
                    # the criterion's own error): the original error, model restored
                    raise broken.__cause__ from None
                if found is None:
                    raise UnprunableError(
                        f"pruning breaks this model ({broken.reason}), and no single channel "
                        "group could be found responsible; protect the layers around the "
                        "failing operation with ignored_layers=[...]" + _listing(auto),
                        auto) from broken.__cause__
                module, record = found
                protected.append(module)
                auto.append(record)
        else:
            raise UnprunableError(
                f"more than {_MAX_PROTECTED} channel groups of this model break when pruned; "
                "torch-pruning cannot trace it reliably" + _listing(auto), auto)
        if not dry_run:
            for host in hosts:
                for name, values in host.after_prune(model, example_inputs).items():
                    attrs.setdefault(name, {}).update(values)
        plan = extend_plan(model, history, attrs)
    except UnprunableError as exc:
        snapshot.restore()
        if auto and not exc.protected:  # the search's refusal: name what the net kept
            raise UnprunableError(f"{exc}{_listing(auto)}", auto) from exc
        exc.protected = list(auto)
        raise
    except BaseException:
        snapshot.restore()
        raise
    if auto:
        warnings.warn(
            f"kcp_plugin kept {len(auto)} channel group(s) unpruned, since pruning them would "
            "break the model:" + _listing(auto), UserWarning, stacklevel=2)
    return PruneReport(
        importance=imp_name,
        macs_before=macs0, macs_after=macs1, params_before=params0, params_after=params1,
        pruning_ratio=ratio, target_macs_ratio=target_macs_ratio,
        iterative_steps=iterative_steps, widths_before=widths0,
        widths_after=layer_widths(model), protected=sorted(names[m] for m in fixed),
        search=search, plan=plan, selected=selected,
        auto_protected=[asdict(r) for r in auto],
    )


# At most this many groups are protected one by one after failing verification.
_MAX_PROTECTED = 24


def _listing(records: list[ProtectedGroup]) -> str:
    if not records:
        return ""
    return "".join(f"\n  - {r.describe()}" for r in records) + (
        "\n(pass these roots in ignored_layers to skip the checks, or lower the target)")


class _Broken(Exception):
    """A pruning trial (or the final prune) crashed or produced an unsound model."""

    def __init__(self, reason: str, ratio: float, extra: dict[str, float],
                 settings: dict[str, Any]):
        super().__init__(reason)
        self.reason, self.ratio, self.extra = reason, ratio, extra
        self.settings = settings  # the pruner settings (criterion...) of the failing run


def _copy_model(model: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]]:
    """A deep copy of ``model`` and the map from its modules to the copy's (by name)."""
    clone = copy.deepcopy(model)
    by_name = dict(clone.named_modules())
    return clone, {m: by_name[n] for n, m in model.named_modules()}


def _trial_copy(
    model: nn.Module, protected: list[nn.Module], heads: dict[nn.Module, int],
    ratio_dict: dict[nn.Module, float], extra: dict[str, float] | None,
) -> tuple[nn.Module, list[nn.Module], dict[nn.Module, int], dict[nn.Module, float]]:
    """A copy of ``model`` to prune in a trial, with the pruner arguments moved onto it:
    ``(copy, protected, heads, per-layer ratios)``; ``extra`` per-layer ratios are by name."""
    clone, remap = _copy_model(model)
    by_name = dict(clone.named_modules())
    per_layer = {remap[m]: v for m, v in ratio_dict.items()}
    for name, v in (extra or {}).items():
        per_layer.setdefault(by_name[name], v)
    return (clone, [remap[m] for m in protected], {remap[m]: h for m, h in heads.items()},
            per_layer)


def _prune_to_target(
    model: nn.Module,
    names: dict[nn.Module, str],
    protected: list[nn.Module],
    heads: dict[nn.Module, int],
    ratio_dict: dict[nn.Module, float],
    settings: dict[str, Any],
    target_macs_ratio: float | None,
    pruning_ratio: float | None,
    macs0: int,
    macs_tolerance: float,
    selected: dict[str, list[int]] | None,
) -> tuple[float, list, int, int, list, dict]:
    """Search the ratio (if a MACs target is given), prune ``model`` and verify it.

    Raises:
        _Broken: a trial or the final prune crashed or broke the model's outputs.
    """
    # With local pruning, each layer's width depends only on the ratio, not on the scores,
    # so the MACs search can use a cheap scorer; the result is verified and, should the real
    # criterion leave some group alone, searched again with the real criterion.
    fast = target_macs_ratio is not None and not settings["global_pruning"]
    search: list[tuple[float, float]] = []
    snapshot = ModuleSnapshot(model)
    while True:
        if target_macs_ratio is not None:
            trial_settings = settings
            if fast:
                trial_settings = {**settings, "importance":
                                  tp.importance.GroupMagnitudeImportance(), "loss_fn": None,
                                  "data": None}
            ratio, extra, search = _search_ratio(
                model, protected, heads, ratio_dict, target_macs_ratio, macs0,
                macs_tolerance, trial_settings,
            )
        else:
            ratio, extra = float(pruning_ratio or 0.0), {}
        with track_pruning():
            history, attrs = _checked_run(
                model, protected, heads, {**extra, **ratio_dict}, ratio,
                {names[m]: v for m, v in extra.items()}, record=selected, **settings)
        macs1, params1 = count_macs_params(model, settings["example_inputs"],
                                           settings["forward_fn"])
        if fast and abs(macs1 / macs0 - target_macs_ratio) > macs_tolerance:
            logger.info("criterion left some groups alone; searching with it instead")
            snapshot.restore()
            if selected is not None:
                selected.clear()
            fast = False
            continue
        return ratio, search, macs1, params1, history, attrs


def _checked_run(model: nn.Module, protected: list[nn.Module], heads: dict[nn.Module, int],
                 ratio_dict: dict[nn.Module, float], ratio: float, extra: dict[str, float],
                 **settings: Any) -> tuple[list, dict[str, dict[str, Any]]]:
    """:func:`_run_pruner`, then :func:`verify_outputs`; any failure becomes :class:`_Broken`."""
    signature = settings.pop("signature")
    failing = {**settings, "signature": signature, "record": None}
    try:
        result = _run_pruner(model, protected, heads, ratio_dict, ratio, **settings)
    except Exception as exc:  # torch-pruning's (or torch's) error on a mis-traced group
        raise _Broken(describe_exception(exc), ratio, extra, failing) from exc
    problem = verify_outputs(model, settings["example_inputs"], settings["forward_fn"],
                             signature)
    if problem is not None:
        raise _Broken(problem, ratio, extra, failing)
    return result


def _find_culprit(
    model: nn.Module,
    names: dict[nn.Module, str],
    protected: list[nn.Module],
    heads: dict[nn.Module, int],
    ratio_dict: dict[nn.Module, float],
    broken: _Broken,
) -> tuple[nn.Module, ProtectedGroup] | None:
    """The channel group whose pruning breaks the model, found by bisection on copies.

    The pruner yields its groups in a fixed order; pruning only the first ``k`` of them
    (``k`` bisected between a prefix that works and one that breaks) finds the group after
    which the model breaks. Returns its protectable layer (an output-pruned root layer of the
    group) and a record of it, or ``None`` if the failure does not depend on the groups.
    """
    by_name = dict(model.named_modules())
    seen: list[tuple[str, list[str], list[str]]] = []
    settings = broken.settings  # the same criterion and options as the run that broke
    run_settings = {k: v for k, v in settings.items() if k != "signature"}

    def trial(limit: int | None) -> str | None:
        clone, kept_layers, clone_heads, per_layer = _trial_copy(
            model, protected, heads, ratio_dict, broken.extra)
        log = seen if limit is None else None
        try:
            _run_pruner(clone, kept_layers, clone_heads, per_layer, broken.ratio,
                        limit=limit, groups_seen=log, **{**run_settings, "progress": False})
        except Exception as exc:
            return describe_exception(exc)
        return verify_outputs(clone, settings["example_inputs"], settings["forward_fn"],
                              settings["signature"])

    reason = trial(None)
    if reason is None:
        return None
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
    root, layers, coupled = seen[hi - 1]
    return by_name[root], ProtectedGroup(root=root, layers=layers, couplings=coupled,
                                         reason=last)


def _run_pruner(
    model: nn.Module,
    protected: list[nn.Module],
    heads: dict[nn.Module, int],
    ratio_dict: dict[nn.Module, float],
    ratio: float,
    *,
    example_inputs: Any,
    importance: tp.importance.Importance,
    forward_fn: ForwardFn,
    output_transform: Callable | None,
    global_pruning: bool,
    isomorphic: bool,
    prune_num_heads: bool,
    head_pruning_ratio: float,
    max_pruning_ratio: float,
    iterative_steps: int,
    round_to: int | None,
    unwrapped_parameters: dict | None,
    customized_pruners: dict | None,
    loss_fn: Callable | None,
    progress: bool | None,
    data: tuple[Iterable[Any], int | None, StepFn | None] | None = None,
    desc: str = "pruning",
    record: dict[str, list[int]] | None = None,
    limit: int | None = None,
    groups_seen: list[tuple[str, list[str], list[str]]] | None = None,
) -> tuple[list, dict[str, dict[str, Any]]]:
    """Run torch-pruning's pruner on ``model`` for all steps, then fix attention attributes.

    If ``record`` is a dict, it receives the output channels each layer loses (by name).
    ``data`` is ``(batches, steps, step_fn)`` for data-driven criteria, collected before each step.
    ``limit``: prune only the first ``limit`` groups the pruner yields (over all steps; used to
    find a group that breaks the model). ``groups_seen`` receives, for each group pruned, its
    protectable layer's name, its layers and the operations coupling them.

    Returns:
        The pruning history and the attention attributes that were set (both for the plan).
    """
    heads = dict(heads)  # torch-pruning mutates (and shares) these dicts: always fresh copies
    with preserved_modes(model):
        pruner = Pruner(
            model, example_inputs, importance=importance, global_pruning=global_pruning,
            pruning_ratio=ratio, pruning_ratio_dict=dict(ratio_dict) or None,
            max_pruning_ratio=max_pruning_ratio, iterative_steps=iterative_steps,
            ignored_layers=list(protected), round_to=round_to, isomorphic=isomorphic,
            num_heads=heads, prune_num_heads=prune_num_heads,
            head_pruning_ratio=head_pruning_ratio, in_channel_groups={},
            out_channel_groups={}, customized_pruners=customized_pruners,
            unwrapped_parameters=unwrapped_parameters, forward_fn=forward_fn,
            output_transform=output_transform,
        )
    steps = range(1, iterative_steps + 1)
    names = {m: n for n, m in model.named_modules()}
    pruned = 0
    for step in progress_bar(steps, enabled=progress, desc=desc):
        if hasattr(importance, "keep_ratio_hint"):
            done, after = ratio * (step - 1) / iterative_steps, ratio * step / iterative_steps
            importance.keep_ratio_hint = (1 - after) / max(1 - done, 1e-9)
        if loss_fn is not None:
            _backward(model, importance, loss_fn)
        if isinstance(importance, StatsImportance):
            if data is not None:
                batches, data_steps, step_fn = data
                collect(model, batches, importance, steps=data_steps, step_fn=step_fn,
                        example_inputs=example_inputs, forward_fn=forward_fn, progress=progress)
            importance.bind(model)
        for group in pruner.step(interactive=True):
            if limit is not None and pruned >= limit:
                break
            pruned += 1
            if groups_seen is not None:
                groups_seen.append(_group_entry(pruner.DG, group, names))
            if record is not None:
                for dep, idxs in group:
                    module = dep.target.module
                    if pruner.DG.is_out_channel_pruning_fn(dep.handler) and module in names \
                            and isinstance(getattr(module, "weight", None), torch.Tensor):
                        record.setdefault(names[module], []).extend(int(i) for i in idxs)
            group.prune()
    return pruner.pruning_history(), sync_attention_attrs(model, pruner.num_heads)


def _group_entry(graph: Any, group: Any, names: dict[nn.Module, str]
                 ) -> tuple[str, list[str], list[str]]:
    """``(protectable layer, layers, couplings)`` of a group about to be pruned.

    The protectable layer is the first output-pruned conv / linear: ignoring it makes
    torch-pruning skip the whole group (for attention groups the pruning root is a downstream
    input-pruned layer, which would not).
    """
    root = None
    for item in group.items:
        module = item.dep.target.module
        if graph.is_out_channel_pruning_fn(item.dep.handler) and module in names \
                and isinstance(module, ROOT_TYPES):
            root = names[module]
            break
    layers = group_layers(group, names)
    return root or layers[0], layers, couplings(group)


def _backward(model: nn.Module, importance: Any, loss_fn: Callable) -> None:
    """Populate gradients for gradient-based criteria (per-sample for Hessian)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = loss_fn(model)
        if isinstance(importance, tp.importance.GroupHessianImportance):
            importance.zero_grad()
            for sample_loss in loss.reshape(-1):
                model.zero_grad(set_to_none=True)
                sample_loss.backward(retain_graph=True)
                importance.accumulate_grad(model)
        else:
            loss.sum().backward()


def _search_ratio(
    model: nn.Module,
    protected: list[nn.Module],
    heads: dict[nn.Module, int],
    ratio_dict: dict[nn.Module, float],
    target: float,
    macs0: int,
    tol: float,
    settings: dict[str, Any],
    max_trials: int = 14,
) -> tuple[float, dict[nn.Module, float], list[tuple[float, float]]]:
    """Find pruning settings whose pruned model keeps ``target`` of the MACs (within ``tol``).

    Each trial prunes a deep copy with the given criterion and settings. First the uniform
    channel ratio: MACs kept fall monotonically with it, roughly as ``(1 - r)^2``, so regula
    falsi on ``sqrt(MACs kept)`` brackets the answer in a few trials. On narrow networks one
    channel per layer can be worth more than the tolerance; then the two bracketing ratios are
    mixed: the first ``k`` groups (in graph order) get the higher one, and ``k`` is bisected,
    which moves the MACs in steps of single groups.

    Returns:
        ``(ratio, extra per-layer ratios, trials as (ratio, MACs kept))``.
    """
    trials: list[tuple[float, float]] = []

    def macs_kept(r: float, extra: dict[str, float] | None = None) -> float:
        if r == 0.0 and not extra:
            return 1.0
        clone, kept_layers, clone_heads, per_layer = _trial_copy(
            model, protected, heads, ratio_dict, extra)
        _checked_run(clone, kept_layers, clone_heads, per_layer, r, dict(extra or {}),
                     **{**settings, "progress": False})
        kept = count_macs_params(clone, settings["example_inputs"], settings["forward_fn"])[0]
        trials.append((r, kept / macs0))
        bar.update(1)
        bar.set_postfix(ratio=f"{r:.3f}", macs=f"{kept / macs0:.3f}")
        return kept / macs0

    bar = progress_bar(enabled=settings["progress"], total=max_trials + 8,
                       desc="searching channel ratio")
    try:
        lo, m_lo = 0.0, 1.0
        hi = settings["max_pruning_ratio"]
        if abs(1.0 - target) <= tol:
            return 0.0, {}, trials
        m_hi = macs_kept(hi)
        if m_hi > target + tol:
            # MACs kept are not always monotonic in the ratio: where a block slices its output
            # at a stored width (GhostNet's out[:, :out_chs]), which channels go decides the
            # widths, and the largest ratio can keep more than smaller ones. A few coarse
            # ratios find a bracket in that case.
            for r in (0.3, 0.5, 0.7):
                if r < hi:
                    m = macs_kept(r)
                    if m <= target + tol:
                        hi, m_hi = r, m
                        break
        if m_hi > target + tol:
            raise UnprunableError(
                f"target_macs_ratio={target} is out of reach: pruning every prunable layer by "
                f"max_pruning_ratio={hi} keeps {m_hi:.3f} of the MACs (protected layers: "
                f"{len(protected)}). Raise max_pruning_ratio or protect fewer layers."
            )
        if abs(m_hi - target) <= tol:
            return hi, {}, trials
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
                return r, {}, trials
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
        roots = _group_roots(model, protected, settings)
        best = min(bracket, key=lambda t: abs(t[1] - target))
        a, b = 0, len(roots)
        while b - a > 1:
            k = (a + b) // 2
            extra = {roots[j]: hi for j in range(k)}
            m = macs_kept(lo, extra)
            if abs(m - target) < abs(best[1] - target):
                best = (lo, m)
            if abs(m - target) <= tol:
                return lo, {dict(model.named_modules())[n]: v for n, v in extra.items()}, trials
            a, b = (k, b) if m > target else (a, k)
        raise UnprunableError(
            f"could not reach target_macs_ratio={target} within {tol}: the closest setting "
            f"keeps {best[1]:.4f} of the MACs: channel counts are too coarse (few channels per "
            f"layer, round_to={settings['round_to']}); loosen macs_tolerance, lower round_to, "
            "or use global_pruning"
        )
    finally:
        bar.close()


def _group_roots(model: nn.Module, protected: list[nn.Module], settings: dict[str, Any]) -> list:
    """Names of the root layers of the prunable groups, in torch-pruning's order."""
    graph = build_graph(model, settings["example_inputs"], settings["forward_fn"],
                        settings["output_transform"])
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for p in protected for m in p.modules()]
    roots = []
    for group in graph.get_all_groups(ignored_layers=ignored,
                                      root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        root = group[0].dep.target.module
        if root in names:
            roots.append(names[root])
    return roots
