"""synthkit.io: loading checks, atomic saving, conforming to the network space and back, batches."""

import os

import nibabel as nib
import numpy as np
import pytest

from synthkit import geometry, io
from synthkit.io import VolumeError

from helpers import make_affine, rotation


# ---------------------------------------------------------------------------------------------
# phantoms with known geometry

# name -> (shape, vox2world, exact): exact cases are 1 mm and axis-aligned, so conforming is a
# pure permutation/flip/pad and must be lossless
GEOMETRIES = {
    'LIA': ((24, 20, 28), make_affine([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], (12.0, -14.0, 9.0)), True),
    'RAS': ((24, 28, 20), make_affine(np.eye(3), (-11.0, -15.0, -7.0)), True),
    'LPS': ((21, 27, 19), make_affine(np.diag([-1.0, -1.0, 1.0]), (10.0, 13.0, -9.0)), True),
    'aniso': ((24, 28, 10), make_affine(np.diag([1.2, 0.9, 3.0]), (-14.0, -12.0, -15.0)), False),
    'oblique': ((24, 26, 22), make_affine(rotation(deg_z=20, deg_x=20) * 1.1, (-5.0, 8.0, 3.0)), False),
}

# two labelled 3x3x3 cubes (left white matter, right white matter) at known voxel centres
CUBES = {2: (6, 8, 5), 41: (16, 15, 6)}


def _label_phantom(shape):
    lab = np.zeros(shape, np.int32)
    for label, (i, j, k) in CUBES.items():
        lab[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = label
    return lab


def _world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


@pytest.mark.parametrize('name', sorted(GEOMETRIES))
def test_conform_round_trip_keeps_world_positions(name):
    shape, affine, exact = GEOMETRIES[name]
    lab = _label_phantom(shape)
    conf = geometry.conform((lab, affine), rescale=False)

    assert geometry.orientation(conf.affine) == 'LIA'
    assert np.allclose(np.linalg.norm(conf.affine[:3, :3], axis=0), 1)
    assert all(n % 16 == 0 for n in conf.data.shape)
    assert conf.data.dtype == np.float32 and conf.src_shape == shape
    # the network grid covers the whole input field of view
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing='ij')).reshape(3, -1)
    in_net = np.linalg.solve(conf.affine[:3, :3], affine[:3, :3] @ corners + affine[:3, 3:]
                             - conf.affine[:3, 3:])
    assert (in_net > -0.5).all() and (in_net < np.array(conf.data.shape)[:, None] - 0.5).all()

    for label, centre in CUBES.items():
        # (a) the cube's centroid in network space sits where it was in the world
        mask = geometry.conform(((lab == label), affine), rescale=False).data
        centroid = np.argwhere(mask > 0).T @ mask[mask > 0] / mask.sum()
        error = np.linalg.norm(_world(conf.affine, centroid) - _world(affine, centre))
        assert error < (1e-6 if exact else 0.5), (label, error)
    # (b) mapped back with nearest neighbours, the labels land on their original voxels
    back = geometry.to_input_grid(np.rint(conf.data).astype(np.int32), conf, 'nearest')
    assert back.shape == shape and back.dtype == np.int32
    if exact:
        assert np.array_equal(back, lab)
    else:
        for label, centre in CUBES.items():
            assert back[centre] == label


def test_conform_exact_case_is_a_permutation_of_the_input():
    shape, affine, _ = GEOMETRIES['RAS']
    img = np.random.default_rng(1).random(shape).astype(np.float32)
    conf = geometry.conform((img, affine), rescale=False)
    # RAS -> LIA: network axis 0 = -x, axis 1 = -z, axis 2 = +y
    expected = np.transpose(img, (0, 2, 1))[::-1, ::-1, :]
    nz = np.argwhere(conf.data)
    lo, hi = nz.min(0), nz.max(0) + 1
    assert np.array_equal(conf.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], expected)
    assert np.array_equal(geometry.to_input_grid(conf.data, conf, 'linear'), img)


