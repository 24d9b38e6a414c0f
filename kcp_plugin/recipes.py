"""Recipes that call :func:`kcp_plugin.prune`: EPruner's adaptive widths and the blend
weight search.

They sit above :mod:`kcp_plugin.pruning` so the criteria in :mod:`kcp_plugin.importance`
(scoring only) never import the pruning entry point: EPruner's clustering and the blend's
ranking live there, the loops that prune copies with them live here.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from .graph import check_runs, checked_graph, default_forward, output_layers, resolve_layers
from .importance.blend import DEFAULT_POOL, BlendImportance
from .importance.epruner import EPrunerImportance
from .progress import progress_bar
from .pruning import prune
from .report import PruneReport

__all__ = ["epruner_prune", "epruner_widths", "search_blend_weights"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- EPruner, adaptive mode
def epruner_widths(
    model: nn.Module,
    example_inputs: Any,
    beta: float = 0.45,
    *,
    importance_kwargs: dict[str, Any] | None = None,
    ignored_layers: Iterable[Any] | None = None,
    protect_outputs: bool = True,
    forward_fn: Callable | None = None,
    output_transform: Callable | None = None,
    unwrapped_parameters: dict[nn.Parameter, int] | None = None,
    customized_pruners: dict[Any, Any] | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """EPruner's adaptive widths: the per-layer ratios that keep exactly each group's exemplars.

    Every prunable group (as :func:`kcp_plugin.prune` sees them: output layers and
    ``ignored_layers`` excluded) is clustered; a group of ``n`` channels with ``k`` exemplars
    gets ratio ``1 - (k + 0.5) / n`` under its root layer's name (the half channel makes
    torch-pruning's ``int(n * (1 - ratio))`` keep exactly ``k``; 0.0 when every channel is an
    exemplar). Pass the result to ``prune(model, x, "epruner", pruning_ratio_dict=...)`` with the
    same ``beta`` / settings, or call :func:`epruner_prune`. ``prune``'s ``max_pruning_ratio``
    still caps each layer. The model is not modified.

    Args:
        model: The model (only read).
        example_inputs: Inputs for tracing, as for :func:`kcp_plugin.prune`.
        beta: Preference factor (larger: fewer exemplars, narrower layers).
        importance_kwargs: Other :class:`EPrunerImportance` arguments.
        ignored_layers, protect_outputs, forward_fn, output_transform, unwrapped_parameters,
            customized_pruners, progress: As for :func:`kcp_plugin.prune`.

    Returns:
        ``{root layer name: pruning ratio}`` for every prunable group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    imp = EPrunerImportance(beta=beta, **(importance_kwargs or {}))
    ignored = resolve_layers(model, ignored_layers, "ignored_layers")
    check_runs(model, example_inputs, forward_fn or default_forward)
    graph = checked_graph(model, example_inputs, forward_fn or default_forward,
                          output_transform, unwrapped_parameters=unwrapped_parameters,
                          customized_pruners=customized_pruners)
    protected = ignored + (output_layers(graph) if protect_outputs else [])
    skip = [m for p in protected for m in p.modules()]
    names = {m: n for n, m in model.named_modules()}
    groups = list(graph.get_all_groups(ignored_layers=skip,
                                       root_module_types=[nn.modules.conv._ConvNd, nn.Linear]))
    widths: dict[str, float] = {}
    with torch.no_grad():
        for group in progress_bar(groups, enabled=progress, desc="EPruner clustering"):
            root = group[0].dep.target.module
            if root not in names:
                continue
            clustering = imp.cluster_group(group)
            if clustering is None:
                continue
            n, k = clustering.n_channels, len(clustering.exemplars)
            widths[names[root]] = 0.0 if k >= n else 1.0 - (k + 0.5) / n
            logger.info("EPruner: %s keeps %d of %d channels", names[root], k, n)
    return widths


