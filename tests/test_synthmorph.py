"""SynthMorph: barycentre fits, symmetry, warps in world space, `mri_synthmorph register`, and
one training step of each registration task (no shipped weights or shared data needed: networks
with fresh random weights are saved with model cards to a scratch folder)."""

import json
import os

import keras
import nibabel as nib
import numpy as np
import pytest
from keras import ops

from synthkit import io, trainer, transforms
from synthkit import models as registry
from synthkit.models.synthmorph import inference as sm_inference
from synthkit.models.synthmorph import network as morph
from synthkit.models.synthmorph import task as morph_task
from synthkit.models.synthmorph import cli as synthmorph

from helpers import make_affine, rotation, seeded


# ------------------------------------------------------------------------------ point fits
def test_barycenters_find_a_blob_at_any_feature_resolution():
    feat = np.zeros((1, 8, 8, 8, 2), np.float32)
    feat[0, 2, 5, 3, 0] = 1
    feat[0, 6, 1, 7, 1] = 3
    pts, mass = morph.barycenters(feat, (16, 16, 16))     # features at half resolution
    pts = np.asarray(pts)[0] + 7.5                         # back to uncentred input voxels
    assert np.allclose(pts[0], [4.5, 10.5, 6.5]) and np.allclose(pts[1], [12.5, 2.5, 14.5])
    assert np.asarray(mass)[0, 1] == pytest.approx(3 * np.asarray(mass)[0, 0])


def test_affine_fit_recovers_a_known_matrix_and_is_symmetric():
    rng = np.random.default_rng(0)
    truth = make_affine(rotation(deg_z=20) @ np.diag([1.1, 0.9, 1.0]))
    truth[:3, 3] = [5, -3, 2]
    src = rng.normal(0, 30, (1, 24, 3)).astype(np.float32)
    dst = (np.asarray(src[0], np.float64) @ truth[:3, :3].T + truth[:3, 3])[None]
    w = rng.uniform(0.1, 1, (1, 24)).astype(np.float32)
    fit = np.asarray(morph.fit_affine(src, dst.astype(np.float32), w))[0]
    assert np.allclose(fit, truth, atol=1e-2)      # the ridge pulls it 0.1 % to identity
    # fixed -> moving, and the swapped fit is its inverse
    noisy = dst + rng.normal(0, 1, dst.shape)
    t = np.asarray(morph.fit_symmetric(noisy.astype(np.float32), src, w))[0]
    t_swapped = np.asarray(morph.fit_symmetric(src, noisy.astype(np.float32), w))[0]
    assert np.allclose(t @ t_swapped, np.eye(4), atol=1e-3)
    assert np.allclose(t[:3, :3], truth[:3, :3], atol=0.05)   # from 1 mm noise on 24 points
    assert np.allclose(t[:3, 3], truth[:3, 3], atol=1.0)


def test_rigid_fit_is_a_rotation_and_symmetric():
    rng = np.random.default_rng(1)
    truth = make_affine(rotation(deg_x=25, deg_y=10))
    truth[:3, 3] = [10, 0, -4]
    src = rng.normal(0, 30, (16, 3))
    dst = src @ truth[:3, :3].T + truth[:3, 3] + rng.normal(0, 0.5, (16, 3))
    w = rng.uniform(0.1, 1, 16)
    fit = morph.fit_rigid(src, dst, w)
    assert np.allclose(fit[:3, :3] @ fit[:3, :3].T, np.eye(3), atol=1e-9)
    assert np.linalg.det(fit[:3, :3]) == pytest.approx(1)
    assert np.allclose(fit, truth, atol=0.5)
    assert np.allclose(fit @ morph.fit_rigid(dst, src, w), np.eye(4), atol=1e-9)


def test_integration_of_opposite_fields_gives_inverse_maps():
    rng = np.random.default_rng(2)
    from synthkit.layers import utils
    coarse = rng.normal(0, 0.6, (1, 3, 3, 3, 3)).astype(np.float32)
    vel = np.asarray(utils.resize_field(coarse, (8, 8, 8)))      # smooth, half resolution
    shape = (16, 16, 16)
    fwd = np.asarray(morph.integrate(vel, shape, 7))
    inv = np.asarray(morph.integrate(-vel, shape, 7))
    grid = np.stack(np.meshgrid(*[np.arange(16.0)] * 3, indexing='ij'), -1)
    # inv(x + fwd(x)) ~ -fwd(x) in the interior
    back = np.asarray(morph.warp_labels(inv, fwd))[0]
    err = np.abs(fwd[0] + back)[4:-4, 4:-4, 4:-4]
    assert np.abs(fwd).max() > 1 and np.median(err) < 0.02 and err.max() < 0.2
    assert grid.shape == fwd.shape[1:]