def test_conform_crop_min_shape_and_voxsize():
    shape, affine, _ = GEOMETRIES['RAS']
    img = np.random.default_rng(2).random(shape).astype(np.float32) + 1
    fov_centre = _world(affine, (np.array(shape) - 1) / 2)

    crop = geometry.conform((img, affine), crop=16)
    assert crop.data.shape == (16, 16, 16)
    assert np.linalg.norm(_world(crop.affine, (15 / 2,) * 3) - fov_centre) <= np.sqrt(3) / 2
    assert geometry.conform((img, affine), crop=(17, 16, 40)).data.shape == (32, 16, 48)
    assert geometry.conform((img, affine), min_shape=(40, 16, 16)).data.shape == (48, 32, 32)

    half = geometry.conform((img, affine), voxsize=2.0, orientation='RAS', multiple=1)
    assert half.data.shape == (12, 14, 10)
    assert geometry.orientation(half.affine) == 'RAS'
    assert np.allclose(np.linalg.norm(half.affine[:3, :3], axis=0), 2)
    with pytest.raises(ValueError, match='orientation'):
        geometry.conform((img, affine), orientation='LLA')
    with pytest.raises(VolumeError, match='3-D'):
        geometry.conform((np.stack([img, img], -1), affine))


def test_orientation_codes():
    for name in ('LIA', 'RAS', 'LPS'):
        assert geometry.orientation(GEOMETRIES[name][1]) == name
    assert geometry.orientation(geometry.orientation_matrix('PSR') @ np.diag([2, 1, 3])) == 'PSR'


def test_resample_channels_and_nearest_dtype():
    rng = np.random.default_rng(3)
    src = make_affine(np.eye(3), (0, 0, 0))
    dst = make_affine(np.eye(3), (1, 0, 0))  # one voxel further along x
    arr = rng.random((6, 5, 4, 3)).astype(np.float64)
    out = geometry.resample(arr, src, (6, 5, 4), dst, 'linear')
    assert out.dtype == np.float32 and out.shape == (6, 5, 4, 3)
    assert np.allclose(out[:5], arr[1:]) and (out[5] == 0).all()
    lab = rng.integers(0, 60, (6, 5, 4)).astype(np.int16)
    near = geometry.resample(lab, src, (6, 5, 4), dst, 'nearest', fill=-1)
    assert near.dtype == np.int16 and np.array_equal(near[:5], lab[1:]) and (near[5] == -1).all()


# ---------------------------------------------------------------------------------------------
# intensity rescaling

def test_rescale_maps_percentiles_of_nonzero_voxels_to_unit_range():
    data = np.zeros((10, 10, 10), np.float32)
    data[:5] = np.arange(1, 501).reshape(5, 10, 10)
    lo, hi = np.percentile(np.arange(1, 501), (2, 98))
    out = geometry.rescale_intensities(data, (2, 98))
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert np.allclose(out[data == 250], (250 - lo) / (hi - lo))
    assert (out[5:] == 0).all()  # background stays at 0
    assert (out[(data > 0) & (data <= lo)] == 0).all() and (out[data >= hi] == 1).all()
    full = geometry.rescale_intensities(data, (0, 100))
    assert full[data == 1] == 0 and full[data == 500] == 1


def test_rescale_constant_image_has_no_contrast():
    with pytest.raises(ValueError, match='no contrast'):
        geometry.rescale_intensities(np.full((4, 4, 4), 7.0))
    vol = io.Volume(np.full((4, 4, 4), 7.0), np.eye(4), path='flat.nii.gz')
    with pytest.raises(VolumeError, match='flat.nii.gz: image has no contrast'):
        geometry.conform(vol)


# ---------------------------------------------------------------------------------------------
# save / load

@pytest.mark.parametrize('ext', io.SUPPORTED)
@pytest.mark.parametrize('frames', [None, 3])
def test_save_load_round_trip(tmp, ext, frames):
    rng = np.random.default_rng(4)
    shape = (7, 6, 5) + ((frames,) if frames else ())
    data = rng.normal(size=shape).astype(np.float32)
    affine = GEOMETRIES['oblique'][1]
    path = os.path.join(tmp, 'img' + ext)
    io.save_volume(data, affine, path)
    vol = io.load_volume(path)
    assert vol.data.dtype == np.float32 and np.array_equal(vol.data, data)
    assert np.allclose(vol.affine, affine, atol=1e-5)
    assert vol.nframes == (frames or 1) and vol.shape3 == (7, 6, 5)
    assert np.allclose(vol.voxsize, 1.1, atol=1e-5)
    last = vol.frame(frames - 1) if frames else vol.frame(0)
    assert np.array_equal(last.data, data[..., -1] if frames else data)
    assert os.listdir(tmp) == ['img' + ext]  # no temp file left behind


