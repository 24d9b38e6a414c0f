"""Training-time (iterative) pruning inside timm's training loop, which has no callbacks.

:class:`TimmPruningSchedule` wraps :class:`kcp_plugin.schedule.PruningScheduler` with the timm
setup (custom pruners, head bookkeeping) and drives it from the optimizer itself: attached, it
registers an optimizer *step post-hook*, so every real optimizer step advances the schedule
(steps skipped by AMP's grad scaler do not count; with gradient accumulation, one count per
optimizer step). At each pruning point the model is pruned in place, the optimizer is re-pointed
at the new parameters with its state carried (:func:`kcp_plugin.rebuild_optimizer`), and EMA
copies (timm's ``ModelEmaV2/V3``, anything with a ``.module``) replay the same removal so their
averages are kept for the surviving channels. Any loop that calls ``optimizer.step()`` can use
it: timm's ``train.py`` (through ``tools/timm_train.py``), or a loop of one's own.

Distributed data parallel (``torchrun``): every rank runs the same schedule, so every rank
prunes at the same optimizer step; gradient statistics are averaged and activation statistics
all-reduced over the ranks, rank 0's plan is made every rank's (:func:`kcp_plugin.distributed.
agree_on_plan`), and the DDP wrappers given as ``ddp`` are re-made in place around the pruned
model (:func:`kcp_plugin.distributed.rebuild_ddp`), which also broadcasts rank 0's weights.
``torch.compile`` is not supported (compiled graphs specialise on the old shapes).

Distillation (``distill=``) from the dense model: the teacher is the model before the first
prune (a copy taken when the schedule is made, or ``teacher=``), frozen and kept outside
everything the training loop sees: it is no submodule of the model, the optimizer never holds its
parameters, EMA copies do not average it, checkpoints of the model do not contain it, and under
DDP it is never wrapped: every rank holds its own replica (rank 0's weights, broadcast when the
schedule is made) and distils its own batch. Add :meth:`TimmPruningSchedule.distill_loss` to the
task loss of every step; its kept channels follow every pruning point.

A latency target (``target_latency_ratio``) is reached at the schedule's last pruning point by
:class:`kcp_plugin.schedule.PruningScheduler` (the earlier points follow the MACs ramp; the last
one measures what they kept of the dense latency and prunes the rest of the way). "Dense" is
the unpruned architecture: a CPU copy of the model taken when the schedule is made, or, what
this module adds, a fresh build of its base for a model pruned already (resumed).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ...deploy.backends import Backend
from ...distill import DistillConfig, Distiller
from ...distributed import prune_on_every_rank, rank, rebuild_ddp, world_size
from ...graph import count_macs_params
from ...optim import rebuild_optimizer
from ...plan import get_plan
from ...pruning import check_latency_arguments
from ...schedule import PruningScheduler
from .entrypoints import check_rebuildable, dense_copy
from .pruning import check_latency_device, default_inputs, head_map, replay_new_entries
from .support import check_supported

__all__ = ["TimmPruningSchedule"]

# timm's train.py logs through logging.getLogger("train"): pruning points appear in its log
_logger = logging.getLogger("train")


def _ema_module(ema: Any) -> nn.Module:
    module = getattr(ema, "module", ema)
    if not isinstance(module, nn.Module):
        raise TypeError(f"EMA copies must be modules or have a .module, got {type(ema).__name__}")
    return module


class TimmPruningSchedule:
    """Iterative pruning of a timm model, advanced by its optimizer's steps.

    Args:
        model: The timm model being trained (the bare module, not a DDP / compiled wrapper).
        optimizer: Its optimizer; re-pointed (state carried) after every hard prune.
        importance: Registered criterion name or ``Importance``.
        example_inputs: Tracing inputs; default: :func:`default_inputs` (``input_size``).
        input_size: Size of the default example inputs.
        emas: EMA copies to keep in step (timm ``ModelEmaV3`` objects or modules).
        on_prune: ``on_prune(schedule)`` after every pruning point.
        ddp: Under ``torch.distributed``: the ``DistributedDataParallel`` wrapper(s) around
            ``model``, re-made in place after each pruning point (required with more than one
            process; may also be set later, before the first pruning point, as ``.ddp``).
        target_latency_ratio: Fraction of the dense latency kept at the end, in (0, 1],
            measured on ``latency_backend`` with ``example_inputs`` (at the backend's batch);
            reached at the last pruning point (module docstring). ``target_macs_ratio`` is
            then optional: the ramp of the earlier points and a MACs cap on the last one.
        latency_backend: Where latency is measured: a name (``"torch"``, ``"onnxruntime"``,
            ``"cuda"``), a dict of :class:`kcp_plugin.Backend` fields or a record. With a MACs
            target alone every point rounds widths to its channel multiple and measures the
            pruned model against the one before it. The CPU runtimes need the model on the
            CPU (checked here); with a latency target ``"cuda"`` needs a GPU (checked here;
            a MACs target only skips the timing, with a warning).
        latency_allocation: ``"table"`` or ``"uniform"`` (see :func:`kcp_plugin.prune`).
        distill: Distillation from the dense model (:class:`kcp_plugin.distill.DistillConfig`,
            a dict of its fields or an output loss name: ``"kl"``, ``"cwd"``, ``"l1"``,
            ``"mse"``); add :meth:`distill_loss` to the task loss of every step.
        teacher: The teacher of ``distill``: the bare dense model (not a DDP wrapper, no EMA
            copy, sharing no parameter with ``model``), on ``model``'s device. Default: a copy
            of ``model`` taken now; a model pruned already needs it.
        output_fn: Which tensor of the model's output is distilled (default: the tensor, or
            the first of a tuple).
        **scheduler_kwargs: :class:`kcp_plugin.schedule.PruningScheduler`'s arguments
            (``target_macs_ratio``, ``num_prunes``, ``start`` / ``every`` counted in optimizer
            steps, ``ramp``, ``mode``, ``loss_fn``, ``prune_kwargs``...), except ``optimizer``,
            ``forward_fn``, ``on_prune`` and ``dense_model``, which this class sets.

    Attributes:
        latency: After the latency target's point: ``target``, ``ratio`` (latency kept of the
            dense model's), ``ms``, ``dense_ms``, ``setting`` (the backend), ``call`` (the
            optimizer step), ``earlier`` (what the earlier points kept); see
            :attr:`kcp_plugin.schedule.PruningScheduler.latency`.
        distiller: The :class:`kcp_plugin.distill.Distiller` of ``distill`` (None without);
            ``distiller.teacher`` is the teacher.

    Raises:
        UnsupportedModelError: the architecture cannot be pruned (nothing changed).
        ValueError / TypeError: invalid schedule or latency arguments.
        RuntimeError: at a pruning point, when pruning failed on any rank (on every rank).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        importance: Any = "kcp",
        *,
        example_inputs: torch.Tensor | None = None,
        input_size: int | Sequence[int] | None = None,
        emas: Sequence[Any] = (),
        on_prune: Callable[[TimmPruningSchedule], None] | None = None,
        ddp: nn.parallel.DistributedDataParallel
        | Sequence[nn.parallel.DistributedDataParallel] = (),
        target_latency_ratio: float | None = None,
        latency_backend: str | dict[str, Any] | Backend | None = None,
        latency_allocation: str = "table",
        distill: DistillConfig | dict[str, Any] | str | None = None,
        teacher: nn.Module | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        **scheduler_kwargs: Any,
    ):
        taken = sorted({"optimizer", "forward_fn", "on_prune", "dense_model"}
                       & set(scheduler_kwargs))
        if taken:
            raise TypeError(f"TimmPruningSchedule sets {', '.join(taken)} itself")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
            raise ValueError("pass the bare timm model: pruning a DDP-wrapped or compiled model "
                             "in place leaves the wrapper stale")
        owner = "TimmPruningSchedule"
        backend = check_latency_arguments(
            target_latency_ratio, latency_backend, latency_allocation,
            target_macs_ratio=scheduler_kwargs.get("target_macs_ratio"),
            prune_kwargs=scheduler_kwargs.get("prune_kwargs"), owner=owner, imports=True)
        distill = DistillConfig.from_value(distill)
        _check_teacher(model, distill, teacher, emas)
        check_supported(model)
        check_latency_device(owner, model, backend)
        dense = None  # the latency target's reference: the scheduler copies an unpruned model
        if target_latency_ratio is not None and get_plan(model)["history"]:
            check_rebuildable(model)  # a pruned one is rebuilt from its base, when needed
            dense = functools.partial(dense_copy, model)
        self.model = model
        self.optimizer = optimizer
        self.example_inputs = (example_inputs if example_inputs is not None
                               else default_inputs(model, input_size))
        self.emas = [_ema_module(e) for e in emas]
        self.user_on_prune = on_prune
        self.ddp = [ddp] if isinstance(ddp, nn.parallel.DistributedDataParallel) else list(ddp)
        head_map(model, self.example_inputs)
        # kcp_plugin.prune applies the timm adapter (pruners, protections, heads) itself; the
        # optimizer is rebuilt here, once every rank has the same structure
        self.scheduler = PruningScheduler(
            model, self.example_inputs, importance, target_latency_ratio=target_latency_ratio,
            latency_backend=backend, latency_allocation=latency_allocation, dense_model=dense,
            distill=distill, teacher=teacher, output_fn=output_fn, **scheduler_kwargs)
        if self.scheduler.distiller is not None and world_size() > 1:
            _broadcast_teacher(self.scheduler.distiller.teacher)
        self._handle: Any = None
        self.pruned_at: list[int] = []

    # ------------------------------------------------------------------ distillation
    @property
    def distiller(self) -> Distiller | None:
        """The distiller of ``distill`` (None without); ``distiller.teacher`` is the teacher."""
        return self.scheduler.distiller

    def distill_loss(self, inputs: Any, output: Any, labels: Any = None
                     ) -> dict[str, torch.Tensor]:
        """The weighted distillation terms of one training step (empty without ``distill``).

        Call it after the model's forward (the DDP wrapper's, under DDP) on ``inputs`` gave
        ``output``, in training mode; ``labels`` (class indices) feed ``dca_layers``. Add
        ``sum(terms.values())`` to the task loss.
        """
        return self.scheduler.distill_loss(inputs, output, labels)

    # ------------------------------------------------------------------ driving
    def attach(self) -> TimmPruningSchedule:
        """Advance the schedule after every ``optimizer.step()`` from now on.

        Raises:
            ValueError: more than one process and no DDP wrapper given (it would go stale).
        """
        self._check_ddp()
        if self._handle is None:
            self._handle = self.optimizer.register_step_post_hook(self._on_step)
        return self

    def _check_ddp(self) -> None:
        if world_size() > 1 and not self.ddp:
            raise ValueError("training under torch.distributed: pass the DistributedDataParallel "
                             "wrapper (TimmPruningSchedule(..., ddp=wrapper) or schedule.ddp = "
                             "[wrapper]) so it is re-made around the pruned model")
        for wrapper in self.ddp:
            if not isinstance(wrapper, nn.parallel.DistributedDataParallel):
                raise TypeError(f"ddp must be DistributedDataParallel wrappers, got "
                                f"{type(wrapper).__name__}")

    def detach(self) -> None:
        """Stop following the optimizer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def step(self) -> bool:
        """Advance one optimizer step by hand (when not attached); returns whether it pruned.

        Under ``torch.distributed`` every rank must call it (it is a collective at pruning
        points).
        """
        scheduler = self.scheduler
        call = scheduler.calls
        if scheduler.point_at(call) is None:
            return scheduler.step()
        self._check_ddp()
        prune_on_every_rank(self.model, scheduler.step, self.example_inputs,
                            what=f"pruning point at optimizer step {call}")
        rebuild_optimizer(self.optimizer, self.model)
        for wrapper in self.ddp:
            rebuild_ddp(wrapper)
        self.pruned_at.append(call)
        self._after_prune(scheduler)
        return True

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step()

    def _after_prune(self, scheduler: PruningScheduler) -> None:
        # caches and head attributes were handled by kcp_plugin.prune's timm adapter
        for module in self.emas:
            replay_new_entries(module, self.model, self.example_inputs)
        macs, params = count_macs_params(self.model, self.example_inputs)
        log = _logger.info if rank() == 0 else _logger.debug  # one line per run, as train.py
        latency = scheduler.latency
        if latency is not None and latency["call"] == scheduler.calls - 1:  # the latency point
            log("kcp_plugin: %s", scheduler.describe_latency("optimizer step"))
        log(
            "kcp_plugin: pruning point %d/%d at optimizer step %d (%s): %.4g GMACs (%.1f%% of "
            "dense), %.4g M params", scheduler.point_at(scheduler.calls - 1) + 1,
            scheduler.num_prunes, scheduler.calls - 1, scheduler.mode, macs / 1e9,
            100.0 * macs / max(scheduler.macs_dense, 1), params / 1e6)
        if self.user_on_prune is not None:
            self.user_on_prune(self)

    @property
    def finished(self) -> bool:
        """Whether every pruning point has been applied."""
        return self.scheduler.finished

    @property
    def latency(self) -> dict[str, Any] | None:
        """The latency target's outcome (class docstring), None before its point."""
        return self.scheduler.latency

    @property
    def latency_backend(self) -> Backend | None:
        """Where latency is measured (None: nothing is)."""
        return self.scheduler.latency_backend

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The schedule's plain-data state (the model's structure is in its plan), with the
        latency target's outcome."""
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter, after the model was rebuilt with its saved plan."""
        self.scheduler.load_state_dict(state)


def _check_teacher(model: nn.Module, distill: DistillConfig | None, teacher: nn.Module | None,
                   emas: Sequence[Any]) -> None:
    """Refuse a teacher the training loop would see (before anything is changed)."""
    if teacher is None:
        if distill is not None and get_plan(model)["history"]:
            raise ValueError("TimmPruningSchedule: distill needs the dense teacher, and this "
                             "model is pruned already: pass teacher= (the unpruned model with "
                             "the dense weights)")
        return
    if distill is None:
        raise ValueError("TimmPruningSchedule: teacher= is given without distill= (what to "
                         "distil: one of kl, cwd, l1, mse, or a DistillConfig)")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a module, got {type(teacher).__name__}")
    if isinstance(teacher, nn.parallel.DistributedDataParallel) or hasattr(teacher, "_orig_mod"):
        raise ValueError("pass the bare teacher, not a DDP-wrapped or compiled one: it is frozen "
                         "and replicated on every rank, never wrapped")
    params = {id(p) for p in model.parameters()}
    if any(id(p) in params for p in teacher.parameters()):
        raise ValueError("the teacher shares parameters with the model being trained: pass a "
                         "copy of the dense model (copy.deepcopy(model) before pruning)")
    if any(_ema_module(e) is teacher for e in emas):
        raise ValueError("the teacher is one of the EMA copies: EMA copies follow the student, "
                         "the teacher stays the dense model")


def _broadcast_teacher(teacher: nn.Module) -> None:
    """Rank 0's teacher weights on every rank (a copy made before DDP's broadcast may differ:
    timm seeds each rank differently)."""
    with torch.no_grad():
        for value in (*teacher.parameters(), *teacher.buffers()):
            torch.distributed.broadcast(value.data, src=0)
