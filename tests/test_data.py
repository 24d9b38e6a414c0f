"""Tests for the generated / bundled data sets and the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kcp_plugin.data import (
    bad_pixel_rate,
    confusion_matrix,
    digits_split_indices,
    generate_segmentation_arrays,
    generate_stereo_arrays,
    iou_from_confusion,
    load_digits_tensors,
    make_digits_splits,
    make_segmentation_dataset,
    make_segmentation_splits,
    make_stereo_dataset,
    make_stereo_splits,
    mean_iou,
    metrics,
    stereo_epe,
    top1,
)

# --------------------------------------------------------------------------- segmentation


def test_segmentation_shapes_dtypes_and_ranges() -> None:
    ds = make_segmentation_dataset(16, size=(48, 40), num_classes=5, seed=3)
    assert len(ds) == 16
    img, lab = ds[0]
    assert img.shape == (3, 48, 40) and img.dtype == torch.float32
    assert lab.shape == (48, 40) and lab.dtype == torch.int64
    labels = ds.tensors[1]
    assert int(labels.min()) >= 0 and int(labels.max()) < 5
    images = ds.tensors[0]
    assert torch.isfinite(images).all()
    # Roughly standardised.
    assert abs(float(images.mean())) < 0.3
    assert 0.6 < float(images.std()) < 1.4


def test_segmentation_deterministic_by_seed() -> None:
    a = make_segmentation_dataset(8, size=(32, 32), seed=11)
    b = make_segmentation_dataset(8, size=(32, 32), seed=11)
    c = make_segmentation_dataset(8, size=(32, 32), seed=12)
    assert torch.equal(a.tensors[0], b.tensors[0])
    assert torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    assert not torch.equal(a.tensors[1], c.tensors[1])


def test_segmentation_splits_are_different_scenes() -> None:
    train, val = make_segmentation_splits(8, 4, size=(32, 32), seed=0)
    assert len(train) == 8 and len(val) == 4
    assert not torch.equal(train.tensors[0][:4], val.tensors[0])
    again, _ = make_segmentation_splits(8, 4, size=(32, 32), seed=0)
    assert torch.equal(train.tensors[1], again.tensors[1])


@pytest.mark.parametrize("num_classes", [2, 5, 8])
def test_segmentation_every_class_present(num_classes: int) -> None:
    _, labels = generate_segmentation_arrays(64, (64, 64), num_classes, seed=0)
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    assert counts.shape[0] == num_classes
    assert (counts > 0).all()
    # Background dominates but objects cover a real part of the image.
    frac_bg = counts[0] / counts.sum()
    assert 0.5 < frac_bg < 0.95
    # Every image contains at least one object pixel.
    assert ((labels > 0).reshape(64, -1).any(axis=1)).all()


def test_segmentation_objects_occlude_and_differ_in_texture() -> None:
    img, labels = generate_segmentation_arrays(64, (64, 64), 5, seed=1, noise_std=0.0)
    # Texture: mean absolute horizontal gradient differs across classes (striped /
    # checkered / dotted / speckled objects are not flat).
    grad = np.abs(np.diff(img, axis=3)).mean(axis=1)
    inner = labels[:, :, 1:] == labels[:, :, :-1]
    per_class = [grad[inner & (labels[:, :, 1:] == c)].mean() for c in range(1, 5)]
    assert min(per_class) > 0.02
    assert max(per_class) > 1.5 * min(per_class)


def test_segmentation_rejects_bad_num_classes() -> None:
    with pytest.raises(ValueError):
        generate_segmentation_arrays(2, (16, 16), num_classes=1)
    with pytest.raises(ValueError):
        generate_segmentation_arrays(2, (16, 16), num_classes=9)


# --------------------------------------------------------------------------- stereo


def _sample_rows(img: np.ndarray, xr: np.ndarray) -> np.ndarray:
    """Linearly interpolate ``img [n, 3, H, W]`` at x = ``xr [n, H, W]`` (same rows)."""
    n, _, h, w = img.shape
    x0 = np.clip(np.floor(xr).astype(np.int64), 0, w - 2)
    a = (xr - x0)[:, None]
    b = np.arange(n)[:, None, None]
    y = np.arange(h)[None, :, None]
    v0 = img[b, :, y, x0].transpose(0, 3, 1, 2)
    v1 = img[b, :, y, x0 + 1].transpose(0, 3, 1, 2)
    return v0 * (1 - a) + v1 * a


def test_stereo_shapes_dtypes_and_range() -> None:
    ds = make_stereo_dataset(6, size=(32, 64), max_disp=16, seed=0)
    left, right, disp = ds[0]
    assert left.shape == (3, 32, 64) and right.shape == (3, 32, 64)
    assert disp.shape == (32, 64)
    assert left.dtype == right.dtype == disp.dtype == torch.float32
    d = ds.tensors[2]
    assert float(d.min()) >= 0.0 and float(d.max()) <= 15.0
    # Foreground objects at large disparity and a background at small disparity.
    assert float(d.max()) > 0.45 * 16 and float(d.min()) < 0.3 * 16


def test_stereo_deterministic_by_seed() -> None:
    a = make_stereo_dataset(3, size=(32, 64), seed=5)
    b = make_stereo_dataset(3, size=(32, 64), seed=5)
    c = make_stereo_dataset(3, size=(32, 64), seed=6)
    for ta, tb, tc in zip(a.tensors, b.tensors, c.tensors):
        assert torch.equal(ta, tb)
        assert not torch.equal(ta, tc)
    train, val = make_stereo_splits(3, 2, size=(32, 64), seed=5)
    assert torch.equal(train.tensors[2], a.tensors[2])
    assert not torch.equal(train.tensors[2][:2], val.tensors[2])


def test_stereo_right_view_is_left_shifted_by_disparity() -> None:
    left, right, disp, disp_r, visible = generate_stereo_arrays(
        8, (48, 96), max_disp=16, seed=2, noise_std=0.0, return_extras=True
    )
    n, h, w = disp.shape
    xx = np.broadcast_to(np.arange(w, dtype=np.float32), (n, h, w))
    # Some pixels are occluded in the right view, most are visible.
    assert 0.6 < visible.mean() < 0.995

    def err(offset: float) -> np.ndarray:
        xr = xx - disp - offset
        return np.abs(_sample_rows(right, xr) - left).mean(axis=1)

    e_true = err(0.0)
    e_wrong = err(2.0)
    ok = visible & (xx - disp - 2.0 >= 0)
    # left(x) ~ right(x - d) at visible points, clearly better than a wrong disparity.
    assert np.mean(e_true[ok]) < 0.006
    assert np.percentile(e_true[ok], 95) < 0.025
    assert np.mean(e_true[ok]) < 0.2 * np.mean(e_wrong[ok])
    # At occluded (but in-frame) pixels the right view shows another surface.
    occluded = ~visible & (xx - disp >= 1)
    assert occluded.sum() > 50
    assert np.mean(e_true[occluded]) > 3 * np.mean(e_true[ok])
    # The surface seen in the right view at x - d has the same disparity.
    b = np.arange(n)[:, None, None]
    y = np.arange(h)[None, :, None]
    xr = np.clip(np.round(xx - disp).astype(np.int64), 0, w - 1)
    assert np.abs(disp_r[b, y, xr] - disp)[visible].max() < 0.6


def test_stereo_slanted_plane_is_exact_everywhere() -> None:
    # Without foreground objects nothing is occluded: every in-frame pixel must match,
    # which also checks the slant (x and y dependence of the disparity) of the plane.
    left, right, disp = generate_stereo_arrays(
        8, (48, 96), max_disp=16, seed=4, noise_std=0.0, max_objects=0
    )
    n, h, w = disp.shape
    xx = np.broadcast_to(np.arange(w, dtype=np.float32), (n, h, w))
    rows_differ = np.abs(disp[:, -1] - disp[:, 0]).mean()
    assert rows_differ > 0.5  # the planes are slanted
    ok = xx - disp - 1.0 >= 0
    err = np.abs(_sample_rows(right, xx - disp) - left).mean(axis=1)[ok]
    err_half = np.abs(_sample_rows(right, xx - disp - 0.5) - left).mean(axis=1)[ok]
    assert err.mean() < 0.005
    assert np.percentile(err, 99) < 0.04
    assert err.mean() < 0.3 * err_half.mean()


def test_stereo_rejects_small_max_disp() -> None:
    with pytest.raises(ValueError):
        generate_stereo_arrays(1, (16, 32), max_disp=4)
    with pytest.raises(ValueError):
        generate_stereo_arrays(1, (16, 32), max_objects=-1)


# --------------------------------------------------------------------------- digits


def test_digits_are_the_real_sklearn_images() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = load_digits_tensors(size=8, channels=1)
    assert images.shape == (1797, 1, 8, 8)
    from kcp_plugin.data.digits import DIGITS_MEAN, DIGITS_STD

    raw = images[:, 0] * DIGITS_STD + DIGITS_MEAN
    np.testing.assert_allclose(raw.numpy(), bunch.images / 16.0, atol=1e-5)
    assert torch.equal(labels, torch.from_numpy(bunch.target.astype(np.int64)))


def test_digits_splits_shapes_labels_and_disjointness() -> None:
    train, val = make_digits_splits(val_fraction=0.2, size=32, seed=0)
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) < 10
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    for ds in (train, val):
        labels = ds.tensors[1]
        assert int(labels.min()) == 0 and int(labels.max()) == 9
        assert set(labels.tolist()) == set(range(10))
    _, all_labels = load_digits_tensors(size=8, channels=1)
    tr_idx, va_idx = digits_split_indices(all_labels.numpy(), 0.2, seed=0)
    assert np.intersect1d(tr_idx, va_idx).size == 0
    assert np.union1d(tr_idx, va_idx).size == 1797
    assert len(tr_idx) == len(train) and len(va_idx) == len(val)
    assert torch.equal(val.tensors[1], all_labels[torch.from_numpy(va_idx)])


def test_digits_split_deterministic_and_seed_dependent() -> None:
    labels = np.repeat(np.arange(10), 30)
    a = digits_split_indices(labels, 0.25, seed=1)
    b = digits_split_indices(labels, 0.25, seed=1)
    c = digits_split_indices(labels, 0.25, seed=2)
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    # Stratified: each class contributes round(0.25 * 30) = 8 validation samples.
    assert np.all(np.bincount(labels[a[1]]) == 8)
    gray, _ = make_digits_splits(size=16, channels=1)
    assert gray.tensors[0].shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError):
        digits_split_indices(labels, 1.0)


# --------------------------------------------------------------------------- metrics


def test_confusion_matrix_and_mean_iou_known_answer() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    cm = confusion_matrix(pred, target, 3)
    expected = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 2]])
    assert torch.equal(cm, expected)
    # IoU: class0 2/(3+3-2)=0.5, class1 2/(2+3-2)=2/3, class2 2/(3+2-2)=2/3.
    iou = iou_from_confusion(cm)
    np.testing.assert_allclose(iou.numpy(), [0.5, 2 / 3, 2 / 3])
    assert mean_iou(pred, target, 3) == pytest.approx((0.5 + 4 / 3) / 3)
    # Logits are arg-maxed over dim 1.
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).unsqueeze(0).float()
    assert mean_iou(logits, target.unsqueeze(0), 3) == pytest.approx(mean_iou(pred, target, 3))


def test_mean_iou_ignore_index_and_absent_classes() -> None:
    target = torch.tensor([0, 0, 255, 1])
    pred = torch.tensor([0, 0, 1, 1])
    assert mean_iou(pred, target, 4, ignore_index=255) == 1.0
    # Classes 2 and 3 appear nowhere and are left out; a perfect result is 1.0.
    assert mean_iou(pred, target, 4) == 1.0
    assert math.isnan(mean_iou(pred, torch.full_like(target, 255), 4, ignore_index=255))
    assert metrics.mean_iou is mean_iou


def test_stereo_metrics_known_answer() -> None:
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pred = torch.tensor([[[1.5, 2.0], [1.0, 4.0]]])
    assert stereo_epe(pred, target) == pytest.approx((0.5 + 0 + 2 + 0) / 4)
    assert stereo_epe(pred.unsqueeze(1), target) == pytest.approx(0.625)
    assert bad_pixel_rate(pred, target, threshold=1.0) == pytest.approx(0.25)
    assert bad_pixel_rate(pred, target, threshold=0.4) == pytest.approx(0.5)
    mask = torch.tensor([[[True, True], [False, True]]])
    assert stereo_epe(pred, target, mask=mask) == pytest.approx(0.5 / 3)
    assert stereo_epe(pred, target, max_disp=3.5) == pytest.approx(2.5 / 3)


def test_top1_known_answer() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([0, 2, 2, 1])
    assert top1(logits, target) == pytest.approx(0.5)