def test_sample_linear_matches_per_channel_sampling():
    from synthkit.layers import utils
    rng = np.random.default_rng(3)
    vol = rng.random((1, 6, 7, 8, 5)).astype(np.float32)
    coords = (rng.random((1, 4, 5, 6, 3)) * 10 - 2).astype(np.float32)
    assert np.allclose(np.asarray(utils.sample_linear(vol, coords)),
                       np.asarray(utils.sample(vol, coords, 'linear', 0)), atol=1e-6)


# ------------------------------------------------------------------------- models on disk
def _save(net, card, folder, name):
    weights = os.path.join(folder, name + '.weights.h5')
    net.save_weights(weights)
    with open(os.path.join(folder, name + '.json'), 'w') as f:
        json.dump(card, f)
    return weights


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """Random-weight affine and deformable models with cards (the deformable one's last layer
    scaled up so that its field is not negligible)."""
    folder = str(tmp_path_factory.mktemp('models'))
    arch_a = {'features': [4, 8, 8], 'out_features': 8, 'out_level': 1}
    arch_d = {'features': [4, 8, 8], 'hyper_units': 4}
    a = seeded(morph.feature_net(**arch_a), 1)
    d = seeded(morph.velocity_net(**arch_d), 2)
    k, b = d.get_layer('velocity').get_weights()
    d.get_layer('velocity').set_weights([k * 2e4, b])
    card = {'input': {'voxsize_mm': 3.0}}
    wa = _save(a, {**card, 'task': 'synthmorph_affine',
                   'architecture': {'type': 'affine_features', **arch_a}}, folder,
               'synthmorph_affine')
    wd = _save(d, {'input': {'voxsize_mm': 2.0}, 'task': 'synthmorph_deform',
                   'architecture': {'type': 'deform_velocity', **arch_d}}, folder,
               'synthmorph_deform')
    return wa, wd


def _head(shape=(40, 44, 36), seed=0, shift=(0, 0, 0)):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing='ij'))
    grid = grid - np.reshape(shift, (3, 1, 1, 1))
    r = np.sqrt(((grid / np.reshape([14, 16, 12], (3, 1, 1, 1))) ** 2).sum(0))
    data = np.where(r < 1, 100 + 50 * (grid[0] > 0), 0) + rng.normal(0, 3, shape)
    return np.clip(data, 0, None).astype(np.float32)


@pytest.fixture
def pair(tmp):
    aff_m = np.diag([1.2, 1.0, 1.1, 1])
    aff_m[:3, 3] = [-20, -25, -18]
    aff_f = np.array([[-1.0, 0, 0, 22], [0, 0, 1.1, -20], [0, -1.0, 0, 25], [0, 0, 0, 1]])
    m, f = os.path.join(tmp, 'moving.nii.gz'), os.path.join(tmp, 'fixed.nii.gz')
    nib.save(nib.Nifti1Image(_head(seed=1, shift=(3, -2, 1)), aff_m), m)
    nib.save(nib.Nifti1Image(_head(seed=2), aff_f), f)
    return m, f


def _registrar(models):
    wa, wd = models
    card = lambda w: json.load(open(w[:-len('.weights.h5')] + '.json'))  # noqa: E731
    return sm_inference.Registrar((wa, card(wa)), (wd, card(wd)))


def test_registrar_affine_and_rigid_are_symmetric(models, pair):
    reg = _registrar(models)
    m, f = (io.load_volume(p) for p in pair)
    mv, fv = (m.data, m.affine), (f.data, f.affine)
    for check in ('off', 'check', 'refine'):
        info = {}
        fwd, back = reg.affine(mv, fv, check=check, info=info), reg.affine(fv, mv, check=check)
        assert np.allclose(fwd @ back, np.eye(4), atol=1e-3), check
        assert bool(info) == (check != 'off')
        rigid = reg.affine(mv, fv, rigid=True, check=check)
        assert np.allclose(rigid[:3, :3] @ rigid[:3, :3].T, np.eye(3), atol=1e-6)
        assert np.allclose(rigid @ reg.affine(fv, mv, rigid=True, check=check), np.eye(4),
                           atol=1e-3)
    with pytest.raises(ValueError, match='check must be'):
        reg.affine(mv, fv, check='maybe')


def test_registrar_velocity_is_antisymmetric(models, pair):
    reg = _registrar(models)
    m, f = (io.load_volume(p) for p in pair)
    # on one shared grid (the same image geometry), swapping the inputs negates the field
    same = (np.roll(f.data, 4, axis=0) ** 1.5, f.affine)
    v1, shape, grid = reg.velocity(same, (f.data, f.affine), np.eye(4))
    v2, _, _ = reg.velocity((f.data, f.affine), same, np.eye(4))
    assert np.abs(v1).max() > 1e-3
    assert np.allclose(v1, -v2, atol=1e-5)
    assert shape == tuple(int(n) for n in shape) and all(n % 16 == 0 for n in shape)


