"""The one registry of pruning criteria, shared by the core API, the CLI and every integration.

Criteria are registered by name, the way timm registers model entrypoints: a factory (usually an
``Importance`` class) is decorated with :func:`register_importance` and later built with
:func:`get_importance`. Integrations (NNI, mmseg, timm, the benchmark) never construct criteria
themselves, so a criterion registered once is available everywhere.

The built-in criteria (:mod:`kcp_plugin.importance`) register themselves when ``kcp_plugin``
is imported (its ``__init__`` imports them); this module imports only :mod:`kcp_plugin.hints`, so
the criteria can import it for the decorator without a cycle.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch_pruning as tp

from .hints import did_you_mean

__all__ = [
    "CriterionInfo",
    "KeepRatioAware",
    "criterion_arguments",
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
        per_sample_loss: With ``requires_grad``: the loss must be one value per sample
            (shape ``(N,)``), each back-propagated alone (torch-pruning's
            ``GroupHessianImportance`` accumulates per-sample gradients).
    """

    name: str
    factory: Callable[..., tp.importance.Importance]
    requires_grad: bool
    summary: str
    requires_data: bool = False
    per_sample_loss: bool = False

    @property
    def data_free(self) -> bool:
        """Scores from the weights alone (no gradients, no data): usable wherever no training
        batches are at hand (the CLI, creation-time pruning)."""
        return not (self.requires_grad or self.requires_data)


@runtime_checkable
class KeepRatioAware(Protocol):
    """A criterion whose scores depend on how many channels a step keeps (KCP's
    representative clusters, a blend of such criteria).

    Before every pruning step, :func:`kcp_plugin.prune` sets ``keep_ratio_hint`` to the
    fraction of the current channels that step keeps (``(1 - after) / (1 - done)`` for the
    cumulative ratios done before and after the step).
    """

    keep_ratio_hint: float | None


_REGISTRY: dict[str, CriterionInfo] = {}


def register_importance(
    name: str | None = None,
    *,
    requires_grad: bool = False,
    requires_data: bool = False,
    per_sample_loss: bool = False,
    summary: str | None = None,
    override: bool = False,
) -> Callable[[F], F]:
    """Register an importance factory under ``name``.

    Args:
        name: Registry name; defaults to the factory's ``__name__`` in lower case.
        requires_grad: Whether the criterion needs gradients before scoring.
        requires_data: Whether the criterion collects statistics on data before scoring.
        per_sample_loss: Whether its loss must be per sample (see :class:`CriterionInfo`).
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
        _REGISTRY[key] = CriterionInfo(key, factory, requires_grad, doc, requires_data,
                                       per_sample_loss)
        return factory

    return decorator


def _unknown(name: str) -> ValueError:
    valid = sorted(_REGISTRY)
    return ValueError(f"unknown importance {name!r}{did_you_mean(name.lower(), valid, n=1)}. "
                      f"Valid names: {', '.join(valid)}")


def importance_info(name: str) -> CriterionInfo:
    """Return the registry entry for ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the valid names.
    """
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
            named = ", ".join(
                f"{b} (did you mean {close[0]}?)" if close else b
                for b in bad for close in [difflib.get_close_matches(b, accepted, n=1)])
            raise ValueError(
                f"importance {info.name!r} does not accept {named}; "
                f"accepted arguments: {', '.join(accepted) or '(none)'}"
            )
    return info.factory(**kwargs)


Reduction = str  # "mean", "sum" or "none" (per sample), as in torch's losses
LossOf = Callable[[Any, Any, Reduction], Any]


def criterion_arguments(
    info: CriterionInfo,
    loss: LossOf,
    *,
    batch: Any = None,
    batches: Any = None,
    data_steps: int | None = None,
    step_fn: Callable[[Any, Any], Any] | None = None,
) -> dict[str, Any]:
    """The :func:`kcp_plugin.prune` keyword arguments that feed criterion ``info``.

    Every integration (mmseg hook, NNI search, benchmark, timm training) builds these here, so
    what a criterion needs is decided once, by its :class:`CriterionInfo`.

    Args:
        info: The criterion (:func:`importance_info`).
        loss: ``loss(model, batch, reduction)``: the training loss of ``batch``, reduced by
            ``"mean"``, ``"sum"`` or ``"none"`` (one value per sample).
        batch: The batch a gradient criterion back-propagates: a batch, or a callable
            returning the current one when ``prune`` asks (a training loop's latest batch).
        batches: The batches a data-driven criterion collects statistics on.
        data_steps: Batches per collection (default: all of ``batches``).
        step_fn: ``step_fn(model, batch) -> loss`` for the collection; default
            ``loss(model, batch, "sum")`` (each sample's gradient is that of its own loss).

    Returns:
        ``{}`` for a data-free criterion; ``{"loss_fn": ...}`` for a gradient criterion
        (per-sample losses where ``info.per_sample_loss``); ``{"data", "data_steps",
        "step_fn"}`` for a data-driven one.

    Raises:
        ValueError: the criterion needs ``batch`` or ``batches`` and it was not given.
    """
    if info.requires_data:
        if batches is None:
            raise ValueError(f"importance {info.name!r} collects statistics on data: "
                             "pass batches=<training batches>")
        return {"data": batches, "data_steps": data_steps,
                "step_fn": step_fn or (lambda model, b: loss(model, b, "sum"))}
    if info.requires_grad:
        if batch is None:
            raise ValueError(f"importance {info.name!r} reads gradients: pass batch=<a "
                             "training batch> (or a callable returning the current one)")
        reduction = "none" if info.per_sample_loss else "mean"

        def loss_fn(model: Any) -> Any:
            return loss(model, batch() if callable(batch) else batch, reduction)

        return {"loss_fn": loss_fn}
    return {}


def list_importances(pattern: str = "*") -> list[str]:
    """Names of the registered criteria matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern.lower()))
