"""Training tasks of the SynthMorph networks: pairs of synthetic images of one label map (or of
random shapes) with independent deformations and contrasts."""

import dataclasses

import keras
import numpy as np

from ... import labels as lab
from ... import metrics
from ...task import Options, Task, TrainConfig
from . import network as morph

#: Brain structures merged into left/right regions for the affine overlap loss.
AFFINE_GROUPS = ((2, 3), (41, 42), (4, 5, 14, 15, 43, 44), (7, 8), (46, 47),
                 (10, 11, 12, 13, 17, 18, 26, 28), (49, 50, 51, 52, 53, 54, 58, 60), (16,), (24,))


def registration_pair(sampler, label_maps):
    """Two synthetic images of the same label maps with independent deformations and contrasts
    (SynthMorph training): ``(moving, fixed)``, each a dict with 'image', 'labels' and 'coords'
    (source voxel each output voxel was sampled from, which links the two through the source)."""
    return sampler(label_maps), sampler(label_maps)


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


@dataclasses.dataclass
class AffineOptions(Options):
    net: dict = dataclasses.field(default_factory=dict)   # feature_net arguments
    label_groups: list = None     # loss classes: groups of labels (None: every output label)
    coord_weight: float = 0.0     # weight of the mean squared source-point distance (mm^2)
    lambda_range: tuple = (0.0, 1.0)


@dataclasses.dataclass
class DeformOptions(Options):
    net: dict = dataclasses.field(default_factory=dict)   # deform_network arguments
    label_groups: list = None
    lambda_range: tuple = (0.0, 1.0)  # regularization weight, drawn per step
    int_steps: int = 5                # scaling-and-squaring steps
    coord_weight: float = 0.0         # weight of the source-point (correspondence) term
    coord_distance: bool = False      # that term as the mean end-point error (mm), not squared
    match_weight: float = 0.0         # weight of the cost-volume cross-entropy (MatchLoss)
    shapes_prob: float = 0.0          # share of random-shapes label maps
    shapes_maps: int = 8              # how many random-shapes maps are made
    same_contrast_prob: float = 0.0   # share of pairs of one image and a warped copy of it
    same_contrast_disp_vox: float = 3.0   # std of that warp's control points (voxels)


class _RegistrationTask(Task):
    """Shared parts of the SynthMorph tasks: pairs of synthetic images of one label map with
    independent deformations and contrasts; the models compute their own loss (their output),
    so the target passed to Keras is a dummy."""
    choose_norm_statistics = False       # no batch norm
    custom_objects = morph.CUSTOM_OBJECTS

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lookup = lab.generation_lookup(cfg.out_labels)
        self.n_labels = len(cfg.out_labels)
        groups = self.opts.label_groups
        if groups:      # coarser classes: a smoother overlap loss for large misalignments
            seg = np.zeros(len(self.lookup), np.int32)
            for i, members in enumerate(groups, start=1):
                seg[list(members)] = i
            self.lookup = seg[np.asarray(cfg.out_labels)][self.lookup]
            self.n_labels = len(groups) + 1
        self.lam_range = tuple(self.opts.lambda_range)

    def loss(self):
        return morph.mean_output

    def encode(self, target):
        return np.zeros((target['n'],), np.float32)

    def classes(self, labels):
        """Generation labels (B, X, Y, Z, 1) -> loss classes (B, X, Y, Z) uint8."""
        return self.lookup[labels[..., 0]].astype(np.uint8)

    def prepare(self, x):
        """The model inputs of a sample: the class maps (inputs 2 and 3, small to pass between
        processes) become one-hot."""
        eye = np.eye(self.n_labels, dtype=np.float32)
        return x[:2] + [eye[x[2]], eye[x[3]]] + x[4:]

    def pair(self, sampler, maps, coords=False):
        m, f = registration_pair(sampler, maps)
        out = (np.asarray(m['image']), np.asarray(f['image']), np.asarray(m['labels']),
               np.asarray(f['labels']))
        return out + ((np.asarray(m['coords']), np.asarray(f['coords'])) if coords else ())

    def build_model(self):
        model = self.training_model()
        model.compile(optimizer=keras.optimizers.Adam(self.cfg.learning_rate),
                      loss=morph.mean_output)
        return model

    def load_checkpoint(self, path):
        """Rebuilt from code and given the checkpoint's weights: the networks share layers
        between nested models, which Keras cannot rebuild from the saved config."""
        model = self.build_model()
        model.optimizer.build(model.trainable_variables)
        model.load_weights(path)
        return model

    def exported_network(self, model):
        bare = self.network()
        bare.set_weights(model.get_layer(bare.name).get_weights())
        return bare

    def architecture(self):
        return {'type': self.network_layer, **self.cfg.task_options.get('net', {})}

    def loss_description(self):
        return self.LOSS


