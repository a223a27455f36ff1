"""Cortical parcellation of one scan on SynthSeg's network grid: the image and the cortex the
first network found -> parcel posteriors, flip-averaged with the hemispheres swapped."""

import numpy as np
from scipy import ndimage

from ... import predict, runtime
from ...layers.utils import sample_linear
from ... import labels as lab
from ...cli import common
from .task import CHANNEL_LABELS, N_SIDE

#: Blur of the hard cortex mask given to the network (2 mm voxels): the middle of the range the
#: training masks were blurred with (:func:`synthkit.models.synthparc.task.perturb_cortex`).
MASK_SIGMA = 0.35


class Parcellator:
    """The loaded parcellation network."""

    #: With --parc, the cortex posteriors are multiplied by this before the argmax of the 1 mm
    #: labels. FreeSurfer's aparc+aseg, which a parcellation is compared with, has the
    #: surface-based cortical ribbon, thicker than the volumetric cortex our training maps
    #: teach (OASIS asegs: best at 1.0). Chosen on the whole heads sub-01..06 (their aseg's
    #: cortex Dice 0.718 -> 0.770, mean Dice 0.744 -> 0.747 at 1.75; OASIS 0.796 -> 0.793),
    #: then measured on the held-out sub-07 (docs/mri_synthseg.md).
    cortex_weight = 1.75

    def __init__(self, weights=None, card=None, precision=None):
        path, card = (weights, card) if card is not None else \
            common.find_model('synthparc', weights)
        self.model, self.cfg = runtime.load_unet(path, card, precision)
        self.labels = tuple(card['output_labels'])
        if self.labels != CHANNEL_LABELS:
            raise common.ToolError('%s: not a Desikan-Killiany parcellation model (its card '
                                   'lists other output labels)' % path)
        self.voxsize = float(card['input'].get('voxsize_mm', 2.0))
        self.card = card

    def posteriors(self, image, left, right, flip=True):
        """Parcel posteriors (X, Y, Z, 69) float32 of ``image`` (X, Y, Z) on the network grid
        (LIA: axis 0 is left-right) with hard masks ``left`` / ``right`` of the cortex of each
        hemisphere; ``flip`` averages in the mirrored prediction (cortex masks and parcels of
        the two hemispheres swapped)."""
        x = np.stack([np.asarray(image, np.float32), _soft(left), _soft(right)], -1)
        shape = x.shape[:3]
        d = self.cfg.divisor
        x = np.pad(x, [(0, -n % d) for n in shape] + [(0, 0)])
        pred = predict.predict_tiled(self.model, x, tile=max(x.shape[:3]), divisor=d,
                                     flip=(0, lab.lr_swap_table(self.labels), [0, 2, 1])
                                     if flip else None)      # one tile: the box at 2 mm
        return pred[tuple(slice(0, n) for n in shape)]


def _soft(mask):
    return ndimage.gaussian_filter(np.asarray(mask, np.float32), MASK_SIGMA)


def _hemisphere(parcels, side):
    """(parcel labels, their channels of ``parcels`` (..., 69)) of hemisphere ``side`` (0:
    left, 1: right)."""
    sl = slice(side * N_SIDE, (side + 1) * N_SIDE)
    return lab.PARCEL_LABELS[sl], parcels[..., 1 + sl.start:1 + sl.stop]


def _shares(q):
    """Each parcel's share of its hemisphere's parcel posteriors ``q`` (..., 34), uniform
    where they are all zero."""
    q = np.asarray(q, np.float32)
    total = q.sum(-1, keepdims=True)
    return np.where(total > 0, q / np.maximum(total, 1e-12), 1.0 / N_SIDE)


def label_cortex(hard, hard_affine, parcels, parcels_affine):
    """Give every cortex voxel (3 / 42) of the label map ``hard`` (in place) the most likely
    parcel of its hemisphere, from the parcel posteriors ``parcels`` (x, y, z, 69) of a coarser
    grid (``parcels_affine``), interpolated (trilinear) at the cortex voxels only: the 1 mm
    parcel posteriors are never built. ``parcels`` and ``parcels_affine`` may be lists (several
    coarse grids): their interpolated posteriors are averaged (:class:`CortexVotes`)."""
    if not isinstance(parcels, (list, tuple)):
        parcels, parcels_affine = [parcels], [parcels_affine]
    votes = CortexVotes(hard, hard_affine)
    for q, affine in zip(parcels, parcels_affine):
        votes.add(q, affine)
    votes.finish()


