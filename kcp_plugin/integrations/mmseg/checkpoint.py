"""Safe checkpoint loading for mmengine on torch >= 2.6, and size checks that raise.

Upstream defect (mmengine 0.10.7, the last release): ``mmengine.runner.checkpoint`` calls
``torch.load`` without ``weights_only``. Since torch 2.6 that means ``weights_only=True``, which
refuses mmengine's own checkpoints (the message hub pickles ``HistoryBuffer`` objects and numpy
arrays), so ``resume`` and ``load_from`` fail with ``UnpicklingError ... HistoryBuffer``. Turning
``weights_only`` off would let a checkpoint run arbitrary code. Instead, :func:`install` wraps
mmengine's checkpoint loader so that every load runs with ``weights_only=True`` plus a small
allow-list: ``HistoryBuffer``, numpy arrays / dtypes / scalars, and a restricted stand-in for
``builtins.getattr`` that only returns HistoryBuffer's statistics methods (that is how
``HistoryBuffer._statistics_methods`` pickles). Any other global in a checkpoint is refused.

Second defect: mmengine's non-strict ``load_state_dict`` only logs a warning when a checkpoint's
tensor has another shape than the model's (and then leaves the model's random weights in place).
:func:`raise_on_size_mismatch` installs a load pre-hook on a model that raises instead, naming
the mismatched entries. And since a pruned checkpoint carries its plan (``meta["kcp_plugin"]``,
written by the ``PruningHook``), :func:`install` also makes mmengine's
``_load_checkpoint_to_model`` (behind ``load_checkpoint``, mmseg's ``init_model``, ``load_from``
and ``resume``) replay that plan on the model before copying the weights, and then load with
shapes checked: a pruned checkpoint gives the pruned model through any mmseg entry point, or an
error, never the dense architecture with random weights.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner import checkpoint as mm_checkpoint

__all__ = ["META_KEY", "install", "checkpoint_plan", "safe_globals", "raise_on_size_mismatch",
           "size_mismatches"]

META_KEY = "kcp_plugin"  # checkpoint["meta"][META_KEY]: the PruningHook's state, with the plan

_INSTALLED = False
_HOOKED = "_kcp_size_check_hook"


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as a checkpoint may use it: only ``HistoryBuffer``'s statistics methods."""
    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith("_") \
            and callable(getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle_error(f"checkpoint asks for getattr({obj!r}, {name!r}), which is not allowed")


def pickle_error(message: str) -> Exception:
    import pickle

    return pickle.UnpicklingError(message)


@functools.lru_cache(maxsize=1)
def _allowed() -> list[Any]:
    """The globals an mmengine checkpoint needs beyond tensors and plain containers."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"}
    allowed: list[Any] = [HistoryBuffer, np.ndarray, np.dtype, _reconstruct, scalar]
    allowed += sorted(dtypes - {np.dtype}, key=lambda t: t.__name__)
    # numpy pickles these under both names, depending on the numpy that saved the file
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(_reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    allowed.append((_history_buffer_getattr, "builtins.getattr"))
    return allowed


@contextlib.contextmanager
def safe_globals() -> Iterator[None]:
    """Allow exactly what mmengine checkpoints hold, for ``torch.load(weights_only=True)``."""
    with torch.serialization.safe_globals(_allowed()):
        yield


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local-file loader, with ``weights_only=True`` stated (not left to defaults)."""
    import os.path as osp

    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return torch.load(filename, map_location=map_location, weights_only=True)


def install() -> None:
    """Make every mmengine checkpoint load go through the allow-listed ``weights_only`` path.

    Idempotent. Wraps ``CheckpointLoader.load_checkpoint`` (used by ``Runner.load_checkpoint``,
    ``resume``, ``mmengine.runner.load_checkpoint``, mmseg's ``init_model``) in
    :func:`safe_globals` and replaces the local-file scheme with one that passes
    ``weights_only=True`` explicitly.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    loader = mm_checkpoint.CheckpointLoader
    original = loader.load_checkpoint.__func__

    @classmethod  # type: ignore[misc]
    @functools.wraps(original)
    def load_checkpoint(cls, filename, map_location=None, logger="current"):
        with safe_globals():
            return original(cls, filename, map_location, logger)

    loader.load_checkpoint = load_checkpoint
    loader.register_scheme(prefixes="", loader=load_from_local, force=True)
    to_model = mm_checkpoint._load_checkpoint_to_model  # looked up at call time by mmengine

    @functools.wraps(to_model)
    def load_checkpoint_to_model(model, checkpoint, *args: Any, **kwargs: Any):
        plan = checkpoint_plan(checkpoint)
        if plan is not None and isinstance(model, nn.Module):
            from .structure import example_inputs, sync_structure, unwrap

            target = unwrap(model)
            sync_structure(target, plan, example_inputs(target))  # no-op if already in step
            raise_on_size_mismatch(target)
        return to_model(model, checkpoint, *args, **kwargs)

    mm_checkpoint._load_checkpoint_to_model = load_checkpoint_to_model
    _INSTALLED = True


def checkpoint_plan(checkpoint: Any) -> dict[str, Any] | None:
    """The pruning plan a loaded checkpoint carries: the ``PruningHook``'s
    ``meta["kcp_plugin"]["plan"]``, or a ``save_pruned`` file's ``"kcp_plugin"``; else None."""
    if not isinstance(checkpoint, dict):
        return None
    state = (checkpoint.get("meta") or {}).get(META_KEY)
    if isinstance(state, dict) and isinstance(state.get("plan"), dict):
        return state["plan"]
    top = checkpoint.get(META_KEY)
    if isinstance(top, dict) and "history" in top:
        return top
    return None


def size_mismatches(
    model: nn.Module, state_dict: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Entries of ``state_dict`` (under ``prefix``) whose shape differs from ``model``'s."""
    own = model.state_dict()
    out = []
    for key, value in state_dict.items():
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
            continue
        name = key[len(prefix):]
        if name in own and own[name].shape != value.shape:
            out.append(f"{name}: checkpoint {tuple(value.shape)}, model {tuple(own[name].shape)}")
    return out


def raise_on_size_mismatch(model: nn.Module) -> nn.Module:
    """Make loading a state dict into ``model`` raise on any shape mismatch (idempotent).

    mmengine's non-strict loading would only warn; a pruned checkpoint loaded into a model whose
    structure was not rebuilt would then run with random weights. The check runs as a load
    pre-hook on ``model`` itself, so it covers every loader (mmengine's, torch's, EMA copies).
    """
    if getattr(model, _HOOKED, False):
        return model

    def check(module, state_dict, prefix, *args: Any) -> None:
        bad = size_mismatches(module, state_dict, prefix)
        if bad:
            raise RuntimeError(
                f"checkpoint does not fit the model: {len(bad)} tensors differ in shape "
                f"({'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}). A pruned checkpoint "
                "needs its pruning plan replayed first: train with kcp_plugin.PruningHook, or "
                "test/deploy with model=dict(type='kcp_plugin.PrunedSegmentor', ...)"
            )

    model.register_load_state_dict_pre_hook(check)
    model.__dict__[_HOOKED] = True
    return model
