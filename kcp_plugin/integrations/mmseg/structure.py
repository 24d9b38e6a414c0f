"""How an mmseg segmentor is traced, which layers are protected, and replaying plans on it.

A segmentor's ``forward(inputs, mode='tensor')`` returns only the decode head's logits: the
auxiliary heads, which read backbone stages and must be pruned with them, never run. Tracing
therefore uses :func:`trace_forward`, which runs the tensor-mode path and additionally feeds the
auxiliary heads *average-pooled* copies of the features. Pooling preserves channels, so the
dependency graph couples the auxiliary heads' input convs to the backbone exactly as training
does, while their MACs (on 4x4 maps) stay negligible: MACs targets therefore refer to the
deployed (tensor-mode) network.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcp_plugin.plan import sync_plan

__all__ = [
    "trace_forward",
    "example_inputs",
    "output_convs",
    "sync_structure",
    "unwrap",
]

_AUX_POOL = 4


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside an mmengine/torch model wrapper (DDP...), or ``model`` itself."""
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


def _heads(head: Any) -> list[nn.Module]:
    if head is None:
        return []
    return list(head) if isinstance(head, nn.ModuleList) else [head]


def _decode(model: nn.Module, feats: Any) -> Any:
    """Decode-head logits as ``model._forward`` computes them (cascades included)."""
    heads = model.decode_head
    if isinstance(heads, nn.ModuleList):  # CascadeEncoderDecoder
        out = heads[0].forward(feats)
        for head in heads[1:-1]:
            out = head.forward(feats, out)
        return heads[-1].forward(feats, out)
    return heads.forward(feats)


def trace_forward(model: nn.Module, inputs: torch.Tensor) -> tuple:
    """Decode logits plus auxiliary-head outputs on pooled features (see module docstring)."""
    feats = model.extract_feat(inputs)
    outs = [_decode(model, feats)]
    aux = _heads(getattr(model, "auxiliary_head", None))
    if aux:
        seq = feats if isinstance(feats, (list, tuple)) else [feats]
        pooled = [F.adaptive_avg_pool2d(f, _AUX_POOL) for f in seq]
        for head in aux:
            outs.append(head.forward(pooled))
    return tuple(outs)


def example_inputs(
    model: nn.Module, input_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """A fixed random image batch ``[1, C, H, W]`` on the model's device, for tracing and MACs.

    ``input_shape`` may be ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``; by default the data
    preprocessor's ``size`` (the training crop in mmseg configs), else 512 x 512.
    """
    if input_shape is None:
        size = getattr(getattr(model, "data_preprocessor", None), "size", None)
        input_shape = tuple(size) if size else (512, 512)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (1, 3) + shape
    elif len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W), (C, H, W) or (N, C, H, W); got "
                         f"{input_shape!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device)


def output_convs(model: nn.Module) -> list[str]:
    """Names of the decode / auxiliary heads' output convs (``conv_seg``): never pruned."""
    return [name for name, _ in model.named_modules()
            if name.split(".")[-1] == "conv_seg"
            and (name.startswith("decode_head") or name.startswith("auxiliary_head"))]


def sync_structure(
    model: nn.Module, plan: dict[str, Any], inputs: torch.Tensor
) -> bool:
    """:func:`kcp_plugin.sync_plan` traced as a segmentor (:func:`trace_forward`).

    Returns:
        Whether the structure changed.

    Raises:
        ValueError: ``plan`` is malformed, or diverges from what was already applied to
            ``model`` (the model is left unchanged).
    """
    return sync_plan(model, plan, inputs, forward_fn=trace_forward)
