"""NNI 3.0 pruners for every criterion of kcp_plugin's registry, with coupled masks.

NNI's own channel pruners score and mask every layer on its own, so layers tied by a residual
add mask different channels, and NNI's speedup can only remove the channels they all agree on.
These pruners follow NNI's ``Pruner`` interface (``config_list``, ``compress()`` returning
``(model, masks)``, optimizer-step triggers that ``AGPPruner`` / ``LinearPruner`` drive) but
decide per coupled group of torch-pruning's dependency graph: each group is scored once with the
registered criterion, its channels are chosen from the ``config_list`` ratio of its layers, and
every member of the group (convs, linears and their BatchNorms, which are wrapped automatically)
gets the same channels masked. :func:`~kcp_plugin.integrations.nni.speedup` then removes them.

Scoring happens on a private copy of the model (the "shadow") whose weights are refreshed from
the wrapped model (weights times masks) before each scoring, so torch-pruning never sees NNI's
wrappers. Data-driven criteria collect statistics on the real model while an NNI evaluator
trains it (or on the shadow from ``data=`` batches); gradient criteria accumulate gradients
during that training (or back-propagate ``loss_fn``).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn as nn
import torch_pruning as tp
from nni.compression.base.compressor import Compressor, Pruner
from nni.compression.base.config import select_modules_by_config
from nni.compression.base.setting import PruningSetting
from nni.compression.base.target_space import TargetType
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.utils.evaluator import Evaluator, TensorHook, TorchEvaluator

from ...attention import detect_num_heads
from ...graph import (
    ForwardFn,
    check_runs,
    checked_graph,
    default_forward,
    output_layers,
    preserved_modes,
)
from ...importance.kcp import KCPImportance
from ...pruning import resolve_importance
from ...registry import importance_info, list_importances
from ...run import populate_gradients
from ...safety import unsafe_layers
from ...stats import StatsImportance, StepFn, collect, split_batch
from .config import validate_config_list
from .groups import (
    ChannelGroup,
    GroupRequest,
    channel_masks,
    coupled_groups,
    masked_channels,
    select_channels,
)

__all__ = ["KCPPluginPruner", "KCPPruner", "list_pruners", "pruner_class"]

logger = logging.getLogger(__name__)

_ACRONYMS = {"kcp", "fpgm", "bn", "lamp", "cdc", "cap", "obd"}


class _TestedWithSchedulers(logging.Filter):
    """Drop NNI's "Compatibility not tested with pruner type ..." warning for these pruners:
    they implement the trigger protocol AGPPruner / LinearPruner drive, and tests/test_nni.py
    runs them inside both."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith("Compatibility not tested with pruner type"):
            return True
        name = msg.rstrip(".").rsplit(" ", 1)[-1]
        return name not in {"KCPPluginPruner", *(c.__name__ for c in _CLASSES.values())}


logging.getLogger("nni.compression.pruning.scheduled_pruner").addFilter(_TestedWithSchedulers())


def _excluded(model: nn.Module, config: dict[str, Any]) -> set[str]:
    names = set(config.get("exclude_op_names", []))
    types = set(config.get("exclude_op_types", []))
    patterns = config.get("exclude_op_names_re", [])
    return {n for n, m in model.named_modules()
            if n in names or type(m).__name__ in types or any(re.match(p, n) for p in patterns)}


_BASES = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear)


def _wrappable(module: nn.Module) -> bool:
    """Whether NNI can wrap ``module`` for pruning. Subclasses of BatchNorm / conv / linear
    (timm's ``BatchNormAct2d``, ``SyncBatchNorm``, ``Conv2dSame``...) are registered with their
    base type's setting first: NNI's registry is keyed by exact class name."""
    name = type(module).__name__
    if name in PruningSetting.registry:
        return True
    for base in type(module).__mro__[1:]:
        if issubclass(base, _BASES) and base.__name__ in PruningSetting.registry:
            PruningSetting.register(name, PruningSetting.registry[base.__name__])
            return True
    return False


