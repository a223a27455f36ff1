"""Running trained networks on whole scans: tiled prediction with left/right flip averaging,
and moving network-grid outputs to the output grid."""

import os
import sys

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
    """Predict ``model`` on ``x`` (X, Y, Z), or (X, Y, Z, K) for a network of K input
    channels, in overlapping tiles; returns (X, Y, Z, C).

    Tiles of at most ``tile`` voxels per side overlap by ``overlap``; each tile's outer
    ``overlap // 2`` voxels are down-weighted where a neighbour covers them (a fully
    convolutional network is least reliable near its input's edges). Peak memory is set by
    ``tile`` and by the output (``dtype``, e.g. float16 for large scans), not by the network.
    ``flip=(axis, channel_permutation)`` also predicts each tile mirrored along ``axis`` and
    averages it in with its channels permuted (left/right label swap); a third element
    ``(axis, channel_permutation, input_permutation)`` also permutes the mirrored tile's input
    channels (e.g. posteriors given as inputs). Tiles whose input (its first channel) is
    all zero (outside the field of view or masked) are not run: they get ``empty``, a channel
    index given probability one (e.g. background), or a sequence of per-channel values. Sizes
    must be multiples of ``divisor``. ``x`` may also be an object with ``shape`` whose
    ``x[box]`` (3 slices) makes that tile's array when asked (e.g. inputs too large to hold
    whole: :class:`synthkit.models.synthsr.inference.TileInputs`).

    A model with a ``release`` method (:class:`synthkit.runtime.OpenVINOUNet`) frees its
    compiled programs when the scan is done: sub-07's whole head 1.90 -> 1.51 GB peak.
    """
    try:
        return _predict_tiles(model, x, tile, overlap, divisor, flip, dtype, empty, progress)
    finally:
        release = getattr(model, 'release', None)
        if release is not None:
            release()


def _predict_tiles(model, x, tile, overlap, divisor, flip, dtype, empty, progress):
    shape = tuple(x.shape[:3])
    if any(n % divisor for n in shape) or tile % divisor:
        raise ValueError('shape %s and tile %s must be multiples of %d' % (shape, tile, divisor))
    tile, grids = zip(*[_axis_tiles(n, tile, overlap, divisor) for n in shape])
    cast = to_float16 if np.dtype(dtype) == np.float16 else \
        (lambda a: np.asarray(a).astype(dtype, copy=False))
    if all(len(g) == 1 for g in grids):       # one tile: no weights, no accumulation
        whole = x if isinstance(x, np.ndarray) else x[tuple(slice(0, n) for n in shape)]
        return cast(_predict_one(model, whole, flip, empty))
    out = np.zeros(shape + (model.output_shape[-1],), dtype)
    weight = np.zeros(shape, np.float32)
    margin = overlap // 2
    boxes = [(a, b, c) for a in grids[0] for b in grids[1] for c in grids[2]]
    for start in (progress(boxes) if progress else boxes):
        sl = tuple(slice(s, s + t) for s, t in zip(start, tile))
        pred = _predict_one(model, x[sl], flip, empty)
        w = np.ones(tile, np.float32)
        for ax, (s, t, n) in enumerate(zip(start, tile, shape)):
            keep = np.ones(t, np.float32)
            if s > 0:
                keep[:margin] = 1e-3
            if s + t < n:
                keep[t - margin:] = 1e-3
            w *= keep.reshape([-1 if a == ax else 1 for a in range(3)])
        out[sl] += cast(pred * w[..., None])
        weight[sl] += w
    out /= weight[..., None].astype(dtype)
    return out


def to_float16(x):
    """``x`` as float16, its values smaller in magnitude than float16's least normal number
    (6.1e-5) set to zero: numpy converts subnormal float16 numbers (to and from float32) on a
    slow path, 10 to 40 times slower (a 256^3 scan's 33 SynthSeg posteriors, nine tenths of
    them tiny: 3.0 s against 0.66 s; and again at each reading). Done in blocks of 64k values
    (the temporaries stay in the cache): 0.18 s against 0.29 s for 180 MB of posteriors."""
    x = np.asarray(x, np.float32)
    out = np.empty(x.shape, np.float16)
    _to_float16_into(x, out)
    return out


def _to_float16_into(x, out, block=1 << 16):
    if x.ndim > 1 and not x.flags.c_contiguous:
        for i in range(x.shape[0]):           # out is C-contiguous: so is each out[i]
            _to_float16_into(x[i], out[i], block)
        return
    src, dst = x.reshape(-1), out.reshape(-1)
    buf = np.empty(min(block, src.size), np.float32)
    keep = np.empty(buf.size, bool)
    tiny = np.finfo(np.float16).tiny
    for i in range(0, src.size, block):
        c = src[i:i + block]
        b, k = buf[:c.size], keep[:c.size]
        np.abs(c, out=b)
        np.greater_equal(b, tiny, out=k)
        np.multiply(c, k, out=b)
        dst[i:i + block] = b


