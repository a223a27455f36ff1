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
    """Mean squared error of a signed distance map, only where the target is inside
    ``(-band_mm, band_mm)`` (SynthStrip: far from the boundary the value does not matter)."""

    def __init__(self, band_mm=5.0, name='band_mse', **kwargs):
        super().__init__(name=name, **kwargs)
        self.band_mm = band_mm

    def call(self, y_true, y_pred):
        w = ops.cast(ops.abs(y_true) < self.band_mm, y_pred.dtype)
        axes = tuple(range(1, len(y_pred.shape)))
        return ops.sum(w * ops.square(y_pred - y_true), axis=axes) / (ops.sum(w, axis=axes) + 1)

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


TASKS = {'synthseg': SegmentationTask, 'synthstrip': DistanceTask}
CUSTOM_OBJECTS = {'DiceCELoss': DiceCELoss, 'BandMSELoss': BandMSELoss}


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

    def _state(self):
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                return json.load(f)
        return {'step': 0, 'seconds': 0.0}

    def build_model(self):
        model = nets.unet(nets.UNetConfig.from_dict(self.cfg.unet), name=self.cfg.task + '_unet')
        model.compile(optimizer=keras.optimizers.Adam(self.cfg.learning_rate),
                      loss=self.task.loss())
        return model

    def _generator(self, step):
        params = gen.GeneratorParams.from_dict(self.cfg.generator)
        seed = self.cfg.seed * 100003 + step
        g = gen.SynthGenerator(self.cfg.shape, params, seed=seed)
        return gen.PairSampler(g, seed=seed), np.random.default_rng(seed)

    def _pairs(self, sampler, bank, rng, n):
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
        return float(np.mean([self.task.score(np.asarray(model.predict_on_batch(x)), t)
                              for x, t in pairs]))

    def run(self):
        cfg = self.cfg
        state = self._state()
        start = state['step']
        if start > 0 and os.path.exists(self.ckpt):
            model = keras.models.load_model(self.ckpt, custom_objects=CUSTOM_OBJECTS)
            print('resuming %s at step %d' % (self.run_dir, start), flush=True)
        elif self.init:
            model = self.build_model()
            model.load_weights(self.init + '.weights.h5')
            with open(self.init + '.json') as f:
                done = json.load(f)['training']
            start = int(done['steps'])
            state = {'step': start, 'seconds': 3600.0 * float(done['hours'])}
            print('starting %s from %s at step %d' % (self.run_dir, self.init, start), flush=True)
        else:
            model, start = self.build_model(), 0
        if start >= cfg.steps:
            return model
        bank = gen.LabelMapBank(cfg.label_maps)
        val = self.validation_set()
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
            x, t = self._pairs(sampler, bank, rng, cfg.batch_size)
            y = self.task.encode(t)
            loss = float(np.asarray(model.train_on_batch(x, y)))
            losses.append(loss)
            vd = ''
            if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                vd = '%.4f' % self.validate(model, val)
            if step % 10 == 0 or vd or step == cfg.steps:
                log.writerow([step, '%.4f' % np.mean(losses), '%.0f' % (seconds0 + time.time() - t0),
                              vd])
                logf.flush()
                losses = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss='%.3f' % loss, refresh=False)
            if time.time() - last_ckpt > 60 * cfg.checkpoint_minutes or step == cfg.steps:
                self.save(model, step, seconds0 + time.time() - t0)
                last_ckpt = time.time()
        logf.close()
        if bar is not None:
            bar.close()
        return model

    def save(self, model, step, seconds):
        tmp = self.ckpt + '.tmp.keras'
        model.save(tmp)
        os.replace(tmp, self.ckpt)
        _atomic_json({'step': step, 'seconds': seconds,
                      'saved': datetime.datetime.now().isoformat(timespec='seconds')},
                     self.state_path)


def read_log(run_dir):
    """Rows of a run's log.csv as dicts."""
    with open(os.path.join(run_dir, 'log.csv')) as f:
        return list(csv.DictReader(f))


