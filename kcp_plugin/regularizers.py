"""Sparsity regularizers applied between ``backward()`` and ``optimizer.step()``.

GReg-1 / GReg-2 (Wang et al., ICLR 2021), OrthoReg (Lubana et al.) and IncReg act on whole
dependency-graph channels: a channel's penalty reaches every coupled parameter slice (the
producers' filters, biases and norm parameters, and the consumers' kernels that read it), so
coupled layers are regularized together and end up removable together.

Usage in any loop::

    reg = GReg1(model, example_inputs, pruning_ratio=0.5)
    for x, y in data:
        loss = criterion(model(x), y) + reg.loss()   # OrthoReg adds a loss term; others 0
        loss.backward()
        reg.apply()          # adds the penalty gradients (unscale first under AMP)
        optimizer.step(); optimizer.zero_grad()
        reg.step()           # advances the schedule
    kcp_plugin.prune(model, example_inputs, "l1", pruning_ratio=0.5)  # the penalized set goes

Each regularizer's schedule state is saved with ``state_dict`` / restored with
``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .graph import ForwardFn, build_graph, default_forward, output_layers
from .views import CONSUMER_FNS, NORM_FNS, PRODUCER_FNS

__all__ = ["ChannelGroup", "channel_groups", "GReg1", "GReg2", "OrthoReg", "IncReg"]


@dataclass
class ChannelGroup:
    """The parameter slices of one dependency-graph group, per root channel.

    Attributes:
        name: Qualified name of the group's root layer.
        channels: Number of root channels.
        slices: ``(param, dim, local_idx, root_idx)``: ``param.index_select(dim, local_idx)``
            holds the parameters of root channels ``root_idx``.
        producers: ``(param, local_idx, root_idx)`` for producer weights (filters as rows),
            used by OrthoReg.
    """

    name: str
    channels: int
    slices: list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]]
    producers: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]

    def channel_norms(self, p: int = 1) -> torch.Tensor:
        """Group L-p norm (to the power p) of each root channel over all coupled slices."""
        out = torch.zeros(self.channels)
        for param, dim, local, root in self.slices:
            w = param.detach().index_select(dim, local).movedim(dim, 0).reshape(len(local), -1)
            out.index_add_(0, root, w.abs().pow(p).sum(1).float())
        return out

    def add_penalty(self, lam: torch.Tensor) -> None:
        """``grad += lam[c] * w`` on every slice of every root channel ``c`` (an L2 penalty)."""
        for param, dim, local, root in self.slices:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            w = param.detach().index_select(dim, local)
            shape = [1] * w.dim()
            shape[dim] = -1
            scale = lam[root].to(w.dtype).view(shape)
            param.grad.index_add_(dim, local, scale * w)


def _weight_dim(module: nn.Module, out_side: bool) -> int:
    transposed = isinstance(module, nn.modules.conv._ConvNd) and module.transposed
    return (1 if transposed else 0) if out_side else (0 if transposed else 1)


def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: ForwardFn | None = None,
    ignored_layers: list[nn.Module] | None = None,
    protect_outputs: bool = True,
) -> list[ChannelGroup]:
    """The prunable channel groups of ``model`` with their coupled parameter slices.

    Grouped (non-depthwise) convs' input slices are skipped (their in-channel layout is not a
    plain column); depthwise convs are producers like any conv.
    """
    graph = build_graph(model, example_inputs, forward_fn or default_forward)
    ignored = list(ignored_layers or [])
    if protect_outputs:
        ignored += output_layers(graph)
    names = {m: n for n, m in model.named_modules()}
    roots = (nn.modules.conv._ConvNd, nn.Linear)
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=roots):
        root = group[0].dep.target.module
        n = len(group[0].idxs)
        slices, producers = [], []
        for i, (dep, idxs) in enumerate(group):
            module, fn = dep.target.module, dep.pruning_fn
            root_idxs = group[i].root_idxs
            if not isinstance(module, nn.Module) or None in root_idxs or not len(idxs):
                continue
            local = torch.as_tensor(list(idxs), dtype=torch.long)
            ridx = torch.as_tensor(list(root_idxs), dtype=torch.long)
            if fn in PRODUCER_FNS or fn in NORM_FNS:
                weight = getattr(module, "weight", None)
                if isinstance(weight, nn.Parameter):
                    dim = _weight_dim(module, True) if fn in PRODUCER_FNS else 0
                    if not (dim == 1 and getattr(module, "groups", 1) > 1):
                        slices.append((weight, dim, local, ridx))
                        if fn in PRODUCER_FNS and dim == 0:
                            producers.append((weight, local, ridx))
                bias = getattr(module, "bias", None)
                if isinstance(bias, nn.Parameter):
                    slices.append((bias, 0, local, ridx))
            elif fn in CONSUMER_FNS:
                if getattr(module, "groups", 1) > 1:
                    continue
                slices.append((module.weight, _weight_dim(module, False), local, ridx))
        if slices:
            groups.append(ChannelGroup(names.get(root, str(root)), n, slices, producers))
    return groups


class _GroupRegularizer:
    """Shared machinery: the channel groups, the per-channel penalties, the call counter."""

    def __init__(self, model: nn.Module, example_inputs: Any, *, forward_fn: ForwardFn | None,
                 ignored_layers: list[nn.Module] | None):
        self.model = model
        self.groups = channel_groups(model, example_inputs, forward_fn, ignored_layers)
        self.lams = [torch.zeros(g.channels) for g in self.groups]
        self.iteration = 0

    def loss(self) -> torch.Tensor:
        """Extra loss term (0 for gradient-penalty regularizers)."""
        return torch.zeros(())

    @torch.no_grad()
    def apply(self) -> None:
        """Add the penalty gradients; call after ``backward()`` and before ``step()``."""
        for g, lam in zip(self.groups, self.lams):
            if lam.any():
                g.add_penalty(lam)

    def step(self) -> None:
        """Advance the schedule by one iteration."""
        self.iteration += 1

    def state_dict(self) -> dict[str, Any]:
        """Schedule state and penalties (plain tensors and numbers)."""
        return {"iteration": self.iteration, "lams": [lam.clone() for lam in self.lams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (for the same, unpruned model)."""
        if len(state["lams"]) != len(self.lams):
            raise ValueError("regularizer state was saved for a model with other groups")
        self.iteration = int(state["iteration"])
        self.lams = [lam.clone() for lam in state["lams"]]

    def _select(self, ratio: float) -> list[torch.Tensor]:
        """Per group: mask of the ``ratio`` lowest-L1 channels (the set to be pruned)."""
        masks = []
        for g in self.groups:
            norms = g.channel_norms(1)
            k = int(ratio * g.channels)
            mask = torch.zeros(g.channels, dtype=torch.bool)
            if k:
                mask[torch.argsort(norms, stable=True)[:k]] = True
            masks.append(mask)
        return masks


