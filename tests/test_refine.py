"""Mutual-information refinement of affine registrations (synthmorph.refine), on a phantom
head seen in two contrasts: a known misalignment recovered, the better start chosen, exact
symmetry."""

import numpy as np
import pytest

from synthkit.models.synthmorph import refine as R

from helpers import make_affine, rotation

# (centre mm, radii mm, T1-like intensity, T2-like intensity): a head, its brain, asymmetric
# inner structures so that every rotation and shift shows
BLOBS = [((0, 0, 0), (62, 70, 56), 0.25, 0.5), ((0, 4, 6), (50, 58, 44), 0.6, 0.35),
         ((-12, 8, 10), (6, 16, 9), 0.1, 0.95), ((14, 6, 10), (6, 16, 9), 0.1, 0.95),
         ((20, -28, -6), (10, 8, 7), 0.9, 0.15), ((-26, 30, 18), (8, 6, 10), 0.8, 0.2)]


def _phantom(affine, shape=(72, 80, 68), contrast=2):
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    img = np.zeros(len(xyz), np.float32)
    for centre, radii, *values in BLOBS:
        r2 = (((xyz - centre) / radii) ** 2).sum(1)
        img[r2 < 1] = values[contrast - 2] * 100
    return img.reshape(shape)


GRID = make_affine(np.diag([2.0, 2.0, 2.0]), (-72.0, -80.0, -68.0))
TRUTH = make_affine(rotation(6, -4, 3), (5.0, -4.0, 3.0))      # moving world -> fixed world


@pytest.fixture(scope='module')
def pair():
    """A T2-like moving image whose head sits at TRUTH^-1 of the fixed (T1-like) one's."""
    fixed = (_phantom(GRID, contrast=2), GRID)
    # the moving grid is the fixed grid moved by TRUTH^-1: its world is the head's own
    moving = (_phantom(GRID, shape=(70, 78, 70), contrast=3), np.linalg.inv(TRUTH) @ GRID)
    return moving, fixed


def _error_mm(matrix, truth, radius=60.0):
    """Largest displacement between two matrices over points 60 mm from the centre."""
    pts = radius * np.vstack([np.eye(3), -np.eye(3)])
    d = (pts @ (matrix - truth)[:3, :3].T) + (matrix - truth)[:3, 3]
    return np.abs(d).max()


def test_refinement_recovers_a_misalignment_across_contrasts(pair):
    moving, fixed = pair
    assert _error_mm(np.eye(4), TRUTH) > 8
    out, info = R.refine(moving, fixed, np.eye(4), kind='similar')
    assert _error_mm(out, TRUTH) < 1.5, out
    assert info['nmi_result'] > info['nmi_identity']
    rigid, _ = R.refine(moving, fixed, np.eye(4), kind='rigid')
    assert _error_mm(rigid, TRUTH) < 1.5
    np.testing.assert_allclose(rigid[:3, :3] @ rigid[:3, :3].T, np.eye(3), atol=1e-9)


def test_the_better_start_is_taken(pair):
    """A wild network matrix (30 mm off) loses to the headers' alignment, and a good one
    wins."""
    moving, fixed = pair
    wild = make_affine(rotation(25), (30.0, 0, -20)) @ TRUTH
    out, info = R.refine(moving, fixed, wild, kind='similar')
    assert info['start'] == 'identity' and _error_mm(out, TRUTH) < 1.5
    near = make_affine(rotation(1), (0.5, 0, 0)) @ TRUTH
    _, info = R.refine(moving, fixed, near, kind='similar')
    assert info['start'] == 'network'
    # the check alone returns the better candidate as it is
    for start, expect in ((wild, np.eye(4)), (near, near)):
        out, info = R.refine(moving, fixed, start, optimize=False)
        np.testing.assert_array_equal(out, expect)
        assert info['nmi_result'] == max(info['nmi_identity'], info['nmi_network'])


def test_refinement_is_exactly_symmetric(pair):
    moving, fixed = pair
    start = make_affine(rotation(2), (1.0, 2.0, -1.0)) @ TRUTH
    fwd, _ = R.refine(moving, fixed, start)
    bwd, _ = R.refine(fixed, moving, np.linalg.inv(start))
    np.testing.assert_allclose(fwd @ bwd, np.eye(4), atol=1e-8)


def test_nmi_peaks_at_the_truth(pair):
    moving, fixed = pair
    m, f = R._Image(*moving), R._Image(*fixed)
    at = R.nmi(m, f, TRUTH, 4.0)
    for off in (make_affine(np.eye(3), (4.0, 0, 0)), make_affine(rotation(0, 5), (0, 0, 0))):
        assert R.nmi(m, f, off @ TRUTH, 4.0) < at
