"""Overlap and distance measures between label maps and masks, and image similarity (numpy),
shared by training validation, the tools' tests and the benchmark scripts."""

import numpy as np
from scipy import ndimage


def dice(a, b):
    """Dice of two boolean masks (NaN when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / s if s else float('nan')


def dice_per_label(a, b, labels):
    """Dice per label between integer maps ``a`` and ``b``, as an array in the order of
    ``labels`` (NaN where a label is absent from both)."""
    return np.array([dice(a == k, b == k) for k in labels])


def dice_table(pred, ref, labels=None):
    """``{label: Dice}`` of two label maps on one grid for the ``labels`` present in ``ref``
    (default: all its non-zero labels); a label missing from ``pred`` scores 0. One pass of
    ``bincount`` per map, whatever the number of labels."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError('label maps differ in shape: %s vs %s' % (pred.shape, ref.shape))
    if labels is None:
        labels = [int(k) for k in np.unique(ref) if k != 0]
    labels = [int(k) for k in labels]
    top = int(max(pred.max(initial=0), ref.max(initial=0), max(labels, default=0))) + 1
    p = np.clip(pred.ravel(), 0, top - 1).astype(np.int64)
    r = np.clip(ref.ravel(), 0, top - 1).astype(np.int64)
    n_pred = np.bincount(p, minlength=top)
    n_ref = np.bincount(r, minlength=top)
    n_both = np.bincount(r[p == r], minlength=top)
    return {k: 2.0 * n_both[k] / (n_pred[k] + n_ref[k]) for k in labels if n_ref[k] > 0}


def mean_dice(pred, ref, labels=None):
    """Mean of :func:`dice_table` (NaN when no label is present)."""
    table = dice_table(pred, ref, labels)
    return float(np.mean(list(table.values()))) if table else float('nan')


def surface(mask):
    """The voxels of a boolean mask that touch its outside (6-connectivity)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask)


def mean_surface_distance(a, b, voxsize=1.0):
    """Mean symmetric surface distance (mm) between two boolean masks on one grid of
    ``voxsize`` mm voxels (a number or one per axis); NaN when either surface is empty."""
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        return float('nan')
    da = ndimage.distance_transform_edt(~sb, sampling=voxsize)[sa]
    db = ndimage.distance_transform_edt(~sa, sampling=voxsize)[sb]
    return float((da.sum() + db.sum()) / (da.size + db.size))


def centroid_offsets(pred, ref, labels, min_voxels=1):
    """``{label: offset}``: centroid of ``label`` in ``pred`` minus that in ``ref`` (voxels, one
    per axis), for the labels with at least ``min_voxels`` in both maps."""
    out = {}
    for k in labels:
        a, b = pred == k, ref == k
        if a.sum() >= min_voxels and b.sum() >= min_voxels:
            out[int(k)] = np.array(ndimage.center_of_mass(a)) - np.array(ndimage.center_of_mass(b))
    return out


def correlation(a, b, mask=None):
    """Pearson correlation of two images (inside ``mask``, if given)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def ssim(a, b, mask=None, sigma=1.5, data_range=1.0):
    """Mean structural similarity (Wang et al. 2004, Gaussian window of ``sigma`` voxels) of two
    images on one grid, averaged over ``mask`` (all voxels if None). Scale both to a common
    range first (``data_range``: that range)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda x: ndimage.gaussian_filter(x, sigma)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    s /= (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return float(s[mask].mean() if mask is not None else s.mean())