class KCPPluginPruner(Pruner):
    """NNI pruner scoring coupled channel groups with any registered criterion.

    Example::

        pruner = KCPPluginPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
                                 importance="kcp", example_inputs=torch.randn(1, 3, 224, 224))
        _, masks = pruner.compress()
        pruner.unwrap_model()
        speedup(model, masks, torch.randn(1, 3, 224, 224))   # physically smaller

    Semantics of ``config_list`` (NNI 3.0 keys; legacy keys raise a clear error):

    * A coupled group is pruned when at least one of its output-channel layers is selected with
      a ``sparse_ratio``; it loses ``int(channels * ratio)`` channels (the largest ratio of its
      selected layers), within the tightest ``min_sparse_ratio`` / ``max_sparse_ratio``.
      Every group keeps at least one channel (or channel-group slice).
    * Groups whose layers share a ``global_group_id`` are ranked together: ``sparse_ratio`` is
      their total, spread by score (NNI's global pruning).
    * A group containing a layer matched by an ``exclude_op_*`` key (and not selected by
      another entry), a model output layer (``protect_outputs``) or an attention qkv projection
      is left alone.
    * Masks cover every member of a group: unselected members that NNI can wrap (BatchNorm,
      conv, linear) are wrapped automatically, so ``compress()`` returns masks for them too.
    * When the ratio grows (``AGPPruner`` / ``LinearPruner``) channels masked before stay masked.

    Args:
        model: The model to prune (not yet wrapped by another compressor; use
            ``from_compressor`` to chain).
        config_list: NNI 3.0 ``config_list``.
        importance: Registry name (:func:`kcp_plugin.list_importances`) or a torch-pruning
            ``Importance``.
        evaluator: NNI evaluator. Needed by data-driven (``fisher``, ``cdc``...) and gradient
            (``taylor``, ``hessian``) criteria unless ``data`` / ``loss_fn`` is given:
            statistics or gradients are collected while it trains. Its ``dummy_input`` serves
            as ``example_inputs`` if those are not given.
        example_inputs: Inputs for tracing the dependency graph.
        forward_fn: ``forward_fn(model, example_inputs)`` if not ``model(x)``.
        importance_kwargs: Arguments of the registered criterion.
        training_steps: Optimizer steps the evaluator trains (collecting) before one-shot
            ``compress()`` generates the masks (data-driven / gradient criteria).
        data: Batches for a data-driven criterion, collected on the model copy before every
            mask generation (instead of an evaluator; see :func:`kcp_plugin.collect`).
        data_steps: Batches per collection (default: all of ``data``).
        step_fn: ``step_fn(model, batch) -> loss`` for that collection.
        loss_fn: ``loss_fn(model) -> loss`` for gradient criteria (instead of an evaluator;
            per-sample losses for ``hessian``).
        labels_fn: ``labels_fn(batch) -> labels`` for criteria that need labels (``cdc``);
            default: the batch's second item.
        protect_outputs: Never prune layers whose channels are model outputs.
        existed_wrappers: Used by NNI's ``from_compressor``.

    Raises:
        ValueError / TypeError: bad config, criterion, inputs or missing data source; raised
            before the model is wrapped.
    """

    importance_name: str | None = None

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        importance: str | tp.importance.Importance = "kcp",
        evaluator: Evaluator | None = None,
        *,
        example_inputs: Any = None,
        forward_fn: ForwardFn | None = None,
        importance_kwargs: dict[str, Any] | None = None,
        training_steps: int | None = None,
        data: Iterable[Any] | None = None,
        data_steps: int | None = None,
        step_fn: StepFn | None = None,
        loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
        labels_fn: Callable[[Any], torch.Tensor] | None = None,
        protect_outputs: bool = True,
        existed_wrappers: dict[str, ModuleWrapper] | None = None,
    ):
        # ------------------------------------------------------------ validation, no wrapping
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if existed_wrappers is None and any("_nni_wrapper" in m._modules for m in model.modules()):
            raise ValueError("the model is already wrapped by an NNI compressor: unwrap it, or "
                             "chain with KCPPluginPruner.from_compressor(other, config_list)")
        config = validate_config_list(config_list)
        imp, imp_name, needs_grad = resolve_importance(importance, importance_kwargs)
        needs_data = isinstance(imp, StatsImportance)
        if evaluator is not None and not isinstance(evaluator, Evaluator):
            raise TypeError("evaluator must be an NNI Evaluator (e.g. TorchEvaluator), got "
                            f"{type(evaluator).__name__}")
        if training_steps is not None and (not isinstance(training_steps, int)
                                           or isinstance(training_steps, bool)
                                           or training_steps < 1):
            raise ValueError(f"training_steps must be a positive integer, got {training_steps!r}")
        if data is not None and not needs_data:
            raise ValueError(f"data is for data-driven criteria; {imp_name!r} does not use it")
        if loss_fn is not None and not needs_grad:
            raise ValueError(f"loss_fn is for gradient criteria; {imp_name!r} does not use it")
        if example_inputs is None and evaluator is not None:
            try:
                example_inputs = evaluator.get_dummy_input()
            except NotImplementedError:
                example_inputs = None
        if example_inputs is None:
            raise ValueError("pass example_inputs=... (or an evaluator with dummy_input): the "
                             "dependency graph of coupled layers is traced from them")
        fwd = forward_fn or default_forward
        check_runs(model, example_inputs, fwd)
        shadow = copy.deepcopy(model)
        graph = checked_graph(shadow, example_inputs, fwd)

        settings, excluded = self._selected_layers(model, config)
        modules = dict(shadow.named_modules())
        protected: dict[nn.Module, str] = {}
        ratioed = {n for n, s in settings.items() if s.get("sparse_ratio") is not None}
        for name in excluded - ratioed:
            protected[modules[name]] = "excluded in config_list"
        if protect_outputs:
            protected.update({m: "a model output layer" for m in output_layers(graph)})
        protected.update({m: "an attention qkv projection" for m in detect_num_heads(shadow)})
        protected.update(unsafe_layers(graph, {m: n for n, m in shadow.named_modules()}))
        groups = coupled_groups(shadow, graph, protected)
        active, extra = [], set()
        for group in groups:
            chosen = [m.name for m in group.members
                      if settings.get(m.name, {}).get("sparse_ratio") is not None]
            if not chosen:
                continue
            if group.protected_by:
                logger.info("not pruning the group of %r (%s): %s", group.root_name,
                            ", ".join(group.member_names), group.protected_by)
                continue
            gids = {settings[n].get("global_group_id") for n in chosen} - {None}
            if len(gids) > 1:
                raise ValueError(f"layers {', '.join(chosen)} are coupled (they share channels) "
                                 "but have different global_group_id values "
                                 f"{sorted(map(str, gids))}")
            active.append(group)
            extra |= {m.name for m in group.members
                      if m.name not in settings and _wrappable(m.module)}
        self._check_global_ratios(active, settings)
        if extra:
            config = config + [{"op_names": sorted(extra), "target_names": ["weight", "bias"]}]

        # ------------------------------------------------------------ wrap (NNI)
        super().__init__(model, config, evaluator, existed_wrappers)
        self.importance = imp
        self.importance_description = imp_name
        self._needs_grad = needs_grad
        self._needs_data = needs_data
        self._hessian = isinstance(imp, tp.importance.GroupHessianImportance)
        self._example_inputs = example_inputs
        self._forward_fn = fwd
        self._shadow = shadow
        self._graph = graph
        self._groups = groups
        self._active = active
        # a layer can belong to several groups (DenseNet's norms read many concatenated inputs)
        self._memberships: dict[str, list[tuple[ChannelGroup, Any]]] = {}
        for g in groups:
            for m in g.members:
                self._memberships.setdefault(m.name, []).append((g, m))
        self._data = (data, data_steps, step_fn) if data is not None else None
        self._loss_fn = loss_fn
        self._labels_fn = labels_fn
        self.training_steps = training_steps
        self._grad_sums: dict[str, list] = {}
        self._collecting = False
        self.generated = 0
        self.last_selection: dict[str, list[int]] = {}
        # NNI's trigger protocol (see _NormPruner): AGPPruner / LinearPruner set these.
        self.interval_steps = -1
        self.total_times: int | Literal["unlimited"] = 1
        self.first_step_gen = False

    # ---------------------------------------------------------------- construction helpers
    @staticmethod
    def _selected_layers(
        model: nn.Module, config: list[dict[str, Any]]
    ) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Per-layer settings (first matching entry wins, as in NNI) and excluded names."""
        settings: dict[str, dict[str, Any]] = {}
        excluded: set[str] = set()
        for i, entry in enumerate(config):
            selected, public, _ = select_modules_by_config(model, entry)
            for name, module in selected.items():
                if type(module).__name__ not in PruningSetting.registry:
                    raise ValueError(
                        f"config_list[{i}] selects {name!r} ({type(module).__name__}), which NNI "
                        "cannot wrap for pruning; select one of "
                        f"{', '.join(sorted(PruningSetting.registry))}"
                    )
                settings.setdefault(name, public)
            excluded |= _excluded(model, entry)
        return settings, excluded

    @staticmethod
    def _check_global_ratios(active: list[ChannelGroup],
                             settings: dict[str, dict[str, Any]]) -> None:
        ratios: dict[Any, set[float]] = {}
        for group in active:
            for m in group.members:
                s = settings.get(m.name, {})
                if s.get("global_group_id") is not None and s.get("sparse_ratio") is not None:
                    ratios.setdefault(s["global_group_id"], set()).add(s["sparse_ratio"])
        for gid, values in ratios.items():
            if len(values) > 1:
                raise ValueError(f"global_group_id {gid!r} has several sparse_ratio values "
                                 f"{sorted(values)}: layers ranked together share one ratio")

    # ---------------------------------------------------------------- mask generation
    def _requests(self) -> list[GroupRequest]:
        """The current ratio of every active group, read from NNI's target spaces (which
        AGPPruner / LinearPruner update)."""
        out = []
        for group in self._active:
            ratios, lo, hi, gid = [], 0.0, 1.0, None
            for m in group.members:
                ts = self._target_spaces.get(m.name, {}).get("weight")
                if ts is None or ts.sparse_ratio is None:
                    continue
                ratios.append(float(ts.sparse_ratio))
                lo = max(lo, float(ts.min_sparse_ratio or 0.0))
                hi = min(hi, float(ts.max_sparse_ratio or 1.0))
                gid = ts.global_group_id if ts.global_group_id is not None else gid
            if ratios:
                out.append(GroupRequest(group, max(ratios), lo, hi, gid))
        return out

    def _current_masked(self) -> dict[int, set[int]]:
        """Root channels of each active group masked in every member that has a mask."""
        out = {}
        for group in self._active:
            sets = []
            for m in group.members:
                ts = self._target_spaces.get(m.name, {}).get("weight")
                if ts is None or ts.mask is None:
                    continue
                chans = masked_channels(m.module, {"weight": ts.mask}, m.name)
                if chans is not None:
                    sets.append(m.to_root(chans))
            if sets:
                out[group.index] = set.intersection(*sets)
        return out

    @torch.no_grad()
    def _sync_shadow(self) -> None:
        """Copy the wrapped model's effective weights (weight x mask) and buffers."""
        live = dict(self.bound_model.named_modules())
        for name, smod in self._shadow.named_modules():
            lmod = live.get(name)
            if lmod is None:
                continue
            wrapper = self._module_wrappers.get(name)
            tensors = list(smod._parameters.items()) + list(smod._buffers.items())
            for key, tensor in tensors:
                if tensor is None:
                    continue
                value = None
                if wrapper is not None and key in wrapper.pruning_target_spaces:
                    ts = wrapper.pruning_target_spaces[key]
                    if ts.target is not None:
                        value = ts.target if ts.mask is None else ts.target * ts.mask
                if value is None:
                    value = getattr(lmod, key, None)
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    tensor.copy_(value.detach())

    def _collect_data(self) -> dict[str, Any]:
        self._sync_shadow()
        shadow = self._shadow
        if self._needs_grad:
            if self._loss_fn is not None:
                with preserved_modes(shadow):
                    shadow.eval()
                    populate_gradients(shadow, self.importance, self._loss_fn)
            else:
                self._grads_to_shadow()
        if self._needs_data:
            imp: StatsImportance = self.importance  # type: ignore[assignment]
            if self._data is not None:
                batches, steps, step_fn = self._data
                collect(shadow, batches, imp, steps=steps, example_inputs=self._example_inputs,
                        forward_fn=self._forward_fn, step_fn=step_fn, labels_fn=self._labels_fn,
                        progress=False)
            else:
                imp.detach()
                imp.all_reduce()
            imp.bind(shadow)
        return {"masked": self._current_masked(), "requests": self._requests()}

    def _calculate_metrics(self, data: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Scores of every active group's root channels: ``{root layer: {"weight": scores}}``."""
        self._pending = data
        metrics = {}
        for req in data["requests"]:
            if isinstance(self.importance, KCPImportance):
                self.importance.keep_ratio_hint = max(1.0 - req.ratio, 1e-3)
            with torch.no_grad():
                score = self.importance(req.group.tp_group)
            if score is None:
                logger.debug("%s returned no score for the group of %r",
                             self.importance_description, req.group.root_name)
                continue
            metrics[req.group.root_name] = {"weight": score.detach().reshape(-1)}
        return metrics

    def _generate_sparsity(self, metrics: dict[str, dict[str, torch.Tensor]]
                           ) -> dict[str, dict[str, torch.Tensor]]:
        data = self._pending
        requests = [r for r in data["requests"] if r.group.root_name in metrics]
        scores = {r.group.index: metrics[r.group.root_name]["weight"] for r in requests}
        chosen = select_channels(requests, scores, data["masked"])
        self.last_selection = {self._groups[i].root_name: c for i, c in chosen.items()}
        masks: dict[str, dict[str, torch.Tensor]] = {}
        for name, wrapper in self._module_wrappers.items():
            targets = [k for k, ts in wrapper.pruning_target_spaces.items()
                       if ts.type is TargetType.PARAMETER and ts.target is not None]
            if not targets:
                continue
            entries = self._memberships.get(name, [])
            local = {c for group, member in entries
                     for c in member.to_local(chosen.get(group.index, []))}
            module = entries[0][1].module if entries else wrapper.module
            masks[name] = channel_masks(module, local, targets)
        return masks

    # ---------------------------------------------------------------- collection with an evaluator
    def _uses_evaluator(self) -> bool:
        return (self._needs_data and self._data is None) or \
            (self._needs_grad and self._loss_fn is None)

    def _grad_targets(self) -> dict[str, torch.Tensor]:
        """Trainable tensor of the wrapped model behind each shadow parameter name."""
        live = dict(self.bound_model.named_modules())
        out = {}
        for pname, _ in self._shadow.named_parameters():
            mname, _, key = pname.rpartition(".")
            wrapper = self._module_wrappers.get(mname)
            tensor = None
            if wrapper is not None and key in wrapper.pruning_target_spaces:
                tensor = wrapper.pruning_target_spaces[key].target
            elif mname in live:
                tensor = live[mname]._parameters.get(key)
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                out[pname] = tensor
        return out

    def _start_collection(self, evaluator: Evaluator) -> None:
        if not self._uses_evaluator():
            return
        if self._needs_data and self._data is None:
            imp: StatsImportance = self.importance  # type: ignore[assignment]
            if imp.needs_labels:
                if not isinstance(evaluator, TorchEvaluator):
                    raise ValueError(f"{self.importance_description!r} needs labels: it reads "
                                     "them from TorchEvaluator's training_step batches; pass "
                                     "data=<batches> with other evaluators")
                step = evaluator._training_step
                labels_fn = self._labels_fn or (lambda batch: split_batch(batch)[1])

                def labelled_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
                    imp.set_labels(labels_fn(batch))
                    return step(batch, *args, **kwargs)

                # reverted by TorchEvaluator.unbind_model (revert_loss)
                evaluator._training_step = labelled_step
            imp.reset()
            imp.attach(self.bound_model, self._example_inputs, self._forward_fn)
        if self._needs_grad and self._loss_fn is None:
            hooks = []
            self._grad_sums = {}
            for pname, tensor in self._grad_targets().items():
                slot = self._grad_sums.setdefault(pname, [None, None, 0])

                def factory(buffer: list, slot: list = slot) -> Callable:
                    def hook(grad: torch.Tensor) -> None:
                        g = grad.detach()
                        slot[0] = g.clone() if slot[0] is None else slot[0] + g
                        slot[1] = g.pow(2) if slot[1] is None else slot[1] + g.pow(2)
                        slot[2] += 1
                    return hook

                hooks.append(TensorHook(tensor, pname, factory))
            evaluator.register_hooks(hooks)
        self._collecting = True

    def _restart_collection(self) -> None:
        if not self._collecting:
            return
        if self._needs_data and self._data is None:
            self.importance.reset()
            self.importance.attach(self.bound_model, self._example_inputs, self._forward_fn)
        for slot in self._grad_sums.values():
            slot[:] = [None, None, 0]

    def _stop_collection(self) -> None:
        if self._collecting and self._needs_data and self._data is None:
            self.importance.detach()
        self._collecting = False

    def _grads_to_shadow(self) -> None:
        params = dict(self._shadow.named_parameters())
        seen = 0
        for pname, (total, squares, count) in self._grad_sums.items():
            if count == 0 or pname not in params:
                continue
            seen += 1
            value = squares if self._hessian else total
            params[pname].grad = (value / count).to(params[pname].device).clone()
        if not seen:
            raise RuntimeError(f"{self.importance_description!r} reads gradients, and none were "
                               "collected: the evaluator did not train (no optimizer step "
                               "with a backward pass) before the masks were generated")

    # ---------------------------------------------------------------- NNI's compress protocol
    def _register_trigger(self, evaluator: Evaluator) -> None:
        self._current_step = 0
        self._is_first_step = True
        self._remaining_times = self.total_times

        def optimizer_task() -> None:
            self._current_step += 1
            due = (self._is_first_step and self.first_step_gen) or \
                self._current_step == self.interval_steps
            if due:
                self.update_masks(self.generate_masks())
                self.generated += 1
                if isinstance(self._remaining_times, int):
                    self._remaining_times -= 1
                if self._remaining_times == "unlimited" or self._remaining_times > 0:
                    self._restart_collection()
                else:
                    self._stop_collection()
            if self._current_step == self.interval_steps and \
                    (self._remaining_times == "unlimited" or self._remaining_times > 0):
                self._current_step = 0
            self._is_first_step = False

        evaluator.patch_optimizer_step(before_step_tasks=[], after_step_tasks=[optimizer_task])

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        self._start_collection(evaluator)
        self._register_trigger(evaluator)

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:
        self._stop_collection()

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        if not self._uses_evaluator():
            if max_steps is not None or max_epochs is not None:
                raise ValueError(f"{type(self).__name__} with {self.importance_description!r} "
                                 "generates masks without training: call compress() without "
                                 "max_steps / max_epochs, or schedule it with AGPPruner")
            self.update_masks(self.generate_masks())
            self.generated += 1
            return
        if self.evaluator is None:
            source = "data=<batches>" if self._needs_data else "loss_fn=lambda model: <loss>"
            raise ValueError(
                f"importance {self.importance_description!r} needs "
                f"{'data' if self._needs_data else 'gradients'}: pass evaluator="
                "TorchEvaluator(...) and training_steps=N (collected while it trains), or "
                f"{source}, or schedule the pruner with AGPPruner/LinearPruner(..., evaluator)"
            )
        if self.training_steps is None:
            raise ValueError(f"{self.importance_description!r} collects statistics while the "
                             "evaluator trains: pass training_steps=N (optimizer steps) to the "
                             "pruner for compress()")
        self.interval_steps, self.total_times = self.training_steps, 1
        before = self.generated
        self._fusion_compress(self.training_steps, None)
        if self.generated == before:
            raise RuntimeError(
                f"the evaluator's training function returned after {self._current_step} "
                f"optimizer steps, before training_steps={self.training_steps}: make it respect "
                "max_steps (loop over the data again) or lower training_steps"
            )

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None
                 ) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
        """Generate the masks (one-shot) and return ``(model, masks)``, as NNI's pruners do.

        Data-driven and gradient criteria with an evaluator first train ``training_steps``
        optimizer steps while collecting; the others score the current weights.
        """
        return super().compress(max_steps, max_epochs)

    @classmethod
    def from_compressor(cls, compressor: Compressor, new_config_list: list[dict[str, Any]],
                        *args: Any, evaluator: Evaluator | None = None, **kwargs: Any
                        ) -> KCPPluginPruner:
        """Chain after another NNI compressor, inheriting its wrappers and evaluator."""
        return super().from_compressor(compressor, new_config_list, *args, evaluator=evaluator,
                                       **kwargs)


