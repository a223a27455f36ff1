"""Intensity layers: Gaussian-mixture painting, bias field, noise, blur, gamma, normalization.

Images are float32 ``(B, X, Y, Z, 1)``; label maps int32 ``(B, X, Y, Z, 1)``.
"""

import math

import keras
import numpy as np
from keras import ops

from . import utils


class GMMPainter(keras.layers.Layer):
    """Paint a label map with one random Gaussian per class: x = mean[c] + std[c] * N(0, 1).

    ``classes`` maps label value -> class index (labels of one class, such as left/right pairs,
    share their Gaussian); ``n_classes`` classes. Means and stds are drawn per example, uniformly
    from ``mean_range``/``std_range`` (``prior='uniform'``) or from N(mean_range[0],
    mean_range[1]) / N(std_range[0], std_range[1]) (``prior='normal'``). With
    ``background_zero_prob`` class 0 gets mean 0 and std 0 (skull-stripped-looking images).

    call(labels, noise=None): ``noise`` is an optional standard-normal tensor of the labels'
    shape. Passing it in lets a caller draw it outside an XLA-compiled function, where
    TensorFlow's random kernels are an order of magnitude faster on the CPU.
    """

    def __init__(self, classes, n_classes=None, mean_range=(0, 250), std_range=(0, 30),
                 prior='uniform', background_zero_prob=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.classes = [int(c) for c in np.asarray(classes).ravel()]
        self.n_classes = int(n_classes or max(self.classes) + 1)
        self.prior = utils.check_choice('prior', prior, ('uniform', 'normal'))
        ordered = prior == 'uniform'       # 'normal': (mean, std) of the prior
        self.mean_range = utils.check_range('mean_range', mean_range, ordered=ordered)
        self.std_range = utils.check_range('std_range', std_range, ordered=ordered)
        self.background_zero_prob = utils.check_number('background_zero_prob',
                                                       background_zero_prob, 0, 1)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _draw(self, b, rng):
        shape = (b, self.n_classes)
        if self.prior == 'normal':
            return ops.relu(rng[0] + rng[1] * keras.random.normal(shape, seed=self.seed_generator))
        return keras.random.uniform(shape, rng[0], rng[1], seed=self.seed_generator)

    def call(self, labels, noise=None):
        b = labels.shape[0]
        if noise is None:
            noise = keras.random.normal(labels.shape, seed=self.seed_generator)
        means, stds = self._draw(b, self.mean_range), self._draw(b, self.std_range)
        zero_bg = ops.cast(keras.random.uniform((b, 1), seed=self.seed_generator)
                           < self.background_zero_prob, 'float32')
        keep = 1 - zero_bg * ops.one_hot(ops.zeros((b,), 'int32'), self.n_classes)
        means, stds = means * keep, stds * keep
        cls = ops.take(ops.convert_to_tensor(np.array(self.classes, np.int32)),
                       ops.cast(labels[..., 0], 'int32'))
        out = [ops.take(means[i], cls[i]) + ops.take(stds[i], cls[i]) * noise[i, ..., 0]
               for i in range(b)]
        return ops.stack(out, axis=0)[..., None]

    def get_config(self):
        return {**super().get_config(), 'classes': self.classes, 'n_classes': self.n_classes,
                'mean_range': self.mean_range, 'std_range': self.std_range, 'prior': self.prior,
                'background_zero_prob': self.background_zero_prob, 'seed': self.seed}


class RandomBiasField(keras.layers.Layer):
    """Multiply by exp(smooth field): a coarse N(0, std) grid, std ~ U(0, std_max), upsampled."""

    def __init__(self, std_max=0.7, scale=0.025, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.std_max = utils.check_number('std_max', std_max, 0)
        self.scale = utils.check_number('scale', scale, 0, low_open=True)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def field(self, b, shape):
        coarse = tuple(max(2, math.ceil(self.scale * n)) for n in shape)
        std = keras.random.uniform((b, 1, 1, 1, 1), 0, self.std_max, seed=self.seed_generator)
        grid = std * keras.random.normal((b, *coarse, 1), seed=self.seed_generator)
        return ops.exp(utils.resize_field(grid, shape))

    def call(self, x):
        return x * self.field(x.shape[0], x.shape[1:4])

    def get_config(self):
        return {**super().get_config(), 'std_max': self.std_max, 'scale': self.scale,
                'seed': self.seed}


class RandomNoise(keras.layers.Layer):
    """Add white Gaussian noise with std ~ U(0, std_max) per example."""

    def __init__(self, std_max=3.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.std_max, self.seed = utils.check_number('std_max', std_max, 0), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x):
        std = keras.random.uniform((x.shape[0], 1, 1, 1, 1), 0, self.std_max,
                                   seed=self.seed_generator)
        return x + std * keras.random.normal(x.shape, seed=self.seed_generator)

    def get_config(self):
        return {**super().get_config(), 'std_max': self.std_max, 'seed': self.seed}


class GaussianBlur(keras.layers.Layer):
    """Separable Gaussian blur with a fixed sigma (voxels) per axis."""

    def __init__(self, sigma=1.0, **kwargs):
        super().__init__(**kwargs)
        self.sigma = tuple(utils.check_number('sigma', s, 0)
                           for s in np.broadcast_to(np.asarray(sigma, float), (3,)).tolist())

    def call(self, x):
        mats = [utils.gaussian_matrix(n, ops.convert_to_tensor([s], 'float32'))[0]
                for n, s in zip(x.shape[1:4], self.sigma)]
        return utils.apply_axis_matrices(x, mats)

    def get_config(self):
        return {**super().get_config(), 'sigma': self.sigma}


class MinMaxNormalize(keras.layers.Layer):
    """Rescale each example to [0, 1] (a constant image becomes 0)."""

    def call(self, x):
        axes = tuple(range(1, len(x.shape)))
        lo = ops.min(x, axis=axes, keepdims=True)
        hi = ops.max(x, axis=axes, keepdims=True)
        return (x - lo) / ops.maximum(hi - lo, 1e-6)


class RandomGamma(keras.layers.Layer):
    """x ** exp(N(0, std)) on an image in [0, 1] (a random contrast curve)."""

    def __init__(self, std=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.std, self.seed = utils.check_number('std', std, 0), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x):
        g = ops.exp(self.std * keras.random.normal((x.shape[0], 1, 1, 1, 1),
                                                   seed=self.seed_generator))
        return ops.power(ops.maximum(x, 1e-6), g) * ops.cast(x > 0, x.dtype)

    def get_config(self):
        return {**super().get_config(), 'std': self.std, 'seed': self.seed}


class RemapLabels(keras.layers.Layer):
    """Map label values through a lookup table (e.g. generation label -> output channel)."""

    def __init__(self, lookup, **kwargs):
        super().__init__(**kwargs)
        self.lookup = [int(v) for v in np.asarray(lookup).ravel()]

    def call(self, labels):
        table = ops.convert_to_tensor(np.array(self.lookup, np.int32))
        return ops.take(table, ops.cast(labels, 'int32'))

    def get_config(self):
        return {**super().get_config(), 'lookup': self.lookup}


class OneHot(keras.layers.Layer):
    """(B, X, Y, Z, 1) integer channels -> (B, X, Y, Z, n) float one-hot."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = int(utils.check_number('n', n, 0, low_open=True))

    def call(self, labels):
        return ops.one_hot(ops.cast(labels[..., 0], 'int32'), self.n)

    def get_config(self):
        return {**super().get_config(), 'n': self.n}


class RandomFieldOfView(keras.layers.Layer):
    """Random limited field of view: a mask that cuts slabs off the volume's sides.

    Each of the six sides is cut with probability ``prob`` by a fraction U(0, ``max_fraction``)
    of the axis. Multiply images (and zero labels) by the mask to simulate a head that the scan
    only partly covers.

    call(reference (B, X, Y, Z, C)) -> mask (B, X, Y, Z, 1) float32 in {0, 1}.
    """

    def __init__(self, prob=0.3, max_fraction=0.3, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.prob = utils.check_number('prob', prob, 0, 1)
        self.max_fraction = utils.check_number('max_fraction', max_fraction, 0, 1)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, reference):
        b = reference.shape[0]
        mask = ops.ones((b, 1, 1, 1, 1))
        for ax, n in enumerate(reference.shape[1:4]):
            cut = keras.random.uniform((b, 2), 0, self.max_fraction * n, seed=self.seed_generator)
            cut = cut * ops.cast(keras.random.uniform((b, 2), seed=self.seed_generator)
                                 < self.prob, 'float32')
            idx = ops.arange(n, dtype='float32')[None]
            keep = ops.cast((idx >= cut[:, :1]) & (idx < n - cut[:, 1:]), 'float32')
            shape = [b, 1, 1, 1, 1]
            shape[ax + 1] = n
            mask = mask * ops.reshape(keep, shape)
        return mask

    def get_config(self):
        return {**super().get_config(), 'prob': self.prob, 'max_fraction': self.max_fraction,
                'seed': self.seed}
