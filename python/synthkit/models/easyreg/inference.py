"""EasyReg: segmentation-driven symmetric registration of two scans of any contrast.

1. Both scans' SynthSeg segmentations give the world centroids of the structures present in both;
   a robust least-squares fit (iteratively reweighted, Tukey's biweight) of the floating
   centroids to the reference ones, and of the reference ones to the floating ones, gives the
   affine ``A`` (floating RAS -> reference RAS) as their log-domain average:
   ``A = expm((logm(A_fr) - logm(A_rf)) / 2)``, so swapping the scans gives exactly ``inv(A)``.
2. Both scans go into the affine mid-space (``H = A^(1/2)`` takes the floating scan there,
   ``inv(H)`` the reference), where the SynthMorph deformable network finds a symmetric SVF: its
   velocity is half the difference of the two orders' predictions, so the forward field
   (reference -> floating) and the backward one are ``exp(v)`` and ``exp(-v)``, exact inverses.
   The network sees either the scans themselves, masked to the segmented head (``'image'``), or
   contrast-free renderings of the two segmentations (``'seg'``: one fixed T1-like intensity per
   structure, blurred by half a voxel).

Directions follow :mod:`synthkit.transforms`: the forward transform moves the floating image onto
the reference grid (moving = floating, fixed = reference); the backward one the other way.
"""

import numpy as np
from scipy import linalg, ndimage

from ... import transforms

#: T1-like intensities (0-255) of the aseg structures for the 'seg' rendering; labels not listed
#: (CSF-like or unknown ones) get CSF's.
RENDER_T1 = {0: 0, 2: 110, 41: 110, 3: 70, 42: 70, 4: 25, 43: 25, 5: 25, 44: 25, 14: 25,
             15: 25, 24: 35, 7: 100, 46: 100, 8: 75, 47: 75, 10: 85, 49: 85, 11: 80, 50: 80,
             12: 82, 51: 82, 13: 95, 52: 95, 16: 100, 17: 68, 53: 68, 18: 72, 54: 72,
             26: 78, 58: 78, 28: 95, 60: 95, 31: 60, 63: 60, 77: 100, 85: 105}

MIN_STRUCTURES = 6      # structures present in both scans needed for an affine fit


class RegistrationError(ValueError):
    """The two scans cannot be registered (too few common structures, a reflection...)."""


def centroids(seg, affine, min_voxels=20):
    """``{label: (world centroid (3,), voxel count)}`` of every non-zero label of a label map
    with at least ``min_voxels`` voxels (slice by slice: no index arrays of the volume's size)."""
    seg = np.asarray(seg)
    if seg.dtype.kind not in 'iu':
        seg = np.rint(seg).astype(np.int64)
    seg = seg.astype(np.int64, copy=False)
    if seg.min() < 0:
        raise RegistrationError('segmentation has negative labels')
    n = int(seg.max()) + 1
    count = np.zeros(n)
    sums = np.zeros((3, n))
    jj, kk = np.indices(seg.shape[1:], dtype=np.float64)
    for i in range(seg.shape[0]):
        s = seg[i].ravel()
        c = np.bincount(s, minlength=n)
        count += c
        sums[0] += i * c
        sums[1] += np.bincount(s, jj.ravel(), minlength=n)
        sums[2] += np.bincount(s, kk.ravel(), minlength=n)
    out = {}
    for label in np.flatnonzero(count >= min_voxels):
        if label == 0:
            continue
        vox = sums[:, label] / count[label]
        out[int(label)] = (affine[:3, :3] @ vox + affine[:3, 3], float(count[label]))
    return out