class GReg1(_GroupRegularizer):
    """GReg-1: a growing L2 penalty on a fixed set of channels chosen by L1 at the start.

    Every ``interval`` iterations the penalty grows by ``delta`` up to ``cap``; then it is held
    for ``stabilize`` iterations; then :attr:`done` is true and the set can be removed
    (``kcp_plugin.prune(model, x, "l1", pruning_ratio=ratio)`` removes exactly those channels,
    whose magnitudes are by then far below the rest).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, pruning_ratio: float = 0.5, *,
                 delta: float = 1e-4, cap: float = 1.0, interval: int = 10,
                 stabilize: int = 100, forward_fn: ForwardFn | None = None,
                 ignored_layers: list[nn.Module] | None = None):
        _check(pruning_ratio, delta, cap, interval)
        super().__init__(model, example_inputs, forward_fn=forward_fn,
                         ignored_layers=ignored_layers)
        self.pruning_ratio, self.delta, self.cap = pruning_ratio, delta, cap
        self.interval, self.stabilize = interval, stabilize
        self.masks = self._select(pruning_ratio)
        self.penalty = 0.0
        self._capped_at: int | None = None

    @property
    def phase(self) -> str:
        """``"grow"``, ``"stabilize"`` or ``"done"``."""
        if self._capped_at is None:
            return "grow"
        return "stabilize" if self.iteration < self._capped_at + self.stabilize else "done"

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def step(self) -> None:
        super().step()
        if self._capped_at is None and self.iteration % self.interval == 0:
            self.penalty = min(self.cap, self.penalty + self.delta)
            if self.penalty >= self.cap:
                self._capped_at = self.iteration
        self.lams = [mask.float() * self.penalty for mask in self.masks]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "penalty": self.penalty, "capped_at": self._capped_at,
                "masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.penalty, self._capped_at = float(state["penalty"]), state["capped_at"]
        self.masks = [m.clone() for m in state["masks"]]


class GReg2(GReg1):
    """GReg-2: first a uniform growing penalty on every channel (``delta_uniform`` steps up to
    ``cap_uniform``) so magnitudes separate, then select the set by L1 and continue as GReg-1.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, pruning_ratio: float = 0.5, *,
                 delta_uniform: float = 1e-5, cap_uniform: float = 1e-2, **kwargs: Any):
        super().__init__(model, example_inputs, pruning_ratio, **kwargs)
        self.delta_uniform, self.cap_uniform = delta_uniform, cap_uniform
        self.uniform = 0.0
        self.selected = False

    @property
    def phase(self) -> str:
        return "uniform" if not self.selected else super().phase

    def step(self) -> None:
        if self.selected:
            return super().step()
        _GroupRegularizer.step(self)
        if self.iteration % self.interval == 0:
            self.uniform = min(self.cap_uniform, self.uniform + self.delta_uniform)
        if self.uniform >= self.cap_uniform:
            self.masks = self._select(self.pruning_ratio)  # now magnitudes are separated
            self.selected = True
            self.lams = [mask.float() * self.penalty for mask in self.masks]
        else:
            self.lams = [torch.full((g.channels,), self.uniform) for g in self.groups]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "uniform": self.uniform, "selected": self.selected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.uniform, self.selected = float(state["uniform"]), bool(state["selected"])