@pytest.mark.parametrize('ext', ['.nii.gz', '.mgz'])
def test_save_dtypes(tmp, ext):
    affine = GEOMETRIES['LIA'][1]
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 2, 3] = True
    io.save_volume(mask, affine, os.path.join(tmp, 'mask' + ext))
    assert io.load_volume(os.path.join(tmp, 'mask' + ext)).data.dtype == np.uint8
    lab = mask.astype(np.int64) * 41
    io.save_volume(lab, affine, os.path.join(tmp, 'lab' + ext))
    back = io.load_volume(os.path.join(tmp, 'lab' + ext)).data
    assert back.dtype == np.int32 and np.array_equal(back, lab)
    io.save_volume(mask * 2.6, affine, os.path.join(tmp, 'round' + ext), dtype=np.int32)
    assert io.load_volume(os.path.join(tmp, 'round' + ext)).data[1, 2, 3] == 3
    with pytest.raises(VolumeError, match='do not fit'):
        io.save_volume(lab * 2 ** 40, affine, os.path.join(tmp, 'big' + ext))


def test_save_nifti_sets_qform_sform_and_copies_like_header(tmp):
    src = os.path.join(tmp, 'src.nii')
    img = nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), GEOMETRIES['LPS'][1])
    img.header['descrip'] = b'scanner T1'
    img.header.set_xyzt_units('mm', 'msec')
    img.header.set_zooms((1, 1, 1, 2300))
    nib.save(img, src)
    like = io.load_volume(src)
    out = os.path.join(tmp, 'out.nii.gz')
    io.save_volume(like.data * 2, GEOMETRIES['RAS'][1], out, like=like)
    hdr = nib.load(out).header
    assert hdr['descrip'].item().startswith(b'scanner T1')
    assert hdr.get_xyzt_units() == ('mm', 'msec') and hdr.get_zooms()[3] == 2300
    assert hdr['qform_code'] == 1 and hdr['sform_code'] == 1
    assert np.allclose(hdr.get_qform(), GEOMETRIES['RAS'][1])
    assert np.allclose(hdr.get_sform(), GEOMETRIES['RAS'][1])


@pytest.mark.parametrize('ext', ['.mgz', '.mgh'])
def test_lut_embedded_in_mgh_round_trips(tmp, ext, monkeypatch):
    from synthkit import labels
    lab = np.zeros((5, 6, 7), np.int32)
    lab[1, 2, 3], lab[3, 2, 1] = 2, 41
    path = os.path.join(tmp, 'seg' + ext)
    io.save_volume(lab, GEOMETRIES['LIA'][1], path, lut=labels.surfa_lookup([0, 2, 41, 17]))
    vol = io.load_volume(path)  # nibabel still reads the image past the colour table
    assert np.array_equal(vol.data, lab) and np.allclose(vol.affine, GEOMETRIES['LIA'][1])
    lut = io.load_lut(path)
    assert lut[2] == ('Left-Cerebral-White-Matter', (245, 245, 245))
    assert lut[41][0] == 'Right-Cerebral-White-Matter' and lut[17][0] == 'Left-Hippocampus'
    assert sorted(lut) == [0, 2, 17, 41]

    # independent reader: surfa (FreeSurfer's Python I/O). surfa 0.6.3 calls np.fromstring in
    # binary mode, which numpy 2 removed; shim it for the duration of this test.
    sf = pytest.importorskip('surfa')
    if np.lib.NumpyVersion(np.__version__) >= '2.0.0':
        monkeypatch.setattr(np, 'fromstring', lambda s, dtype=float, count=-1, sep='':
                            np.frombuffer(s, dtype=dtype, count=count).copy())
    svol = sf.load_volume(path)
    assert svol.labels[2].name == 'Left-Cerebral-White-Matter'
    assert svol.labels[41].name == 'Right-Cerebral-White-Matter'
    assert np.array_equal(svol.data, lab)
    assert np.allclose(svol.geom.vox2world.matrix, GEOMETRIES['LIA'][1], atol=1e-5)


