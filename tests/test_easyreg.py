"""EasyReg: centroid affine (robust, symmetric), FreeSurfer's coordinate-field format,
`mri_easyreg` end to end on phantoms (random-weight deformable model, given segmentations) and
`mri_easywarp`."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from synthkit import io, transforms
from synthkit.models.easyreg import cli, easywarp
from synthkit.models.easyreg import inference as er
from synthkit.models.synthmorph import network as morph

from helpers import make_affine, rotation, seeded

LABELS = (2, 3, 4, 10, 11, 12, 17, 41, 42, 43, 49, 50)


def _label_phantom(shape=(40, 44, 36)):
    """Twelve labelled boxes inside a head-sized ellipsoid (the rest label 24)."""
    seg = np.zeros(shape, np.int32)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    seg[(grid ** 2).sum(0) < 0.8] = 24
    k = 0
    for i in (10, 20):
        for j in (8, 18, 28):
            for z in (9, 21):
                seg[i:i + 8, j:j + 8, z:z + 7] = LABELS[k]
                k += 1
    return seg


def _transform_points(m, pts):
    return pts @ m[:3, :3].T + m[:3, 3]


def test_robust_affine_ignores_outliers():
    rng = np.random.default_rng(0)
    truth = make_affine(rotation(deg_z=12, deg_x=-5) @ np.diag([1.05, 0.95, 1.0]))
    truth[:3, 3] = [4, -6, 3]
    src = rng.normal(0, 30, (30, 3))
    dst = _transform_points(truth, src) + rng.normal(0, 0.3, (30, 3))
    dst[:3] += [[25, 0, 0], [0, -30, 0], [0, 0, 20]]          # three badly segmented structures
    fit, w = er.robust_affine(src, dst, np.ones(30))
    assert np.allclose(fit[:3, :3], truth[:3, :3], atol=0.01)
    assert np.allclose(fit[:3, 3], truth[:3, 3], atol=0.3)
    assert np.all(w[:3] == 0) and np.all(w[3:] > 0.5)
    plain, *_ = np.linalg.lstsq(np.c_[src, np.ones(30)], dst, rcond=None)
    assert np.abs(plain.T - truth[:3]).max() > 0.1               # least squares alone is pulled


def test_centroid_affine_is_symmetric_and_recovers_a_known_transform():
    seg = _label_phantom()
    aff_ref = np.diag([1.0, 1.0, 1.0, 1])
    aff_ref[:3, 3] = [-20, -22, -18]
    truth = make_affine(rotation(deg_y=8))                       # floating RAS -> reference RAS
    truth[:3, 3] = [3, -2, 5]
    aff_flo = np.linalg.inv(truth) @ aff_ref                     # same voxels, moved world
    ref_c, flo_c = er.centroids(seg, aff_ref), er.centroids(seg, aff_flo)
    assert set(ref_c) == set(LABELS) | {24}
    a, used = er.symmetric_affine(ref_c, flo_c)
    assert np.allclose(a, truth, atol=1e-6) and len(used) == 13
    b, _ = er.symmetric_affine(flo_c, ref_c)
    assert np.allclose(a @ b, np.eye(4), atol=1e-9)
    half = er.matrix_power(a, 0.5)
    assert np.allclose(half @ half, a, atol=1e-9)
    with pytest.raises(er.RegistrationError, match='structure'):
        er.symmetric_affine({2: ref_c[2], 3: ref_c[3]}, flo_c)
    flipped = np.diag([-1.0, 1, 1, 1]) @ aff_flo
    with pytest.raises(er.RegistrationError, match='reflection'):
        er.symmetric_affine(ref_c, er.centroids(seg, flipped))


def test_coordinate_fields_round_trip_with_displacement_warps():
    rng = np.random.default_rng(1)
    geom = transforms.Geometry((6, 7, 5), make_affine(rotation(deg_z=30), [1.0, 1.2, 0.9]))
    disp = rng.normal(0, 2, (6, 7, 5, 3)).astype(np.float32)
    t = transforms.Transform(disp=disp, target=geom)
    coords = er.coordinates_from_transform(t)
    world = np.einsum('ij,xyzj->xyzi', geom.affine[:3, :3],
                      np.indices(geom.shape).transpose(1, 2, 3, 0)) + geom.affine[:3, 3]
    assert np.allclose(coords, world + disp, atol=1e-4)
    back = er.transform_from_coordinates(coords, geom.affine)
    assert np.allclose(back.disp, disp, atol=1e-4)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def study(tmp, monkeypatch):
    """A floating and a reference phantom (rendered label maps, the floating one rotated and
    shifted), their segmentations, and a random-weight deformable model."""
    seg = _label_phantom()
    flo_seg = seg.copy()                 # one structure moved: not an affine difference
    box = flo_seg == LABELS[3]
    flo_seg[box] = 24
    flo_seg[np.roll(box, 3, axis=0)] = LABELS[3]
    rng = np.random.default_rng(2)
    img = ndimage.gaussian_filter(er.render(seg), 1) + rng.normal(0, 2, seg.shape)
    flo_img = ndimage.gaussian_filter(er.render(flo_seg), 1) + rng.normal(0, 2, seg.shape)
    aff_ref = np.diag([1.0, 1.0, 1.0, 1])
    aff_ref[:3, 3] = [-20, -22, -18]
    shift = make_affine(rotation(deg_z=6))
    shift[:3, 3] = [2, -3, 1]
    aff_flo = shift @ aff_ref
    paths = {'ref': _write(os.path.join(tmp, 'ref.nii.gz'), img.astype(np.float32), aff_ref),
             'flo': _write(os.path.join(tmp, 'flo.nii.gz'), (0.7 * flo_img).astype(np.float32),
                           aff_flo),
             'ref_seg': _write(os.path.join(tmp, 'ref_seg.nii.gz'), seg, aff_ref),
             'flo_seg': _write(os.path.join(tmp, 'flo_seg.nii.gz'), flo_seg, aff_flo)}
    folder = os.path.join(tmp, 'models')
    os.makedirs(folder)
    arch = {'features': [4, 8, 8], 'hyper_units': 4}
    net = seeded(morph.velocity_net(**arch), 5)
    k, b = net.get_layer('velocity').get_weights()
    net.get_layer('velocity').set_weights([k * 2e4, b])      # a field that is not negligible
    net.save_weights(os.path.join(folder, 'synthmorph_deform.weights.h5'))
    with open(os.path.join(folder, 'synthmorph_deform.json'), 'w') as f:
        json.dump({'task': 'synthmorph_deform', 'input': {'voxsize_mm': 2.0},
                   'architecture': {'type': 'deform_velocity', **arch}}, f)
    monkeypatch.setenv('SYNTHKIT_MODELS', folder)
    return paths, shift


def _run(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def _sample_field(field, points):
    """A coordinate field's values (trilinear) at world ``points`` (N, 3) of its grid."""
    vox = (np.linalg.inv(field.affine) @ np.c_[points, np.ones(len(points))].T)[:3]
    return np.stack([ndimage.map_coordinates(field.data[..., c], vox, order=1, mode='nearest')
                     for c in range(3)], 1)