class IncReg(_GroupRegularizer):
    """IncReg: per-channel penalties that grow incrementally by relative unimportance.

    Every ``interval`` iterations, channels are ranked by L1 within their group; a channel
    ranked ``r`` (0 = least important) among the ``k = ratio * C`` to remove gets
    ``delta * (1 - r / k)`` more penalty, the others none; penalties are capped at ``cap``.
    Channels whose penalty reached the cap are the ones to prune (:attr:`done` when all are).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, pruning_ratio: float = 0.5, *,
                 delta: float = 1e-4, cap: float = 1.0, interval: int = 10,
                 forward_fn: ForwardFn | None = None,
                 ignored_layers: list[nn.Module] | None = None):
        _check(pruning_ratio, delta, cap, interval)
        super().__init__(model, example_inputs, forward_fn=forward_fn,
                         ignored_layers=ignored_layers)
        self.pruning_ratio, self.delta, self.cap, self.interval = pruning_ratio, delta, cap, \
            interval

    def increments(self) -> list[torch.Tensor]:
        """This update's penalty increments per group (from the current weights)."""
        out = []
        for g in self.groups:
            k = int(self.pruning_ratio * g.channels)
            rank = torch.argsort(torch.argsort(g.channel_norms(1), stable=True))
            inc = torch.zeros(g.channels)
            if k:
                low = rank < k
                inc[low] = self.delta * (1 - rank[low].float() / k)
            out.append(inc)
        return out

    def step(self) -> None:
        super().step()
        if self.iteration % self.interval == 0:
            self.lams = [(lam + inc).clamp_max(self.cap)
                         for lam, inc in zip(self.lams, self.increments())]

    @property
    def done(self) -> bool:
        return all(int((lam >= self.cap).sum()) >= int(self.pruning_ratio * len(lam))
                   for lam in self.lams)


class OrthoReg(_GroupRegularizer):
    """OrthoReg: ``weight * sum_g lambda_g ||F_g F_g^T - I||_1`` as an extra loss.

    ``F_g`` holds one row per channel of group ``g`` (its producers' filters, concatenated);
    ``lambda_g`` is proportional to ``sqrt(channels)``, normalised to sum to 1. Train without
    weight decay, as the method prescribes.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, weight: float = 1e-2, *,
                 forward_fn: ForwardFn | None = None,
                 ignored_layers: list[nn.Module] | None = None):
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        super().__init__(model, example_inputs, forward_fn=forward_fn,
                         ignored_layers=ignored_layers)
        self.weight = weight
        sizes = torch.tensor([float(g.channels) for g in self.groups]).sqrt()
        self.group_weights = (sizes / sizes.sum()).tolist() if len(sizes) else []

    def filters(self, g: ChannelGroup) -> torch.Tensor | None:
        """``[channels, features]`` rows of the group's producer filters (differentiable)."""
        parts = []
        for param, local, root in g.producers:
            rows = param.index_select(0, local).flatten(1)
            full = rows.new_zeros(g.channels, rows.shape[1]).index_add(0, root, rows)
            parts.append(full)
        return torch.cat(parts, 1) if parts else None

    def loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for g, lam in zip(self.groups, self.group_weights):
            f = self.filters(g)
            if f is None:
                continue
            gram = f @ f.t()
            eye = torch.eye(g.channels, dtype=gram.dtype)
            total = total + lam * (gram - eye).abs().sum()
        return self.weight * total


def _check(ratio: float, delta: float, cap: float, interval: int) -> None:
    if not 0 < ratio < 1:
        raise ValueError(f"pruning_ratio must be in (0, 1), got {ratio}")
    if delta <= 0 or cap <= 0:
        raise ValueError("delta and cap must be > 0")
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
