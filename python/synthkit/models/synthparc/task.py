"""Training task of the cortical parcellation network (``mri_synthseg --parc``): a synthetic
image and the cortex of each hemisphere -> the 68 Desikan-Killiany parcels (plus 'elsewhere').

Training data: FreeSurfer subjects (``aparc+aseg.mgz``, with ``T1.mgz`` for the head outside the
brain). The generator paints the aseg with the parcels folded back into the cortex of their
hemisphere (3 / 42), so the cortex is one tissue with one random intensity: the network must
tell parcels by shape and position, never by contrast. The target is the subject's parcel map
sampled at the very points the synthetic image was sampled from (hemispheres swapped when the
generator mirrored the example), extended from the cortex over a band of ``band_mm`` around it
(every band voxel takes the parcel of its nearest cortex voxel): the first network's cortex is
never exactly FreeSurfer's, and the parcel field must be defined wherever it may put cortex.

The cortex the network is given is the deformed cortex label of each hemisphere, randomly
grown by a voxel, holed and blurred, so that it tolerates the errors of the first network,
whose cortex posteriors it gets at inference.
"""

import dataclasses
import functools
import os

import numpy as np
from keras import ops
from scipy import ndimage

from ... import labels as lab
from ... import losses, metrics, nets
from ... import generator as gen
from ...task import Options, Task, TrainConfig, resolve_subject, subjects_beside

#: Channel labels of the network: 0 (not within the band around the cortex), then the parcels.
CHANNEL_LABELS = (0,) + lab.PARCEL_LABELS
N_SIDE = len(lab.PARCEL_LABELS) // 2

#: parcel code (channel index) -> the code of the same parcel in the other hemisphere
SWAP_CODES = lab.lr_swap_table(CHANNEL_LABELS).astype(np.uint8)

#: files a training subject needs
SUBJECT_FILES = ('aparc+aseg.mgz', 'T1.mgz')


def parcel_codes(aparc):
    """Channel index (uint8) of every voxel of an aparc+aseg map: 1..68 on the parcels, 0
    elsewhere (the 'unknown' cortex 1000/2000 included)."""
    table = np.zeros(2 ** 16, np.uint8)
    for i, label in enumerate(lab.PARCEL_LABELS):
        table[label] = i + 1
    return table[np.asarray(aparc).astype(np.int64).clip(0, 2 ** 16 - 1)]


def fold_cortex(aparc):
    """The aseg of an aparc+aseg map: cortical parcels (1000-1035, 2000-2035) become the
    cortex of their hemisphere (3, 42)."""
    out = np.asarray(aparc).astype(np.int32)
    out[(out >= 1000) & (out < 2000)] = 3
    out[(out >= 2000) & (out < 3000)] = 42
    return out


def parcel_field(codes, band_mm=4.0):
    """Parcel codes extended over a band of ``band_mm`` (1 mm voxels) around the parcels: each
    voxel within the band takes the code of its nearest parcel voxel (uint8, 0 outside)."""
    codes = np.asarray(codes, np.uint8)
    out = np.zeros_like(codes)
    found = ndimage.find_objects((codes > 0).astype(np.int8))
    if not found:
        return out
    m = int(np.ceil(band_mm)) + 1
    box = tuple(slice(max(s.start - m, 0), s.stop + m) for s in found[0])
    sub = codes[box]
    dist, idx = ndimage.distance_transform_edt(sub == 0, return_indices=True)
    field = sub[tuple(idx)]
    field[dist > band_mm] = 0
    out[box] = field
    return out


def load_subject(path, band_mm=4.0):
    """``(generation labels int16, parcel field uint8)`` of a FreeSurfer subject folder: its
    aparc+aseg with the cortex folded (and the head outside the brain given generation labels
    from its T1, as SynthSR's subjects), and the band-extended parcel codes."""
    import nibabel as nib
    from ..synthsr.task import subject_generation_labels
    aparc = nib.load(os.path.join(path, 'aparc+aseg.mgz'))
    t1 = nib.load(os.path.join(path, 'T1.mgz'))
    if aparc.shape != t1.shape or not np.allclose(aparc.affine, t1.affine, atol=1e-3):
        raise ValueError('%s: aparc+aseg.mgz and T1.mgz are not on one grid' % path)
    data = np.asarray(aparc.dataobj)
    labels = subject_generation_labels(np.asarray(t1.dataobj), fold_cortex(data))
    return labels, parcel_field(parcel_codes(data), band_mm)