class CortexVotes:
    """:func:`label_cortex` one coarse grid at a time (only one grid's parcel posteriors in
    memory): the cortex voxels of ``hard`` are found when made; :meth:`add` adds a grid's
    interpolated parcel posteriors at them, :meth:`finish` labels them (in place)."""

    def __init__(self, hard, hard_affine):
        self.hard, self.affine = hard, np.asarray(hard_affine, np.float64)
        self.sides = []                  # (voxel indices, their coordinates, summed votes)
        for cortex in (3, 42):
            idx = np.nonzero(hard == cortex)
            self.sides.append([idx, np.stack(idx).astype(np.float64), None]
                              if idx[0].size else None)

    def add(self, parcels, parcels_affine):
        t = np.linalg.inv(parcels_affine) @ self.affine
        for side, entry in enumerate(self.sides):
            if entry is None:
                continue
            v = _trilinear(_hemisphere(parcels, side)[1], t[:3, :3] @ entry[1] + t[:3, 3:4])
            entry[2] = v if entry[2] is None else entry[2] + v

    def finish(self):
        for side, entry in enumerate(self.sides):
            if entry is None or entry[2] is None:
                continue
            labels = np.asarray(lab.PARCEL_LABELS[side * N_SIDE:(side + 1) * N_SIDE], np.int32)
            self.hard[entry[0]] = labels[np.argmax(entry[2], axis=-1)]


def _trilinear(q, points):
    """``q`` (X, Y, Z, C) at ``points`` (3, N) in its voxel coordinates, trilinear, all
    channels at once (:func:`synthkit.layers.utils.sample_linear`: eight gathers instead of
    ``ndimage.map_coordinates`` once per channel) -> (N, C) float32; points beyond the first
    or last voxel centre take the edge's value (``map_coordinates``' mode 'nearest')."""
    edge = np.array(q.shape[:3])[:, None] - 1
    inside = np.clip(points, 0, edge).T.astype(np.float32)
    return np.asarray(sample_linear(np.asarray(q, np.float32)[None], inside[None]))[0]


def parcel_volumes(post, seg_labels, parcels, cortex_volumes, voxel_volume):
    """``{parcel: soft volume}``: on the network grid, each voxel's cortex posterior (``post``,
    channels ``seg_labels``) times the parcel's share of its hemisphere's parcel posteriors
    (``parcels``), in ``voxel_volume`` units, then rescaled so that each hemisphere's parcels
    add up to its cortex volume on the output grid (``cortex_volumes``: {3: v, 42: v})."""
    seg_labels = list(seg_labels)
    out = {}
    for side, cortex in enumerate((3, 42)):
        labels, q = _hemisphere(parcels, side)
        vol = (post[..., seg_labels.index(cortex), None] * _shares(q)).reshape(-1, N_SIDE).sum(
            0, dtype=np.float64) * voxel_volume
        if vol.sum() > 0:
            vol *= cortex_volumes[cortex] / vol.sum()
        out.update(zip(labels, vol.tolist()))
    return out


def split_cortex(part, seg_labels, parcels):
    """The posteriors of one part of the output (e.g. a slab) with each cortex channel split
    into its hemisphere's parcels in proportion to the parcel posteriors (for --post).

    ``part``: segmentation posteriors (..., 33) in the order of ``seg_labels``; ``parcels``:
    parcel posteriors (..., 69) on the same voxels. Returns (..., 31 + 68): the non-cortex
    channels of ``seg_labels`` in order, then :data:`synthkit.labels.PARCEL_LABELS`, so that
    the parcels' soft volumes add up to the cortex's. (The labels come from
    :func:`label_cortex`.)"""
    seg_labels = list(seg_labels)
    out = []
    for side, cortex in enumerate((3, 42)):
        _, q = _hemisphere(parcels, side)
        out.append(part[..., seg_labels.index(cortex), None] * _shares(q))
    keep = [c for c, label in enumerate(seg_labels) if label not in (3, 42)]
    return np.concatenate([part[..., keep]] + out, axis=-1)


def output_labels(seg_labels):
    """Channel labels of :func:`split_cortex`'s posteriors."""
    return tuple(label for label in seg_labels if label not in (3, 42)) + lab.PARCEL_LABELS
