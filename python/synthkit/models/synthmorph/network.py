"""SynthMorph networks and their training losses: contrast-agnostic affine and deformable
registration.

Two models, both trained only on synthetic pairs (two images of one label map with independent
deformations and contrasts, :func:`synthkit.models.synthmorph.task.registration_pair`):

- **Affine** (:func:`feature_net` + :func:`barycenters` + :func:`fit_symmetric`): one small
  network, applied to each image separately, outputs ``K`` non-negative feature maps. The
  barycentre of each map is a point of the image; the barycentres of the moving image are matched
  to those of the fixed image by weighted least squares (weights: the maps' masses, the same for
  both orders). The fit is symmetric: both point sets are fitted to their midpoints and the
  transform is composed from the two fits, so swapping the inputs gives exactly the inverse.
  Rigid registration fits a rotation and translation to the same points (weighted Procrustes).
  Trained with a soft-Dice loss of the brain labels moved by the fitted transform.
- **Deformable** (:func:`velocity_net`): a U-Net that sees both images (after the affine) and
  predicts a stationary velocity field at half resolution, integrated by scaling and squaring.
  Its features are modulated by the regularization weight ``lambda`` (FiLM conditioning: each
  conv block's features are scaled and shifted by a small network of ``lambda``), so one model
  gives smoother or sharper warps at run time (``-r``). Trained with
  ``(1 - lambda) * (1 - Dice) + lambda * |grad v|^2`` on brain label maps and random-shapes label
  maps. Inference symmetrizes: ``v = (f(m, x) - f(x, m)) / 2``, so the inverse is ``exp(-v)``.

Coordinates: inside the networks, points are voxel coordinates centred on the grid of each
image (``x - (n - 1) / 2``); the affine maps *fixed* centred coordinates to *moving* ones (where
to sample the moving image for each fixed voxel), displacements are in voxels of the fixed grid
(neurite's convention).
"""

import keras
import numpy as np
from keras import layers, ops

from ... import layers as sk_layers
from ...layers import utils


# ------------------------------------------------------------------------------------ affine
def feature_net(features=(16, 32, 32, 32), out_features=32, out_level=1, name='affine_features'):
    """(B, X, Y, Z, 1) -> (B, X / 2**out_level, ..., out_features) non-negative feature maps.

    An encoder (two 3x3x3 convolutions per level, max pooling between levels) and a decoder with
    skip connections back up to level ``out_level``.
    """
    inp = keras.Input((None, None, None, 1), name='image')
    x = encoder_decoder(inp, features, out_level)
    out = layers.Conv3D(out_features, 3, padding='same', activation='relu', name='features')(x)
    return keras.Model(inp, out, name=name)


def encoder_decoder(x, features, out_level):
    """Encoder (two 3x3x3 convolutions per level, max pooling between levels) and decoder with
    skip connections back up to level ``out_level`` (features at 1 / 2**out_level resolution)."""
    skips = []
    for level, f in enumerate(features):
        for i in range(2):
            x = layers.Conv3D(f, 3, padding='same', name='enc%d_conv%d' % (level, i))(x)
            x = layers.LeakyReLU(0.2, name='enc%d_act%d' % (level, i))(x)
        if level < len(features) - 1:
            skips.append(x)
            x = layers.MaxPooling3D(2, name='pool%d' % level)(x)
    for level in reversed(range(out_level, len(features) - 1)):
        x = layers.UpSampling3D(2, name='up%d' % level)(x)
        x = layers.Concatenate(name='skip%d' % level)([x, skips[level]])
        x = layers.Conv3D(features[level], 3, padding='same', name='dec%d_conv' % level)(x)
        x = layers.LeakyReLU(0.2, name='dec%d_act' % level)(x)
    return x


def barycenters(feat, in_shape, eps=1e-6):
    """Barycentres (B, K, 3) of feature maps (B, x, y, z, K) in centred voxel coordinates of the
    input grid ``in_shape`` (the maps cover it at a lower resolution), and masses (B, K) (each
    map's mean value)."""
    shape = feat.shape[1:4]
    factor = [n_in / n for n_in, n in zip(in_shape, shape)]
    axes = [(np.arange(n, dtype=np.float32) + 0.5) * f - 0.5 - (n_in - 1) / 2
            for n, f, n_in in zip(shape, factor, in_shape)]
    grid = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3)
    flat = ops.reshape(feat, (-1, int(np.prod(shape)), feat.shape[-1]))      # (B, N, K)
    mass = ops.sum(flat, axis=1)                                              # (B, K)
    centers = ops.einsum('bnk,nd->bkd', flat, ops.convert_to_tensor(grid))
    centers = centers / (mass[..., None] + eps)
    return centers, mass / float(np.prod(shape))


