"""Losses, a resumable training loop over the synthetic generator, checkpoints and model cards.

A run lives in one directory::

    RUN/config.json     the TrainConfig (written once; a resumed run must match it)
    RUN/ckpt.keras      model + optimizer state, rewritten atomically every few minutes
    RUN/state.json      the step reached and wall time spent so far
    RUN/log.csv         step, loss, time, and validation Dice when measured

``Trainer(cfg, run_dir).run()`` starts or resumes; ``export`` writes the shipped weights and a
model card. Works on any Keras backend (TensorFlow here; JAX or PyTorch on a GPU machine).
"""

import csv
import dataclasses
import datetime
import json
import os
import platform
import time

import keras
import numpy as np
from keras import ops

from . import generator as gen
from . import labels as lab
from . import morph
from . import nets


# ----------------------------------------------------------------------------------- losses
def soft_dice_loss(y_true, y_pred, eps=1e-5):
    """1 - mean over channels of the soft Dice between one-hot ``y_true`` and ``y_pred``."""
    axes = tuple(range(1, len(y_pred.shape) - 1))
    inter = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true + y_pred, axis=axes)
    return 1 - ops.mean((2 * inter + eps) / (denom + eps), axis=-1)


class DiceCELoss(keras.losses.Loss):
    """Soft Dice plus ``ce_weight`` x categorical cross-entropy (the CE term speeds up the start
    of training and keeps gradients for absent labels; set it to 0 for pure soft Dice)."""

    def __init__(self, ce_weight=1.0, name='dice_ce', **kwargs):
        super().__init__(name=name, **kwargs)
        self.ce_weight = ce_weight

    def call(self, y_true, y_pred):
        loss = soft_dice_loss(y_true, y_pred)
        if self.ce_weight:
            p = ops.clip(y_pred, 1e-7, 1.0)
            ce = -ops.mean(ops.sum(y_true * ops.log(p), axis=-1),
                           axis=tuple(range(1, len(y_pred.shape) - 1)))
            loss = loss + self.ce_weight * ce
        return loss

    def get_config(self):
        return {**super().get_config(), 'ce_weight': self.ce_weight}


def hard_dice(a, b, labels):
    """Dice per label between integer maps ``a`` and ``b`` (NaN where absent from both)."""
    out = []
    for k in labels:
        x, y = a == k, b == k
        s = x.sum() + y.sum()
        out.append(2.0 * np.logical_and(x, y).sum() / s if s else np.nan)
    return np.array(out)


class BandMSELoss(keras.losses.Loss):
    """Mean squared error of a signed distance map where the target is inside ``(-band_mm,
    band_mm)`` (SynthStrip: far from the boundary the exact value does not matter), plus, beyond
    the band, the squared amount by which a prediction falls on the wrong side of the band."""

    def __init__(self, band_mm=5.0, name='band_mse', **kwargs):
        super().__init__(name=name, **kwargs)
        self.band_mm = band_mm

    def call(self, y_true, y_pred):
        w = ops.cast(ops.abs(y_true) < self.band_mm, y_pred.dtype)
        axes = tuple(range(1, len(y_pred.shape)))
        band = ops.sum(w * ops.square(y_pred - y_true), axis=axes) / (ops.sum(w, axis=axes) + 1)
        # beyond the band only the side matters: a prediction on the wrong side of +-band_mm
        # costs its squared distance to it (otherwise far background may come out as 'inside')
        b = self.band_mm
        side = ops.square(ops.clip(y_pred, -b, b) - ops.clip(y_true, -b, b))
        return band + ops.mean((1 - w) * side, axis=axes)

    def get_config(self):
        return {**super().get_config(), 'band_mm': self.band_mm}


