"""One torch-pruning run on a model: its settings, the run, its verification, trial copies.

:func:`kcp_plugin.prune` searches a MACs target with trial runs on copies, runs the final
prune, and bisects over groups when a run breaks the model; every one of those is a
:func:`run_pruner` call with the same :class:`RunSettings`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .attention import sync_attention_attrs
from .depgraph import Pruner
from .distributed import all_reduce_gradients
from .errors import CriterionError
from .graph import ForwardFn, preserved_modes
from .progress import progress_bar
from .registry import KeepRatioAware
from .safety import ROOT_TYPES, couplings, describe_exception, group_layers, verify_outputs
from .stats import StatsImportance, StepFn, collect

__all__ = ["Job", "RunSettings", "BrokenRun", "ScoredGroup", "run_pruner", "checked_run",
           "group_scores", "make_pruner", "trial_copy", "copy_model", "per_sample_losses",
           "populate_gradients"]

# ``(protectable layer, layers, couplings)`` of a pruned group, by name
GroupEntry = tuple[str, list[str], list[str]]


@dataclass
class Job:
    """A model to prune and what the pruner must respect there.

    Attributes:
        model: Pruned in place.
        protected: Layers passed to torch-pruning as ``ignored_layers`` (the safety net
            appends the roots of groups that break).
        heads: Attention projection -> head count (torch-pruning's ``num_heads``).
        ratio_dict: Per-layer channel ratios.
    """

    model: nn.Module
    protected: list[nn.Module]
    heads: dict[nn.Module, int]
    ratio_dict: dict[nn.Module, float]


@dataclass(frozen=True)
class RunSettings:
    """Everything a pruner run takes besides the model and the layers it must skip.

    Attributes mirror :func:`kcp_plugin.prune`'s arguments of the same names; ``data`` is
    ``(batches, data_steps, step_fn)`` for data-driven criteria, and ``signature`` the
    unpruned model's output signature (:func:`kcp_plugin.safety.output_signature`) that a
    pruned model must keep.
    """

    example_inputs: Any
    importance: tp.importance.Importance
    forward_fn: ForwardFn
    output_transform: Callable | None
    global_pruning: bool
    isomorphic: bool
    prune_num_heads: bool
    head_pruning_ratio: float
    max_pruning_ratio: float
    iterative_steps: int
    round_to: int | None
    unwrapped_parameters: dict | None
    customized_pruners: dict | None
    loss_fn: Callable | None
    progress: bool | None
    data: tuple[Iterable[Any], int | None, StepFn | None] | None
    signature: Any
    # the max_pruning_ratio a MACs search may raise the cap to when the user left it unset
    # (prune's default), with a warning; None: the cap is the user's and stays
    max_ratio_fallback: float | None = None


class BrokenRun(Exception):
    """A pruner run crashed, or the model it left fails :func:`verify_outputs`.

    Attributes:
        reason: What failed, one line.
        ratio: The channel ratio of the run.
        extra: Per-layer ratios (by layer name) the run added to the user's.
        settings: The settings of the run (the same criterion and options are used to find
            the group responsible).
    """

    def __init__(self, reason: str, ratio: float, extra: dict[str, float],
                 settings: RunSettings):
        super().__init__(reason)
        self.reason, self.ratio, self.extra, self.settings = reason, ratio, extra, settings


def copy_model(model: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]]:
    """A deep copy of ``model`` and the map from its modules to the copy's (by name)."""
    clone = copy.deepcopy(model)
    by_name = dict(clone.named_modules())
    return clone, {m: by_name[n] for n, m in model.named_modules()}


def trial_copy(job: Job, extra: dict[str, float] | None) -> Job:
    """The same job on a deep copy of its model, to prune in a trial (module references
    follow by name); ``extra`` per-layer ratios, by layer name, are added to the copy's."""
    clone, remap = copy_model(job.model)
    by_name = dict(clone.named_modules())
    per_layer = {remap[m]: v for m, v in job.ratio_dict.items()}
    for name, v in (extra or {}).items():
        per_layer.setdefault(by_name[name], v)
    return Job(clone, [remap[m] for m in job.protected],
               {remap[m]: h for m, h in job.heads.items()}, per_layer)


def checked_run(job: Job, ratio: float, extra: dict[str, float], settings: RunSettings,
                record: dict[str, list[int]] | None = None,
                ) -> tuple[list, dict[str, dict[str, Any]]]:
    """:func:`run_pruner`, then :func:`verify_outputs`.

    Raises:
        BrokenRun: the run raised (torch-pruning's or torch's error on a mis-traced group), or
            the pruned outputs changed shape or stopped being finite.
        CriterionError: the criterion could not score the unpruned model (its loss_fn, data,
            step_fn or labels).
    """
    try:
        result = run_pruner(job, ratio, settings, record=record)
    except CriterionError:  # the criterion's inputs, not the model's structure
        raise
    except Exception as exc:
        raise BrokenRun(describe_exception(exc), ratio, extra, settings) from exc
    problem = verify_outputs(job.model, settings.example_inputs, settings.forward_fn,
                             settings.signature)
    if problem is not None:
        raise BrokenRun(problem, ratio, extra, settings)
    return result


def run_pruner(
    job: Job,
    ratio: float,
    settings: RunSettings,
    *,
    desc: str = "pruning",
    record: dict[str, list[int]] | None = None,
    limit: int | None = None,
    groups_seen: list[GroupEntry] | None = None,
    scoring_failed: list[GroupEntry] | None = None,
) -> tuple[list, dict[str, dict[str, Any]]]:
    """Run torch-pruning's pruner on ``model`` for all steps, then fix attention attributes.

    Args:
        job: The model (pruned in place), its protected layers, head counts and per-layer
            ratios.
        ratio: The channel ratio of every other layer.
        settings: The rest of the pruner's arguments.
        desc: Progress-bar label.
        record: If a dict, receives the output channels each layer loses (by name).
        limit: Prune only the first ``limit`` groups the pruner yields (over all steps; used
            to find a group that breaks the model).
        groups_seen: Receives, for each group pruned, its protectable layer's name, its
            layers and the operations coupling them.
        scoring_failed: Receives the entry of the group torch-pruning was scoring when it
            raised before pruning anything (its scores are all computed first, so a group's
            own failure there, e.g. ``imp.view(ch_groups, -1)`` on a group whose width the
            grouped conv in it does not divide, shows in no prefix of pruned groups).

    Returns:
        The pruning history and the attention attributes that were set (both for the plan).
    """
    s, model = settings, job.model
    pruner = make_pruner(job, ratio, settings)
    steps = range(1, s.iterative_steps + 1)
    names = {m: n for n, m in model.named_modules()}
    importance = s.importance
    pruned = 0
    # the hint of keep-ratio-aware criteria: the base ratio, or, where only per-group ratios
    # prune (a latency allocation), their mean
    hint_ratio = ratio or (sum(job.ratio_dict.values()) / len(job.ratio_dict)
                           if job.ratio_dict else 0.0)
    for step in progress_bar(steps, enabled=s.progress, desc=desc):
        if isinstance(importance, KeepRatioAware):
            done = hint_ratio * (step - 1) / s.iterative_steps
            after = hint_ratio * step / s.iterative_steps
            importance.keep_ratio_hint = (1 - after) / max(1 - done, 1e-9)
        try:
            _feed_criterion(model, importance, s)
        except Exception as exc:
            if pruned:  # a partly pruned model that fails to run: the safety net's case
                raise
            # the plugin's own ValueErrors (cdc's label checks, the default step's) say what
            # to change, in full; how prune() calls the user's callbacks would be noise there
            own = _plugin_value_error(exc)
            hint = "" if own else (
                ". prune() calls loss_fn(model) -> loss, and step_fn(model, batch) -> loss on "
                "each batch of data ((inputs, targets) by default); see "
                "kcp_plugin.criterion_arguments")
            raise CriterionError(
                f"{type(importance).__name__} could not score the channels (nothing was "
                f"pruned, the model is unchanged): "
                f"{describe_exception(exc, limit=1000 if own else 300)}{hint}"
            ) from exc
        pruner.DG.last_group = None
        try:
            for group in pruner.step(interactive=True):
                if limit is not None and pruned >= limit:
                    break
                pruned += 1
                if groups_seen is not None:
                    groups_seen.append(_group_entry(pruner.DG, group, names))
                if record is not None:
                    for dep, idxs in group:
                        module = dep.target.module
                        if pruner.DG.is_out_channel_pruning_fn(dep.handler) \
                                and module in names \
                                and isinstance(getattr(module, "weight", None), torch.Tensor):
                            record.setdefault(names[module], []).extend(int(i) for i in idxs)
                group.prune()
        except Exception:
            last = getattr(pruner.DG, "last_group", None)
            if scoring_failed is not None and pruned == 0 and last is not None:
                scoring_failed.append(_group_entry(pruner.DG, last, names))
            raise
    return pruner.pruning_history(), sync_attention_attrs(model, pruner.num_heads)



def make_pruner(job: Job, ratio: float, settings: RunSettings) -> Pruner:
    """The torch-pruning pruner of a run: :class:`kcp_plugin.depgraph.Pruner` on ``job.model``
    with the run's settings (its graph is traced here, modes restored)."""
    s, model = settings, job.model
    heads = dict(job.heads)  # torch-pruning mutates (and shares) these dicts: always fresh copies
    with preserved_modes(model), warnings.catch_warnings():
        # torch-pruning warns about unwrapped parameters on every graph it builds: prune()
        # built one already (the user saw it once), not again for each search trial
        warnings.filterwarnings("ignore", message=r"[\s\S]*Unwrapped parameters detected")
        return Pruner(
            model, s.example_inputs, importance=s.importance, global_pruning=s.global_pruning,
            pruning_ratio=ratio, pruning_ratio_dict=dict(job.ratio_dict) or None,
            max_pruning_ratio=s.max_pruning_ratio, iterative_steps=s.iterative_steps,
            ignored_layers=list(job.protected), round_to=s.round_to, isomorphic=s.isomorphic,
            num_heads=heads, prune_num_heads=s.prune_num_heads,
            head_pruning_ratio=s.head_pruning_ratio, in_channel_groups={},
            out_channel_groups={}, customized_pruners=s.customized_pruners,
            unwrapped_parameters=s.unwrapped_parameters, forward_fn=s.forward_fn,
            output_transform=s.output_transform,
        )


@dataclass
class ScoredGroup:
    """A channel group a run would prune, scored by the run's criterion.

    Attributes:
        root: The pruner's root layer of the group (for attention groups, the downstream
            layer torch-pruning re-roots them on).
        out_layers: Layers whose output channels the group prunes: the keys a per-group ratio
            is given under (``pruning_ratio_dict``).
        members: ``(layer, prunes its output channels, channels of it in the group)`` for
            every conv / linear / other module of the group.
        channels: The root's channels in the group (``ch_groups * units``).
        ch_groups: Channel groups (grouped convs, equal splits, heads): every group loses the
            same positions, so the unit of pruning is one position in each.
        importance: Score per unit (length ``channels // ch_groups``), as the pruner ranks
            them: the lowest go first.
        user_ratio: The user's ``pruning_ratio_dict`` ratio for this group, if any.
    """

    root: nn.Module
    out_layers: list[nn.Module]
    members: list[tuple[nn.Module, bool, int]]
    channels: int
    ch_groups: int
    importance: torch.Tensor
    user_ratio: float | None = None

    @property
    def units(self) -> int:
        """Positions per channel group (what a ratio applies to)."""
        return self.channels // self.ch_groups


@torch.no_grad()
def _score(pruner: Pruner, group: Any) -> Any:
    return pruner.estimate_importance(group)


def group_scores(job: Job, settings: RunSettings, keep_hint: float | None = None
                 ) -> list[ScoredGroup]:
    """Every group the run would prune, with the criterion's score of each channel.

    The criterion is fed as for a run (gradients of ``loss_fn``, statistics of ``data``: the
    user's callbacks run here), then each group is scored the way torch-pruning's
    ``BasePruner._prune`` (v1.6, step 1) does before it thresholds: groups past
    ``max_pruning_ratio`` skipped, attention groups re-rooted on their downstream layer,
    importance averaged over channel groups. Used by latency-aware allocation
    (:mod:`kcp_plugin.deploy.allocation`), which chooses each group's width itself.

    Args:
        job: The model (not changed, besides the criterion's gradients / statistics).
        settings: The run's settings.
        keep_hint: For keep-ratio-aware criteria (KCP representative), the fraction of
            channels expected to stay.

    Raises:
        CriterionError: the criterion could not score the unpruned model.
    """
    pruner = make_pruner(job, 0.0, settings)
    importance = settings.importance
    if isinstance(importance, KeepRatioAware):
        importance.keep_ratio_hint = keep_hint
    try:
        _feed_criterion(job.model, importance, settings)
    except Exception as exc:
        raise CriterionError(
            f"{type(importance).__name__} could not score the channels (nothing was pruned, "
            f"the model is unchanged): {describe_exception(exc)}") from exc
    graph = pruner.DG
    user = {}
    for m, v in job.ratio_dict.items():
        for sub in m.modules():
            user[sub] = v
    out: list[ScoredGroup] = []
    with preserved_modes(job.model):
        for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
            if not pruner._check_pruning_ratio(group):
                continue
            is_attention, _ = pruner._is_atten_group(group)
            if is_attention:
                group = pruner._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            ch_groups = pruner._get_channel_groups(group)
            imp = _score(pruner, group)
            if imp is None or len(imp) == 0 or len(imp) % ch_groups:
                continue
            dim_imp = imp.view(ch_groups, -1).mean(0) if ch_groups > 1 else imp
            members, outs, ratio = [], [], None
            for dep, idxs in group:
                module = dep.target.module
                if not isinstance(module, nn.Module):
                    continue
                is_out = graph.is_out_channel_pruning_fn(dep.handler)
                members.append((module, is_out, len(idxs)))
                if is_out and isinstance(module, ROOT_TYPES) and module not in outs:
                    outs.append(module)
                ratio = user.get(module, ratio) if is_out else ratio
            if not outs:
                continue
            out.append(ScoredGroup(group[0].dep.target.module, outs, members, len(imp),
                                   ch_groups, dim_imp.detach().float().cpu(), ratio))
    return out


def _feed_criterion(model: nn.Module, importance: Any, s: RunSettings) -> None:
    """What a gradient or data-driven criterion reads before scoring: the gradients of
    ``s.loss_fn``, the statistics of ``s.data``; the user's callbacks run here."""
    if s.loss_fn is not None:
        populate_gradients(model, importance, s.loss_fn)
    if isinstance(importance, StatsImportance):
        if s.data is not None:
            batches, data_steps, step_fn = s.data
            collect(model, batches, importance, steps=data_steps, step_fn=step_fn,
                    example_inputs=s.example_inputs, forward_fn=s.forward_fn,
                    progress=s.progress)
        importance.bind(model)


def all_group_entries(job: Job, ratio: float, settings: RunSettings) -> list[GroupEntry]:
    """The entries (:func:`_group_entry`) of every group a run on ``job`` would prune, in the
    pruner's order, read from a fresh trace of ``job.model`` (nothing is pruned)."""
    pruner = make_pruner(job, ratio, settings)
    names = {m: n for n, m in job.model.named_modules()}
    return [_group_entry(pruner.DG, group, names) for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)]


