"""Training task of the SynthStrip network: synthetic head image -> signed distance (mm) to the
brain boundary."""

import dataclasses

import keras
import numpy as np
from keras import ops

from ... import labels as lab
from ... import metrics, nets
from ...task import Options, Task, TrainConfig


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


@dataclasses.dataclass
class DistanceOptions(Options):
    csf: bool = True          # extracerebral CSF counts as brain (mri_synthstrip without --no-csf)
    band_mm: float = 5.0      # the loss's band around the boundary; targets are clipped at twice it


class DistanceTask(Task):
    """Target: signed distance (mm) to the brain boundary of the deformed label map, clipped;
    loss: MSE inside the band; score: Dice of the masks (distance < 0)."""
    name = 'synthstrip'
    Options = DistanceOptions
    custom_objects = {'BandMSELoss': BandMSELoss}
    csf = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.inside = brain_labels(with_csf=self.opts.csf)
        self.band = float(self.opts.band_mm)
        self.voxsize = float(cfg.generator.get('voxsize_mm', 1.0))

    @classmethod
    def preset(cls, maps):
        return TrainConfig(
            **cls.split(maps), task=cls.name,
            task_options={'csf': cls.csf, 'band_mm': 8.0},
            unet=nets.UNetConfig(out_channels=1, final_activation='linear',
                                 features=8).to_dict(),
            generator={'voxsize_mm': 2.0, 'translation_range_mm': (-30.0, 30.0),
                       'strip_prob': 0.1, 'fov_prob': 0.15})

    def target(self, labels):
        return np.stack([signed_distance(l[..., 0], self.inside, self.voxsize,
                                         clip_mm=2 * self.band)
                         for l in labels])[..., None]

    def loss(self):
        return BandMSELoss(self.band)

    def score(self, pred, target):
        return float(metrics.dice(pred[..., 0] < 0, target[..., 0] < 0))

    def loss_description(self):
        return 'MSE of the signed distance within the band + mean squared wrong-side excess ' \
            'beyond it'


class NoCSFDistanceTask(DistanceTask):
    """:class:`DistanceTask` where extracerebral CSF counts as outside (``mri_synthstrip
    --no-csf``)."""
    name = 'synthstrip_nocsf'
    csf = False
