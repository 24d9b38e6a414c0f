"""The timm host adapter: what the core applies to any model that contains timm modules.

:func:`kcp_plugin.prune`, :func:`kcp_plugin.apply_plan` (and so ``load_pruned``, NNI
``speedup``, the CLI and the mmseg hook) look adapters up by the packages of a model's module
classes (:mod:`kcp_plugin.hosts`); this one brings the timm knowledge of :mod:`.support` and the
head bookkeeping of :mod:`.pruning` to all of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .pruning import head_map, sync_head_attrs
from .support import check_supported, clear_caches, protected_roots, pruning_setup

__all__ = ["ADAPTER", "TimmAdapter"]


def _is_timm_model(model: nn.Module) -> bool:
    """A whole timm model (head bookkeeping applies), not a user model with timm layers."""
    return type(model).__module__.startswith("timm.") and hasattr(model, "get_classifier")


class TimmAdapter:
    """timm's custom pruners, protected blocks, refusals, caches and head attributes."""

    def check(self, model: nn.Module) -> None:
        check_supported(model)

    def customized_pruners(self, model: nn.Module) -> dict[type, Any]:
        return pruning_setup(model)["customized_pruners"]

    def default_forward(self, model: nn.Module) -> Any:
        return None

    def protected(self, model: nn.Module, example_inputs: Any, forward_fn: Any,
                  customized_pruners: dict[type, Any]) -> list[nn.Module]:
        return protected_roots(model, example_inputs, customized_pruners, forward_fn)

    def before_prune(self, model: nn.Module, example_inputs: Any) -> None:
        if _is_timm_model(model) and isinstance(example_inputs, torch.Tensor):
            head_map(model, example_inputs)  # decided on the unpruned (consistent) widths

    def after_prune(self, model: nn.Module, example_inputs: Any) -> dict[str, dict[str, Any]]:
        clear_caches(model)
        if _is_timm_model(model) and isinstance(example_inputs, torch.Tensor):
            return sync_head_attrs(model, example_inputs)
        return {}

    def after_replay(self, model: nn.Module) -> None:
        clear_caches(model)


ADAPTER = TimmAdapter()