def _homogeneous(points):
    return ops.concatenate([points, ops.ones_like(points[..., :1])], axis=-1)


def fit_affine(src, dst, weights, ridge=1e-3):
    """Weighted least-squares affine (B, 4, 4) mapping points ``src`` (B, K, 3) to ``dst``, in
    the points' dtype (float32 in training, float64 at inference).

    A small ridge pulls the linear part towards the identity when the points are degenerate."""
    x = _homogeneous(src)                                                     # (B, K, 4)
    w = weights / (ops.sum(weights, axis=-1, keepdims=True) + 1e-12)
    xtw = ops.transpose(x * w[..., None], (0, 2, 1))                          # (B, 4, K)
    eye = ridge * ops.eye(4, dtype=x.dtype)[None]
    a = ops.matmul(xtw, x) + eye
    b = ops.matmul(xtw, _homogeneous(dst)) + eye
    beta = ops.solve(a, b)                                                    # (B, 4, 4): x @ beta
    return ops.transpose(beta, (0, 2, 1))


def fit_symmetric(moving_pts, fixed_pts, weights, ridge=1e-3):
    """Affine (B, 4, 4) from fixed to moving centred coordinates, symmetric in the inputs:
    both sets are fitted to their midpoints, ``T = inv(A_moving) @ A_fixed``."""
    mid = (moving_pts + fixed_pts) / 2
    a_m = fit_affine(moving_pts, mid, weights, ridge)
    a_f = fit_affine(fixed_pts, mid, weights, ridge)
    return ops.matmul(ops.inv(a_m), a_f)


def fit_rigid(src, dst, weights):
    """Weighted Procrustes (numpy): the rotation + translation (4, 4) that best maps points
    ``src`` (K, 3) to ``dst``. Exactly symmetric: swapping the sets gives the inverse."""
    w = np.asarray(weights, np.float64)
    w = w / max(w.sum(), 1e-12)
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    cs, cd = w @ src, w @ dst
    h = ((src - cs) * w[:, None]).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1, 1, d]) @ u.T
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = cd - rot @ cs
    return out


def affine_points(matrix, shape, src_shape):
    """Voxel coordinates in a ``src_shape`` grid of the ``shape`` grid's voxels under ``matrix``
    (B, 4, 4) acting on centred coordinates."""
    y = utils.volume_grid(shape, center=True)[None]
    lin, trans = matrix[:, :3, :3], matrix[:, :3, 3]
    x = ops.einsum('bij,bxyzj->bxyzi', lin, y) + ops.reshape(trans, (-1, 1, 1, 1, 3))
    center = np.array([(n - 1) / 2 for n in src_shape], np.float32)
    return x + ops.convert_to_tensor(center)


def sample_affine(vol, matrix, out_shape, interp='linear'):
    """Sample ``vol`` (B, X, Y, Z, C) at ``matrix`` (B, 4, 4) applied to the centred voxel
    coordinates of an ``out_shape`` grid (centred coordinates of ``vol`` out)."""
    coords = affine_points(matrix, out_shape, vol.shape[1:4])
    if interp == 'linear':
        return utils.sample_linear(vol, coords, 0)
    return utils.sample(vol, coords, interp, 0)


class SymmetricFit(keras.layers.Layer):
    """[moving features, fixed features (B, x, y, z, K)] -> (B, 4, 4) symmetric affine from fixed
    to moving centred voxel coordinates; ``moving_shape`` / ``fixed_shape`` are the input grids
    the features cover."""

    def __init__(self, moving_shape, fixed_shape, **kwargs):
        super().__init__(**kwargs)
        self.moving_shape = tuple(int(n) for n in moving_shape)
        self.fixed_shape = tuple(int(n) for n in fixed_shape)

    def call(self, inputs):
        fm, ff = inputs
        pm, wm = barycenters(fm, self.moving_shape)
        pf, wf = barycenters(ff, self.fixed_shape)
        return fit_symmetric(pm, pf, ops.sqrt(wm * wf + 1e-12))

    def get_config(self):
        return {**super().get_config(), 'moving_shape': self.moving_shape,
                'fixed_shape': self.fixed_shape}


