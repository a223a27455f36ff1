"""ITK / ANTs interchange of transforms: displacement fields in ITK's NIfTI layout and ITK
affine files (text and antsRegistration's MATLAB .mat), read and written by synthkit.transforms
and `mri_synthmorph apply`.

The conventions are checked against ITK's definitions written out here (a field maps the fixed
LPS point p to p + d(p); an affine maps the fixed LPS point x to A (x - c) + t + c), not against
our own reader alone. The end-to-end check with ANTs itself (antspyx) is
scripts/check_itk_interop.py, run by the slow test at the bottom when a Python with antspyx is
there.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.io import savemat

from synthkit import io
from synthkit import transforms as T
from synthkit.models.synthmorph import cli as synthmorph

from helpers import make_affine, rotation

ROOT = Path(__file__).resolve().parents[1]
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
# oblique, anisotropic fixed grid with a non-zero origin: any RAS/LPS or direction slip shows
FIXED = T.Geometry((18, 20, 16), make_affine(rotation(20, 10, -15) * [1.2, 0.9, 1.4],
                                             (-11.0, 14.0, -8.0)))
MOVING = T.Geometry((20, 18, 22), make_affine(rotation(-5) * [1.0, 1.1, 0.95], (-12.0, 12, -10)))


def _field(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    disp = ndimage.gaussian_filter(rng.normal(size=FIXED.shape + (3,)), (3, 3, 3, 0))
    return (disp / np.abs(disp).max() * scale).astype(np.float32)


def _world(affine, ijk):
    return (affine[:3, :3] @ np.asarray(ijk, float).T).T + affine[:3, 3]


def _run(argv):
    with pytest.raises(SystemExit) as e:
        synthmorph.main(argv)
    return e.value.code


# ---------------------------------------------------------------------------------------------
# displacement fields

def test_itk_field_has_itks_layout_and_lps_displacements(tmp):
    disp = _field()
    path = os.path.join(tmp, 'warp.nii.gz')
    T.write_warp(T.Transform(disp=disp, target=FIXED), path, itk=True)
    img = nib.load(path)
    assert img.shape == FIXED.shape + (1, 3) and img.get_data_dtype() == np.float32
    assert int(img.header['intent_code']) == T.NIFTI_INTENT_VECTOR
    assert int(img.header['qform_code']) == 1 and int(img.header['sform_code']) == 1
    np.testing.assert_allclose(img.get_qform(), FIXED.affine, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), FIXED.affine, atol=1e-5)
    # ITK: the fixed physical point p (LPS) maps to p + d; that is our RAS map, flipped
    data = np.asarray(img.dataobj)[:, :, :, 0, :]
    vox = np.argwhere(np.ones(FIXED.shape))[::37]
    p_lps = (FLIP[:3, :3] @ _world(FIXED.affine, vox).T).T
    moved_lps = p_lps + data[tuple(vox.T)]
    ours = _world(FIXED.affine, vox) + disp[tuple(vox.T)]
    np.testing.assert_allclose((FLIP[:3, :3] @ moved_lps.T).T, ours, atol=1e-4)


def test_itk_field_reads_back_as_the_same_transform(tmp):
    disp = _field(1)
    ours, itk = os.path.join(tmp, 'w.nii.gz'), os.path.join(tmp, 'w_itk.nii')
    T.write_warp(T.Transform(disp=disp, target=FIXED), ours)
    T.write_warp(T.Transform(disp=disp, target=FIXED), itk, itk=True)
    assert nib.load(ours).shape == FIXED.shape + (3,)
    a, b = T.read_warp(ours), T.read_warp(itk)
    for t in (a, b):
        np.testing.assert_allclose(t.disp, disp, atol=1e-6)
        np.testing.assert_allclose(t.target.affine, FIXED.affine, atol=1e-5)
    assert T.load_transform(itk).is_warp


def test_a_matrix_saved_as_an_itk_field_is_the_matrix(tmp):
    matrix = make_affine(rotation(12, -7), (3.0, -2.0, 4.0))
    path = os.path.join(tmp, 'm.nii.gz')
    T.write_warp(T.Transform(matrix, MOVING, FIXED), path, itk=True)
    back = T.read_warp(path)
    vox = np.argwhere(np.ones(FIXED.shape))[::53]
    q = _world(FIXED.affine, vox)
    expect = _world(np.linalg.inv(matrix), q)          # the moving point of each fixed point
    np.testing.assert_allclose(q + back.disp[tuple(vox.T)], expect, atol=1e-3)


def test_itk_field_must_be_nifti(tmp):
    with pytest.raises(T.TransformError, match='NIfTI'):
        T.write_warp(T.Transform(disp=_field(), target=FIXED), os.path.join(tmp, 'w.mgz'),
                     itk=True)
    assert not os.listdir(tmp)


def test_a_plain_5d_image_with_more_frames_is_not_a_field(tmp):
    path = os.path.join(tmp, 'five.nii.gz')
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 2, 3), np.float32), np.eye(4)), path)
    with pytest.raises((T.TransformError, io.VolumeError), match='expected'):
        T.read_warp(path)


# ---------------------------------------------------------------------------------------------
# affine files

def _itk_params(path):
    fields = dict(line.split(':', 1) for line in open(path) if ':' in line)
    p = np.array(fields['Parameters'].split(), float)
    return p[:9].reshape(3, 3), p[9:], np.array(fields['FixedParameters'].split(), float)


@pytest.mark.parametrize('name', ['a.txt', 'a.tfm', 'a.mat'])
def test_itk_affine_round_trip(tmp, name):
    matrix = make_affine(rotation(25, -10, 5) @ np.diag([1.1, 0.95, 1.05]), (4.0, -6.5, 2.25))
    path = os.path.join(tmp, name)
    T.write_itk_affine(T.Transform(matrix, MOVING, FIXED), path)
    back = T.load_transform(path)
    assert not back.is_warp and back.target is None
    np.testing.assert_allclose(back.matrix, matrix, atol=1e-9)


def test_itk_affine_text_follows_itks_definition(tmp):
    """ITK's AffineTransform maps the fixed LPS point x to the moving point A x + t (centre 0);
    our matrix maps moving RAS to fixed RAS."""
    matrix = make_affine(rotation(30, 5), (10.0, -4.0, 7.0))
    path = os.path.join(tmp, 'a.txt')
    T.write_itk_affine(T.Transform(matrix), path)
    text = open(path).read()
    assert text.startswith('#Insight Transform File V1.0\n')
    assert 'Transform: AffineTransform_double_3_3\n' in text
    a, t, c = _itk_params(path)
    assert np.allclose(c, 0)
    moving_ras = np.array([[3.0, -7.0, 12.0], [-20.0, 5.0, 1.0]])
    fixed_ras = _world(matrix, moving_ras)
    fixed_lps, moving_lps = fixed_ras * [-1, -1, 1], moving_ras * [-1, -1, 1]
    np.testing.assert_allclose(fixed_lps @ a.T + t, moving_lps, atol=1e-9)


def test_itk_affine_with_a_centre_and_antsregistrations_mat_keys(tmp):
    """antsRegistration writes 'AffineTransform_float_3_3' and a non-zero 'fixed' centre."""
    a = rotation(-12, 8) * 1.05
    t, c = np.array([2.0, -3.0, 5.0]), np.array([10.0, 20.0, -30.0])
    params = np.r_[a.ravel(), t]
    mat = os.path.join(tmp, '0GenericAffine.mat')
    savemat(mat, {'AffineTransform_float_3_3': params.astype(np.float32)[:, None],
                  'fixed': c[:, None]}, format='4')
    txt = os.path.join(tmp, 'centred.txt')
    numbers = lambda v: ' '.join(repr(float(x)) for x in v)  # noqa: E731
    with open(txt, 'w') as f:
        f.write('#Insight Transform File V1.0\n#Transform 0\n'
                'Transform: MatrixOffsetTransformBase_double_3_3\nParameters: %s\n'
                'FixedParameters: %s\n' % (numbers(params), numbers(c)))
    x_lps = np.array([[5.0, -2.0, 9.0], [-14.0, 3.0, 0.5]])
    moving_lps = (x_lps - c) @ a.T + t + c                  # ITK's definition with a centre
    for path, tol in ((txt, 1e-9), (mat, 1e-4)):
        matrix = T.read_itk_affine(path).matrix
        fixed_ras = _world(matrix, moving_lps * [-1, -1, 1])
        np.testing.assert_allclose(fixed_ras * [-1, -1, 1], x_lps, atol=tol)


@pytest.mark.parametrize('text, problem', [
    ('#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\nParameters: 1 2\n',
     'unsupported ITK transform'),
    ('#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 1 2 3\n'
     'FixedParameters: 0 0 0\n', 'expected 12 parameters'),
    ('#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n', 'Parameters'),
    ('#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: '
     + ' '.join(['nan'] * 12) + '\nFixedParameters: 0 0 0\n', 'expected 12 parameters'),
])
def test_bad_itk_affine_is_a_one_line_error(tmp, text, problem):
    path = os.path.join(tmp, 'bad.txt')
    with open(path, 'w') as f:
        f.write(text)
    with pytest.raises(T.TransformError) as e:
        T.load_transform(path)
    assert problem in str(e.value) and '\n' not in str(e.value)


def test_itk_affine_refuses_a_field(tmp):
    with pytest.raises(T.TransformError, match='not a displacement field'):
        T.write_itk_affine(T.Transform(disp=_field(), target=FIXED), os.path.join(tmp, 'a.txt'))


# ---------------------------------------------------------------------------------------------
# mri_synthmorph apply with ITK files

def _blob(geom, centre, sigma=3.0):
    xyz = _world(geom.affine, np.argwhere(np.ones(geom.shape)))
    d2 = ((xyz - centre) ** 2).sum(1)
    return np.exp(-d2 / (2 * sigma ** 2)).reshape(geom.shape).astype(np.float32)


def test_apply_gives_the_same_image_through_lta_itk_text_mat_and_itk_field(tmp, capsys):
    matrix = make_affine(rotation(15, 5), (2.0, -1.0, 3.0))
    # a blob in the moving image that lands in the middle of the fixed grid
    target = _world(FIXED.affine, (np.array(FIXED.shape) - 1) / 2)
    centre = _world(np.linalg.inv(matrix), target)
    img = os.path.join(tmp, 'img.nii.gz')
    nib.save(nib.Nifti1Image(_blob(MOVING, centre), MOVING.affine), img)
    trans = T.Transform(matrix, MOVING, FIXED)
    paths = {n: os.path.join(tmp, n) for n in ('t.lta', 't.txt', 't.mat', 'w.nii.gz',
                                               'w_itk.nii.gz')}
    T.write_lta(trans, paths['t.lta'])
    T.write_itk_affine(trans, paths['t.txt'])
    T.write_itk_affine(trans, paths['t.mat'])
    T.write_warp(trans, paths['w.nii.gz'])
    T.write_warp(trans, paths['w_itk.nii.gz'], itk=True)
    out = {}
    for name, path in paths.items():
        o = os.path.join(tmp, 'out_' + name.replace('.', '_') + '.nii.gz')
        assert _run(['apply', '-H', path, img, o] if name.endswith(('.txt', '.mat', '.lta'))
                    else ['apply', path, img, o]) == 0, name
        out[name] = nib.load(o)
    err = capsys.readouterr().err
    assert 't.txt: an ITK matrix file stores no grid' in err
    # matrices, with -H: same voxels, same new header
    for name in ('t.txt', 't.mat'):
        np.testing.assert_allclose(out[name].affine, out['t.lta'].affine, atol=1e-6)
        np.testing.assert_array_equal(out[name].get_fdata(), out['t.lta'].get_fdata())
    # fields: resampled onto the fixed grid, the ITK one equal to ours
    assert out['w_itk.nii.gz'].shape == FIXED.shape
    np.testing.assert_allclose(out['w_itk.nii.gz'].get_fdata(), out['w.nii.gz'].get_fdata(),
                               atol=1e-5)
    # and the field puts the blob where the matrix does
    moved = out['w.nii.gz'].get_fdata()
    ijk = np.argwhere(np.ones(FIXED.shape))
    assert moved.max() > 0.5
    found = (ijk * moved.reshape(-1, 1)).sum(0) / moved.sum()
    np.testing.assert_allclose(_world(FIXED.affine, found), target, atol=0.3)


# ---------------------------------------------------------------------------------------------
# the same with ANTs itself (slow; needs a Python with antspyx, e.g. make .venv-bench)

def _ants_python():
    for p in (os.environ.get('SYNTHKIT_ANTS_PYTHON'), str(ROOT / '.venv-bench' / 'bin' / 'python')):
        if p and shutil.which(p) and subprocess.run([p, '-c', 'import ants'],
                                                    capture_output=True).returncode == 0:
            return p
    return None


@pytest.mark.slow
def test_ants_reads_our_transforms_and_we_read_ants():
    ants = _ants_python()
    if ants is None:
        pytest.skip('no Python with antspyx (make .venv-bench, or SYNTHKIT_ANTS_PYTHON)')
    p = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'check_itk_interop.py'),
                        '--ants-python', ants], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert '| NO |' not in p.stdout and '| yes |' in p.stdout
