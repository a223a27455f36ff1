"""Spatial layers: random affine, random stationary velocity fields, scaling-and-squaring
integration, field resizing and warping.

Conventions (neurite/voxelmorph): displacement fields are in voxels, channels-last
``(B, X, Y, Z, 3)``; a warp samples the moving volume at ``x + u(x)``.
"""

import math

import keras
import numpy as np
from keras import ops

from . import utils


class RandomAffine(keras.layers.Layer):
    """Draw random affine matrices about the volume centre (voxel units, 4x4, per example).

    The matrix maps centred output coordinates to centred source coordinates. Each parameter is
    drawn uniformly from its range: scaling factor, rotation (degrees), shearing, translation
    (voxels). With ``flip_prob`` the ``lr_axis`` is mirrored; the flip flags are returned too so
    that labels can swap hemispheres.

    call(reference) -> (matrices (B, 4, 4), flips (B,) in {0, 1}); ``reference`` is any tensor
    whose first dimension is the batch size.
    """

    def __init__(self, scaling_range=(0.8, 1.2), rotation_range_deg=(-15, 15),
                 shearing_range=(-0.012, 0.012), translation_range=(0, 0), flip_prob=0.0,
                 lr_axis=0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.scaling_range = utils.check_range('scaling_range', scaling_range, 0)
        self.rotation_range_deg = utils.check_range('rotation_range_deg', rotation_range_deg)
        self.shearing_range = utils.check_range('shearing_range', shearing_range)
        self.translation_range = utils.check_range('translation_range', translation_range)
        self.flip_prob = utils.check_number('flip_prob', flip_prob, 0, 1)
        self.lr_axis = utils.check_choice('lr_axis', lr_axis, (0, 1, 2))
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, b, rng):
        return keras.random.uniform((b, 3), rng[0], rng[1], seed=self.seed_generator)

    def call(self, reference):
        b = reference.shape[0]
        scale = self._uniform(b, self.scaling_range)
        rot = self._uniform(b, self.rotation_range_deg) * (math.pi / 180)
        shear = self._uniform(b, self.shearing_range)
        trans = self._uniform(b, self.translation_range)
        flips = ops.cast(keras.random.uniform((b,), seed=self.seed_generator) < self.flip_prob,
                         'float32')
        c, s = ops.cos(rot), ops.sin(rot)
        one, zero = ops.ones((b,)), ops.zeros((b,))

        def mat(rows):
            return ops.stack([ops.stack(r, axis=-1) for r in rows], axis=-2)

        rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
        ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
        rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
        sh = mat([[one, shear[:, 0], shear[:, 1]], [zero, one, shear[:, 2]],
                  [zero, zero, one]])
        flip_vec = [one, one, one]
        flip_vec[self.lr_axis] = 1 - 2 * flips
        sc = mat([[scale[:, 0] * flip_vec[0], zero, zero], [zero, scale[:, 1] * flip_vec[1], zero],
                  [zero, zero, scale[:, 2] * flip_vec[2]]])
        lin = ops.matmul(ops.matmul(ops.matmul(ops.matmul(rx, ry), rz), sh), sc)
        top = ops.concatenate([lin, trans[:, :, None]], axis=-1)
        bottom = ops.tile(ops.convert_to_tensor([[[0., 0., 0., 1.]]]), (b, 1, 1))
        return ops.concatenate([top, bottom], axis=1), flips

    def get_config(self):
        return {**super().get_config(), 'scaling_range': self.scaling_range,
                'rotation_range_deg': self.rotation_range_deg,
                'shearing_range': self.shearing_range, 'translation_range': self.translation_range,
                'flip_prob': self.flip_prob, 'lr_axis': self.lr_axis, 'seed': self.seed}


class RandomVelocityField(keras.layers.Layer):
    """Draw a smooth stationary velocity field at a coarse scale.

    The control grid has ``ceil(scale * n)`` points per axis for an output of ``shape``; each
    example draws its own std from U(0, ``std_max``) (voxels), then N(0, std) per control point.

    call(reference) -> coarse velocity (B, x, y, z, 3); ``reference``'s first dimension is B.
    """

    def __init__(self, shape, std_max=4.0, scale=0.04, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(n) for n in shape)
        self.std_max = utils.check_number('std_max', std_max, 0)
        self.scale = utils.check_number('scale', scale, 0, low_open=True)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.coarse_shape = tuple(max(2, math.ceil(scale * n)) for n in self.shape)

    def call(self, reference):
        batch_size = reference.shape[0]
        std = keras.random.uniform((batch_size, 1, 1, 1, 1), 0, self.std_max,
                                   seed=self.seed_generator)
        return std * keras.random.normal((batch_size, *self.coarse_shape, 3),
                                         seed=self.seed_generator)

    def get_config(self):
        return {**super().get_config(), 'shape': self.shape, 'std_max': self.std_max,
                'scale': self.scale, 'seed': self.seed}


