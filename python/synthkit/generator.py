"""The domain-randomization generator: label map in, random synthetic image + labels out.

One :class:`GeneratorParams` object holds every knob with SynthSeg's published defaults;
:class:`SynthGenerator` composes the layers of :mod:`synthkit.layers` into one Keras layer, and
:class:`LabelMapBank` keeps the training label maps in memory and feeds random ones.

Per example: random affine (scaling, rotation, shearing, translation, left/right flip with label
swap) and a smooth nonlinear deformation (an SVF integrated by scaling and squaring) are composed
into one sampling grid, the label map is sampled on it (nearest), painted with a Gaussian per label
class, multiplied by a random bias field, corrupted with noise, degraded to a random resolution and
slice thickness, normalized and gamma-transformed.
"""

import dataclasses
import json
import math

import keras
import numpy as np
from keras import ops

from . import labels as lab
from . import layers


@dataclasses.dataclass
class GeneratorParams:
    """Generator parameters (ranges are ``(low, high)``; lengths in mm)."""
    # spatial
    scaling_range: tuple = (0.8, 1.2)
    rotation_range_deg: tuple = (-15.0, 15.0)
    shearing_range: tuple = (-0.012, 0.012)
    translation_range_mm: tuple = (-20.0, 20.0)
    flip_prob: float = 0.5
    nonlin_std_mm: float = 4.0
    nonlin_scale: float = 0.04
    integration_steps: int = 7
    # intensity
    mean_range: tuple = (0.0, 250.0)
    std_range: tuple = (0.0, 30.0)
    prior: str = 'uniform'
    background_zero_prob: float = 0.0
    strip_prob: float = 0.2          # paint everything outside the brain (and CSF) black
    fov_prob: float = 0.0            # per side: cut a slab off image and labels (partial FOV)
    fov_max_fraction: float = 0.3
    bias_std_max: float = 0.7
    bias_scale: float = 0.025
    noise_std_max: float = 0.0       # extra white noise (the GMM stds already add noise)
    gamma_std: float = 0.5
    # resolution
    resolution_prob: float = 0.95
    isotropic_range_mm: tuple = (1.0, 4.0)
    anisotropic_range_mm: tuple = (1.0, 8.0)
    anisotropic_prob: float = 0.5
    thickness_min_fraction: float = 0.5
    # geometry of the output
    voxsize_mm: float = 1.0
    lr_axis: int = 0                 # voxel axis along left-right in the label maps (LIA: 0)

    @classmethod
    def from_json(cls, path):
        """Parameters from a JSON file of ``{name: value}`` (unknown names are an error)."""
        with open(path) as f:
            values = json.load(f)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError('unknown generator parameter(s): %s' % ', '.join(unknown))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self):
        return dataclasses.asdict(self)


def label_classes(generation_labels=lab.GENERATION_LABELS, max_label=1024):
    """Lookup label -> GMM class: one class per label, left/right pairs sharing one."""
    table = np.zeros(max_label, np.int32)
    pair = {r: l for l, r in lab.LR_PAIRS}
    classes = {}
    for g in generation_labels:
        key = pair.get(g, g)
        classes.setdefault(key, len(classes))
        table[g] = classes[key]
    return table, len(classes)


