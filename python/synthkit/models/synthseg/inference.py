"""The SynthSeg pipeline on one scan: conform, network posteriors (flip-averaged), back to the
1 mm output grid, SynthSeg-style post-processing, hard labels, volumes and QC scores."""

import numpy as np
from scipy import ndimage

from ... import geometry, nets, predict
from ... import labels as lab
from ...cli import common
from ...predict import largest_component


class Segmentation:
    """One scan's result: ``hard`` labels on the 1 mm output grid ``grid`` (a Conformed whose
    data is the rescaled scan), posteriors ``post`` inside ``box`` of that grid."""

    def __init__(self, hard, post, box, grid):
        self.hard, self.post, self.box, self.grid = hard, post, box, grid


class Segmenter:
    """The loaded network and how to segment one scan with it."""

    def __init__(self, weights=None):
        path, card = common.find_model('synthseg', weights)
        self.model, self.cfg = nets.load_unet(path, card)
        self.labels = tuple(card['output_labels'])
        self.voxsize = float(card['input'].get('voxsize_mm', 1.0))
        self.card = card

    def posteriors(self, conformed, fast=False):
        """Raw posteriors (x, y, z, 33) float32 inside the brain's bounding box, and the box,
        on the network grid ``conformed``."""
        flip = None if fast else (0, lab.lr_swap_table(self.labels))   # LIA: axis 0 is L-R
        post = predict.predict_tiled(self.model, conformed.data, tile=144, overlap=16,
                                     divisor=self.cfg.divisor, flip=flip, dtype=np.float16,
                                     empty=self.labels.index(0))
        box = predict.brain_box(post, self.labels.index(0))
        return post[box].astype(np.float32), box

    def segment(self, data, affine, fast=False, crop=None):
        """Segment a 3-D array with its affine; ``crop`` (mm, 3 ints) analyses a centred box."""
        grid = geometry.conform((data, affine), voxsize=1.0, crop=crop, multiple=16)
        if self.voxsize == 1.0:
            net = grid
        else:
            net_crop = None if crop is None else [int(round(c / self.voxsize)) for c in crop]
            net = geometry.conform((data, affine), voxsize=self.voxsize, crop=net_crop,
                                   multiple=self.cfg.divisor * 2)
        post, box = self.posteriors(net, fast)
        if net is not grid:   # network space is coarser: posteriors go to 1 mm, linearly
            post, box = predict.resample_box(post, box, net.affine, grid.data.shape,
                                             grid.affine)
        if not fast:
            post = postprocess(post, self.labels)
        hard = np.zeros(grid.data.shape, np.int32)
        hard[box] = hard_segmentation(post, self.labels)
        return Segmentation(hard, post, box, grid)

    def full(self, post, box, shape):
        """Paste box posteriors into a full-size array (background 1 outside the box)."""
        full = np.zeros(tuple(shape) + (post.shape[-1],), np.float32)
        full[..., self.labels.index(0)] = 1
        full[box] = post
        return full


def postprocess(post, out_labels, smooth_sigma=0.5, threshold=0.25):
    """SynthSeg-style clean-up of posteriors (X, Y, Z, C) float32, in place (returns it).

    1. light Gaussian smoothing of each channel (``smooth_sigma`` voxels, 0 to skip);
    2. the brain (1 - background posterior > ``threshold``) keeps its largest connected
       component; posteriors outside it go to background;
    3. each topological class (a structure with its neighbours of the same hemisphere, e.g.
       left cerebral WM + cortex + ventricles) keeps its largest component; the class's
       posteriors elsewhere are zeroed;
    4. renormalize to sum to one.
    """
    post = np.asarray(post, np.float32)   # modified in place when already float32
    if smooth_sigma:
        for c in range(post.shape[-1]):
            post[..., c] = ndimage.gaussian_filter(post[..., c], smooth_sigma)
    out_labels = list(out_labels)
    bg = out_labels.index(0)
    brain = largest_component(1 - post[..., bg] > threshold)
    post[~brain] = 0
    post[~brain, bg] = 1
    classes = {}
    for c, label in enumerate(out_labels):
        t = lab.TOPOLOGY_CLASSES.get(label, 0)
        if t:
            classes.setdefault(t, []).append(c)
    for chans in classes.values():
        mask = post[..., chans].sum(-1) > threshold
        if not mask.any():
            continue
        box = ndimage.find_objects(mask.astype(np.int8))[0]
        drop = mask[box] & ~largest_component(mask[box])
        for c in chans:
            post[box + (c,)][drop] = 0
    total = post.sum(-1, keepdims=True)
    empty = total[..., 0] <= 0
    post[empty, bg] = 1
    total[empty] = 1
    return post / total


def hard_segmentation(post, out_labels):
    """Argmax of posteriors as aseg label values (int32)."""
    return np.asarray(out_labels, np.int32)[np.argmax(post, axis=-1)]


def volumes(post, out_labels, voxel_volume=1.0):
    """Soft volumes (mm^3) per label from posteriors: {label: volume}."""
    sums = post.reshape(-1, post.shape[-1]).sum(0, dtype=np.float64) * voxel_volume
    return {int(label): float(v) for label, v in zip(out_labels, sums)}


def qc_scores(post, out_labels):
    """Per QC group: mean posterior of the winning label over the voxels assigned to the group.

    A score near 1 means the network is confident about that group; low scores flag regions
    where the prediction is uncertain (poor contrast, artefacts, a failed segmentation). An
    absent group scores 0.
    """
    seg = hard_segmentation(post, out_labels)
    conf = post.max(-1)
    scores = {}
    for name, members in lab.QC_GROUPS:
        mask = np.isin(seg, members)
        scores[name] = float(conf[mask].mean()) if mask.any() else 0.0
    return scores
