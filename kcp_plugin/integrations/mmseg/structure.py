"""How an mmseg segmentor is traced, which layers are protected, and replaying plans on it.

A segmentor's ``forward(inputs, mode='tensor')`` returns only the decode head's logits: the
auxiliary heads, which read backbone stages and must be pruned with them, never run. Tracing
therefore uses :func:`trace_forward`, which runs the tensor-mode path and additionally feeds the
auxiliary heads *average-pooled* copies of the features. Pooling preserves channels, so the
dependency graph couples the auxiliary heads' input convs to the backbone exactly as training
does, while their MACs (on 4x4 maps) stay negligible: MACs targets therefore refer to the
deployed (tensor-mode) network.

A ``CascadeEncoderDecoder`` runs its decode heads in turn, each on the features and the previous
head's logits (OCRNet: FCNHead, then OCRHead). mmseg's tensor mode fails for a cascade that ends
in a point head (PointRend's ``PointHead`` classifies sampled points, not feature maps), so the
trace, and :func:`tensor_forward`, run a point head as mmseg's ``predict`` does: the previous
logits are upsampled ``subdivision_steps`` times by ``scale_factor``, the head classifies the
``subdivision_num_points`` most uncertain points of ``test_cfg`` from features sampled there
(``point_sample``), and its logits replace theirs. Sampling preserves channels, so the channels
the point head reads (the neck's, concatenated with the coarse logits) are pruned with the
layers that make them; the points' positions carry no gradient and join no group.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcp_plugin.errors import UnprunableError
from kcp_plugin.plan import sync_plan

__all__ = [
    "POINT_TEST_CFG",
    "cascade_problems",
    "check_cascade",
    "point_heads",
    "tensor_forward",
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


POINT_TEST_CFG = ("subdivision_steps", "subdivision_num_points", "scale_factor")
"""The ``test_cfg`` keys a point head's refinement reads (mmseg's PointRend configs set them)."""


def _is_point_head(head: nn.Module) -> bool:
    """A head that classifies sampled points (mmseg's ``PointHead``), not feature maps."""
    return all(hasattr(head, attr) for attr in (
        "get_points_test", "_get_fine_grained_point_feats", "_get_coarse_point_feats"))


def _test_cfg_value(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def cascade_problems(model: nn.Module) -> list[str]:
    """Why the cascade's decode heads cannot be run in turn on a tensor batch (empty: they can).

    Each problem names the head (``decode_head.1 (PointHead)``), what is wrong and the way out.
    """
    heads = getattr(model, "decode_head", None)
    if not isinstance(heads, nn.ModuleList):
        return []
    problems = []
    if len(heads) == 0:
        problems.append("decode_head is an empty ModuleList: a cascade needs at least one head")
    for i, head in enumerate(heads):
        if not _is_point_head(head):
            continue
        where = f"decode_head.{i} ({type(head).__name__})"
        if i == 0:
            problems.append(f"{where} is a point head but first in the cascade: it refines the "
                            "previous head's logits, so a head that makes logits from the "
                            "features must come before it")
            continue
        cfg = getattr(model, "test_cfg", None)
        bad = []
        for key in POINT_TEST_CFG:
            value = _test_cfg_value(cfg, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 \
                    or (key != "scale_factor" and not isinstance(value, int)):
                bad.append(f"{key}={value!r}")
        if bad:
            problems.append(
                f"{where} refines the logits at the points test_cfg selects, and the "
                f"segmentor's test_cfg has {', '.join(bad)}; set test_cfg=dict(mode='whole', "
                "subdivision_steps=2, subdivision_num_points=8196, scale_factor=2) as mmseg's "
                "PointRend configs do (positive numbers, the first two integers)")
    return problems


def check_cascade(model: nn.Module) -> None:
    """Refuse a cascade whose heads cannot be run in turn (see :func:`cascade_problems`).

    Raises:
        UnprunableError: naming each head that cannot be run and the way out; the model is not
            touched.
    """
    problems = cascade_problems(model)
    if problems:
        raise UnprunableError(f"{type(model).__name__} cannot be traced through its cascade of "
                              f"decode heads: {'; '.join(problems)}")


def _point_refine(model: nn.Module, head: nn.Module, feats: Any,
                  prev: torch.Tensor) -> torch.Tensor:
    """A point head's refinement of ``prev`` (logits), as mmseg's ``PointHead.predict`` computes
    it before resizing to the image (``predict_by_feat``)."""
    from mmseg.models.decode_heads.point_head import calculate_uncertainty
    from mmseg.models.utils import resize

    steps, num_points, scale = (_test_cfg_value(model.test_cfg, k) for k in POINT_TEST_CFG)
    cfg = SimpleNamespace(subdivision_num_points=num_points)  # test_cfg may be a plain dict
    x = head._transform_inputs(feats)
    refined = prev
    for _ in range(steps):
        refined = resize(refined, scale_factor=scale, mode="bilinear",
                         align_corners=head.align_corners)
        n, c, h, w = refined.shape
        indices, points = head.get_points_test(refined, calculate_uncertainty, cfg=cfg)
        logits = head.forward(head._get_fine_grained_point_feats(x, points),
                              head._get_coarse_point_feats(prev, points))
        indices = indices.unsqueeze(1).expand(-1, c, -1)
        # out of place (mmseg's predict scatters into a clone): same values, autograd-safe
        refined = refined.reshape(n, c, h * w).scatter(2, indices, logits).view(n, c, h, w)
    return refined


def _decode(model: nn.Module, feats: Any) -> Any:
    """Decode-head logits as ``model._forward`` computes them: a cascade's heads in turn, each
    on the features and the previous head's logits, a point head refining them at test-time
    points (see the module docstring).

    Raises:
        UnprunableError: a cascade's head failed; the message names it and the error.
    """
    heads = model.decode_head
    if not isinstance(heads, nn.ModuleList):
        return heads.forward(feats)
    check_cascade(model)  # CascadeEncoderDecoder: what it lacks is named before it runs
    out = None
    for i, head in enumerate(heads):
        try:
            if i == 0:
                out = head.forward(feats)
            elif _is_point_head(head):
                out = _point_refine(model, head, feats, out)
            else:
                out = head.forward(feats, out)
        except (UnprunableError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            given = "the features" if i == 0 else f"the features and decode_head.{i - 1}'s logits"
            raise UnprunableError(
                f"the cascade's decode_head.{i} ({type(head).__name__}) could not be run on "
                f"{given} ({type(exc).__name__}: {exc}), so the segmentor cannot be traced "
                "through its heads; pass forward_fn=lambda model, x: ... that runs them "
                "(kcp_plugin.prune), or build the segmentor without this head") from exc
    return out


def point_heads(model: nn.Module) -> list[str]:
    """The cascade's point heads, as ``decode_head.<i> (<class>)`` (empty: none)."""
    heads = getattr(model, "decode_head", None)
    if not isinstance(heads, nn.ModuleList):
        return []
    return [f"decode_head.{i} ({type(h).__name__})" for i, h in enumerate(heads)
            if _is_point_head(h)]


def tensor_forward(model: nn.Module, inputs: torch.Tensor) -> Any:
    """The deployed network's logits: ``model(inputs, mode='tensor')``; for a cascade, its heads
    in turn as mmseg's ``_forward`` runs them, a point head (whose tensor mode mmseg leaves
    unimplemented) refining as at test time: the logits ``encode_decode`` resizes to the image.

    Raises:
        UnprunableError: a cascade's head failed; the message names it and the error.
    """
    if isinstance(getattr(model, "decode_head", None), nn.ModuleList):
        return _decode(model, model.extract_feat(inputs))
    return model(inputs, mode="tensor")


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
    """Names of the decode / auxiliary heads' output convs (``conv_seg``; a point head's
    ``fc_seg``): never pruned."""
    return [name for name, _ in model.named_modules()
            if name.split(".")[-1] in ("conv_seg", "fc_seg")
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
