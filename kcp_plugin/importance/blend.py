"""Blended pruning criteria (after He et al., "Blending Pruning Criteria", arXiv 2107.05033).

Criteria rank channels inconsistently, and several of them often say the same thing (L1 and L2
nearly always agree). Per group, :class:`BlendImportance`

1. scores the channels with every criterion of a *pool* of registered, data-free criteria and
   turns each into normalised ranks ``R_c in [0, 1]`` (average ranks for ties, ``0`` = lowest);
2. clusters the criteria by the ranks they produce: the similarity of two criteria is the
   Spearman correlation ``rho(c, c')`` (the Pearson correlation of their ranks), and clusters are
   merged by average linkage while the mean ``rho`` between two clusters is at least
   ``threshold`` (or until ``n_clusters`` remain);
3. keeps one representative per cluster: its member with the largest weight (ties: the medoid,
   the member with the largest summed ``rho`` to the others, then pool order);
4. blends the representatives with per-cluster calibration factors ``alpha_k``, the mean weight of
   the cluster's members (so a cluster of redundant criteria counts once, not once per member):
   ``score = sum_k alpha_k R_rep(k) / sum_k alpha_k``.

The paper gives no formulas or code; the ones above are our reading (documented in
``docs/criteria_epruner_blend.md``). With one weight per pool criterion, one-hot weights
reproduce that criterion's ranking exactly, and uniform weights give every distinct opinion the
same say. :func:`kcp_plugin.recipes.search_blend_weights` searches the weights with a
(mu + lambda) evolutionary algorithm whose fitness is a user-supplied
``evaluate_fn(pruned_model)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp

from ..registry import get_importance, importance_info, list_importances, register_importance

__all__ = [
    "DEFAULT_POOL",
    "BlendImportance",
    "average_ranks",
    "cluster_criteria",
]

logger = logging.getLogger(__name__)

DEFAULT_POOL = ("l1", "l2", "fpgm", "kcp", "bn")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of ``x`` normalised to ``[0, 1]`` (lowest 0, highest 1), ties sharing their mean rank.

    A single value gets rank 1.
    """
    n = len(x)
    if n == 1:
        return torch.ones(1)
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    mean_pos = ends - (counts.to(torch.float64) + 1) / 2  # 0-based mean position of each tie run
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = mean_pos[inverse]
    return (ranks / (n - 1)).float()


