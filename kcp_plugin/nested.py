"""Nested inputs and outputs (tensors in tuples, lists and dicts): mapped tensor by tensor, or
listed by path."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["map_tensors", "output_tensors"]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)``, through dicts, tuples and lists
    (rebuilt as plain ones); anything else is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def output_tensors(out: Any, prefix: str = "out", objects: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) model output, by path (``prefix.key.index``), in traversal
    order: tensors, dicts, lists and tuples, and with ``objects`` also the attributes of plain
    objects (mmseg data samples). Used by the output checks and by the ONNX export."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    found: dict[str, torch.Tensor] = {}
    if isinstance(out, dict):
        items: Iterable = out.items()
    elif isinstance(out, (list, tuple)):
        items = enumerate(out)
    elif objects and hasattr(out, "__dict__") and not isinstance(out, nn.Module):
        items = vars(out).items()  # e.g. mmseg data samples
    else:
        return found
    for key, value in items:
        found.update(output_tensors(value, f"{prefix}.{key}", objects))
    return found