class SynthGenerator(keras.layers.Layer):
    """Label maps (B, *src_shape, 1) int32 -> dict of synthetic 'image' (B, *shape, 1) float32
    in [0, 1] and deformed generation 'labels' (B, *shape, 1) int32, plus the source
    'coords' (B, *shape, 3) each output voxel was sampled from (for registration targets).

    ``shape`` is the output grid (voxels of ``params.voxsize_mm``); the source is 1 mm.
    """

    def __init__(self, shape, params=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(n) for n in shape)
        self.params = p = params or GeneratorParams()
        self.seed = seed
        v = p.voxsize_mm
        seeds = np.random.default_rng(seed).integers(0, 2**31, size=8).tolist() \
            if seed is not None else [None] * 8
        self.affine = layers.RandomAffine(p.scaling_range, p.rotation_range_deg, p.shearing_range,
                                          p.translation_range_mm, p.flip_prob, p.lr_axis,
                                          seed=seeds[0])
        self.int_factor = 4    # integrate the SVF at a quarter of the output resolution
        self.int_shape = tuple(max(8, -(-n // self.int_factor)) for n in self.shape)
        self.velocity = layers.RandomVelocityField(self.shape, p.nonlin_std_mm / v / self.int_factor,
                                                   p.nonlin_scale, seed=seeds[1])
        self.integrate = layers.IntegrateVelocity(p.integration_steps)
        self.upsample = layers.ResizeField(self.shape)
        classes, n_classes = label_classes()
        self.classes = classes
        self.painter = layers.GMMPainter(classes, n_classes, p.mean_range, p.std_range, p.prior,
                                         p.background_zero_prob, seed=seeds[2])
        self.bias = layers.RandomBiasField(p.bias_std_max, p.bias_scale, seed=seeds[3])
        self.noise = layers.RandomNoise(p.noise_std_max, seed=seeds[4])
        self.resolution = layers.RandomResolution(p.isotropic_range_mm, p.anisotropic_range_mm,
                                                  p.anisotropic_prob, p.thickness_min_fraction,
                                                  voxsize=v, prob=p.resolution_prob,
                                                  seed=seeds[5])
        self.gamma = layers.RandomGamma(p.gamma_std, seed=seeds[6])
        self.normalize = layers.MinMaxNormalize()
        self.rng = keras.random.SeedGenerator(seeds[7])
        self.fov = layers.RandomFieldOfView(p.fov_prob, p.fov_max_fraction,
                                            seed=None if seed is None else seed + 1)
        swap = lab.lr_swap_lookup()
        self.swap = swap
        brain = np.zeros(1024, np.float32)
        brain[list(lab.BRAIN_LABELS) + [24]] = 1
        self.brain = brain

    def build(self, input_shape):
        # nothing to create: the sub-layers hold only seed states and build on first call (an
        # explicit build also spares Keras a symbolic trace of the whole generator)
        self.built = True

    def deformation(self, reference):
        """(matrices (B, 4, 4) in output voxels -> 1 mm source voxels, flips, displacement);
        ``reference`` is any tensor whose first dimension is the batch size."""
        batch_size = reference.shape[0]
        mat, flips = self.affine(reference)
        v = self.params.voxsize_mm
        scale = np.diag([v, v, v, 1.0]).astype(np.float32)
        mat = ops.matmul(mat, ops.convert_to_tensor(scale))
        if self.params.nonlin_std_mm > 0:
            vel = layers.resize_field(self.velocity(reference), self.int_shape)
            disp = self.upsample(self.integrate(vel))
        else:
            disp = ops.zeros((batch_size, *self.shape, 3))
        return mat, flips, disp

    def call(self, label_maps, noise=None):
        """``noise``: optional standard-normal (B, *shape, 1) tensor for the GMM painting."""
        b = label_maps.shape[0]
        src_center = ops.convert_to_tensor(
            np.array([(n - 1) / 2 for n in label_maps.shape[1:4]], np.float32))[None]
        mat, flips, disp = self.deformation(label_maps)
        coords = layers.affine_coordinates(mat, disp, src_center)
        labels = layers.sample(ops.cast(label_maps, 'float32'), coords, 'nearest', 0)
        labels = ops.cast(labels, 'int32')
        swapped = ops.take(ops.convert_to_tensor(self.swap), labels)
        flip = ops.reshape(ops.cast(flips, 'int32'), (-1, 1, 1, 1, 1))
        labels = flip * swapped + (1 - flip) * labels

        if self.params.fov_prob > 0:
            fov = self.fov(labels)
            labels = labels * ops.cast(fov, 'int32')
        image = self.painter(labels, noise)
        strip = ops.cast(keras.random.uniform((b, 1, 1, 1, 1), seed=self.rng)
                         < self.params.strip_prob, 'float32')
        brain = ops.take(ops.convert_to_tensor(self.brain), labels)
        image = image * (1 - strip + strip * brain)
        image = self.bias(image)
        if self.params.noise_std_max > 0:
            image = self.noise(image)
        image = self.resolution(image)
        image = self.normalize(ops.relu(image))
        image = self.normalize(self.gamma(image))
        if self.params.fov_prob > 0:
            image = image * fov
        return {'image': image, 'labels': labels, 'coords': coords}

    def get_config(self):
        return {**super().get_config(), 'shape': self.shape, 'params': self.params.to_dict(),
                'seed': self.seed}


class LabelMapBank:
    """Label maps held in memory (int16), cropped to the head and padded to one shape.

    ``maps`` is a list of paths; ``margin`` voxels are kept around the labelled bounding box.
    ``batch(n, rng)`` returns a random (n, *shape, 1) int32 batch.
    """

    def __init__(self, paths, margin=8, min_shape=None):
        import nibabel as nib
        arrays, self.paths = [], list(paths)
        for p in self.paths:
            data = np.asarray(nib.load(p).dataobj).astype(np.int16)
            if data.ndim != 3:
                raise ValueError('%s: label map must be 3-D' % p)
            nz = np.argwhere(data > 0)
            lo = np.maximum(nz.min(0) - margin, 0)
            hi = np.minimum(nz.max(0) + margin + 1, data.shape)
            arrays.append(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
        shape = np.max([a.shape for a in arrays], axis=0)
        if min_shape is not None:
            shape = np.maximum(shape, min_shape)
        self.shape = tuple(int(n) for n in shape)
        self.maps = np.zeros((len(arrays), *self.shape), np.int16)
        for i, a in enumerate(arrays):
            off = [(s - n) // 2 for s, n in zip(self.shape, a.shape)]
            self.maps[i, off[0]:off[0] + a.shape[0], off[1]:off[1] + a.shape[1],
                      off[2]:off[2] + a.shape[2]] = a

    def __len__(self):
        return len(self.maps)

    def batch(self, n, rng, indices=None):
        idx = rng.integers(0, len(self.maps), size=n) if indices is None else indices
        return self.maps[idx][..., None].astype(np.int32), idx


def compiled(fn):
    """Compile ``fn`` for the active backend (XLA on TensorFlow; as is elsewhere)."""
    if keras.backend.backend() == 'tensorflow':
        import tensorflow as tf
        return tf.function(fn, jit_compile=True)
    return fn


class PairSampler:
    """Compiled generator: ``sampler(label_maps)`` -> dict of numpy-convertible tensors.

    The large standard-normal field is drawn outside the compiled function (fast native
    kernels), the rest runs compiled.
    """

    def __init__(self, generator, seed=None):
        self.generator = generator
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.fn = compiled(lambda x, n: generator(x, n))

    def __call__(self, label_maps):
        shape = (label_maps.shape[0], *self.generator.shape, 1)
        noise = keras.random.normal(shape, seed=self.noise_seed)
        return self.fn(ops.convert_to_tensor(label_maps), noise)


def output_channels(out_labels=lab.SEGMENTATION_LABELS):
    """Lookup generation label -> output channel index for ``out_labels``."""
    return lab.generation_lookup(out_labels)


def describe():
    """Human-readable summary of the defaults (for --help / docs)."""
    p = GeneratorParams()
    return ', '.join('%s=%s' % (k, v) for k, v in p.to_dict().items())


def svf_shape(shape, scale):
    return tuple(max(2, math.ceil(scale * n)) for n in shape)


# ------------------------------------------------------------------------------ variants
# Training targets needed by the other tools, built on the same generator.

def registration_pair(sampler, label_maps):
    """Two synthetic images of the same label maps with independent deformations and contrasts
    (SynthMorph training): ``(moving, fixed)``, each a dict with 'image', 'labels' and 'coords'
    (source voxel each output voxel was sampled from, which links the two through the source)."""
    return sampler(label_maps), sampler(label_maps)


def signed_distance(labels, inside_labels, voxsize_mm=1.0, clip_mm=None):
    """Signed Euclidean distance (mm) to the boundary of the region of ``inside_labels``:
    negative inside, positive outside (SynthStrip's target). ``labels`` is an integer array
    (X, Y, Z); ``clip_mm`` bounds the result to the band the loss cares about."""
    from scipy import ndimage
    inside = np.isin(labels, np.asarray(inside_labels))
    sampling = np.broadcast_to(np.asarray(voxsize_mm, float), (3,))
    if not inside.any():
        out = np.full(labels.shape, np.inf if clip_mm is None else clip_mm, np.float32)
        return out
    dist_out = ndimage.distance_transform_edt(~inside, sampling=sampling)
    dist_in = ndimage.distance_transform_edt(inside, sampling=sampling)
    sdt = np.where(inside, -(dist_in - 0.5 * sampling.min()),
                   dist_out - 0.5 * sampling.min()).astype(np.float32)
    return np.clip(sdt, -clip_mm, clip_mm) if clip_mm is not None else sdt


def brain_labels(with_csf=True):
    """Generation labels counted as brain for skull stripping (``--no-csf`` drops CSF)."""
    return tuple(lab.BRAIN_LABELS) + ((24,) if with_csf else ())


#: Labels that random-shapes maps are painted with: distinct GMM classes (no left/right pair
#: shares a class here), all of them output labels, so the segmentation one-hot encodes them.
SHAPE_LABELS = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26)


def shapes_bank(n, shape, n_labels=16, coarse_range=(6, 14), seed=None):
    """``n`` random-shapes label maps (n, *shape) int16 (numpy, made once for training): each
    voxel takes the label of the largest of ``n_labels`` smooth noise fields, drawn on a coarse
    grid of ``coarse_range`` points per axis and upsampled; labels are :data:`SHAPE_LABELS`."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    out = np.zeros((n, *shape), np.int16)
    labels = np.asarray(SHAPE_LABELS[:n_labels], np.int16)
    half = tuple(-(-s // 2) for s in shape)     # fields at 2 mm, labels repeated to 1 mm
    for i in range(n):
        k = int(rng.integers(coarse_range[0], coarse_range[1] + 1))
        best = np.full(half, -np.inf, np.float32)
        small = np.zeros(half, np.int16)
        for j in range(n_labels):
            coarse = rng.standard_normal((k, k, k)).astype(np.float32)
            field = ndimage.zoom(coarse, [s / k for s in half], order=1, mode='nearest',
                                 grid_mode=True)[:half[0], :half[1], :half[2]]
            win = field > best
            small[win] = labels[j]
            best = np.where(win, field, best)
        full = small.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        out[i] = full[:shape[0], :shape[1], :shape[2]]
    return out


class RandomShapes(keras.layers.Layer):
    """Random 'shapes' label maps from smooth noise (anatomy-agnostic SynthMorph training).

    ``n_labels`` smooth Gaussian noise fields are drawn on a coarse grid (``scale`` x shape),
    upsampled, optionally warped, and the label of each voxel is the field that is largest there.

    call(reference) -> (B, *shape, 1) int32 labels in [0, n_labels); ``reference`` gives B.
    """

    def __init__(self, shape, n_labels=16, scale=0.0625, warp_std=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(n) for n in shape)
        self.n_labels, self.scale, self.warp_std, self.seed = n_labels, scale, warp_std, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.coarse = svf_shape(self.shape, scale)

    def build(self, input_shape):
        self.built = True

    def call(self, reference):
        b = reference.shape[0]
        noise = keras.random.normal((b, *self.coarse, self.n_labels), seed=self.seed_generator)
        fields = layers.resize_field(noise, self.shape)
        if self.warp_std > 0:
            vel = self.warp_std * keras.random.normal((b, *svf_shape(self.shape, 0.1), 3),
                                                      seed=self.seed_generator)
            disp = layers.ResizeField(self.shape)(vel)
            fields = layers.SpatialTransformer('linear')([fields, disp])
        return ops.cast(ops.argmax(fields, axis=-1), 'int32')[..., None]

    def get_config(self):
        return {**super().get_config(), 'shape': self.shape, 'n_labels': self.n_labels,
                'scale': self.scale, 'warp_std': self.warp_std, 'seed': self.seed}
