"""Kernel Cluster Pruning (KCP) as a torch-pruning importance.

Our reading of Yu et al. (arXiv 2101.06686), see ``docs/kcp.md``: the *kernel cluster* of
input channel ``c`` of a layer is the set of kernels ``W[:, c]`` that read it. Removing the
cluster removes channel ``c`` everywhere it is coupled, so KCP maps onto torch-pruning's group
unit. A cluster the rest of the layer represents well is redundant and is pruned first.

Variants (``centre``):

* ``"mean"`` (default, registry name ``kcp``): distance to the layer's mean kernel cluster. It
  measured best of the three on the dense-labeling benchmark (docs/benchmarks.md), though it
  ranks channels much like L2 magnitude (Spearman 0.7 there, 0.95-1.0 in kcp.md's study).
* ``"representative"`` (``kcp_representative``): ``K`` = the number of channels to keep;
  repeatedly remove the kernel cluster best represented by (closest to) a remaining one, until
  ``K`` remain. Kept clusters are representatives; the others are scored by their distance to
  their representative (closest pruned first). Duplicates are pruned down to one copy.
* ``"kmeans"``: distance to the nearest k-means centroid (``n_clusters``). Note that a singleton's
  distance is 0, so the most unique cluster looks most redundant; kept for comparison.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch_pruning as tp

from ..registry import register_importance
from ..views import member_views, scatter_mean

logger = logging.getLogger(__name__)

CENTRES = ("representative", "mean", "kmeans")
PRUNE_ORDERS = ("near", "far")
SIDES = ("consumer", "both")


def _project(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection of the rows of ``x`` to ``dim`` features (if wider).

    Pairwise distances are computed on the projection (distances are preserved up to a small
    distortion); identical rows stay identical, so duplicates are still found exactly.
    """
    if x.shape[1] <= dim:
        return x
    return x @ _projection(x.shape[1], dim, seed)


