"""Affinity Propagation (Frey & Dueck 2007) on torch tensors, for EPruner's exemplar filters.

The message passing follows scikit-learn's ``affinity_propagation`` (responsibility /
availability updates with damping, convergence when the exemplar set is stable for
``convergence_iter`` iterations); the similarity and preference helpers follow EPruner's code
(lmbxmu/EPruner): negative squared distances, preference ``beta`` times the column median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["APResult", "affinity_propagation", "check_ap_settings", "column_median",
           "median_preference", "squared_distance_similarity"]


@dataclass(frozen=True)
class APResult:
    """Outcome of :func:`affinity_propagation`.

    Attributes:
        exemplars: Sorted indices of the exemplars (empty when none emerged).
        labels: For every point, the index into ``exemplars`` of its cluster (``-1`` if none).
        evidence: ``r(i, i) + a(i, i)`` after the last iteration: positive for exemplars, and
            the higher, the closer a point is to becoming one.
        n_iter: Iterations run.
        converged: The exemplar set stayed the same for ``convergence_iter`` iterations.
    """

    exemplars: torch.Tensor
    labels: torch.Tensor
    evidence: torch.Tensor
    n_iter: int
    converged: bool


def affinity_propagation(
    similarity: torch.Tensor,
    preference: torch.Tensor | float,
    *,
    damping: float = 0.5,
    max_iter: int = 200,
    convergence_iter: int = 15,
    noise: torch.Tensor | None = None,
    seed: int = 0,
) -> APResult:
    """Affinity Propagation on a precomputed similarity matrix (Frey & Dueck, 2007).

    The message updates, the convergence test, the tie-breaking noise and the final refinement
    of the exemplars follow scikit-learn's ``affinity_propagation`` step by step, so that with
    the same noise the two give the same clustering (tested).

    Args:
        similarity: ``[n, n]`` similarities (higher = more alike); the diagonal is ignored.
        preference: Per-point preference ``[n]`` (or one number), placed on the diagonal.
        damping: Message damping in ``[0.5, 1)``.
        max_iter: Maximum number of iterations.
        convergence_iter: Iterations the exemplar set must stay unchanged to stop.
        noise: ``[n, n]`` standard-normal draws for the tie-breaking jitter
            (``(eps * S + 100 * tiny) * noise``); by default drawn from a generator seeded with
            ``seed``.
        seed: Seed of the default noise.

    Returns:
        An :class:`APResult`. If no exemplar emerged, ``exemplars`` is empty and every label
        is ``-1`` (the caller decides what to do: see :class:`EPrunerImportance`).
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {tuple(similarity.shape)}")
    check_ap_settings(damping, max_iter, convergence_iter)
    n = similarity.shape[0]
    dt = torch.float64
    S = similarity.to(dt).clone()
    pref = torch.as_tensor(preference, dtype=dt).expand(n).clone()
    ind = torch.arange(n)
    if n == 1 or _all_equal(S, pref):
        # Nothing to cluster: every point its own exemplar, or one cluster (as scikit-learn).
        if pref[0] > S[0, n - 1]:
            return APResult(ind.clone(), ind.clone(), torch.zeros(n, dtype=dt), 0, True)
        labels = torch.zeros(n, dtype=torch.long)
        return APResult(torch.zeros(1, dtype=torch.long), labels, torch.zeros(n, dtype=dt), 0,
                        True)
    S.diagonal().copy_(pref)
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, n, generator=gen, dtype=dt)
    finfo = torch.finfo(dt)
    S += (finfo.eps * S + finfo.tiny * 100) * noise.to(dt)

    A = torch.zeros(n, n, dtype=dt)
    R = torch.zeros(n, n, dtype=dt)
    tmp = torch.empty(n, n, dtype=dt)
    history = torch.zeros(n, convergence_iter, dtype=torch.bool)
    converged = False
    it = 0
    for it in range(max_iter):
        # responsibilities
        torch.add(A, S, out=tmp)
        Y, best_k = tmp.max(dim=1)
        tmp[ind, best_k] = -math.inf
        Y2 = tmp.max(dim=1).values
        torch.sub(S, Y[:, None], out=tmp)
        tmp[ind, best_k] = S[ind, best_k] - Y2
        R.mul_(damping).add_(tmp, alpha=1 - damping)
        # availabilities
        torch.clamp(R, min=0, out=tmp)
        tmp.diagonal().copy_(R.diagonal())
        tmp -= tmp.sum(0)
        dA = tmp.diagonal().clone()
        tmp.clamp_(min=0)
        tmp.diagonal().copy_(dA)
        A.mul_(damping).sub_(tmp, alpha=1 - damping)
        # convergence: the exemplar set unchanged for convergence_iter iterations
        E = (A.diagonal() + R.diagonal()) > 0
        history[:, it % convergence_iter] = E
        if it >= convergence_iter:
            se = history.sum(1)
            stable = int(((se == convergence_iter) | (se == 0)).sum()) == n
            if stable and bool(E.any()):
                converged = True
                break
    evidence = A.diagonal() + R.diagonal()
    centres = E.nonzero().flatten()
    k = len(centres)
    if k == 0:
        return APResult(centres, torch.full((n,), -1, dtype=torch.long), evidence, it + 1,
                        converged)
    # Assign every point to its most similar exemplar, then move each cluster's exemplar to the
    # member with the largest summed similarity to its cluster (scikit-learn's refinement).
    c = S[:, centres].argmax(1)
    c[centres] = torch.arange(k)
    within = torch.zeros(k, n, dtype=dt).index_add_(0, c, S).gather(0, c[None]).squeeze(0)
    best = torch.full((k,), -math.inf, dtype=dt).scatter_reduce(0, c, within, "amax")
    first = torch.where(within == best[c], ind, torch.full_like(ind, n))
    centres = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, c, first, "amin")
    c = S[:, centres].argmax(1)
    c[centres] = torch.arange(k)
    labels = centres[c]
    exemplars = torch.unique(labels)
    labels = torch.searchsorted(exemplars, labels)
    return APResult(exemplars, labels, evidence, it + 1, converged)


