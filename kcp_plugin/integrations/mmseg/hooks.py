"""``PruningHook``: structural pruning inside an mmengine ``Runner`` (one-shot or scheduled).

Add it to an mmseg config::

    custom_hooks = [dict(type='kcp_plugin.PruningHook', importance='kcp',
                         target_macs_ratio=0.5,
                         schedule=dict(num_prunes=4, start=0, every=500))]

Where it acts in mmengine's ``Runner.train()`` (build optim wrapper -> param schedulers ->
``before_run`` -> init weights -> load/resume -> ``before_train`` -> iterations):

* ``before_run``: loads of state dicts into the model raise on size mismatches from now on.
* ``after_load_checkpoint`` (``load_from`` / ``resume``, before weights are copied in): replays
  the checkpoint's pruning plan on the model, so the pruned weights fit, and restores the
  schedule.
* ``before_train``: builds the :class:`kcp_plugin.schedule.PruningScheduler` on the unwrapped
  model (after weights are loaded).
* ``before_train_iter``: at the schedule's pruning points (counted in iterations, or in epochs
  with ``by_epoch=True``), prunes. In distributed training every rank prunes on statistics
  all-reduced over the ranks and rank 0's plan is then made every rank's
  (:mod:`kcp_plugin.distributed`), so every rank reaches the same structure.
* after every structural change, what holds the old parameters is rebuilt: the optimizer
  (:func:`kcp_plugin.rebuild_optimizer`: the same object, state carried, so parameter schedulers
  and an LR already scaled by ``auto_scale_lr`` stay valid), the DDP wrapper (re-made around the
  pruned module, which also re-broadcasts rank 0's weights), ``EMAHook``'s averaged copy (pruned
  by the same plan, averages kept) and a regularizing optimizer wrapper's regularizer.
* ``before_save_checkpoint``: stores the plan (plain data), the dense MACs and the scheduler
  state in ``checkpoint['meta']['kcp_plugin']``.

A latency target (``target_latency_ratio=r``, measured on ``latency_backend``) is reached at
one pruning point, the schedule's last, by :class:`kcp_plugin.schedule.PruningScheduler`: earlier
points follow the schedule's MACs ramp, and the last one prunes with :func:`kcp_plugin.prune`'s
latency target until the network keeps ``r`` of the latency of the dense network. What the hook
adds: the dense reference of a resumed run (the freshly built segmentor, copied before the
checkpoint's plan is replayed on it), the runtime and device checks at ``before_train``, and the
outcome in the log, the message hub and the checkpoint meta.

Distillation (``distill=dict(type='kl', ...)``, the fields of
:class:`kcp_plugin.distill.DistillConfig`): the model as it is at ``before_train`` (after
``load_from``) becomes the frozen teacher, and every training step's loss dict gains the
distillation terms (``loss_distill_out``, ``loss_distill_feat``, ``loss_distill_dca``), which
mmengine sums into the total loss and logs (:mod:`.distill`). The teacher is not a submodule of
the model: not in the optimizer, the DDP wrapper or the checkpoints. It is written once per run
to ``work_dir/distill_teacher.pth`` and rebuilt from that file on resume.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os.path as osp
import uuid
from typing import Any

import torch
import torch.nn as nn
from mmengine.dist import get_dist_info
from mmengine.hooks import EMAHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from torch.nn.parallel import DistributedDataParallel

from kcp_plugin import (
    Backend,
    count_macs_params,
    get_plan,
    importance_info,
    prune,
    rebuild_optimizer,
)
from kcp_plugin.distill import DistillConfig, Distiller
from kcp_plugin.distributed import prune_on_every_rank
from kcp_plugin.graph import preserved_modes, resolve_layers
from kcp_plugin.plan import validate_plan
from kcp_plugin.pruning import LATENCY_ARGS, check_latency_arguments
from kcp_plugin.registry import criterion_arguments
from kcp_plugin.schedule import RAMPS, PruningScheduler, resolve_mode
from kcp_plugin.stats import RecentBatches

from .checkpoint import META_KEY, raise_on_size_mismatch
from .distill import (
    TEACHER_FILE,
    SegmentorDistillLoss,
    check_distill_config,
    check_segmentor,
    load_teacher,
    save_teacher,
)
from .optim_wrapper import RegularizerMixin
from .registry import HOOKS
from .structure import (
    check_cascade,
    example_inputs,
    output_convs,
    point_heads,
    sync_structure,
    tensor_forward,
    trace_forward,
    unwrap,
)

__all__ = ["PruningHook", "META_KEY"]

_SCHEDULE_KEYS = {"num_prunes": 1, "start": 0, "every": 1, "ramp": "linear", "mode": "hard",
                  "decay": "linear", "decay_rate": 3.0, "by_epoch": False}
# prune() arguments the hook sets itself
_OWN_ARGS = {"model", "example_inputs", "importance", "target_macs_ratio", "pruning_ratio",
             "ignored_layers", "forward_fn", "importance_kwargs", "loss_fn", "progress",
             "dry_run", "iterative_steps", "data", "data_steps", "step_fn"}


@HOOKS.register_module()
class PruningHook(Hook):
    """Prune an mmseg segmentor during training with any registered criterion.

    Args:
        importance: Criterion name from :func:`kcp_plugin.list_importances`.
        importance_kwargs: Arguments of the criterion.
        target_macs_ratio: Fraction of the dense model's MACs kept at the end, in (0, 1]
            (measured on the deployed, tensor-mode network at ``input_shape``).
        pruning_ratio: Channel ratio instead (one pruning point only).
        schedule: When to prune: ``num_prunes`` points, the first at ``start``, then every
            ``every`` iterations (epochs with ``by_epoch=True``), following ``ramp``
            (``linear``/``exponential``/``agp``/``asfp``), ``mode`` ``hard``/``soft``/``decay``
            with ``decay``/``decay_rate`` (see :class:`kcp_plugin.schedule.PruningScheduler`).
            Default: one-shot, before the first iteration.
        input_shape: Input used for tracing and MACs: ``(H, W)`` or ``(N, C, H, W)``; default
            the data preprocessor's ``size`` (the training crop), else 512 x 512.
        ignored_layers: Layer names never pruned (the heads' ``conv_seg`` always are).
        prune_kwargs: Further :func:`kcp_plugin.prune` arguments (``round_to``,
            ``global_pruning``, ``max_pruning_ratio``, ``macs_tolerance``...).
        data_steps: For data-driven criteria (``fisher``, ``cdc``, ``cap``): statistics are
            collected at each pruning point on the last ``data_steps`` training batches
            (kept as the data loader gave them; preprocessed when collected).
        target_latency_ratio: Fraction of the dense network's latency kept at the end, in
            (0, 1], measured on ``latency_backend`` at ``input_shape`` (the traced forward:
            the deployed network plus the auxiliary heads on 4 x 4 pooled maps). Reached at
            the schedule's last pruning point; earlier points follow the MACs ramp (to
            ``target_macs_ratio``, else to this ratio read as a MACs fraction). With
            ``target_macs_ratio`` as well, the last point keeps at most both fractions
            (``latency_allocation='table'`` only).
        latency_backend: Where latency is measured: a name (``'torch'``, ``'onnxruntime'``,
            ``'cuda'``), a dict of :class:`kcp_plugin.Backend` fields (``dict(name='cuda',
            dtype='bf16', batch=64)``) or a record. With a MACs target alone it sets the
            channel multiple widths are rounded to, and every pruning point measures the
            pruned network against the one before it (a warning if slower). The CPU runtimes
            need the model on the CPU; with a latency target ``'cuda'`` needs a GPU (both
            checked before training; a MACs target only skips the timing, with a warning).
        latency_allocation: ``'table'`` (per-group widths from a latency table of the
            backend) or ``'uniform'`` (one channel ratio, searched on measured latency).
        distill: Distillation from the model as it is when training starts (the dense
            network, or the ``load_from`` checkpoint): a dict of
            :class:`kcp_plugin.distill.DistillConfig` fields (``type`` or ``output``: ``'kl'``,
            ``'cwd'``, ``'l1'``, ``'mse'`` or None; ``weight``, ``temperature``, ``layers``,
            ``layer_weight``, ``dca_layers``, ``dca_weight``, ``dca_batches``...), the name of
            an output loss, or None (off). The output compared is the decode head's logits;
            the terms join mmseg's loss dict. Adapters (``adapter=True``) are refused.

    Attributes:
        distiller: The :class:`kcp_plugin.distill.Distiller` of ``distill`` (None before
            ``before_train`` or without ``distill``); ``distiller.teacher`` is the teacher.
    """

    priority = "ABOVE_NORMAL"  # before EMAHook (NORMAL) and CheckpointHook (VERY_LOW)

    def __init__(
        self,
        importance: str = "kcp",
        importance_kwargs: dict[str, Any] | None = None,
        target_macs_ratio: float | None = None,
        pruning_ratio: float | None = None,
        schedule: dict[str, Any] | None = None,
        input_shape: tuple[int, ...] | list[int] | None = None,
        ignored_layers: list[str] | None = None,
        prune_kwargs: dict[str, Any] | None = None,
        data_steps: int = 8,
        target_latency_ratio: float | None = None,
        latency_backend: str | dict[str, Any] | Backend | None = None,
        latency_allocation: str = "table",
        distill: DistillConfig | dict[str, Any] | str | None = None,
    ):
        # ---- everything is validated here, when the config is built, before any model exists
        info = importance_info(importance)  # unknown names list the valid ones
        self.distill = check_distill_config(distill)
        if not isinstance(data_steps, int) or isinstance(data_steps, bool) or data_steps < 1:
            raise ValueError(f"data_steps must be an integer >= 1, got {data_steps!r}")
        from kcp_plugin import get_importance

        get_importance(info.name, **(importance_kwargs or {}))  # checks the arguments
        if (pruning_ratio is None) == (target_macs_ratio is None and target_latency_ratio is None):
            raise ValueError("give exactly one of target_macs_ratio (fraction of MACs kept), "
                             "pruning_ratio (fraction of channels removed) or "
                             "target_latency_ratio (fraction of the dense latency kept; "
                             "target_macs_ratio may cap its MACs)")
        if target_macs_ratio is not None and not (
                isinstance(target_macs_ratio, (int, float)) and 0 < target_macs_ratio <= 1):
            raise ValueError(f"target_macs_ratio must be in (0, 1], got {target_macs_ratio!r}")
        if pruning_ratio is not None and not (
                isinstance(pruning_ratio, (int, float)) and 0 <= pruning_ratio < 1):
            raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio!r}")
        sched = dict(_SCHEDULE_KEYS)
        if schedule is not None:
            if not isinstance(schedule, dict):
                raise TypeError(f"schedule must be a dict, got {type(schedule).__name__}")
            unknown = sorted(set(schedule) - set(_SCHEDULE_KEYS))
            if unknown:
                raise ValueError(f"unknown schedule keys {', '.join(unknown)}; valid: "
                                 f"{', '.join(sorted(_SCHEDULE_KEYS))}")
            sched.update(schedule)
        for key in ("num_prunes", "every"):
            if not isinstance(sched[key], int) or sched[key] < 1:
                raise ValueError(f"schedule {key} must be an integer >= 1, got {sched[key]!r}")
        if not isinstance(sched["start"], int) or sched["start"] < 0:
            raise ValueError(f"schedule start must be an integer >= 0, got {sched['start']!r}")
        if sched["ramp"] not in RAMPS:
            raise ValueError(f"schedule ramp must be one of {', '.join(RAMPS)}")
        try:  # the papers' names (SFP, SRFP, ASRFP) are accepted too
            sched["mode"], sched["ramp"] = resolve_mode(sched["mode"], sched["ramp"])
        except ValueError as exc:
            raise ValueError(f"schedule {exc}") from None
        if pruning_ratio is not None and (sched["num_prunes"] != 1 or sched["mode"] != "hard"):
            raise ValueError("pruning_ratio prunes once (num_prunes=1, mode='hard'); use "
                             "target_macs_ratio for iterative or soft schedules")
        prune_kwargs = dict(prune_kwargs or {})
        # the latency arguments (the runtime itself is checked at before_train)
        backend = check_latency_arguments(
            target_latency_ratio, latency_backend, latency_allocation,
            target_macs_ratio=target_macs_ratio, prune_kwargs=prune_kwargs, owner="PruningHook")
        accepted = set(inspect.signature(prune).parameters) - _OWN_ARGS - set(LATENCY_ARGS)
        bad = sorted(set(prune_kwargs) - accepted)
        if bad:
            raise ValueError(f"prune_kwargs: {', '.join(bad)} cannot be set here; accepted: "
                             f"{', '.join(sorted(accepted))}")
        if ignored_layers is not None and (
                isinstance(ignored_layers, str)
                or not all(isinstance(n, str) for n in ignored_layers)):
            raise TypeError("ignored_layers must be a list of layer names")
        self.importance = info.name
        self.importance_kwargs = dict(importance_kwargs or {})
        self.info = info  # what the criterion needs (gradients, per-sample losses, data)
        self.data_steps = data_steps
        self._recent = RecentBatches(data_steps, owner="PruningHook")
        self.target_macs_ratio = target_macs_ratio
        self.pruning_ratio = pruning_ratio
        self.target_latency_ratio = target_latency_ratio
        self.latency_backend = backend  # None: nothing is measured
        self.latency_allocation = latency_allocation
        # a resumed run's latency reference (the model before the plan was replayed on it)
        self._dense: nn.Module | None = None
        self.schedule = sched
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.ignored_layers = list(ignored_layers or [])
        self.prune_kwargs = prune_kwargs
        self.scheduler: PruningScheduler | None = None
        self.macs_dense: int | None = None
        self.calls = 0  # schedule calls done (for pruning_ratio, which has no scheduler)
        self._inputs: torch.Tensor | None = None
        self._loaded: dict[str, Any] | None = None
        self._batch: Any = None
        # distillation: a resumed run's teacher (rebuilt from its file), where the teacher
        # file is, the run it belongs to, the distiller of a one-shot pruning_ratio run (a
        # schedule's is the scheduler's), and the loss that joins its terms to mmseg's
        self._teacher: nn.Module | None = None
        self._teacher_path: str | None = None
        self._run_id: str | None = None
        self._distiller: Distiller | None = None
        self._distill_loss: SegmentorDistillLoss | None = None

    @property
    def latency(self) -> dict[str, Any] | None:
        """The latency target's outcome (:attr:`kcp_plugin.schedule.PruningScheduler.latency`),
        None before its point."""
        return self.scheduler.latency if self.scheduler is not None else None

    @property
    def distiller(self) -> Distiller | None:
        """The distiller of ``distill`` (None before ``before_train`` or without it)."""
        if self.scheduler is not None:
            return self.scheduler.distiller
        return self._distiller

    # ------------------------------------------------------------------ helpers
    def _model(self, runner) -> nn.Module:
        return unwrap(runner.model)

    def _example(self, runner) -> torch.Tensor:
        return self._example_for(self._model(runner))

    def _example_for(self, model: nn.Module) -> torch.Tensor:
        if self._inputs is None or self._inputs.device != _device(model):
            self._inputs = example_inputs(model, self.input_shape)
        return self._inputs

    def _protected(self, model: nn.Module) -> list[str]:
        resolve_layers(model, self.ignored_layers, "PruningHook ignored_layers")  # names exist
        return list(dict.fromkeys(self.ignored_layers + output_convs(model)))

    def _loss(self, model: nn.Module, batch: Any, reduction: str) -> torch.Tensor:
        """mmseg's training loss of a raw training batch, for gradient criteria (``taylor``;
        ``reduction="none"``, one loss per sample, for ``hessian``: mmseg's loss dicts are
        batch means, so the batch is split into single-sample losses).

        Runs in eval mode: no batch statistics enter the scores, and SyncBN does not wait for
        the other ranks (only rank 0 scores in distributed training).
        """
        with preserved_modes(model):
            model.eval()
            data = model.data_preprocessor(batch, True)
            if reduction != "none":
                loss, _ = model.parse_losses(model(**data, mode="loss"))
                return loss * len(data["data_samples"]) if reduction == "sum" else loss
            inputs, samples = data["inputs"], data["data_samples"]
            return torch.stack([
                model.parse_losses(model(inputs[i:i + 1], samples[i:i + 1], mode="loss"))[0]
                for i in range(len(samples))])

    def _current_batch(self) -> Any:
        if self._batch is None:
            raise RuntimeError("no training batch to compute the loss of")
        return self._batch

    def _feed(self, runner) -> dict[str, Any]:
        """``prune`` arguments that feed the criterion (:func:`criterion_arguments`): the
        current training batch's loss for gradient criteria, the recent training batches
        (preprocessed when a pruning point collects on them) for data-driven ones."""
        self._recent.transform = functools.partial(_preprocess, unwrap(runner.model))
        return criterion_arguments(self.info, self._loss, batch=self._current_batch,
                                   batches=self._recent, step_fn=_loss_step)

    # ------------------------------------------------------------------ hook stages
    def before_run(self, runner) -> None:
        model = self._model(runner)
        raise_on_size_mismatch(model)
        self._protected(model)  # unknown ignored layers fail now, not at the first prune
        check_cascade(model)  # and cascades whose heads cannot be run in turn (PointRend)
        if self.distill is not None:  # so do unknown distillation layers
            check_segmentor(model, self.distill)
            points = point_heads(model)
            if points and self.distill.output is not None:
                raise ValueError(
                    f"PruningHook distill: {points[0]} classifies points drawn at random in "
                    "training (train_cfg), not the teacher's test-time points, so its logits "
                    "cannot be compared with the teacher's; distil features only: "
                    "distill=dict(output=None, layers=[...]) with layers of the backbone or "
                    "neck")

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = (checkpoint.get("meta") or {}).get(META_KEY)
        if state is None:
            return
        plan = validate_plan(state["plan"])
        model = self._model(runner)
        if self.distill is not None and getattr(runner, "_resume", False):
            self._resume_teacher(runner, model, state, plan)  # before the plan is replayed
        if self.target_latency_ratio is not None and not get_plan(model)["history"]:
            self._dense = _cpu_copy(model)  # the freshly built, unpruned architecture
        if sync_structure(model, plan, self._example(runner)):
            runner.logger.info(f"kcp_plugin: replayed a pruning plan of "
                               f"{len(plan['history'])} steps from the checkpoint")
            self._after_change(runner)
        self._loaded = dict(state, resumed=bool(getattr(runner, "_resume", False)))

    def before_train(self, runner) -> None:
        model = self._model(runner)
        inputs = self._example(runner)
        loaded = self._loaded or {}
        if self.latency_backend is not None:  # the model can run where it is timed
            if self.target_latency_ratio is not None:  # and the runtime is there (a MACs
                self._check_latency(imports=True)  # target only warns)
            _check_device(model, self.latency_backend)
        if self.pruning_ratio is None:
            kwargs = dict(self.prune_kwargs)
            kwargs["ignored_layers"] = self._protected(model)
            feed = self._feed(runner)
            loss_fn = feed.pop("loss_fn", None)
            kwargs.update(feed)
            if self.target_latency_ratio is not None and self._dense is None \
                    and get_plan(model)["history"]:
                raise ValueError(
                    "PruningHook target_latency_ratio is a fraction of the dense network's "
                    "latency, and this model was pruned before the hook saw it unpruned (the "
                    "config builds a pruned model?); build the dense segmentor and load_from "
                    "the pruned checkpoint, or use target_macs_ratio")
            teacher = self._start_teacher(model)
            s = self.schedule
            self.scheduler = PruningScheduler(
                model, inputs, self.importance, target_macs_ratio=self.target_macs_ratio,
                num_prunes=s["num_prunes"], start=s["start"], every=s["every"], ramp=s["ramp"],
                mode=s["mode"], decay=s["decay"], decay_rate=s["decay_rate"],
                forward_fn=trace_forward, importance_kwargs=self.importance_kwargs or None,
                loss_fn=loss_fn, prune_kwargs=kwargs,
                target_latency_ratio=self.target_latency_ratio,
                latency_backend=self.latency_backend,
                latency_allocation=self.latency_allocation, dense_model=self._dense,
                distill=self.distill, teacher=teacher,
            )
            self._dense = None  # the scheduler holds it now
            if loaded.get("resumed") and loaded.get("scheduler"):
                self.scheduler.load_state_dict(loaded["scheduler"])
                if self.scheduler.latency is None and loaded.get("latency"):
                    self.scheduler.latency = loaded["latency"]  # saved beside it before
        else:
            self.calls = int(loaded.get("calls", 0)) if loaded.get("resumed") else 0
            if self.distill is not None:
                teacher = self._start_teacher(model)
                self._distiller = Distiller(
                    teacher if teacher is not None else copy.deepcopy(model), model,
                    self.distill, inputs, trace_forward)
                state = (loaded.get("distill") or {}).get("state")
                if loaded.get("resumed") and state:
                    self._distiller.load_state_dict(state)
        self._teacher = None  # the distiller holds it now
        if self.distiller is not None:  # after every copy of the model is taken
            self._distill_loss = SegmentorDistillLoss(model, self.distiller)
            self._distill_loss.install()
            runner.logger.info(f"kcp_plugin: distilling from the model as training starts "
                               f"({_describe_distill(self.distill)})")
        # One definition of "MACs of the model" in the logs: the deployed forward (tensor mode,
        # no auxiliary heads). The scheduler's targets count what it traces (with auxiliary
        # heads) and keep their own dense figure.
        self.macs_dense = self._macs(model)[0]
        if loaded.get("macs_dense"):
            # MACs of the original network: targets stay relative to it after load_from too
            if self.scheduler is not None:
                self.scheduler.macs_dense = int(loaded["macs_dense"])
            self.macs_dense = int(loaded.get("macs_dense_tensor") or loaded["macs_dense"])
        self._log_macs(runner, "before training")

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        by_epoch = self.schedule["by_epoch"]
        if self.info.requires_data and data_batch is not None:
            self._recent.add(data_batch)  # every batch: an epoch's point sees the last ones
        if not by_epoch or batch_idx == 0:
            self._batch = data_batch
            try:
                self._step(runner, runner.epoch if by_epoch else runner.iter)
            finally:
                self._batch = None
        if self._distill_loss is not None:  # the training step's loss distils; a pruning
            self._distill_loss.active = True  # point's criterion losses (above) did not

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if self._distill_loss is not None:
            self._distill_loss.active = False

    def after_train(self, runner) -> None:
        """Give the segmentor its own ``loss`` back and drop the distiller's feature hooks
        (the distiller and its teacher stay readable on the hook)."""
        if self._distill_loss is not None:
            self._distill_loss.remove()
            self._distill_loss = None
        if self.distiller is not None:
            self.distiller.remove()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = self._model(runner)
        checkpoint.setdefault("meta", {})[META_KEY] = {
            "plan": get_plan(model),
            "macs_dense": self.scheduler.macs_dense if self.scheduler is not None else None,
            "macs_dense_tensor": self.macs_dense,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "calls": self.calls,
            "importance": self.importance,
            "latency": self.latency,
            "distill": self._distill_meta(runner),
        }

    # ------------------------------------------------------------------ pruning
    def _point_at(self, call: int) -> bool:
        if self.scheduler is not None:
            return self.scheduler.point_at(call) is not None
        return call == self.schedule["start"] and self.calls <= call

    def _prune_here(self, runner, call: int) -> None:
        """This rank's part of a pruning point (all of it outside distributed training)."""
        model = self._model(runner)
        if self.scheduler is not None:
            self.scheduler.calls = call
            self.scheduler.step()
            latency = self.scheduler.latency
            if latency is not None and latency["call"] == call:  # the latency point
                unit = "epoch" if self.schedule["by_epoch"] else "iter"
                runner.message_hub.update_info("kcp_plugin/latency_ratio", latency["ratio"])
                runner.logger.info(f"kcp_plugin: {self.scheduler.describe_latency(unit)}")
        else:
            prune(model, self._example(runner), self.importance,
                  pruning_ratio=self.pruning_ratio, ignored_layers=self._protected(model),
                  forward_fn=trace_forward, importance_kwargs=self.importance_kwargs or None,
                  progress=False, latency_backend=self.latency_backend,
                  **self._feed(runner), **self.prune_kwargs)
            self.calls = call + 1

    def _step(self, runner, call: int) -> None:
        if self.scheduler is None and self.pruning_ratio is None:
            return  # before_train has not run (e.g. a validation-only runner)
        if not self._point_at(call):
            if self.scheduler is not None:  # keep its counter in step (saved in checkpoints)
                self.scheduler.calls = call + 1
            return
        model = self._model(runner)
        before = len(get_plan(model)["history"])
        # every rank prunes on statistics all-reduced over the ranks; rank 0's plan is then
        # made every rank's (kcp_plugin.distributed, as timm's schedule does)
        prune_on_every_rank(model, lambda: self._prune_here(runner, call),
                            self._example(runner), trace_forward,
                            what=f"pruning point at call {call}")
        self._after_change(runner, changed=len(get_plan(model)["history"]) != before)
        unit = "epoch" if self.schedule["by_epoch"] else "iter"
        self._log_macs(runner, f"after pruning at {unit} {call}")

    def _after_change(self, runner, changed: bool = True) -> None:
        """Re-point everything that held the model's old parameters.

        ``changed=False`` (a soft pruning point: weights scaled, structure kept) only re-makes
        the DDP wrapper, to give every rank rank 0's weights.
        """
        model = self._model(runner)
        plan = get_plan(model)
        wrapper = runner.optim_wrapper
        if isinstance(wrapper, OptimWrapperDict):
            raise NotImplementedError("PruningHook supports a single optimizer wrapper, not "
                                      "OptimWrapperDict")
        if changed and isinstance(wrapper, OptimWrapper):  # (a config dict in test runs)
            rebuild_optimizer(wrapper.optimizer, model)
        if isinstance(wrapper, RegularizerMixin):
            finished = self.scheduler.finished if self.scheduler is not None else \
                self.calls > self.schedule["start"]
            if changed or finished:
                wrapper.reset_regularizer(active=not finished)
        if is_model_wrapper(runner.model) and (changed or get_dist_info()[1] > 1):
            if not isinstance(runner.model, DistributedDataParallel):
                raise NotImplementedError(
                    f"PruningHook re-wraps DistributedDataParallel models after pruning; "
                    f"{type(runner.model).__name__} is not supported")
            # DDP's reducer holds the old parameters; a new wrapper also broadcasts rank 0's
            # weights, which keeps soft-pruned weights identical on every rank.
            runner.model = runner.wrap_model(runner.cfg.get("model_wrapper_cfg"), model)
        if not changed:
            return
        for hook in runner.hooks:
            ema = getattr(hook, "ema_model", None) if isinstance(hook, EMAHook) else None
            if ema is not None and sync_structure(ema.module, plan, self._example(runner)):
                ema.avg_parameters = (ema.module.state_dict() if ema.update_buffers
                                      else dict(ema.module.named_parameters()))
        if runner.rank == 0 and plan["history"]:
            with open(osp.join(runner.work_dir, "kcp_pruning_plan.json"), "w") as f:
                json.dump(plan, f)

    # ------------------------------------------------------------------ distillation
    def _start_teacher(self, model: nn.Module) -> nn.Module | None:
        """The teacher for the distiller (None: the scheduler copies the model itself): a
        resumed run's teacher, or a copy of a model that is pruned already (``load_from`` a
        pruned checkpoint: the model as training starts)."""
        if self.distill is None:
            return None
        if self._run_id is None:
            self._run_id = uuid.uuid4().hex  # ties the teacher file to this run's checkpoints
        if self._teacher is not None:
            return self._teacher
        return copy.deepcopy(model) if get_plan(model)["history"] else None

    def _resume_teacher(self, runner, model: nn.Module, state: dict[str, Any],
                        plan: dict[str, Any]) -> None:
        """Rebuild the teacher of the run being resumed, on a copy of the freshly built model
        (called before the checkpoint's plan is replayed on it)."""
        record = state.get("distill")
        if not record:
            if plan["history"]:
                raise ValueError(
                    "PruningHook distill: the checkpoint was saved without distillation and "
                    "its model is pruned, so its dense teacher is unknown; resume without "
                    "distill, or start a distilled run from a dense checkpoint (load_from)")
            return  # not pruned yet: the model as training starts is the teacher
        load_from = getattr(runner, "_load_from", None)
        beside = osp.dirname(load_from) if load_from else runner.work_dir
        candidates = [osp.join(beside, TEACHER_FILE), record["teacher"],
                      osp.join(runner.work_dir, TEACHER_FILE)]
        teacher, path = load_teacher(model, candidates, record["run_id"],
                                     self._example_for(model))
        self._teacher = teacher.to(_device(model))
        self._teacher_path, self._run_id = path, record["run_id"]
        runner.logger.info(f"kcp_plugin: distillation teacher rebuilt from {path}")

    def _distill_meta(self, runner) -> dict[str, Any] | None:
        """The checkpoint's distillation record; writes the teacher file at the run's first
        checkpoint (the checkpoints themselves never hold the teacher)."""
        distiller = self.distiller
        if distiller is None or self.distill is None:
            return None
        path = osp.abspath(osp.join(runner.work_dir, TEACHER_FILE))
        if self._teacher_path != path:
            if runner.rank == 0:
                save_teacher(distiller.teacher, path, str(self._run_id))
            self._teacher_path = path
        meta: dict[str, Any] = {"teacher": path, "run_id": self._run_id,
                                "config": self.distill.to_dict()}
        if self.scheduler is None:  # a schedule's distiller state is in the scheduler's
            meta["state"] = distiller.state_dict()
        return meta

    def _check_latency(self, imports: bool = False) -> Backend | None:
        """The latency arguments, checked by the core (``imports``: the runtime too)."""
        return check_latency_arguments(
            self.target_latency_ratio, self.latency_backend, self.latency_allocation,
            target_macs_ratio=self.target_macs_ratio, prune_kwargs=self.prune_kwargs,
            owner="PruningHook", imports=imports)

    def _macs(self, model: nn.Module) -> tuple[int, int]:
        """MACs and parameters of the deployed forward (tensor mode, no auxiliary heads; a
        point head refining at its test-time points: :func:`.structure.tensor_forward`)."""
        return count_macs_params(model, self._example_for(model), tensor_forward)

    def _log_macs(self, runner, when: str) -> None:
        macs, params = self._macs(self._model(runner))
        dense = self.macs_dense or macs
        runner.message_hub.update_info("kcp_plugin/macs", macs)
        runner.message_hub.update_info("kcp_plugin/params", params)
        runner.logger.info(f"kcp_plugin: {when}: {macs / 1e9:.4g} GMACs "
                           f"({macs / dense:.3f} of dense), {params / 1e6:.4g} M params")


