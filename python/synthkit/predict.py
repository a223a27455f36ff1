"""Running trained networks on whole scans: tiled prediction with left/right flip averaging,
and moving network-grid outputs to the output grid."""

import numpy as np
from scipy import ndimage

from . import geometry


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
    index given probability one (e.g. background), or a sequence of per-channel values. Sizes
    must be multiples of ``divisor``.
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
    out = geometry.resample(post, src_box_affine, tuple(hi - lo), dst_affine @ shift, 'linear',
                            fill=0)
    total = out.sum(-1, keepdims=True)
    outside = total[..., 0] <= 0            # beyond the source box: background
    out[outside, 0] = 1
    total[outside] = 1
    out /= total
    return out, tuple(slice(a, b) for a, b in zip(lo, hi))


def largest_component(mask):
    """The largest connected component of a boolean mask (the mask itself if it has one)."""
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == np.argmax(sizes)