def _all_equal(S: torch.Tensor, pref: torch.Tensor) -> bool:
    n = S.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    vals = S[off]
    return bool((pref == pref[0]).all()) and (len(vals) == 0 or bool((vals == vals[0]).all()))


def check_ap_settings(damping: float, max_iter: int, convergence_iter: int) -> None:
    """Validate Affinity Propagation's settings (as scikit-learn does).

    Raises:
        ValueError: ``damping`` outside [0.5, 1), or an iteration count below 1.
    """
    if not isinstance(damping, (int, float)) or not 0.5 <= damping < 1:
        raise ValueError(f"damping must be in [0.5, 1), got {damping!r}")
    for name, value in (("max_iter", max_iter), ("convergence_iter", convergence_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def squared_distance_similarity(
    x: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.Tensor:
    """``S[i, j] = -||x_i - x_j||^2`` (float64) for the given row / column index sets.

    Computed by one matrix product; entries whose indices coincide are exactly zero.
    """
    x = x.to(torch.float64)
    a = x if rows is None else x[rows]
    b = x if cols is None else x[cols]
    sq_a, sq_b = a.pow(2).sum(1), b.pow(2).sum(1)
    d = torch.addmm(sq_a[:, None] + sq_b[None], a, b.t(), alpha=-2).clamp_(min=0)
    ia = torch.arange(len(x)) if rows is None else rows
    ib = torch.arange(len(x)) if cols is None else cols
    d[ia[:, None] == ib[None]] = 0.0
    return d.neg_()


def median_preference(x: torch.Tensor, beta: float, block: int = 1024) -> torch.Tensor:
    """``beta * median_i S(i, j)`` for every column ``j`` (numpy's median: mean of the middle two).

    Columns are processed in blocks of ``block``, so memory stays ``O(n * block)``.
    """
    n = len(x)
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, block):
        cols = torch.arange(start, min(start + block, n))
        out[cols] = column_median(squared_distance_similarity(x, cols=cols))
    return beta * out


def column_median(s: torch.Tensor) -> torch.Tensor:
    """The median of every column of ``s`` (``[n, m]`` -> ``[m]``; the mean of the two middle
    values for even ``n``, as numpy's median)."""
    n = s.shape[0]
    lo = s.kthvalue((n - 1) // 2 + 1, dim=0).values
    if n % 2:
        return lo
    return (lo + s.kthvalue(n // 2 + 1, dim=0).values) / 2


# --------------------------------------------------------------------------- clustering of rows