def robust_affine(src, dst, weights, iterations=20):
    """4x4 matrix ``M`` with ``dst ~ M @ src`` (points (K, 3)) by iteratively reweighted least
    squares: Tukey's biweight on the residuals (scale 1.4826 x their weighted median, at least
    1 mm), times the given ``weights``. Returns ``(M, final weights)``."""
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    x = np.hstack([src, np.ones((len(src), 1))])
    w = np.asarray(weights, float).copy()
    robust = np.ones(len(src))
    for _ in range(iterations):
        sw = np.sqrt(w * robust)[:, None]
        sol, *_ = np.linalg.lstsq(x * sw, dst * sw, rcond=None)
        res = np.linalg.norm(x @ sol - dst, axis=1)
        scale = max(1.4826 * _weighted_median(res, w), 1.0)
        c = 4.685 * scale
        new = np.where(res < c, (1 - (res / c) ** 2) ** 2, 0.0)
        if np.count_nonzero(new) < 4:
            break
        done = np.allclose(new, robust, atol=1e-4)
        robust = new
        if done:
            break
    m = np.eye(4)
    m[:3] = sol.T
    return m, w * robust


def _weighted_median(values, weights):
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def matrix_power(m, p):
    """``m ** p`` for a 4x4 affine with positive determinant (real matrix logarithm)."""
    out = linalg.expm(p * _real_log(m))
    out[3] = [0, 0, 0, 1]
    return out


def symmetric_affine(ref_centroids, flo_centroids):
    """``(A, structures)``: the affine floating RAS -> reference RAS from two centroid maps
    (:func:`centroids`) and the labels used; swapping the arguments gives ``inv(A)`` (up to
    rounding). Raises :class:`RegistrationError` if fewer than :data:`MIN_STRUCTURES` structures
    are found in both scans or the fit is a reflection."""
    common = sorted(set(ref_centroids) & set(flo_centroids))
    if len(common) < MIN_STRUCTURES:
        raise RegistrationError('only %d structure(s) segmented in both scans (at least %d '
                                'needed): are both brain scans?' % (len(common), MIN_STRUCTURES))
    ref = np.array([ref_centroids[k][0] for k in common])
    flo = np.array([flo_centroids[k][0] for k in common])
    # bigger structures have better placed centroids; symmetric in the two scans
    w = np.array([(ref_centroids[k][1] * flo_centroids[k][1]) ** 0.25 for k in common])
    fwd, _ = robust_affine(flo, ref, w)
    bak, _ = robust_affine(ref, flo, w)
    for m in (fwd, bak):
        if np.linalg.det(m[:3, :3]) <= 0:
            raise RegistrationError('the structures imply a reflection (left and right swapped '
                                    'in one scan?)')
    a = linalg.expm((_real_log(fwd) - _real_log(bak)) / 2)
    a[3] = [0, 0, 0, 1]
    return a, common


def _real_log(m):
    log = linalg.logm(m)
    if np.iscomplexobj(log):
        if np.abs(log.imag).max() > 1e-6:
            raise RegistrationError('the affine transform has no real logarithm (a rotation '
                                    'of 180 degrees?)')
        log = log.real
    return log


def render(seg, sigma=0.5):
    """A contrast-free T1-like image of a label map (:data:`RENDER_T1`), blurred by ``sigma``
    voxels: what the deformable network sees in ``'seg'`` mode."""
    seg = np.asarray(seg)
    labels = np.rint(seg).astype(np.int64) if seg.dtype.kind == 'f' else seg.astype(np.int64)
    n = max(int(labels.max()) + 1, max(RENDER_T1) + 1)
    table = np.full(n, RENDER_T1[24], np.float32)
    for k, v in RENDER_T1.items():
        table[k] = v
    img = table[np.clip(labels, 0, n - 1)]
    return ndimage.gaussian_filter(img, sigma) if sigma else img


def head_masked(data, seg_on_data, dilate=3):
    """``data`` (3-D) zeroed outside the segmented head (labels > 0, dilated by ``dilate``
    voxels); ``seg_on_data``: the segmentation on the image's grid."""
    mask = np.asarray(seg_on_data) > 0
    if dilate:
        mask = ndimage.binary_dilation(mask, iterations=dilate)
    return np.where(mask, data, 0).astype(np.float32)


