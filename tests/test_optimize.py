"""Mutual-information optimization of a deformation (synthmorph/optimize.py): the analytic
gradient, recovery of a known displacement across contrasts, symmetry, and the registrar's
optimized level (inverse consistency, swapping the inputs)."""

import json

import numpy as np
import pytest
from scipy import ndimage

from synthkit.models.synthmorph import inference as sm_inference
from synthkit.models.synthmorph import optimize

from test_synthmorph import models  # noqa: F401  (fixture)


def _values(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.random(n).astype(np.float32)
    m = np.clip(0.6 * f + 0.3 * rng.random(n), 0, 1).astype(np.float32)   # related, not equal
    return f, m


def test_mi_of_identical_values_is_their_entropy_and_of_independent_ones_near_zero():
    f, _ = _values()
    same = float(optimize.mi_and_gradients(f, f)[0])
    rng = np.random.default_rng(5)
    indep = float(optimize.mi_and_gradients(f, rng.random(f.size).astype(np.float32))[0])
    assert same > 2.5                   # about log(31) for uniform values over 32 bins
    assert 0 <= indep < 0.3 and indep < same / 10


def test_mi_gradients_match_finite_differences():
    f, m = _values()
    _, d_f, d_m = (np.asarray(x, np.float64) for x in optimize.mi_and_gradients(f, m))
    eps = 1e-3
    rng = np.random.default_rng(1)
    for which, grad in (('f', d_f), ('m', d_m)):
        # values away from bin edges, where the histogram is smooth in the value
        t = (f if which == 'f' else m) * 31
        ok = np.flatnonzero((np.abs(t - np.round(t)) > 0.1) & (t > 0.5) & (t < 30.5))
        for i in rng.choice(ok, 8, replace=False):
            hi, lo = [x.astype(np.float64) for x in (f, m)], [x.astype(np.float64) for x in (f, m)]
            k = 0 if which == 'f' else 1
            hi[k][i] += eps
            lo[k][i] -= eps
            num = (float(optimize.mi_and_gradients(*[x.astype(np.float32) for x in hi])[0]) -
                   float(optimize.mi_and_gradients(*[x.astype(np.float32) for x in lo])[0])) \
                / (2 * eps)
            assert abs(num - grad[i]) < 0.1 * np.abs(grad).max() + 1e-6, (which, i, num, grad[i])


def _phantom(shape=(32, 36, 28), shift=(0.0, 0.0, 0.0), seed=0):
    """A head-like ellipsoid with a smooth random texture (intensities 0.3-0.9, background
    0), moved by ``shift`` voxels: ``moved(x) = object(x - shift)``."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 2.5)
    texture = 0.6 + 0.3 * texture / np.abs(texture).max()
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) - n / 2 for n in shape],
                                indexing='ij'))
    r = np.sqrt(((grid / np.reshape([11, 13, 9], (3, 1, 1, 1))) ** 2).sum(0))
    img = ndimage.gaussian_filter(np.where(r < 1, texture, 0), 0.7)
    return ndimage.shift(img, shift, order=3, mode='constant').astype(np.float32)


def test_optimizer_aligns_a_shifted_object_across_contrasts_and_swapping_negates_it():
    shift = np.array([1.5, -1.0, 0.5])
    fixed = _phantom()
    same = _phantom(shift=shift)
    moving = np.where(same > 0.05, (1.0 - same) ** 2, 0)      # another contrast, inverted
    opt = optimize.MIOptimizer(iterations=40)
    mis = []
    vel = opt.run(fixed, moving, progress=lambda i, mi: mis.append(mi))
    assert len(mis) == 40 and mis[-1] > mis[0] + 0.2
    inside = ndimage.binary_erosion(fixed > 0.1, iterations=3)
    # greedy steps move the strongest edges first: the field points along the shift, and the
    # moved object (judged in the moving image's own contrast) matches the fixed one better
    found = vel[inside].mean(0)
    assert found @ shift / np.linalg.norm(found) / np.linalg.norm(shift) > 0.95, found
    before = np.abs(same - fixed)[inside].mean()
    after = np.abs(sm_inference.warp_image(same, sm_inference.exponential(vel)) - fixed)[
        inside].mean()
    assert after < 0.6 * before, (before, after)
    swapped = opt.run(moving, fixed)
    assert np.abs(swapped + vel).max() < 1e-3 * max(1.0, np.abs(vel).max())


def test_exponential_matches_the_integration_layer():
    from synthkit.layers import IntegrateVelocity
    rng = np.random.default_rng(3)
    vel = ndimage.gaussian_filter(rng.normal(0, 4, (20, 24, 16, 3)), (3, 3, 3, 0)).astype(
        np.float32)
    ours = sm_inference.exponential(vel, 7)
    layer = np.asarray(IntegrateVelocity(7)(vel[None]))[0]
    assert np.abs(ours - layer).max() < 1e-4


def test_optimizer_refuses_bad_settings_and_grids():
    for kw in ({'iterations': -1}, {'step': 0}, {'sigma': 0}, {'bins': 2}):
        with pytest.raises(ValueError):
            optimize.MIOptimizer(**kw)
    with pytest.raises(ValueError, match='share a grid'):
        optimize.MIOptimizer(1).run(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))


def _registrar(models):  # noqa: F811
    wa, wd = models
    card = json.load(open(wd[:-len('.weights.h5')] + '.json'))
    return sm_inference.Registrar(None, (wd, card))


def test_optimized_deformation_is_inverse_consistent_and_swapping_inverts_it(models):  # noqa: F811
    reg = _registrar(models)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -32
    fixed = (_phantom((40, 40, 36)) * 100, affine)
    moving = (_phantom((40, 40, 36), shift=(2.0, -1.0, 1.0)) * 100, affine)
    said = []
    fwd, inv, shape, grid = reg.deformation(moving, fixed, np.eye(4), iterations=15,
                                            progress=said.append)
    assert len(said) == 2 and '15 iterations' in said[1]
    plain, _, pshape, _ = reg.deformation(moving, fixed, np.eye(4), inverse=False)
    assert pshape == shape and np.abs(fwd - plain).max() > 0.1    # the optimization moved it
    inner = tuple(slice(n // 4, -(n // 4)) for n in shape)
    assert np.median(np.abs(sm_inference.compose_displacements(inv, fwd)[inner])) < 0.05
    back, back_inv, _, _ = reg.deformation(fixed, moving, np.eye(4), iterations=15)
    assert np.median(np.abs(back[inner] - inv[inner])) < 0.05
    assert np.median(np.abs(back_inv[inner] - fwd[inner])) < 0.05