# ------------------------------------------------------------------------------------ tasks
class SegmentationTask:
    """Target: the deformed label map as output channels; loss: soft Dice (+ CE); score: mean
    hard Dice over the labels present."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.lookup = lab.generation_lookup(cfg.out_labels)

    def target(self, labels):
        return self.lookup[labels[..., 0]]

    def encode(self, target):
        return ops.one_hot(target, len(self.cfg.out_labels))

    def loss(self):
        return DiceCELoss(self.cfg.ce_weight)

    def score(self, pred, target):
        seg = np.argmax(pred, axis=-1)
        present = [k for k in range(1, len(self.cfg.out_labels)) if (target == k).any()]
        return float(np.nanmean(hard_dice(seg, target, present)))


class DistanceTask:
    """Target: signed distance (mm) to the brain boundary of the deformed label map, clipped;
    loss: MSE inside the band; score: Dice of the masks (distance < 0)."""

    def __init__(self, cfg):
        self.cfg = cfg
        opts = cfg.task_options
        self.inside = gen.brain_labels(with_csf=opts.get('csf', True))
        self.band = float(opts.get('band_mm', 5.0))
        self.voxsize = float(cfg.generator.get('voxsize_mm', 1.0))

    def target(self, labels):
        return np.stack([gen.signed_distance(l[..., 0], self.inside, self.voxsize,
                                             clip_mm=2 * self.band)
                         for l in labels])[..., None]

    def encode(self, target):
        return target

    def loss(self):
        return BandMSELoss(self.band)

    def score(self, pred, target):
        return float(hard_dice(pred[..., 0] < 0, target[..., 0] < 0, [True])[0])


class _RegistrationTask:
    """Shared parts of the SynthMorph tasks: pairs of synthetic images of one label map with
    independent deformations and contrasts; the models compute their own loss (their output),
    so the target passed to Keras is a dummy."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.opts = cfg.task_options
        self.lookup = lab.generation_lookup(cfg.out_labels)
        self.n_labels = len(cfg.out_labels)
        groups = self.opts.get('label_groups')
        if groups:      # coarser classes: a smoother overlap loss for large misalignments
            seg = np.zeros(len(self.lookup), np.int32)
            for i, members in enumerate(groups, start=1):
                seg[list(members)] = i
            self.lookup = seg[np.asarray(cfg.out_labels)][self.lookup]
            self.n_labels = len(groups) + 1
        self.lam_range = tuple(self.opts.get('lambda_range', (0.0, 1.0)))

    def loss(self):
        return morph.mean_output

    def encode(self, target):
        return np.zeros((target['n'],), np.float32)

    def make_sampler(self, seed):
        params = gen.GeneratorParams.from_dict(self.cfg.generator)
        return gen.PairSampler(gen.SynthGenerator(self.cfg.shape, params, seed=seed), seed=seed)

    def classes(self, labels):
        """Generation labels (B, X, Y, Z, 1) -> loss classes (B, X, Y, Z) uint8."""
        return self.lookup[labels[..., 0]].astype(np.uint8)

    def prepare(self, x):
        """The model inputs of a sample: the class maps (inputs 2 and 3, small to pass between
        processes) become one-hot."""
        eye = np.eye(self.n_labels, dtype=np.float32)
        return x[:2] + [eye[x[2]], eye[x[3]]] + x[4:]

    def pair(self, sampler, maps, coords=False):
        m, f = gen.registration_pair(sampler, maps)
        out = (np.asarray(m['image']), np.asarray(f['image']), np.asarray(m['labels']),
               np.asarray(f['labels']))
        return out + ((np.asarray(m['coords']), np.asarray(f['coords'])) if coords else ())

    def build_model(self):
        model = self.training_model()
        model.compile(optimizer=keras.optimizers.Adam(self.cfg.learning_rate),
                      loss=morph.mean_output)
        return model


class AffineTask(_RegistrationTask):
    """SynthMorph affine: feature barycentres fitted symmetrically by weighted least squares;
    loss: soft Dice of the brain labels moved by the fitted affine; score: mean hard Dice."""
    net_name = 'affine_features'

    def network(self):
        return morph.feature_net(**self.opts.get('net', {}))

    def training_model(self):
        return morph.affine_training_model(self.network(), self.cfg.shape, self.n_labels,
                                           self.opts.get('coord_weight', 0.0))

    def sample(self, sampler, bank, rng, n):
        maps, _ = bank.batch(n, rng)
        m, f, lm, lf, *c = self.pair(sampler, maps, bool(self.opts.get('coord_weight')))
        x = [m, f, self.classes(lm), self.classes(lf)] + c
        return x, {'n': n, 'moving': lm, 'fixed': lf}

    def validate(self, model, pairs):
        net = model.get_layer('affine_features')
        scores = []
        for x, t in pairs:
            mat = affine_matrix(net, x[0], x[1])
            moved = np.asarray(morph.sample_affine(x[2], mat[None].astype(np.float32),
                                                   self.cfg.shape))
            scores.append(label_dice(np.argmax(moved[0], -1), self.lookup[t['fixed'][0, ..., 0]]))
        return float(np.mean(scores))


