"""Procedurally generated semantic-segmentation scenes.

Every scene is a cluttered, textured background (class 0) with a few objects painted on
top of it. Each object class has its own *shape* and its own *texture*, while colours are
drawn at random for every object, so a network has to use shape and texture cues rather
than colour:

====  ==========  ==========================  =====================================
 id   name        shape                       texture
====  ==========  ==========================  =====================================
 0    background  smooth colour field, low-contrast waves, flat-coloured distractor
                  blobs (ellipses) that may also occlude objects
 1    disc        disc                        parallel stripes
 2    square      (rotated) square            checkerboard
 3    triangle    (rotated) triangle          dot lattice
 4    ring        annulus                     per-pixel noise (speckle)
 5    ellipse     elongated ellipse           concentric rings
 6    cross       plus sign                   grid lines
 7    flower      five-petal star             radial shading
====  ==========  ==========================  =====================================

Objects overlap: later objects paint over earlier ones and the label map follows the
painting order. Object position, size, rotation, colours and texture frequency are jittered
and additive Gaussian noise plus a brightness/contrast jitter is applied to the whole image.

Generation is vectorised over the batch with numpy (no per-image Python loop) and is fully
determined by ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "SEGMENTATION_CLASS_NAMES",
    "SEGMENTATION_MEAN",
    "SEGMENTATION_STD",
    "VAL_SEED_OFFSET",
    "generate_segmentation_arrays",
    "make_segmentation_dataset",
    "make_segmentation_splits",
]

SEGMENTATION_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "disc",
    "square",
    "triangle",
    "ring",
    "ellipse",
    "cross",
    "flower",
)
"""Class names by label id; ``num_classes`` selects a prefix of this tuple."""

SEGMENTATION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel mean subtracted from the raw [0, 1] images."""

SEGMENTATION_STD: tuple[float, float, float] = (0.25, 0.25, 0.25)
"""Per-channel std the raw images are divided by (after subtracting the mean)."""

VAL_SEED_OFFSET = 100_003
"""Offset added to ``seed`` for validation splits (train uses ``seed`` itself)."""

_MAX_OBJECTS = 4
_MAX_DISTRACTORS = 5


def _uniform(
    rng: np.random.Generator, lo: float, hi: float, size: int | tuple[int, ...]
) -> np.ndarray:
    return rng.uniform(lo, hi, size=size).astype(np.float32)


def _rand_colour(rng: np.random.Generator, m: int) -> np.ndarray:
    return _uniform(rng, 0.0, 1.0, (m, 3, 1, 1))


def _smooth_noise(
    rng: np.random.Generator, n: int, channels: int, grid: int, size: tuple[int, int]
) -> np.ndarray:
    """Low-frequency noise: a random ``grid x grid`` lattice bilinearly upsampled."""
    lattice = torch.from_numpy(_uniform(rng, -1.0, 1.0, (n, channels, grid, grid)))
    up = torch.nn.functional.interpolate(lattice, size=size, mode="bilinear", align_corners=False)
    return up.numpy()


def _local_coords(
    xx: np.ndarray, yy: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, th: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rotated, scale-normalised coordinates ``(u, v)`` of shape ``[m, H, W]``."""
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    c = np.cos(th)[:, None, None]
    s = np.sin(th)[:, None, None]
    rr = r[:, None, None]
    return (c * dx + s * dy) / rr, (-s * dx + c * dy) / rr


def _shape_and_texture(
    cls: int,
    u: np.ndarray,
    v: np.ndarray,
    freq: np.ndarray,
    phase: np.ndarray,
    aspect: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(mask, t)`` for object class ``cls``; ``t`` in [0, 1] mixes two colours."""
    f = freq[:, None, None]
    ph = phase[:, None, None]
    rho = np.sqrt(u * u + v * v)
    if cls == 1:  # disc + stripes
        mask = rho <= 1.0
        t = (np.sin(2.0 * np.pi * f * u + ph) > 0).astype(np.float32)
    elif cls == 2:  # square + checkerboard
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.85
        t = np.sin(np.pi * 1.3 * f * u + ph) * np.sin(np.pi * 1.3 * f * v + ph) > 0
        t = t.astype(np.float32)
    elif cls == 3:  # triangle + dots
        mask = np.ones_like(u, dtype=bool)
        for ang in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            mask &= (u * np.cos(ang) + v * np.sin(ang)) <= 0.55
        fu = np.mod(u * 1.5 * f + ph, 1.0) - 0.5
        fv = np.mod(v * 1.5 * f + ph, 1.0) - 0.5
        t = (fu * fu + fv * fv < 0.07).astype(np.float32)
    elif cls == 4:  # ring + speckle noise
        mask = (rho <= 1.0) & (rho >= 0.5)
        t = (rng.random(size=u.shape, dtype=np.float32) > 0.5).astype(np.float32)
    elif cls == 5:  # ellipse + concentric rings
        a = aspect[:, None, None]
        e = np.sqrt(u * u + (v / a) ** 2)
        mask = e <= 1.05
        t = 0.5 + 0.5 * np.sin(2.0 * np.pi * 1.6 * f * e + ph)
    elif cls == 6:  # cross + grid lines
        au, av = np.abs(u), np.abs(v)
        mask = ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
        gu = np.mod(u * 1.5 * f + ph, 1.0) < 0.3
        gv = np.mod(v * 1.5 * f + ph, 1.0) < 0.3
        t = (gu | gv).astype(np.float32)
    elif cls == 7:  # flower/star + radial shading
        ang = np.arctan2(v, u)
        mask = rho <= 0.6 + 0.4 * np.cos(5.0 * ang)
        t = np.clip(rho, 0.0, 1.0)
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"unknown object class {cls}")
    return mask, t.astype(np.float32)