def perturb_cortex(mask, rng, grow_prob=0.3, hole_prob=0.3, max_sigma=0.7):
    """A cortex mask (X, Y, Z) as the first network might find it: with ``grow_prob`` grown by
    one voxel, with ``hole_prob`` holed where a smooth random field is high (up to ~20% of
    it), then blurred by a Gaussian of up to ``max_sigma`` voxels (float32 in [0, 1])."""
    m = np.asarray(mask, bool)
    if rng.random() < grow_prob:
        m = ndimage.binary_dilation(m)
    if rng.random() < hole_prob and m.any():
        coarse = rng.normal(size=[max(2, n // 8) for n in m.shape])
        field = ndimage.zoom(coarse, [n / c for n, c in zip(m.shape, coarse.shape)], order=1)
        field = field[tuple(slice(0, n) for n in m.shape)]
        m = m & (field < np.quantile(field[m], 1 - rng.uniform(0.0, 0.2)))
    out = m.astype(np.float32)
    sigma = rng.uniform(0, max_sigma)
    return np.clip(ndimage.gaussian_filter(out, sigma), 0, 1) if sigma > 0.1 else out


@dataclasses.dataclass
class ParcOptions(Options):
    band_mm: float = 4.0           # the parcel field reaches this far around the cortex


class ParcellationTask(Task):
    """Inputs: image, left and right cortex; target: parcel codes (one-hot, 69 channels); loss:
    soft Dice + CE; score: mean Dice of the parcels over the deformed cortex."""
    name = 'synthparc'
    Options = ParcOptions
    custom_objects = losses.CUSTOM_OBJECTS

    @classmethod
    def preset(cls, maps):
        """Training subjects: the FreeSurfer subjects of ``fs_subjects/`` beside the label maps'
        folder that have an aparc+aseg; the last, sorted, is held out."""
        subjects = subjects_beside(maps, SUBJECT_FILES)
        if len(subjects) < 2:
            raise ValueError('need at least 2 FreeSurfer subjects with %s beside the label maps, '
                             'found %d' % (' and '.join(SUBJECT_FILES), len(subjects)))
        return TrainConfig(
            label_maps=subjects[:-1], val_maps=subjects[-1:], task=cls.name,
            out_labels=CHANNEL_LABELS,
            unet=nets.UNetConfig(in_channels=3, out_channels=len(CHANNEL_LABELS)).to_dict(),
            # 2 mm voxels like SynthSeg's network grid (parcels are large; the whole brain fits)
            generator={'voxsize_mm': 2.0, 'translation_range_mm': (-20.0, 20.0)},
            val_pairs=4, val_every=250)

    # -------------------------------------------------------------------------------- data
    def make_bank(self, paths):
        return gen.LabelMapBank([resolve_subject(p) for p in paths],
                                loader=functools.partial(load_subject, band_mm=self.opts.band_mm))

    def sample(self, sampler, bank, rng, n):
        maps, idx = bank.batch(n, rng)
        out = sampler(maps)
        image = np.asarray(out['image'])
        labels = np.asarray(out['labels'])[..., 0]
        coords = np.asarray(out['coords'])
        flips = np.asarray(out['flips']).reshape(-1)
        xs, codes, cortex = [], [], []
        for b, i in enumerate(idx):
            c = ndimage.map_coordinates(bank.images[i], np.moveaxis(coords[b], -1, 0), order=0,
                                        mode='constant').astype(np.uint8)
            if flips[b] > 0.5:
                c = SWAP_CODES[c]
            c[labels[b] == 0] = 0                      # outside the head or the field of view
            lh, rh = labels[b] == 3, labels[b] == 42
            xs.append(np.stack([image[b, ..., 0], perturb_cortex(lh, rng),
                                perturb_cortex(rh, rng)], -1))
            codes.append(c)
            cortex.append(lh | rh)
        return np.stack(xs).astype(np.float32), (np.stack(codes), np.stack(cortex))

    def encode(self, target):
        codes = target[0] if isinstance(target, tuple) else target
        return ops.one_hot(ops.convert_to_tensor(codes, 'int32'), len(CHANNEL_LABELS))

    def loss(self):
        return losses.DiceCELoss(self.cfg.ce_weight)

    def score(self, pred, target):
        """Mean Dice of the parcels present, over the deformed cortex (the argmax among the
        parcel channels)."""
        codes, cortex = target
        seg = np.argmax(np.asarray(pred)[..., 1:], axis=-1) + 1
        seg = np.where(cortex, seg, 0)
        ref = np.where(cortex, codes, 0)
        present = [k for k in range(1, len(CHANNEL_LABELS)) if (ref == k).any()]
        return float(np.nanmean(metrics.dice_per_label(seg, ref, present))) if present else 0.0

    # -------------------------------------------------------------------------- model card
    def output_labels(self):
        return list(CHANNEL_LABELS)

    def loss_description(self):
        return ('soft Dice + %.2g x cross-entropy over the parcels extended %.3g mm around the '
                'cortex; validation score: mean parcel Dice over the cortex'
                % (self.cfg.ce_weight, self.opts.band_mm))
