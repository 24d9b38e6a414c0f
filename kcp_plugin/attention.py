"""Attention heads: find them before a prune, fix the modules' head bookkeeping after it.

torch-pruning keeps multi-head projections consistent when told each qkv layer's head count, but
forward code that reshapes by stored attributes (timm's ``Attention``: ``num_heads``, ``head_dim``,
``attn_dim``, ``scale``) must be updated by hand after pruning. Both halves live here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["detect_num_heads", "sync_attention_attrs"]


def _is_qkv_attention(module: nn.Module) -> bool:
    # Channel ("cross-covariance") attention, e.g. timm's XCA in EdgeNeXt/XCiT, has a qkv layer
    # and num_heads too but attends over channels and carries a per-head temperature: treating
    # it as token attention makes torch-pruning group its channels wrongly, so it is excluded.
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and not isinstance(getattr(module, "temperature", None), torch.Tensor)
    )


def detect_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Map each fused-qkv projection (timm-style ``Attention``) to its head count."""
    return {m.qkv: m.num_heads for m in model.modules() if _is_qkv_attention(m)}


def sync_attention_attrs(
    model: nn.Module, num_heads: dict[nn.Module, int]
) -> dict[str, dict[str, int | float]]:
    """Make each attention module's head attributes match its (pruned) qkv layer.

    Args:
        model: The pruned model.
        num_heads: qkv layer -> head count after pruning (torch-pruning updates its own dict when
            whole heads are removed).

    Returns:
        ``{module_name: {attr: value}}`` of the attributes set, recorded in the pruning plan so
        that replaying the plan restores them.

    Raises:
        RuntimeError: a qkv width no longer splits into ``3 * num_heads`` equal heads.
    """
    changed: dict[str, dict[str, int | float]] = {}
    for name, m in model.named_modules():
        if not _is_qkv_attention(m):
            continue
        heads = int(num_heads.get(m.qkv, m.num_heads))
        width = m.qkv.out_features
        if width % (3 * heads):
            raise RuntimeError(
                f"{name}.qkv has {width} outputs, not divisible into 3 x {heads} heads"
            )
        head_dim = width // (3 * heads)
        attrs: dict[str, int | float] = {"num_heads": heads}
        if hasattr(m, "head_dim"):
            attrs["head_dim"] = head_dim
        if hasattr(m, "attn_dim"):
            attrs["attn_dim"] = heads * head_dim
        if hasattr(m, "scale"):
            # fused scaled_dot_product_attention uses head_dim ** -0.5; keep both paths equal
            attrs["scale"] = head_dim**-0.5
        if any(getattr(m, k) != v for k, v in attrs.items()):
            for k, v in attrs.items():
                setattr(m, k, v)
            changed[name] = attrs
    return changed


def apply_attrs(model: nn.Module, attrs: dict[str, dict[str, int | float]]) -> None:
    """Set recorded attributes on named submodules (used when a plan is replayed)."""
    modules = dict(model.named_modules())
    for name, values in attrs.items():
        if name not in modules:
            raise KeyError(f"pruning plan names module {name!r}, which this model does not have")
        for k, v in values.items():
            setattr(modules[name], k, v)