def dice_loss(a, b, eps=1e-5):
    """1 - mean soft Dice over the channels present in either of ``a`` and ``b``
    (B, X, Y, Z, C) one-hot or soft maps; (B,)."""
    inter = ops.sum(a * b, axis=(1, 2, 3))
    size = ops.sum(a + b, axis=(1, 2, 3))
    present = ops.cast(size > 0.5, 'float32')
    dice = (2 * inter + eps) / (size + eps)
    return 1 - ops.sum(dice * present, axis=-1) / (ops.sum(present, axis=-1) + 1e-6)


def coordinate_error(moving_coords, fixed_coords, fixed_labels, points, distance=False):
    """Mean squared distance (B,) between the source point of each labelled fixed voxel
    (``fixed_labels`` channel 0 is background) and that of the moving voxel at ``points`` (B,
    *shape, 3) in moving voxels; voxels mapped outside the moving grid are left out.

    ``distance=True``: the mean distance itself (the end-point error, whose gradient is bounded),
    and voxels mapped outside the grid count with the source point of the nearest border voxel
    (left out, they would let a field that maps everything outside zero the error)."""
    if distance:
        shape = moving_coords.shape[1:4]
        hi = ops.convert_to_tensor(np.array([n - 1 for n in shape], np.float32))
        moved = utils.sample_linear(moving_coords, ops.minimum(ops.maximum(points, 0.0), hi), 0)
        w = 1 - fixed_labels[..., 0]
        err = ops.sqrt(ops.sum(ops.square(moved - fixed_coords), axis=-1) + 1e-6)
        return ops.sum(w * err, axis=(1, 2, 3)) / (ops.sum(w, axis=(1, 2, 3)) + 1)
    ones = ops.ones_like(moving_coords[..., :1])
    moved = utils.sample_linear(ops.concatenate([moving_coords, ones], -1), points, 0)
    w = ops.cast(moved[..., 3] > 0.999, 'float32') * (1 - fixed_labels[..., 0])
    err = ops.sum(ops.square(moved[..., :3] - fixed_coords), axis=-1)
    return ops.sum(w * err, axis=(1, 2, 3)) / (ops.sum(w, axis=(1, 2, 3)) + 1)


class AffineLoss(keras.layers.Layer):
    """[moving labels, fixed labels (B, X, Y, Z, C), affine (B, 4, 4), and optionally the
    source coordinates of both images (B, X, Y, Z, 3)] -> 1 - soft Dice of the moving labels
    resampled by the affine onto the fixed grid, + ``coord_weight`` x the mean squared distance
    of corresponding source points (:func:`coordinate_error`) (B,)."""

    def __init__(self, coord_weight=0.0, **kwargs):
        super().__init__(**kwargs)
        self.coord_weight = float(coord_weight)

    def call(self, inputs):
        lm, lf, mat = inputs[:3]
        points = affine_points(mat, lf.shape[1:4], lm.shape[1:4])
        loss = dice_loss(utils.sample_linear(lm, points, 0), lf)
        if self.coord_weight and len(inputs) == 5:
            loss = loss + self.coord_weight * coordinate_error(inputs[3], inputs[4], lf, points)
        return loss

    def get_config(self):
        return {**super().get_config(), 'coord_weight': self.coord_weight}


def affine_training_model(features, shape, n_labels, coord_weight=0.0):
    """Inputs: moving, fixed (1, *shape, 1), their one-hot labels (1, *shape, n_labels) and, with
    ``coord_weight``, their source coordinates (1, *shape, 3); output: the loss per example."""
    moving = keras.Input((*shape, 1), name='moving', batch_size=1)
    fixed = keras.Input((*shape, 1), name='fixed', batch_size=1)
    lm = keras.Input((*shape, n_labels), name='moving_labels', batch_size=1)
    lf = keras.Input((*shape, n_labels), name='fixed_labels', batch_size=1)
    inputs = [moving, fixed, lm, lf]
    if coord_weight:
        inputs += [keras.Input((*shape, 3), name='moving_coords', batch_size=1),
                   keras.Input((*shape, 3), name='fixed_coords', batch_size=1)]
    mat = SymmetricFit(shape, shape, name='fit')([features(moving), features(fixed)])
    loss = AffineLoss(coord_weight, name='affine_loss')([lm, lf, mat] + inputs[4:])
    return keras.Model(inputs, loss, name='synthmorph_affine_train')