def affine_matrix(net, moving, fixed):
    """The symmetric affine (4, 4) from fixed to moving centred voxel coordinates."""
    fit = morph.SymmetricFit(moving.shape[1:4], fixed.shape[1:4])
    return np.asarray(fit([net.predict_on_batch(moving), net.predict_on_batch(fixed)]))[0]


def label_dice(a, b):
    """Mean hard Dice over the non-zero labels present in ``b``."""
    present = [k for k in np.unique(b) if k != 0]
    return float(np.nanmean(hard_dice(a, b, present)))


class DeformTask(_RegistrationTask):
    """SynthMorph deformable: a lambda-conditioned network (``net.kind``: the correlation network
    of the preset, or a U-Net) predicts a stationary velocity field; loss ``(1 - lambda)
    (1 - Dice + coord_weight E) + lambda |grad v|^2 (+ match_weight M)``; trained on brain label
    maps and, with
    probability ``shapes_prob``, on random-shapes label maps; score: mean hard Dice of the moved
    labels at lambda = 0.5."""
    net_name = 'deform_velocity'

    def __init__(self, cfg):
        super().__init__(cfg)
        self.shapes = None

    def network(self):
        return morph.deform_network(**self.opts.get('net', {}))

    def training_model(self):
        return morph.deform_training_model(self.network(), self.cfg.shape, self.n_labels,
                                           self.opts.get('int_steps', 5),
                                           self.opts.get('coord_weight', 0.0),
                                           self.opts.get('coord_distance', False),
                                           self.opts.get('match_weight', 0.0))

    def sample(self, sampler, bank, rng, n):
        use_shapes = rng.random() < self.opts.get('shapes_prob', 0.0)
        if use_shapes:
            if self.shapes is None:
                self.shapes = gen.shapes_bank(self.opts.get('shapes_maps', 8), bank.shape,
                                              seed=int(rng.integers(2 ** 31)))
            maps = self.shapes[rng.integers(0, len(self.shapes), size=n)][..., None]
        else:
            maps, _ = bank.batch(n, rng)
        coords = bool(self.opts.get('coord_weight') or self.opts.get('match_weight'))
        if rng.random() < self.opts.get('same_contrast_prob', 0.0):
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
        std = float(self.opts.get('same_contrast_disp_vox', 3.0))
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
                self.cfg.shape, self.opts.get('int_steps', 5))
            moved = np.asarray(morph.warp_labels(x[2], disp))
            scores.append(label_dice(np.argmax(moved[0], -1), self.lookup[t['fixed'][0, ..., 0]]))
        return float(np.mean(scores))


TASKS = {'synthseg': SegmentationTask, 'synthstrip': DistanceTask,
         'synthstrip_nocsf': DistanceTask,
         'synthmorph_affine': AffineTask, 'synthmorph_deform': DeformTask}
CUSTOM_OBJECTS = {'DiceCELoss': DiceCELoss, 'BandMSELoss': BandMSELoss, **morph.CUSTOM_OBJECTS}


