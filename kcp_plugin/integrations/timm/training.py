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

Not supported: distributed data parallel (the wrapped model's buckets would go stale) and
``torch.compile`` (compiled graphs specialise on the old shapes); the schedule refuses to start
under a multi-process group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ...graph import count_macs_params
from ...schedule import PruningScheduler
from .pruning import default_inputs, head_map, replay_new_entries
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
        model: The timm model being trained (not a DDP / compiled wrapper).
        optimizer: Its optimizer; re-pointed (state carried) after every hard prune.
        importance: Registered criterion name or ``Importance``.
        example_inputs: Tracing inputs; default: :func:`default_inputs` (``input_size``).
        input_size: Size of the default example inputs.
        emas: EMA copies to keep in step (timm ``ModelEmaV3`` objects or modules).
        on_prune: ``on_prune(schedule)`` after every pruning point.
        **scheduler_kwargs: :class:`kcp_plugin.schedule.PruningScheduler`'s arguments
            (``target_macs_ratio``, ``num_prunes``, ``start`` / ``every`` counted in optimizer
            steps, ``ramp``, ``mode``, ``loss_fn``, ``prune_kwargs``...), except ``optimizer``,
            ``forward_fn`` and ``on_prune``, which this class sets.

    Raises:
        UnsupportedModelError: the architecture cannot be pruned (nothing changed).
        ValueError / TypeError: invalid schedule arguments.
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
        **scheduler_kwargs: Any,
    ):
        taken = sorted({"optimizer", "forward_fn", "on_prune"} & set(scheduler_kwargs))
        if taken:
            raise TypeError(f"TimmPruningSchedule sets {', '.join(taken)} itself")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
            raise ValueError("pass the bare timm model: pruning a DDP-wrapped or compiled model "
                             "in place leaves the wrapper stale")
        check_supported(model)
        self.model = model
        self.optimizer = optimizer
        self.example_inputs = (example_inputs if example_inputs is not None
                               else default_inputs(model, input_size))
        self.emas = [_ema_module(e) for e in emas]
        self.user_on_prune = on_prune
        head_map(model, self.example_inputs)
        # kcp_plugin.prune applies the timm adapter (pruners, protections, heads) itself
        self.scheduler = PruningScheduler(model, self.example_inputs, importance,
                                          optimizer=optimizer, on_prune=self._after_prune,
                                          **scheduler_kwargs)
        self._handle: Any = None
        self.pruned_at: list[int] = []

    # ------------------------------------------------------------------ driving
    def attach(self) -> TimmPruningSchedule:
        """Advance the schedule after every ``optimizer.step()`` from now on."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError("training-time pruning is not supported with distributed "
                               "data parallel; train on one process, or prune one-shot with "
                               "the kcp_pruned entrypoint and fine-tune distributed")
        if self._handle is None:
            self._handle = self.optimizer.register_step_post_hook(self._on_step)
        return self

    def detach(self) -> None:
        """Stop following the optimizer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def step(self) -> bool:
        """Advance one optimizer step by hand (when not attached); returns whether it pruned."""
        return self.scheduler.step()

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.scheduler.step():
            self.pruned_at.append(self.scheduler.calls - 1)

    def _after_prune(self, scheduler: PruningScheduler) -> None:
        # caches and head attributes were handled by kcp_plugin.prune's timm adapter
        for module in self.emas:
            replay_new_entries(module, self.model, self.example_inputs)
        macs, params = count_macs_params(self.model, self.example_inputs)
        _logger.info(
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The schedule's plain-data state (the model's structure is in its plan)."""
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter, after the model was rebuilt with its saved plan."""
        self.scheduler.load_state_dict(state)
