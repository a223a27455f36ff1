"""Training task of the SynthSeg network: synthetic image -> 33 segmentation channels."""

import dataclasses
import functools

import numpy as np
from keras import ops

from ... import generator as gen
from ... import labels as lab
from ... import losses, metrics
from ...task import Options, Task, TrainConfig


@dataclasses.dataclass
class SegmentationOptions(Options):
    # each training map also in variants whose ventricles are eroded by these radii (1 mm
    # voxels), the tissue around them taking their place (generator.shrink_structures): the
    # training maps' ventricles are large (lateral 4-31 cc) and the network over-segments
    # small ones (1.5x the lateral, 4-5x the inferior lateral ventricles of young heads)
    ventricle_erosion: tuple = ()


class SegmentationTask(Task):
    """Target: the deformed label map as output channels; loss: soft Dice (+ CE); score: mean
    hard Dice over the labels present."""
    name = 'synthseg'
    Options = SegmentationOptions
    custom_objects = losses.CUSTOM_OBJECTS

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lookup = lab.generation_lookup(cfg.out_labels)

    @classmethod
    def preset(cls, maps):
        # 2 mm voxels, so that one 96^3 crop holds the whole brain: on 2 CPU cores this learns
        # far faster per hour than 1 mm crops of a third of the brain
        return TrainConfig(**cls.split(maps), generator={'voxsize_mm': 2.0,
                                                         'translation_range_mm': (-20.0, 20.0)})

    def training_bank(self, paths):
        radii = [int(r) for r in self.opts.ventricle_erosion]
        if not radii:
            return self.make_bank(paths)
        read = functools.lru_cache(maxsize=1)(lambda path: gen.load_label_map(path)[0])

        def load(item):          # a map's variants come one after another: read it once
            path, radius = item
            return gen.shrink_structures(read(path), radius), None
        return gen.LabelMapBank([(p, r) for p in paths for r in [0] + radii], loader=load)

    def target(self, labels):
        return self.lookup[labels[..., 0]]

    def encode(self, target):
        return ops.one_hot(target, len(self.cfg.out_labels))

    def loss(self):
        return losses.DiceCELoss(self.cfg.ce_weight)

    def score(self, pred, target):
        seg = np.argmax(pred, axis=-1)
        present = [k for k in range(1, len(self.cfg.out_labels)) if (target == k).any()]
        return float(np.nanmean(metrics.dice_per_label(seg, target, present)))

    def output_labels(self):
        return list(self.cfg.out_labels)
