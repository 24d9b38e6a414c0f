"""EPruner: exemplar filters found by Affinity Propagation, as a torch-pruning importance.

Lin et al., "Network Pruning using Adaptive Exemplar Filters" (TNNLS; code lmbxmu/EPruner).
Per layer, the filters are rows ``A_i``; the similarity is ``S(i, j) = -||A_i - A_j||^2`` and the
preference (how willing a filter is to be an exemplar) is ``p_j = beta * median_i S(i, j)``
(column median over all filters, diagonal zero included, as the original code does). Affinity
Propagation (damping 0.5, ``max_iter`` 200, ``convergence_iter`` 15, as scikit-learn's and the
paper's) picks exemplar filters; the exemplars are kept. Larger ``beta`` means a more negative
preference, hence fewer exemplars and more pruning: the layer's width is an *output* of the
clustering. See ``docs/criteria_epruner_blend.md`` for the choices made here.

Two ways to use it:

* **Ratio-driven** (``kcp_plugin.prune(model, x, "epruner", target_macs_ratio=...)``): every root
  channel gets a score; exemplars score above every non-exemplar, so a layer keeps its
  exemplars first. Within each tier the order is set by ``order``.
* **Adaptive** (the paper's mode): :func:`kcp_plugin.recipes.epruner_widths` clusters every
  group and returns the per-layer ratios that keep exactly the exemplars, for
  ``prune(..., pruning_ratio_dict=...)``; :func:`kcp_plugin.recipes.epruner_prune` does both
  steps.

Coupled (residual) groups cluster the concatenated producer rows: every filter that writes a
channel of the group, each layer's block scaled to unit RMS row norm (``member_scale``) so no
layer dominates the distance by its weight scale (the original never prunes block outputs; this
is our inference).

Affinity Propagation is implemented here in torch (float64, vectorised like scikit-learn's, which
stays an optional extra). Its cost is ``O(N^2)`` memory and ``O(N^2)`` time per iteration; above
``max_exact`` filters the layer is clustered in random chunks of at most ``max_exact`` filters,
whose exemplars are clustered again (recursively) with their original preferences, so memory
stays ``O(N * max_exact)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch_pruning as tp

from ..affinity import (
    affinity_propagation,
    check_ap_settings,
    column_median,
    median_preference,
    squared_distance_similarity,
)
from ..registry import register_importance
from ..views import member_views

__all__ = ["EPrunerClustering", "EPrunerImportance", "cluster_rows"]

logger = logging.getLogger(__name__)

ORDERS = ("evidence", "distance")
FALLBACKS = ("last", "l2")
MEMBER_SCALES = ("rms", "none")


@dataclass(frozen=True)
class EPrunerClustering:
    """Affinity Propagation over the rows (channels) of one group.

    Attributes:
        rep: For every channel, the channel that is its exemplar (itself for an exemplar);
            ``None`` when clustering failed and the group fell back to L2 ranking.
        evidence: ``r(i, i) + a(i, i)`` per channel (from the last AP round that saw it).
        sq_dist: Squared distance of every channel's row to its exemplar's row.
        norms: L2 norm of every channel's row (the fallback ranking).
        converged: Every AP run involved converged.
        failed: Some AP run returned no exemplar.
        n_iter: Iterations of the longest AP run.
    """

    rep: torch.Tensor | None
    evidence: torch.Tensor
    sq_dist: torch.Tensor
    norms: torch.Tensor
    converged: bool
    failed: bool
    n_iter: int

    @property
    def n_channels(self) -> int:
        return len(self.norms)

    @property
    def exemplars(self) -> torch.Tensor:
        """Indices of the exemplar channels (every channel when clustering fell back)."""
        if self.rep is None:
            return torch.arange(self.n_channels)
        return (self.rep == torch.arange(self.n_channels)).nonzero().flatten()


def cluster_rows(
    x: torch.Tensor,
    beta: float,
    *,
    damping: float = 0.5,
    max_iter: int = 200,
    convergence_iter: int = 15,
    max_exact: int = 1024,
    retry_damping: float | None = 0.9,
    seed: int = 0,
) -> EPrunerClustering:
    """Cluster the rows of ``x`` (one per channel) with EPruner's similarity and preference.

    Up to ``max_exact`` rows are clustered in one Affinity Propagation run. Wider layers are
    split into random (seeded) chunks of at most ``max_exact`` rows, each clustered with the
    preferences of the whole layer; the chunks' exemplars are then clustered again the same way
    (recursively while more than ``max_exact`` remain), and every row follows its chunk
    exemplar to the exemplar that absorbed it.

    A run that does not converge is repeated once with ``retry_damping`` (oscillating messages
    are the usual cause, and stronger damping the usual cure); if that does not converge either,
    the first run's (or, if it had none, the retry's) last exemplars are returned with
    ``converged=False``.
    """
    x = x.to(torch.float64)
    n = len(x)
    full = squared_distance_similarity(x) if n <= max_exact else None
    pref = beta * column_median(full) if full is not None else median_preference(
        x, beta, block=max_exact)
    settings = dict(damping=damping, max_iter=max_iter, convergence_iter=convergence_iter)
    gen = torch.Generator().manual_seed(seed)
    state = {"converged": True, "failed": False, "n_iter": 0}
    evidence = torch.zeros(n, dtype=torch.float64)

    def run(idx: torch.Tensor) -> torch.Tensor | None:
        """Exemplar (global index) of every row in ``idx``, or None if AP found none."""
        m = len(idx)
        if m <= max_exact:
            sim = full if full is not None else squared_distance_similarity(x, idx, idx)
            res = affinity_propagation(sim, pref[idx], seed=seed, **settings)
            state["n_iter"] = max(state["n_iter"], res.n_iter)
            if not res.converged and retry_damping is not None and retry_damping > damping:
                # Oscillating messages: the standard cure is stronger damping (Frey & Dueck).
                retry = affinity_propagation(sim, pref[idx], seed=seed,
                                             **{**settings, "damping": retry_damping})
                state["n_iter"] = max(state["n_iter"], retry.n_iter)
                if retry.converged or len(res.exemplars) == 0:
                    res = retry
            state["converged"] &= res.converged
            evidence[idx] = res.evidence
            if len(res.exemplars) == 0:
                state["failed"] = True
                return None
            return idx[res.exemplars[res.labels]]
        rep = torch.empty(m, dtype=torch.long)  # in the order of idx
        pos = torch.empty(n, dtype=torch.long)
        pos[idx] = torch.arange(m)
        perm = idx[torch.randperm(m, generator=gen)]
        for chunk in perm.tensor_split(math.ceil(m / max_exact)):
            sub = run(chunk)
            if sub is None:
                return None
            rep[pos[chunk]] = sub
        centres = torch.unique(rep)
        if len(centres) == m:  # no chunk merged anything: every row stays its own exemplar
            return rep
        top = run(centres)
        if top is None:
            return None
        lookup = torch.empty(n, dtype=torch.long)
        lookup[centres] = top
        return lookup[rep]

    rep = run(torch.arange(n))
    norms = x.norm(dim=1)
    if rep is None:
        sq = torch.zeros(n, dtype=torch.float64)
    else:
        sq = (x - x[rep]).pow(2).sum(1)
    return EPrunerClustering(rep, evidence, sq, norms, state["converged"], state["failed"],
                             state["n_iter"])


def _tier_rank(*keys: torch.Tensor) -> torch.Tensor:
    """Ranks in ``(0, 1)`` sorted by ``keys[0]``, ties broken by the next keys, then by index."""
    m = len(keys[0])
    order = torch.arange(m)
    for key in reversed(keys):  # stable sorts from the least significant key
        order = order[torch.argsort(key[order], stable=True)]
    ranks = torch.empty(m)
    ranks[order] = torch.arange(1, m + 1, dtype=torch.float32)
    return ranks / (m + 1)


# --------------------------------------------------------------------------- the importance
_CACHE: OrderedDict[tuple, EPrunerClustering] = OrderedDict()
_CACHE_SIZE = 256


@register_importance(
    "epruner", summary="EPruner: Affinity Propagation exemplar filters are kept (beta knob)"
)
class EPrunerImportance(tp.importance.Importance):
    """EPruner's exemplar criterion for torch-pruning groups (low score = pruned first).

    Each group's channels are clustered by :func:`cluster_rows` on the rows of the filters that
    write them (all producers of a coupled group, concatenated). Scores fall in two tiers:
    exemplars in ``(1, 2)``, the others in ``(0, 1)``, so a layer keeps its exemplars first and
    a global ranking removes non-exemplars everywhere before any exemplar.

    Args:
        beta: Preference factor, ``p = beta * median similarity``: larger, fewer exemplars.
            0.45 is the original code's default (the ImageNet ResNets used 0.85-0.92 for their
            later blocks).
        order: Ranking within each tier. ``"evidence"`` (default): by ``r(i,i) + a(i,i)``, how
            strongly the clustering supports the channel as an exemplar (a near-copy of an
            exemplar has very low evidence, so it goes first). ``"distance"``: non-exemplars by
            their distance to their exemplar (closest first), exemplars by the size of their
            cluster (smallest first), ties by evidence.
        fallback: On non-convergence, ``"last"`` (default) uses the exemplars of the last
            iteration if there are any, else ranks by L2 norm; ``"l2"`` always ranks by the L2
            norm of the rows. A fallen-back group counts every channel as an exemplar, so the
            adaptive mode leaves it at full width. Either way a warning names the layer.
        damping, max_iter, convergence_iter: Affinity Propagation settings (paper: 0.5/200/15).
        retry_damping: A run that does not converge is repeated once with this damping before
            falling back (``None``: no retry).
        max_exact: Largest number of channels clustered in one run (memory ``O(max_exact^2)``);
            wider groups are clustered in chunks (see :func:`cluster_rows`).
        member_scale: ``"rms"`` scales each producer's block of a coupled group to unit RMS row
            norm before concatenation; ``"none"`` concatenates raw weights.
        seed: Seed of the tie-breaking noise and of the chunking.
    """

    def __init__(
        self,
        beta: float = 0.45,
        order: str = "evidence",
        fallback: str = "last",
        damping: float = 0.5,
        max_iter: int = 200,
        convergence_iter: int = 15,
        max_exact: int = 1024,
        member_scale: str = "rms",
        retry_damping: float | None = 0.9,
        seed: int = 0,
    ):
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta >= 0 \
                or math.isinf(beta):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        _check_choice("order", order, ORDERS)
        _check_choice("fallback", fallback, FALLBACKS)
        _check_choice("member_scale", member_scale, MEMBER_SCALES)
        check_ap_settings(damping, max_iter, convergence_iter)
        if not isinstance(max_exact, int) or max_exact < 2:
            raise ValueError(f"max_exact must be an integer >= 2, got {max_exact!r}")
        if retry_damping is not None:
            check_ap_settings(retry_damping, max_iter, convergence_iter)
        self.beta = float(beta)
        self.order = order
        self.fallback = fallback
        self.damping = damping
        self.max_iter = max_iter
        self.convergence_iter = convergence_iter
        self.max_exact = max_exact
        self.member_scale = member_scale
        self.retry_damping = retry_damping
        self.seed = seed

    def __repr__(self) -> str:
        return (f"EPrunerImportance(beta={self.beta}, order={self.order!r}, "
                f"fallback={self.fallback!r}, max_exact={self.max_exact})")

    # ----------------------------------------------------------------- per group
    def group_rows(self, group: tp.dependency.Group) -> torch.Tensor | None:
        """``[root channels, features]`` rows: the group's producers' filters, concatenated.

        Without producers (a group reached only through consumers), the consumers' kernel
        clusters are used instead; ``None`` if the group has neither.
        """
        n_root = len(group[0].idxs)
        views = member_views(group, ("producer",)) or member_views(group, ("consumer",))
        if not views:
            return None
        blocks = []
        for v in views:
            rows = v.rows[v.idxs].to("cpu", torch.float64)  # clustering runs on the CPU
            idx = torch.as_tensor(v.root_idxs, dtype=torch.long)
            block = torch.zeros(n_root, rows.shape[1], dtype=torch.float64).index_add_(0, idx, rows)
            count = torch.bincount(idx, minlength=n_root).clamp_min(1)
            block /= count[:, None]
            if self.member_scale == "rms":
                rms = rows.pow(2).sum(1).mean().sqrt()
                if rms > 0:
                    block /= rms
            blocks.append(block)
        return torch.cat(blocks, dim=1)

    def cluster(self, rows: torch.Tensor, name: str = "layer") -> EPrunerClustering:
        """Cluster ``rows`` (cached on their content), warning if Affinity Propagation failed."""
        rows = rows.to("cpu", torch.float64).contiguous()
        digest = hashlib.blake2b(rows.numpy().tobytes(), digest_size=16).hexdigest()
        key = (self.beta, self.damping, self.max_iter, self.convergence_iter, self.max_exact,
               self.retry_damping, self.seed, tuple(rows.shape), digest)
        result = _CACHE.get(key)
        if result is None:
            result = cluster_rows(rows, self.beta, damping=self.damping, max_iter=self.max_iter,
                                  convergence_iter=self.convergence_iter,
                                  max_exact=self.max_exact, retry_damping=self.retry_damping,
                                  seed=self.seed)
            _CACHE[key] = result
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
        if result.failed or not result.converged:
            use_l2 = result.failed or self.fallback == "l2"
            what = ("found no exemplar" if result.failed else
                    f"did not converge in max_iter={self.max_iter} iterations")
            then = ("ranking by L2 norm and keeping the layer's width in adaptive mode"
                    if use_l2 else "using the exemplars of its last iteration")
            warnings.warn(f"EPruner: affinity propagation on {name} ({len(rows)} channels) "
                          f"{what}; {then}", RuntimeWarning, stacklevel=3)
            if use_l2 and result.rep is not None:
                result = EPrunerClustering(None, result.evidence, result.sq_dist, result.norms,
                                           result.converged, result.failed, result.n_iter)
        return result

    def cluster_group(self, group: tp.dependency.Group) -> EPrunerClustering | None:
        """The clustering of a group's root channels (``None`` if it has no weights to cluster)."""
        rows = self.group_rows(group)
        if rows is None:
            logger.debug("EPruner: group at %s has no conv/linear member; left alone", group[0])
            return None
        return self.cluster(rows, _group_name(group))

    def scores(self, clustering: EPrunerClustering) -> torch.Tensor:
        """Per-channel scores of a clustering (see the class docstring for the tiers)."""
        c = clustering
        n = c.n_channels
        if c.rep is None:
            return 1.0 + _tier_rank(c.norms)
        is_ex = c.rep == torch.arange(n)
        out = torch.empty(n)
        if self.order == "evidence":
            out[is_ex] = 1.0 + _tier_rank(c.evidence[is_ex])
            out[~is_ex] = _tier_rank(c.evidence[~is_ex])
        else:
            size = torch.bincount(c.rep, minlength=n).to(torch.float64)
            out[is_ex] = 1.0 + _tier_rank(size[is_ex], c.evidence[is_ex])
            out[~is_ex] = _tier_rank(c.sq_dist[~is_ex], c.evidence[~is_ex])
        return out

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        clustering = self.cluster_group(group)
        return None if clustering is None else self.scores(clustering)


def _group_name(group: tp.dependency.Group) -> str:
    node = group[0].dep.target
    return node._name or type(node.module).__name__


def _check_choice(arg: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, choices))}; got {value!r}")

