"""Overlap and distance measures between label maps and masks (numpy), shared by training
validation, the tools' tests and the benchmark scripts."""

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
