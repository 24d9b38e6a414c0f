"""torch-pruning's own criteria, registered by name so every integration can ask for them.

torch-pruning has no name registry (and does not even export FPGM in ``__all__``); these thin
factories give each built-in one stable name with its upstream defaults.
"""

from __future__ import annotations

import torch
import torch_pruning as tp

from ..registry import register_importance
from ..views import CONSUMER_FNS, PRODUCER_FNS, consumer_rows, producer_rows


@register_importance("l1", summary="Group L1 norm of the coupled weights (torch-pruning)")
def l1(group_reduction: str = "mean", normalizer: str = "mean", bias: bool = False):
    """Group L1 magnitude."""
    return tp.importance.GroupMagnitudeImportance(
        p=1, group_reduction=group_reduction, normalizer=normalizer, bias=bias
    )


@register_importance("l2", summary="Group L2 norm of the coupled weights (torch-pruning)")
def l2(group_reduction: str = "mean", normalizer: str = "mean", bias: bool = False):
    """Group L2 magnitude."""
    return tp.importance.GroupMagnitudeImportance(
        p=2, group_reduction=group_reduction, normalizer=normalizer, bias=bias
    )


class _FPGMImportance(tp.importance.FPGMImportance):
    """torch-pruning's FPGM with per-channel rows from :mod:`kcp_plugin.views`.

    Upstream defect (torch-pruning 1.6.1): for a grouped, non-depthwise conv read as a consumer,
    ``FPGMImportance`` calls ``repeat(groups)`` on a 2-D tensor and raises ``RuntimeError``
    ("Number of dimensions of repeat dims can not be smaller..."). The rows here are the same as
    upstream's for every other layer (tested), and a grouped conv's row holds the kernels of its
    own group.
    """

    @torch.no_grad()
    def __call__(self, group, **kwargs):
        scores, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)) or not idxs:
                continue
            rows_of = producer_rows if fn in PRODUCER_FNS else (
                consumer_rows if fn in CONSUMER_FNS else None)
            rows = rows_of(layer) if rows_of else None
            if rows is None or rows.shape[0] <= max(idxs):
                continue
            local = rows[idxs].abs().pow(self.p)
            scores.append(torch.cdist(local[None], local[None], p=2)[0].abs().sum(0))
            roots.append(group[i].root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, roots), self.normalizer)


@register_importance("fpgm", summary="Distance to the geometric median of filters (FPGM)")
def fpgm(p: int = 2, group_reduction: str = "mean", normalizer: str = "mean", bias: bool = False):
    """FPGM as torch-pruning implements it (distances on |w|^p, not on raw weights)."""
    return _FPGMImportance(
        p=p, group_reduction=group_reduction, normalizer=normalizer, bias=bias
    )


@register_importance("taylor", requires_grad=True, summary="First-order Taylor |w * dL/dw|")
def taylor(group_reduction: str = "mean", normalizer: str = "mean", multivariable: bool = False,
           bias: bool = False):
    """Group Taylor importance; needs a backward pass before scoring.

    Upstream defect (torch-pruning 1.6.1): its BatchNorm branch tests for GroupNorm, so BatchNorm
    layers never contribute; conv/linear members still do.
    """
    return tp.importance.GroupTaylorImportance(
        group_reduction=group_reduction, normalizer=normalizer, multivariable=multivariable,
        bias=bias,
    )


class _AccumulatingHessianImportance(tp.importance.GroupHessianImportance):
    """Hessian-diagonal importance whose gradient accumulation really accumulates.

    Upstream defect (torch-pruning 1.6.1): ``accumulate_grad`` tests ``name`` against a dict keyed
    by parameters, so every call overwrites instead of summing. Keyed by parameter here.
    """

    def accumulate_grad(self, model: torch.nn.Module) -> None:
        for param in model.parameters():
            if param.grad is None:
                continue
            sq = param.grad.detach().pow(2)
            if param in self._accu_grad:
                self._accu_grad[param] += sq
                self._counter[param] += 1
            else:
                self._accu_grad[param] = sq.clone()
                self._counter[param] = 1


@register_importance(
    "hessian", requires_grad=True, per_sample_loss=True,
    summary="Diagonal-Hessian (OBD) importance from per-sample grads",
)
def hessian(group_reduction: str = "mean", normalizer: str = "mean", bias: bool = False):
    """Optimal-brain-damage style importance; needs per-sample backward passes."""
    return _AccumulatingHessianImportance(
        group_reduction=group_reduction, normalizer=normalizer, bias=bias
    )


@register_importance("bn", summary="BatchNorm scale |gamma| (network slimming)")
def bn(group_reduction: str = "mean", normalizer: str = "mean"):
    """BatchNorm scaling factors."""
    return tp.importance.BNScaleImportance(group_reduction=group_reduction, normalizer=normalizer)


@register_importance("lamp", summary="Layer-adaptive magnitude pruning (LAMP) scores")
def lamp(p: int = 2, group_reduction: str = "mean", bias: bool = False):
    """LAMP-normalised magnitude."""
    return tp.importance.LAMPImportance(p=p, group_reduction=group_reduction, bias=bias)


class SeededRandomImportance(tp.importance.Importance):
    """Uniform random scores from a private generator, so runs are reproducible."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group, **kwargs):
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self._gen)


@register_importance("random", summary="Uniform random scores (a baseline), seeded")
def random(seed: int = 0):
    """Random baseline."""
    return SeededRandomImportance(seed=seed)
