"""Compensation-aware pruning (CaP, Xie et al., arXiv 2108.13728) as a data-driven importance.

At every layer that consumes channels (conv / linear), removing input channels changes the
layer's output ``y = W x``; the best linear repair from the kept inputs ``x_S`` is the least
squares solution ``W' = W Cov(x, x_S) Cov(x_S)^-1`` (with the bias absorbing the mean), and what
it cannot repair is the reconstruction loss ``tr(W Cov W^T) - tr(B^T A^-1 B)`` with
``A = Cov(x_S)``, ``B = Cov(x_S, x) W^T``. CaP ranks a consumer's input channels by greedy forward
selection: start from nothing and repeatedly add the channel whose kept inputs reduce the loss
most. With ``R`` the covariance of the inputs conditioned on those already selected (a Schur
complement) and ``F = R W^T``, adding channel ``c`` (its ``k`` input dims ``T``) gains
``tr(R_TT^-1 F_T F_T^T)``, and selecting it updates ``R -= R_:T R_TT^-1 R_T:``,
``F -= R_:T R_TT^-1 F_T``. A channel that is a linear combination of channels already selected
gains nothing: it comes last and is pruned first.

Statistics (float64 sums of the consumer's input features and their outer products) are
collected through :mod:`kcp_plugin.stats`, so they work in any training loop, under DDP (sums are
all-reduced) and on deep copies. Memory is bounded by two knobs:

* ``max_positions``: at most this many positions (pixels x batch) per batch and layer are
  sampled (seeded; re-seeded at every collection, so a collection is reproducible);
* ``max_dim``: no covariance block is larger than ``max_dim`` x ``max_dim``. A conv's features
  are its input *patches* (``C_in/groups * k*k`` dims per conv group, as CaP prescribes) when that
  fits ("patch" mode). Otherwise the layer switches to per-pixel *channel* statistics
  (``C_in/groups`` dims): a conv is then a sum over kernel taps of 1x1 maps, and each tap's term is
  reconstructed separately (the taps are stacked as output rows); this ignores the correlation
  between neighbouring pixels but keeps every channel-to-channel correlation. If even the channels
  do not fit, they are split into contiguous blocks of ``max_dim`` and the covariance is taken
  block-diagonal (the loss then decomposes over blocks, and the greedy runs over all of them).

Other layouts: grouped convs get one block per conv group (a group's outputs only read its own
inputs, so this is exact); depthwise convs are not consumers (their input channels are their
output channels) and are not hooked; transposed convs use channel statistics with stacked taps
(exact when ``stride >= kernel``); a linear layer's features are its input features (after a
flatten, each channel is ``H*W`` features, whose scores are averaged).

A consumer with a bias gets centred statistics (the bias absorbs the mean shift); one without a
bias (conv followed by BatchNorm) gets uncentred second moments, so the mean shift is part of
the loss and of the repair. Per-channel scores are the gains in selection order, divided by the
layer's output energy and made non-increasing (``score="gain"``, comparable across layers for
global pruning), or the selection order itself (``score="rank"``); a group's consumers are
averaged onto its root channels. :mod:`kcp_plugin.compensation` applies the repair after a prune
by any criterion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..consumers import ConsumerLayout, layout_of, ridge, sample_features
from ..registry import register_importance
from ..stats import StatsImportance
from ..views import CONSUMER_FNS, scatter_mean

__all__ = ["CaPImportance", "greedy_selection", "reconstruction_loss"]

SCORES = ("gain", "rank")


def greedy_selection(
    blocks: list[tuple[torch.Tensor, torch.Tensor]], dims_per_channel: int, eps: float = 0.0
) -> tuple[list[tuple[int, int]], list[float]]:
    """Greedy forward selection of input channels by Schur-complement gain.

    Args:
        blocks: ``(cov [D, D], weight [rows, D])`` per independent block; channel ``j`` of a
            block owns dims ``j*k .. j*k+k-1`` (``k = dims_per_channel``).
        dims_per_channel: ``k``.
        eps: Relative ridge on each conditional covariance (see :func:`_ridge`); 0 is exact.

    Returns:
        ``(order, gains)``: ``(block, channel)`` pairs in selection order and the loss reduction
        each one brought when it was selected (their sum is the loss with nothing kept).
    """
    with _single_thread():
        return _greedy(blocks, dims_per_channel, eps)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run a loop of many small dense ops on one intra-op thread: waking the thread pool for
    each op costs more than it gains (10x slower with 2 threads on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _greedy(blocks: list[tuple[torch.Tensor, torch.Tensor]], k: int,
            eps: float) -> tuple[list[tuple[int, int]], list[float]]:
    states = []
    for cov, w in blocks:
        cov = cov.double()
        states.append({"R": cov.clone(), "F": cov @ w.double().t(), "lam": ridge(cov, eps),
                       "left": torch.arange(cov.shape[0] // k), "gains": None})
    eye = torch.eye(k, dtype=torch.float64)

    def block_gains(st: dict) -> torch.Tensor:
        c = st["R"].shape[0] // k
        left = st["left"]
        # diagonal k x k blocks of the remaining channels, and their rows of F
        r = st["R"].view(c, k, c, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)[left]
        f = st["F"].view(c, k, -1)[left]  # [n, k, rows]
        if k == 1:
            return f.pow(2).sum((1, 2)) / (r[:, 0, 0] + st["lam"]).clamp_min(1e-300)
        r = r + st["lam"] * eye
        sol = torch.linalg.lstsq(r, f).solution if st["lam"] == 0 else torch.linalg.solve(r, f)
        return (f * sol).sum((1, 2))

    order: list[tuple[int, int]] = []
    gains: list[float] = []
    while True:
        best = None
        for b, st in enumerate(states):
            if not len(st["left"]):
                continue
            if st["gains"] is None:
                st["gains"] = block_gains(st)
            j = int(st["gains"].argmax())
            if best is None or float(st["gains"][j]) > best[2]:
                best = (b, j, float(st["gains"][j]))
        if best is None:
            return order, gains
        b, j, gain = best
        st = states[b]
        c = int(st["left"][j])
        st["left"] = torch.cat([st["left"][:j], st["left"][j + 1:]])
        order.append((b, c))
        gains.append(gain)
        t = slice(c * k, c * k + k)
        r_t = st["R"][:, t]  # [D, k]
        r_tt = r_t[t] + st["lam"] * eye
        inv = torch.linalg.pinv(r_tt) if st["lam"] == 0 else torch.linalg.inv(r_tt)
        g = r_t @ inv  # [D, k]
        st["F"] -= g @ st["F"][t]
        st["R"] -= g @ r_t.t()
        st["gains"] = None


def reconstruction_loss(cov: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                        eps: float = 0.0) -> float:
    """``tr(W Cov W^T) - tr(B^T A^-1 B)``: what the best repair from dims ``keep`` misses
    (direct formula, for checks)."""
    cov, w = cov.double(), weight.double()
    total = float(torch.trace(w @ cov @ w.t()))
    if len(keep) == 0:
        return total
    a = cov[keep][:, keep]
    a = a + ridge(a, eps) * torch.eye(len(keep), dtype=a.dtype)
    b = cov[keep] @ w.t()
    return total - float(torch.trace(b.t() @ torch.linalg.solve(a, b)))


@register_importance(
    "cap", requires_data=True,
    summary="Compensation-aware: greedy least-squares reconstruction of each consumer (Schur)",
)
class CaPImportance(StatsImportance):
    """Compensation-aware channel importance: greedy least-squares reconstruction per consumer.

    Args:
        max_dim: Largest covariance block (features); see the module docstring for what happens
            beyond it. Memory per layer is at most ``ceil(D / max_dim) * max_dim^2`` float64.
        max_positions: Positions sampled per batch and layer.
        eps: Ridge on conditional covariances, relative to their mean variance.
        score: ``"gain"`` (normalised greedy gains, non-increasing in selection order) or
            ``"rank"`` (selection order only).
        seed: Seed of the position sampling (re-applied at every collection).
        dtype: Precision of the per-batch outer products (the running sums are float64).
    """

    def __init__(self, max_dim: int = 576, max_positions: int = 2048, eps: float = 1e-4,
                 score: str = "gain", seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, value in (("max_dim", max_dim), ("max_positions", max_positions)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.max_dim, self.max_positions, self.eps = max_dim, max_positions, float(eps)
        self.score, self.seed, self.dtype = score, seed, dtype
        self._layouts: dict[str, ConsumerLayout] = {}
        self._params: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._cache: dict[str, tuple[Any, torch.Tensor]] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        super().reset()
        self._layouts.clear()
        self._params.clear()
        self._cache.clear()
        self._generator = torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------ collection
    def _wants(self, name: str, module: nn.Module) -> bool:
        return layout_of(module, self.max_dim) is not None

    def _observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        layout = self._layouts.get(name)
        if layout is None:
            layout = self._layouts[name] = layout_of(module, self.max_dim)
            # The weights the statistics describe, kept for compensation after pruning: the
            # weight object itself (pruning replaces it; lineage leads back to it) and a copy of
            # the bias (pruning input channels keeps the bias object, compensation changes it).
            bias = None if module.bias is None else module.bias.detach().clone()
            self._params[name] = (module.weight, bias)
        feats = sample_features(x, module, layout, self.max_positions, self._generator)
        feats = feats.to(self.dtype)
        self._add(name, "n", torch.tensor(float(feats.shape[0]), dtype=torch.float64,
                                          device=feats.device))
        for b in range(len(layout.blocks)):
            f = feats[:, layout.block_dims(b).to(feats.device)]
            self._add(name, f"s1_{b}", f.sum(0).double())
            self._add(name, f"s2_{b}", (f.t() @ f).double())

    def layout(self, name: str) -> ConsumerLayout | None:
        """The statistics layout of the layer named ``name`` (None if it was not seen)."""
        return self._layouts.get(name)

    def layer_params(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``{layer: (weight, bias)}`` at collection: the weight parameter objects (held until
        :meth:`reset`) and copies of the biases; compensation starts from them."""
        return dict(self._params)

    def moments(self, name: str, b: int, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[D]`` and covariance (or uncentred second moment) ``[D, D]`` of block ``b``."""
        slot = self._sums[name]
        n = float(slot["n"])
        mean = slot[f"s1_{b}"] / n
        second = slot[f"s2_{b}"] / n
        cov = second - torch.outer(mean, mean) if centred else second
        return mean, (cov + cov.t()) / 2

    # ------------------------------------------------------------------ scoring
    def layer_scores(self, module: nn.Module) -> torch.Tensor | None:
        """Per-input-channel scores of a consumer of the bound model (None if not collected
        or if its input width changed since)."""
        name = self._names.get(module)
        layout = self._layouts.get(name) if name is not None else None
        if layout is None or name not in self._sums:
            return None
        now = layout_of(module, self.max_dim)
        if now is None or now.in_channels != layout.in_channels:
            return None
        w = module.weight.detach()
        key = (tuple(w.shape), float(w.double().pow(2).sum()), module.bias is not None)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        centred = module.bias is not None
        blocks = [(self.moments(name, b, centred)[1].cpu(),
                   layout.block_weight(w, b).cpu()) for b in range(len(layout.blocks))]
        order, gains = greedy_selection(blocks, layout.dims_per_channel, self.eps)
        n = len(order)
        scores = torch.zeros(layout.in_channels, dtype=torch.float64)
        if self.score == "rank":
            values = torch.arange(n, 0, -1, dtype=torch.float64) / n
        else:
            energy = sum(float(torch.trace(wb.double() @ c @ wb.double().t()))
                         for c, wb in blocks)
            values = torch.tensor(gains, dtype=torch.float64) / max(energy, 1e-30)
            values = torch.cummin(values.clamp_min(0), 0).values
            # strict order among equal gains (e.g. several fully redundant channels)
            values = values + 1e-9 * torch.arange(n, 0, -1, dtype=torch.float64) / n
        for (b, c), v in zip(order, values):
            scores[layout.blocks[b][c]] = v
        self._cache[name] = (key, scores)
        return scores

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        self._require_data()
        n_root = len(group[0].idxs)
        parts = []
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in CONSUMER_FNS:
                continue
            root_idxs = group[i].root_idxs
            if not idxs or None in root_idxs:
                continue
            scores = self.layer_scores(dep.target.module)
            if scores is None or len(scores) <= max(idxs):
                continue
            parts.append((scores[torch.as_tensor(list(idxs))], root_idxs, 1.0))
        if not parts:
            return None
        return scatter_mean(parts, n_root)