# ----------------------------------------------------------------------------------- config
@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the run and the model card)."""
    label_maps: list = dataclasses.field(default_factory=list)
    val_maps: list = dataclasses.field(default_factory=list)
    shape: tuple = (96, 96, 96)
    unet: dict = dataclasses.field(default_factory=lambda: nets.UNetConfig().to_dict())
    generator: dict = dataclasses.field(default_factory=lambda: {'translation_range_mm':
                                                                 (-40.0, 40.0)})
    out_labels: tuple = lab.SEGMENTATION_LABELS
    steps: int = 5000
    batch_size: int = 1
    learning_rate: float = 1e-3
    ce_weight: float = 1.0
    checkpoint_minutes: float = 5.0
    val_every: int = 250
    val_pairs: int = 4
    seed: int = 0
    task: str = 'synthseg'
    task_options: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d['label_maps'] = [os.path.basename(p) for p in self.label_maps]
        d['val_maps'] = [os.path.basename(p) for p in self.val_maps]
        return d


def override(cfg, item):
    """Apply ``'KEY=JSON'`` to ``cfg`` in place: a TrainConfig field, or ``task_options.NAME``
    / ``generator.NAME`` for one entry of those dicts (a new dict, the preset is not shared)."""
    key, sep, value = item.partition('=')
    if not sep:
        raise ValueError('expected KEY=VALUE, got %r' % item)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass                                # a bare string
    head, _, name = key.partition('.')
    if head not in TrainConfig.__dataclass_fields__:
        raise ValueError('unknown config field %r' % head)
    if name:
        if not isinstance(getattr(cfg, head), dict):
            raise ValueError('%s is not a dict field' % head)
        setattr(cfg, head, {**getattr(cfg, head), name: value})
    else:
        setattr(cfg, head, value)


def _atomic_json(obj, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, default=list)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """Train a U-Net on synthetic pairs; resumable from ``run_dir``."""

    def __init__(self, cfg, run_dir, progress=True, init=None):
        """``init``: prefix of shipped weights (``PREFIX.weights.h5`` + card) to start a new run
        from, continuing the card's step count: how training resumes in a fresh clone, where
        only the shipped weights are committed (the optimizer state starts afresh)."""
        self.cfg, self.run_dir, self.progress, self.init = cfg, run_dir, progress, init
        self.task = TASKS[cfg.task](cfg)
        os.makedirs(run_dir, exist_ok=True)
        self.ckpt = os.path.join(run_dir, 'ckpt.keras')
        self.state_path = os.path.join(run_dir, 'state.json')
        self.log_path = os.path.join(run_dir, 'log.csv')
        cfg_path = os.path.join(run_dir, 'config.json')
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                old = json.load(f)
            new = json.loads(json.dumps(cfg.to_dict(), default=list))
            default = json.loads(json.dumps(TrainConfig().to_dict(), default=list))
            diff = sorted(k for k in new if k not in ('steps', 'checkpoint_minutes')
                          and old.get(k, default[k]) != new[k])
            if diff:
                raise ValueError('%s was started with a different config (%s); use a new run '
                                 'directory' % (run_dir, ', '.join(diff)))
        _atomic_json(cfg.to_dict(), cfg_path)

    @classmethod
    def for_sampling(cls, cfg):
        """A trainer of ``cfg`` without a run directory: enough to draw batches and
        validation pairs (sampling processes, :func:`compare_norm_statistics`)."""
        trainer = cls.__new__(cls)
        trainer.cfg, trainer.task = cfg, TASKS[cfg.task](cfg)
        return trainer

    def _state(self):
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                return json.load(f)
        return {'step': 0, 'seconds': 0.0}

    def build_model(self):
        if hasattr(self.task, 'build_model'):
            return self.task.build_model()
        model = nets.unet(nets.UNetConfig.from_dict(self.cfg.unet), name=self.cfg.task + '_unet')
        model.compile(optimizer=keras.optimizers.Adam(self.cfg.learning_rate),
                      loss=self.task.loss())
        return model

    def _generator(self, step, worker=None):
        """(sampler, rng) of the stream that starts at ``step`` (of sampling process
        ``worker``, when several feed the training)."""
        params = gen.GeneratorParams.from_dict(self.cfg.generator)
        seed = self.cfg.seed * 100003 + step
        if worker is not None:
            seed = int(np.random.SeedSequence((self.cfg.seed, step, worker)).generate_state(1)[0])
        if hasattr(self.task, 'make_sampler'):
            return self.task.make_sampler(seed), np.random.default_rng(seed)
        g = gen.SynthGenerator(self.cfg.shape, params, seed=seed)
        return gen.PairSampler(g, seed=seed), np.random.default_rng(seed)

    def _pairs(self, sampler, bank, rng, n, raw=False):
        """One batch ``(x, target)``; ``raw``: before ``task.prepare`` (what sampling
        processes send)."""
        if hasattr(self.task, 'sample'):
            x, t = self.task.sample(sampler, bank, rng, n)
            return (x, t) if raw else (self.task.prepare(x), t)
        x, _ = bank.batch(n, rng)
        out = sampler(x)
        return np.asarray(out['image']), self.task.target(np.asarray(out['labels']))

    def validation_set(self):
        """Fixed synthetic pairs from the held-out maps (same seed every time)."""
        if not self.cfg.val_maps:
            return None
        bank = gen.LabelMapBank(self.cfg.val_maps)
        sampler, _ = self._generator(10 ** 7)   # a stream training never reaches
        rng = np.random.default_rng(12345)
        pairs = [self._pairs(sampler, bank, rng, 1) for _ in range(self.cfg.val_pairs)]
        return pairs

    def validate(self, model, pairs):
        if hasattr(self.task, 'validate'):
            return self.task.validate(model, pairs)
        return float(np.mean([self.task.score(np.asarray(model.predict_on_batch(x)), t)
                              for x, t in pairs]))

    def run(self, max_minutes=None, workers=0):
        """Train to ``cfg.steps``, or until ``max_minutes`` of wall time have passed (then
        checkpoint and return: a time budget, e.g. a lent GPU machine's). ``workers`` > 0
        samples the synthetic batches in that many CPU processes (a GPU machine: the network
        trains on the GPU while its CPU cores generate the data)."""
        cfg = self.cfg
        state = self._state()
        start = state['step']
        if start > 0 and os.path.exists(self.ckpt):
            model = load_checkpoint(self.task, self.ckpt)
            print('resuming %s at step %d' % (self.run_dir, start), flush=True)
        elif self.init:
            model = self.build_model()
            net = getattr(self.task, 'net_name', None)
            (model.get_layer(net) if net else model).load_weights(self.init + '.weights.h5')
            with open(self.init + '.json') as f:
                done = json.load(f)['training']
            start = int(done['steps'])
            state = {'step': start, 'seconds': 3600.0 * float(done['hours']),
                     'devices': done.get('devices') or ([[0, start, done['device']]]
                                                        if done.get('device') else [])}
            print('starting %s from %s at step %d' % (self.run_dir, self.init, start), flush=True)
        else:
            model, start = self.build_model(), 0
        # where the steps were trained: [first step, last step, device] of earlier sessions,
        # and this session's first step and device (each checkpoint extends it)
        self._devices = state.get('devices') or []
        self._session = (start, device_description())
        if start >= cfg.steps:
            return model
        bank = gen.LabelMapBank(cfg.label_maps)
        val = self.validation_set()
        feed = SamplingProcesses(self, start, workers) if workers else None
        if feed is None:
            sampler, rng = self._generator(start)
        new_log = not os.path.exists(self.log_path)
        logf = open(self.log_path, 'w' if new_log else 'a', newline='')
        log = csv.writer(logf)
        if new_log:
            log.writerow(['step', 'loss', 'seconds', 'val_dice'])
        last_ckpt, t0, seconds0 = time.time(), time.time(), state['seconds']
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=start, unit='step', mininterval=10)
        losses = []
        for step in range(start + 1, cfg.steps + 1):
            if feed is None:
                x, t = self._pairs(sampler, bank, rng, cfg.batch_size)
            else:
                x, t = feed.get()
            y = self.task.encode(t)
            loss = float(np.asarray(model.train_on_batch(x, y)))
            losses.append(loss)
            vd = ''
            if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                vd = '%.4f' % self.validate(model, val)
            out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes
            if step % 10 == 0 or vd or step == cfg.steps or out_of_time:
                log.writerow([step, '%.4f' % np.mean(losses), '%.0f' % (seconds0 + time.time() - t0),
                              vd])
                logf.flush()
                losses = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss='%.3f' % loss, refresh=False)
            if time.time() - last_ckpt > 60 * cfg.checkpoint_minutes or step == cfg.steps \
                    or out_of_time:
                self.save(model, step, seconds0 + time.time() - t0)
                last_ckpt = time.time()
            if out_of_time:
                print('stopped at step %d after %.1f min' % (step, (time.time() - t0) / 60),
                      flush=True)
                break
        logf.close()
        if feed is not None:
            feed.close()
        if bar is not None:
            bar.close()
        return model

    def save(self, model, step, seconds):
        tmp = self.ckpt + '.tmp.keras'
        model.save(tmp)
        os.replace(tmp, self.ckpt)
        first, device = self._session
        devices = merge_devices(self._devices + [[first, step, device]])
        _atomic_json({'step': step, 'seconds': seconds, 'devices': devices,
                      'saved': datetime.datetime.now().isoformat(timespec='seconds')},
                     self.state_path)


def device_description():
    """This machine as model cards name it: processor, CPU cores, Keras backend, and the
    accelerator the backend uses, if any."""
    text = '%s, %d CPU cores, Keras %s backend' % (platform.processor() or platform.machine(),
                                                   os.cpu_count(), keras.backend.backend())
    accelerator = None
    try:
        backend = keras.backend.backend()
        if backend == 'jax':
            import jax
            dev = jax.devices()[0]
            accelerator = None if dev.platform == 'cpu' else dev.device_kind
        elif backend == 'torch':
            import torch
            accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        elif backend == 'tensorflow':
            import tensorflow as tf
            gpus = tf.config.list_physical_devices('GPU')
            accelerator = '%d GPU(s)' % len(gpus) if gpus else None
    except Exception:          # a description only: never fail a checkpoint over it
        accelerator = None
    return text + (', ' + accelerator if accelerator else '')


def merge_devices(devices):
    """[first step, last step, device] records with consecutive records of one device
    merged."""
    merged = []
    for first, last, dev in devices:
        if merged and merged[-1][2] == dev and merged[-1][1] >= first:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last, dev])
    return merged


def describe_devices(devices):
    """One line from a run's [first step, last step, device] records:
    'steps 0-2656: A; steps 2656-15544: B'."""
    return '; '.join('steps %d-%d: %s' % tuple(m) for m in merge_devices(devices))


def _sampling_process(cfg, start, worker, queue):
    """Body of one sampling process: batches ``(x, target)`` of the stream (``start``,
    ``worker``) into ``queue``, before ``task.prepare``, until killed."""
    trainer = Trainer.for_sampling(cfg)
    bank = gen.LabelMapBank(cfg.label_maps)
    sampler, rng = trainer._generator(start, worker)
    while True:
        queue.put(trainer._pairs(sampler, bank, rng, cfg.batch_size, raw=True))


class SamplingProcesses:
    """``n`` processes generating training batches on the CPU (one thread each, the
    accelerator hidden from them); ``get()`` returns the next prepared batch."""

    #: environment of the sampling processes: CPU only, one compute thread
    ENV = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
           'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1',
           'OMP_NUM_THREADS': '1', 'TF_NUM_INTRAOP_THREADS': '1', 'TF_NUM_INTEROP_THREADS': '1',
           'TF_CPP_MIN_LOG_LEVEL': '3'}

    def __init__(self, trainer, start, n):
        import multiprocessing
        ctx = multiprocessing.get_context('spawn')
        self.task = trainer.task
        self.queue = ctx.Queue(maxsize=2 * n)
        saved = {k: os.environ.get(k) for k in self.ENV}
        os.environ.update(self.ENV)
        try:
            self.procs = [ctx.Process(target=_sampling_process,
                                      args=(trainer.cfg, start, i, self.queue), daemon=True)
                          for i in range(n)]
            for proc in self.procs:
                proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def get(self):
        import queue
        while True:
            try:
                x, t = self.queue.get(timeout=60)
                break
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs):
                    raise RuntimeError('all sampling processes have stopped')
        prepare = getattr(self.task, 'prepare', None)
        return (prepare(x) if prepare else x), t

    def close(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(timeout=10)


def load_checkpoint(task, path):
    """The training model of a checkpoint, optimizer state included. Registration models are
    rebuilt from code and given the checkpoint's weights: their networks share layers between
    nested models, which Keras cannot rebuild from the saved config."""
    if hasattr(task, 'build_model'):
        model = task.build_model()
        model.optimizer.build(model.trainable_variables)
        model.load_weights(path)
        return model
    return keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS)


def _config_of(values):
    """The TrainConfig of a run's config.json values (older runs may lack newer fields)."""
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in values.items() if k in fields})


