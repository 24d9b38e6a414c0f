"""Which timm architectures prune correctly, and the per-architecture setup that makes them.

Three kinds of help, all decided from the module types a model contains:

* custom pruners (:mod:`.pruners`) for layers whose channel layout torch-pruning cannot trace;
* protected blocks: where a block's channel layout cannot be pruned consistently but the rest of
  the network can, every channel group that passes through the block (other than through the
  sub-layers named as safe) is left unpruned, so the model is pruned only where it is correct;
* refusals: architectures whose forward code breaks under channel pruning in ways neither can
  fix are refused by :func:`check_supported` before the model is touched, with the cause.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch.nn as nn

from .pruners import (
    BlurPoolPruner,
    GroupNormPruner,
    PatchMergingPruner,
    ScalePruner,
)

__all__ = ["UnsupportedModelError", "check_supported", "pruning_setup",
           "protected_roots",
           "PRUNERS", "PROTECTED", "REFUSED", "UNSAFE_LAYERS", "clear_caches"]


class UnsupportedModelError(ValueError):
    """A timm architecture that kcp_plugin cannot prune correctly (the model is untouched)."""


def _timm_class(path: str) -> type | None:
    """``"timm.models.x.Cls"`` -> the class, or ``None`` if this timm version lacks it."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


# ---------------------------------------------------------------------- custom pruners
PRUNERS: dict[str, Any] = {
    "timm.models.swin_transformer.PatchMerging": PatchMergingPruner(),
    "timm.models.swin_transformer_v2.PatchMerging": PatchMergingPruner(),
    "timm.models.swin_transformer_v2_cr.PatchMerging": PatchMergingPruner(),
    "timm.models.metaformer.Scale": ScalePruner(),
    "timm.models.metaformer.GroupNorm1NoBias": GroupNormPruner(),
    "timm.layers.blur_pool.BlurPool2d": BlurPoolPruner(),
}


# ---------------------------------------------------------------------- protected blocks
# class path -> (which sub-layers are unsafe, their name prefixes, why). "except": all but the
# listed sub-layers are unsafe; "only": only the listed ones are; "outputs": the listed
# sub-layers' output channels are kept (their input channels are pruned with the rest).
PROTECTED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "timm.models.edgenext.SplitTransposeBlock": (
        "except", ("mlp.",),
        "EdgeNeXt's split-transpose block cuts its channels into equal chunks chained by "
        "additions (Res2Net style) and attends across channels (XCA); torch-pruning keeps "
        "neither the chunks equal nor the heads aligned, so the channels flowing through it "
        "(the stage widths) are kept and its MLP hidden width is pruned",
    ),
    "timm.models.cspnet.CrossStage": (
        "only", ("conv_exp.",),
        "a CSP stage splits its expansion conv's output in two halves by a stored size "
        "(x.split(expand_chs // 2)); torch-pruning's split mapping prunes the halves "
        "inconsistently (IndexError), so the expansion width is kept",
    ),
    "timm.models.cspnet.CrossStage3": (
        "only", ("conv_exp.",),
        "a CSP stage splits its expansion conv's output in two halves by a stored size "
        "(x.split(expand_chs // 2)); torch-pruning's split mapping prunes the halves "
        "inconsistently (IndexError), so the expansion width is kept",
    ),
    "timm.models.res2net.Bottle2neck": (
        "only", ("convs.",),
        "a Res2Net bottleneck splits its width into scales by a stored size and chains them by "
        "additions; torch-pruning cannot keep the scales equal and aligned, so the split width "
        "is kept and the bottleneck's outer widths are pruned",
    ),
    "timm.models.mlp_mixer.MixerBlock": (
        "only", ("mlp_tokens.",),
        "MLP-Mixer's token-mixing MLP is a Linear over the token axis (after a transpose); "
        "torch-pruning follows the transpose as if tokens were channels and couples the token "
        "widths with the channel groups (IndexError), so the token MLP is kept",
    ),
    "timm.models.mlp_mixer.ResBlock": (
        "only", ("linear_tokens.",),
        "ResMLP's token-mixing Linear acts on the token axis; torch-pruning couples its widths "
        "with the channel groups (IndexError), so it is kept",
    ),
    "timm.models.mlp_mixer.SpatialGatingUnit": (
        "except", (),
        "gMLP's spatial gating unit chunks its input in two halves and mixes tokens with a "
        "Linear over the token axis; torch-pruning prunes the halves unequally, so the gated "
        "(hidden) width is kept",
    ),
    "timm.models.fasternet.Partial_conv3": (
        "except", (),
        "FasterNet's partial conv splits its input by stored sizes "
        "(split(x, [dim_conv3, dim_untouched])) and convolves only the first part; "
        "torch-pruning prunes the parts unevenly (IndexError), so the channels through it "
        "(the stage widths) are kept and the MLP hidden width is pruned",
    ),
    "timm.models.swin_transformer.WindowAttention": (
        "only", ("relative_position_bias_table.",),
        "Swin's window attention adds a learned relative position bias (a table of one column "
        "per head) to the attention logits; torch-pruning follows the logits as if they were "
        "channels, couples that table with the qkv channels and, guessing its pruning "
        "dimension, removes table rows or head columns, so the attention's inner (qkv / proj) "
        "width is kept and the embedding and MLP widths are pruned",
    ),
    "timm.models.swin_transformer_v2.WindowAttention": (
        "only", ("cpb_mlp.",),
        "Swin V2's window attention adds a continuous position bias computed by cpb_mlp (one "
        "value per head) to the attention logits; torch-pruning follows the logits as if they "
        "were channels and couples that per-head output with the qkv channels (index errors "
        "in its importance computation), so the attention's inner (qkv / proj) width is kept "
        "and the embedding and MLP widths are pruned",
    ),
    "timm.models.eva.EvaAttention": (
        "outputs", ("qkv.", "q_proj.", "k_proj.", "v_proj."),
        "EVA's attention applies rotary position embeddings, which rotate fixed pairs of "
        "channels inside each head by a frequency table of head_dim entries; torch-pruning "
        "does not know that pairing (IndexError in its own pruner), so the attention's inner "
        "(q / k / v) width is kept and the embedding and MLP widths are pruned",
    ),
}


