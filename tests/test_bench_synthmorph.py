"""The pure scoring functions of scripts/bench_synthmorph.py, on small synthetic arrays."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'
if str(_SCRIPTS) not in sys.path:      # where the script finds benchlib, as when run directly
    sys.path.insert(0, str(_SCRIPTS))
_SPEC = importlib.util.spec_from_file_location('bench_synthmorph',
                                               _SCRIPTS / 'bench_synthmorph.py')
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

LIA = np.array([[-1., 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]])


def test_structures_leave_out_background_and_csf():
    assert 0 not in bench.STRUCTURES and 24 not in bench.STRUCTURES
    assert {2, 3, 17, 41, 53, 60} <= set(bench.STRUCTURES)


def test_zero_field_has_no_negative_jacobian():
    disp = np.zeros((6, 7, 8, 3), np.float32)
    det = bench.jacobian_determinant(disp, LIA)
    assert det.shape == (6, 7, 8)
    np.testing.assert_allclose(det, 1, atol=1e-6)
    assert bench.neg_jacobian_percent(det) == 0


def test_affine_field_determinant():
    # disp(x) = (S - I) x in world coordinates: the determinant is det(S) everywhere, whatever
    # the grid's orientation and voxel size
    aff = LIA.copy()
    aff[:3, :3] *= np.array([1.5, 1.0, 2.0])
    s = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.1]])
    vox = np.stack(np.meshgrid(*[np.arange(n) for n in (5, 6, 7)], indexing='ij'), -1)
    world = vox @ aff[:3, :3].T + aff[:3, 3]
    disp = (world @ (s - np.eye(3)).T).astype(np.float32)
    det = bench.jacobian_determinant(disp, aff)
    np.testing.assert_allclose(det, np.linalg.det(s), rtol=1e-4)


def test_folding_field_has_negative_jacobian():
    # a displacement along x that falls by 3 mm per mm over the middle slabs folds space there
    shape = (12, 5, 5)
    disp = np.zeros(shape + (3,), np.float32)
    x = np.arange(shape[0], dtype=np.float32)
    disp[..., 0] = (-3 * np.clip(x - 4, 0, 3))[:, None, None]
    eye = np.eye(4)
    det = bench.jacobian_determinant(disp, eye)
    assert det.min() < 0
    pct = bench.neg_jacobian_percent(det)
    assert 0 < pct < 100
    mask = np.zeros(shape, bool)
    mask[:3] = True            # away from the fold
    assert bench.neg_jacobian_percent(det, mask) == 0
    mask[5] = True             # one folded slab out of four
    assert bench.neg_jacobian_percent(det, mask) == pytest.approx(25)


def test_targets_need_complete_runs():
    per = {2: 0.8}
    full = {'n': 6, 'dice': 0.8, 'neg_jac': 0.01, 'neg_jac_max': 0.05, 'seconds': 10.0,
            'per_label': per}
    summ = {'synthmorph-joint': full,
            'synthmorph-affine': {**full, 'dice': 0.7},
            'ants-syn': {**full, 'dice': 0.79, 'seconds': 200.0}}
    got = {name: met for name, _, met in bench.targets(summ, 6)}
    assert all(got.values()) and len(got) == 7
    summ['ants-syn'] = {**summ['ants-syn'], 'dice': 0.81}
    got = {name: met for name, _, met in bench.targets(summ, 6)}
    assert got['Dice >= ANTs SyN'] is False and got['Dice within 0.02 of ANTs SyN'] is True
    summ['synthmorph-joint'] = {**full, 'seconds': 25.0}
    assert {n: m for n, _, m in bench.targets(summ, 6)}['<= 20 s per pair (end to end)'] is False
    summ['synthmorph-joint'] = full
    summ['ants-syn'] = {**summ['ants-syn'], 'n': 5, 'seconds': 50.0}
    got = {name: met for name, _, met in bench.targets(summ, 6)}
    assert got['>= 10x the speed of ANTs SyN'] is None
    assert got['deformable Dice >= 0.75'] is True


def test_easyreg_target_compares_with_joint():
    full = {'n': 6, 'dice': 0.8, 'neg_jac': 0.0, 'neg_jac_max': 0.0, 'seconds': 10.0,
            'per_label': {2: 0.8}}
    summ = {'synthmorph-joint': full, 'easyreg': {**full, 'dice': 0.79}}
    got = {name: (value, met) for name, value, met in bench.targets(summ, 6)}
    assert got['easyreg Dice >= synthmorph-joint'] == ('-0.010', False)
    summ['easyreg'] = {**full, 'dice': 0.81}
    assert {n: m for n, _, m in bench.targets(summ, 6)}['easyreg Dice >= synthmorph-joint']
    summ['easyreg'] = {**summ['easyreg'], 'n': 3}        # not every pair: not measured
    assert {n: m for n, _, m in bench.targets(summ, 6)}['easyreg Dice >= synthmorph-joint'] \
        is None


def test_easyreg_field_scores_like_a_displacement():
    # an EasyReg coordinate field of a pure shift: no folding, determinant 1
    from synthkit.models.easyreg.inference import transform_from_coordinates
    from synthkit import transforms
    geom = transforms.Geometry((5, 6, 7), LIA)
    coords = bench.transform_from_coordinates(np.zeros((5, 6, 7, 3), np.float32), LIA)
    world = -coords.disp                        # the grid's own RAS coordinates
    trans = transform_from_coordinates(world + np.float32([3, -2, 1]), LIA)
    np.testing.assert_allclose(trans.disp, np.broadcast_to([3, -2, 1], trans.disp.shape),
                               atol=1e-4)
    assert trans.target.shape == geom.shape
    det = bench.jacobian_determinant(trans.disp, trans.target.affine)
    np.testing.assert_allclose(det, 1, atol=1e-5)