# -------------------------------------------------------------------------------- deformable
class FiLM(keras.layers.Layer):
    """Scale and shift features (B, X, Y, Z, F) by ``(1 + gamma, beta)`` (B, 2F) of lambda."""

    def call(self, inputs):
        x, gb = inputs
        f = x.shape[-1]
        gamma = ops.reshape(gb[:, :f], (-1, 1, 1, 1, f))
        beta = ops.reshape(gb[:, f:], (-1, 1, 1, 1, f))
        return x * (1 + gamma) + beta


def velocity_net(features=(16, 32, 32, 32), hyper_units=32, out_scale=1.0,
                 name='deform_velocity'):
    """[pair (B, X, Y, Z, 2), lambda (B, 1)] -> velocity (B, X/2, Y/2, Z/2, 3) in voxels of the
    half-resolution grid. A U-Net whose decoder stops one level short of the input resolution;
    every conv block is FiLM-modulated by a small MLP of lambda."""
    pair = keras.Input((None, None, None, 2), name='pair')
    lam = keras.Input((1,), name='lambda')
    h = layers.Dense(hyper_units, activation='relu', name='hyper0')(lam)
    h = layers.Dense(hyper_units, activation='relu', name='hyper1')(h)

    def block(x, f, name, n=2):
        for i in range(n):
            x = layers.Conv3D(f, 3, padding='same', name='%s_conv%d' % (name, i))(x)
            x = layers.LeakyReLU(0.2, name='%s_act%d' % (name, i))(x)
        gb = layers.Dense(2 * f, kernel_initializer='zeros', name='%s_film' % name)(h)
        return FiLM(name='%s_mod' % name)([x, gb])

    x, skips = pair, []
    for level, f in enumerate(features):
        x = block(x, f, 'enc%d' % level)
        if level < len(features) - 1:
            skips.append(x)
            x = layers.MaxPooling3D(2, name='pool%d' % level)(x)
    for level in reversed(range(1, len(features) - 1)):
        x = layers.UpSampling3D(2, name='up%d' % level)(x)
        x = layers.Concatenate(name='skip%d' % level)([x, skips[level]])
        x = block(x, features[level], 'dec%d' % level)
    init = keras.initializers.RandomNormal(stddev=1e-5)
    vel = layers.Conv3D(3, 3, padding='same', kernel_initializer=init, name='velocity')(x)
    if out_scale != 1:
        vel = layers.Rescaling(float(out_scale), name='velocity_scale')(vel)
    return keras.Model([pair, lam], vel, name=name)