def _depthwise_multiplier(m: nn.Module) -> bool:
    """A grouped conv with one input channel per group and several outputs per group."""
    return (isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
            and m.groups == m.in_channels and m.out_channels != m.in_channels)


# Layer predicates (any architecture) whose channel groups are kept, and why.
UNSAFE_LAYERS: tuple[tuple[Any, str], ...] = (
    (_depthwise_multiplier,
     "grouped convolutions with one input and several output channels per group (depthwise "
     "with a channel multiplier, e.g. FastViT's downsampling) are indexed per input channel by "
     "torch-pruning's importance and in-channel pruner, which then index past the weight "
     "(IndexError); the channels on both sides of such a layer are kept"),
)


def protected_roots(model: nn.Module, example_inputs: Any,
                    customized_pruners: dict[Any, Any] | None = None,
                    forward_fn: Any = None) -> list[nn.Module]:
    """Root layers of the channel groups that pass through a protected block's unsafe parts
    (its sub-layers or raw parameters).

    Ignoring a group's root keeps the whole group (torch-pruning skips a group when any layer
    whose outputs it would cut is ignored).
    """
    from ...graph import checked_graph

    unsafe: set[int] = set()
    unsafe_out: set[int] = set()  # only their output channels are kept
    for path, (mode, prefixes, _) in PROTECTED.items():
        cls = _timm_class(path)
        if cls is None:
            continue
        for block in model.modules():
            if isinstance(block, cls):
                members = [(n, m) for n, m in block.named_modules() if m is not block]
                members += list(block.named_parameters(recurse=False))  # raw parameters
                for name, sub in members:
                    listed = any((name + ".").startswith(p) for p in prefixes)
                    if mode == "outputs" and listed:
                        unsafe_out.add(id(sub))
                    elif mode != "outputs" and listed == (mode == "only"):
                        unsafe.add(id(sub))
    for predicate, _ in UNSAFE_LAYERS:
        unsafe.update(id(m) for m in model.modules() if predicate(m))
    if not unsafe and not unsafe_out:
        return []
    graph = checked_graph(model, example_inputs, forward_fn,
                        customized_pruners=customized_pruners)
    roots = []
    for group in graph.get_all_groups(root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        if any(id(dep.target.module) in unsafe or (
                id(dep.target.module) in unsafe_out
                and graph.is_out_channel_pruning_fn(dep.handler)) for dep, _ in group):
            roots.append(group[0].dep.target.module)
    return roots


# ---------------------------------------------------------------------- refusals
# class path -> why pruning it breaks the model. Empty: what used to be refused here is handled
# by the core. Sizes a block stores on itself and passes to a split or a channel slice
# (MixNet's MixedConv2d, ReXNet's bottleneck, DPN's dual-path block, SKNet's selective kernel)
# follow pruning (kcp_plugin.stored_sizes). LeViT's attention (qkv viewed per head and split
# by stored key / value sizes) and DaVit's (qkv reshaped by the input width, C // heads) are
# kept whole by the safety net, which finds that pruning their groups breaks the forward; their
# MLP and, for LeViT, stage widths are pruned (LeViT equals the masked dense model:
# tests/test_any_net.py). LeViT needed one more fix for that: at a 1x1 stage resolution
# torch-pruning's flatten mapping sat on a cycle of its graph and the group traversal grew
# until memory ran out (kcp_plugin.depgraph.DivergentMappingError).
REFUSED: dict[str, str] = {}


def check_supported(model: nn.Module) -> None:
    """Refuse architectures that cannot be pruned correctly, before anything is changed.

    Raises:
        UnsupportedModelError: naming the layer type, where it is, and why.
    """
    for path, cause in REFUSED.items():
        cls = _timm_class(path)
        if cls is None:
            continue
        for name, m in model.named_modules():
            if isinstance(m, cls):
                arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
                what = f"{arch} " if arch else ""
                raise UnsupportedModelError(
                    f"{what}cannot be pruned by kcp_plugin: it contains {path.split('.', 2)[-1]}"
                    f" (first at {name!r}), and {cause}"
                )


class _CopyFreeCache(dict):
    """A cache dict that deep-copies as empty (its values are recomputed on demand)."""

    def __deepcopy__(self, memo: dict) -> _CopyFreeCache:
        return type(self)()


def _get_cache(self: nn.Module) -> _CopyFreeCache:
    cache = self.__dict__.get("_kcp_bias_cache")
    if cache is None:
        cache = self.__dict__["_kcp_bias_cache"] = _CopyFreeCache()
    return cache


def _set_cache(self: nn.Module, value: dict) -> None:
    self.__dict__["_kcp_bias_cache"] = _CopyFreeCache(value)


_CACHE_CLASSES: dict[type, type] = {}


def clear_caches(model: nn.Module) -> None:
    """Make the bias caches of timm attention layers safe to deep-copy, and empty them.

    LeViT / EfficientFormer(V2) attention layers cache ``attention_biases[:, idxs]`` in eval
    mode. Filled while torch-pruning traces the model (autograd on), the cache holds a non-leaf
    tensor, and the model can no longer be deep-copied, which the MACs search does. Such a layer
    gets a subclass (same behaviour and state dict) whose ``attention_bias_cache`` is a dict
    that deep-copies as empty; the layer simply recomputes the entry. Idempotent.
    """
    for m in model.modules():
        cls = type(m)
        if cls in _CACHE_CLASSES.values():
            m.attention_bias_cache = {}
            continue
        if not isinstance(m.__dict__.get("attention_bias_cache"), dict):
            continue
        if cls not in _CACHE_CLASSES:
            _CACHE_CLASSES[cls] = type(cls.__name__, (cls,), {
                "__module__": cls.__module__, "__doc__": cls.__doc__,
                "attention_bias_cache": property(_get_cache, _set_cache),
            })
        del m.__dict__["attention_bias_cache"]
        m.__class__ = _CACHE_CLASSES[cls]
        m.attention_bias_cache = {}


def pruning_setup(model: nn.Module, example_inputs: Any = None) -> dict[str, Any]:
    """Arguments that make :func:`kcp_plugin.prune` / ``apply_plan`` handle this timm model.

    Args:
        model: The timm model.
        example_inputs: Tracing inputs; needed (for pruning, not for a plan replay) when the
            model has protected blocks, whose groups are found on the dependency graph.

    Returns:
        ``{"customized_pruners": {...}, "unwrapped_parameters": {...},
        "ignored_layers": [...]}``.
    """
    clear_caches(model)
    types = {type(m) for m in model.modules()}
    pruners: dict[type, Any] = {}
    for path, pruner in PRUNERS.items():
        cls = _timm_class(path)
        for t in types:  # torch-pruning looks pruners up by exact class
            if cls is not None and issubclass(t, cls):
                pruners.setdefault(t, pruner)
    ignored = (protected_roots(model, example_inputs, pruners)
               if example_inputs is not None else [])
    return {"customized_pruners": pruners, "unwrapped_parameters": {}, "ignored_layers": ignored}
