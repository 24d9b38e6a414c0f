"""The mmseg host adapter: what the core applies to any model that contains mmseg modules.

A segmentor's tensor-mode forward never runs its auxiliary heads, so the core's default trace
would prune the backbone channels they read without them (training then fails in the auxiliary
loss). For a segmentor the core therefore traces with :func:`.structure.trace_forward` (unless
the user passes ``forward_fn``) and protects the heads' ``conv_seg``, as the pruning hook does;
``apply_plan`` / ``load_pruned`` replay with the same trace. A ``CascadeEncoderDecoder`` is
traced through its decode heads in turn (a point head refining at test-time points); a point
head without its ``test_cfg`` settings (:func:`.structure.check_cascade`), or a cascade head
that fails to run, is refused by name before the model is touched.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .structure import check_cascade, output_convs, trace_forward

__all__ = ["ADAPTER", "MmsegAdapter"]


def _is_segmentor(model: nn.Module) -> bool:
    return hasattr(model, "extract_feat") and hasattr(model, "decode_head")


class MmsegAdapter:
    """mmseg segmentors: the auxiliary-head trace and the protected output convs."""

    def check(self, model: nn.Module) -> None:
        if _is_segmentor(model):
            check_cascade(model)  # a cascade's heads must run in turn (PointRend: test_cfg)

    def customized_pruners(self, model: nn.Module) -> dict[type, Any]:
        return {}

    def default_forward(self, model: nn.Module) -> Any:
        return trace_forward if _is_segmentor(model) else None

    def protected(self, model: nn.Module, example_inputs: Any, forward_fn: Any,
                  customized_pruners: dict[type, Any]) -> list[nn.Module]:
        modules = dict(model.named_modules())
        return [modules[name] for name in output_convs(model)]

    def before_prune(self, model: nn.Module, example_inputs: Any) -> None:
        return None

    def after_prune(self, model: nn.Module, example_inputs: Any) -> dict[str, dict[str, Any]]:
        return {}

    def after_replay(self, model: nn.Module) -> None:
        return None


ADAPTER = MmsegAdapter()
