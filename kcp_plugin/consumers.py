"""Consumer statistics: how a layer that reads a pruned channel sees its input features.

Shared by CaP (:mod:`kcp_plugin.importance.cap`, which scores channels by how well the
remaining ones reconstruct a consumer's output) and by least-squares compensation
(:mod:`kcp_plugin.compensation`, which repairs consumers after any prune): both collect the
covariance of each consumer's input features in the layout below and solve ridge-regularised
least squares on it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConsumerLayout", "layout_of", "ridge", "sample_features"]


@dataclass(frozen=True)
class ConsumerLayout:
    """How a consumer's input features are laid out in the collected statistics.

    Attributes:
        kind: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
        mode: ``"patch"`` (features are ``channel x tap``, channel-major) or ``"channel"`` (one
            feature per channel; kernel taps are stacked as extra output rows).
        in_channels: Input channels (features for linear layers) when collected.
        groups: Conv groups (1 for linear).
        taps: Kernel taps ``prod(kernel_size)`` (1 for linear).
        blocks: Input channels of each covariance block; a block never spans conv groups.
    """

    kind: str
    mode: str
    in_channels: int
    groups: int
    taps: int
    blocks: tuple[tuple[int, ...], ...]

    @property
    def dims_per_channel(self) -> int:
        """Feature dims one input channel occupies."""
        return self.taps if self.mode == "patch" else 1

    def block_group(self, b: int) -> int:
        """The conv group of block ``b``."""
        return self.blocks[b][0] // (self.in_channels // self.groups)

    def block_weight(self, weight: torch.Tensor, b: int) -> torch.Tensor:
        """``[rows, dims]`` matrix mapping block ``b``'s features to its output rows.

        Rows are the output channels of the block's conv group (times the taps in channel mode);
        ``weight`` may have lost output channels, but not input channels.
        """
        chans = torch.as_tensor(self.blocks[b], device=weight.device)
        g = self.block_group(b)
        cg = self.in_channels // self.groups
        w = weight.detach()
        if self.kind == "linear":
            return w[:, chans]
        if self.kind == "conv_transpose":  # [C_in, O/g, k...]: input channel c owns w[c]
            sub = w[chans].flatten(2)  # [n, O/g, K]
            return sub.permute(1, 2, 0).reshape(-1, len(chans))
        og = w.shape[0] // self.groups
        rows = w[g * og:(g + 1) * og].flatten(2)[:, chans - g * cg]  # [Og, n, K]
        if self.mode == "patch":
            return rows.reshape(og, -1)
        return rows.permute(0, 2, 1).reshape(-1, len(chans))

    def block_dims(self, b: int) -> torch.Tensor:
        """Indices of block ``b``'s features among the layer's sampled features."""
        k = self.dims_per_channel
        chans = torch.as_tensor(self.blocks[b])
        return (chans[:, None] * k + torch.arange(k)).reshape(-1)


def layout_of(module: nn.Module, max_dim: int) -> ConsumerLayout | None:
    """The statistics layout of a consumer under the covariance bound ``max_dim`` (None: the
    layer is not a consumer CaP handles, e.g. a depthwise conv)."""
    if isinstance(module, nn.Linear):
        kind, groups, taps, c = "linear", 1, 1, module.in_features
    elif isinstance(module, nn.modules.conv._ConvNd):
        kind = "conv_transpose" if module.transposed else "conv"
        groups, taps, c = module.groups, math.prod(module.kernel_size), module.in_channels
    else:
        return None
    cg = c // groups
    if cg < 2:  # depthwise: each input channel is its own output channel's only input
        return None
    mode = "patch" if kind == "conv" and cg * taps <= max_dim else "channel"
    width = max(1, max_dim // (taps if mode == "patch" else 1))
    blocks = tuple(
        tuple(range(g * cg + s, g * cg + min(cg, s + width)))
        for g in range(groups) for s in range(0, cg, width)
    )
    return ConsumerLayout(kind, mode, c, groups, taps, blocks)


def sample_features(x: torch.Tensor, module: nn.Module, layout: ConsumerLayout,
                    max_positions: int, generator: torch.Generator) -> torch.Tensor:
    """``[M, features]``: the consumer's input features at ``M <= max_positions`` positions.

    Patch mode gathers the conv's input patch (its padding, stride and dilation) at sampled
    output positions without unfolding the whole map; channel mode samples input pixels.
    Positions are drawn with replacement (unbiased moments) when there are more than
    ``max_positions``, else all are used.
    """
    if layout.kind == "linear" or layout.mode == "channel":
        c = x.shape[-1] if layout.kind == "linear" else x.shape[1]
        flat = x.reshape(-1, c) if layout.kind == "linear" else x.movedim(1, -1).reshape(-1, c)
        return flat[_positions(flat.shape[0], max_positions, generator, x.device)]
    pad = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    spatial = xp.shape[2:]
    k, s, d = module.kernel_size, module.stride, module.dilation
    out = [(n - d_ * (k_ - 1) - 1) // s_ + 1 for n, k_, s_, d_ in zip(spatial, k, s, d)]
    n_pos = xp.shape[0] * math.prod(out)
    pos = _positions(n_pos, max_positions, generator, x.device)
    coords = []
    for size in reversed(out):  # unravel [N, *out] indices
        coords.append(pos % size)
        pos = pos // size
    batch, coords = pos, coords[::-1]
    strides = [math.prod(spatial[i + 1:]) for i in range(len(spatial))]
    base = batch * math.prod(spatial)
    for o, s_, st in zip(coords, s, strides):
        base = base + o * s_ * st
    offsets = torch.tensor([sum(t * d_ * st for t, d_, st in zip(tap, d, strides))
                            for tap in itertools.product(*(range(k_) for k_ in k))],
                           device=x.device)
    flat = xp.movedim(1, -1).reshape(-1, xp.shape[1])  # [N * prod(spatial), C]
    patches = flat[base[:, None] + offsets]  # [M, K, C]
    return patches.transpose(1, 2).reshape(patches.shape[0], -1)  # channel-major: c * K + t


def _positions(total: int, limit: int, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    if total <= limit:
        return torch.arange(total, device=device)
    return torch.randint(total, (limit,), generator=generator).to(device)


def ridge(a: torch.Tensor, eps: float) -> float:
    """Ridge added to a covariance's diagonal: ``eps`` times its mean variance."""
    if a.numel() == 0:
        return 0.0
    return eps * max(float(a.diagonal().mean()), 1e-30)
