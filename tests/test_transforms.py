"""synthkit.transforms and `mri_synthmorph apply`: LTA files, displacement fields, resampling.

Phantoms are small (about 20^3) so the whole file runs in a few seconds.
"""

import os

import nibabel as nib
import numpy as np
import pytest

from synthkit import transforms as T
from synthkit.models.synthmorph import cli as synthmorph

from helpers import make_affine, rotation


def _world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


# moving: 1 mm RAS; fixed: 1 mm LIA (FreeSurfer's conformed orientation), other shape and origin
MOVING = T.Geometry((22, 20, 18), make_affine(np.eye(3), (-11.0, -10.0, -9.0)), 'moving.nii.gz')
FIXED = T.Geometry((24, 22, 26), make_affine([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], (12.0, -13.0, 11.0)),
                   'fixed.nii.gz')
# oblique, anisotropic grid, to exercise the volume info decomposition
OBLIQUE = T.Geometry((20, 22, 18), make_affine(rotation(15, 10) * [1.1, 0.9, 1.3], (-10, -12, -9)))
# two labelled 3x3x3 cubes at known moving voxels
CUBES = {5: (6, 8, 7), 7: (15, 12, 9)}


def _labels(shape=MOVING.shape):
    lab = np.zeros(shape, np.int16)
    for label, (i, j, k) in CUBES.items():
        lab[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = label
    return lab


def _blob(geom, centre_world, sigma=2.5):
    """A smooth Gaussian blob centred on a world point."""
    ijk = np.indices(geom.shape).reshape(3, -1)
    xyz = geom.affine[:3, :3] @ ijk + geom.affine[:3, 3:]
    d2 = ((xyz - np.asarray(centre_world, float)[:, None]) ** 2).sum(0)
    return np.exp(-d2 / (2 * sigma ** 2)).reshape(geom.shape).astype(np.float32)


def _centroid_world(data, affine):
    w = np.asarray(data, float)
    ijk = np.indices(w.shape).reshape(3, -1)
    c = (ijk * w.ravel()).sum(1) / w.sum()
    return _world(affine, c)


# ---------------------------------------------------------------------------------------------
# LTA files

def test_lta_ras2ras_round_trip(tmp):
    matrix = make_affine(rotation(20, -5), (2.0, -3.0, 1.5))
    trans = T.Transform(matrix, OBLIQUE, FIXED, subject='bert')
    path = os.path.join(tmp, 'sub', 't.lta')
    T.write_lta(trans, path)

    text = open(path).read()
    assert 'type      = 1 # LINEAR_RAS_TO_RAS\nnxforms   = 1\n' in text
    for line in ('mean      = 0.0000 0.0000 0.0000', 'sigma     = 1.0000', '1 4 4',
                 'src volume info', 'dst volume info', 'subject bert', 'fscale 0.100000'):
        assert line + '\n' in text
    assert [f for f in os.listdir(os.path.dirname(path))] == ['t.lta']  # no temp file left

    back = T.read_lta(path)
    assert not back.is_warp
    np.testing.assert_allclose(back.matrix, matrix, atol=1e-12)
    assert back.source.shape == OBLIQUE.shape and back.target.shape == FIXED.shape
    np.testing.assert_allclose(back.source.affine, OBLIQUE.affine, atol=1e-12)
    np.testing.assert_allclose(back.target.affine, FIXED.affine, atol=1e-12)
    assert back.target.filename == 'fixed.nii.gz' and back.subject == 'bert'


def test_lta_vox2vox_round_trip_is_converted_to_ras2ras(tmp):
    matrix = make_affine(rotation(-30, 12), (4.0, 1.0, -2.5))
    path = os.path.join(tmp, 'v.lta')
    T.write_lta(T.Transform(matrix, OBLIQUE, FIXED), path, lta_type=T.LINEAR_VOX_TO_VOX)
    assert open(path).read().count('type      = 0 # LINEAR_VOX_TO_VOX\n') == 1
    back = T.read_lta(path)
    np.testing.assert_allclose(back.matrix, matrix, atol=1e-10)


# A type-0 file as FreeSurfer writes it: comments, an empty filename, trailing comments.
# src: 10^3 voxels of 2 mm, RAS axes, centre (voxel 5, 5, 5) at world (0, 0, 0);
# dst: FreeSurfer's conformed 256^3 LIA grid centred on (0, 0, 0), whose vox2ras is well known.
VOX2VOX_LTA = """\
# transform file reg.lta
# created by someone on Mon Jan  1 00:00:00 2024

type      = 0 # LINEAR_VOX_TO_VOX
nxforms   = 1
mean      = 0.0000 0.0000 0.0000
sigma     = 10000.0000
1 4 4
0.000000000000000e+00 -2.000000000000000e+00 0.000000000000000e+00 1.400000000000000e+02 
0.000000000000000e+00 0.000000000000000e+00 -2.000000000000000e+00 1.300000000000000e+02 
2.000000000000000e+00 0.000000000000000e+00 0.000000000000000e+00 1.200000000000000e+02 
0.000000000000000e+00 0.000000000000000e+00 0.000000000000000e+00 1.000000000000000e+00 
src volume info
valid = 1  # volume info valid
filename = 
volume = 10 10 10
voxelsize = 2.000000000000000e+00 2.000000000000000e+00 2.000000000000000e+00
xras   = 1.000000000000000e+00 0.000000000000000e+00 0.000000000000000e+00
yras   = 0.000000000000000e+00 1.000000000000000e+00 0.000000000000000e+00
zras   = 0.000000000000000e+00 0.000000000000000e+00 1.000000000000000e+00
cras   = 0.000000000000000e+00 0.000000000000000e+00 0.000000000000000e+00
dst volume info
valid = 1  # volume info valid
filename = /subjects/bert/mri/orig.mgz
volume = 256 256 256
voxelsize = 1.000000000000000e+00 1.000000000000000e+00 1.000000000000000e+00
xras   = -1.000000000000000e+00 0.000000000000000e+00 0.000000000000000e+00
yras   = 0.000000000000000e+00 0.000000000000000e+00 -1.000000000000000e+00
zras   = 0.000000000000000e+00 1.000000000000000e+00 0.000000000000000e+00
cras   = 0.000000000000000e+00 0.000000000000000e+00 0.000000000000000e+00
subject bert
fscale 0.150000
"""


def test_freesurfer_vox2vox_file_reads_with_volume_infos(tmp):
    path = os.path.join(tmp, 'reg.lta')
    with open(path, 'w') as f:
        f.write(VOX2VOX_LTA)
    trans = T.read_lta(path)
    conformed = np.array([[-1, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1.]])
    np.testing.assert_allclose(trans.target.affine, conformed)
    np.testing.assert_allclose(trans.source.affine, make_affine(2 * np.eye(3), (-10, -10, -10)))
    assert trans.source.filename == '' and trans.target.filename == '/subjects/bert/mri/orig.mgz'
    assert (trans.subject, trans.fscale) == ('bert', 0.15)
    # the RAS matrix takes each src voxel's world point to the world point of the dst voxel
    # that the file's vox2vox matrix gives
    v2v = np.array([[0, -2, 0, 140], [0, 0, -2, 130], [2, 0, 0, 120], [0, 0, 0, 1.]])
    for p in ([0, 0, 0], [9, 3, 5], [2, 7, 1]):
        src_world = _world(trans.source.affine, p)
        dst_world = _world(conformed, (v2v @ np.r_[p, 1])[:3])
        np.testing.assert_allclose((trans.matrix @ np.r_[src_world, 1])[:3], dst_world,
                                   atol=1e-9)
    np.testing.assert_allclose(trans.vox2vox(), v2v, atol=1e-9)


def test_invalid_geometry_reads_as_none_and_writes_valid_0(tmp):
    path = os.path.join(tmp, 'n.lta')
    T.write_lta(T.Transform(np.eye(4), None, FIXED), path)
    assert 'valid = 0  # volume info invalid\n' in open(path).read()
    back = T.read_lta(path)
    assert back.source is None and back.target.shape == FIXED.shape
    with pytest.raises(ValueError, match='needs a matrix transform with source and target'):
        T.write_lta(back, path + '0.lta', lta_type=T.LINEAR_VOX_TO_VOX)


@pytest.mark.parametrize('edit, problem', [
    (lambda s: s.replace('type      = 0', 'type      = 14'), 'unsupported LTA type 14'),
    (lambda s: s.replace('nxforms   = 1', 'nxforms   = 2'), 'holds 2 transforms'),
    (lambda s: s.replace('1.300000000000000e+02 \n', '\n'), 'matrix needs 4 rows of 4 numbers'),
    (lambda s: s.replace('2.000000000000000e+00 0.000000000000000e+00 0.000000000000000e+00 1.2',
                         '0 0 0 1.2'), 'singular'),
    (lambda s: s.replace('volume = 10 10 10', 'volume = 10 10'), "'volume' needs 3 numbers"),
    (lambda s: s.replace('src volume info\nvalid = 1', 'src volume info\nvalid = 0'),
     'LINEAR_VOX_TO_VOX transform needs valid src and dst'),
    (lambda s: 'hello\n', "expected 'type'"),
    (lambda s: '', 'empty'),
])
def test_bad_lta_is_one_line_error(tmp, edit, problem):
    path = os.path.join(tmp, 'bad.lta')
    with open(path, 'w') as f:
        f.write(edit(VOX2VOX_LTA))
    with pytest.raises(T.TransformError, match=problem) as e:
        T.read_lta(path)
    assert str(e.value).startswith(path + ': ') and '\n' not in str(e.value)


def test_lta_matches_surfa(tmp):
    """surfa (what FreeSurfer's mri_synthmorph uses) reads our files and we read its files."""
    sf = pytest.importorskip('surfa')
    matrix = make_affine(rotation(20, -5), (2.0, -3.0, 1.5))
    ours = os.path.join(tmp, 'ours.lta')
    T.write_lta(T.Transform(matrix, OBLIQUE, FIXED), ours)
    aff = sf.load_affine(ours)
    assert aff.space == 'world'
    np.testing.assert_allclose(aff.matrix, matrix, atol=1e-12)
    np.testing.assert_allclose(aff.source.vox2world.matrix, OBLIQUE.affine, atol=1e-9)
    np.testing.assert_allclose(aff.target.vox2world.matrix, FIXED.affine, atol=1e-9)

    theirs = os.path.join(tmp, 'theirs.lta')
    geom = [sf.ImageGeometry(g.shape, vox2world=g.affine) for g in (OBLIQUE, FIXED)]
    sf.Affine(matrix, source=geom[0], target=geom[1], space='world').convert(
        space='voxel').save(theirs)
    np.testing.assert_allclose(T.read_lta(theirs).matrix, matrix, atol=1e-9)

    # the same resampled image, away from the border strip where the two samplers' edge rules
    # differ (surfa samples up to n - 1 + 1 voxel, scipy up to n - 1)
    data = _blob(OBLIQUE, (1, 2, 0), sigma=4)
    ref = sf.Volume(data, geom[0]).transform(aff, method='linear')
    out, affine = T.apply(T.read_lta(ours), (data, OBLIQUE.affine))
    np.testing.assert_allclose(ref.geom.vox2world.matrix, affine, atol=1e-9)
    inside = (out != 0) & (np.asarray(ref.data) != 0)
    assert inside.sum() > 0.3 * out.size
    np.testing.assert_allclose(out[inside], np.asarray(ref.data)[inside], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# applying

def test_rotation_moves_labels_to_their_expected_world_position():
    # 90 degrees about z plus whole-millimetre shifts: every moving voxel lands on a fixed voxel
    matrix = make_affine(rotation(90), (2.0, -3.0, 1.0))
    trans = T.Transform(matrix, MOVING, FIXED)
    lab = _labels()
    out, affine = T.apply(trans, (lab, MOVING.affine), method='nearest')
    assert out.shape == FIXED.shape and out.dtype == lab.dtype
    np.testing.assert_array_equal(affine, FIXED.affine)
    assert set(np.unique(out)) == {0, 5, 7}
    for label, ijk in CUBES.items():
        fixed_world = (matrix @ np.r_[_world(MOVING.affine, ijk), 1])[:3]
        v = np.linalg.solve(FIXED.affine[:3, :3], fixed_world - FIXED.affine[:3, 3])
        np.testing.assert_allclose(v, np.round(v), atol=1e-9)
        i, j, k = np.round(v).astype(int)
        assert (out[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] == label).all()
        assert (out == label).sum() == 27

    smooth, _ = T.apply(trans, (lab, MOVING.affine), method='linear', dtype=np.float32)
    assert smooth.dtype == np.float32
    np.testing.assert_allclose(smooth, out, atol=1e-4)  # grid-aligned: linear is exact too


def test_oblique_rotation_linear_moves_blob_centre():
    matrix = make_affine(rotation(23, 11), (1.7, -2.4, 3.1))
    centre = np.array([-1.0, 1.5, 0.5])
    blob = _blob(MOVING, centre)
    out, affine = T.apply(T.Transform(matrix, MOVING, FIXED), (blob, MOVING.affine))
    assert out.dtype == np.float32
    expected = (matrix @ np.r_[centre, 1])[:3]
    np.testing.assert_allclose(_centroid_world(out, affine), expected, atol=0.1)
    np.testing.assert_allclose(out.sum(), blob.sum(), rtol=0.02)  # rigid: mass is kept


def test_translation_warp_equals_matrix(tmp):
    shift = np.array([2.5, -1.25, 3.0])
    matrix = make_affine(np.eye(3), shift)
    # the moving-world point of fixed point x is inv(M) x = x - shift
    disp = np.broadcast_to(-shift, FIXED.shape + (3,)).astype(np.float32)
    warp = T.Transform(disp=disp, target=FIXED)
    data = _blob(MOVING, (0.5, -1, 2)) * 100
    want, want_aff = T.apply(T.Transform(matrix, MOVING, FIXED), (data, MOVING.affine))
    got, got_aff = T.apply(warp, (data, MOVING.affine))
    np.testing.assert_array_equal(got_aff, want_aff)
    np.testing.assert_allclose(got, want, atol=1e-4)

    # through a file, and for a rotation via Transform.as_warp as well
    path = os.path.join(tmp, 'warp.nii.gz')
    T.write_warp(warp, path)
    back = T.load_transform(path)
    assert back.is_warp and back.disp.shape == FIXED.shape + (3,)
    np.testing.assert_allclose(T.apply(back, (data, MOVING.affine))[0], want, atol=1e-4)
    rot = T.Transform(make_affine(rotation(17, 9), shift), MOVING, FIXED)
    np.testing.assert_allclose(T.apply(rot.as_warp(), (data, MOVING.affine))[0],
                               T.apply(rot, (data, MOVING.affine))[0], atol=1e-3)


def test_identity_reproduces_input_on_same_grid():
    data = (_blob(OBLIQUE, (0, 0, 0)) * 1000).astype(np.int16)
    frames = np.stack([data, 2 * data, np.zeros_like(data)], axis=-1)
    ident = T.Transform(np.eye(4), OBLIQUE, OBLIQUE)
    zero_warp = T.Transform(disp=np.zeros(OBLIQUE.shape + (3,)), target=OBLIQUE)
    for trans in (ident, zero_warp):
        for method in ('linear', 'nearest'):
            out, affine = T.apply(trans, (frames, OBLIQUE.affine), method=method)
            assert out.dtype == np.int16 and out.shape == frames.shape
            np.testing.assert_array_equal(out, frames)
            np.testing.assert_allclose(affine, OBLIQUE.affine)


def test_unknown_target_resamples_onto_the_input_grid():
    lab = _labels()
    out, affine = T.apply(T.Transform(make_affine(np.eye(3), (1.0, 0, 0)), None, None),
                          (lab, MOVING.affine), method='nearest')
    np.testing.assert_array_equal(affine, MOVING.affine)
    np.testing.assert_array_equal(out[1:], lab[:-1])  # content moved by +1 mm along R


def test_header_only_changes_only_the_affine():
    matrix = make_affine(rotation(23, 11), (1.7, -2.4, 3.1))
    lab = _labels()
    data, affine = T.header_only(T.Transform(matrix, MOVING, FIXED), (lab, MOVING.affine))
    assert data is lab
    np.testing.assert_allclose(affine, matrix @ MOVING.affine)
    warp = T.Transform(disp=np.zeros(FIXED.shape + (3,)), target=FIXED)
    with pytest.raises(ValueError, match='displacement field'):
        T.header_only(warp, (lab, MOVING.affine))


def test_output_type_and_range():
    lab = _labels().astype(np.uint8)
    trans = T.Transform(np.eye(4), MOVING, MOVING)
    away = T.Transform(make_affine(np.eye(3), (50.0, 0, 0)), MOVING, MOVING)
    for method in ('linear', 'nearest'):
        with pytest.raises(ValueError, match='do not fit in uint8'):
            T.apply(away, (lab, MOVING.affine), method=method, fill=-1)
    out, _ = T.apply(away, (lab, MOVING.affine), method='nearest', fill=-1, dtype=np.int16)
    assert out.dtype == np.int16 and (out == -1).all()
    out, _ = T.apply(trans, (lab, MOVING.affine), dtype='float32')
    assert out.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# mri_synthmorph apply

def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _run(argv):
    with pytest.raises(SystemExit) as e:
        synthmorph.main(argv)
    return e.value.code


@pytest.fixture
def case(tmp):
    """A moving label map, a second image, and an LTA written as register -t would."""
    lab = _save(os.path.join(tmp, 'lab.nii.gz'), _labels(), MOVING.affine)
    img = _save(os.path.join(tmp, 'img.mgz'), _blob(MOVING, (0, 0, 0)), MOVING.affine)
    matrix = make_affine(rotation(90), (2.0, -3.0, 1.0))
    lta = os.path.join(tmp, 'trans.lta')
    T.write_lta(T.Transform(matrix, MOVING, FIXED), lta)
    return tmp, lab, img, lta, matrix


def test_cli_applies_to_each_pair(case, capsys):
    tmp, lab, img, lta, matrix = case
    out_lab, out_img = os.path.join(tmp, 'o', 'lab.mgz'), os.path.join(tmp, 'o', 'img.nii')
    assert _run(['apply', '-m', 'nearest', lta, lab, out_lab, img, out_img]) == 0
    assert capsys.readouterr().err == ''
    got = nib.load(out_lab)
    np.testing.assert_allclose(got.affine, FIXED.affine, atol=1e-5)
    assert got.shape == FIXED.shape and set(np.unique(np.asarray(got.dataobj))) == {0, 5, 7}
    assert np.asarray(nib.load(out_img).dataobj).dtype == np.float32


def test_cli_header_only(case):
    tmp, lab, img, lta, matrix = case
    out = os.path.join(tmp, 'h.nii.gz')
    assert _run(['apply', '-H', '-t', 'int32', lta, lab, out]) == 0
    got = nib.load(out)
    assert got.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asarray(got.dataobj), _labels())
    np.testing.assert_allclose(got.affine, matrix @ MOVING.affine, atol=1e-5)


def test_cli_odd_number_of_paths_is_usage_error(case, capsys):
    tmp, lab, img, lta, _ = case
    assert _run(['apply', lta, lab, os.path.join(tmp, 'o.nii'), img]) == 2
    assert 'input/output pairs' in capsys.readouterr().err


def test_cli_missing_or_bad_transform_is_one_line(case, capsys):
    tmp, lab, img, lta, _ = case
    out = os.path.join(tmp, 'o.nii')
    missing = os.path.join(tmp, 'nope.lta')
    assert _run(['apply', missing, lab, out]) == 1
    assert capsys.readouterr().err == 'mri_synthmorph: error: %s: file not found\n' % missing
    junk = os.path.join(tmp, 'junk.lta')
    with open(junk, 'w') as f:
        f.write('not a transform\n')
    assert _run(['apply', junk, lab, out]) == 1
    err = capsys.readouterr().err
    assert err.startswith('mri_synthmorph: error: %s: ' % junk) and err.count('\n') == 1
    assert _run(['apply', '-H', img, lab, out]) == 1  # an image is a (bad) warp here
    assert capsys.readouterr().err.count('\n') == 1
    assert not os.path.exists(out)


def test_cli_header_only_needs_a_matrix(case, capsys):
    tmp, lab, img, lta, _ = case
    warp = os.path.join(tmp, 'w.nii.gz')
    T.write_warp(T.Transform(disp=np.zeros(FIXED.shape + (3,)), target=FIXED), warp)
    assert _run(['apply', '-H', warp, lab, os.path.join(tmp, 'o.nii')]) == 1
    assert '-H needs a matrix transform' in capsys.readouterr().err


def test_cli_batch_continues_past_a_bad_image(case, capsys):
    tmp, lab, img, lta, _ = case
    bad = os.path.join(tmp, 'bad.nii.gz')
    with open(bad, 'wb') as f:
        f.write(b'garbage')
    outs = [os.path.join(tmp, 'o%d.nii.gz' % i) for i in range(3)]
    assert _run(['apply', lta, lab, outs[0], bad, outs[1], img, outs[2]]) == 1
    err = capsys.readouterr().err
    assert err.startswith('mri_synthmorph: error: %s: not a readable image' % bad)
    assert '1 of 3 input(s) failed' in err
    assert os.path.exists(outs[0]) and not os.path.exists(outs[1]) and os.path.exists(outs[2])


def test_cli_never_writes_over_an_input(case, capsys):
    tmp, lab, img, lta, _ = case
    before = open(img, 'rb').read()
    assert _run(['apply', lta, lab, img, img, os.path.join(tmp, 'o.nii')]) == 1
    assert 'is also an input' in capsys.readouterr().err
    assert open(img, 'rb').read() == before and not os.path.exists(os.path.join(tmp, 'o.nii'))