def epruner_prune(
    model: nn.Module,
    example_inputs: Any,
    beta: float = 0.45,
    *,
    importance_kwargs: dict[str, Any] | None = None,
    **prune_kwargs: Any,
) -> PruneReport:
    """Prune ``model`` in place to EPruner's adaptive widths (one shot, as in the paper).

    Runs :func:`epruner_widths`, then :func:`kcp_plugin.prune` with the ``epruner`` criterion
    (same settings) and those per-layer ratios, so every group keeps exactly its exemplars
    (capped by ``max_pruning_ratio``, default 0.9; rounded if ``round_to`` is given).

    Args:
        model: The model to prune in place.
        example_inputs: Inputs for tracing.
        beta: Preference factor: the one knob of the adaptive mode.
        importance_kwargs: Other :class:`EPrunerImportance` arguments.
        **prune_kwargs: Passed to :func:`kcp_plugin.prune` (``ignored_layers``, ``round_to``,
            ``max_pruning_ratio``, ``forward_fn``, ``progress``...). The widths come from the
            clustering, so ``target_macs_ratio``, ``pruning_ratio``, ``pruning_ratio_dict``,
            ``importance``, ``global_pruning`` and ``iterative_steps`` are not accepted.

    Returns:
        The :class:`kcp_plugin.PruneReport`.
    """
    fixed = sorted({"target_macs_ratio", "pruning_ratio", "pruning_ratio_dict", "importance",
                    "importance_kwargs", "global_pruning", "iterative_steps"} & set(prune_kwargs))
    if fixed:
        raise ValueError(
            f"epruner_prune sets the widths from the clustering; it does not accept "
            f"{', '.join(fixed)} (use kcp_plugin.prune(model, x, 'epruner', ...) for "
            "ratio-driven pruning)")
    widths = epruner_widths(
        model, example_inputs, beta, importance_kwargs=importance_kwargs,
        **{k: prune_kwargs[k] for k in ("ignored_layers", "protect_outputs", "forward_fn",
                                        "output_transform", "unwrapped_parameters",
                                        "customized_pruners", "progress") if k in prune_kwargs},
    )
    imp = EPrunerImportance(beta=beta, **(importance_kwargs or {}))
    if widths:
        return prune(model, example_inputs, imp, pruning_ratio_dict=widths, **prune_kwargs)
    return prune(model, example_inputs, imp, pruning_ratio=0.0, **prune_kwargs)