def _predict_one(model, x, flip=None, empty=0):
    """``model`` on one (X, Y, Z) array -> (X, Y, Z, C) float32, flip-averaged if ``flip``; an
    all-zero input is not run (``empty`` as in :func:`predict_tiled`)."""
    n_out = model.output_shape[-1]
    if not (x[..., 0] if x.ndim == 4 else x).any():
        pred = np.zeros(x.shape[:3] + (n_out,), np.float32)
        if np.ndim(empty):
            pred[:] = np.asarray(empty, np.float32)
        else:
            pred[..., empty] = 1
        return pred
    if flip is not None:
        program = _flip_program(model, flip)
        if program is not None:
            patch = x[None] if x.ndim == 4 else x[None, ..., None]
            return _writable(program(np.ascontiguousarray(patch))[0])
    patch = np.ascontiguousarray(x, np.float32)
    patch = patch[None] if x.ndim == 4 else patch[None, ..., None]
    pred = _writable(model.predict_on_batch(patch)[0])
    if flip is not None:
        axis, perm = flip[:2]
        mirrored = np.flip(patch, axis + 1)
        if len(flip) > 2 and flip[2] is not None:
            mirrored = mirrored[..., flip[2]]
        mirrored = np.ascontiguousarray(mirrored)
        del patch
        mirrored = np.flip(np.asarray(model.predict_on_batch(mirrored)[0], np.float32), axis)
        # channels permuted slab by slab: no whole permuted copy next to the two predictions
        for i in range(0, pred.shape[0], 8):
            pred[i:i + 8] += mirrored[i:i + 8][..., perm]
        del mirrored
        pred *= 0.5
    return pred


def _flip_program(model, flip):
    """The compiled flip-averaged prediction of ``model`` for ``flip``: its own
    ``flip_program`` (:class:`synthkit.runtime.OpenVINOUNet`), or for a Keras model (or a wrapper
    with ``model`` and ``training``: :class:`synthkit.nets.ImageStatistics`) on TensorFlow a graph;
    else None (then numpy flips the tile)."""
    in_perm = flip[2] if len(flip) > 2 else None
    own = getattr(model, 'flip_program', None)
    if own is not None:
        return own(flip[0], flip[1], in_perm)
    if 'keras' not in sys.modules:      # no Keras model can exist: do not import it (3 s)
        return None
    import keras
    net, training = (model, False) if isinstance(model, keras.Model) else \
        (getattr(model, 'model', None), getattr(model, 'training', None))
    if not isinstance(net, keras.Model) or training is None:
        return None
    from .backend import flip_predictor
    return flip_predictor(net, flip[0], flip[1], in_perm, training)


def _writable(a):
    """``a`` as a float32 array that can be written in place, copied only if it must be."""
    a = np.asarray(a, np.float32)
    return a if a.flags.writeable else a.copy()


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


def _axis_matrix(n_dst, n_src, scale, offset):
    """The (n_dst, n_src) float32 matrix of linear interpolation along one axis: destination
    voxel j lies at source voxel p = scale * j + offset, between floor(p) and floor(p) + 1 with
    linear weights; positions beyond the source's first and last voxel centres get zero rows
    (``ndimage``'s 'constant' mode). Dense, for BLAS: each axis is one matrix product, and
    upsample_slabs took half the time it did gathering the two neighbours of each voxel."""
    p = scale * np.arange(n_dst) + offset
    i0 = np.floor(p).astype(int)
    f = p - i0
    inside = (p >= -1e-6) & (p <= n_src - 1 + 1e-6)
    m = np.zeros((n_dst, n_src), np.float64)
    rows = np.arange(n_dst)[inside]
    np.add.at(m, (rows, np.clip(i0[inside], 0, n_src - 1)), 1 - f[inside])
    np.add.at(m, (rows, np.clip(i0[inside] + 1, 0, n_src - 1)), f[inside])
    return m.astype(np.float32)


def upsample_slabs(post, box, src_affine, dst_shape, dst_affine, slab=16, bg_channel=0):
    """Posteriors (x, y, z, C) in ``box`` of a coarse axis-aligned grid (``src_affine``), on the
    part of a finer grid ``(dst_shape, dst_affine)`` that the box covers, slab by slab along the
    last axis (each slab's planes then lie together in NIfTI and MGH files, which store x
    fastest: :class:`synthkit.io.FrameWriter`): yields ``(destination slices, posteriors)`` with
    at most ``slab`` planes each, so memory stays bounded whatever the output size. Trilinear
    (separable: both grids must have the same axes, as :func:`synthkit.geometry.conform_grid`
    makes them), zero beyond the box, renormalized to sum to one (background where nothing
    reaches).

    ``post``, ``box`` and ``src_affine`` may instead be lists, one entry per coarse grid (e.g.
    two samplings of one field of view, half a voxel apart): the slabs then cover all their
    boxes and hold the mean of the grids' posteriors where they overlap."""
    if not isinstance(post, (list, tuple)):
        post, box, src_affine = [post], [box], [src_affine]
    grids = [_CoarseGrid(p, b, a, dst_shape, dst_affine) for p, b, a in zip(post, box, src_affine)]
    grids = [g for g in grids if g.lo is not None]
    if not grids:
        return
    lo = np.min([g.lo for g in grids], axis=0)
    hi = np.max([g.hi for g in grids], axis=0)
    channels = grids[0].post.shape[-1]

    def make(region):
        out = np.zeros(tuple(np.subtract(region[1], region[0])) + (channels,), np.float32)
        for g in grids:
            g.add(out, *region)
        total = out.sum(-1, keepdims=True)
        outside = total[..., 0] <= 0
        out[outside, bg_channel] = 1
        total[outside] = 1
        out /= total
        return tuple(slice(a, b) for a, b in zip(*region)), out

    regions = [((lo[0], lo[1], z), (hi[0], hi[1], min(z + slab, hi[2])))
               for z in range(lo[2], hi[2], slab)]
    yield from ahead(make, regions, threads() - 1)