def read_log(run_dir):
    """Rows of a run's log.csv as dicts."""
    with open(os.path.join(run_dir, 'log.csv')) as f:
        return list(csv.DictReader(f))


def _old_notes(card_path):
    if os.path.exists(card_path):
        with open(card_path) as f:
            return json.load(f).get('notes', '')
    return ''


def compare_norm_statistics(run_dir, model, label_dir):
    """Mean validation score of ``model`` on the run's held-out synthetic pairs with batch-norm
    running averages ('moving') and with each image's own statistics ('image')."""
    with open(os.path.join(run_dir, 'config.json')) as f:
        values = json.load(f)
    cfg = _config_of(values)
    cfg.val_maps = [os.path.join(label_dir, name) for name in cfg.val_maps]
    trainer = Trainer.for_sampling(cfg)
    pairs = trainer.validation_set()
    return {'moving': trainer.validate(model, pairs),
            'image': trainer.validate(nets.ImageStatistics(model), pairs)}


def export(run_dir, prefix, scores=None, notes=None, label_dir=None):
    """Write ``PREFIX.weights.h5`` (the weights of the last checkpoint) and the
    model card ``PREFIX.json`` (architecture, training run, devices, scores). ``notes``
    default: those of the card already at ``PREFIX.json`` (its scores are dropped: they were
    measured on other weights).

    With ``label_dir`` (where the run's held-out maps are), the card's
    ``input.norm_statistics`` is whichever batch-norm mode scores better on them."""
    with open(os.path.join(run_dir, 'config.json')) as f:
        cfg = json.load(f)
    config = _config_of(cfg)
    task, task_obj = config.task, TASKS[config.task](config)
    model = load_checkpoint(task_obj, os.path.join(run_dir, 'ckpt.keras'))
    with open(os.path.join(run_dir, 'state.json')) as f:
        state = json.load(f)
    os.makedirs(os.path.dirname(prefix) or '.', exist_ok=True)
    registration = hasattr(task_obj, 'network')     # the bare network is part of the model
    if registration:
        bare = task_obj.network()
        bare.set_weights(model.get_layer(bare.name).get_weights())
        architecture = {'type': bare.name, **cfg['task_options'].get('net', {})}
    else:
        bare = nets.unet(nets.UNetConfig.from_dict(cfg['unet']), name=model.name)
        bare.set_weights(model.get_weights())      # no optimizer state in the shipped file
        architecture = {'type': 'unet', **cfg['unet']}
    bare.save_weights(prefix + '.weights.h5')
    vals = [r for r in read_log(run_dir) if r['val_dice']]
    norm = compare_norm_statistics(run_dir, model, label_dir) if label_dir and not registration \
        else None
    card = {
        'model': os.path.basename(prefix),
        'architecture': architecture,
        'input': {'voxsize_mm': cfg['generator'].get('voxsize_mm', 1.0), 'orientation': 'LIA',
                  'intensity': 'robust min-max to [0, 1]', 'train_shape': cfg['shape'],
                  'norm_statistics': max(norm, key=norm.get) if norm else 'moving'},
        'task': cfg.get('task', 'synthseg'),
        'output_labels': list(cfg['out_labels']) if cfg.get('task', 'synthseg') == 'synthseg'
        else None,
        'target': cfg.get('task_options') or None,
        'training': {'steps': state['step'], 'hours': round(state['seconds'] / 3600, 2),
                     'batch_size': cfg['batch_size'], 'learning_rate': cfg['learning_rate'],
                     'loss': LOSS_NAMES.get(task, 'soft Dice + %.2g x cross-entropy'
                                            % cfg['ce_weight']),
                     'label_maps': cfg['label_maps'], 'held_out_maps': cfg['val_maps'],
                     'generator': cfg['generator'],
                     'device': describe_devices(state['devices']) if state.get('devices')
                     else device_description(),
                     'devices': state.get('devices'),
                     'validation_dice_synthetic': [(int(r['step']), float(r['val_dice']))
                                                   for r in vals],
                     'validation_by_norm_statistics': norm,
                     'finished': state.get('saved')},
        'scores': scores or {},
        'notes': notes if notes is not None else _old_notes(prefix + '.json'),
    }
    _atomic_json(card, prefix + '.json')
    return card