class Correlation(keras.layers.Layer):
    """Local cost volume: ``[fixed, moving]`` features (B, X, Y, Z, C) -> (B, X, Y, Z, K) the
    dot products ``<fixed(x), moving(x + d)>`` for the K = (2r+1)^3 integer shifts ``d`` within
    ``radius`` (ordered as :func:`correlation_shifts`); zero where ``x + d`` leaves the grid."""

    def __init__(self, radius=2, **kwargs):
        super().__init__(**kwargs)
        self.radius = int(radius)

    def call(self, inputs):
        fixed, moving = inputs
        return ops.stack([ops.sum(fixed * shifted, axis=-1)
                          for shifted in shifted_copies(moving, self.radius)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[0][:-1], (2 * self.radius + 1) ** 3)

    def get_config(self):
        return {**super().get_config(), 'radius': self.radius}


def correlation_shifts(radius):
    """The integer shifts (K, 3) of :class:`Correlation`, x-major."""
    r = np.arange(-radius, radius + 1, dtype=np.float32)
    return np.stack(np.meshgrid(r, r, r, indexing='ij'), -1).reshape(-1, 3)


def shifted_copies(x, radius, fill=0.0):
    """``x(. + d)`` (B, X, Y, Z, C) for each shift ``d`` of :func:`correlation_shifts`, in that
    order; ``fill`` where ``x + d`` leaves the grid."""
    r = radius
    padded = ops.pad(x, [[0, 0], [r, r], [r, r], [r, r], [0, 0]], constant_values=fill)
    size = ops.shape(x)
    for d in correlation_shifts(r):
        yield ops.slice(padded, [0, int(d[0]) + r, int(d[1]) + r, int(d[2]) + r, 0], size)


class SoftArgmax(keras.layers.Layer):
    """Cost volume (B, X, Y, Z, K) -> expected shift (B, X, Y, Z, 3) under ``softmax(t * cost)``
    with a learned temperature ``t``."""

    def __init__(self, radius=2, temperature=10.0, **kwargs):
        super().__init__(**kwargs)
        self.radius, self.temperature = int(radius), float(temperature)

    def build(self, input_shape):
        self.log_t = self.add_weight(shape=(), name='log_temperature',
                                     initializer=keras.initializers.Constant(
                                         np.log(self.temperature)))

    def call(self, cost):
        p = ops.softmax(ops.exp(self.log_t) * cost, axis=-1)
        return ops.einsum('bxyzk,kc->bxyzc', p,
                          ops.convert_to_tensor(correlation_shifts(self.radius)))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self):
        return {**super().get_config(), 'radius': self.radius, 'temperature': self.temperature}