class AffineTask(_RegistrationTask):
    """SynthMorph affine: feature barycentres fitted symmetrically by weighted least squares;
    loss: soft Dice of the brain labels moved by the fitted affine; score: mean hard Dice."""
    name = 'synthmorph_affine'
    network_layer = 'affine_features'
    Options = AffineOptions
    LOSS = ('1 - soft Dice of the label maps moved by the fitted affine + '
            'coord_weight x mean squared source-point distance (mm^2)')

    @classmethod
    def preset(cls, maps):
        # 3 mm voxels, 64^3 (192 mm): pairs of whole or skull-stripped heads, each with its own
        # random affine (up to 30 degrees and 40 mm apart), no left/right flips
        return TrainConfig(
            **cls.split(maps), task=cls.name, shape=(64, 64, 64), learning_rate=5e-4,
            val_every=200,
            task_options={'net': {'features': [16, 32, 32, 32], 'out_features': 32,
                                  'out_level': 1},
                          'label_groups': AFFINE_GROUPS, 'coord_weight': 0.02},
            generator={'voxsize_mm': 3.0, 'flip_prob': 0.0, 'scaling_range': (0.85, 1.15),
                       'rotation_range_deg': (-15.0, 15.0), 'translation_range_mm': (-20.0, 20.0),
                       'strip_prob': 0.5, 'fov_prob': 0.05})

    def network(self):
        return morph.feature_net(**self.opts.net)

    def training_model(self):
        return morph.affine_training_model(self.network(), self.cfg.shape, self.n_labels,
                                           self.opts.coord_weight)

    def sample(self, sampler, bank, rng, n):
        maps, _ = bank.batch(n, rng)
        m, f, lm, lf, *c = self.pair(sampler, maps, bool(self.opts.coord_weight))
        x = [m, f, self.classes(lm), self.classes(lf)] + c
        return x, {'n': n, 'moving': lm, 'fixed': lf}

    def validate(self, model, pairs):
        net = model.get_layer('affine_features')
        scores = []
        for x, t in pairs:
            mat = affine_matrix(net, x[0], x[1])
            moved = np.asarray(morph.sample_affine(x[2], mat[None].astype(np.float32),
                                                   self.cfg.shape))
            scores.append(metrics.mean_dice(np.argmax(moved[0], -1),
                                            self.lookup[t['fixed'][0, ..., 0]]))
        return float(np.mean(scores))


def affine_matrix(net, moving, fixed):
    """The symmetric affine (4, 4) from fixed to moving centred voxel coordinates."""
    fit = morph.SymmetricFit(moving.shape[1:4], fixed.shape[1:4])
    return np.asarray(fit([net.predict_on_batch(moving), net.predict_on_batch(fixed)]))[0]