def generate_segmentation_arrays(
    n: int,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 5,
    seed: int = 0,
    noise_std: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate raw (un-normalised) scenes as numpy arrays.

    Args:
        n: Number of images.
        size: ``(H, W)`` of every image.
        num_classes: Number of classes including background; between 2 and 8.
        seed: Seed of the random generator; equal seeds give identical arrays.
        noise_std: Standard deviation of the additive Gaussian pixel noise.

    Returns:
        ``(images, labels)``: float32 ``[n, 3, H, W]`` in [0, 1] and int64 ``[n, H, W]``
        with values in ``[0, num_classes)``.

    Raises:
        ValueError: If ``num_classes`` or ``n`` is out of range.
    """
    if not 2 <= num_classes <= len(SEGMENTATION_CLASS_NAMES):
        raise ValueError(
            f"num_classes must be in [2, {len(SEGMENTATION_CLASS_NAMES)}], got {num_classes}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    smin = float(min(h, w))
    yy, xx = np.meshgrid(
        np.arange(h, dtype=np.float32) + 0.5,
        np.arange(w, dtype=np.float32) + 0.5,
        indexing="ij",
    )

    # --- background: smooth colour field + low-contrast waves + fine noise -------------
    base = _rand_colour(rng, n) * 0.6 + 0.2
    img = base + 0.25 * _smooth_noise(rng, n, 3, 4, (h, w))
    img += 0.08 * _smooth_noise(rng, n, 1, max(4, int(smin) // 6), (h, w))
    wave_on = (rng.uniform(size=n) < 0.5).astype(np.float32)[:, None, None, None]
    wave_th = _uniform(rng, 0, np.pi, n)[:, None, None]
    wave_f = _uniform(rng, 0.08, 0.25, n)[:, None, None]
    wave = np.sin(2 * np.pi * wave_f * (np.cos(wave_th) * xx + np.sin(wave_th) * yy))
    img += wave_on * 0.08 * wave[:, None].astype(np.float32)
    img = img.astype(np.float32)
    label = np.zeros((n, h, w), dtype=np.int64)

    def paint_distractors(active: np.ndarray) -> None:
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            return
        m = idx.size
        cx = _uniform(rng, 0, w, m)
        cy = _uniform(rng, 0, h, m)
        r = _uniform(rng, 0.06, 0.2, m) * smin
        th = _uniform(rng, 0, np.pi, m)
        asp = _uniform(rng, 0.4, 1.0, m)[:, None, None]
        u, v = _local_coords(xx, yy, cx, cy, r, th)
        wob_phase = _uniform(rng, 0, 6.3, m)[:, None, None]
        wobble = 0.15 * np.sin(3.0 * np.arctan2(v, u) + wob_phase)
        mask = (u * u + (v / asp) ** 2) <= (1.0 + wobble) ** 2
        col = _rand_colour(rng, m)
        shade = 0.15 * _smooth_noise(rng, m, 1, 3, (h, w))
        patch = np.clip(col + shade, 0.0, 1.0)
        img[idx] = np.where(mask[:, None], patch, img[idx])
        label[idx] = np.where(mask, 0, label[idx])

    n_distract = rng.integers(1, _MAX_DISTRACTORS + 1, size=n)
    for k in range(_MAX_DISTRACTORS):
        paint_distractors(n_distract > k)

    # --- objects, painted in order (later ones occlude earlier ones) ------------------
    n_obj = rng.integers(2, _MAX_OBJECTS + 1, size=n)
    for k in range(_MAX_OBJECTS):
        cls_k = rng.integers(1, num_classes, size=n)
        cx = _uniform(rng, 0.1, 0.9, n) * w
        cy = _uniform(rng, 0.1, 0.9, n) * h
        r = _uniform(rng, 0.11, 0.25, n) * smin
        th = _uniform(rng, 0, 2 * np.pi, n)
        freq = _uniform(rng, 1.2, 2.0, n)
        phase = _uniform(rng, 0, 2 * np.pi, n)
        aspect = _uniform(rng, 0.4, 0.6, n)
        c1 = _rand_colour(rng, n)
        c2 = np.clip(0.3 * c1 + 0.7 * _rand_colour(rng, n), 0, 1)
        # Guarantee a minimum contrast between the two texture colours.
        low = np.abs(c1 - c2).sum(axis=1, keepdims=True) < 0.45
        c2 = np.where(low, 1.0 - c1, c2).astype(np.float32)
        active = n_obj > k
        for c in range(1, num_classes):
            idx = np.nonzero(active & (cls_k == c))[0]
            if idx.size == 0:
                continue
            u, v = _local_coords(xx, yy, cx[idx], cy[idx], r[idx], th[idx])
            mask, t = _shape_and_texture(c, u, v, freq[idx], phase[idx], aspect[idx], rng)
            t = t[:, None]
            patch = c1[idx] * t + c2[idx] * (1.0 - t)
            img[idx] = np.where(mask[:, None], patch, img[idx])
            label[idx] = np.where(mask, c, label[idx])

    # --- occasional distractor in front of the objects ---------------------------------
    paint_distractors(rng.uniform(size=n) < 0.3)

    # --- photometric jitter and noise ---------------------------------------------------
    contrast = rng.uniform(0.75, 1.25, size=(n, 1, 1, 1)).astype(np.float32)
    bright = rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1)).astype(np.float32)
    img = (img - 0.5) * contrast + 0.5 + bright
    img += noise_std * rng.standard_normal(size=img.shape, dtype=np.float32)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    return img, label


def make_segmentation_dataset(
    n: int,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 5,
    seed: int = 0,
    noise_std: float = 0.05,
) -> TensorDataset:
    """Build a dataset of generated segmentation scenes.

    Args:
        n: Number of images.
        size: ``(H, W)`` of every image.
        num_classes: Number of classes including background (class 0); between 2 and 8.
        seed: Random seed; the same seed always gives the same dataset.
        noise_std: Standard deviation of the additive pixel noise (on the [0, 1] scale).

    Returns:
        ``TensorDataset`` of ``(image, label)`` pairs: ``image`` float32 ``[3, H, W]``
        normalised with :data:`SEGMENTATION_MEAN` / :data:`SEGMENTATION_STD` (roughly zero
        mean, unit std) and ``label`` int64 ``[H, W]`` in ``[0, num_classes)``.
    """
    img, label = generate_segmentation_arrays(n, size, num_classes, seed, noise_std)
    mean = np.asarray(SEGMENTATION_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.asarray(SEGMENTATION_STD, dtype=np.float32)[None, :, None, None]
    img = (img - mean) / std
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(label))


def make_segmentation_splits(
    n_train: int,
    n_val: int,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 5,
    seed: int = 0,
    noise_std: float = 0.05,
) -> tuple[TensorDataset, TensorDataset]:
    """Build train and validation datasets from independent seeds.

    The train split uses ``seed`` and the validation split ``seed + VAL_SEED_OFFSET``.

    Args:
        n_train: Number of training images.
        n_val: Number of validation images.
        size: ``(H, W)`` of every image.
        num_classes: Number of classes including background.
        seed: Base random seed.
        noise_std: Standard deviation of the additive pixel noise.

    Returns:
        ``(train, val)`` datasets as returned by :func:`make_segmentation_dataset`.
    """
    train = make_segmentation_dataset(n_train, size, num_classes, seed, noise_std)
    val = make_segmentation_dataset(n_val, size, num_classes, seed + VAL_SEED_OFFSET, noise_std)
    return train, val