def test_easyreg_writes_inverse_fields_and_easywarp_applies_them(study, tmp):
    paths, shift = study
    out = {k: os.path.join(tmp, k + '.nii.gz') for k in ('fwd', 'bak', 'flo_reg', 'ref_reg')}
    code = _run(cli.main, ['--ref', paths['ref'], '--flo', paths['flo'],
                           '--ref_seg', paths['ref_seg'], '--flo_seg', paths['flo_seg'],
                           '--fwd_field', out['fwd'], '--bak_field', out['bak'],
                           '--flo_reg', out['flo_reg'], '--ref_reg', out['ref_reg'],
                           '--fine', '0'])
    assert code == 0
    fwd, bak = io.load_volume(out['fwd']), io.load_volume(out['bak'])
    ref = io.load_volume(paths['ref'])
    assert fwd.data.shape == ref.shape3 + (3,) and np.allclose(fwd.affine, ref.affine)
    # the field holds floating-scan RAS coordinates: near where the affine sends them
    centre = np.array(ref.shape3) // 2
    world = ref.affine[:3, :3] @ centre + ref.affine[:3, 3]
    assert np.linalg.norm(fwd.data[tuple(centre)] - _transform_points(shift, world)) < 3.0
    # forward and backward fields are inverses inside the head
    seg = io.load_volume(paths['flo_seg'])
    pts = (seg.affine[:3, :3] @ np.argwhere(seg.data > 0).T + seg.affine[:3, 3:]).T
    flo = io.load_volume(paths['flo'])
    inside = np.argwhere(seg.data[4:-4, 4:-4, 4:-4] > 0) + 4
    p = (flo.affine[:3, :3] @ inside.T + flo.affine[:3, 3:]).T
    there = bak.data[tuple(inside.T)]
    err = np.linalg.norm(_sample_field(fwd, there) - p, axis=1)
    assert np.median(err) < 0.5 and len(pts) > 0
    # the deformation is not just the affine: the random network moves voxels
    lin = _transform_points(shift, (ref.affine[:3, :3] @ inside.T + ref.affine[:3, 3:]).T)
    assert np.abs(fwd.data[tuple(inside.T)] - lin).max() > 0.1
    # mri_easywarp with the forward field reproduces --flo_reg; labels stay labels
    again = os.path.join(tmp, 'again.nii.gz')
    assert _run(easywarp.main, ['--i', paths['flo'], '--o', again, '--field', out['fwd']]) == 0
    assert np.allclose(io.load_volume(again).data, io.load_volume(out['flo_reg']).data, atol=1e-4)
    moved_seg = os.path.join(tmp, 'moved_seg.nii.gz')
    assert _run(easywarp.main, ['--i', paths['flo_seg'], '--o', moved_seg, '--field', out['fwd'],
                                '--nearest']) == 0
    assert set(np.unique(io.load_volume(moved_seg).data)) <= set(LABELS) | {0, 24}


