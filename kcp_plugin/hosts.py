"""Host-library knowledge that every entry point applies: one path for prune and replay.

A timm model needs custom pruners for layers torch-pruning cannot map (Swin's PatchMerging,
MetaFormer's Scale...), protected blocks, cache handling, refusals and head bookkeeping. That
knowledge lives in the timm integration, but a user who calls the core :func:`kcp_plugin.prune`,
:func:`kcp_plugin.apply_plan` / :func:`kcp_plugin.load_pruned`, NNI ``speedup``, the CLI or the
mmseg hook must get it too. So the core asks this module which host adapters apply to a model,
decided from the packages its module classes come from, and imports an adapter (and its host
library) only when the model contains that library's classes: ``import kcp_plugin`` still
needs only torch and torch-pruning.

An adapter is any object with the methods of :class:`HostAdapter`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch.nn as nn

__all__ = ["HostAdapter", "HOSTS", "adapters_for", "host_forward", "host_pruners"]

# top-level package of a model's module classes -> "module:attribute" of its adapter
HOSTS: dict[str, str] = {
    "timm": "kcp_plugin.integrations.timm.adapter:ADAPTER",
    "mmseg": "kcp_plugin.integrations.mmseg.adapter:ADAPTER",
}


class HostAdapter(Protocol):
    """What the core calls for a model that contains a host library's modules."""

    def check(self, model: nn.Module) -> None:
        """Raise (a ``ValueError`` naming the cause) if the model cannot be pruned correctly;
        called before the model is touched."""

    def customized_pruners(self, model: nn.Module) -> dict[type, Any]:
        """torch-pruning pruners for layer types it cannot map channels through."""

    def default_forward(self, model: nn.Module) -> Any:
        """How to trace the model when the user gives no ``forward_fn`` (None: ``model(x)``)."""

    def protected(self, model: nn.Module, example_inputs: Any, forward_fn: Any,
                  customized_pruners: dict[type, Any]) -> list[nn.Module]:
        """Layers whose channel groups must stay unpruned (added to ``ignored_layers``)."""

    def before_prune(self, model: nn.Module, example_inputs: Any) -> None:
        """Record what must be known about the unpruned model (e.g. head attributes)."""

    def after_prune(self, model: nn.Module, example_inputs: Any) -> dict[str, dict[str, Any]]:
        """Fix bookkeeping after a prune; return ``{module: {attr: value}}`` for the plan."""

    def after_replay(self, model: nn.Module) -> None:
        """Fix bookkeeping after a plan is replayed."""


def _packages(model: nn.Module) -> set[str]:
    return {type(m).__module__.partition(".")[0] for m in model.modules()}


def adapters_for(model: nn.Module) -> list[HostAdapter]:
    """The adapters of the host libraries whose module classes ``model`` contains."""
    found = []
    packages = _packages(model)
    for package, target in HOSTS.items():
        if package in packages:
            module, _, attr = target.partition(":")
            found.append(getattr(importlib.import_module(module), attr))
    return found


def host_forward(model: nn.Module, given: Any = None) -> Any:
    """``given``, else the first host's default trace for ``model``, else None."""
    if given is not None:
        return given
    for adapter in adapters_for(model):
        fwd = adapter.default_forward(model)
        if fwd is not None:
            return fwd
    return None


def host_pruners(model: nn.Module, given: dict[Any, Any] | None = None) -> dict[Any, Any]:
    """The custom pruners for ``model``: the core's per-channel ones (frozen norms,
    :mod:`kcp_plugin.channelwise`), the hosts', then ``given`` ones taking precedence."""
    from .channelwise import channelwise_pruners

    pruners: dict[Any, Any] = channelwise_pruners(model)
    for adapter in adapters_for(model):
        pruners.update(adapter.customized_pruners(model))
    return {**pruners, **(given or {})}