#: Brain structures merged into left/right regions for the affine overlap loss.
AFFINE_GROUPS = ((2, 3), (41, 42), (4, 5, 14, 15, 43, 44), (7, 8), (46, 47),
                 (10, 11, 12, 13, 17, 18, 26, 28), (49, 50, 51, 52, 53, 54, 58, 60), (16,), (24,))

_BAND_LOSS = 'MSE of the signed distance within the band + mean squared wrong-side excess ' \
    'beyond it'
LOSS_NAMES = {
    'synthstrip': _BAND_LOSS,
    'synthstrip_nocsf': _BAND_LOSS,
    'synthmorph_affine': '1 - soft Dice of the label maps moved by the fitted affine + '
                         'coord_weight x mean squared source-point distance (mm^2)',
    'synthmorph_deform': '(1 - lambda) (1 - soft Dice of the moved label maps + coord_weight x '
                         'mean source-point distance (mm) over labelled voxels) + '
                         'lambda mean |grad v|^2 + match_weight x cross-entropy of the cost volume '
                         'against the true matches, lambda ~ U(0, 1) per step'}


def preset(task, maps):
    """The TrainConfig of a shipped model, from the sorted training label map paths (the last
    two are held out for validation)."""
    if len(maps) < 3:
        raise ValueError('need at least 3 label maps, got %d' % len(maps))
    maps = sorted(maps)
    common = dict(label_maps=maps[:-2], val_maps=maps[-2:])
    if task == 'synthseg':
        # 2 mm voxels, so that one 96^3 crop holds the whole brain: on 2 CPU cores this learns
        # far faster per hour than 1 mm crops of a third of the brain
        return TrainConfig(**common, generator={'voxsize_mm': 2.0,
                                                'translation_range_mm': (-20.0, 20.0)})
    if task in ('synthstrip', 'synthstrip_nocsf'):
        # synthstrip_nocsf: extracerebral CSF counts as outside (mri_synthstrip --no-csf)
        return TrainConfig(
            **common, task=task, task_options={'csf': task == 'synthstrip', 'band_mm': 8.0},
            unet=nets.UNetConfig(out_channels=1, final_activation='linear',
                                 features=8).to_dict(),
            generator={'voxsize_mm': 2.0, 'translation_range_mm': (-30.0, 30.0),
                       'strip_prob': 0.1, 'fov_prob': 0.15})
    if task == 'synthmorph_affine':
        # 3 mm voxels, 64^3 (192 mm): pairs of whole or skull-stripped heads, each with its own
        # random affine (up to 30 degrees and 40 mm apart), no left/right flips
        return TrainConfig(
            **common, task=task, shape=(64, 64, 64), learning_rate=5e-4, val_every=200,
            task_options={'net': {'features': [16, 32, 32, 32], 'out_features': 32,
                                  'out_level': 1},
                          'label_groups': AFFINE_GROUPS, 'coord_weight': 0.02},
            generator={'voxsize_mm': 3.0, 'flip_prob': 0.0, 'scaling_range': (0.85, 1.15),
                       'rotation_range_deg': (-15.0, 15.0), 'translation_range_mm': (-20.0, 20.0),
                       'strip_prob': 0.5, 'fov_prob': 0.05})
    if task == 'synthmorph_deform':
        # 2 mm voxels, 64^3 (128 mm) crops of roughly affine-aligned pairs with nonlinear
        # differences (5 mm SVF std per image); a Siamese correlation network (shifts up to
        # +-8 mm on its 4 mm grid); 20 % random shapes, 30 % same-contrast pairs; the dense
        # correspondence term is the mean end-point error in mm (bounded gradient; voxels mapped
        # outside the grid are not left out, which made the squared version diverge)
        return TrainConfig(
            **common, task=task, shape=(64, 64, 64), learning_rate=5e-4, val_every=200,
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
    raise ValueError('unknown task %r (known: %s)' % (task, ', '.join(TASKS)))