class Channels(keras.layers.Layer):
    """Channels ``start:stop`` of the last axis (a serializable slice)."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = int(start), int(stop)

    def call(self, x):
        return x[..., self.start:self.stop]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.stop - self.start)

    def get_config(self):
        return {**super().get_config(), 'start': self.start, 'stop': self.stop}


class L2Normalize(keras.layers.Layer):
    """Feature vectors (last axis) less their mean over the image, scaled to unit length: dot
    products of them are correlations that tell places apart (raw features are mostly alike)."""

    def call(self, x):
        x = x - ops.mean(x, axis=(1, 2, 3), keepdims=True)
        return x / ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + 1e-6)


def correlation_net(features=(16, 32, 32), radius=2, hyper_units=32, head_features=32,
                    temperature=10.0, name='deform_velocity'):
    """[pair (B, X, Y, Z, 2), lambda (B, 1)] -> velocity (B, X/2, Y/2, Z/2, 3) in voxels of the
    half-resolution grid, from a local correlation of the two images' features.

    One small encoder (shared by both images: a Siamese pair) maps each image to unit feature
    vectors at half resolution; their cost volume over the shifts within ``radius`` half-res
    voxels gives, by soft-argmax, a first field; a lambda-conditioned (FiLM) head sees the cost
    volume and that field and adds a correction. Identical images give the right shift from the
    start (features match where the images do), so training has only to make the features
    contrast-invariant, which is far quicker than learning correspondence from scratch."""
    pair = keras.Input((None, None, None, 2), name='pair')
    lam = keras.Input((1,), name='lambda')
    h = layers.Dense(hyper_units, activation='relu', name='hyper0')(lam)
    h = layers.Dense(hyper_units, activation='relu', name='hyper1')(h)

    image = keras.Input((None, None, None, 1), name='image')
    x = layers.Conv3D(features[1], 1, name='embed')(encoder_decoder(image, features, 1))
    encoder = keras.Model(image, L2Normalize(name='unit')(x), name='encoder')

    moving = Channels(0, 1, name='moving_image')(pair)
    fixed = Channels(1, 2, name='fixed_image')(pair)
    cost = Correlation(radius, name='cost')([encoder(fixed), encoder(moving)])
    flow = SoftArgmax(radius, temperature, name='soft_argmax')(cost)
    y = layers.Concatenate(name='head_in')([cost, flow])
    for i in range(2):
        y = layers.Conv3D(head_features, 3, padding='same', name='head_conv%d' % i)(y)
        y = layers.LeakyReLU(0.2, name='head_act%d' % i)(y)
        gb = layers.Dense(2 * head_features, kernel_initializer='zeros',
                          name='head_film%d' % i)(h)
        y = FiLM(name='head_mod%d' % i)([y, gb])
    init = keras.initializers.RandomNormal(stddev=1e-5)
    y = layers.Conv3D(3, 3, padding='same', kernel_initializer=init, name='correction')(y)
    vel = layers.Add(name='velocity')([flow, y])
    return keras.Model([pair, lam], vel, name=name)


def deform_network(kind='unet', **options):
    """The deformable network of a model card's architecture: ``kind`` 'unet'
    (:func:`velocity_net`, the default of older cards) or 'correlation'
    (:func:`correlation_net`)."""
    if kind == 'correlation':
        return correlation_net(**options)
    if kind == 'unet':
        return velocity_net(**options)
    raise ValueError('unknown deformable network kind %r' % kind)


def gradient_l2(field):
    """Mean squared forward difference of a field (B, X, Y, Z, C); (B,)."""
    out = 0
    for ax in (1, 2, 3):
        n = field.shape[ax]
        d = ops.take(field, ops.arange(1, n), axis=ax) - ops.take(field, ops.arange(0, n - 1),
                                                                  axis=ax)
        out = out + ops.mean(ops.square(d), axis=(1, 2, 3, 4))
    return out / 3


class DeformLoss(keras.layers.Layer):
    """[velocity (B, x, y, z, 3) half-res, moving labels, fixed labels (B, *shape, C), lambda
    (B, 1), and optionally the source coordinates (B, *shape, 3) of both images] -> the loss
    ``(1 - lambda) * (1 - Dice + coord_weight * E) + lambda * |grad v|^2`` (B,).

    ``E`` is the mean squared distance (source mm) between the source point of each labelled
    fixed voxel and that of the moving voxel it is mapped to: both synthetic images are drawn
    from one label map, so the generator knows where every voxel came from, and this dense
    correspondence teaches far faster than label overlap alone (labels have edges only)."""

    def __init__(self, shape, steps=5, coord_weight=0.0, coord_distance=False, **kwargs):
        super().__init__(**kwargs)
        self.shape, self.steps = tuple(int(n) for n in shape), steps
        self.coord_weight = float(coord_weight)
        self.coord_distance = bool(coord_distance)
        self.integrate = sk_layers.IntegrateVelocity(steps)
        self.resize = sk_layers.ResizeField(self.shape)

    def build(self, input_shape):
        self.built = True    # no weights; the sub-layers build on first call

    def call(self, inputs):
        vel, lm, lf, lam = inputs[:4]
        disp = self.resize(self.integrate(vel))
        points = utils.volume_grid(self.shape)[None] + disp
        moved = utils.sample_linear(lm, points, 0)
        lam = lam[:, 0]
        sim = dice_loss(moved, lf)
        if self.coord_weight and len(inputs) == 6:
            sim = sim + self.coord_weight * coordinate_error(inputs[4], inputs[5], lf, points,
                                                             self.coord_distance)
        return (1 - lam) * sim + lam * gradient_l2(vel)

    def get_config(self):
        return {**super().get_config(), 'shape': self.shape, 'steps': self.steps,
                'coord_weight': self.coord_weight, 'coord_distance': self.coord_distance}


class MatchLoss(keras.layers.Layer):
    """[cost volume (B, x, y, z, K) at half resolution, source coordinates of the moving and
    fixed images (B, X, Y, Z, 3), fixed labels (B, X, Y, Z, C)] -> (B,) the cross-entropy of
    ``softmax(t * cost)`` (own learned temperature ``t``) against the true match distribution:
    for each labelled fixed voxel, ``softmax(-d^2 / 2 sigma^2)`` over the shifts, ``d`` the
    distance (source mm) between its source point and that of the shifted moving voxel.

    A direct, dense teacher for the correlation network's features (what a contrastive loss
    would be): the overlap and end-point terms reach them only through the soft-argmax."""

    def __init__(self, radius=2, sigma_mm=2.0, temperature=30.0, **kwargs):
        super().__init__(**kwargs)
        self.radius, self.sigma_mm = int(radius), float(sigma_mm)
        self.temperature = float(temperature)

    def build(self, input_shape):
        self.log_t = self.add_weight(shape=(), name='log_temperature',
                                     initializer=keras.initializers.Constant(
                                         np.log(self.temperature)))

    def call(self, inputs):
        cost, mc, fc, lf = inputs
        pool = lambda t: ops.average_pool(t, 2, strides=2, padding='valid')  # noqa: E731
        mc, fc = pool(mc), pool(fc)
        mask = ops.cast(pool(1 - lf[..., :1])[..., 0] > 0.5, 'float32')
        d2 = [ops.sum(ops.square(shifted - fc), axis=-1)
              for shifted in shifted_copies(mc, self.radius, fill=1e4)]
        target = ops.softmax(-ops.stack(d2, axis=-1) / (2 * self.sigma_mm ** 2), axis=-1)
        logp = ops.log_softmax(ops.exp(self.log_t) * cost, axis=-1)
        ce = -ops.sum(target * logp, axis=-1)
        return ops.sum(mask * ce, axis=(1, 2, 3)) / (ops.sum(mask, axis=(1, 2, 3)) + 1)

    def get_config(self):
        return {**super().get_config(), 'radius': self.radius, 'sigma_mm': self.sigma_mm,
                'temperature': self.temperature}


def deform_training_model(net, shape, n_labels, steps=5, coord_weight=0.0,
                          coord_distance=False, match_weight=0.0):
    """Inputs: moving, fixed (1, *shape, 1), their one-hot labels (1, *shape, n_labels), lambda
    (1, 1) and, with ``coord_weight`` or ``match_weight``, their source coordinates (1, *shape,
    3); output: the loss per example. ``match_weight`` (correlation networks): add that times
    :class:`MatchLoss` of the network's own encoder and cost volume."""
    moving = keras.Input((*shape, 1), name='moving', batch_size=1)
    fixed = keras.Input((*shape, 1), name='fixed', batch_size=1)
    lm = keras.Input((*shape, n_labels), name='moving_labels', batch_size=1)
    lf = keras.Input((*shape, n_labels), name='fixed_labels', batch_size=1)
    lam = keras.Input((1,), name='lambda', batch_size=1)
    inputs = [moving, fixed, lm, lf, lam]
    if coord_weight or match_weight:
        inputs += [keras.Input((*shape, 3), name='moving_coords', batch_size=1),
                   keras.Input((*shape, 3), name='fixed_coords', batch_size=1)]
    pair = layers.Concatenate(name='pair_images')([moving, fixed])
    vel = net([pair, lam])
    loss = DeformLoss(shape, steps, coord_weight, coord_distance,
                      name='deform_loss')([vel] + inputs[2:])
    if match_weight:
        encoder, radius = net.get_layer('encoder'), net.get_layer('cost').radius
        cost = Correlation(radius, name='train_cost')([encoder(fixed), encoder(moving)])
        match = MatchLoss(radius, name='match_loss')([cost, inputs[5], inputs[6], lf])
        loss = layers.Add(name='total_loss')([
            loss, layers.Rescaling(float(match_weight), name='match_weight')(match)])
    return keras.Model(inputs, loss, name='synthmorph_deform_train')


