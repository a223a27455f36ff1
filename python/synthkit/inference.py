"""Running trained networks on whole scans: tiled prediction, left/right flip averaging and
SynthSeg-style posterior post-processing."""

import numpy as np
from scipy import ndimage

from . import labels as lab


def _axis_tiles(n, tile, overlap, divisor):
    """(tile size, starts) covering ``n`` voxels with the fewest tiles of at most ~``tile``,
    overlapping by at least ``overlap``: k tiles are enlarged evenly rather than adding a
    k+1-th tile that would only cover a sliver."""
    if n <= tile:
        return n, [0]
    k = -(-(n - overlap) // (tile - overlap))
    size = -(-(n + (k - 1) * overlap) // k)
    size = min(n, -(-size // divisor) * divisor)
    return size, sorted({int(round(s)) for s in np.linspace(0, n - size, k)})


def predict_tiled(model, x, tile=144, overlap=16, divisor=8, flip=None, dtype=np.float32,
                  empty=0, progress=None):
    """Predict ``model`` on ``x`` (X, Y, Z) in overlapping tiles; returns (X, Y, Z, C).

    Tiles of at most ``tile`` voxels per side overlap by ``overlap``; each tile's outer
    ``overlap // 2`` voxels are down-weighted where a neighbour covers them (a fully
    convolutional network is least reliable near its input's edges). Peak memory is set by
    ``tile`` and by the output (``dtype``, e.g. float16 for large scans), not by the network.
    ``flip=(axis, channel_permutation)`` also predicts each tile mirrored along ``axis`` and
    averages it in with its channels permuted (left/right label swap). Tiles whose input is
    all zero (outside the field of view or masked) are not run: they get ``empty``, a channel
    index given probability one (e.g. background), or a sequence of per-channel values. Sizes must be multiples of ``divisor``.
    """
    shape = x.shape
    if any(n % divisor for n in shape) or tile % divisor:
        raise ValueError('shape %s and tile %s must be multiples of %d' % (shape, tile, divisor))
    tile, grids = zip(*[_axis_tiles(n, tile, overlap, divisor) for n in shape])
    out, weight = None, np.zeros(shape, np.float32)
    margin = overlap // 2
    boxes = [(a, b, c) for a in grids[0] for b in grids[1] for c in grids[2]]
    for start in (progress(boxes) if progress else boxes):
        sl = tuple(slice(s, s + t) for s, t in zip(start, tile))
        patch = x[sl][None, ..., None]
        if out is None:
            n_out = model.output_shape[-1]
            out = np.zeros(shape + (n_out,), dtype)
        if not patch.any():
            pred = np.zeros(tuple(tile) + (n_out,), np.float32)
            if np.ndim(empty):
                pred[:] = np.asarray(empty, np.float32)
            else:
                pred[..., empty] = 1
        else:
            pred = np.asarray(model.predict_on_batch(patch))[0]
        if flip is not None and patch.any():
            axis, perm = flip
            mirrored = np.asarray(model.predict_on_batch(np.flip(patch, axis + 1).copy()))[0]
            pred = 0.5 * (pred + np.flip(mirrored, axis)[..., perm])
        w = np.ones(tile, np.float32)
        for ax, (s, t, n) in enumerate(zip(start, tile, shape)):
            keep = np.ones(t, np.float32)
            if s > 0:
                keep[:margin] = 1e-3
            if s + t < n:
                keep[t - margin:] = 1e-3
            w *= keep.reshape([-1 if a == ax else 1 for a in range(3)])
        out[sl] += (pred * w[..., None]).astype(dtype)
        weight[sl] += w
    out /= weight[..., None].astype(dtype)
    return out


def brain_box(post, bg_channel=0, threshold=0.5, margin=4):
    """Slices of the bounding box (plus ``margin``) of voxels not predicted background."""
    mask = post[..., bg_channel] < threshold
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def resample_box(post, box, src_affine, dst_shape, dst_affine):
    """Resample box posteriors from a (coarser) source grid onto the part of a destination grid
    that the box covers (linear, channel by channel); returns (posteriors, destination box)."""
    from . import io
    start = np.array([s.start for s in box], float)
    stop = np.array([s.stop - 1 for s in box], float)
    corners = np.array([[a, b, c, 1] for a in (start[0], stop[0]) for b in (start[1], stop[1])
                        for c in (start[2], stop[2])]).T
    vox = (np.linalg.inv(dst_affine) @ src_affine @ corners)[:3]
    lo = np.clip(np.floor(vox.min(1)).astype(int), 0, dst_shape)
    hi = np.clip(np.ceil(vox.max(1)).astype(int) + 1, 0, dst_shape)
    shift = np.eye(4)
    shift[:3, 3] = start
    src_box_affine = src_affine @ shift
    shift = np.eye(4)
    shift[:3, 3] = lo
    out = io.resample(post, src_box_affine, tuple(hi - lo), dst_affine @ shift, 'linear', fill=0)
    total = out.sum(-1, keepdims=True)
    outside = total[..., 0] <= 0            # beyond the source box: background
    out[outside, 0] = 1
    total[outside] = 1
    out /= total
    return out, tuple(slice(a, b) for a, b in zip(lo, hi))


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


def largest_component(mask):
    """The largest connected component of a boolean mask (the mask itself if it has one)."""
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == np.argmax(sizes)


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