def _group_entry(graph: Any, group: Any, names: dict[nn.Module, str]) -> GroupEntry:
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


def _plugin_value_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``ValueError`` raised by kcp_plugin's own code (its innermost
    frame is in the package), i.e. one of its checks of what a criterion was fed, not an
    error of the user's ``loss_fn`` / ``step_fn`` or of torch."""
    if not isinstance(exc, ValueError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    return module == __package__ or module.startswith(f"{__package__}.")


def per_sample_losses(loss: torch.Tensor) -> torch.Tensor:
    """The losses torch-pruning's ``GroupHessianImportance`` back-propagates one by one.

    ``(N,)`` per-sample losses are returned as they are; a loss with more dimensions
    (``(N, H, W)`` per-pixel cross-entropy with ``reduction="none"``, ``(N, T)`` per-token) is
    averaged over its non-batch dimensions to ``(N,)``, so one backward runs per sample, not per
    element (a 512x512 segmentation batch would be millions of backward passes); a scalar loss
    is kept with a ``UserWarning``: the Hessian estimate is then the outer product of a single
    gradient, not the per-sample estimate the criterion is defined with.

    Raises:
        TypeError: ``loss`` is not a tensor.
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor of losses, got {type(loss).__name__}")
    if loss.dim() == 0:
        warnings.warn(
            "hessian got a scalar loss from loss_fn, so its estimate rests on one gradient (a "
            "one-sample estimate): return per-sample losses of shape (N,), e.g. "
            "F.cross_entropy(model(x), y, reduction=\"none\")", UserWarning, stacklevel=2)
        return loss.reshape(1)
    if loss.dim() > 1:
        return loss.flatten(1).mean(1)
    return loss


def populate_gradients(model: nn.Module, importance: Any,
                       loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
    """Back-propagate ``loss_fn(model)`` for a gradient-based criterion.

    torch-pruning's ``GroupHessianImportance`` accumulates one gradient per sample, so for it
    ``loss_fn`` returns per-sample losses (shape ``(N,)``; more dimensions are averaged to
    that, a scalar is one sample with a warning: :func:`per_sample_losses`) and each is
    back-propagated alone; any other criterion gets ``loss.sum().backward()``, averaged over
    the ranks under ``torch.distributed``. Gradients are zeroed first.
    """
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = loss_fn(model)
        if isinstance(importance, tp.importance.GroupHessianImportance):
            importance.zero_grad()
            for sample_loss in per_sample_losses(loss):
                model.zero_grad(set_to_none=True)
                sample_loss.backward(retain_graph=True)
                importance.accumulate_grad(model)
        else:
            loss.sum().backward()
            all_reduce_gradients(model)  # under DDP: the global batch's gradients