def threads():
    """The threads numpy work may use: OMP_NUM_THREADS (the tools' --threads sets it), else
    the CPU count, at most 4."""
    try:
        n = int(os.environ.get('OMP_NUM_THREADS') or os.cpu_count() or 1)
    except ValueError:
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def ahead(fn, items, workers):
    """``fn(item)`` for each of ``items`` (any iterable), in order, computed by ``workers``
    threads at most ``workers`` items ahead of the consumer (numpy releases the GIL in its
    array loops); no workers: in the caller's thread. Memory holds at most ``workers`` results
    besides the consumer's. upsample_slabs makes its slabs one ahead of the consumer (more was
    no faster on 2 cores and held 0.1-0.3 GB more); mri_synthseg refines them on all the
    threads (its consumer only stores the results)."""
    if workers < 1:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:                      # a consumer that stops early: no work left running
            for f in pending:
                f.cancel()


class _CoarseGrid:
    """The trilinear weights taking one coarse grid's posteriors in ``box`` to a finer grid, and
    the finer grid's voxels they reach (``lo``..``hi``; ``None`` when none)."""

    def __init__(self, post, box, src_affine, dst_shape, dst_affine):
        self.post = np.asarray(post)        # float32, or float16 (converted plane by plane)
        start = np.array([s.start for s in box], float)
        src_box = np.array(src_affine, float).copy()
        src_box[:3, 3] = src_box[:3, :3] @ start + src_box[:3, 3]
        vox = np.linalg.inv(src_box) @ dst_affine            # destination voxel -> box voxel
        lin = vox[:3, :3]
        if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6):
            raise ValueError('upsample_slabs needs grids with the same axes')
        scale, offset = np.diag(lin), vox[:3, 3]
        # the destination voxels whose position lies within one source voxel of the box
        lo = np.zeros(3, int)
        hi = np.array(dst_shape[:3], int)
        self.lo = self.hi = None
        for a in range(3):
            pos = scale[a] * np.arange(dst_shape[a]) + offset[a]
            inside = np.flatnonzero((pos > -1) & (pos < self.post.shape[a]))
            if inside.size == 0:
                return
            lo[a], hi[a] = inside[0], inside[-1] + 1
        self.lo, self.hi = lo, hi
        self.matrices = [_axis_matrix(hi[a] - lo[a], self.post.shape[a], scale[a],
                                      offset[a] + scale[a] * lo[a]) for a in range(3)]

    def add(self, out, region_lo, region_hi):
        """Add this grid's posteriors on the destination region ``[region_lo, region_hi)`` (3
        ints each; ``out`` its array) where the grid reaches."""
        a = np.maximum(self.lo, region_lo)
        b = np.minimum(self.hi, region_hi)
        if np.any(b <= a):
            return
        m = [self.matrices[k][a[k] - self.lo[k]:b[k] - self.lo[k]] for k in range(3)]
        needed = np.flatnonzero(m[2].any(0))                  # the coarse planes needed
        first, last = (needed[0], needed[-1] + 1) if needed.size else (0, 1)
        # the coarse planes first (a few, the matrix products' leading axis), then x, then y;
        # x: (z, x, y, C)
        x = np.array(np.moveaxis(self.post[:, :, first:last], 2, 0), np.float32, order='C')
        nz, nx, ny, c = len(m[2]), len(m[0]), len(m[1]), x.shape[-1]
        part = (m[2][:, first:last] @ x.reshape(last - first, -1)).reshape(nz, x.shape[1], -1)
        part = np.matmul(m[0], part)                                     # (z, x', y * C)
        part = np.matmul(m[1], part.reshape(nz * nx, x.shape[2], c))     # (z * x', y', C)
        dst = tuple(slice(a[k] - region_lo[k], b[k] - region_lo[k]) for k in range(3))
        out[dst] += part.reshape(nz, nx, ny, c).transpose(1, 2, 0, 3)


def largest_component(mask):
    """The largest connected component of a boolean mask (the mask itself if it has one)."""
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == np.argmax(sizes)
