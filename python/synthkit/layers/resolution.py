"""Resolution randomization: simulate a scan acquired at a random voxel size and slice
thickness, then brought back to the 1 mm grid, as SynthSeg does.

Per example and axis, the layer draws a spacing ``s`` (mm) and a thickness ``t <= s``, blurs with
a Gaussian of sigma ``blur_factor * t`` (in voxels of the 1 mm grid: a thick slice averages
``t`` mm of tissue), samples the blurred image every ``s`` voxels and linearly interpolates it back
onto the 1 mm grid. Both steps are (n x n) matrices per axis, so shapes stay static and the whole
thing is three batched matrix products.
"""

import keras
from keras import ops

from . import utils


def downup_matrix(n, spacing):
    """(B, n, n) matrices: sample every ``spacing`` (B,) voxels, then linearly interpolate back."""
    i = ops.arange(n, dtype='float32')[None, :]
    s = ops.reshape(spacing, (-1, 1))
    u = i / s                         # position of output voxel i in low-res samples
    k0 = ops.floor(u)
    f = (u - k0)[..., None]
    j = ops.arange(n, dtype='float32')[None, None, :]
    p0 = ops.minimum(k0 * s, n - 1)[..., None]
    p1 = ops.minimum((k0 + 1) * s, n - 1)[..., None]
    return (1 - f) * utils.hat(j - p0) + f * utils.hat(j - p1)


class RandomResolution(keras.layers.Layer):
    """Random acquisition resolution and slice thickness, returned to the input grid.

    With probability ``anisotropic_prob`` one random axis gets a spacing from
    ``anisotropic_range`` (mm) and the others ``inplane_range`` (one draw for both; default
    ``(1, 1)``: 1 mm in plane; low-field scans are more like 1.5 x 1.5 x 5 mm); otherwise all
    axes share one spacing from ``isotropic_range``. Thickness is
    U(``thickness_min_fraction`` * s, s). ``voxsize`` is the input grid's voxel size (mm).
    """

    def __init__(self, isotropic_range=(1.0, 4.0), anisotropic_range=(1.0, 8.0),
                 anisotropic_prob=0.5, thickness_min_fraction=0.5, blur_factor=0.425,
                 voxsize=1.0, prob=1.0, seed=None, inplane_range=(1.0, 1.0), **kwargs):
        super().__init__(**kwargs)
        self.isotropic_range = utils.check_range('isotropic_range', isotropic_range, 0)
        self.anisotropic_range = utils.check_range('anisotropic_range', anisotropic_range, 0)
        self.anisotropic_prob = utils.check_number('anisotropic_prob', anisotropic_prob, 0, 1)
        self.inplane_range = utils.check_range('inplane_range', inplane_range, 0)
        self.thickness_min_fraction = utils.check_number('thickness_min_fraction',
                                                         thickness_min_fraction, 0, 1)
        self.blur_factor = utils.check_number('blur_factor', blur_factor, 0)
        self.voxsize = utils.check_number('voxsize', voxsize, 0, low_open=True)
        self.prob = utils.check_number('prob', prob, 0, 1)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def sample_spacing(self, b):
        """(spacing (B, 3), thickness (B, 3)) in mm."""
        sg = self.seed_generator
        iso = keras.random.uniform((b, 1), *self.isotropic_range, seed=sg) * ops.ones((b, 3))
        axis = keras.random.randint((b,), 0, 3, seed=sg)
        aniso_s = keras.random.uniform((b, 1), *self.anisotropic_range, seed=sg)
        onehot = ops.one_hot(axis, 3)
        inplane = 1.0
        if tuple(self.inplane_range) != (1.0, 1.0):     # drawn only then: the default keeps
            inplane = keras.random.uniform((b, 1), *self.inplane_range, seed=sg)  # its stream
        aniso = onehot * aniso_s + (1 - onehot) * inplane
        is_aniso = ops.cast(keras.random.uniform((b, 1), seed=sg) < self.anisotropic_prob,
                            'float32')
        spacing = is_aniso * aniso + (1 - is_aniso) * iso
        apply = ops.cast(keras.random.uniform((b, 1), seed=sg) < self.prob, 'float32')
        spacing = apply * spacing + (1 - apply) * self.voxsize
        frac = keras.random.uniform((b, 3), self.thickness_min_fraction, 1.0, seed=sg)
        return spacing, spacing * frac

    def matrices(self, shape, spacing, thickness):
        mats = []
        for ax, n in enumerate(shape):
            s = spacing[:, ax] / self.voxsize
            sigma = self.blur_factor * thickness[:, ax] / self.voxsize
            sigma = sigma * ops.cast(s > 1.05, 'float32')   # no blur at native resolution
            mats.append(ops.matmul(downup_matrix(n, ops.maximum(s, 1.0)),
                                   utils.gaussian_matrix(n, sigma)))
        return mats

    def call(self, x):
        spacing, thickness = self.sample_spacing(x.shape[0])
        return utils.apply_axis_matrices(x, self.matrices(x.shape[1:4], spacing, thickness))

    def get_config(self):
        return {**super().get_config(), 'isotropic_range': self.isotropic_range,
                'anisotropic_range': self.anisotropic_range,
                'anisotropic_prob': self.anisotropic_prob,
                'thickness_min_fraction': self.thickness_min_fraction,
                'blur_factor': self.blur_factor, 'voxsize': self.voxsize, 'prob': self.prob,
                'seed': self.seed, 'inplane_range': self.inplane_range}
