"""torch-pruning pruners for timm layers whose channel layout torch-pruning cannot trace.

torch-pruning follows channels through modules it knows (conv, linear, norms...) and through
tensor operations it can map index by index. A few timm layers rearrange channels in ways its
tracer maps wrongly; registering a pruner for such a layer makes torch-pruning treat it as one
unit with known input and output channels, and the pruner removes the right slices inside it
and updates the layer's own bookkeeping (the attributes its ``forward`` reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch_pruning.pruner import function

# NF-Nets' ScaledStdConv2d needs no pruner of its own: its per-filter gain is sliced with the
# filters by the core (kcp_plugin.channelwise), and the conv stays a conv to every criterion.
__all__ = ["PatchMergingPruner", "GroupNormPruner", "ScalePruner", "BlurPoolPruner"]


def _norm_width(norm: nn.Module) -> int | None:
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[-1])
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return int(norm.num_features)
    return None


def _prune_norm(norm: nn.Module, idxs: list[int]) -> None:
    if isinstance(norm, nn.LayerNorm):
        function.prune_layernorm_out_channels(norm, idxs)
    elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
        function.prune_batchnorm_out_channels(norm, idxs)
    else:
        raise TypeError(f"PatchMergingPruner: unsupported norm layer {type(norm).__name__}")


class PatchMergingPruner(function.BasePruningFunc):
    """Swin-style patch merging: ``[B, H, W, C] -> [B, H/2, W/2, 4C] -> Linear(4C, C_out)``.

    timm's ``PatchMerging`` (swin, swinv2, swinv2_cr) gathers each 2x2 neighbourhood with
    ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)``, so the merged vector
    holds four copies of the ``C`` input channels: input channel ``c`` becomes merged features
    ``c + k * C`` for ``k = 0..3``. torch-pruning cannot map indices through that 6-d reshape
    (it prunes ``C`` and ``4C`` independently and the model no longer runs; upstream
    VainF/Torch-Pruning#258, #490). This pruner removes the four copies from the norm (if it sits
    before the reduction) and from the reduction's input, and updates ``dim`` / ``out_dim``.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        idxs = sorted(int(i) for i in idxs)
        norm = getattr(layer, "norm", None)
        width = _norm_width(norm)
        # swinv2: the norm follows the reduction (its width is the output's, not 4 x input's)
        norm_after = width == layer.reduction.out_features != layer.reduction.in_features
        function.prune_linear_out_channels(layer.reduction, idxs)
        if norm_after:
            _prune_norm(norm, idxs)
        if hasattr(layer, "out_dim"):
            layer.out_dim = layer.reduction.out_features
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dim = self.get_in_channels(layer)
        idxs = sorted(int(i) for i in idxs)
        merged = [i + k * dim for k in range(4) for i in idxs]
        norm = getattr(layer, "norm", None)
        if _norm_width(norm) == 4 * dim:  # swin v1 / v2_cr: the norm precedes the reduction
            _prune_norm(norm, merged)
        function.prune_linear_in_channels(layer.reduction, merged)
        if hasattr(layer, "dim"):
            layer.dim = dim - len(idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // 4




class GroupNormPruner(function.BasePruningFunc):
    """GroupNorm (timm's ``GroupNorm1``, MetaFormer's ``GroupNorm1NoBias``) with optional bias.

    torch-pruning's GroupNorm pruner prunes ``bias`` whenever the layer is affine, and crashes
    on MetaFormer's bias-free norms (``bias = None``). Channels are removed from the weight
    (and the bias, if any); ``num_channels`` follows. Only valid for one group (``GroupNorm1``)
    or when whole groups are removed, as torch-pruning's own pruner assumes too.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.num_channels)) - {int(i) for i in idxs})
        if getattr(layer, "weight", None) is not None:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if getattr(layer, "bias", None) is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.num_channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.num_channels


class ScalePruner(function.BasePruningFunc):
    """MetaFormer's ``Scale``: ``x * scale.view(shape)`` with a stored ``shape = (dim, 1, 1)``.

    torch-pruning prunes the ``scale`` vector but not the stored view shape, so the pruned
    model fails in ``view``; this pruner removes the channels from ``scale`` and updates
    ``shape``.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.scale.shape[0])) - {int(i) for i in idxs})
        layer.scale = self._prune_parameter_and_grad(layer.scale, keep, 0)
        layer.shape = (len(keep), *tuple(layer.shape)[1:])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.scale.shape[0]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.scale.shape[0]


class BlurPoolPruner(function.BasePruningFunc):
    """timm's ``BlurPool2d`` (anti-aliased downsampling, e.g. TResNet): a fixed per-channel blur.

    With ``channels`` set it convolves with a stored ``[channels, 1, k, k]`` filter and
    ``groups=channels``; torch-pruning does not know the layer, so the pruned model fails in
    that grouped conv. Every channel's filter is the same blur, so channels are removed from the
    filter and ``channels`` follows.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.channels is None:  # broadcast filter: nothing stored per channel
            return layer
        keep = sorted(set(range(layer.channels)) - {int(i) for i in idxs})
        layer.filt = layer.filt[keep].contiguous()
        layer.channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return layer.channels

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return layer.channels
