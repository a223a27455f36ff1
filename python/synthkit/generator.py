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

from . import backend
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
    anisotropic_inplane_range_mm: tuple = (1.0, 1.0)   # the other two axes' spacing then
    thickness_min_fraction: float = 0.5
    # geometry of the output
    voxsize_mm: float = 1.0
    lr_axis: int = 0                 # voxel axis along left-right in the label maps (LIA: 0)

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self):
        """A one-line description of the first invalid parameter, or None."""
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if isinstance(field.default, tuple):
                if not (isinstance(value, tuple) and len(value) == 2
                        and all(map(_finite_number, value))):
                    return '%s must be a pair of numbers [low, high], got %r' % (name, value)
                ordered = name not in ('mean_range', 'std_range') or self.prior == 'uniform'
                if ordered and value[0] > value[1]:
                    return '%s must have low <= high, got %r' % (name, list(value))
            elif name == 'prior':
                if value not in ('uniform', 'normal'):
                    return "prior must be 'uniform' or 'normal', got %r" % (value,)
            elif not _finite_number(value):
                return '%s must be a finite number, got %r' % (name, value)
            elif name.endswith('_prob') and not 0 <= value <= 1:
                return '%s must be in [0, 1], got %r' % (name, value)
            elif name in ('voxsize_mm', 'nonlin_scale', 'bias_scale') and not value > 0:
                return '%s must be positive, got %r' % (name, value)
            elif value < 0:
                return '%s must not be negative, got %r' % (name, value)
            elif name in ('integration_steps', 'lr_axis') and value != int(value):
                return '%s must be an integer, got %r' % (name, value)
            elif name == 'lr_axis' and value not in (0, 1, 2):
                return 'lr_axis must be 0, 1 or 2, got %r' % (value,)
            elif name in ('fov_max_fraction', 'thickness_min_fraction') and value > 1:
                return '%s must be in [0, 1], got %r' % (name, value)
        return None

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


def _finite_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    'coords' (B, *shape, 3) each output voxel was sampled from (for registration targets), the
    left/right 'flips' (B,) in {0, 1} (1: the labels were mirrored and their hemispheres
    swapped, so a target sampled at 'coords' from another map must swap its own), and with
    ``params.fov_prob`` > 0 the 'fov' mask (B, *shape, 1) of the field of view kept.

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
                                                  seed=seeds[5],
                                                  inplane_range=p.anisotropic_inplane_range_mm)
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
        out = {'image': image, 'labels': labels, 'coords': coords, 'flips': flips}
        if self.params.fov_prob > 0:
            out['image'] = image * fov
            out['fov'] = fov         # 1 inside the kept field of view
        return out

    def get_config(self):
        return {**super().get_config(), 'shape': self.shape, 'params': self.params.to_dict(),
                'seed': self.seed}


def load_label_map(path):
    """A label map file as (int16 labels, None): what :class:`LabelMapBank` reads by default."""
    import nibabel as nib
    data = np.asarray(nib.load(path).dataobj)
    if data.ndim != 3:
        raise ValueError('%s: label map must be 3-D' % path)
    return data.astype(np.int16), None


#: The ventricular system as :func:`shrink_structures` erodes it: each group one cavity (left
#: lateral ventricle with its inferior horn and choroid plexus, the right one, 3rd, 4th).
VENTRICLE_GROUPS = ((4, 5, 31), (43, 44, 63), (14,), (15,))