def test_warp_to_world_of_a_zero_field_is_the_matrix(models, pair):
    reg = _registrar(models)
    f = io.load_volume(pair[1])
    shape, grid = reg.deform_grid(f.data.shape, f.affine)
    matrix = make_affine(rotation(deg_y=-10))
    matrix[:3, 3] = [2, -1, 3]
    zero = np.zeros(shape + (3,), np.float32)
    disp = sm_inference.warp_to_world(zero, grid, f.data.shape, f.affine, post=np.linalg.inv(matrix))
    expect = transforms.Transform(matrix=matrix, target=transforms.Geometry.of(f)).as_warp().disp
    assert np.allclose(disp, expect, atol=1e-4)


def test_composed_displacements_add_shifts_and_undo_each_other():
    shape = (12, 10, 8)
    a = np.broadcast_to(np.float32([1.5, -2, 0.5]), shape + (3,)).copy()
    b = np.broadcast_to(np.float32([-0.5, 1, 2]), shape + (3,)).copy()
    assert np.allclose(sm_inference.compose_displacements(a, b), a + b, atol=1e-5)
    # a smooth SVF composed with the integral of its negation is the identity in the interior
    rng = np.random.default_rng(3)
    from synthkit.layers import utils
    vel = np.asarray(utils.resize_field(rng.normal(0, 0.6, (1, 3, 3, 3, 3)).astype(np.float32),
                                        (8, 8, 8)))
    fwd = np.asarray(morph.integrate(vel, (16, 16, 16), 7))[0]
    inv = np.asarray(morph.integrate(-vel, (16, 16, 16), 7))[0]
    both = sm_inference.compose_displacements(inv, fwd)[4:-4, 4:-4, 4:-4]
    assert np.abs(fwd).max() > 1 and np.median(np.abs(both)) < 0.02


def test_regridded_displacement_keeps_the_world_shift():
    coarse = np.diag([-2.0, 2.0, 2.0, 1])      # different axes and voxel sizes
    coarse[:3, 3] = [30, -30, -20]
    fine = np.array([[-1.0, 0, 0, 31], [0, 0, 1, -31], [0, -1, 0, 21], [0, 0, 0, 1]])
    shift_world = np.array([2.0, -1.0, 3.0])
    disp = np.broadcast_to((np.linalg.inv(coarse[:3, :3]) @ shift_world).astype(np.float32),
                           (32, 32, 24, 3)).copy()
    out = sm_inference.regrid_displacement(disp, coarse, (48, 40, 48), fine)
    world = out[10:30, 10:30, 10:30] @ fine[:3, :3].T
    assert np.allclose(world, shift_world, atol=1e-4)