def test_lut_ignored_for_nifti_and_absent_lut_is_none(tmp):
    from synthkit import labels
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 2
    io.save_volume(lab, np.eye(4), os.path.join(tmp, 'seg.nii.gz'), lut=labels.surfa_lookup())
    assert np.array_equal(io.load_volume(os.path.join(tmp, 'seg.nii.gz')).data, lab)
    io.save_volume(lab, np.eye(4), os.path.join(tmp, 'seg.mgz'))
    assert io.load_lut(os.path.join(tmp, 'seg.mgz')) is None
    assert io.load_lut(os.path.join(tmp, 'seg.nii.gz')) is None


def test_trailing_singleton_dims_are_3d(tmp):
    path = os.path.join(tmp, 'x.nii.gz')
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1, 1), np.float32), np.eye(4)), path)
    vol = io.load_volume(path)
    assert vol.data.shape == (4, 5, 6) and vol.nframes == 1


# ---------------------------------------------------------------------------------------------
# bad inputs: each is a one-line VolumeError naming the file and the problem

def _nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _sform_only(path, affine):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def _truncated(path):
    if path.endswith('.mgz'):
        data = np.random.default_rng(0).random((20, 20, 20), np.float32)
        nib.save(nib.MGHImage(data, np.eye(4)), path)
    else:
        _nifti(path, np.random.default_rng(0).random((20, 20, 20), np.float32))
    with open(path, 'rb') as f:
        raw = f.read()
    with open(path, 'wb') as f:
        f.write(raw[:len(raw) // 2])
    return path


def _text(path):
    with open(path, 'w') as f:
        f.write('this is not an image\n')
    return path


def _singular():
    aff = np.eye(4)
    aff[2, 2] = 0
    return aff


def _nan_affine():
    aff = np.eye(4)
    aff[0, 3] = np.nan
    return aff


BAD = {
    'missing.nii.gz': (lambda p: p, 'not found'),
    'text.nii.gz': (_text, 'not a readable image'),
    'text.nii': (_text, 'not a readable image'),
    'text.mgz': (_text, 'not a readable image'),
    'truncated.nii.gz': (_truncated, 'truncated'),
    'truncated.mgz': (_truncated, 'truncated'),
    'flat.nii.gz': (lambda p: _nifti(p, np.ones((5, 6), np.float32)), '2-D'),
    'five.nii.gz': (lambda p: _nifti(p, np.ones((3, 3, 3, 2, 2), np.float32)), '5-D'),
    'zeros.nii.gz': (lambda p: _nifti(p, np.zeros((3, 3, 3), np.float32)), 'all zeros'),
    'nan.nii.gz': (lambda p: _nifti(p, np.where(np.eye(3)[None] > 0, np.nan, 1.0)), 'NaN'),
    'inf.nii.gz': (lambda p: _nifti(p, np.where(np.eye(3)[None] > 0, -np.inf, 1.0)), 'Inf'),
    'singular.nii.gz': (lambda p: _sform_only(p, _singular()), 'singular'),
    'nanaffine.nii.gz': (lambda p: _sform_only(p, _nan_affine()), 'affine contains NaN'),
    'image.png': (_text, 'unsupported file type'),
    'folder.nii': (os.mkdir, 'directory'),
}


@pytest.mark.parametrize('name', sorted(BAD))
def test_bad_input_raises_clear_volume_error(tmp, name):
    make, problem = BAD[name]
    path = os.path.join(tmp, name)
    make(path)
    with pytest.raises(VolumeError) as info:
        io.load_volume(path)
    message = str(info.value)
    assert message.startswith(path + ': ') and problem in message
    assert '\n' not in message
    assert os.path.realpath(path) not in io._INPUTS


def test_allow_empty(tmp):
    path = _nifti(os.path.join(tmp, 'zeros.nii.gz'), np.zeros((3, 3, 3), np.float32))
    assert not io.load_volume(path, allow_empty=True).data.any()


# ---------------------------------------------------------------------------------------------
# safe writing

def test_save_never_overwrites_an_input(tmp):
    path = _nifti(os.path.join(tmp, 'in.nii.gz'), np.ones((3, 3, 3), np.float32))
    vol = io.load_volume(path)
    before = os.path.getmtime(path), os.path.getsize(path)
    for target in (path, os.path.join(tmp, '.', 'in.nii.gz')):
        with pytest.raises(VolumeError, match='refusing to overwrite an input'):
            io.save_volume(vol.data * 0, vol.affine, target)
        with pytest.raises(VolumeError, match='refusing to overwrite an input'):
            io.check_writable(target)
    assert (os.path.getmtime(path), os.path.getsize(path)) == before


def test_save_is_atomic_and_cleans_up_on_failure(tmp, monkeypatch):
    path = os.path.join(tmp, 'seg.nii.gz')
    io.save_volume(np.ones((3, 3, 3), np.uint8), np.eye(4), path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def broken_save(img, filename):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(nib, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        io.save_volume(np.full((3, 3, 3), 2, np.uint8), np.eye(4), path)
    assert os.listdir(tmp) == ['seg.nii.gz']  # temp removed, old output untouched
    assert io.load_volume(path).data.max() == 1


def test_save_rejects_unsupported_extension_and_bad_affine(tmp):
    with pytest.raises(VolumeError, match='unsupported output file type'):
        io.save_volume(np.ones((3, 3, 3)), np.eye(4), os.path.join(tmp, 'x.img'))
    with pytest.raises(VolumeError, match='singular'):
        io.save_volume(np.ones((3, 3, 3)), _singular(), os.path.join(tmp, 'x.nii'))
    assert os.listdir(tmp) == []


def test_check_writable(tmp):
    io.check_writable(os.path.join(tmp, 'ok.mgz'))
    nested = os.path.join(tmp, 'a', 'b', 'seg.nii.gz')
    io.check_writable(nested)  # creates missing parents, like FreeSurfer tools
    assert os.path.isdir(os.path.dirname(nested))
    assert sorted(os.listdir(tmp)) == ['a']  # no probe file left behind
    assert io.check_writable(os.path.join(tmp, 'vols.csv'), exts=('.csv',)) is None

    with pytest.raises(VolumeError, match='unsupported output file type'):
        io.check_writable(os.path.join(tmp, 'seg.png'))
    os.mkdir(os.path.join(tmp, 'dir.nii.gz'))
    with pytest.raises(VolumeError, match='existing directory'):
        io.check_writable(os.path.join(tmp, 'dir.nii.gz'))
    blocker = os.path.join(tmp, 'file')
    open(blocker, 'w').close()
    with pytest.raises(VolumeError, match='cannot create output directory'):
        io.check_writable(os.path.join(blocker, 'seg.nii.gz'))


def test_check_writable_reports_a_failed_probe_write(tmp, monkeypatch):
    # what a read-only or full directory does to the probe file, simulated so it runs as root too
    def refuse(path):
        raise PermissionError(13, 'Permission denied', os.path.dirname(path))

    monkeypatch.setattr(io, '_reserve_temp', refuse)
    with pytest.raises(VolumeError, match='seg.nii.gz: output directory is not writable'):
        io.check_writable(os.path.join(tmp, 'seg.nii.gz'))


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0,
                    reason='root can write into read-only directories')
def test_check_writable_read_only_directory(tmp):
    ro = os.path.join(tmp, 'ro')
    os.mkdir(ro)
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(VolumeError, match='not writable'):
            io.check_writable(os.path.join(ro, 'seg.nii.gz'))
    finally:
        os.chmod(ro, 0o755)


# ---------------------------------------------------------------------------------------------
# batch inputs

def _touch(*paths):
    for p in paths:
        open(p, 'w').close()


def test_stem():
    assert io.stem('/a/sub-01_T1w.nii.gz') == 'sub-01_T1w'
    assert io.stem('b.MGZ') == 'b' and io.stem('c.mgh') == 'c' and io.stem('d.nii') == 'd'
    assert io.stem('e.v2.nii.gz') == 'e.v2'


def test_batch_single_file(tmp):
    img = os.path.join(tmp, 'sub.nii.gz')
    _touch(img)
    seg = os.path.join(tmp, 'seg.mgz')
    assert io.batch_pairs(img, seg) == [(img, seg)]
    out = os.path.join(tmp, 'out')
    os.mkdir(out)
    assert io.batch_pairs(img, out) == [(img, os.path.join(out, 'sub_synthseg.nii.gz'))]
    new = os.path.join(tmp, 'new') + '/'
    assert io.batch_pairs(img, new, ext='.mgz') == [(img, os.path.join(new, 'sub_synthseg.mgz'))]
    assert os.path.isdir(new)
    assert io.batch_pairs(img, None) == [(img, None)]
    with pytest.raises(ValueError, match='not found'):
        io.batch_pairs(os.path.join(tmp, 'nope.nii'), out)


def test_batch_folder(tmp):
    inp = os.path.join(tmp, 'in')
    os.mkdir(inp)
    _touch(*(os.path.join(inp, n) for n in ('b.mgz', 'a.nii.gz', 'c.nii', 'notes.txt',
                                            '.a.nii.gz.tmp1234.nii.gz')))
    out = os.path.join(tmp, 'out')
    pairs = io.batch_pairs(inp, out)
    assert pairs == [(os.path.join(inp, 'a.nii.gz'), os.path.join(out, 'a_synthseg.nii.gz')),
                     (os.path.join(inp, 'b.mgz'), os.path.join(out, 'b_synthseg.mgz')),
                     (os.path.join(inp, 'c.nii'), os.path.join(out, 'c_synthseg.nii'))]
    assert os.path.isdir(out)
    assert io.batch_optional(inp, os.path.join(tmp, 'post'), '_posteriors', '.mgz')[1] == \
        os.path.join(tmp, 'post', 'b_posteriors.mgz')
    assert io.batch_optional(inp, None, '_posteriors') == [None] * 3
    with pytest.raises(ValueError, match='must be a folder'):
        io.batch_pairs(inp, os.path.join(tmp, 'seg.nii.gz'))
    empty = os.path.join(tmp, 'empty')
    os.mkdir(empty)
    with pytest.raises(ValueError, match='no images'):
        io.batch_pairs(empty, out)


def test_batch_text_lists(tmp):
    ins, outs = os.path.join(tmp, 'in.txt'), os.path.join(tmp, 'out.txt')
    with open(ins, 'w') as f:
        f.write('/d/a.nii.gz\n\n/d/b.mgz\n')
    with open(outs, 'w') as f:
        f.write('/o/a_seg.nii.gz\n/o/b_seg.mgz\n\n')
    assert io.batch_pairs(ins, outs) == [('/d/a.nii.gz', '/o/a_seg.nii.gz'),
                                         ('/d/b.mgz', '/o/b_seg.mgz')]
    assert io.batch_pairs(ins, None) == [('/d/a.nii.gz', None), ('/d/b.mgz', None)]
    with open(outs, 'w') as f:
        f.write('/o/a_seg.nii.gz\n')
    with pytest.raises(ValueError) as info:
        io.batch_pairs(ins, outs)
    message = str(info.value)
    assert ins in message and outs in message and '2' in message and '1' in message
    with pytest.raises(ValueError, match=r'\.txt'):
        io.batch_pairs(ins, os.path.join(tmp, 'seg.nii.gz'))


@pytest.mark.parametrize('code', ['LIA', 'RAS', 'PSR', 'ILA'])
@pytest.mark.parametrize('interp', ['linear', 'nearest'])
def test_resample_of_whole_voxels_is_exact_and_matches_interpolation(code, interp):
    """A grid whose voxel centres fall on the input's (1 mm conform of a 1 mm scan, any axis
    order) is copied voxel for voxel, and that copy equals what interpolation gives."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    data = rng.random((20, 24, 18)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = [-10, -12, -9]
    shape, grid = geometry.conform_grid(data.shape, affine, 1.0, code, multiple=16)
    fast = geometry.resample(data, affine, shape, grid, interp)
    vox = np.linalg.inv(affine) @ grid
    assert geometry._voxel_lattice_map(vox) is not None
    slow = np.empty(shape, np.float32)
    ndimage.affine_transform(data, vox[:3, :3], offset=vox[:3, 3], output_shape=shape,
                             output=slow, order=1 if interp == 'linear' else 0, mode='constant',
                             cval=0, prefilter=False)
    assert np.array_equal(fast, slow)
    assert np.isclose(fast.sum(), data.sum())


def test_resample_of_whole_voxels_crops_pads_and_flips_like_interpolation():
    """Whole-voxel maps of any signed axis order that crop, pad or exactly cover the input,
    on 3-D and 4-D arrays: the strided copy equals nearest-neighbour interpolation."""
    from scipy import ndimage
    rng = np.random.default_rng(1)
    data = rng.random((12, 10, 14, 2)).astype(np.float32) + 1
    for trial in range(40):
        perm = rng.permutation(3)
        signs = rng.choice([-1, 1], 3)
        lin = np.zeros((3, 3))
        lin[perm, np.arange(3)] = signs               # destination axis a <- source axis perm[a]
        shape = tuple(int(data.shape[perm[a]]) + int(rng.integers(-4, 5)) for a in range(3))
        if trial % 4 == 0:                            # exactly the input, flipped / reordered
            shape = tuple(int(data.shape[perm[a]]) for a in range(3))
        off = np.array([(data.shape[perm[a]] - 1 if signs[a] < 0 else 0) for a in range(3)],
                       float)
        off = np.array([off[list(perm).index(k)] for k in range(3)])   # source voxel order
        if trial % 4:
            off += rng.integers(-3, 4, 3)
        vox = np.eye(4)
        vox[:3, :3], vox[:3, 3] = lin, off
        dst_affine = vox                               # source affine: identity
        assert geometry._voxel_lattice_map(vox) is not None
        for arr in (data[..., 0], data):
            fast = geometry.resample(arr, np.eye(4), shape, dst_affine, 'nearest')
            chans = [arr] if arr.ndim == 3 else [arr[..., c] for c in range(arr.shape[3])]
            slow = np.stack([ndimage.affine_transform(c, lin, offset=off, output_shape=shape,
                                                      order=0, mode='constant', cval=0)
                             for c in chans], -1)
            assert fast.shape == slow.shape[:3] + arr.shape[3:]
            assert np.array_equal(fast, slow.reshape(fast.shape)), (perm, signs, off, shape)
            assert fast.flags.c_contiguous


def test_resample_between_voxel_pairs_is_exactly_interpolation():
    """Grids of 1 or 2 source voxels per step, any signed axis order, centres on source centres
    or halfway between two (a 2 mm network grid over a 1 mm scan, either of mri_synthseg's two
    samplings), cropping or padding the input: the means of voxel pairs equal trilinear
    interpolation (ndimage, 'constant' mode) number for number."""
    from scipy import ndimage
    rng = np.random.default_rng(5)
    data = (rng.random((15, 12, 17, 2)) * rng.choice([1e-4, 1, 300], (15, 12, 17, 2))
            ).astype(np.float32)
    tried = 0
    for trial in range(60):
        perm = rng.permutation(3)
        signs = rng.choice([-1, 1], 3)
        steps = rng.choice([1, 2], 3)
        if trial % 5 == 0:
            steps[:] = 2
        lin = np.zeros((3, 3))
        lin[perm, np.arange(3)] = signs * steps
        off = np.zeros(3)
        for a in range(3):
            n = data.shape[perm[a]]
            base = rng.integers(-3, n + 2)
            off[perm[a]] = base + (0.5 if steps[a] == 2 else 0.0)
        shape = tuple(int(rng.integers(3, 12)) for _ in range(3))
        vox = np.eye(4)
        vox[:3, :3], vox[:3, 3] = lin, off
        assert geometry._pair_lattice_map(vox) is not None
        tried += (steps == 2).any()
        for arr in (data[..., 0], data):
            fast = geometry.resample(arr, np.eye(4), shape, vox, 'linear')
            chans = [arr] if arr.ndim == 3 else [arr[..., c] for c in range(arr.shape[3])]
            slow = np.stack([ndimage.affine_transform(c, lin, offset=off, output_shape=shape,
                                                      order=1, mode='constant', cval=0,
                                                      prefilter=False) for c in chans], -1)
            assert np.array_equal(fast, slow.reshape(fast.shape)), (perm, signs, steps, off)
            assert fast.dtype == np.float32
    assert tried > 30
    skewed = np.diag([2.0, 2.0, 2.0, 1.0])
    skewed[0, 3] = 0.25                              # a quarter voxel off: not pairs
    assert geometry._pair_lattice_map(skewed) is None
    skewed[0, 3] = 0.5
    skewed[0, 1] = 0.1                               # sheared
    assert geometry._pair_lattice_map(skewed) is None
    assert geometry._pair_lattice_map(np.diag([3.0, 2.0, 1.0, 1.0])) is None


def test_check_writable_without_create_makes_no_folder(tmp_path):
    target = tmp_path / 'a' / 'b' / 'out.nii.gz'
    io.check_writable(str(target), create=False)
    assert not (tmp_path / 'a').exists()
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(io.VolumeError, match='cannot create output directory'):
        io.check_writable(str(blocker / 'out.nii.gz'), create=False)
    io.check_writable(str(target))                     # the default creates the folders
    assert (tmp_path / 'a' / 'b').is_dir()