def mean_output(y_true, y_pred):
    """Keras loss that is the model's output itself (the models above compute their loss)."""
    return ops.mean(y_pred)


CUSTOM_OBJECTS = {'SymmetricFit': SymmetricFit, 'AffineLoss': AffineLoss,
                  'FiLM': FiLM, 'DeformLoss': DeformLoss, 'mean_output': mean_output,
                  'Correlation': Correlation, 'SoftArgmax': SoftArgmax,
                  'L2Normalize': L2Normalize, 'Channels': Channels, 'MatchLoss': MatchLoss}


def integrate(vel, shape, steps=5):
    """Displacement (B, *shape, 3) in voxels of the ``shape`` grid from a half-resolution
    velocity (B, x, y, z, 3): scaling and squaring, then linear upsampling."""
    disp = sk_layers.IntegrateVelocity(steps)(ops.convert_to_tensor(vel))
    return sk_layers.ResizeField(tuple(shape))(disp)


def warp_labels(onehot, disp):
    """One-hot or soft labels (B, X, Y, Z, C) warped by ``disp`` (B, X, Y, Z, 3), trilinear."""
    shape = onehot.shape[1:4]
    return utils.sample_linear(ops.convert_to_tensor(onehot),
                               utils.volume_grid(shape)[None] + disp, 0)