def test_registrar_fine_level_runs_on_the_finer_grid_and_stays_invertible(models, pair):
    reg = _registrar(models)
    m, f = (io.load_volume(p) for p in pair)
    mv, fv = (m.data, m.affine), (f.data, f.affine)
    said = []
    fwd, inv, shape, grid = reg.deformation(mv, fv, np.eye(4), fine_mm=1.0, progress=said.append)
    assert len(said) == 2 and '1 mm' in said[1]
    assert np.allclose(np.abs(np.diag(grid[:3, :3] @ grid[:3, :3].T)), 1)   # 1 mm voxels
    assert fwd.shape == inv.shape == tuple(shape) + (3,)
    coarse, _, cshape, _ = reg.deformation(mv, fv, np.eye(4), inverse=False)
    assert all(a < b for a, b in zip(cshape, shape)) and np.abs(coarse).max() > 0.1
    # the inverse composition undoes the forward one in the interior
    inner = tuple(slice(n // 4, -(n // 4)) for n in shape)
    assert np.median(np.abs(sm_inference.compose_displacements(inv, fwd)[inner])) < 0.05


def _call(argv):
    with pytest.raises(SystemExit) as e:
        synthmorph.main(argv)
    return e.value.code


def test_register_joint_writes_transforms_and_images(models, pair, tmp, capsys):
    m, f = pair
    out = lambda name: os.path.join(tmp, name)  # noqa: E731
    argv = ['register', m, f, '-w', models[0], '-w', models[1], '-t', out('fwd.nii.gz'),
            '-T', out('inv.nii.gz'), '-o', out('moved.nii.gz'), '-O', out('fixed_moved.mgz'),
            '-j', '1', '-v']
    assert _call(argv) == 0
    assert 'done' in capsys.readouterr().out
    fv, mv = nib.load(f), nib.load(m)
    fwd, inv = nib.load(out('fwd.nii.gz')), nib.load(out('inv.nii.gz'))
    assert fwd.shape == fv.shape + (3,) and np.allclose(fwd.affine, fv.affine)
    assert inv.shape == mv.shape + (3,) and np.allclose(inv.affine, mv.affine)
    moved = nib.load(out('moved.nii.gz'))
    assert moved.shape == fv.shape and np.allclose(moved.affine, fv.affine)
    assert np.asarray(moved.dataobj).max() > 50
    back = io.load_volume(out('fixed_moved.mgz'))
    assert back.data.shape == mv.shape and np.allclose(back.affine, mv.affine, atol=1e-4)
    # apply reads the saved warp and gives the same moved image
    assert _call(['apply', out('fwd.nii.gz'), m, out('moved2.nii.gz')]) == 0
    assert np.allclose(nib.load(out('moved2.nii.gz')).get_fdata(), moved.get_fdata(), atol=1e-3)
    # the inverse warp undoes the forward one in the interior of the fixed brain
    fwd_t = transforms.read_warp(out('fwd.nii.gz'))
    inv_t = transforms.read_warp(out('inv.nii.gz'))
    vox = np.argwhere(fv.get_fdata() > 0)[::97]
    q = (fv.affine[:3, :3] @ vox.T + fv.affine[:3, 3:]).T
    p = q + fwd_t.disp[tuple(vox.T)]                           # moving world
    w = np.linalg.solve(mv.affine, np.c_[p, np.ones(len(p))].T)[:3]
    from scipy import ndimage
    d = np.stack([ndimage.map_coordinates(inv_t.disp[..., k], w, order=1) for k in range(3)], 1)
    assert np.median(np.linalg.norm(p + d - q, axis=1)) < 0.5


def test_register_affine_lta_is_symmetric_and_header_only_keeps_voxels(models, pair, tmp,
                                                                       capsys):
    m, f = pair
    out = lambda name: os.path.join(tmp, name)  # noqa: E731
    assert _call(['register', m, f, '-m', 'affine', '-w', models[0], '-t', out('a.lta'),
                  '-T', out('a_inv.lta'), '-o', out('moved.nii.gz'), '-H', '-v']) == 0
    said = capsys.readouterr().out
    assert 'mutual information (NMI): headers' in said and 'kept the' in said
    assert _call(['register', f, m, '-m', 'affine', '-w', models[0], '-t', out('b.lta')]) == 0
    a, a_inv, b = (transforms.read_lta(out(n)) for n in ('a.lta', 'a_inv.lta', 'b.lta'))
    assert np.allclose(a.matrix @ b.matrix, np.eye(4), atol=1e-3)
    assert np.allclose(a.matrix @ a_inv.matrix, np.eye(4), atol=1e-6)
    moved = nib.load(out('moved.nii.gz'))
    assert np.allclose(moved.get_fdata(), nib.load(m).get_fdata(), atol=1e-3)
    assert np.allclose(moved.affine, a.matrix @ nib.load(m).affine, atol=1e-4)
    # an initial matrix is composed in: registering from a.lta ends near a again
    assert _call(['register', m, f, '-m', 'rigid', '-w', models[0], '-i', out('a.lta'),
                  '-t', out('r.lta'), '-v']) == 0
    said = capsys.readouterr().out       # rigid: checked against -i's matrix, then refined
    assert 'NMI): initial matrix' in said and 'refined to' in said
    r = transforms.read_lta(out('r.lta')).matrix
    assert np.isfinite(r).all()


def test_register_writes_itk_transforms(models, pair, tmp, capsys):
    """-t/-T as ITK affine files (.txt, .mat) equal to the LTA; --itk fields in ITK's layout
    equal to ours; an ITK matrix as -i; --itk refuses .mgz."""
    m, f = pair
    out = lambda name: os.path.join(tmp, name)  # noqa: E731
    assert _call(['register', m, f, '-m', 'affine', '-w', models[0], '-t', out('a.lta'),
                  '-T', out('a_inv.txt')]) == 0
    assert _call(['register', m, f, '-m', 'affine', '-w', models[0], '-t', out('a.mat')]) == 0
    a = transforms.read_lta(out('a.lta')).matrix
    np.testing.assert_allclose(transforms.load_transform(out('a.mat')).matrix, a, atol=1e-6)
    np.testing.assert_allclose(transforms.load_transform(out('a_inv.txt')).matrix @ a, np.eye(4),
                               atol=1e-6)
    assert _call(['register', m, f, '-m', 'rigid', '-w', models[0], '-i', out('a.mat'),
                  '-t', out('r.txt')]) == 0
    assert np.isfinite(transforms.load_transform(out('r.txt')).matrix).all()
    # deformable: --itk field and our field, from the same (deterministic) registration
    base = ['register', m, f, '-m', 'deform', '-w', models[1], '-j', '1']
    assert _call(base + ['-t', out('w.nii.gz')]) == 0
    assert _call(base + ['--itk', '-t', out('w_itk.nii.gz'), '-o', out('moved.nii.gz')]) == 0
    img = nib.load(out('w_itk.nii.gz'))
    assert img.shape == nib.load(f).shape + (1, 3)
    assert int(img.header['intent_code']) == transforms.NIFTI_INTENT_VECTOR
    np.testing.assert_allclose(transforms.read_warp(out('w_itk.nii.gz')).disp,
                               transforms.read_warp(out('w.nii.gz')).disp, atol=1e-4)
    assert _call(['apply', out('w_itk.nii.gz'), m, out('moved2.nii.gz')]) == 0
    np.testing.assert_allclose(nib.load(out('moved2.nii.gz')).get_fdata(),
                               nib.load(out('moved.nii.gz')).get_fdata(), atol=1e-3)
    capsys.readouterr()
    assert _call(base + ['--itk', '-t', out('w.mgz')]) == 2
    assert '--itk fields are NIfTI' in capsys.readouterr().err
    assert not os.path.exists(out('w.mgz'))


def test_register_refuses_bad_outputs_and_multiframe(models, pair, tmp, capsys):
    m, f = pair
    for extra, message in ((['--refine', '--no-check'], 'exclude each other'),
                           (['--refine', '--no-refine'], 'exclude each other'),
                           (['-m', 'deform', '--refine'], 'no affine step')):
        assert _call(['register', m, f, '-t', os.path.join(tmp, 'x.nii.gz')] + extra) == 2
        assert message in capsys.readouterr().err
    assert _call(['register', m, f, '-m', 'deform', '-w', models[1], '-t',
                  os.path.join(tmp, 'x.lta')]) == 2
    capsys.readouterr()
    assert _call(['register', m, f, '-m', 'deform', '-w', models[1], '--fine', '0.2', '-t',
                  os.path.join(tmp, 'x.nii.gz')]) == 2
    assert '--fine' in capsys.readouterr().err
    four = os.path.join(tmp, 'four.nii.gz')
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), four)
    capsys.readouterr()
    assert _call(['register', four, f, '-m', 'affine', '-w', models[0], '-t',
                  os.path.join(tmp, 'x.lta')]) == 1
    err = capsys.readouterr().err
    assert 'single-frame' in err and err.count('\n') == 1
    assert _call(['register', m, f, '-m', 'affine', '-w', models[0], '-o', m]) == 1
    assert not os.path.exists(os.path.join(tmp, 'x.lta'))


