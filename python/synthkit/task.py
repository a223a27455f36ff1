"""What a trainable model is: a :class:`Task` (its network, synthetic data, target, loss, score,
preset and model-card fields) configured by a :class:`TrainConfig`.

The :class:`synthkit.trainer.Trainer` runs any task; each model's task lives in its package
(``synthkit/models/<name>/task.py``) and is named in the registry :mod:`synthkit.models`. The
defaults here are those of a U-Net trained on single synthetic images from the shared generator
(SynthSeg, SynthStrip); a task overrides what differs (SynthMorph trains on pairs, and its model
computes its own loss).
"""

import dataclasses
import json
import os

import keras
import numpy as np

from . import generator as gen
from . import labels as lab
from . import nets


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
    # 'float32', or 'mixed_bfloat16': the networks compute in bfloat16 with float32 weights (the
    # generator and the losses stay float32); on a 2-core CPU with AMX a 3-D U-Net training
    # step took 0.43 s against 0.96 s, a whole SynthSR step 2.4 s against 3.4 s; on a CPU
    # without bfloat16 units it is slower (docs/training.md; trainer.bfloat16_hardware)
    precision: str = 'float32'

    def to_dict(self):
        d = dataclasses.asdict(self)
        d['label_maps'] = [os.path.basename(p) for p in self.label_maps]
        d['val_maps'] = [os.path.basename(p) for p in self.val_maps]
        return d

    @classmethod
    def from_dict(cls, values):
        """The config of a run's ``config.json`` values (older runs may lack newer fields)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in fields})


@dataclasses.dataclass
class Options:
    """Base of a task's options (``TrainConfig.task_options``): a dataclass whose fields are the
    options; unknown names are an error, not silently ignored."""

    @classmethod
    def from_dict(cls, values):
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError('unknown task option(s) %s (known: %s)'
                             % (', '.join(unknown), ', '.join(names) or 'none'))
        return cls(**values)

    def to_dict(self):
        return dataclasses.asdict(self)


class Task:
    """How one model is trained. Subclasses set ``name`` (the registry name) and ``Options``,
    and implement :meth:`preset`, :meth:`loss` and :meth:`target` (or override more).

    Data flow of one step: :meth:`stream` gives a compiled generator and a random stream;
    :meth:`sample` draws a raw batch ``(x, t)`` (small enough to pass between processes);
    :meth:`prepare` turns ``x`` into the model inputs and :meth:`encode` ``t`` into what the
    loss compares the output with. :meth:`validate` scores a model on fixed held-out pairs.
    """
    name = None
    Options = Options
    #: layer name of the bare network inside the training model (None: they are the same)
    network_layer = None
    #: export picks batch-norm statistics ('moving' or 'image') by the held-out score
    choose_norm_statistics = True
    #: Keras objects a checkpoint of this task needs to load
    custom_objects = {}

    def __init__(self, cfg):
        self.cfg = cfg
        self.opts = self.Options.from_dict(cfg.task_options)

    @classmethod
    def preset(cls, maps):
        """The TrainConfig of the shipped model from the sorted training label map paths."""
        raise NotImplementedError

    @staticmethod
    def split(maps):
        """``{'label_maps': ..., 'val_maps': ...}``: the last two of the sorted maps are held out
        for the validation score."""
        if len(maps) < 3:
            raise ValueError('need at least 3 label maps, got %d' % len(maps))
        maps = sorted(maps)
        return dict(label_maps=maps[:-2], val_maps=maps[-2:])

    # ------------------------------------------------------------------------------- model
    def network(self):
        """The bare network (what is shipped), freshly initialized."""
        return nets.unet(nets.UNetConfig.from_dict(self.cfg.unet), name=self.cfg.task + '_unet')

    def loss(self):
        raise NotImplementedError

    def build_model(self):
        """The compiled training model."""
        model = self.network()
        model.compile(optimizer=keras.optimizers.Adam(self.cfg.learning_rate), loss=self.loss())
        return model

    def load_init(self, model, weights, card=None):
        """Load shipped weights (a bare network's ``.weights.h5``) into the training model
        ``model`` (``--init``). When their ``card``'s U-Net has fewer features than this run's
        (``--set unet.features=N``), the network is widened (:func:`synthkit.nets.widen`): the
        run continues from the same function with more capacity."""
        net = self.network_layer
        net = model.get_layer(net) if net else model
        arch = (card or {}).get('architecture', {})
        mine = nets.UNetConfig.from_dict(self.cfg.unet)
        if arch.get('type') == 'unet' and arch.get('features', mine.features) != mine.features:
            theirs = nets.UNetConfig.from_dict(arch)
            narrow = nets.unet(theirs, name=net.name)
            nets.load_weights(narrow, weights)
            nets.widen(narrow, net, theirs, mine)
            print('widened %s from %d to %d features' % (weights, theirs.features,
                                                         mine.features), flush=True)
            return
        net.load_weights(weights)

    def load_checkpoint(self, path):
        """The training model of a checkpoint, optimizer state included."""
        return keras.models.load_model(path, custom_objects=self.custom_objects)

    def exported_network(self, model):
        """The bare network with the weights of training model ``model`` (no optimizer state)."""
        bare = nets.unet(nets.UNetConfig.from_dict(self.cfg.unet), name=model.name)
        bare.set_weights(model.get_weights())
        return bare

    # -------------------------------------------------------------------------------- data
    def make_bank(self, paths):
        """The in-memory training (or held-out) data of ``paths``."""
        return gen.LabelMapBank(paths)

    def training_bank(self, paths):
        """The training data of ``paths`` (what examples are drawn from; the held-out maps go
        through :meth:`make_bank` alone): by default the same."""
        return self.make_bank(paths)

    def make_sampler(self, seed):
        params = gen.GeneratorParams.from_dict(self.cfg.generator)
        return gen.PairSampler(gen.SynthGenerator(self.cfg.shape, params, seed=seed), seed=seed)

    def stream(self, step, worker=None):
        """(sampler, rng) of the stream that starts at ``step`` (of sampling process ``worker``,
        when several feed the training)."""
        seed = self.cfg.seed * 100003 + step
        if worker is not None:
            seed = int(np.random.SeedSequence((self.cfg.seed, step, worker)).generate_state(1)[0])
        return self.make_sampler(seed), np.random.default_rng(seed)

    def sample(self, sampler, bank, rng, n):
        """One raw batch ``(x, t)`` of ``n`` examples from label maps of ``bank``."""
        maps, _ = bank.batch(n, rng)
        out = sampler(maps)
        return np.asarray(out['image']), self.target(np.asarray(out['labels']))

    def target(self, labels):
        """The training target of deformed generation labels (B, X, Y, Z, 1)."""
        raise NotImplementedError

    def prepare(self, x):
        """Model inputs of a raw batch's ``x``."""
        return x

    def encode(self, target):
        """What the loss compares the model output with."""
        return target

    def batch(self, sampler, bank, rng, n, raw=False):
        """One batch ``(x, t)``, prepared unless ``raw`` (what sampling processes send)."""
        x, t = self.sample(sampler, bank, rng, n)
        return (x, t) if raw else (self.prepare(x), t)

    def validation_set(self):
        """Fixed synthetic pairs from the held-out maps (the same every time), or None."""
        if not self.cfg.val_maps:
            return None
        bank = self.make_bank(self.cfg.val_maps)
        sampler, _ = self.stream(10 ** 7)   # a stream training never reaches
        rng = np.random.default_rng(12345)
        return [self.batch(sampler, bank, rng, 1) for _ in range(self.cfg.val_pairs)]

    def score(self, pred, target):
        raise NotImplementedError

    def validate(self, model, pairs):
        """Mean :meth:`score` of ``model`` (anything with ``predict_on_batch``) on ``pairs``."""
        return float(np.mean([self.score(np.asarray(model.predict_on_batch(x)), t)
                              for x, t in pairs]))

    # -------------------------------------------------------------------------- model card
    def architecture(self):
        return {'type': 'unet', **self.cfg.unet}

    def output_labels(self):
        """The label value of each output channel, for tools that write label maps."""
        return None

    def loss_description(self):
        return 'soft Dice + %.2g x cross-entropy' % self.cfg.ce_weight


def subjects_beside(maps, required):
    """The FreeSurfer subject folders of ``fs_subjects/`` beside the label maps' folder (the
    shared data layout) that hold every file of ``required``, sorted; [] when there are none."""
    if not maps:
        return []
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(maps[0]))),
                        'fs_subjects')
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, s) for s in os.listdir(root)
                  if all(os.path.isfile(os.path.join(root, s, f)) for f in required))


def resolve_subject(path):
    """``path``, or where a subject named by a model card (``label_dir/sub-07``: cards keep
    base names) lies: in ``fs_subjects/`` beside the label maps' folder."""
    if os.path.exists(path):
        return path
    other = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), 'fs_subjects',
                         os.path.basename(path))
    return other if os.path.isdir(other) else path


def override(cfg, item, options_class=None):
    """Apply ``'KEY=JSON'`` to ``cfg`` in place: a TrainConfig field, or ``task_options.NAME``
    / ``generator.NAME`` for one entry of those dicts (a new dict, the preset is not shared).
    Names are checked: TrainConfig fields, generator parameters, and, given the task's
    ``options_class``, its options."""
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
        known = None
        if head == 'generator':
            known = [f.name for f in dataclasses.fields(gen.GeneratorParams)]
        elif head == 'task_options' and options_class is not None:
            known = [f.name for f in dataclasses.fields(options_class)]
        if known is not None and name not in known:
            raise ValueError('unknown %s entry %r (known: %s)' % (head, name,
                                                                  ', '.join(known) or 'none'))
        setattr(cfg, head, {**getattr(cfg, head), name: value})
    else:
        setattr(cfg, head, value)