def compare_norm_statistics(run_dir, model, label_dir):
    """Mean validation score of ``model`` on the run's held-out synthetic pairs with batch-norm
    running averages ('moving') and with each image's own statistics ('image')."""
    with open(os.path.join(run_dir, 'config.json')) as f:
        values = json.load(f)
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__})
    cfg.val_maps = [os.path.join(label_dir, name) for name in cfg.val_maps]
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.task = cfg, TASKS[cfg.task](cfg)
    pairs = trainer.validation_set()
    return {'moving': trainer.validate(model, pairs),
            'image': trainer.validate(nets.ImageStatistics(model), pairs)}


def export(run_dir, prefix, scores=None, notes='', label_dir=None):
    """Write ``PREFIX.weights.h5`` (the weights of the last checkpoint) and the
    model card ``PREFIX.json`` (architecture, training run, device, scores).

    With ``label_dir`` (where the run's held-out maps are), the card's
    ``input.norm_statistics`` is whichever batch-norm mode scores better on them."""
    model = keras.models.load_model(os.path.join(run_dir, 'ckpt.keras'),
                                    custom_objects=CUSTOM_OBJECTS)
    with open(os.path.join(run_dir, 'config.json')) as f:
        cfg = json.load(f)
    with open(os.path.join(run_dir, 'state.json')) as f:
        state = json.load(f)
    os.makedirs(os.path.dirname(prefix) or '.', exist_ok=True)
    bare = nets.unet(nets.UNetConfig.from_dict(cfg['unet']), name=model.name)
    bare.set_weights(model.get_weights())      # no optimizer state in the shipped file
    bare.save_weights(prefix + '.weights.h5')
    vals = [r for r in read_log(run_dir) if r['val_dice']]
    norm = compare_norm_statistics(run_dir, model, label_dir) if label_dir else None
    card = {
        'model': os.path.basename(prefix),
        'architecture': {'type': 'unet', **cfg['unet']},
        'input': {'voxsize_mm': cfg['generator'].get('voxsize_mm', 1.0), 'orientation': 'LIA',
                  'intensity': 'robust min-max to [0, 1]', 'train_shape': cfg['shape'],
                  'norm_statistics': max(norm, key=norm.get) if norm else 'moving'},
        'task': cfg.get('task', 'synthseg'),
        'output_labels': list(cfg['out_labels']) if cfg.get('task', 'synthseg') == 'synthseg'
        else None,
        'target': cfg.get('task_options') or None,
        'training': {'steps': state['step'], 'hours': round(state['seconds'] / 3600, 2),
                     'batch_size': cfg['batch_size'], 'learning_rate': cfg['learning_rate'],
                     'loss': ('soft Dice + %.2g x cross-entropy' % cfg['ce_weight']
                              if cfg.get('task', 'synthseg') == 'synthseg' else
                              'MSE of the signed distance within the band'),
                     'label_maps': cfg['label_maps'], 'held_out_maps': cfg['val_maps'],
                     'generator': cfg['generator'],
                     'device': '%s, %d CPU cores, Keras %s backend' % (
                         platform.processor() or platform.machine(), os.cpu_count(),
                         keras.backend.backend()),
                     'validation_dice_synthetic': [(int(r['step']), float(r['val_dice']))
                                                   for r in vals],
                     'validation_by_norm_statistics': norm,
                     'finished': state.get('saved')},
        'scores': scores or {},
        'notes': notes,
    }
    _atomic_json(card, prefix + '.json')
    return card


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
    if task == 'synthstrip':
        return TrainConfig(
            **common, task='synthstrip', task_options={'csf': True, 'band_mm': 8.0},
            unet=nets.UNetConfig(out_channels=1, final_activation='linear',
                                 features=8).to_dict(),
            generator={'voxsize_mm': 2.0, 'translation_range_mm': (-30.0, 30.0),
                       'strip_prob': 0.1, 'fov_prob': 0.15})
    raise ValueError('unknown task %r (known: %s)' % (task, ', '.join(TASKS)))