def test_easyreg_affine_only_is_inverted_by_swapping(study, tmp):
    paths, shift = study
    a, b = os.path.join(tmp, 'a.nii.gz'), os.path.join(tmp, 'b.nii.gz')
    assert _run(cli.main, ['--ref', paths['ref'], '--flo', paths['flo'], '--ref_seg',
                           paths['ref_seg'], '--flo_seg', paths['flo_seg'], '--fwd_field', a,
                           '--affine_only']) == 0
    assert _run(cli.main, ['--ref', paths['flo'], '--flo', paths['ref'], '--ref_seg',
                           paths['flo_seg'], '--flo_seg', paths['ref_seg'], '--bak_field', b,
                           '--affine_only']) == 0
    fa, fb = io.load_volume(a), io.load_volume(b)
    assert np.allclose(fa.affine, fb.affine)          # both on the reference grid
    assert np.allclose(fa.data, fb.data, atol=1e-3)
    ref = io.load_volume(paths['ref'])
    world = ref.affine[:3, :3] @ np.array([5, 6, 7]) + ref.affine[:3, 3]
    assert np.allclose(fa.data[5, 6, 7], _transform_points(shift, world), atol=0.05)


def test_easyreg_and_easywarp_refuse_bad_inputs_in_one_line(study, tmp, capsys):
    paths, _ = study
    base = ['--ref', paths['ref'], '--flo', paths['flo'], '--ref_seg', paths['ref_seg'],
            '--flo_seg', paths['flo_seg']]
    before = {k: open(p, 'rb').read() for k, p in paths.items()}
    cases = [
        (base + ['--fwd_field', paths['flo']], 'also an input'),
        (base + ['--fwd_field', os.path.join(tmp, 'x.nii.gz'),
                 '--bak_field', os.path.join(tmp, 'x.nii.gz')], 'same output'),
        (['--ref', os.path.join(tmp, 'nope.nii.gz')] + base[2:]
         + ['--fwd_field', os.path.join(tmp, 'y.nii.gz')], 'not found'),
    ]
    for argv, expected in cases:
        assert _run(cli.main, argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    few = _write(os.path.join(tmp, 'few.nii.gz'), (_label_phantom() == 2).astype(np.int32) * 2,
                 io.load_volume(paths['ref']).affine)
    assert _run(cli.main, base[:6] + ['--flo_seg', few, '--fwd_field',
                                      os.path.join(tmp, 'z.nii.gz'), '--affine_only']) == 1
    assert 'structure' in capsys.readouterr().err
    assert _run(easywarp.main, ['--i', paths['flo'], '--o', os.path.join(tmp, 'w.nii.gz'),
                                '--field', paths['ref']]) == 1
    assert 'not an EasyReg field' in capsys.readouterr().err
    assert {k: open(p, 'rb').read() for k, p in paths.items()} == before
    assert sorted(os.listdir(tmp)) == sorted(['few.nii.gz', 'models'] +
                                             [os.path.basename(p) for p in paths.values()])
