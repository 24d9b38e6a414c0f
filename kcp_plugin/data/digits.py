"""scikit-learn's bundled handwritten digits as a small image-classification task.

``sklearn.datasets.load_digits`` ships with scikit-learn (1,797 grey 8x8 images of the
digits 0-9, values 0..16), so nothing is downloaded. The images are bilinearly resized to
``size x size``, scaled to [0, 1], normalised with fixed constants and optionally repeated
to three channels so that CIFAR-style networks can consume them unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "digits_split_indices",
    "load_digits_tensors",
    "make_digits_splits",
]

DIGITS_MEAN = 0.305
"""Mean of the [0, 1]-scaled digit images (computed on the full set at 8x8)."""

DIGITS_STD = 0.376
"""Std of the [0, 1]-scaled digit images (computed on the full set at 8x8)."""


def load_digits_tensors(size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Load every digit image as normalised tensors.

    Args:
        size: Output height and width in pixels (bilinear resize from 8x8).
        channels: 1 for grey images, 3 to repeat the grey channel three times.

    Returns:
        ``(images, labels)``: float32 ``[1797, channels, size, size]`` and int64 ``[1797]``
        with values 0..9, in scikit-learn's order.

    Raises:
        ValueError: If ``channels`` is not 1 or 3 or ``size`` < 1.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - DIGITS_MEAN) / DIGITS_STD
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images.contiguous(), labels


def digits_split_indices(
    labels: np.ndarray | torch.Tensor, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random train/validation split of sample indices.

    Args:
        labels: Class label of every sample.
        val_fraction: Fraction of each class that goes to the validation split, in (0, 1).
        seed: Random seed; the same seed gives the same split.

    Returns:
        ``(train_idx, val_idx)``: disjoint sorted int64 index arrays covering all samples.

    Raises:
        ValueError: If ``val_fraction`` is not in (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        rng.shuffle(idx)
        n_val = int(round(val_fraction * idx.size))
        val_parts.append(idx[:n_val])
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64)
    train_mask = np.ones(labels.shape[0], dtype=bool)
    train_mask[val_idx] = False
    train_idx = np.nonzero(train_mask)[0].astype(np.int64)
    return train_idx, val_idx


def make_digits_splits(
    val_fraction: float = 0.2, size: int = 32, seed: int = 0, channels: int = 3
) -> tuple[TensorDataset, TensorDataset]:
    """Build stratified train/validation datasets of the scikit-learn digits.

    Args:
        val_fraction: Fraction of each class held out for validation.
        size: Output image height and width.
        seed: Random seed of the split.
        channels: 1 (grey) or 3 (grey repeated) image channels.

    Returns:
        ``(train, val)`` ``TensorDataset`` s of ``(image, label)``: image float32
        ``[channels, size, size]`` (roughly zero mean, unit std) and label int64 in 0..9.
    """
    images, labels = load_digits_tensors(size=size, channels=channels)
    train_idx, val_idx = digits_split_indices(labels.numpy(), val_fraction, seed)
    tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return TensorDataset(images[tr], labels[tr]), TensorDataset(images[va], labels[va])