def _check_device(model: nn.Module, backend: Backend) -> None:
    """The CPU runtimes time the model where it is: refuse a model on a GPU."""
    device = _device(model)
    if backend.is_cuda or backend.timer is not None or device.type == "cpu":
        return
    raise ValueError(
        f"PruningHook latency_backend {backend.name!r} times the model on the CPU, but it is "
        f"on {device}: measure on this GPU with latency_backend=dict(name='cuda', dtype=..., "
        "batch=...), or prune on a CPU machine (kcp-prune / kcp_plugin.prune with "
        f"latency_backend={backend.name!r}) and fine-tune the pruned model with load_from (for "
        f"the channel multiple alone: prune_kwargs=dict(round_to="
        f"{backend.channel_multiple()}) and no latency_backend)")


def _describe_distill(config: DistillConfig) -> str:
    parts = []
    if config.output is not None:
        parts.append(f"output {config.output} x {config.weight} at T={config.temperature}")
    if config.layers:
        parts.append(f"features of {', '.join(config.layers)} x {config.layer_weight}")
    if config.dca_layers:
        parts.append(f"DCA of {', '.join(config.dca_layers)} x {config.dca_weight}")
    return "; ".join(parts)


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of the model on the CPU, in eval mode (a latency reference: weights unused)."""
    return copy.deepcopy(model).cpu().eval()


def _preprocess(model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor, Any]:
    """A raw training batch as ``(inputs, per-pixel labels, data_samples)``, preprocessed by the
    model's data preprocessor when a pruning point collects on it."""
    with torch.no_grad():
        data = model.data_preprocessor(batch, True)
    samples = data["data_samples"]
    labels = torch.stack([s.gt_sem_seg.data.squeeze(0) for s in samples]).long()
    return data["inputs"], labels, samples


def _loss_step(model: nn.Module, batch: tuple) -> torch.Tensor:
    """mmseg's own training loss of a preprocessed batch (decode + auxiliary heads)."""
    inputs, _, samples = batch
    # through forward(), as mmengine's train_step does (model.loss would do as well: collect()
    # marks the batches itself)
    loss, _ = model.parse_losses(model(inputs, samples, mode="loss"))
    return loss


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
