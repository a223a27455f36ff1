"""Training task of the SynthSeg network: synthetic image -> 33 segmentation channels."""

import numpy as np
from keras import ops

from ... import labels as lab
from ... import losses, metrics
from ...task import Options, Task, TrainConfig


class SegmentationTask(Task):
    """Target: the deformed label map as output channels; loss: soft Dice (+ CE); score: mean
    hard Dice over the labels present."""
    name = 'synthseg'
    Options = Options
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
