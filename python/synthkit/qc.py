"""Quality-control pictures: orthogonal slices of a volume with labels overlaid in LUT colours."""

import numpy as np

from . import labels as lab


def _slices(vol, center):
    """Three orthogonal slices through ``center`` of LIA-ordered data, oriented for display:
    sagittal (superior up, anterior right), axial (anterior up) and coronal (superior up), with
    the subject's left on the right of the picture (radiological convention)."""
    i, j, k = (int(c) for c in center)
    return [vol[i], np.swapaxes(vol[:, j], 0, 1)[::-1], np.swapaxes(vol[:, :, k], 0, 1)]


def _to_rgb(gray):
    g = np.asarray(gray, np.float32)
    lo, hi = np.percentile(g, (0.5, 99.5)) if g.size else (0, 1)
    g = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((g * 255)[..., None], 3, axis=-1)


def colorize(seg):
    """(…,) integer labels -> (…, 3) float RGB in LUT colours (background black)."""
    seg = np.asarray(seg)
    rgb = np.zeros(seg.shape + (3,), np.float32)
    for value in np.unique(seg):
        if value:
            rgb[seg == value] = lab.color(value)
    return rgb


def montage(image, seg=None, center=None, alpha=0.45, side_by_side=False):
    """RGB uint8 montage of three orthogonal slices of ``image`` (LIA voxel order expected).

    With ``seg``, labels are overlaid with opacity ``alpha``; with ``side_by_side`` the label
    colours are drawn in a second row instead of overlaid.
    """
    image = np.asarray(image, np.float32)
    if center is None:
        if seg is not None and np.any(seg):
            center = np.round(np.argwhere(np.asarray(seg) > 0).mean(0)).astype(int)
        else:
            center = [n // 2 for n in image.shape]
    tiles, label_tiles = [], []
    seg_views = _slices(np.asarray(seg), center) if seg is not None else None
    for axis, view in enumerate(_slices(image, center)):
        rgb = _to_rgb(view)
        if seg is not None:
            col = colorize(seg_views[axis])
            mask = col.sum(-1, keepdims=True) > 0
            if side_by_side:
                label_tiles.append(col)
            else:
                rgb = np.where(mask, (1 - alpha) * rgb + alpha * col, rgb)
        tiles.append(rgb)
    rows = [tiles] + ([label_tiles] if label_tiles else [])
    height = max(t.shape[0] for t in tiles)
    out_rows = []
    for row in rows:
        padded = [np.pad(t, ((0, height - t.shape[0]), (0, 2), (0, 0))) for t in row]
        out_rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in out_rows)
    out_rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in out_rows]
    return np.clip(np.concatenate(out_rows, axis=0), 0, 255).astype(np.uint8)


def checkerboard(a, b, tile=12):
    """``a`` where the 3-D checkerboard of ``tile`` voxels is white, ``b`` elsewhere (both on one
    grid, intensities in [0, 1]): edges that continue across squares show a good alignment."""
    idx = np.indices(np.shape(a)) // tile
    return np.where(idx.sum(0) % 2 == 0, a, b)


def registration_montage(fixed, moved, center=None):
    """RGB uint8 picture of a registration: three rows of orthogonal slices (LIA voxel order, one
    grid): the fixed image, the moved image, and a checkerboard of the two."""
    fixed, moved = np.asarray(fixed, np.float32), np.asarray(moved, np.float32)
    if center is None:
        mask = fixed > 0
        center = np.round(np.argwhere(mask).mean(0)).astype(int) if mask.any() else \
            [n // 2 for n in fixed.shape]
    rows = [montage(x, center=center) for x in (fixed, moved, checkerboard(fixed, moved))]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)


def save_png(rgb, path, scale=2):
    """Write an RGB uint8 array as PNG (nearest upscaling by ``scale``), atomically."""
    import os
    import tempfile

    from PIL import Image
    img = Image.fromarray(rgb)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path), suffix='.png', dir=folder)
    os.close(fd)
    try:
        img.save(tmp, format='PNG')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
