"""synthkit.generator: geometry of the sampled pairs, left/right flips, reproducibility, ranges."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
from keras import ops

from synthkit import generator as gen
from synthkit import labels as lab

IDENTITY = dict(scaling_range=(1, 1), rotation_range_deg=(0, 0), shearing_range=(0, 0),
                translation_range_mm=(0, 0), nonlin_std_mm=0.0)
SRC_SHAPE = (40, 40, 40)


def asymmetric_map(shape=SRC_SHAPE, lr_axis=0):
    """Head-like label map whose left half (low indices along ``lr_axis``) differs from the
    right: left white matter 2 with a hippocampus 17 inside, right white matter 41 with a
    cortex 42 patch, CSF 24 around, and an extracerebral 502 shell."""
    a = np.zeros((40, 40, 40), np.int16)
    a[4:36, 4:36, 4:36] = 502
    a[6:34, 6:34, 6:34] = 24
    a[8:20, 8:32, 10:30] = 2
    a[11:16, 12:18, 14:20] = 17
    a[20:31, 10:30, 10:30] = 41
    a[26:31, 22:30, 12:18] = 42
    a = np.moveaxis(a, 0, lr_axis)     # lay the left-right asymmetry along lr_axis
    return a[:shape[0], :shape[1], :shape[2]]


def run(shape, params, seed, src):
    g = gen.SynthGenerator(shape, gen.GeneratorParams(**params), seed=seed)
    out = g(ops.convert_to_tensor(src[None, ..., None].astype(np.int32)))
    return np.asarray(out['image'])[0, ..., 0], np.asarray(out['labels'])[0, ..., 0]


@pytest.fixture(scope='module')
def src():
    return asymmetric_map()


# ---------------------------------------------------------------------------------------------
# geometry and flips

def test_identity_deformation_returns_the_label_map(src):
    _, labels = run(SRC_SHAPE, dict(IDENTITY, flip_prob=0.0), 0, src)
    np.testing.assert_array_equal(labels, src)
    # a smaller output grid is centred on the source
    _, labels = run((32, 32, 32), dict(IDENTITY, flip_prob=0.0), 0, src)
    np.testing.assert_array_equal(labels, src[4:36, 4:36, 4:36])


def test_output_voxel_size(src):
    """2 mm output voxels on a 1 mm source: every other source voxel, about the centre."""
    src41 = np.pad(src, ((0, 1), (0, 1), (0, 1)))
    _, labels = run((20, 20, 20), dict(IDENTITY, flip_prob=0.0, voxsize_mm=2.0), 0, src41)
    np.testing.assert_array_equal(labels, src41[1::2, 1::2, 1::2])


@pytest.mark.parametrize('lr_axis', [0, 2])
def test_flip_mirrors_along_lr_axis_and_swaps_hemispheres(lr_axis):
    """After a flip the left structures sit, mirrored, where the right ones were and carry the
    right-hemisphere labels (2 -> 41, 17 -> 53, 41 -> 2, 42 -> 3); midline labels keep theirs."""
    src = asymmetric_map(lr_axis=lr_axis)
    _, labels = run(SRC_SHAPE, dict(IDENTITY, flip_prob=1.0, lr_axis=lr_axis), 0, src)
    mirrored = np.flip(src, axis=lr_axis)
    expected = lab.lr_swap_lookup()[mirrored]
    np.testing.assert_array_equal(labels, expected)
    # spelled out: where the source had 17 (left hippocampus), the mirror position holds 53
    idx = np.argwhere(src == 17)
    idx[:, lr_axis] = 39 - idx[:, lr_axis]
    assert np.all(labels[tuple(idx.T)] == 53)
    assert not np.any(labels == 17)
    # the left half now holds what was the right hemisphere, renamed left
    left = np.take(labels, np.arange(20), axis=lr_axis)
    assert set(np.unique(left)) >= {2, 3} and not {41, 42, 53} & set(np.unique(left))


def test_flip_probability_is_per_example(src):
    batch = np.repeat(src[None, ..., None].astype(np.int32), 8, 0)
    g = gen.SynthGenerator(SRC_SHAPE, gen.GeneratorParams(**IDENTITY, flip_prob=0.5), seed=4)
    labels = np.asarray(g(ops.convert_to_tensor(batch))['labels'])[..., 0]
    flipped = [bool((labels[i] == 53).any()) for i in range(8)]
    assert 0 < sum(flipped) < 8
    for i in range(8):
        expected = lab.lr_swap_lookup()[src[::-1]] if flipped[i] else src
        np.testing.assert_array_equal(labels[i], expected)


# ---------------------------------------------------------------------------------------------
# full random pairs

def test_same_seed_same_pair_other_seed_other_pair(src):
    a_img, a_lab = run((32, 32, 32), {}, 7, src)
    b_img, b_lab = run((32, 32, 32), {}, 7, src)
    c_img, c_lab = run((32, 32, 32), {}, 8, src)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


def test_images_in_unit_range_labels_from_input(src):
    batch = np.repeat(src[None, ..., None].astype(np.int32), 3, 0)
    # SynthSeg's defaults, but a translation that keeps this small head in the field of view
    params = gen.GeneratorParams(translation_range_mm=(-4, 4))
    g = gen.SynthGenerator((32, 32, 32), params, seed=1)
    allowed = set(np.unique(src)) | set(lab.lr_swap_lookup()[np.unique(src)])
    for _ in range(2):
        out = g(ops.convert_to_tensor(batch))
        img, labels = np.asarray(out['image']), np.asarray(out['labels'])
        assert img.dtype == np.float32 and labels.dtype == np.int32
        assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
        for i in range(3):
            assert img[i].max() == pytest.approx(1) and img[i].min() == 0
            assert set(np.unique(labels[i])) <= allowed
            assert (labels[i] > 0).mean() > 0.3        # the head is in the field of view
        assert np.asarray(out['coords']).shape == (3, 32, 32, 32, 3)


def test_compiled_sampler_matches_its_contract(src):
    """The XLA-compiled sampler (one compile: ~7 s on 2 cores) gives valid pairs and moves on
    to new ones; byte-identical reruns are checked end to end in test_mri_synth."""
    batch = src[None, ..., None].astype(np.int32)
    sampler = gen.PairSampler(gen.SynthGenerator((32, 32, 32), seed=3), seed=3)
    first, second = sampler(batch), sampler(batch)
    allowed = set(np.unique(src)) | set(lab.lr_swap_lookup()[np.unique(src)])
    for out in (first, second):
        img = np.asarray(out['image'])
        assert np.isfinite(img).all() and img.min() == 0 and img.max() == pytest.approx(1)
        assert set(np.unique(np.asarray(out['labels']))) <= allowed
    assert not np.array_equal(np.asarray(first['image']), np.asarray(second['image']))


def test_strip_blackens_everything_but_brain_and_csf(src):
    params = dict(IDENTITY, flip_prob=0.0, strip_prob=1.0, resolution_prob=0.0,
                  std_range=(1, 5), mean_range=(50, 200))
    img, labels = run(SRC_SHAPE, params, 2, src)
    brain = np.isin(labels, list(lab.BRAIN_LABELS) + [24])
    assert np.all(img[~brain] == 0)
    assert np.all(img[brain] > 0)
    img, _ = run(SRC_SHAPE, dict(params, strip_prob=0.0), 2, src)
    assert (img[labels == 502] > 0).all()


# ---------------------------------------------------------------------------------------------
# parameters, classes, label bank

def test_label_classes_share_left_right():
    table, n = gen.label_classes()
    assert n == len(lab.GENERATION_LABELS) - sum(
        1 for left, right in lab.LR_PAIRS if left in lab.GENERATION_LABELS
        and right in lab.GENERATION_LABELS)
    for left, right in lab.LR_PAIRS:
        if left in lab.GENERATION_LABELS:
            assert table[left] == table[right]
    assert len({table[g] for g in (0, 2, 3, 24, 502, 16)}) == 6


def test_params_json_round_trip_and_unknown_keys(tmp):
    path = os.path.join(tmp, 'p.json')
    with open(path, 'w') as f:
        json.dump({'flip_prob': 0.0, 'std_range': [0, 5]}, f)
    p = gen.GeneratorParams.from_json(path)
    assert p.flip_prob == 0.0 and p.std_range == (0, 5)
    assert gen.GeneratorParams.from_dict(p.to_dict()) == p
    with open(path, 'w') as f:
        json.dump({'flip_prob': 0.0, 'flip_probability': 1}, f)
    with pytest.raises(ValueError, match='flip_probability'):
        gen.GeneratorParams.from_json(path)


def test_label_map_bank_crops_and_centres(tmp):
    paths = []
    for i, (lo, hi) in enumerate((((10, 12, 14), (20, 30, 24)), ((5, 5, 5), (9, 9, 9)))):
        a = np.zeros((40, 40, 40), np.int16)
        a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 2 + i
        paths.append(os.path.join(tmp, '%d.nii.gz' % i))
        nib.save(nib.Nifti1Image(a, np.eye(4)), paths[-1])
    bank = gen.LabelMapBank(paths, margin=2)
    assert bank.shape == (14, 22, 14) and len(bank) == 2
    batch, idx = bank.batch(2, np.random.default_rng(0), indices=[0, 1])
    assert batch.shape == (2, 14, 22, 14, 1) and batch.dtype == np.int32
    assert (batch[0] == 2).sum() == 10 * 18 * 10
    nz = np.argwhere(batch[1, ..., 0] == 3)            # the small map sits in the middle
    np.testing.assert_array_equal(nz.min(0), [5, 9, 5])


def test_shrink_structures_erodes_ventricles_into_the_tissue_around_them():
    a = np.zeros((40, 40, 40), np.int16)
    a[4:36, 4:36, 4:36] = 2                      # white matter
    a[10:30, 15:25, 15:25] = 4                   # a lateral ventricle, 20 x 10 x 10
    a[30:32, 18:21, 18:21] = 5                   # a thin inferior horn beside it
    a[10:30, 15:25, 25:28] = 11                  # caudate along one side
    a[20, 20, 20] = 31                           # choroid plexus inside the ventricle
    out = gen.shrink_structures(a, 1)
    assert out is not a and (a == 4).sum() == 20 * 10 * 10 - 1       # input untouched
    # one voxel off every face of the cavity (the group 4 + 5 + 31 erodes as one: where the
    # horn joins it, a 3 x 3 patch of the ventricle is inside the group and stays)
    assert (out == 4).sum() == 18 * 8 * 8 - 1 + 9
    np.testing.assert_array_equal(np.argwhere(out == 4).min(0), [11, 16, 16])
    # what it lost went to the nearest tissue: caudate on its side, white matter elsewhere
    lost = (a == 4) & (out != 4)
    assert set(np.unique(out[lost])) == {2, 11}
    assert (out[11:29, 16:24, 24] == 11).all()
    # the inferior horn would keep under 30 %: it stays whole, as does the choroid plexus
    assert ((out == 5) == (a == 5)).all() and out[20, 20, 20] == 31
    # nothing else changes; radius 0 is a copy
    assert (out[a != 4] == a[a != 4]).all()
    assert (gen.shrink_structures(a, 0) == a).all()


# ---------------------------------------------------------------------------------------------
# other backends

JAX_SCRIPT = textwrap.dedent('''
    import numpy as np, keras
    from keras import ops
    assert keras.backend.backend() == 'jax'
    from synthkit import generator as gen, layers
    src = np.zeros((1, 28, 28, 28, 1), np.int32)
    src[0, 4:14, 4:24, 4:24] = 2; src[0, 14:24, 4:24, 4:24] = 41; src[0, 8:12, 8:12, 8:12] = 17
    g = gen.SynthGenerator((24, 24, 24), seed=1)
    out = g(ops.convert_to_tensor(src))
    img, lab = np.asarray(out['image']), np.asarray(out['labels'])
    assert img.shape == (1, 24, 24, 24, 1) and np.isfinite(img).all()
    assert 0 <= img.min() and img.max() <= 1 and img.max() > 0.5
    assert set(np.unique(lab)) <= {0, 2, 41, 17, 53}
    sampler = gen.PairSampler(gen.SynthGenerator((24, 24, 24), seed=1), seed=1)
    img2 = np.asarray(sampler(src)['image'])
    assert np.isfinite(img2).all() and 0 <= img2.min() and img2.max() <= 1
    # the generator as one stateless XLA program (what a GPU runs) draws what eager calls draw,
    # and its seed states advance from call to call
    eager, jitted = (gen.PairSampler(gen.SynthGenerator((24, 24, 24), seed=4), seed=4, jit=j)
                     for j in (False, True))
    for _ in range(2):
        a, b = eager(src), jitted(src)
        for k in ('image', 'labels', 'coords', 'flips'):
            assert np.allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-4), k
    assert not np.allclose(np.asarray(jitted(src)['image']), np.asarray(b['image']))
    vel = ops.ones((1, 12, 12, 12, 3)) * 1.5
    disp = np.asarray(layers.IntegrateVelocity(5)(vel))
    assert np.allclose(disp, 1.5, atol=1e-4)
    noise = np.random.default_rng(0).standard_normal((1, 32, 32, 32, 1)).astype('float32')
    res = layers.RandomResolution(anisotropic_range=(6, 6), anisotropic_prob=1.0, seed=0)
    low = np.asarray(res(ops.convert_to_tensor(noise)))
    assert np.isfinite(low).all() and low.std() < noise.std()
    det = np.asarray(layers.jacobian_determinant(ops.convert_to_tensor(disp)))
    assert np.allclose(det, 1, atol=1e-4)
    print('jax ok')
''')


@pytest.mark.slow
def test_jax_backend():
    pytest.importorskip('jax')
    env = dict(os.environ, KERAS_BACKEND='jax', JAX_PLATFORMS='cpu',
               PYTHONPATH=os.path.join(os.path.dirname(os.path.dirname(__file__)), 'python'))
    proc = subprocess.run([sys.executable, '-c', JAX_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'jax ok' in proc.stdout


@pytest.mark.parametrize('values, message', [
    ({'prior': 'gaussian'}, 'prior'),
    ({'flip_prob': 1.5}, 'flip_prob'),
    ({'voxsize_mm': float('inf')}, 'voxsize_mm'),
    ({'voxsize_mm': 0}, 'voxsize_mm'),
    ({'scaling_range': (1.2, 0.8)}, 'scaling_range'),
    ({'rotation_range_deg': (0, 1, 2)}, 'rotation_range_deg'),
    ({'nonlin_std_mm': -1}, 'nonlin_std_mm'),
    ({'lr_axis': 3}, 'lr_axis'),
    ({'integration_steps': 2.5}, 'integration_steps'),
    ({'fov_max_fraction': 1.5}, 'fov_max_fraction'),
])
def test_generator_params_are_checked_on_construction(values, message):
    with pytest.raises(ValueError, match=message):
        gen.GeneratorParams(**values)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(gen.GeneratorParams(), **values)
    # 'normal' priors take (mean, std) pairs, which need not be ordered
    gen.GeneratorParams(prior='normal', mean_range=(120, 40), std_range=(10, 5))


@pytest.mark.parametrize('voxsize', [1.0, 2.0])
def test_without_randomization_image_and_labels_share_centroids(voxsize):
    """Every randomization off: each structure sits at the same place in the painted image (found
    by its intensity) and in the target labels, and those are the source map's labels at the
    output voxels' centres (output voxel i at source voxel voxsize * (i - (n - 1) / 2) + 19)."""
    from scipy import ndimage
    src = asymmetric_map()[:39, :39, :39]          # odd: the grid centres are voxel centres
    off = dict(IDENTITY, flip_prob=0.0, resolution_prob=0.0, bias_std_max=0.0, gamma_std=0.0,
               std_range=(0, 0), mean_range=(10, 250), voxsize_mm=voxsize)
    n = int(39 // voxsize)
    image, labels = run((n,) * 3, off, 3, src)
    step = int(voxsize)
    first = 19 - step * (n - 1) // 2
    np.testing.assert_array_equal(labels, src[first::step, first::step, first::step][:n, :n, :n])
    for group in ((17,), (42,), (24,), (2, 41)):     # 2 and 41 share one Gaussian
        mask = np.isin(labels, group)
        painted = np.isclose(image, np.median(image[mask]), atol=1e-4)
        offset = np.array(ndimage.center_of_mass(painted)) - ndimage.center_of_mass(mask)
        assert np.abs(offset).max() < 0.25, (group, offset)
