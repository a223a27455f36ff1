"""Overlap and distance measures of synthkit.metrics on small arrays with known answers."""

import numpy as np
import pytest
from scipy import ndimage

from synthkit import metrics


def test_dice_table_known_overlaps():
    fixed = np.zeros((4, 4, 4), np.int16)
    moved = np.zeros_like(fixed)
    fixed[:2] = 2          # 32 voxels
    moved[:1] = 2          # 16 voxels, all inside: Dice 2*16/48
    fixed[3, :2] = 17      # 8 voxels, absent from moved: Dice 0
    moved[3, 2:] = 41      # only in moved: not scored (absent from fixed)
    fixed[2, 0, 0] = 24    # not among the labels asked for: not scored
    moved[2, 0, 0] = 24
    d = metrics.dice_table(moved, fixed, [2, 17, 41])
    assert set(d) == {2, 17}
    assert d[2] == pytest.approx(2 * 16 / 48)
    assert d[17] == 0
    assert metrics.dice_table(fixed, fixed, [2, 17]) == {2: 1.0, 17: 1.0}
    assert set(metrics.dice_table(moved, fixed)) == {2, 17, 24}     # default: labels of ref
    assert metrics.mean_dice(moved, fixed, [2, 17]) == pytest.approx((2 * 16 / 48) / 2)


def test_dice_table_shape_mismatch():
    with pytest.raises(ValueError):
        metrics.dice_table(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_dice_of_masks_and_per_label():
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    a[:2] = True
    b[1:3] = True
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert np.isnan(metrics.dice(np.zeros(3, bool), np.zeros(3, bool)))
    per = metrics.dice_per_label(a.astype(int), b.astype(int) * 2, [1, 2, 3])
    assert per[0] == 0 and per[1] == 0 and np.isnan(per[2])


def test_mean_surface_distance_of_shifted_cubes():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    assert metrics.mean_surface_distance(a, a) == 0
    b = np.roll(a, 2, axis=0)
    d = metrics.mean_surface_distance(a, b)
    assert 0.5 < d < 2.0                              # faces 2 voxels apart, others touching
    assert metrics.mean_surface_distance(a, b, voxsize=(2, 1, 1)) > d
    assert np.isnan(metrics.mean_surface_distance(a, np.zeros_like(a)))


def test_centroid_offsets():
    ref = np.zeros((10, 10, 10), np.int32)
    ref[2:5, 2:5, 2:5] = 3
    pred = np.roll(ref, 1, axis=2)
    off = metrics.centroid_offsets(pred, ref, [3, 4])
    assert list(off) == [3] and np.allclose(off[3], [0, 0, 1])


def test_correlation_and_ssim_of_images():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((20, 20, 20)), 2)
    a = (a - a.min()) / (a.max() - a.min())
    assert metrics.correlation(a, 3 * a + 1) == pytest.approx(1.0)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    mask = np.zeros(a.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    assert 0 < metrics.ssim(a, noisy, mask) < 0.9
    assert metrics.correlation(a, noisy, mask) < metrics.correlation(a, a, mask)
    assert metrics.ssim(a, 1 - a) < 0