# --------------------------------------------------------------------------- blend weight search
def search_blend_weights(
    model: nn.Module,
    example_inputs: Any,
    evaluate_fn: Callable[[nn.Module], float],
    pool: Sequence[str] = DEFAULT_POOL,
    *,
    target_macs_ratio: float | None = 0.5,
    pruning_ratio: float | None = None,
    population: int = 8,
    generations: int = 5,
    offspring: int | None = None,
    sigma: float = 0.15,
    seed: int = 0,
    blend_kwargs: Mapping[str, Any] | None = None,
    prune_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    on_interrupt: str = "return",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Search blend weights with a (mu + lambda) evolutionary algorithm.

    Each candidate weight vector (on the simplex) prunes a deep copy of ``model`` with
    ``kcp_plugin.prune(copy, example_inputs, BlendImportance(pool, weights=w, ...),
    target_macs_ratio=...)``; its fitness is ``evaluate_fn(pruned_copy)`` (higher is better; NaN
    counts as worst). ``model`` itself is never modified.

    The first population holds the uniform weights, then the pure criteria (one-hot weights, in
    pool order, as room allows), then Dirichlet(1) draws. Each generation makes ``offspring``
    children: a parent picked by a 2-way tournament (half the time averaged with a second one
    at a random proportion), plus Gaussian noise of scale ``sigma`` on every weight, clipped at
    0 and renormalised to sum 1. The best ``population`` of parents and children survive.
    Fitness is cached by weights (rounded to 1e-6), so repeats cost nothing.

    Args:
        model: The dense model (deep-copied for every candidate).
        example_inputs: Inputs for tracing, as for :func:`kcp_plugin.prune`.
        evaluate_fn: ``evaluate_fn(pruned_model) -> float``, e.g. validation accuracy after a
            short fine-tune.
        pool: Registry names of data-free criteria.
        target_macs_ratio: Fraction of MACs each candidate keeps (or give ``pruning_ratio``).
        pruning_ratio: Channel ratio instead of a MACs target.
        population: Survivors per generation (mu), >= 2.
        generations: Generations after the first population, >= 0.
        offspring: Children per generation (lambda); default ``population``.
        sigma: Scale of the Gaussian mutation.
        seed: Seed of the search (Python ``random.Random``); the same seed gives the same run.
        blend_kwargs: Other :class:`BlendImportance` arguments (``threshold``...).
        prune_kwargs: Other :func:`kcp_plugin.prune` arguments (``ignored_layers``...).
        progress: Show a progress bar (default: only on a terminal).
        on_interrupt: On Ctrl-C, ``"return"`` the best weights so far (with a warning; the
            history ends at the last finished evaluation) or ``"raise"`` the
            ``KeyboardInterrupt``. Interrupting before any evaluation finished always raises.

    Returns:
        ``(best_weights, history)``: best weights as ``{name: weight}`` (summing to 1), and one
        record per evaluation: ``{"generation", "weights", "fitness", "cached"}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(evaluate_fn):
        raise TypeError("evaluate_fn must be callable as evaluate_fn(pruned_model) -> float")
    if (target_macs_ratio is None) == (pruning_ratio is None):
        raise ValueError("give exactly one of target_macs_ratio and pruning_ratio")
    for name, value, low in (("population", population, 2), ("generations", generations, 0),
                             ("offspring", 1 if offspring is None else offspring, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(sigma, (int, float)) or not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if on_interrupt not in ("return", "raise"):
        raise ValueError(f"on_interrupt must be 'return' or 'raise', got {on_interrupt!r}")
    blend_kwargs = dict(blend_kwargs or {})
    prune_kwargs = dict(prune_kwargs or {})
    clash = sorted({"pool", "weights"} & set(blend_kwargs)) + sorted(
        {"importance", "importance_kwargs", "target_macs_ratio", "pruning_ratio"}
        & set(prune_kwargs))
    if clash:
        raise ValueError(f"{', '.join(clash)} are set by search_blend_weights itself")
    pool = BlendImportance(pool, **blend_kwargs).pool  # validates pool and blend_kwargs
    d = len(pool)
    lam = population if offspring is None else offspring
    rng = random.Random(seed)
    target = ({"target_macs_ratio": target_macs_ratio} if target_macs_ratio is not None
              else {"pruning_ratio": pruning_ratio})

    cache: dict[tuple[float, ...], float] = {}
    history: list[dict[str, Any]] = []
    bar = progress_bar(enabled=progress, total=population + lam * generations,
                       desc="blend weight search")
    best: tuple[float, tuple[float, ...]] | None = None

    def normalise(w: Sequence[float]) -> tuple[float, ...]:
        w = [max(0.0, x) for x in w]
        s = sum(w)
        return tuple(round(x / s, 6) for x in w) if s > 0 else (round(1 / d, 6),) * d

    def fitness(w: tuple[float, ...], generation: int) -> float:
        nonlocal best
        cached = w in cache
        if not cached:
            clone = copy.deepcopy(model)
            imp = BlendImportance(pool, weights=w, **blend_kwargs)
            prune(clone, example_inputs, imp, progress=False, **target, **prune_kwargs)
            value = evaluate_fn(clone)
            if not isinstance(value, (int, float, torch.Tensor)):
                raise TypeError(f"evaluate_fn must return a number, got {type(value).__name__}")
            value = float(value)
            cache[w] = -math.inf if math.isnan(value) else value
        f = cache[w]
        history.append({"generation": generation, "weights": dict(zip(pool, w)), "fitness": f,
                        "cached": cached})
        if best is None or f > best[0]:
            best = (f, w)
        bar.update(1)
        bar.set_postfix(best=f"{best[0]:.4g}")
        return f

    def dirichlet() -> tuple[float, ...]:
        return normalise([rng.gammavariate(1.0, 1.0) for _ in range(d)])

    try:
        try:
            starts = [normalise([1.0] * d)]
            starts += [normalise([float(i == j) for j in range(d)]) for i in range(d)]
            starts = starts[:population]
            while len(starts) < population:
                starts.append(dirichlet())
            pop = [(fitness(w, 0), w) for w in starts]
            for gen in range(1, generations + 1):
                children = []
                for _ in range(lam):
                    parent = _tournament(pop, rng)
                    if rng.random() < 0.5:
                        other, a = _tournament(pop, rng), rng.random()
                        parent = tuple(a * x + (1 - a) * y for x, y in zip(parent, other))
                    child = normalise([x + rng.gauss(0.0, sigma) for x in parent])
                    children.append((fitness(child, gen), child))
                merged = sorted(pop + children, key=lambda t: t[0], reverse=True)
                pop = merged[:population]
        except KeyboardInterrupt:
            if on_interrupt == "raise" or best is None:
                raise
            warnings.warn(f"blend weight search interrupted after {len(history)} evaluations; "
                          "returning the best weights so far", RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
    return dict(zip(pool, best[1])), history


def _tournament(pop: list[tuple[float, tuple[float, ...]]], rng: random.Random) -> tuple:
    a, b = rng.choice(pop), rng.choice(pop)
    return a[1] if a[0] >= b[0] else b[1]