class KCPPruner(KCPPluginPruner):
    """NNI pruner with Kernel Cluster Pruning (the ``kcp`` criterion) on coupled groups.

    ``importance_kwargs`` selects a variant (``{"centre": "representative"}``...); every other
    argument is :class:`KCPPluginPruner`'s.
    """

    importance_name = "kcp"

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]],
                 evaluator: Evaluator | None = None, **kwargs: Any):
        if "importance" in kwargs:
            raise TypeError("KCPPruner uses the 'kcp' criterion; use KCPPluginPruner for others")
        super().__init__(model, config_list, "kcp", evaluator, **kwargs)


_CLASSES: dict[str, type[KCPPluginPruner]] = {"kcp": KCPPruner}


def _class_name(name: str) -> str:
    parts = re.split(r"[^0-9a-zA-Z]+", name)
    camel = "".join(p.upper() if p.lower() in _ACRONYMS else p.capitalize() for p in parts if p)
    return f"{camel}GroupPruner"


def pruner_class(name: str) -> type[KCPPluginPruner]:
    """The NNI pruner class of a registered criterion (``"kcp"`` gives :class:`KCPPruner`).

    Classes are made on first use, so criteria registered later get one too; they are named
    ``<Criterion>GroupPruner`` (``FisherGroupPruner``, ``L2GroupPruner``...) and importable from
    :mod:`kcp_plugin.integrations.nni`. Their signature is ``(model, config_list, evaluator=None,
    **kwargs)`` with the keyword arguments of :class:`KCPPluginPruner`.

    Raises:
        ValueError: ``name`` is not registered.
    """
    info = importance_info(name)
    cls = _CLASSES.get(info.name)
    if cls is None:
        criterion = info.name

        def __init__(self: KCPPluginPruner, model: nn.Module, config_list: list[dict[str, Any]],
                     evaluator: Evaluator | None = None, **kwargs: Any) -> None:
            if "importance" in kwargs:
                raise TypeError(f"{type(self).__name__} uses the {criterion!r} criterion")
            KCPPluginPruner.__init__(self, model, config_list, criterion, evaluator, **kwargs)

        doc = (f"NNI pruner with the ``{criterion}`` criterion on coupled channel groups "
               f"({info.summary}). Arguments: see :class:`KCPPluginPruner`.")
        cls = type(_class_name(criterion), (KCPPluginPruner,),
                   {"__init__": __init__, "__doc__": doc, "importance_name": criterion,
                    "__module__": __name__})
        _CLASSES[criterion] = cls
    return cls


def list_pruners() -> dict[str, str]:
    """Criterion name -> NNI pruner class name, for every registered criterion."""
    return {name: pruner_class(name).__name__ for name in list_importances()}


def __getattr__(name: str) -> Any:
    for criterion in list_importances():
        if _class_name(criterion) == name:
            return pruner_class(criterion)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