class DeformTask(_RegistrationTask):
    """SynthMorph deformable: a lambda-conditioned network (``net.kind``: the correlation network
    of the preset, or a U-Net) predicts a stationary velocity field; loss ``(1 - lambda)
    (1 - Dice + coord_weight E) + lambda |grad v|^2 (+ match_weight M)``; trained on brain label
    maps and, with
    probability ``shapes_prob``, on random-shapes label maps; score: mean hard Dice of the moved
    labels at lambda = 0.5."""
    name = 'synthmorph_deform'
    network_layer = 'deform_velocity'
    Options = DeformOptions
    LOSS = ('(1 - lambda) (1 - soft Dice of the moved label maps + coord_weight x '
            'mean source-point distance (mm) over labelled voxels) + '
            'lambda mean |grad v|^2 + match_weight x cross-entropy of the cost volume '
            'against the true matches, lambda ~ U(0, 1) per step')

    @classmethod
    def preset(cls, maps):
        # 2 mm voxels, 64^3 (128 mm) crops of roughly affine-aligned pairs with nonlinear
        # differences (5 mm SVF std per image); a Siamese correlation network (shifts up to
        # +-8 mm on its 4 mm grid); 20 % random shapes, 30 % same-contrast pairs; the dense
        # correspondence term is the mean end-point error in mm (bounded gradient; voxels mapped
        # outside the grid are not left out, which made the squared version diverge)
        return TrainConfig(
            **cls.split(maps), task=cls.name, shape=(64, 64, 64), learning_rate=5e-4,
            val_every=200,
            task_options={'net': {'kind': 'correlation', 'features': [16, 32, 32],
                                  'radius': 2, 'hyper_units': 32, 'head_features': 32,
                                  'temperature': 30.0},
                          'shapes_prob': 0.2, 'shapes_maps': 8, 'lambda_range': (0.0, 1.0),
                          'int_steps': 5, 'coord_weight': 0.05, 'coord_distance': True,
                          'match_weight': 0.1,
                          'same_contrast_prob': 0.3, 'same_contrast_disp_vox': 2.0},
            generator={'voxsize_mm': 2.0, 'flip_prob': 0.0, 'scaling_range': (0.95, 1.05),
                       'rotation_range_deg': (-4.0, 4.0), 'translation_range_mm': (-4.0, 4.0),
                       'shearing_range': (-0.01, 0.01), 'nonlin_std_mm': 5.0,
                       'strip_prob': 0.5})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.shapes = None

    def network(self):
        return morph.deform_network(**self.opts.net)

    def training_model(self):
        return morph.deform_training_model(self.network(), self.cfg.shape, self.n_labels,
                                           self.opts.int_steps,
                                           self.opts.coord_weight,
                                           self.opts.coord_distance,
                                           self.opts.match_weight)

    def sample(self, sampler, bank, rng, n):
        use_shapes = rng.random() < self.opts.shapes_prob
        if use_shapes:
            if self.shapes is None:
                self.shapes = shapes_bank(self.opts.shapes_maps, bank.shape,
                                          seed=int(rng.integers(2 ** 31)))
            maps = self.shapes[rng.integers(0, len(self.shapes), size=n)][..., None]
        else:
            maps, _ = bank.batch(n, rng)
        coords = bool(self.opts.coord_weight or self.opts.match_weight)
        if rng.random() < self.opts.same_contrast_prob:
            m, f, lm, lf, *c = self.same_contrast_pair(sampler, maps, rng, coords)
        else:
            m, f, lm, lf, *c = self.pair(sampler, maps, coords)
        lam = rng.uniform(*self.lam_range, size=(n, 1)).astype(np.float32)
        x = [m, f, self.classes(lm), self.classes(lf), lam] + c
        return x, {'n': n, 'moving': lm, 'fixed': lf}

    def same_contrast_pair(self, sampler, maps, rng, coords):
        """One synthetic image and a copy of it (image, labels, source coordinates) warped by
        a smooth random displacement (``same_contrast_disp_vox`` std on a 1/8 control grid,
        cubic interpolation): an easier pair with a single contrast, the fixed image being
        the moving one at ``x + d(x)``."""
        from scipy import ndimage
        out = sampler(maps)
        img, labels = np.asarray(out['image']), np.asarray(out['labels'])
        shape = img.shape[1:4]
        k = [max(2, n // 8) for n in shape]
        std = float(self.opts.same_contrast_disp_vox)
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                    indexing='ij'))
        f_img, f_lab, f_crd = np.empty_like(img), np.empty_like(labels), None
        src = np.asarray(out['coords']) if coords else None
        if coords:
            f_crd = np.empty_like(src)
        for b in range(img.shape[0]):
            disp = np.stack([ndimage.zoom(rng.normal(0, std, k).astype(np.float32),
                                          [n / c for n, c in zip(shape, k)], order=3,
                                          grid_mode=True, mode='nearest')[:shape[0], :shape[1],
                                                                          :shape[2]]
                             for _ in range(3)])
            pts = grid + disp
            f_img[b, ..., 0] = ndimage.map_coordinates(img[b, ..., 0], pts, order=1, cval=0)
            f_lab[b, ..., 0] = ndimage.map_coordinates(labels[b, ..., 0], pts, order=0, cval=0)
            if coords:
                for i in range(3):
                    f_crd[b, ..., i] = ndimage.map_coordinates(src[b, ..., i], pts, order=1,
                                                               mode='nearest')
        pair = (img, f_img, labels, f_lab)
        return pair + ((src, f_crd) if coords else ())

    def validate(self, model, pairs):
        net = model.get_layer('deform_velocity')
        scores = []
        for x, t in pairs:
            disp = morph.integrate(net.predict_on_batch(
                [np.concatenate([x[0], x[1]], -1), np.array([[0.5]], np.float32)]),
                self.cfg.shape, self.opts.int_steps)
            moved = np.asarray(morph.warp_labels(x[2], disp))
            scores.append(metrics.mean_dice(np.argmax(moved[0], -1),
                                            self.lookup[t['fixed'][0, ..., 0]]))
        return float(np.mean(scores))
