"""synthkit.layers: each random layer does what its docstring promises, measured on phantoms.

Everything runs eagerly on small grids (no XLA compile), so the file takes seconds.
"""

import numpy as np
import pytest
from keras import ops

from synthkit import layers
from synthkit.layers import utils

# (label, centre, radii) of the ellipsoids of the phantom; left structures at low x
ELLIPSOIDS = ((2, (13, 20, 20), (6, 9, 8)), (41, (27, 20, 20), (6, 9, 8)),
              (3, (13, 14, 24), (3, 3, 4)), (42, (27, 14, 24), (3, 3, 4)),
              (17, (14, 25, 16), (3, 4, 3)), (53, (26, 25, 16), (3, 4, 3)),
              (24, (20, 20, 8), (3, 6, 2)))


def ellipsoid_phantom(shape=(40, 40, 40), zoom=1.0):
    """Label map of ellipsoids (later ones drawn over earlier ones) on a 40^3 layout, or
    ``zoom`` times bigger on a grid that large."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
    out = np.zeros(shape, np.int32)
    for label, centre, radii in ELLIPSOIDS:
        centre = (np.asarray(centre) - 19.5) * zoom + (np.asarray(shape) - 1) / 2
        inside = (((grid - centre) / (zoom * np.asarray(radii, float))) ** 2).sum(-1) <= 1
        out[inside] = label
    return out


def structure_counts(lab):
    values, counts = np.unique(lab, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


@pytest.fixture(scope='module')
def phantom():
    return ellipsoid_phantom()


# ---------------------------------------------------------------------------------------------
# spatial

def test_nearest_warp_keeps_labels_and_scales_volumes_as_drawn():
    """Scaling only: every structure's volume changes by 1/det of the drawn matrix (the matrix
    maps output to source), so within [1/1.1^3, 1/0.9^3], and no label value is invented."""
    b, n = 4, 64
    big = ellipsoid_phantom((n, n, n), zoom=1.6)
    aff = layers.RandomAffine(scaling_range=(0.9, 1.1), rotation_range_deg=(0, 0),
                              shearing_range=(0, 0), translation_range=(0, 0), seed=3)
    src = ops.convert_to_tensor(np.repeat(big[None, ..., None], b, 0))
    mats, flips = aff(src)
    mats = np.asarray(mats)
    assert not np.asarray(flips).any()
    center = ops.convert_to_tensor(np.full((1, 3), (n - 1) / 2, np.float32))
    coords = layers.affine_coordinates(mats, ops.zeros((b, n, n, n, 3)), center)
    out = np.asarray(layers.SpatialTransformer('nearest', 'coords')([src, coords]))
    before = structure_counts(big)
    for i in range(b):
        scales = np.diag(mats[i, :3, :3])
        assert np.all((scales >= 0.9) & (scales <= 1.1))
        assert not np.allclose(scales, 1, atol=0.01)   # the test must actually scale
        expected = 1 / np.prod(scales)
        after = structure_counts(out[i, ..., 0])
        assert set(after) == set(before)
        for label in before:
            if label == 0:
                continue
            ratio = after[label] / before[label]
            # nearest sampling quantizes each extent to whole voxels: the big structures
            # (~6500 voxels) follow the drawn scaling to a few percent, the small ones (~600)
            # only to ~25%
            tol = 0.06 if before[label] > 5000 else 0.25
            assert ratio == pytest.approx(expected, rel=tol), (label, ratio, expected)
            assert 1 / 1.1 ** 3 * (1 - tol) < ratio < 1 / 0.9 ** 3 * (1 + tol)


def test_nearest_warp_under_svf_invents_no_labels(phantom):
    b = 2
    src = ops.convert_to_tensor(np.repeat(phantom[None, ..., None], b, 0))
    vel = layers.resize_field(layers.RandomVelocityField((40,) * 3, 3.0, 0.1, seed=1)(src),
                              (40, 40, 40))
    disp = layers.IntegrateVelocity(5)(vel)
    warped = np.asarray(layers.SpatialTransformer('nearest')([src, disp]))
    assert warped.dtype == np.int32
    assert set(np.unique(warped)) <= set(np.unique(phantom))
    assert (warped != phantom[None, ..., None]).mean() > 0.005     # it did deform
    # linear interpolation of the same labels would invent values: the test can fail
    blurred = np.asarray(layers.SpatialTransformer('linear')([ops.cast(src, 'float32'), disp]))
    assert not set(np.unique(blurred)) <= set(np.unique(phantom).astype(float))


def test_integrated_svf_is_invertible_where_the_raw_field_folds():
    """Scaling and squaring keeps the Jacobian positive: with the generator's default velocity
    (4 mm std on a 7^3 control grid for 160^3, integrated at a quarter resolution: 40^3) no voxel
    folds, and at three times that std still < 0.1% fold, while the same velocity used directly
    as a displacement folds in more voxels than that."""
    ref = ops.zeros((4, 1))
    for std_max, check_raw in ((1.0, False), (3.0, True)):
        coarse = layers.RandomVelocityField((160, 160, 160), std_max, 0.04, seed=7)(ref)
        assert tuple(coarse.shape[1:4]) == (7, 7, 7)
        vel = layers.resize_field(coarse, (40, 40, 40))
        disp = layers.IntegrateVelocity(7)(vel)
        det = np.asarray(layers.jacobian_determinant(disp))
        assert np.abs(np.asarray(disp)).max() > std_max  # non-trivial deformation
        assert (det <= 0).mean() < 1e-3
        if check_raw:
            raw = np.asarray(layers.jacobian_determinant(vel))
            assert (raw <= 0).mean() > 1e-3


def test_constant_velocity_integrates_to_that_translation():
    v = np.array([1.5, -0.7, 2.25], np.float32)
    vel = ops.ones((1, 20, 22, 24, 3)) * ops.convert_to_tensor(v)
    disp = np.asarray(layers.IntegrateVelocity(7)(vel))
    np.testing.assert_allclose(disp.reshape(-1, 3), np.broadcast_to(v, (20 * 22 * 24, 3)),
                               atol=1e-4)


def test_resize_field_rescales_vectors_to_the_new_voxels():
    """u(i) = a * i on a 9-point grid is, on the corner-aligned 33-point grid, u(j) = a * j (the
    vectors are in voxels of their own grid)."""
    a = np.array([0.3, -0.2, 0.1], np.float32)
    i = utils.volume_grid((9, 9, 9))
    coarse = np.asarray(i)[None] * a
    fine = np.asarray(layers.ResizeField((33, 33, 33))(ops.convert_to_tensor(coarse)))
    j = np.asarray(utils.volume_grid((33, 33, 33)))[None]
    np.testing.assert_allclose(fine, j * a, atol=1e-4)


def test_jacobian_determinant_of_a_known_linear_map():
    x = np.asarray(utils.volume_grid((8, 9, 10)))[None]
    lin = np.array([[1.2, 0.1, 0], [0, 0.9, 0], [0.05, 0, 1.1]], np.float32)
    disp = x @ lin.T - x
    det = np.asarray(layers.jacobian_determinant(ops.convert_to_tensor(disp)))
    assert det.shape == (1, 6, 7, 8)
    np.testing.assert_allclose(det, np.linalg.det(lin), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# intensity

CLASSES = np.zeros(64, np.int32)
for _c, _pair in enumerate(((0,), (2, 41), (3, 42), (17, 53), (24,))):
    CLASSES[list(_pair)] = _c


def _regions(lab):
    return {v: lab == v for v in np.unique(lab)}


def test_gmm_constant_per_class_and_shared_by_hemispheres(phantom):
    b = 3
    lab = ops.convert_to_tensor(np.repeat(phantom[None, ..., None], b, 0))
    painter = layers.GMMPainter(CLASSES, 5, mean_range=(10, 200), std_range=(0, 0), seed=11)
    img = np.asarray(painter(lab))[..., 0]
    regions = _regions(phantom)
    for i in range(b):
        value = {}
        for label, mask in regions.items():
            vals = img[i][mask]
            assert np.ptp(vals) == 0                  # std 0: one value per label
            value[label] = vals[0]
            assert 10 <= vals[0] <= 200
        for left, right in ((2, 41), (3, 42), (17, 53)):
            assert value[left] == value[right]
        assert len({value[k] for k in (0, 2, 3, 17, 24)}) == 5
    assert not np.allclose(img[0], img[1])            # per-example draws


def test_gmm_voxels_follow_the_drawn_gaussians(phantom):
    """Same seed and noise: mean-only painting gives the class means m; painting with stds gives
    m + s * noise, so (x - m) / noise recovers one std per class, inside std_range, shared by
    L/R pairs; and the empirical per-label std (own noise) matches a fixed std."""
    b = 2
    lab = ops.convert_to_tensor(np.repeat(phantom[None, ..., None], b, 0))
    noise = np.random.default_rng(0).standard_normal((b, 40, 40, 40, 1)).astype(np.float32)
    noise[np.abs(noise) < 1e-2] = 1.0                 # avoid dividing by ~0 below
    means = np.asarray(layers.GMMPainter(CLASSES, 5, (20, 180), (0, 0), seed=5)(lab, noise))
    full = np.asarray(layers.GMMPainter(CLASSES, 5, (20, 180), (4, 25), seed=5)(lab, noise))
    stds = ((full - means) / noise)[..., 0]
    regions = _regions(phantom)
    for i in range(b):
        per_label = {}
        for label, mask in regions.items():
            s = stds[i][mask]
            assert np.ptp(s) < 1e-3 * max(1.0, s.mean())
            assert 4 - 1e-3 <= s.mean() <= 25 + 1e-3
            per_label[label] = s.mean()
        for left, right in ((2, 41), (3, 42), (17, 53)):
            assert per_label[left] == pytest.approx(per_label[right], rel=1e-4)

    # without a given noise: empirical statistics of the big regions match N(m, 8)
    painter = layers.GMMPainter(CLASSES, 5, (100, 100), (8, 8), seed=9)
    img = np.asarray(painter(lab))[..., 0]
    for label in (0, 2, 41):
        vals = img[0][regions[label]]
        assert vals.std() == pytest.approx(8, rel=0.05)
        assert vals.mean() == pytest.approx(100, abs=4 * 8 / np.sqrt(vals.size))


def test_gmm_background_zero(phantom):
    lab = ops.convert_to_tensor(phantom[None, ..., None])
    img = np.asarray(layers.GMMPainter(CLASSES, 5, (50, 100), (5, 10), background_zero_prob=1.0,
                                       seed=2)(lab))[0, ..., 0]
    assert np.all(img[phantom == 0] == 0)
    assert np.all(img[phantom == 2] != 0)


def test_bias_field_is_smooth_positive_and_multiplicative():
    x = ops.ones((2, 32, 32, 32, 1)) * 10.0
    bias = layers.RandomBiasField(0.7, 0.1, seed=4)
    y = np.asarray(bias(x))[..., 0] / 10.0
    assert np.all(y > 0)
    assert not np.allclose(y, 1, atol=1e-2)
    log = np.log(y)
    # a field upsampled from a 4^3 grid: neighbouring voxels differ far less than the range
    step = max(np.abs(np.diff(log, axis=a)).max() for a in (1, 2, 3))
    assert step < 0.2 * np.ptp(log)


def test_gamma_and_normalize_keep_unit_range_and_order():
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 7, (3, 10, 10, 10, 1)).astype(np.float32)
    n = np.asarray(layers.MinMaxNormalize()(x))
    assert n.min() == 0 and np.allclose(n.reshape(3, -1).max(1), 1)
    g = np.asarray(layers.RandomGamma(0.5, seed=3)(n))
    assert g.min() >= 0 and g.max() <= 1 + 1e-6
    for i in range(3):   # a gamma curve is monotonic: the order of voxels is kept
        order = np.argsort(n[i].ravel(), kind='stable')
        assert np.all(np.diff(g[i].ravel()[order]) >= -1e-6)


# ---------------------------------------------------------------------------------------------
# resolution

def _high_fraction(vol, axis, cutoff):
    """Fraction of the power, along ``axis``, at frequencies above ``cutoff`` (cycles/voxel)."""
    power = np.abs(np.fft.rfft(vol, axis=axis)) ** 2
    power = power.mean(axis=tuple(a for a in range(3) if a != axis))
    f = np.fft.rfftfreq(vol.shape[axis])
    return power[f > cutoff].sum() / power.sum()


def test_resolution_removes_high_frequencies_along_the_thick_axis():
    """White noise through a forced 6 mm anisotropic acquisition: along one axis (which one is
    drawn per example) the power above the low-res Nyquist frequency 1/12 drops more than 8x;
    the other two axes keep the white spectrum."""
    spacing = 6.0
    noise = np.random.default_rng(0).standard_normal((4, 48, 48, 48, 1)).astype(np.float32)
    res = layers.RandomResolution(anisotropic_range=(spacing, spacing), anisotropic_prob=1.0,
                                  prob=1.0, seed=1)
    out = np.asarray(res(ops.convert_to_tensor(noise)))[..., 0]
    white = _high_fraction(noise[0, ..., 0], 0, 1 / (2 * spacing))
    chosen = []
    for i in range(4):
        frac = np.array([_high_fraction(out[i], a, 1 / (2 * spacing)) for a in range(3)])
        low = int(np.argmin(frac))
        others = np.delete(frac, low)
        assert frac[low] < others.min() / 8, frac
        np.testing.assert_allclose(others, white, rtol=0.05)
        chosen.append(low)
    assert len(set(chosen)) > 1    # the axis is random


def test_resolution_inplane_range_sets_the_two_thin_axes():
    """Low-field-like acquisitions (e.g. 1.5 x 1.5 x 5 mm): with ``inplane_range`` the two axes
    other than the thick one share one spacing from it; by default they stay at 1 mm, drawn
    from the same random stream as before the option (the thick axis and spacing unchanged)."""
    def draw(**kw):
        res = layers.RandomResolution(anisotropic_range=(4, 6), anisotropic_prob=1.0, seed=3,
                                      **kw)
        spacing, thickness = res.sample_spacing(64)
        return np.asarray(spacing), np.asarray(thickness)
    spacing, thickness = draw(inplane_range=(1.5, 2.0))
    thick = np.argmax(spacing, 1)
    assert len(set(thick.tolist())) == 3
    for s, t, a in zip(spacing, thickness, thick):
        assert 4 <= s[a] <= 6
        thin = np.delete(s, a)
        assert 1.5 <= thin[0] <= 2.0 and thin[0] == thin[1]
        assert np.all(t <= s + 1e-6) and np.all(t >= 0.5 * s - 1e-6)
    assert np.ptp(spacing[np.arange(64)[:, None], (thick[:, None] + [1, 2]) % 3]) > 0.2
    default, _ = draw()
    same, _ = draw(inplane_range=(1.0, 1.0))
    np.testing.assert_array_equal(default, same)
    assert np.all(np.sort(default, 1)[:, :2] == 1.0)
    np.testing.assert_array_equal(np.argmax(default, 1), thick)     # the draws before it kept
    np.testing.assert_allclose(default.max(1), spacing.max(1))


def test_resolution_matrices_are_identity_at_native_spacing():
    res = layers.RandomResolution()
    spacing = ops.convert_to_tensor([[1.0, 1.0, 4.0]])
    mats = res.matrices((16, 16, 16), spacing, spacing * 0.8)
    np.testing.assert_allclose(np.asarray(mats[0])[0], np.eye(16), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mats[1])[0], np.eye(16), atol=1e-6)
    thick = np.asarray(mats[2])[0]
    np.testing.assert_allclose(thick.sum(1), 1, atol=1e-5)     # averages: keeps constants
    assert np.abs(thick - np.eye(16)).max() > 0.3


def test_resolution_isotropic_blurs_every_axis():
    noise = np.random.default_rng(2).standard_normal((1, 32, 32, 32, 1)).astype(np.float32)
    res = layers.RandomResolution(isotropic_range=(4, 4), anisotropic_prob=0.0, prob=1.0, seed=0)
    out = np.asarray(res(ops.convert_to_tensor(noise)))[0, ..., 0]
    white = _high_fraction(noise[0, ..., 0], 0, 1 / 8)
    for a in range(3):
        assert _high_fraction(out, a, 1 / 8) < white / 8


# --------------------------------------------------------------------- configs and arguments
def _every_layer():
    """One instance of every layer of synthkit.layers, with non-default arguments."""
    from synthkit import generator as gen
    classes, n = gen.label_classes()
    return [
        layers.GMMPainter(classes[:64], n, (10, 200), (1, 20), 'uniform', 0.3, seed=1),
        layers.GMMPainter(classes[:64], n, (100, 30), (10, 5), 'normal', seed=2),
        layers.RandomBiasField(0.5, 0.05, seed=3),
        layers.RandomNoise(2.0, seed=4),
        layers.GaussianBlur((1.0, 0.5, 2.0)),
        layers.MinMaxNormalize(),
        layers.RandomGamma(0.3, seed=5),
        layers.RemapLabels([0, 1, 1, 2]),
        layers.OneHot(5),
        layers.RandomFieldOfView(0.2, 0.25, seed=6),
        layers.RandomResolution((1, 3), (1, 6), 0.4, 0.6, 0.5, 2.0, 0.9, seed=7,
                                inplane_range=(1.2, 1.8)),
        layers.RandomAffine((0.9, 1.1), (-10, 10), (-0.01, 0.01), (-5, 5), 0.5, 1, seed=8),
        layers.RandomVelocityField((16, 16, 16), 2.0, 0.1, seed=9),
        layers.IntegrateVelocity(5),
        layers.ResizeField((8, 10, 12)),
        layers.SpatialTransformer('nearest', 'coords', fill=-1),
    ]


@pytest.mark.parametrize('layer', _every_layer(), ids=lambda layer: type(layer).__name__)
def test_every_layer_round_trips_through_its_config(layer):
    config = layer.get_config()
    again = type(layer).from_config(config)
    assert again.get_config() == config


@pytest.mark.parametrize('make, message', [
    (lambda: layers.GMMPainter([0, 1], prior='gaussian'), 'prior'),
    (lambda: layers.GMMPainter([0, 1], mean_range=(200, 10)), 'mean_range'),
    (lambda: layers.GMMPainter([0, 1], std_range=(0, float('nan'))), 'std_range'),
    (lambda: layers.GMMPainter([0, 1], background_zero_prob=1.5), 'background_zero_prob'),
    (lambda: layers.RandomBiasField(std_max=-1), 'std_max'),
    (lambda: layers.RandomBiasField(scale=0), 'scale'),
    (lambda: layers.RandomNoise(std_max='a'), 'std_max'),
    (lambda: layers.GaussianBlur(-1), 'sigma'),
    (lambda: layers.RandomGamma(std=-0.1), 'std'),
    (lambda: layers.OneHot(0), 'n'),
    (lambda: layers.RandomFieldOfView(prob=2), 'prob'),
    (lambda: layers.RandomResolution(isotropic_range=(4, 1)), 'isotropic_range'),
    (lambda: layers.RandomResolution(voxsize=0), 'voxsize'),
    (lambda: layers.RandomResolution(inplane_range=(2, 1)), 'inplane_range'),
    (lambda: layers.RandomResolution(prob=-0.1), 'prob'),
    (lambda: layers.RandomAffine(scaling_range=(0, 1.2)), None),
    (lambda: layers.RandomAffine(scaling_range=(-1, 1.2)), 'scaling_range'),
    (lambda: layers.RandomAffine(lr_axis=3), 'lr_axis'),
    (lambda: layers.RandomAffine(flip_prob=1.01), 'flip_prob'),
    (lambda: layers.RandomVelocityField((8, 8, 8), std_max=-2), 'std_max'),
    (lambda: layers.IntegrateVelocity(2.5), 'steps'),
    (lambda: layers.SpatialTransformer('cubic'), 'interp'),
])
def test_layer_arguments_are_checked_where_the_layer_is_made(make, message):
    if message is None:          # a valid edge case
        make()
        return
    with pytest.raises(ValueError, match=message):
        make()


def test_affine_coordinates_without_a_displacement_field():
    mat = ops.convert_to_tensor(np.eye(4, dtype=np.float32)[None])
    centre = ops.convert_to_tensor(np.array([[3.5, 3.5, 3.5]], np.float32))
    coords = np.asarray(layers.affine_coordinates(mat, None, centre, shape=(8, 8, 8)))
    assert coords.shape == (1, 8, 8, 8, 3)
    assert np.allclose(coords[0, 2, 3, 4], [2, 3, 4])     # identity: each voxel maps to itself
    with pytest.raises(ValueError, match='shape'):
        layers.affine_coordinates(mat, None, centre)