@functools.lru_cache(maxsize=64)
def _projection(features: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(features, dim, generator=gen) / math.sqrt(dim)


def kmeans(x: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic Lloyd k-means.

    Initial centroids are rows at evenly spaced ranks of the distance to the mean (no random
    state); empty clusters are re-seeded with the rows farthest from their centroid.

    Args:
        x: ``[n, d]`` rows.
        k: Number of clusters, ``1 <= k <= n``.
        iters: Lloyd iterations (stops early once assignments no longer change).

    Returns:
        ``(labels [n], centroids [k, d])``.
    """
    n = x.shape[0]
    k = max(1, min(k, n))
    order = torch.argsort((x - x.mean(0)).norm(dim=1), stable=True)
    pick = torch.linspace(0, n - 1, k).round().long()
    centroids = x[order[pick]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    x_sq = x.pow(2).sum(1, keepdim=True)
    for _ in range(iters):
        # squared distances by one matmul (cdist is ~2x slower on CPU)
        dist = torch.addmm(centroids.pow(2).sum(1)[None], x, centroids.t(), alpha=-2).add_(x_sq)
        new_labels = dist.argmin(1)
        counts = torch.bincount(new_labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            own = dist.gather(1, new_labels[:, None]).squeeze(1)
            far = torch.argsort(own, descending=True, stable=True)[: len(empty)]
            new_labels[far] = empty[: len(far)]
            counts = torch.bincount(new_labels, minlength=k)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts.clamp_min(1)[:, None].to(x.dtype)
    return labels, centroids


def greedy_representatives(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` representative rows by repeatedly removing the best-represented row.

    A row is removed when its nearest remaining neighbour is closer than any other row's; the
    neighbour stays and becomes its representative. Rounds remove many rows at once (those
    still to go, closest first, skipping any whose representative is removed in the same
    round), and only rows that lost their nearest neighbour look for a new one, so the cost is
    about one pairwise-distance matrix.

    Args:
        x: ``[n, d]`` rows (kernel clusters, possibly projected).
        k: How many rows to keep, ``1 <= k <= n``.

    Returns:
        ``(rep [n], scores [n])``: ``rep`` is a kept row's own index, or for a removed row its
        nearest remaining row when it was removed (its representative at that point).
        ``scores`` is a removed row's distance to that representative; kept rows score above
        every removed row, plus their distance to the nearest other kept row.
    """
    n = x.shape[0]
    sq = x.pow(2).sum(1)
    # ||x_i - x_j||^2 - ||x_i||^2: the row-constant term does not change any row's arg-min
    dist = torch.addmm(sq[None], x, x.t(), alpha=-2)
    dist.fill_diagonal_(float("inf"))
    alive = torch.ones(n, dtype=torch.bool)
    nearest_at_removal = torch.arange(n)
    index = torch.arange(n)
    # Each row's few nearest neighbours, so that a row whose neighbour is removed usually
    # finds its next one without another pass over the whole matrix.
    m = min(8, n - 1)
    knn_d, knn_i = dist.topk(m, dim=1, largest=False)
    knn_d += sq[:, None]
    nn_d, nn_i = knn_d[:, 0].clone(), knn_i[:, 0].clone()
    remaining = n
    while remaining > k:
        # One sequential pass in closeness order: a row goes if its nearest neighbour is still
        # there to represent it. Rows whose neighbour went in this pass wait for the next round,
        # with their next nearest neighbour among the rows still alive.
        order = torch.argsort(nn_d, stable=True)[: remaining - k].tolist()
        nearest = nn_i.tolist()
        keep = alive.tolist()
        chosen = []
        for i in order:
            if keep[nearest[i]]:
                keep[i] = False
                chosen.append(i)
        chosen = torch.tensor(chosen, dtype=torch.long)
        alive[chosen] = False
        nearest_at_removal[chosen] = nn_i[chosen]
        nn_d[chosen] = float("inf")
        remaining -= len(chosen)
        stale = (alive & ~alive[nn_i]).nonzero().flatten()
        if len(stale):
            listed = alive[knn_i[stale]]
            found = listed.any(1)
            first = listed.to(torch.int8).argmax(1)
            hit, miss = stale[found], stale[~found]
            nn_i[hit] = knn_i[hit, first[found]]
            nn_d[hit] = knn_d[hit, first[found]]
            if len(miss):  # all listed neighbours gone: search the whole row
                sub = dist[miss].masked_fill_(~alive[None], float("inf"))
                d_min, nn_i[miss] = sub.min(1)
                nn_d[miss] = d_min + sq[miss]
    rep = torch.where(alive, index, nearest_at_removal)
    # Removed rows: distance to their representative at removal (removal order is kept:
    # closest pruned first). Kept rows rank above all of them; among themselves the least
    # distinct (closest to another kept row) go first if pruning must go that far.
    gone = (~alive).nonzero().flatten()
    scores = torch.zeros(n)
    # exact distances (the matmul form of the pairwise distances cancels badly near zero)
    scores[gone] = torch.linalg.vector_norm(x[gone] - x[rep[gone]], dim=1)
    top = scores.max()
    distinct = nn_d.clamp_min(0).sqrt().nan_to_num(posinf=0.0)
    scores[alive] = top + 1e-6 + distinct[alive]
    return rep, scores


@register_importance("kcp", summary="Kernel Cluster Pruning (default: mean-centre variant)")
class KCPImportance(tp.importance.Importance):
    """Kernel Cluster Pruning importance for torch-pruning groups (low score = pruned first).

    Per consumer layer of a group, every kernel cluster (input channel) is scored by how well the
    layer's other clusters represent it, scores are normalised per layer (divided by their mean),
    averaged over the group's members and scattered onto the group's root channels.

    Args:
        centre: ``"representative"``, ``"mean"`` or ``"kmeans"`` (see the module docstring).
        prune: ``"near"`` prunes clusters close to their centre first (redundant ones);
            ``"far"`` prunes outliers first. ``"far"`` needs ``centre`` ``"mean"`` or ``"kmeans"``.
        sides: ``"consumer"`` scores the kernel clusters only (KCP proper); ``"both"`` mixes in
            the producers' filters, scored the same way, with weight ``producer_weight``.
        keep_ratio: Fraction of each layer's channels expected to survive; sets ``K`` for the
            representative variant. ``None`` (default) follows the pruning step:
            :func:`kcp_plugin.prune` sets ``keep_ratio_hint`` before every step (0.5 if used
            with a torch-pruning pruner directly).
        n_clusters: Fixed ``K`` for the k-means variants (overrides ``keep_ratio``).
        producer_weight: Weight of producer scores when ``sides="both"``, in ``[0, 1]``.
        projection_dim: Rows wider than this are randomly projected for the k-means assignment.
        kmeans_iters: Lloyd iterations.
        seed: Seed of the projection (the only randomness), for determinism.
    """

    def __init__(
        self,
        centre: str = "mean",
        prune: str = "near",
        sides: str = "consumer",
        keep_ratio: float | None = None,
        n_clusters: int | None = None,
        producer_weight: float = 0.5,
        projection_dim: int = 64,
        kmeans_iters: int = 10,
        seed: int = 0,
    ):
        _check_choice("centre", centre, CENTRES)
        _check_choice("prune", prune, PRUNE_ORDERS)
        _check_choice("sides", sides, SIDES)
        if centre == "representative" and prune == "far":
            raise ValueError(
                "prune='far' is defined for centre='mean' or 'kmeans'; the representative "
                "variant always keeps each cluster's representative"
            )
        if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if n_clusters is not None and n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if not 0.0 <= producer_weight <= 1.0:
            raise ValueError(f"producer_weight must be in [0, 1], got {producer_weight}")
        if projection_dim < 1 or kmeans_iters < 1:
            raise ValueError("projection_dim and kmeans_iters must be >= 1")
        self.centre = centre
        self.prune = prune
        self.sides = sides
        self.keep_ratio = keep_ratio
        # Used when keep_ratio is None; kcp_plugin.prune() sets it before every pruning step.
        self.keep_ratio_hint = 0.5
        self.n_clusters = n_clusters
        self.producer_weight = producer_weight
        self.projection_dim = projection_dim
        self.kmeans_iters = kmeans_iters
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"KCPImportance(centre={self.centre!r}, prune={self.prune!r}, sides={self.sides!r}, "
            f"keep_ratio={self.keep_ratio}, n_clusters={self.n_clusters})"
        )

    def layer_scores(self, rows: torch.Tensor) -> torch.Tensor:
        """Score every row (kernel cluster or filter) of one layer; mean-normalised, >= 0."""
        n = rows.shape[0]
        if n == 1:
            return torch.ones(1)
        if self.centre == "mean":
            d = (rows - rows.mean(0)).norm(dim=1)
        else:
            xp = _project(rows, self.projection_dim, self.seed)
            if self.n_clusters is not None:
                k = self.n_clusters
            elif self.centre == "kmeans":
                k = math.ceil(math.sqrt(n))
            else:
                keep = self.keep_ratio if self.keep_ratio is not None else self.keep_ratio_hint
                k = round(n * keep)
            k = max(1, min(k, n))
            if self.centre == "kmeans":
                labels, centroids = kmeans(xp, k, self.kmeans_iters)
                d = (xp - centroids[labels]).norm(dim=1)
            else:
                d = greedy_representatives(xp, k)[1]
        if self.prune == "far":
            d = d.max() + d.min() - d
        mean = d.mean()
        return d / mean if mean > 0 else torch.ones(n)

    def _cached_layer_scores(self, view) -> torch.Tensor:
        # A layer can sit in several groups (DenseNet's concatenations: one 1024-channel layer
        # in up to 25); torch-pruning scores all groups of a step before pruning any, so scores
        # keyed on the weight's identity and version are exact within a step.
        w = view.layer.weight
        keep = self.keep_ratio if self.keep_ratio is not None else self.keep_ratio_hint
        key = (id(view.layer), view.side, w.data_ptr(), w._version, tuple(w.shape), keep)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            if len(cache) > 4096:
                cache.clear()
            cache[key] = self.layer_scores(view.rows)
        return cache[key]

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        consumers = member_views(group, ("consumer",))
        used = consumers
        if self.sides == "both" or not consumers:
            used = consumers + member_views(group, ("producer",))
            if not consumers and used:
                logger.debug("KCP: group at %s has no consumer; scoring its filters", group[0])
        if not used:
            norms = member_views(group, ("norm",))
            if not norms:
                logger.debug("KCP: group at %s has no scorable member; left alone", group[0])
                return None
            logger.debug("KCP: group at %s has only norm layers; using |gamma|", group[0])
            parts = [(v.rows[v.idxs, 0].abs(), v.root_idxs, 1.0) for v in norms]
            return scatter_mean(parts, len(group[0].idxs))
        parts = []
        n_cons = sum(v.side == "consumer" for v in used)
        n_prod = len(used) - n_cons
        for v in used:
            scores = self._cached_layer_scores(v)[v.idxs]
            if n_cons and n_prod:
                share = 1.0 - self.producer_weight if v.side == "consumer" else self.producer_weight
                weight = share / (n_cons if v.side == "consumer" else n_prod)
            else:
                weight = 1.0
            parts.append((scores, v.root_idxs, weight))
        return scatter_mean(parts, len(group[0].idxs))


def _check_choice(arg: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, choices))}; got {value!r}")


register_importance(
    "kcp_representative", summary="KCP, keep K representative kernel clusters per layer"
)(functools.partial(KCPImportance, centre="representative"))
register_importance("kcp_mean", summary="KCP, distance to the layer's mean kernel cluster")(
    functools.partial(KCPImportance, centre="mean")
)
register_importance("kcp_kmeans", summary="KCP, distance to the nearest k-means centroid")(
    functools.partial(KCPImportance, centre="kmeans")
)
