"""Least-squares compensation after a prune, whatever criterion chose the channels.

When a layer loses input channels, its output changes; the best linear repair from the kept
inputs is known in closed form once the statistics of the layer's inputs on the *dense* model are
known (CaP, Xie et al., arXiv 2108.13728): with keep set ``S``, ``A = Cov(x_S)``,
``B = Cov(x_S, x) W^T``, the new weights are ``W' = (A^-1 B)^T`` and the new bias
``b' = b + W mu - W' mu_S``. Only the consumer's own weights and bias change: its output is what is
reconstructed, so a BatchNorm after it sees the same input as before and needs no change.

Usage, around any pruning call::

    with kcp_plugin.compensation.compensating(model, batches, steps=8):
        kcp_plugin.prune(model, x, "kcp", target_macs_ratio=0.5)

or in two steps (``stats`` can also be the :class:`~kcp_plugin.importance.cap.CaPImportance`
that ``prune(..., "cap", data=...)`` used, for a one-step prune)::

    stats = kcp_plugin.compensation.collect_compensation_stats(model, batches, steps=8)
    kcp_plugin.prune(model, x, "l2", pruning_ratio=0.3)
    report = kcp_plugin.compensation.compensate(model, stats)

Which input channels each consumer kept is read from parameter lineage
(:func:`kcp_plugin.tracking.lineage`): ``prune`` always records it, and it composes over several
pruning steps, so compensation also works after iterative pruning (statistics of the dense model,
no training in between). Weights are updated in place: parameter objects (and so optimizers and
lineage) stay valid.

Choices: a layer with a bias is repaired from centred statistics and its bias absorbs the mean
shift; a layer without one (conv before BatchNorm) is repaired from uncentred second moments, so
the least squares also reproduces the mean as well as the kept channels can. ``A`` gets a ridge of
``eps`` times its mean variance. Layouts follow :mod:`kcp_plugin.importance.cap` (patch or
per-channel statistics, blocks); grouped convs are repaired per conv group. Not repaired:
depthwise convs (their input channels are their output channels: nothing is left to repair from;
they are not even hooked) and layers that did not run during the collection (no statistics);
grouped transposed convs are listed in ``skipped`` with the reason.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .consumers import ConsumerLayout, ridge
from .graph import ForwardFn
from .importance.cap import CaPImportance
from .progress import progress_bar
from .stats import StepFn, collect, unwrap_model
from .tracking import lineage

__all__ = ["Compensation", "collect_compensation_stats", "compensate", "compensating"]


def collect_compensation_stats(
    model: nn.Module,
    data: Iterable[Any],
    *,
    steps: int | None = None,
    forward_fn: ForwardFn | None = None,
    step_fn: StepFn | None = None,
    max_dim: int = 576,
    max_positions: int = 2048,
    seed: int = 0,
    progress: bool | None = None,
) -> CaPImportance:
    """Collect the input statistics of every consumer layer of the (dense) ``model``.

    Runs ``steps`` batches of ``data`` in eval mode (see :func:`kcp_plugin.collect`); under
    ``torch.distributed`` the statistics are all-reduced, so every rank compensates identically.
    The returned object keeps references to the layers' current weights (the dense ones the
    repair starts from) until it is deleted.

    Args:
        model: The model before pruning (or its DDP wrapper).
        data: Batches, ``(inputs, targets)`` or inputs.
        steps: Number of batches (default: all).
        forward_fn: How to call the model on a batch's inputs.
        step_fn: ``step_fn(model, batch)`` running the model on a batch (its return value is
            ignored), for batches the default step does not understand.
        max_dim / max_positions / seed: Memory bounds and sampling (see
            :class:`~kcp_plugin.importance.cap.CaPImportance`).
        progress: Show a progress bar (default: only on a terminal).
    """
    stats = CaPImportance(max_dim=max_dim, max_positions=max_positions, seed=seed)
    return collect(model, data, stats, steps=steps, forward_fn=forward_fn, step_fn=step_fn,
                   progress=progress)


@dataclass
class Compensation:
    """The statistics collected by :func:`compensating` and, after the block, what was done.

    Attributes:
        stats: The collected statistics.
        report: Per compensated layer: input channels before/after, the statistics mode, and
            the reconstruction error (fraction of the layer's output energy) without and with
            compensation, as predicted by the statistics. Filled on exit.
        skipped: Layers that lost input channels but were not compensated, with the reason.
    """

    stats: CaPImportance
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def compensating(
    model: nn.Module,
    data: Iterable[Any],
    *,
    steps: int | None = None,
    forward_fn: ForwardFn | None = None,
    step_fn: StepFn | None = None,
    eps: float = 1e-4,
    rescale: bool = False,
    max_dim: int = 576,
    max_positions: int = 2048,
    seed: int = 0,
    progress: bool | None = None,
) -> Iterator[Compensation]:
    """Collect statistics on the dense ``model`` now; compensate the layers pruned in the block.

    The block may prune with any criterion, in one or several steps, through
    :func:`kcp_plugin.prune` (or torch-pruning inside :func:`kcp_plugin.track_pruning`). If the
    block raises, nothing is compensated. Arguments are those of
    :func:`collect_compensation_stats` and :func:`compensate`.
    """
    _check_eps(eps)
    stats = collect_compensation_stats(model, data, steps=steps, forward_fn=forward_fn,
                                       step_fn=step_fn, max_dim=max_dim,
                                       max_positions=max_positions, seed=seed, progress=progress)
    result = Compensation(stats)
    yield result
    report = compensate(model, stats, eps=eps, rescale=rescale, progress=progress,
                        skipped=result.skipped)
    result.report.update(report)


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < 1:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")


def compensate(
    model: nn.Module,
    stats: CaPImportance,
    *,
    eps: float = 1e-4,
    rescale: bool = False,
    progress: bool | None = None,
    skipped: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Repair, by least squares, every consumer of ``model`` that lost input channels since
    ``stats`` were collected.

    Args:
        model: The pruned model (or its DDP wrapper); updated in place.
        stats: Statistics of the model before pruning (:func:`collect_compensation_stats`, or
            the ``CaPImportance`` a one-step ``prune(..., "cap", data=...)`` used).
        eps: Ridge on ``A``, relative to its mean variance.
        rescale: Also rescale each output row so its variance matches the dense layer's (the
            least squares shrinks it); only for layers with a bias.
        progress: Show a progress bar (default: only on a terminal).
        skipped: If given, receives ``{layer: reason}`` for layers that lost input channels but
            were not compensated.

    Returns:
        ``{layer: {"in_before", "in_after", "mode", "error_pruned", "error_compensated"}}``;
        errors are fractions of the layer's output energy predicted by the statistics.

    Raises:
        TypeError / ValueError: ``stats`` is not CaP statistics, or holds none; a layer's
            weights were replaced without lineage (pruned outside ``track_pruning``).
    """
    if not isinstance(stats, CaPImportance):
        raise TypeError(f"stats must be collected by collect_compensation_stats (a "
                        f"CaPImportance), got {type(stats).__name__}")
    _check_eps(eps)
    if not stats.collected or not stats.layer_params():
        raise ValueError("no statistics were collected: run collect_compensation_stats(model, "
                         "data) on the dense model before pruning")
    inner = unwrap_model(model)
    modules = dict(inner.named_modules())
    plans: list[tuple[str, nn.Module, _Kept]] = []
    skipped = {} if skipped is None else skipped
    for name, (w_dense, _) in stats.layer_params().items():
        module = modules.get(name)
        if module is None or module.weight is w_dense:
            continue
        kept = _kept_channels(name, module, w_dense, stats.layout(name))
        if isinstance(kept, str):
            skipped[name] = kept
            continue
        if len(kept.inputs) == stats.layout(name).in_channels:
            continue  # only output channels were removed: nothing to repair
        plans.append((name, module, kept))
    report = {}
    for name, module, kept in progress_bar(plans, enabled=progress, desc="compensating"):
        w_dense, b_dense = stats.layer_params()[name]
        report[name] = _compensate_layer(module, stats, name, w_dense, b_dense, kept, eps,
                                         rescale)
    return report


@dataclass
class _Kept:
    inputs: torch.Tensor  # kept input channels (of the dense layer), sorted
    outputs: torch.Tensor  # kept output channels (of the dense layer), sorted


def _kept_channels(name: str, module: nn.Module, w_dense: torch.Tensor,
                   layout: ConsumerLayout) -> _Kept | str:
    """Which dense input/output channels the current layer holds, from parameter lineage."""
    hops = lineage(module.weight)
    start = next((i for i, (anc, _, _) in enumerate(hops) if anc is w_dense), None)
    if start is None:
        raise ValueError(
            f"the weight of {name!r} was replaced without a record of which channels it kept: "
            "prune with kcp_plugin.prune() (or torch-pruning inside kcp_plugin.track_pruning()) "
            "after collecting the compensation statistics"
        )
    maps = [torch.arange(s) for s in w_dense.shape]
    for _, dim, keep in hops[start:]:
        maps[dim] = maps[dim][keep]
    if layout.kind == "conv_transpose":
        if layout.groups > 1:
            return "grouped transposed conv: not compensated"
        return _Kept(maps[0], maps[1])
    if layout.kind == "linear" or layout.groups == 1:
        return _Kept(maps[1], maps[0])
    cg = layout.in_channels // layout.groups
    rel = maps[1]
    inputs = (torch.arange(layout.groups)[:, None] * cg + rel).reshape(-1)
    return _Kept(inputs, maps[0])


@torch.no_grad()
def _compensate_layer(module: nn.Module, stats: CaPImportance, name: str,
                      w_dense: torch.Tensor, b_dense: torch.Tensor | None, kept: _Kept,
                      eps: float, rescale: bool) -> dict[str, Any]:
    layout = stats.layout(name)
    centred = b_dense is not None
    device = module.weight.device
    w = w_dense.detach().double().cpu()
    if layout.kind == "conv_transpose":
        w = w[:, kept.outputs]
    else:
        w = w[kept.outputs]
    new_w = torch.zeros(module.weight.shape, dtype=torch.float64)
    delta = torch.zeros(len(kept.outputs), dtype=torch.float64)  # bias change per output
    energy = err_pruned = err_comp = 0.0
    keep_set = set(kept.inputs.tolist())
    in_pos = {c: i for i, c in enumerate(kept.inputs.tolist())}  # column in the new weight
    og_dense = w_dense.shape[0] // layout.groups if layout.kind == "conv" else None
    for b, chans in enumerate(layout.blocks):
        mean, cov = stats.moments(name, b, centred)
        mean, cov = mean.cpu(), cov.cpu()
        rows_sel = _block_rows(layout, b, kept, og_dense)
        if rows_sel is not None and len(rows_sel) == 0:
            continue
        wb = layout.block_weight(w if rows_sel is None else w[rows_sel], b) \
            if layout.kind != "conv" else _conv_block_weight(layout, w, b, rows_sel)
        k = layout.dims_per_channel
        local_keep = [j for j, c in enumerate(chans) if c in keep_set]
        dims = (torch.as_tensor(local_keep, dtype=torch.long)[:, None] * k
                + torch.arange(k)).reshape(-1)
        total = float(torch.trace(wb @ cov @ wb.t()))
        a = cov[dims][:, dims]
        a = a + ridge(a, eps) * torch.eye(len(dims), dtype=a.dtype)
        bmat = cov[dims] @ wb.t()  # [|S|, rows]
        w_new = torch.linalg.solve(a, bmat).t() if len(dims) else wb[:, :0]
        kept_dims = set(dims.tolist())
        removed = [d for d in range(cov.shape[0]) if d not in kept_dims]
        wr = wb[:, removed]
        energy += total
        err_pruned += float(torch.trace(wr @ cov[removed][:, removed] @ wr.t()))
        err_comp += total - float(torch.trace(bmat.t() @ w_new.t())) if len(dims) else total
        if rescale and centred and len(dims):
            var_dense = torch.einsum("rd,de,re->r", wb, cov, wb)
            var_new = torch.einsum("rd,de,re->r", w_new, a, w_new)
            w_new = w_new * (var_dense / var_new.clamp_min(1e-30)).sqrt()[:, None]
        shift = wb @ mean - w_new @ mean[dims] if centred else None
        _scatter_block(layout, b, new_w, w_new, [chans[j] for j in local_keep], in_pos,
                       rows_sel, shift, delta, module)
    module.weight.copy_(new_w.to(device=device, dtype=module.weight.dtype))
    if centred and module.bias is not None:
        bias = b_dense.detach().double().cpu()[kept.outputs] + delta
        module.bias.copy_(bias.to(device=device, dtype=module.bias.dtype))
    return {
        "in_before": layout.in_channels, "in_after": len(kept.inputs), "mode": layout.mode,
        "error_pruned": err_pruned / max(energy, 1e-30),
        "error_compensated": err_comp / max(energy, 1e-30),
    }


def _block_rows(layout: ConsumerLayout, b: int, kept: _Kept,
                og_dense: int | None) -> torch.Tensor | None:
    """Positions (among the kept output channels) of the rows block ``b`` maps to: a grouped
    conv's block only writes its own group's outputs. None: all kept outputs."""
    if layout.kind != "conv" or layout.groups == 1:
        return None
    g = layout.block_group(b)
    return torch.nonzero(kept.outputs // og_dense == g).reshape(-1)


def _conv_block_weight(layout: ConsumerLayout, w: torch.Tensor, b: int,
                       rows_sel: torch.Tensor | None) -> torch.Tensor:
    """A conv block's matrix from dense weights whose output rows are already selected."""
    rows = w if rows_sel is None else w[rows_sel]
    cg = layout.in_channels // layout.groups
    chans = torch.as_tensor(layout.blocks[b]) - layout.block_group(b) * cg
    sub = rows.flatten(2)[:, chans]  # [O', n, K]
    if layout.mode == "patch":
        return sub.reshape(sub.shape[0], -1)
    return sub.permute(0, 2, 1).reshape(-1, len(chans))


def _scatter_block(layout: ConsumerLayout, b: int, new_w: torch.Tensor, w_new: torch.Tensor,
                   chans: list[int], in_pos: dict[int, int], rows_sel: torch.Tensor | None,
                   shift: torch.Tensor | None, delta: torch.Tensor, module: nn.Module) -> None:
    """Write a block's solution ``w_new [rows, kept dims]`` into the pruned weight layout and
    add its mean correction to ``delta``."""
    n = len(chans)
    taps = layout.taps
    if layout.kind == "linear":
        cols = [in_pos[c] for c in chans]
        new_w[:, cols] = w_new
        if shift is not None:
            delta += shift
        return
    if layout.kind == "conv_transpose":  # new_w [C_in', O', k...]; w_new [O' * K, n]
        sol = w_new.reshape(-1, taps, n).permute(2, 0, 1)  # [n, O', K]
        new_w[[in_pos[c] for c in chans]] = sol.reshape(n, *new_w.shape[1:])
        if shift is not None:  # interior outputs receive K / prod(stride) taps on average
            delta += shift.reshape(-1, taps).sum(1) / math.prod(module.stride)
        return
    # conv: new_w [O', C'/g, k...]; columns are positions within the group
    g = layout.block_group(b)
    cg_new = new_w.shape[1]
    cols = [in_pos[c] - g * cg_new for c in chans]
    rows = slice(None) if rows_sel is None else rows_sel
    if layout.mode == "patch":
        sol = w_new.reshape(-1, n, taps)  # [rows, n, K]
    else:
        sol = w_new.reshape(-1, taps, n).permute(0, 2, 1)
    view = new_w.flatten(2)
    block = view[rows]
    block[:, cols] = sol
    view[rows] = block
    if shift is not None:
        d = shift if layout.mode == "patch" else shift.reshape(-1, taps).sum(1)
        if rows_sel is None:
            delta += d
        else:
            delta[rows_sel] += d