def shrink_structures(data, radius, groups=VENTRICLE_GROUPS, min_kept=0.3):
    """A copy of label map ``data`` whose structures ``groups`` (tuples of labels, each eroded
    as one) are eroded by ``radius`` voxels; the voxels taken from them get the label of the
    nearest voxel outside every group and outside CSF (24): the tissue around a cavity grows
    into it, as in a brain with smaller ventricles. A label that would keep less than
    ``min_kept`` of its volume keeps all of it (a thin inferior horn is not erased)."""
    from scipy import ndimage
    data = np.array(data, copy=True)
    if radius <= 0:
        return data
    members = [label for group in groups for label in group]
    cavity = np.isin(data, members)
    if not cavity.any():
        return data
    nz = np.argwhere(cavity)
    pad = int(radius) + 4
    box = tuple(slice(max(int(a) - pad, 0), int(b) + pad + 1)
                for a, b in zip(nz.min(0), nz.max(0)))
    sub = data[box]
    blocked = np.isin(sub, members + [24])
    ball = ndimage.generate_binary_structure(3, 1)
    removed = np.zeros(sub.shape, bool)
    for group in groups:
        mask = np.isin(sub, group)
        if not mask.any():
            continue
        gone = mask & ~ndimage.binary_erosion(mask, ball, iterations=int(radius))
        for label in group:       # a label mostly eroded away stays as it was
            own = sub == label
            if own.any() and (own & ~gone).sum() < min_kept * own.sum():
                gone &= ~own
        removed |= gone
    if removed.any():
        _, idx = ndimage.distance_transform_edt(blocked, return_indices=True)
        sub[removed] = sub[tuple(i[removed] for i in idx)]
    data[box] = sub
    return data


class LabelMapBank:
    """Label maps held in memory (int16), cropped to the head and padded to one shape.

    ``maps`` is a list of paths; ``margin`` voxels are kept around the labelled bounding box.
    ``batch(n, rng)`` returns a random (n, *shape, 1) int32 batch and the indices drawn.

    ``loader(path)`` gives ``(labels, image)``; ``image`` is None or an array on the labels'
    grid (e.g. the real T1 a label map was made from), cropped and padded with it into
    ``images[i]`` (kept in its own dtype: uint8 T1s stay small).
    """

    def __init__(self, paths, margin=8, min_shape=None, loader=None):
        loader = loader or load_label_map
        arrays, images, self.paths = [], [], list(paths)
        for p in self.paths:
            data, image = loader(p)
            nz = np.argwhere(data > 0)
            lo = np.maximum(nz.min(0) - margin, 0)
            hi = np.minimum(nz.max(0) + margin + 1, data.shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            arrays.append(data[box])
            images.append(None if image is None else image[box])
        shape = np.max([a.shape for a in arrays], axis=0)
        if min_shape is not None:
            shape = np.maximum(shape, min_shape)
        self.shape = tuple(int(n) for n in shape)
        self.maps = np.zeros((len(arrays), *self.shape), np.int16)
        self.images = []
        for i, (a, image) in enumerate(zip(arrays, images)):
            off = [(s - n) // 2 for s, n in zip(self.shape, a.shape)]
            box = tuple(slice(o, o + n) for o, n in zip(off, a.shape))
            self.maps[(i,) + box] = a
            if image is not None:
                padded = np.zeros(self.shape, image.dtype)
                padded[box] = image
                image = padded
            self.images.append(image)

    def __len__(self):
        return len(self.maps)

    def batch(self, n, rng, indices=None):
        idx = rng.integers(0, len(self.maps), size=n) if indices is None else np.asarray(indices)
        return self.maps[idx][..., None].astype(np.int32), idx


class PairSampler:
    """Compiled generator: ``sampler(label_maps)`` -> dict of numpy-convertible tensors.

    The large standard-normal field is drawn outside the compiled function (fast native
    kernels), the rest runs compiled (:func:`synthkit.backend.compiled_random`): on TensorFlow a
    graph without XLA, which on these CPUs both compiles 5x faster and runs 2x faster than XLA
    (96^3 at 2 mm: 7.8 s to build, 0.24 s per pair; with XLA 40 s and 0.51 s); on JAX one XLA
    program on an accelerator (``jit``: None chooses, True/False force it).
    """

    def __init__(self, generator, seed=None, jit=None):
        self.generator = generator
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.fn = backend.compiled_random(generator, lambda x, n: generator(x, n), jit=jit)

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