# ---------------------------------------------------------------------------------- training
def _maps(folder, n=3, size=36):
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing='ij')) - size / 2
    r = np.sqrt((grid ** 2).sum(0))
    paths = []
    for i in range(n):
        lab = np.zeros((size,) * 3, np.int16)
        lab[r < 15] = 24
        lab[r < 13 - i] = 3
        lab[(r < 8) & (grid[0] > 0)] = 2
        lab[(r < 8) & (grid[0] <= 0)] = 41
        lab[r < 3 + i] = 4
        paths.append(os.path.join(folder, 'map%d.nii.gz' % i))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), paths[-1])
    return paths


def test_deformable_model_learns_to_align_a_shifted_blob():
    import keras
    shape = (24, 24, 24)
    grid = np.stack(np.meshgrid(*[np.arange(24.0)] * 3, indexing='ij'), -1)
    def blob(center):
        inside = (np.linalg.norm(grid - center, axis=-1) < 6).astype(np.float32)
        return inside[None, ..., None], np.stack([1 - inside, inside], -1)[None]
    m, lm = blob([10.0, 12, 12])
    f, lf = blob([13.0, 12, 12])
    keras.utils.set_random_seed(0)
    net = morph.velocity_net(features=(8, 8, 8), hyper_units=4)
    model = morph.deform_training_model(net, shape, 2, steps=5)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=morph.mean_output)
    lam = np.array([[0.05]], np.float32)
    x, y = [m, f, lm, lf, lam], np.zeros((1,), np.float32)
    first = float(np.asarray(model.predict_on_batch(x))[0])
    for _ in range(40):
        model.train_on_batch(x, y)
    last = float(np.asarray(model.predict_on_batch(x))[0])
    assert last < 0.6 * first