def _correlation(ranks: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the rows of ``ranks`` (Spearman's rho, for rank rows).

    A constant row (a criterion that ties every channel) correlates 0 with the others.
    """
    centred = ranks.double() - ranks.double().mean(1, keepdim=True)
    norm = centred.norm(dim=1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    rho = (centred / safe[:, None]) @ (centred / safe[:, None]).t()
    rho[norm == 0] = 0.0
    rho[:, norm == 0] = 0.0
    rho.fill_diagonal_(1.0)
    return rho.clamp_(-1.0, 1.0)


def cluster_criteria(
    rho: torch.Tensor, threshold: float = 0.9, n_clusters: int | None = None
) -> list[list[int]]:
    """Average-linkage agglomerative clustering of criteria by their rank correlation ``rho``.

    The two clusters with the highest mean pairwise ``rho`` are merged (ties: the first pair in
    pool order) while that mean is ``>= threshold``; with ``n_clusters``, merging goes on until
    that many clusters remain, whatever the correlation.

    Returns:
        Clusters as sorted lists of row indices, ordered by their first member.
    """
    clusters = [[i] for i in range(rho.shape[0])]
    while len(clusters) > 1:
        if n_clusters is not None and len(clusters) <= n_clusters:
            break
        best, pair = -math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(rho[clusters[a]][:, clusters[b]].mean())
                if link > best + 1e-12:
                    best, pair = link, (a, b)
        if n_clusters is None and best < threshold:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


@register_importance(
    "blend", summary="Blend of data-free criteria: ranks clustered per layer, weighted (He+ 2021)"
)
class BlendImportance(tp.importance.Importance):
    """A blend of registered criteria, clustered per group (low score = pruned first).

    Scores are blended normalised ranks in ``[0, 1]`` (see the module docstring for the
    formulas), so with ``global_pruning`` every layer contributes a similar share of channels.

    Args:
        pool: Registry names of data-free criteria (default ``l1, l2, fpgm, kcp, bn``).
        weights: One non-negative weight per pool criterion (a sequence in pool order, or a
            mapping from name to weight, missing names 0); ``None`` = uniform. Only ratios
            matter; the sum must be positive.
        threshold: Spearman correlation at or above which two clusters of criteria merge.
        n_clusters: Merge until this many clusters remain instead (``threshold`` is ignored).
        pool_kwargs: Arguments for pool members, ``{name: {arg: value}}``.

    Attributes:
        last_clusters: The clusters (lists of names) and representatives of the last group
            scored, for inspection: ``[(members, representative, alpha), ...]``.

    Raises:
        ValueError: unknown or duplicate names, a criterion that needs gradients or data, a
            bad weight vector, or a bad threshold / ``n_clusters``.
    """

    def __init__(
        self,
        pool: Sequence[str] = DEFAULT_POOL,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        threshold: float = 0.9,
        n_clusters: int | None = None,
        pool_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.pool = _check_pool(pool)
        self.weights = _check_weights(weights, self.pool)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) \
                or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a correlation in [-1, 1], got {threshold!r}")
        if n_clusters is not None and (not isinstance(n_clusters, int) or n_clusters < 1):
            raise ValueError(f"n_clusters must be None or an integer >= 1, got {n_clusters!r}")
        pool_kwargs = dict(pool_kwargs or {})
        stray = sorted(set(pool_kwargs) - set(self.pool))
        if stray:
            raise ValueError(f"pool_kwargs names {', '.join(stray)}, which are not in the pool "
                             f"({', '.join(self.pool)})")
        self.threshold = float(threshold)
        self.n_clusters = n_clusters
        self.pool_kwargs = {k: dict(v) for k, v in pool_kwargs.items()}
        self.members = {name: get_importance(name, **self.pool_kwargs.get(name, {}))
                        for name in self.pool}
        self.last_clusters: list[tuple[list[str], str, float]] = []

    def __repr__(self) -> str:
        w = ", ".join(f"{n}={w:.3g}" for n, w in zip(self.pool, self.weights))
        return f"BlendImportance({w}; threshold={self.threshold}, n_clusters={self.n_clusters})"

    @property
    def keep_ratio_hint(self) -> float | None:
        """Forwarded to pool members that follow the pruning step (``kcp_representative``)."""
        hints = [m.keep_ratio_hint for m in self.members.values() if hasattr(m, "keep_ratio_hint")]
        return hints[0] if hints else None

    @keep_ratio_hint.setter
    def keep_ratio_hint(self, value: float) -> None:
        for m in self.members.values():
            if hasattr(m, "keep_ratio_hint"):
                m.keep_ratio_hint = value

    def blend(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Blend per-criterion scores of one group's channels (criteria missing from ``scores``
        are left out of this group). Sets :attr:`last_clusters`."""
        names = [n for n in self.pool if n in scores]
        if not names:
            raise ValueError("no criterion scored this group")
        ranks = torch.stack([average_ranks(scores[n].detach().float().cpu()) for n in names])
        rho = _correlation(ranks)
        w = torch.tensor([self.weights[self.pool.index(n)] for n in names], dtype=torch.float64)
        if w.sum() <= 0:  # the weighted criteria did not score this group: weigh the rest equally
            w = torch.ones_like(w)
        clusters = cluster_criteria(rho, self.threshold, self.n_clusters)
        total = torch.zeros(ranks.shape[1], dtype=torch.float64)
        alpha_sum = 0.0
        self.last_clusters = []
        for members in clusters:
            centrality = rho[members][:, members].sum(1)
            rep = max(range(len(members)),
                      key=lambda i: (float(w[members[i]]), float(centrality[i]), -members[i]))
            alpha = float(w[members].mean())
            total += alpha * ranks[members[rep]].double()
            alpha_sum += alpha
            self.last_clusters.append(([names[i] for i in members], names[members[rep]], alpha))
        return (total / alpha_sum).float()

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        n_root = len(group[0].idxs)
        scores = {}
        for name, member in self.members.items():
            try:
                s = member(group)
            except Exception as exc:  # one broken member must not sink the whole blend
                # (e.g. torch-pruning 1.6.1's FPGM raises on grouped, non-depthwise convs)
                warnings.warn(f"blend: criterion {name!r} failed on the group of "
                              f"{_group_name(group)} ({type(exc).__name__}: {exc}); it is left "
                              "out of this group's blend", RuntimeWarning, stacklevel=1)
                continue
            if s is None:
                continue
            s = torch.as_tensor(s).detach().flatten()
            if len(s) != n_root or not torch.isfinite(s).all():
                logger.debug("blend: %s gave unusable scores for group at %s; left out", name,
                             group[0])
                continue
            scores[name] = s
        if not scores:
            return None
        return self.blend(scores)


def _group_name(group: tp.dependency.Group) -> str:
    node = group[0].dep.target
    return node._name or type(node.module).__name__


def _data_free() -> list[str]:
    return [n for n in list_importances() if n != "blend" and importance_info(n).data_free]


def _check_pool(pool: Sequence[str]) -> tuple[str, ...]:
    if isinstance(pool, str) or not isinstance(pool, Sequence):
        raise TypeError(f"pool must be a sequence of registry names, got {pool!r}")
    if len(pool) == 0:
        raise ValueError(f"pool is empty; data-free choices: {', '.join(_data_free())}")
    names = []
    for name in pool:
        info = importance_info(name)  # raises, listing the valid names, if unknown
        if info.name == "blend":
            raise ValueError("a blend cannot contain 'blend'")
        needs = ("gradients" if info.requires_grad else
                 "data" if info.requires_data else None)
        if needs:
            raise ValueError(
                f"blend pool member {info.name!r} needs {needs}, which blending does not provide "
                f"yet; data-free choices: {', '.join(_data_free())}")
        if info.name in names:
            raise ValueError(f"pool lists {info.name!r} twice")
        names.append(info.name)
    return tuple(names)


def _check_weights(
    weights: Sequence[float] | Mapping[str, float] | None, pool: tuple[str, ...]
) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * len(pool)
    if isinstance(weights, Mapping):
        stray = sorted(set(weights) - set(pool))
        if stray:
            raise ValueError(f"weights name {', '.join(map(repr, stray))}, which are not in the "
                             f"pool ({', '.join(pool)})")
        weights = [weights.get(n, 0.0) for n in pool]
    elif isinstance(weights, torch.Tensor):
        weights = weights.flatten().tolist()
    elif isinstance(weights, str) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence or a mapping, got {weights!r}")
    if len(weights) != len(pool):
        raise ValueError(f"weights has {len(weights)} entries but the pool has {len(pool)} "
                         f"criteria ({', '.join(pool)})")
    out = []
    for name, w in zip(pool, weights):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"weight of {name!r} must be a finite number, got {w!r}")
        if w < 0:
            raise ValueError(f"weight of {name!r} is negative ({w}); weights must be >= 0")
        out.append(float(w))
    if sum(out) <= 0:
        raise ValueError("weights must not all be zero")
    return tuple(out)

