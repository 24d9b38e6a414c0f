"""Parameter lineage: which kept indices of which old parameter each pruned parameter holds.

torch-pruning replaces every pruned ``nn.Parameter`` with a new one built from the kept indices.
Anything that holds the old objects (an optimizer, an EMA copy) needs to know, for each new
parameter, its ancestor and the indices kept along each dimension. :func:`track_pruning` records
exactly that while it is active; :func:`kcp_plugin.prune` always runs under it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
from torch_pruning.pruner.function import BasePruningFunc

__all__ = ["track_pruning", "lineage"]

# id(new parameter) -> (weakref to it, hops [(weakref to the parameter before the hop, dim, kept
# indices), ...]). Keyed by id: tensors compare element-wise, so they cannot be weak dict keys.
_LINEAGE: dict[int, tuple[weakref.ref, list]] = {}
_lock = threading.RLock()
_depth = 0
_original = BasePruningFunc._prune_parameter_and_grad
_outside = _original  # what track_pruning found in place, put back when the last one exits


def _tracked(self, weight, keep_idxs, pruning_dim):
    new = _original(self, weight, keep_idxs, pruning_dim)
    keep = torch.as_tensor(list(keep_idxs), dtype=torch.long)
    hops = list(_hops(weight))
    hops.append((weakref.ref(weight), int(pruning_dim), keep))
    key = id(new)
    _LINEAGE[key] = (weakref.ref(new, lambda _, k=key: _LINEAGE.pop(k, None)), hops)
    # Upstream (torch-pruning 1.6.1) builds a fresh Parameter, which silently unfreezes a
    # frozen one; keep the user's requires_grad.
    new.requires_grad_(weight.requires_grad)
    return new


@contextlib.contextmanager
def track_pruning() -> Iterator[None]:
    """Record the lineage of every parameter torch-pruning replaces inside the block.

    Use it around pruning done with torch-pruning's own pruners if you want
    :func:`kcp_plugin.rebuild_optimizer` to carry optimizer state afterwards. Re-entrant.
    """
    global _depth, _outside
    with _lock:
        if _depth == 0:
            # restored on exit as found, not as ``_original`` (what _tracked calls), which a
            # test or another library may have replaced meanwhile: restoring that leaked it
            _outside = BasePruningFunc._prune_parameter_and_grad
            BasePruningFunc._prune_parameter_and_grad = _tracked
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                BasePruningFunc._prune_parameter_and_grad = _outside


def _hops(param: torch.Tensor) -> list:
    entry = _LINEAGE.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else []


def lineage(param: torch.Tensor) -> list[tuple[torch.Tensor | None, int, torch.Tensor]]:
    """Hops that produced ``param``: ``(ancestor or None if freed, dim, kept indices)``, oldest
    first. Empty for a parameter that was never pruned under :func:`track_pruning`."""
    return [(ref(), dim, keep) for ref, dim, keep in _hops(param)]
