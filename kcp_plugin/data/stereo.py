"""Procedurally generated rectified stereo pairs with exact ground-truth disparity.

A scene is a stack of textured *layers*, each a planar surface in disparity space,
``d(x, y) = a + b * x + c * y`` with ``(x, y)`` left-image pixel coordinates:

* layer 0 is a slanted background plane that covers the whole view (small disparities);
* layers 1..K are foreground objects (ellipses, rectangles, rounded "blobs") on slightly
  slanted planes at larger disparities (nearer to the camera).

Every layer's texture and shape are continuous functions of the *left* coordinates of the
surface point (multi-octave bilinear lattice noise tinted per layer), so both views are
rendered from the same scene description: the left view samples each layer at ``x``, the
right view at the left coordinate ``x_l`` that projects to right pixel ``x_r``, i.e. the
solution of ``x_r = x_l - d(x_l, y)``, which for a plane is
``x_l = (x_r + a + c * y) / (1 - b)``. Both views composite the layers with a z-buffer on
disparity (the largest disparity is nearest and wins), so occlusions are exact and the
regions disoccluded in the right view show the correct background texture.

Convention: a left pixel ``(x, y)`` with disparity ``d`` is seen at ``(x - d, y)`` in the
right image, so ``left[..., y, x] ~= right[..., y, x - d]`` wherever that surface point is
visible in both views.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = [
    "STEREO_MEAN",
    "STEREO_STD",
    "VAL_SEED_OFFSET",
    "generate_stereo_arrays",
    "make_stereo_dataset",
    "make_stereo_splits",
]

STEREO_MEAN = 0.5
"""Mean subtracted from the raw [0, 1] stereo images."""

STEREO_STD = 0.25
"""Std the raw stereo images are divided by (after subtracting the mean)."""

VAL_SEED_OFFSET = 100_003
"""Offset added to ``seed`` for validation splits (train uses ``seed`` itself)."""

# Lattice spacings (pixels) and amplitudes of the texture octaves.
_OCTAVES = ((16.0, 0.45), (8.0, 0.35), (4.0, 0.3), (2.5, 0.2))
# Spacing of the lattice the octaves are resampled onto (the finest octave's spacing).
_FINE_SPACING = 2.5


def _f32(a: np.ndarray | float) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


class _Layer:
    """Vectorised description of one layer slot across the batch (all arrays ``[n]``)."""

    def __init__(
        self, rng: np.random.Generator, n: int, h: int, w: int, max_disp: int, background: bool
    ) -> None:
        self.background = background
        if background:
            # Range of the plane over the frame: <= 0.1 + 0.08 + 0.2 = 0.38 * max_disp.
            b = rng.uniform(-1, 1, n) * 0.08 * max_disp / w
            c = rng.uniform(-0.2, 1, n) * 0.2 * max_disp / h
            lo = rng.uniform(0.02, 0.1, n) * max_disp
            a = lo - np.minimum(0.0, b * (w - 1)) - np.minimum(0.0, c * (h - 1))
        else:
            self.cx = _f32(rng.uniform(0.1, 0.9, n) * w)
            self.cy = _f32(rng.uniform(0.1, 0.9, n) * h)
            self.rx = _f32(rng.uniform(0.08, 0.25, n) * w)
            self.ry = _f32(rng.uniform(0.15, 0.4, n) * h)
            self.kind = rng.integers(0, 3, n)
            self.theta = _f32(rng.uniform(0, np.pi, n))
            self.wob_phase = _f32(rng.uniform(0, 2 * np.pi, n))
            # The shape never reaches further than 1.2 * max(rx, ry) from its centre, so the
            # slant changes the disparity by at most 0.08 * max_disp over the object.
            reach = 1.2 * np.maximum(self.rx, self.ry)
            b = rng.uniform(-1, 1, n) * 0.04 * max_disp / reach
            c = rng.uniform(-1, 1, n) * 0.04 * max_disp / reach
            d_hi = min(0.8 * max_disp, 0.92 * max_disp - 1.0)
            d0 = rng.uniform(0.45 * max_disp, d_hi, n)
            a = d0 - b * self.cx - c * self.cy
        self.a, self.b, self.c = _f32(a), _f32(b), _f32(c)
        self.tint = _f32(rng.uniform(0.15, 0.85, (n, 3, 1, 1)))
        self.contrast = _f32(rng.uniform(0.6, 1.2, (n, 1, 1, 1)))
        # Multi-octave lattice noise, resampled onto one fine lattice so that rendering needs
        # a single bilinear lookup; the texture is a continuous function of (x_l, y). The
        # x-range is generous because the right view samples left coordinates up to
        # x + max_disp (and planes may be slanted).
        self.x_lo, self.x_hi = -2.0 * max_disp - 4.0, w + 2.0 * max_disp + 4.0
        self.y_lo, self.y_hi = -4.0, h + 4.0
        self.spacing = _FINE_SPACING
        gw = int(np.ceil((self.x_hi - self.x_lo) / self.spacing)) + 2
        gh = int(np.ceil((self.y_hi - self.y_lo) / self.spacing)) + 2
        lattice = torch.zeros(n, 3, gh, gw)
        for spacing, amp in _OCTAVES:
            cw = int(np.ceil((self.x_hi - self.x_lo) / spacing)) + 2
            ch = int(np.ceil((self.y_hi - self.y_lo) / spacing)) + 2
            coarse = rng.uniform(-1, 1, (n, 3, ch, cw)).astype(np.float32) * amp
            # Mostly luminance texture with some colour variation.
            coarse = 0.7 * coarse.mean(axis=1, keepdims=True) + 0.3 * coarse
            # Fine-lattice node j sits at lo + j * self.spacing, coarse node k at lo + k * spacing.
            fx = torch.arange(gw, dtype=torch.float32) * self.spacing / spacing / (cw - 1) * 2 - 1
            fy = torch.arange(gh, dtype=torch.float32) * self.spacing / spacing / (ch - 1) * 2 - 1
            grid = torch.stack(torch.meshgrid(fx, fy, indexing="xy"), dim=-1)
            grid = grid.unsqueeze(0).expand(n, gh, gw, 2)
            lattice += F.grid_sample(
                torch.from_numpy(np.ascontiguousarray(coarse)),
                grid,
                mode="bilinear",
                padding_mode="border",
                align_corners=True,
            )
        self.lattice = lattice

    def disparity(self, xl: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """Disparity of the plane at left coordinates ``xl`` (``[n, H, W]``)."""
        return self.a[:, None, None] + self.b[:, None, None] * xl + self.c[:, None, None] * yy

    def left_x_for_right(self, xr: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """Left x coordinate of the plane point that projects to right pixel ``xr``."""
        a, b, c = self.a[:, None, None], self.b[:, None, None], self.c[:, None, None]
        return (xr + a + c * yy) / (1.0 - b)

    def mask(self, xl: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """Boolean coverage of the layer at left coordinates ``(xl, yy)``."""
        if self.background:
            return np.ones(xl.shape, dtype=bool)
        dx = xl - self.cx[:, None, None]
        dy = yy - self.cy[:, None, None]
        ct, st = np.cos(self.theta)[:, None, None], np.sin(self.theta)[:, None, None]
        u = (ct * dx + st * dy) / self.rx[:, None, None]
        v = (-st * dx + ct * dy) / self.ry[:, None, None]
        kind = self.kind[:, None, None]
        ellipse = u * u + v * v <= 1.0
        rect = np.maximum(np.abs(u), np.abs(v)) <= 0.85
        ang = np.arctan2(v, u)
        blob = np.sqrt(u * u + v * v) <= 0.85 + 0.2 * np.sin(
            3 * ang + self.wob_phase[:, None, None]
        )
        return np.where(kind == 0, ellipse, np.where(kind == 1, rect, blob))

    def texture(self, xl: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """RGB texture ``[n, 3, H, W]`` of the layer at left coordinates ``(xl, yy)``."""
        gh, gw = self.lattice.shape[-2:]
        # Lattice node j sits at coordinate lo + j * spacing (align_corners=True).
        nx = (xl - self.x_lo) * (2.0 / self.spacing / (gw - 1)) - 1.0
        ny = (np.broadcast_to(yy, xl.shape) - self.y_lo) * (2.0 / self.spacing / (gh - 1)) - 1.0
        grid = torch.from_numpy(np.stack([nx, ny], axis=-1).astype(np.float32))
        out = F.grid_sample(
            self.lattice, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return self.tint + self.contrast * out.numpy()


def generate_stereo_arrays(
    n: int,
    size: tuple[int, int] = (64, 128),
    max_disp: int = 16,
    seed: int = 0,
    noise_std: float = 0.01,
    return_extras: bool = False,
    max_objects: int = 4,
) -> tuple[np.ndarray, ...]:
    """Generate raw (un-normalised) stereo pairs as numpy arrays.

    Args:
        n: Number of stereo pairs.
        size: ``(H, W)`` of both views.
        max_disp: Disparity range of the scenes; all ground-truth disparities lie in
            ``[0, max_disp - 1]``.
        seed: Seed of the random generator; equal seeds give identical arrays.
        noise_std: Standard deviation of the independent pixel noise added to each view.
        return_extras: Also return the right-view disparity map and the left-view
            visibility mask.
        max_objects: Each scene has between ``min(1, max_objects)`` and ``max_objects``
            foreground objects (0 gives a bare slanted background plane).

    Returns:
        ``(left, right, disparity)``: float32 ``[n, 3, H, W]`` images in [0, 1] and float32
        ``[n, H, W]`` left-view disparity. With ``return_extras`` two more arrays follow:
        ``disparity_right`` float32 ``[n, H, W]`` (disparity of the surface visible at each
        right pixel) and ``visible`` bool ``[n, H, W]``, True where the left pixel's surface
        point is also visible in the right view (not occluded, not out of frame).

    Raises:
        ValueError: If ``max_disp`` < 8, ``n`` < 0 or ``max_objects`` < 0.
    """
    if max_disp < 8:
        raise ValueError(f"max_disp must be >= 8, got {max_disp}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    layers = [_Layer(rng, n, h, w, max_disp, background=True)]
    n_obj = rng.integers(min(1, max_objects), max_objects + 1, n)
    for k in range(max_objects):
        layer = _Layer(rng, n, h, w, max_disp, background=False)
        layer.active = n_obj > k
        layers.append(layer)

    yy, xx = np.meshgrid(
        np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"
    )
    xx_b = np.broadcast_to(xx, (n, h, w))

    def render(right: bool) -> tuple[np.ndarray, np.ndarray]:
        img = np.zeros((n, 3, h, w), dtype=np.float32)
        zbuf = np.full((n, h, w), -np.inf, dtype=np.float32)
        for layer in layers:
            xl = layer.left_x_for_right(xx_b, yy) if right else xx_b
            d = layer.disparity(xl, yy)
            cover = layer.mask(xl, yy)
            if not layer.background:
                cover &= layer.active[:, None, None]
            win = cover & (d > zbuf)
            if not win.any():
                continue
            tex = layer.texture(xl, yy)
            img = np.where(win[:, None], tex, img)
            zbuf = np.where(win, d, zbuf)
        return img, zbuf

    left, disp = render(right=False)
    right, disp_r = render(right=True)
    max_seen = float(disp.max()) if disp.size else 0.0
    if max_seen > max_disp - 1 + 1e-3:  # pragma: no cover - guarded by the layer ranges
        raise RuntimeError(f"generated disparity {max_seen} exceeds max_disp - 1")
    left = np.clip(left + noise_std * rng.standard_normal(left.shape, dtype=np.float32), 0, 1)
    right = np.clip(right + noise_std * rng.standard_normal(right.shape, dtype=np.float32), 0, 1)
    disp = disp.astype(np.float32)
    if not return_extras:
        return left, right, disp

    # A left pixel is visible in the right view when the right z-buffer at x - d holds the
    # same surface (same disparity) and x - d is inside the frame.
    xr = xx_b - disp
    inside = (xr >= 0) & (xr <= w - 1)
    x0 = np.clip(np.floor(xr), 0, w - 1).astype(np.int64)
    x1 = np.clip(x0 + 1, 0, w - 1)
    rows = np.arange(h)[None, :, None]
    batch = np.arange(n)[:, None, None]
    dr0 = disp_r[batch, rows, x0]
    dr1 = disp_r[batch, rows, x1]
    visible = inside & (np.abs(dr0 - disp) < 0.5) & (np.abs(dr1 - disp) < 0.5)
    return left, right, disp, disp_r.astype(np.float32), visible


def make_stereo_dataset(
    n: int,
    size: tuple[int, int] = (64, 128),
    max_disp: int = 16,
    seed: int = 0,
    noise_std: float = 0.01,
) -> TensorDataset:
    """Build a dataset of generated rectified stereo pairs.

    Args:
        n: Number of stereo pairs.
        size: ``(H, W)`` of both views.
        max_disp: Disparity range; ground truth lies in ``[0, max_disp - 1]``.
        seed: Random seed; the same seed always gives the same dataset.
        noise_std: Standard deviation of the per-view pixel noise (on the [0, 1] scale).

    Returns:
        ``TensorDataset`` of ``(left, right, disparity)``: float32 ``[3, H, W]`` views
        normalised with :data:`STEREO_MEAN` / :data:`STEREO_STD` and float32 ``[H, W]``
        left-view disparity in pixels (``left(x) ~ right(x - disparity)``).
    """
    left, right, disp = generate_stereo_arrays(n, size, max_disp, seed, noise_std)[:3]
    left = (left - STEREO_MEAN) / STEREO_STD
    right = (right - STEREO_MEAN) / STEREO_STD
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(left, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(right, dtype=np.float32)),
        torch.from_numpy(disp),
    )


def make_stereo_splits(
    n_train: int,
    n_val: int,
    size: tuple[int, int] = (64, 128),
    max_disp: int = 16,
    seed: int = 0,
    noise_std: float = 0.01,
) -> tuple[TensorDataset, TensorDataset]:
    """Build train and validation stereo datasets from independent seeds.

    The train split uses ``seed`` and the validation split ``seed + VAL_SEED_OFFSET``.

    Args:
        n_train: Number of training pairs.
        n_val: Number of validation pairs.
        size: ``(H, W)`` of both views.
        max_disp: Disparity range.
        seed: Base random seed.
        noise_std: Standard deviation of the per-view pixel noise.

    Returns:
        ``(train, val)`` datasets as returned by :func:`make_stereo_dataset`.
    """
    train = make_stereo_dataset(n_train, size, max_disp, seed, noise_std)
    val = make_stereo_dataset(n_val, size, max_disp, seed + VAL_SEED_OFFSET, noise_std)
    return train, val