class IntegrateVelocity(keras.layers.Layer):
    """Integrate a stationary velocity field by scaling and squaring (``steps`` squarings).

    call(velocity (B, X, Y, Z, 3)) -> displacement (B, X, Y, Z, 3) of the diffeomorphism exp(v).
    Beyond the grid the field continues with its edge values, so a constant velocity integrates
    to exactly that translation everywhere.
    """

    def __init__(self, steps=7, **kwargs):
        super().__init__(**kwargs)
        if int(steps) != steps or steps < 0:
            raise ValueError('steps must be a non-negative integer, got %r' % (steps,))
        self.steps = int(steps)

    def call(self, vel):
        disp = vel / (2 ** self.steps)
        shape = vel.shape[1:4]
        grid = utils.volume_grid(shape)[None]
        upper = ops.convert_to_tensor(np.array([n - 1 for n in shape], np.float32))
        for _ in range(self.steps):
            # the field is extended beyond the grid by its edge values (as neurite's VecInt):
            # zero padding would shrink displacements pointing out of the volume at each squaring
            coords = ops.minimum(ops.maximum(grid + disp, 0.0), upper)
            disp = disp + utils.sample_linear(disp, coords, fill=0)   # all channels at once
        return disp

    def get_config(self):
        return {**super().get_config(), 'steps': self.steps}


class ResizeField(keras.layers.Layer):
    """Resize a displacement field to ``shape`` and rescale its vectors to the new voxel size."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(n) for n in shape)

    def call(self, field):
        factors = [(n_out - 1) / max(int(n_in) - 1, 1)
                   for n_out, n_in in zip(self.shape, field.shape[1:4])]
        out = utils.resize_field(field, self.shape)
        return out * ops.convert_to_tensor(np.array(factors, np.float32))

    def get_config(self):
        return {**super().get_config(), 'shape': self.shape}


class SpatialTransformer(keras.layers.Layer):
    """Warp a volume by a displacement field (voxels) or sample it at absolute coordinates.

    call([vol (B, X, Y, Z, C), field (B, X', Y', Z', 3)]) -> (B, X', Y', Z', C).
    ``indexing='disp'`` samples at ``x + field(x)`` (the field must then have the volume's
    shape); ``'coords'`` samples at ``field(x)`` directly. Labels use ``interp='nearest'``.
    """

    def __init__(self, interp='linear', indexing='disp', fill=0, **kwargs):
        super().__init__(**kwargs)
        if interp not in ('linear', 'nearest') or indexing not in ('disp', 'coords'):
            raise ValueError('interp must be linear|nearest and indexing disp|coords')
        self.interp, self.indexing, self.fill = interp, indexing, fill

    def call(self, inputs):
        vol, field = inputs
        dtype = vol.dtype
        coords = field
        if self.indexing == 'disp':
            coords = utils.volume_grid(field.shape[1:4])[None] + field
        out = utils.sample(ops.cast(vol, 'float32'), coords, self.interp, self.fill)
        return ops.cast(out, dtype) if self.interp == 'nearest' else out

    def get_config(self):
        return {**super().get_config(), 'interp': self.interp, 'indexing': self.indexing,
                'fill': self.fill}


def affine_coordinates(matrix, disp, src_center, shape=None):
    """Source voxel coordinates of output voxels under ``affine(x + disp(x))``.

    ``matrix`` (B, 4, 4) acts on coordinates centred on the output grid and yields coordinates
    centred on ``src_center`` (B, 3) of the source; ``disp`` (B, X, Y, Z, 3), or None for a
    purely affine map of an output grid of ``shape``.
    """
    if disp is None and shape is None:
        raise ValueError('affine_coordinates: give the output shape when there is no '
                         'displacement field')
    x = utils.volume_grid(disp.shape[1:4] if disp is not None else shape, center=True)[None]
    if disp is not None:
        x = x + disp
    lin, trans = matrix[:, :3, :3], matrix[:, :3, 3]
    y = ops.einsum('bij,bxyzj->bxyzi', lin, x)
    return y + ops.reshape(trans + src_center, (-1, 1, 1, 1, 3))


def jacobian_determinant(disp):
    """Jacobian determinant of ``x + disp(x)`` by central differences; (B, X-2, Y-2, Z-2)."""
    g = []
    for ax in (1, 2, 3):
        n = disp.shape[ax]
        hi = ops.take(disp, ops.arange(2, n), axis=ax)
        lo = ops.take(disp, ops.arange(0, n - 2), axis=ax)
        d = (hi - lo) / 2
        sl = [slice(None)] + [slice(1, -1) if a != ax else slice(None) for a in (1, 2, 3)]
        g.append(d[tuple(sl)])
    jac = ops.stack(g, axis=-1) + ops.eye(3)  # (..., component i, derivative j)
    return ops.det(jac) if hasattr(ops, 'det') else _det3(jac)


def _det3(m):
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))