def test_end_point_error_counts_voxels_mapped_outside_the_grid():
    shape = (12, 12, 12)
    grid = np.stack(np.meshgrid(*[np.arange(12.0)] * 3, indexing='ij'), -1)[None]
    coords = (2.0 * grid).astype(np.float32)           # source mm of each voxel
    labels = np.zeros((1, *shape, 2), np.float32)
    labels[..., 1] = 1
    here = morph.coordinate_error(coords, coords, labels, grid.astype(np.float32), True)
    assert float(here[0]) < 1e-2
    far = (grid + 100.0).astype(np.float32)             # everything mapped outside
    assert float(morph.coordinate_error(coords, coords, labels, far)[0]) == 0  # squared: left out
    err = float(morph.coordinate_error(coords, coords, labels, far, True)[0])
    assert err > 2.0                                    # distance mode: clamped to the border
    shifted = (grid + [1.0, 0, 0]).astype(np.float32)
    inner = float(morph.coordinate_error(coords, coords, labels, shifted, True)[0])
    assert 1.5 < inner < 2.0            # 2 mm for all but the last slab (clamped: 0), over 12^3+1


def test_correlation_finds_the_shift_and_soft_argmax_reads_it():
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(1, 14, 14, 14, 8)).astype(np.float32)
    feat /= np.linalg.norm(feat, axis=-1, keepdims=True)      # unit vectors, as the net makes
    fixed, moving = feat[:, 2:12, 2:12, 2:12], feat[:, 1:11, 2:12, 3:13]  # fixed(x) = moving(x+d)
    cost = np.asarray(morph.Correlation(2)([fixed, moving]))
    assert cost.shape == (1, 10, 10, 10, 125)
    shifts = morph.correlation_shifts(2)
    best = shifts[cost[0, 2:-2, 2:-2, 2:-2].reshape(-1, 125).argmax(-1)]
    assert np.all(best == [1.0, 0.0, -1.0])
    sharp = np.zeros((1, 2, 2, 2, 125), np.float32)
    sharp[..., 7] = 1.0
    flow = np.asarray(morph.SoftArgmax(2, temperature=200.0)(sharp))
    assert np.allclose(flow, shifts[7], atol=1e-3)


