"""Evaluation metrics for segmentation, stereo and classification outputs.

All functions accept tensors on any device, never modify their inputs and return Python
floats (or a tensor for the confusion matrix / per-class IoU).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "bad_pixel_rate",
    "confusion_matrix",
    "iou_from_confusion",
    "mean_iou",
    "stereo_epe",
    "top1",
]


def _as_labels(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Turn logits ``[B, C, ...]`` into labels ``[B, ...]``; pass label maps through."""
    if pred.dim() == target.dim() + 1:
        return pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} incompatible with {tuple(target.shape)}")
    return pred


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Confusion matrix of a dense (or flat) prediction.

    Args:
        pred: Predicted labels with the shape of ``target``, or logits with an extra class
            dimension at dim 1 (``[B, C, ...]``), which are arg-maxed.
        target: Ground-truth integer labels.
        num_classes: Number of classes ``C``.
        ignore_index: Target value to exclude (e.g. 255); pixels whose target is outside
            ``[0, C)`` are always excluded.

    Returns:
        int64 tensor ``[C, C]``; entry ``[t, p]`` counts pixels of true class ``t``
        predicted as ``p``.
    """
    labels = _as_labels(pred, target).reshape(-1).long()
    target = target.reshape(-1).long()
    valid = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        valid &= target != ignore_index
    labels = labels[valid].clamp(0, num_classes - 1)
    target = target[valid]
    flat = target * num_classes + labels
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class intersection-over-union from a confusion matrix.

    Args:
        cm: ``[C, C]`` confusion matrix (rows: target, columns: prediction).

    Returns:
        float64 tensor ``[C]``; classes that occur neither in the target nor in the
        prediction get NaN.
    """
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = tp / union
    iou[union == 0] = float("nan")
    return iou


def mean_iou(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> float:
    """Mean intersection-over-union over the classes that are present.

    Classes absent from both prediction and target are left out of the mean. To average
    over a whole dataset, sum :func:`confusion_matrix` over batches and use
    :func:`iou_from_confusion` instead of averaging per-batch values.

    Args:
        pred: Predicted labels or ``[B, C, ...]`` logits (see :func:`confusion_matrix`).
        target: Ground-truth labels.
        num_classes: Number of classes.
        ignore_index: Target value to exclude.

    Returns:
        mIoU in [0, 1], or NaN when there are no valid pixels.
    """
    iou = iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))
    present = ~torch.isnan(iou)
    if not bool(present.any()):
        return math.nan
    return float(iou[present].mean())


def _stereo_valid(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, max_disp: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.dim() == target.dim() + 1 and pred.shape[1] == 1:
        pred = pred.squeeze(1)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    valid = torch.isfinite(target)
    if max_disp is not None:
        valid &= (target >= 0) & (target < max_disp)
    if mask is not None:
        valid &= mask.bool()
    return (pred - target).abs()[valid], valid


def stereo_epe(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    max_disp: float | None = None,
) -> float:
    """End-point error: mean absolute disparity error in pixels.

    Args:
        pred: Predicted disparity ``[B, H, W]`` or ``[B, 1, H, W]``.
        target: Ground-truth disparity ``[B, H, W]``; non-finite values are ignored.
        mask: Optional boolean mask of pixels to evaluate.
        max_disp: If given, only pixels with ``0 <= target < max_disp`` are evaluated.

    Returns:
        Mean absolute error over valid pixels (NaN if there are none).
    """
    err, _ = _stereo_valid(pred, target, mask, max_disp)
    return float(err.mean()) if err.numel() else math.nan


def bad_pixel_rate(
    pred: torch.Tensor,
    target: torch.Tensor,
    threshold: float = 1.0,
    mask: torch.Tensor | None = None,
    max_disp: float | None = None,
) -> float:
    """Fraction of valid pixels whose absolute disparity error exceeds ``threshold``.

    Args:
        pred: Predicted disparity ``[B, H, W]`` or ``[B, 1, H, W]``.
        target: Ground-truth disparity ``[B, H, W]``.
        threshold: Error threshold in pixels (``> threshold`` counts as bad).
        mask: Optional boolean mask of pixels to evaluate.
        max_disp: If given, only pixels with ``0 <= target < max_disp`` are evaluated.

    Returns:
        Bad-pixel rate in [0, 1] (NaN if there are no valid pixels).
    """
    err, _ = _stereo_valid(pred, target, mask, max_disp)
    return float((err > threshold).double().mean()) if err.numel() else math.nan


def top1(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy.

    Args:
        logits: ``[N, C]`` scores (or ``[N]`` predicted labels).
        target: ``[N]`` integer labels.

    Returns:
        Fraction of samples whose arg-max class equals the target (NaN if ``N == 0``).
    """
    pred = _as_labels(logits, target)
    if target.numel() == 0:
        return math.nan
    return float((pred == target).double().mean())
