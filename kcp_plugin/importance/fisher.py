"""Group Fisher pruning (Liu et al., ICML 2021) as a data-driven importance.

A mask ``m_c`` on channel ``c`` has per-sample gradient ``dL_n/dm_c = sum_hw A_n[c] dL_n/dA_n[c]``
at every layer that reads the channel. Channels coupled by the dependency graph (residual adds,
concatenations) share one mask, so the per-sample gradients are summed over all the group's
consumers *before* squaring: ``s_c = sum_n (sum_layers dL_n/dm_c)^2``, accumulated over batches.
The score is then normalised by the cost the channel frees: the memory of the output feature maps
of its producers (the paper's default, best for real speed), or its MACs.

Choices where the paper is open: the activation is the consumer layer's input (post-activation,
as in the authors' code) and the gradient is that layer's share of the input's gradient (the
mask sits at each consumer; a skip path's share arrives through the layers it feeds); a group's
root channel count and coupling come from torch-pruning's dependency graph, built once per
collection from the example inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..graph import ForwardFn, build_graph
from ..registry import register_importance
from ..stats import StatsImportance, per_channel_sum
from ..views import CONSUMER_FNS, NORM_FNS, PRODUCER_FNS

NORMALIZERS = ("memory", "flops", "none")


@register_importance("fisher", requires_data=True,
                     summary="Group Fisher: (sum over coupled layers of act x grad)^2 / cost")
class FisherImportance(StatsImportance):
    """Group Fisher channel importance.

    Args:
        normalize: ``"memory"`` (divide by the output feature-map elements freed), ``"flops"``
            (by the MACs freed) or ``"none"``.
    """

    needs_backward = True

    def __init__(self, normalize: str = "memory"):
        super().__init__()
        if normalize not in NORMALIZERS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZERS)}; "
                             f"got {normalize!r}")
        self.normalize = normalize
        self._groups: list[dict[str, Any]] = []
        self._batch: dict[str, torch.Tensor] = {}
        self._spatial: dict[str, int] = {}
        self._scores: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        super().reset()
        self._batch.clear()
        self._scores = None

    def attach(self, model: nn.Module, example_inputs: Any = None,
               forward_fn: ForwardFn | None = None) -> None:
        if example_inputs is None:
            raise ValueError("fisher couples channels through the dependency graph: pass "
                             "example_inputs to collecting()/collect()")
        self._scores = None
        graph = build_graph(model, example_inputs, forward_fn)
        names = {m: n for n, m in model.named_modules()}
        self._groups = []
        for group in graph.get_all_groups(root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
            members: dict[str, list[tuple[str, list[int], list[int]]]] = {
                "consumer": [], "producer": []}
            for i, (dep, idxs) in enumerate(group):
                root_idxs = group[i].root_idxs
                name = names.get(dep.target.module)
                if name is None or not idxs or None in root_idxs:
                    continue
                fn = dep.pruning_fn
                side = ("consumer" if fn in CONSUMER_FNS else
                        "producer" if fn in PRODUCER_FNS + NORM_FNS else None)
                if side:
                    members[side].append((name, list(idxs), list(root_idxs)))
            if members["consumer"] and members["producer"]:
                self._groups.append({"n": len(group[0].idxs), **members})
        del graph
        self._spatial = {}
        super().attach(model, example_inputs, forward_fn)
        for name, module in model.named_modules():
            if isinstance(module, self.layer_types):
                self._handles.append(module.register_forward_hook(self._make_size_hook(name)))

    def _make_size_hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                spatial = out[0].numel() // out.shape[-1 if isinstance(module, nn.Linear) else 1]
                self._spatial[name] = int(spatial)

        return hook

    def _observe_grad(self, name: str, module: nn.Module, x: torch.Tensor,
                      grad: torch.Tensor) -> None:
        g = per_channel_sum(x * grad.detach(), module).double()
        self._batch[name] = self._batch[name] + g if name in self._batch else g

    def _end_batch(self) -> None:
        if not self._batch:
            return
        for gi, group in enumerate(self._groups):
            v = None
            for name, idxs, root_idxs in group["consumer"]:
                g = self._batch.get(name)
                if g is None or g.shape[1] <= max(idxs):
                    continue
                if v is None:
                    v = torch.zeros(g.shape[0], group["n"], dtype=torch.float64)
                v.index_add_(1, torch.as_tensor(root_idxs), g[:, idxs])
            if v is not None:
                self._add(f"group{gi}", "fisher", v.pow(2).sum(0))
        self._batch.clear()
        self._scores = None

    def _layer_scores(self) -> dict[str, torch.Tensor]:
        """Normalised scores per producer layer, indexed by its own output channels."""
        if self._scores is not None:
            return self._scores
        modules = {n: m for m, n in self._names.items()}
        out: dict[str, torch.Tensor] = {}
        for gi, group in enumerate(self._groups):
            acc = self._sums.get(f"group{gi}", {}).get("fisher")
            if acc is None:
                continue
            cost = torch.zeros(group["n"], dtype=torch.float64)
            for side in ("producer", "consumer"):
                for name, idxs, root_idxs in group[side]:
                    cost.index_add_(0, torch.as_tensor(root_idxs),
                                    torch.full((len(idxs),), self._cost(name, modules, side),
                                               dtype=torch.float64))
            score = acc / cost.clamp_min(1e-12) if self.normalize != "none" else acc
            for name, idxs, root_idxs in group["producer"]:
                module = modules.get(name)
                width = _out_width(module)
                if width is None or width <= max(idxs):
                    continue
                vec = out.setdefault(name, torch.zeros(width, dtype=torch.float64))
                vec[torch.as_tensor(idxs)] = score[torch.as_tensor(root_idxs)]
        self._scores = out
        return out

    def _cost(self, name: str, modules: dict[str, nn.Module], side: str) -> float:
        module = modules.get(name)
        spatial = self._spatial.get(name, 0)
        if self.normalize == "memory":
            # output feature-map elements freed: only conv/linear producers write feature maps
            return float(spatial) if side == "producer" and isinstance(
                module, (nn.modules.conv._ConvNd, nn.Linear)) else 0.0
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            return 0.0
        w = module.weight
        k = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        if side == "producer":  # one filter: fan-in MACs at every output position
            fan_in = w.shape[0 if getattr(module, "transposed", False) else 1]
            return float(fan_in * k * spatial)
        # one input channel of a consumer: its kernels at every output position
        fan_out = w.shape[1] if getattr(module, "transposed", False) else w.shape[0]
        return float(fan_out // getattr(module, "groups", 1) * k * spatial)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        self._require_data()
        scores = self._layer_scores()
        n_root = len(group[0].idxs)
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in PRODUCER_FNS + NORM_FNS:
                continue
            name = self._names.get(dep.target.module)
            vec = scores.get(name)
            root_idxs = group[i].root_idxs
            if vec is None or None in root_idxs or len(vec) != _out_width(dep.target.module):
                continue
            out = torch.zeros(n_root)
            out[torch.as_tensor(root_idxs)] = vec[torch.as_tensor(list(idxs))].float()
            return out
        return None


def _out_width(module: nn.Module | None) -> int | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) else None
