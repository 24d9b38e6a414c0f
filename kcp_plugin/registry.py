"""The one registry of pruning criteria, shared by the core API, the CLI and every integration.

Criteria are registered by name, the way timm registers model entrypoints: a factory (usually an
``Importance`` class) is decorated with :func:`register_importance` and later built with
:func:`get_importance`. Integrations (NNI, mmseg, timm, the benchmark) never construct criteria
themselves, so a criterion registered once is available everywhere.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch_pruning as tp

__all__ = [
    "CriterionInfo",
    "register_importance",
    "get_importance",
    "list_importances",
    "importance_info",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CriterionInfo:
    """What the registry knows about one criterion.

    Attributes:
        name: Registry name, lower case.
        factory: Callable returning a ``torch_pruning.importance.Importance``.
        requires_grad: The criterion reads ``param.grad`` (or accumulated gradients), so a loss
            must be back-propagated before scoring.
        summary: One line shown by ``kcp-prune --list-importances``.
        requires_data: The criterion scores from statistics collected on data
            (a :class:`kcp_plugin.stats.StatsImportance`): pass ``data`` to ``prune``.
    """

    name: str
    factory: Callable[..., tp.importance.Importance]
    requires_grad: bool
    summary: str
    requires_data: bool = False

    @property
    def data_free(self) -> bool:
        """Scores from the weights alone (no gradients, no data): usable wherever no training
        batches are at hand (the CLI, creation-time pruning)."""
        return not (self.requires_grad or self.requires_data)


_REGISTRY: dict[str, CriterionInfo] = {}


def register_importance(
    name: str | None = None,
    *,
    requires_grad: bool = False,
    requires_data: bool = False,
    summary: str | None = None,
    override: bool = False,
) -> Callable[[F], F]:
    """Register an importance factory under ``name``.

    Args:
        name: Registry name; defaults to the factory's ``__name__`` in lower case.
        requires_grad: Whether the criterion needs gradients before scoring.
        requires_data: Whether the criterion collects statistics on data before scoring.
        summary: One-line description; defaults to the first docstring line.
        override: Replace an existing entry instead of raising.

    Returns:
        A decorator that registers the factory and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered and ``override`` is false.
    """

    def decorator(factory: F) -> F:
        key = (name or factory.__name__).lower()
        if key in _REGISTRY and not override:
            raise ValueError(
                f"importance {key!r} is already registered; pass override=True to replace it"
            )
        doc = summary or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[key] = CriterionInfo(key, factory, requires_grad, doc, requires_data)
        return factory

    return decorator


def _unknown(name: str) -> ValueError:
    valid = sorted(_REGISTRY)
    close = difflib.get_close_matches(name.lower(), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown importance {name!r}.{hint} Valid names: {', '.join(valid)}")


def importance_info(name: str) -> CriterionInfo:
    """Return the registry entry for ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the valid names.
    """
    _ensure_builtins()
    if not isinstance(name, str):
        raise TypeError(f"importance name must be a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise _unknown(name) from None


def get_importance(name: str, **kwargs: Any) -> tp.importance.Importance:
    """Build the criterion registered as ``name`` with keyword arguments ``kwargs``.

    Keyword arguments are checked against the factory's signature first, so a typo gives an
    error naming the accepted arguments rather than a ``TypeError`` from deep inside.

    Raises:
        ValueError: unknown name, or an argument the criterion does not accept.
    """
    info = importance_info(name)
    params = inspect.signature(info.factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        bad = sorted(set(kwargs) - set(accepted))
        if bad:
            raise ValueError(
                f"importance {info.name!r} does not accept {', '.join(bad)}; "
                f"accepted arguments: {', '.join(accepted) or '(none)'}"
            )
    return info.factory(**kwargs)


def list_importances(pattern: str = "*") -> list[str]:
    """Names of the registered criteria matching a shell-style ``pattern``, sorted."""
    _ensure_builtins()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern.lower()))


def _ensure_builtins() -> None:
    # The built-in criteria register themselves on import; importing here (not at module top)
    # avoids a cycle, since those modules import this one for the decorator.
    from . import importance  # noqa: F401
