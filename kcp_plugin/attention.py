"""Attention heads: find them before a prune, fix the modules' head bookkeeping after it.

torch-pruning keeps multi-head projections consistent when told each projection's head count,
but forward code that reshapes by stored attributes (timm's ``Attention``: ``num_heads``,
``head_dim``, ``attn_dim``, ``scale``; transformers' ``num_attention_heads``,
``attention_head_size``, ``all_head_size``) must be updated by hand after pruning. Both halves
live here, for timm's fused qkv and for separate q / k / v projections.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .stored_sizes import stored_size_attrs

__all__ = ["detect_num_heads", "sync_attention_attrs"]


# Separate q / k / v projections (transformers' BERT / ViT / CLIP / LLaMA-style attention,
# timm's EVA without fused qkv): the projection names, and the attributes holding the head
# count, the head width and the inner width, in the spellings those libraries use.
_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
_HEAD_COUNT = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "d_head")
_INNER = ("all_head_size", "attn_dim", "inner_dim", "embed_dim", "hidden_size")
_SCALE = ("scale", "scaling")


def _is_qkv_attention(module: nn.Module) -> bool:
    # Channel ("cross-covariance") attention, e.g. timm's XCA in EdgeNeXt/XCiT, has a qkv layer
    # and num_heads too but attends over channels and carries a per-head temperature: treating
    # it as token attention makes torch-pruning group its channels wrongly, so it is excluded.
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and not isinstance(getattr(module, "temperature", None), torch.Tensor)
    )


def _fused_parts(module: nn.Module) -> int | None:
    """How many projections a fused ``qkv`` layer stacks: 3 (q, k, v), or 2 when it projects
    only k and v (timm's GCViT global attention takes q from elsewhere), read off the output
    projection's width (``qkv.out_features / proj.in_features``); without a ``proj`` Linear,
    3 when the width splits into 3 x ``num_heads``. None: no split into whole heads."""
    width, heads = module.qkv.out_features, module.num_heads
    proj = getattr(module, "proj", None)
    if isinstance(proj, nn.Linear) and proj.in_features and width % proj.in_features == 0:
        parts = width // proj.in_features
        if parts in (2, 3) and heads > 0 and proj.in_features % heads == 0:
            return parts
    return 3 if heads > 0 and width % (3 * heads) == 0 else None


def _separate_qkv(module: nn.Module) -> tuple[list[nn.Linear], str] | None:
    """``([q, k, v], head-count attribute)`` of an attention with separate projections of
    equal widths split into whole heads, else None (grouped-query attention, whose k / v
    have fewer heads, is left alone)."""
    if isinstance(getattr(module, "temperature", None), torch.Tensor):
        return None
    heads_attr = next((a for a in _HEAD_COUNT if isinstance(getattr(module, a, None), int)),
                      None)
    if heads_attr is None:
        return None
    heads = getattr(module, heads_attr)
    for names in _PROJECTIONS:
        projs = [module._modules.get(n) for n in names]
        if all(isinstance(p, nn.Linear) for p in projs):
            widths = {p.out_features for p in projs}
            if len(widths) == 1 and heads > 0 and widths.pop() % heads == 0:
                return projs, heads_attr
    return None


def detect_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Map each attention projection to its head count: timm's fused ``qkv`` (with
    ``num_heads``), and separate q / k / v projections (``query`` / ``key`` / ``value``,
    ``q_proj`` ..., or ``q`` ...) next to a head-count attribute (``num_heads``,
    ``num_attention_heads``, ``n_heads``...). torch-pruning then prunes the same positions of
    every head, so widths stay divisible by the head count (or, with ``prune_num_heads``,
    removes whole heads)."""
    found: dict[nn.Module, int] = {}
    for m in model.modules():
        if _is_qkv_attention(m):
            if _fused_parts(m) is not None:  # else left to the safety net, like any reshape
                found[m.qkv] = m.num_heads
            continue
        separate = _separate_qkv(m)
        if separate is not None:
            projs, heads_attr = separate
            found.update({p: getattr(m, heads_attr) for p in projs})
    return found


def sync_attention_attrs(
    model: nn.Module, num_heads: dict[nn.Module, int]
) -> dict[str, dict[str, int | float]]:
    """Make each attention module's head attributes match its (pruned) projections.

    timm's fused-qkv attention gets ``num_heads``, ``head_dim``, ``attn_dim`` and ``scale``
    (those it has). An attention with separate projections gets its head-count attribute, its
    head-width attribute (``head_dim``, ``attention_head_size``...), and every inner-width
    (``all_head_size``, ``embed_dim``...) or scale (``scale``, ``scaling``) attribute whose
    value was the inner width or ``head_dim ** -0.5`` before the prune.

    Args:
        model: The pruned model.
        num_heads: projection -> head count after pruning (torch-pruning updates its own dict
            when whole heads are removed).

    Returns:
        ``{module_name: {attr: value}}`` of the attributes set, recorded in the pruning plan so
        that replaying the plan restores them; with them, the split / slice sizes stored on
        modules that pruning rewrote (:func:`kcp_plugin.stored_sizes.stored_size_attrs`).

    Raises:
        RuntimeError: a projection's width no longer splits into whole heads.
    """
    changed: dict[str, dict[str, int | float]] = {}
    for name, m in model.named_modules():
        if _is_qkv_attention(m):
            attrs = _fused_attrs(name, m, num_heads)
        else:
            attrs = _separate_attrs(name, m, num_heads)
        if attrs and any(getattr(m, k) != v for k, v in attrs.items()):
            for k, v in attrs.items():
                setattr(m, k, v)
            changed[name] = attrs
    for name, values in stored_size_attrs(model).items():  # split / slice sizes, same plan
        changed.setdefault(name, {}).update(values)
    return changed


def _fused_attrs(name: str, m: nn.Module, num_heads: dict[nn.Module, int]
                 ) -> dict[str, Any] | None:
    if m.qkv not in num_heads:
        return None  # not an attention the pruner was told about (num_heads=None, or no split)
    heads = int(num_heads[m.qkv])
    width = m.qkv.out_features
    parts = _fused_parts(m) or 3
    if width % (parts * heads):
        raise RuntimeError(f"{name}.qkv has {width} outputs, not divisible into {parts} x "
                           f"{heads} heads")
    head_dim = width // (parts * heads)
    attrs: dict[str, Any] = {"num_heads": heads}
    if hasattr(m, "head_dim"):
        attrs["head_dim"] = head_dim
    if hasattr(m, "attn_dim"):
        attrs["attn_dim"] = heads * head_dim
    if hasattr(m, "scale"):
        # fused scaled_dot_product_attention uses head_dim ** -0.5; keep both paths equal
        attrs["scale"] = head_dim**-0.5
    return attrs


def _separate_attrs(name: str, m: nn.Module, num_heads: dict[nn.Module, int]
                    ) -> dict[str, Any] | None:
    heads_attr = next((a for a in _HEAD_COUNT if isinstance(getattr(m, a, None), int)), None)
    if heads_attr is None:
        return None
    projs = next(([m._modules[n] for n in names] for names in _PROJECTIONS
                  if all(isinstance(m._modules.get(n), nn.Linear) for n in names)), None)
    if projs is None or not any(p in num_heads for p in projs):
        return None  # not an attention the pruner was told about
    old_heads = getattr(m, heads_attr)
    heads = int(num_heads.get(projs[0], old_heads))
    widths = {p.out_features for p in projs}
    if len(widths) != 1 or next(iter(widths)) % heads:
        raise RuntimeError(f"{name}: projections of widths {sorted(widths)} do not split into "
                           f"{heads} equal heads")
    width = next(iter(widths))
    head_dim = width // heads
    attrs: dict[str, Any] = {heads_attr: heads}
    dim_attr = next((a for a in _HEAD_DIM if isinstance(getattr(m, a, None), int)), None)
    old_dim = getattr(m, dim_attr) if dim_attr else None
    if dim_attr:
        attrs[dim_attr] = head_dim
    old_inner = old_heads * old_dim if old_dim else None
    for a in _INNER:
        if old_inner is not None and getattr(m, a, None) == old_inner:
            attrs[a] = width
    for a in _SCALE:
        value = getattr(m, a, None)
        if old_dim and isinstance(value, float) and math.isclose(value, old_dim**-0.5):
            attrs[a] = head_dim**-0.5
    return attrs


def apply_attrs(model: nn.Module, attrs: dict[str, dict[str, int | float]]) -> None:
    """Set recorded attributes on named submodules (used when a plan is replayed); a list
    recorded for a tuple attribute (plans are JSON) is set as a tuple."""
    modules = dict(model.named_modules())
    for name, values in attrs.items():
        if name not in modules:
            raise KeyError(f"pruning plan names module {name!r}, which this model does not have")
        for k, v in values.items():
            if isinstance(v, list) and isinstance(getattr(modules[name], k, None), tuple):
                v = tuple(v)  # a plan is JSON: stored size tuples come back as lists
            setattr(modules[name], k, v)