def test_match_loss_prefers_the_true_shift():
    n = 16
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing='ij'), -1)[None]
    fixed_src = grid * 2.0                                # 2 source mm per voxel
    moving_src = fixed_src + np.array([4, 0, 0], np.float32)  # fixed(x) = moving(x - 2 voxels)
    labels = np.zeros((1, n, n, n, 2), np.float32)
    labels[..., 1] = 1
    shifts = morph.correlation_shifts(2)
    loss = {}
    for d in ([-1, 0, 0], [0, 0, 0], [1, 0, 0]):          # half-resolution shifts
        cost = np.zeros((1, n // 2, n // 2, n // 2, 125), np.float32)
        cost[..., np.where(np.all(shifts == d, -1))[0][0]] = 1
        loss[tuple(d)] = float(morph.MatchLoss(2)([cost, moving_src, fixed_src, labels])[0])
    assert loss[(-1, 0, 0)] < loss[(0, 0, 0)] < loss[(1, 0, 0)]


def test_correlation_network_builds_from_its_card_and_is_antisymmetric_in_use():
    net = morph.deform_network(kind='correlation', features=[4, 8, 8], hyper_units=4,
                               head_features=4)
    rng = np.random.default_rng(1)
    pair = rng.random((1, 16, 16, 16, 2)).astype(np.float32)
    vel = np.asarray(net.predict_on_batch([pair, np.array([[0.3]], np.float32)]))
    assert vel.shape == (1, 8, 8, 8, 3) and np.all(np.isfinite(vel))
    card = {'architecture': {'type': 'deform_velocity', 'kind': 'correlation',
                             'features': [4, 8, 8], 'hyper_units': 4, 'head_features': 4}}
    again = sm_inference.build_network(card)
    again.set_weights(net.get_weights())
    assert np.allclose(np.asarray(again.predict_on_batch([pair, np.array([[0.3]], np.float32)])),
                       vel, atol=1e-5)
    with pytest.raises(ValueError, match='kind'):
        morph.deform_network(kind='transformer')


@pytest.mark.slow
@pytest.mark.parametrize('task', ['synthmorph_affine', 'synthmorph_deform'])
def test_registration_tasks_train_resume_and_export(task, tmp):
    maps = _maps(tmp)
    cfg = registry.preset(task, maps)
    cfg.shape, cfg.steps, cfg.val_every, cfg.val_pairs = (32, 32, 32), 2, 2, 1
    cfg.task_options = dict(cfg.task_options)
    cfg.task_options['net'] = ({'features': [4, 8, 8], 'out_features': 4}
                               if task.endswith('affine') else
                               {'kind': 'correlation', 'features': [4, 8, 8], 'hyper_units': 4,
                                'head_features': 4})
    if task.endswith('deform'):     # (the affine task has no shapes: its options refuse them)
        cfg.task_options.update(shapes_prob=0.5, shapes_maps=1)
    run = os.path.join(tmp, 'run')
    trainer.Trainer(cfg, run, progress=False).run()
    rows = trainer.read_log(run)
    assert rows[-1]['step'] == '2' and 0 <= float(rows[-1]['val_dice']) <= 1
    cfg.steps = 3
    trainer.Trainer(cfg, run, progress=False).run()        # resumes from the checkpoint
    assert trainer.read_log(run)[-1]['step'] == '3'
    cfg.steps = 4                                        # batches from a sampling process
    trainer.Trainer(cfg, run, progress=False).run(workers=1)
    assert trainer.read_log(run)[-1]['step'] == '4'
    card = trainer.export(run, os.path.join(tmp, 'model'))
    assert card['training']['steps'] == 4 and card['task'] == task
    here = trainer.device_description()
    assert card['training']['device'] == 'steps 0-4: ' + here      # three sessions, one device
    # a re-export keeps the card's notes (and drops scores measured on other weights)
    with open(os.path.join(tmp, 'model.json')) as f:
        old = json.load(f)
    old['notes'], old['scores'] = 'trained on a test machine', {'dice': 1.0}
    with open(os.path.join(tmp, 'model.json'), 'w') as f:
        json.dump(old, f)
    card = trainer.export(run, os.path.join(tmp, 'model'))
    assert card['notes'] == 'trained on a test machine' and card['scores'] == {}
    net = sm_inference.build_network(card)
    net.load_weights(os.path.join(tmp, 'model.weights.h5'))
    assert len(net.weights) > 0


def test_device_history_merges_sessions_of_one_device():
    devs = [[0, 100, 'cpu'], [100, 250, 'cpu'], [250, 900, 'gpu'], [900, 1000, 'cpu']]
    assert trainer.describe_devices(devs) == 'steps 0-250: cpu; steps 250-900: gpu; ' \
        'steps 900-1000: cpu'
    assert 'Keras %s backend' % keras.backend.backend() in trainer.device_description()


def test_shapes_bank_uses_distinct_painting_classes():
    from synthkit import generator as gen
    bank = morph_task.shapes_bank(2, (20, 22, 18), seed=0)
    assert bank.shape == (2, 20, 22, 18)
    assert set(np.unique(bank)) <= set(morph_task.SHAPE_LABELS) and len(np.unique(bank[0])) > 4
    classes, _ = gen.label_classes()
    assert len({classes[k] for k in morph_task.SHAPE_LABELS}) == len(morph_task.SHAPE_LABELS)
    assert float(ops.mean(morph.dice_loss(np.ones((1, 2, 2, 2, 1), np.float32),
                                          np.ones((1, 2, 2, 2, 1), np.float32)))) < 1e-5


# ----------------------------------------------------------- bounded memory at any field of view
def test_plan_tiles_partition_the_grid_within_the_voxel_budget():
    shape = (64, 48, 40)
    tiles = sm_inference.plan_tiles(shape, 30000, 8, 4)
    assert len(tiles) > 1
    count = np.zeros(shape, int)
    for region, core, dst in tiles:
        assert np.prod([s.stop - s.start for s in region]) <= 30000
        assert all(s.start % 4 == 0 for s in region + dst)
        assert all(r.start + c.start == d.start and r.start + c.stop == d.stop
                   for r, c, d in zip(region, core, dst))
        # a core has the full margin of context inside the grid
        assert all(d.start - r.start >= min(8, d.start) for r, d in zip(region, dst))
        count[dst] += 1
    assert np.all(count == 1)
    assert len(sm_inference.plan_tiles(shape, np.prod(shape), 8, 4)) == 1


def test_tiled_correlation_gives_the_whole_network_result():
    net = seeded(morph.deform_network(kind='correlation', features=[4, 8, 8], hyper_units=4,
                                      head_features=4), 3)
    rng = np.random.default_rng(4)
    from scipy import ndimage
    pair = np.stack([ndimage.gaussian_filter(rng.random((128, 96, 64)), 2) for _ in range(2)], -1)
    pair = (pair - pair.min()) / np.ptp(pair)
    lam = np.array([[0.4]], np.float32)
    whole = np.asarray(net.predict_on_batch([pair[None].astype(np.float32), lam]))
    tiled = sm_inference.TiledCorrelation(net, max_voxels=150000, margin=32,
                                          head_max_voxels=8000, head_margin=8)
    for grid, tiles in [((128, 96, 64), sm_inference.plan_tiles((128, 96, 64), 150000, 32, 4)),
                        ((64, 48, 32), sm_inference.plan_tiles((64, 48, 32), 8000, 8, 1))]:
        # several tiles, each seeing less than the whole grid
        assert len(tiles) > 1 and all(np.prod([s.stop - s.start for s in region])
                                      < np.prod(grid) for region, _, _ in tiles)
    feat_m = tiled.features(pair[..., 0].astype(np.float32))
    feat_f = tiled.features(pair[..., 1].astype(np.float32))
    vel = tiled.head(feat_f, feat_m, lam)
    assert vel.shape == whole.shape and np.abs(whole).max() > 1e-3
    assert np.allclose(vel, whole, atol=1e-4 * np.abs(whole).max() + 1e-6)


def test_displaced_sampling_in_slabs_equals_one_pass():
    from synthkit.layers import utils
    rng = np.random.default_rng(5)
    vol = rng.random((12, 10, 9, 2)).astype(np.float32)
    disp = rng.normal(0, 2, (12, 10, 9, 3)).astype(np.float32)
    pts = utils.volume_grid(vol.shape[:3]) + disp
    one = np.asarray(utils.sample_linear(vol[None], np.asarray(pts)[None]))[0]
    slabs = sm_inference._sample_displaced(vol, disp, False, slab_voxels=100)
    assert np.allclose(slabs, one, atol=1e-6)
    clamped = np.clip(np.asarray(pts), 0, np.array(vol.shape[:3], np.float32) - 1)
    assert np.allclose(sm_inference._sample_displaced(vol, disp, True, slab_voxels=100),
                       np.asarray(utils.sample_linear(vol[None], clamped[None]))[0], atol=1e-6)


def test_deformable_level_is_cropped_to_the_heads(models, pair):
    """Padding the fixed image's field of view does not change the level's grid in world
    space beyond the heads' box, nor the images on it."""
    reg = sm_inference.Registrar(deform_model=(models[1], _card(models[1])))
    m, f = (io.load_volume(p) for p in pair)
    shape, grid, fi, mi = reg.level((m.data, m.affine), (f.data, f.affine), np.eye(4))
    big = np.zeros((160, 150, 140), np.float32)
    big[50:90, 60:104, 40:76] = f.data
    big_aff = f.affine.copy()
    big_aff[:3, 3] -= f.affine[:3, :3] @ [50, 60, 40]
    shape2, grid2, fi2, mi2 = reg.level((m.data, m.affine), (big, big_aff), np.eye(4))
    full, _ = reg.deform_grid(big.shape, big_aff)
    assert np.prod(shape2) < np.prod(full) / 4           # the empty field of view is cut away
    assert all(n % 16 == 0 for n in shape2)
    # both crops hold the same content: the heads' total intensity on each grid
    vox = abs(np.linalg.det(grid[:3, :3]))
    assert fi2.sum() * abs(np.linalg.det(grid2[:3, :3])) == pytest.approx(fi.sum() * vox, rel=0.02)
    assert mi2.sum() == pytest.approx(mi.sum() * vox / abs(np.linalg.det(grid2[:3, :3])),
                                      rel=0.02)


def _card(weights):
    with open(weights.replace('.weights.h5', '.json')) as f:
        return json.load(f)


@pytest.mark.slow
def test_register_two_256_cubes_stays_within_4_gb(tmp):
    """Two FreeSurfer-sized (256^3, 1 mm) mostly empty scans with the shipped models, joint
    registration at default settings, peak memory (the process's maximum resident size) under
    4 GB: issue 15's crash (a cost volume over the whole field of view)."""
    import subprocess
    import sys
    aff = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    paths = []
    for i, shift in enumerate([(0, 0, 0), (4, -3, 2)]):
        data = np.zeros((256, 256, 256), np.float32)
        head = _head((150, 170, 140), seed=i, shift=shift)
        data[53:203, 43:213, 58:198] = head * 0.8 if i else head
        paths.append(os.path.join(tmp, 'subj%d.mgz' % i))
        nib.save(nib.MGHImage(data.astype(np.uint8), aff), paths[-1])
    code = ('import resource, sys\n'
            'from synthkit.models.synthmorph import cli\n'
            'try:\n'
            '    rc = cli.main(sys.argv[1:])\n'
            'finally:\n'
            '    print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n'
            'sys.exit(rc)\n')
    warp = os.path.join(tmp, 'warp.nii.gz')
    r = subprocess.run([sys.executable, '-c', code, 'register', '-m', 'joint', '-t', warp,
                        '-j', '2', paths[0], paths[1]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rss_gb = int(r.stdout.split('maxrss_kb')[-1]) / 2 ** 20
    print('peak memory %.2f GB' % rss_gb)
    assert rss_gb < 4.0, rss_gb
    assert nib.load(warp).shape[:3] == (256, 256, 256)
