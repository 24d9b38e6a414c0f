"""``PrunedSegmentor``: build a pruned segmentor from its original config plus a saved plan.

For testing and deployment with mmseg's own tools, a pruned checkpoint is loaded into a model
built from a config, never unpickled as a module::

    model = dict(type='kcp_plugin.PrunedSegmentor',
                 model=<the original segmentor config>,
                 plan='work_dirs/my_run/iter_80000.pth')   # or kcp_pruning_plan.json, or a dict

The original architecture is built, the plan replayed on it, and the result is the segmentor
itself (an ``EncoderDecoder``...), so ``tools/test.py CONFIG CHECKPOINT`` and
``mmseg.apis.init_model(CONFIG, CHECKPOINT)`` load the pruned weights as usual; a checkpoint
that does not fit raises instead of loading partially.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.nn as nn
from mmengine.registry import MODELS as MMENGINE_MODELS

from kcp_plugin.plan import PLAN_FORMAT, validate_plan

from .checkpoint import checkpoint_plan, raise_on_size_mismatch
from .registry import MODELS
from .structure import example_inputs, sync_structure

__all__ = ["PrunedSegmentor", "read_plan"]


def read_plan(plan: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A pruning plan from a dict, a ``.json`` plan file, or a checkpoint that holds one.

    Checkpoints are read with ``weights_only`` (mmengine checkpoints through the allow-listed
    loader): ``checkpoint['meta']['kcp_plugin']['plan']`` (written by ``PruningHook``) or
    ``checkpoint['kcp_plugin']`` (written by :func:`kcp_plugin.save_pruned`).

    Raises:
        FileNotFoundError: no such file; the message says where it was looked for (a relative
            path is relative to the working directory) and which config key to set.
        ValueError: no plan in it, or not a plan of a supported version.
    """
    if isinstance(plan, dict):
        return validate_plan(plan)
    path = os.fspath(plan)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"PrunedSegmentor plan {path!r} does not exist (looked for "
            f"{os.path.abspath(path)!r}; a relative path is relative to the working directory "
            f"{os.getcwd()!r}): set model.plan to the pruned checkpoint or its "
            "kcp_pruning_plan.json, e.g. --cfg-options model.plan=work_dirs/.../iter_N.pth")
    if path.endswith(".json"):
        with open(path) as f:
            return validate_plan(json.load(f))
    from mmengine.runner.checkpoint import _load_checkpoint

    found = checkpoint_plan(_load_checkpoint(path, map_location="cpu"))
    if not isinstance(found, dict) or found.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} holds no kcp_plugin pruning plan (was it saved by a run with "
                         "kcp_plugin.PruningHook?)")
    return validate_plan(found)


@MODELS.register_module()
def PrunedSegmentor(  # noqa: N802 - a config type name, like mmseg's classes
    model: dict[str, Any],
    plan: str | os.PathLike | dict[str, Any],
    input_shape: tuple[int, ...] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build ``model`` (an mmseg segmentor config) and give it the pruned structure of ``plan``.

    Args:
        model: The original segmentor config (what was trained before pruning).
        plan: A plan dict, a ``.json`` plan file (``kcp_pruning_plan.json`` in the work dir) or
            a checkpoint saved with ``PruningHook``.
        input_shape: Input for tracing: ``(H, W)`` or ``(N, C, H, W)``; default the data
            preprocessor's ``size``, else 512 x 512 (any size the model accepts works).
        **overrides: Set on the segmentor config, e.g. the ``pretrained=None`` /
            ``train_cfg=None`` that ``mmseg.apis.init_model`` sets on ``config.model``.

    Returns:
        The segmentor with the pruned structure (weights still to be loaded).
    """
    if not isinstance(model, dict) or "type" not in model:
        raise ValueError("model must be the original segmentor's config dict (with a 'type')")
    plan = read_plan(plan)
    segmentor = MMENGINE_MODELS.build({**model, **overrides})
    sync_structure(segmentor, plan, example_inputs(segmentor, input_shape))
    return raise_on_size_mismatch(segmentor)