class EasyReg:
    """Registration of two segmented scans: ``deform_model`` is SynthMorph's deformable model
    ``(weights path, card)``, or None for affine registration only."""

    def __init__(self, deform_model=None):
        self.registrar = None
        if deform_model is not None:
            from ..synthmorph.inference import Registrar
            self.registrar = Registrar(deform_model=deform_model)

    def register(self, ref, flo, ref_seg, flo_seg, mode='image', lam=0.5, steps=7, fine_mm=None,
                 iterations=100, progress=None):
        """``(forward, backward, A)``: :class:`transforms.Transform` s floating -> reference
        grid and back (displacement fields, or matrices without a deformable model), and the
        affine matrix. ``ref``/``flo``: ``(data, affine)`` of the images; ``ref_seg``/``flo_seg``
        their segmentations ``(labels, affine)``, on any grid."""
        say = progress or (lambda msg: None)
        a, used = symmetric_affine(centroids(*ref_seg), centroids(*flo_seg))
        say('affine from the centroids of %d structures' % len(used))
        ref_geom = transforms.Geometry(ref[0].shape[:3], ref[1])
        flo_geom = transforms.Geometry(flo[0].shape[:3], flo[1])
        if self.registrar is None:
            fwd = transforms.Transform(matrix=a, source=flo_geom, target=ref_geom)
            return fwd, fwd.inverse(), a
        from ..synthmorph.inference import warp_to_world
        half = matrix_power(a, 0.5)           # floating RAS -> mid-space
        to_mid = np.linalg.inv(half)          # reference RAS -> mid-space
        if mode == 'seg':
            moving, fixed = (render(flo_seg[0]), flo_seg[1]), (render(ref_seg[0]), ref_seg[1])
        elif mode == 'image':
            moving = (head_masked(flo[0], _on_grid(flo_seg, flo)), flo[1])
            fixed = (head_masked(ref[0], _on_grid(ref_seg, ref)), ref[1])
        else:
            raise ValueError("mode must be 'seg' or 'image', got %r" % (mode,))
        u, u_inv, shape, grid = self.registrar.deformation(
            moving, (fixed[0], to_mid @ fixed[1]), half, lam, steps, inverse=True,
            fine_mm=fine_mm, iterations=iterations, progress=say)
        fwd = transforms.Transform(
            disp=warp_to_world(u, grid, ref_geom.shape, ref[1], pre=to_mid, post=to_mid),
            source=flo_geom, target=ref_geom)
        bak = transforms.Transform(
            disp=warp_to_world(u_inv, grid, flo_geom.shape, flo[1], pre=half, post=half),
            source=ref_geom, target=flo_geom)
        return fwd, bak, a


def _on_grid(seg, image):
    """A label map ``(labels, affine)`` resampled (nearest) onto an image's grid."""
    labels, affine = seg
    data, img_affine = image
    if labels.shape[:3] == data.shape[:3] and np.allclose(affine, img_affine, atol=1e-4):
        return labels
    t = transforms.Transform(matrix=np.eye(4), target=transforms.Geometry(data.shape[:3],
                                                                          img_affine))
    return transforms.apply(t, (np.asarray(labels), affine), method='nearest')[0]


def coordinates_from_transform(transform):
    """FreeSurfer EasyReg's field format of a transform: (X, Y, Z, 3) float32 on its target
    grid, the *absolute* RAS mm position in the source (moving) image of each voxel."""
    warp = transform.as_warp()
    return (warp.disp + _world_grid(warp.target)).astype(np.float32)


def transform_from_coordinates(coords, affine, path=None):
    """The :class:`transforms.Transform` (a displacement field) of an EasyReg coordinate field
    ``coords`` (X, Y, Z, 3) on the grid ``affine``."""
    coords = np.asarray(coords, np.float32)
    geom = transforms.Geometry(coords.shape[:3], affine, path or '')
    return transforms.Transform(disp=coords - _world_grid(geom), target=geom, path=path)


def _world_grid(geom):
    out = np.empty(tuple(geom.shape) + (3,), np.float32)
    a = np.asarray(geom.affine, np.float64)
    jk = np.indices(geom.shape[1:], dtype=np.float64)
    for i in range(geom.shape[0]):
        pts = a[:3, 0:1, None] * i + a[:3, 1:2, None] * jk[0] + a[:3, 2:3, None] * jk[1] \
            + a[:3, 3:4, None]
        out[i] = np.moveaxis(pts, 0, -1)
    return out
