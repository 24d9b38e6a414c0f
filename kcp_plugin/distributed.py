"""Pruning under ``torch.distributed``: every rank reaches the same structure at the same step.

Data-parallel training runs one model copy per process. A pruning point must leave every copy
with the same channels, and the ``DistributedDataParallel`` wrapper, whose reducer holds the old
parameter objects in its buckets, must be re-made around the pruned module. The pieces here are
used by the training integrations (timm's :class:`~kcp_plugin.integrations.timm.
TimmPruningSchedule`; the mmseg hook has mmengine's own wrapper and broadcast helpers):

* every rank scores on statistics all-reduced over all ranks (:func:`all_reduce_gradients`
  here, :func:`kcp_plugin.collecting` for activation statistics), so ranks normally decide
  alike; :func:`agree_on_plan` then makes rank 0's plan the one every rank ends with (a rank
  that decided otherwise is put back and replays rank 0's plan), and
  :func:`all_ranks_succeeded` turns a failure on one rank into an error on all of them instead
  of a hang at the next collective;
* :func:`rebuild_ddp` re-initialises a DDP wrapper *in place* around its pruned module, since
  training scripts such as timm's ``train.py`` hold the wrapper in local variables the plugin
  cannot replace. Re-initialising also broadcasts rank 0's weights and buffers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .graph import ForwardFn
from .plan import get_plan, sync_plan
from .snapshot import ModuleSnapshot

__all__ = [
    "DDP_KWARGS_ATTR",
    "agree_on_plan",
    "prune_on_every_rank",
    "all_ranks_succeeded",
    "all_reduce_gradients",
    "rank",
    "rebuild_ddp",
    "world_size",
]

_logger = logging.getLogger(__name__)

# Where a DDP wrapper built by the plugin's launch helpers records its constructor arguments,
# so that :func:`rebuild_ddp` re-makes it exactly (otherwise they are read back from attributes).
DDP_KWARGS_ATTR = "_kcp_ddp_kwargs"


def world_size() -> int:
    """Processes in the default group (1 outside ``torch.distributed``)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group (0 outside ``torch.distributed``)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_gradients(model: nn.Module) -> None:
    """Average every parameter's ``.grad`` over the ranks (no-op on one process).

    A gradient criterion (Taylor) scores from gradients back-propagated on this rank's batch;
    averaged, they are the gradients of the global batch, as DDP's own reducer would give.
    Parameters without a gradient on this rank contribute zeros.
    """
    world = world_size()
    if world == 1:
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.distributed.all_reduce(grad)
        grad.div_(world)
        p.grad = grad


def all_ranks_succeeded(error: BaseException | None, what: str = "pruning") -> None:
    """Raise on every rank if ``what`` failed on any rank (a collective: all ranks must call).

    Without this, a rank whose prune raised would leave the others blocked in their next
    collective. The original error is the ``__cause__`` on the rank where it happened.

    Raises:
        RuntimeError: naming the failing ranks and their errors.
    """
    world = world_size()
    message = None if error is None else f"{type(error).__name__}: {error}"
    if world == 1:
        if error is not None:
            raise error
        return
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, message)
    failed = [(r, m) for r, m in enumerate(gathered) if m is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise RuntimeError(f"{what} failed on {len(failed)} of {world} ranks ({detail}); every "
                           "rank stops here") from error


def _canonical(plan: dict[str, Any]) -> str:
    return json.dumps(plan, sort_keys=True)


def agree_on_plan(model: nn.Module, before: ModuleSnapshot, example_inputs: Any,
                  forward_fn: ForwardFn | None = None) -> bool:
    """Make rank 0's pruning plan every rank's, after every rank pruned (a collective).

    Every rank pruned on the same weights and all-reduced statistics, so plans normally match.
    Where one does not (a criterion fed rank-local data, non-deterministic kernels), that rank
    is put back to ``before`` and replays rank 0's plan, so the structures are identical
    whatever happened; optimizers must be rebuilt afterwards (:func:`kcp_plugin.
    rebuild_optimizer`), which the replay's tracking allows.

    Args:
        model: This rank's model (bare, not the DDP wrapper), already pruned.
        before: A snapshot of ``model`` taken just before the prune.
        example_inputs: Tracing inputs for the replay.
        forward_fn: How to call the model on them.

    Returns:
        Whether this rank had to replay rank 0's plan.
    """
    if world_size() == 1:
        return False
    mine = get_plan(model)
    box: list[Any] = [mine if rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    theirs = box[0]
    if _canonical(theirs) == _canonical(mine):
        return False
    _logger.warning("kcp_plugin: rank %d chose a different pruning plan than rank 0 (rank-local "
                    "statistics?); replaying rank 0's plan", rank())
    before.restore()
    sync_plan(model, theirs, example_inputs, forward_fn)
    return True


def prune_on_every_rank(model: nn.Module, prune_step: Callable[[], Any], example_inputs: Any,
                        forward_fn: ForwardFn | None = None, what: str = "pruning") -> None:
    """Run ``prune_step()`` on every rank, then make rank 0's plan every rank's (a collective).

    The one distributed pruning point of the training integrations (timm's schedule, the mmseg
    hook): a snapshot, the prune (statistics all-reduced inside it), every rank told of a
    failure anywhere (:func:`all_ranks_succeeded`), then :func:`agree_on_plan`. On one process
    it is just ``prune_step()``. Optimizers and DDP wrappers are re-pointed by the caller.

    Raises:
        RuntimeError: ``prune_step`` failed on some rank (on every rank).
    """
    if world_size() == 1:
        prune_step()
        return
    before = ModuleSnapshot(model)
    error = None
    try:
        prune_step()
    except Exception as exc:  # every rank must learn of it, or the others would hang
        error = exc
    all_ranks_succeeded(error, what)
    agree_on_plan(model, before, example_inputs, forward_fn)


def _ddp_kwargs(ddp: nn.parallel.DistributedDataParallel) -> dict[str, Any]:
    recorded = ddp.__dict__.get(DDP_KWARGS_ATTR)
    if recorded is not None:
        return dict(recorded)
    # read back from the wrapper (torch 2.x attribute names); communication hooks registered
    # with register_comm_hook are not carried over
    return {
        "device_ids": ddp.device_ids, "output_device": ddp.output_device, "dim": ddp.dim,
        "process_group": ddp.process_group,
        "bucket_cap_mb": ddp.bucket_bytes_cap / (1024 * 1024),
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": ddp.static_graph,
        **({"forward_sync_buffers": ddp.forward_sync_buffers}
           if hasattr(ddp, "forward_sync_buffers")
           else {"broadcast_buffers": ddp.broadcast_buffers}),
    }


def rebuild_ddp(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Re-make a DDP wrapper around its (pruned) module, in place (a collective).

    DDP's reducer holds the parameter objects it was built with; after a prune they are dead and
    the new ones would never be all-reduced. A new wrapper would fix that, but training scripts
    (timm's ``train.py``) keep the old one in local variables, so the same object is
    re-initialised with its own arguments: buckets built on the live parameters, rank 0's
    weights and buffers broadcast (which also makes SFP's soft-pruned weights identical on all
    ranks). Its train / eval flag is kept.

    Raises:
        TypeError: ``ddp`` is not a ``DistributedDataParallel``.
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(f"expected a DistributedDataParallel wrapper, got {type(ddp).__name__}")
    module, training = ddp.module, ddp.training
    kwargs = _ddp_kwargs(ddp)
    nn.parallel.DistributedDataParallel.__init__(ddp, module, **kwargs)
    ddp.__dict__[DDP_KWARGS_ATTR] = kwargs
    ddp.train(training)
