"""Backend-agnostic helpers shared by the layers: grids, interpolation matrices, sampling.

Everything here is written with ``keras.ops`` so it runs on the TensorFlow, JAX and PyTorch
backends. Spatial tensors are channels-last: ``(batch, X, Y, Z, channels)``; displacement fields
are in voxels, ``(batch, X, Y, Z, 3)``, as in neurite/voxelmorph.
"""

import numpy as np
from keras import ops


def linear_interp_matrix(n_out, n_in):
    """(n_out, n_in) numpy matrix resampling a 1-D signal of n_in samples to n_out samples.

    Sample ``i`` of the output sits at position ``i * (n_in - 1) / (n_out - 1)`` of the input
    (corners aligned), so it upsamples a coarse control grid spanning the whole field of view.
    """
    if n_in == 1:
        return np.ones((n_out, 1), np.float32)
    pos = np.linspace(0, n_in - 1, n_out)
    return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(n_in)[None])).astype(np.float32)


def apply_axis_matrices(x, mats):
    """Apply one matrix per spatial axis to ``x`` of shape (B, X, Y, Z, C).

    ``mats[k]`` is (n_out, n_in) shared by the batch or (B, n_out, n_in) per sample. This is how
    smooth fields are upsampled and how resolution and blur are simulated: separable, with
    static shapes, and a handful of matrix products.
    """
    specs = ('xi,bijkc->bxjkc', 'yj,bijkc->biykc', 'zk,bijkc->bijzc')
    bspecs = ('bxi,bijkc->bxjkc', 'byj,bijkc->biykc', 'bzk,bijkc->bijzc')
    for axis, mat in enumerate(mats):
        if mat is None:
            continue
        mat = ops.cast(mat, x.dtype)
        x = ops.einsum((bspecs if len(mat.shape) == 3 else specs)[axis], mat, x)
    return x


def resize_field(field, shape):
    """Linearly resize a smooth field (B, x, y, z, C) to spatial ``shape`` (corners aligned)."""
    mats = [linear_interp_matrix(n_out, int(n_in)) for n_out, n_in in zip(shape, field.shape[1:4])]
    return apply_axis_matrices(field, mats)


def volume_grid(shape, center=False):
    """Voxel coordinates of a grid, (X, Y, Z, 3) float32; optionally relative to its centre."""
    axes = [ops.arange(n, dtype='float32') - ((n - 1) / 2 if center else 0) for n in shape]
    return ops.stack(ops.meshgrid(*axes, indexing='ij'), axis=-1)


def sample(vol, coords, interp='linear', fill=0):
    """Sample ``vol`` (B, X, Y, Z, C) at voxel ``coords`` (B, ..., 3); returns (B, ..., C).

    ``interp`` is 'linear' (trilinear) or 'nearest'. Points outside take ``fill``.
    """
    order = 1 if interp == 'linear' else 0
    out = []
    for b in range(vol.shape[0]):
        c = ops.moveaxis(coords[b], -1, 0)
        chans = [ops.image.map_coordinates(vol[b, ..., k], c, order=order, fill_mode='constant',
                                           fill_value=fill) for k in range(vol.shape[-1])]
        out.append(ops.stack(chans, axis=-1))
    return ops.stack(out, axis=0)


def gaussian_matrix(n, sigma):
    """(B, n, n) row-normalized Gaussian smoothing matrices, one per sigma (B,) in voxels.

    A sigma near zero gives the identity, so the matrix can be sampled per example with static
    shapes.
    """
    idx = ops.arange(n, dtype='float32')
    d2 = ops.square(idx[:, None] - idx[None, :])[None]
    s = ops.maximum(ops.reshape(sigma, (-1, 1, 1)), 1e-3)
    w = ops.exp(-d2 / (2 * ops.square(s)))
    return w / ops.sum(w, axis=-1, keepdims=True)


def hat(x):
    """Linear interpolation kernel max(0, 1 - |x|)."""
    return ops.relu(1 - ops.abs(x))


def sample_linear(vol, coords, fill=0):
    """Trilinear sampling of all channels of ``vol`` (B, X, Y, Z, C) at once at voxel
    ``coords`` (B, ..., 3) -> (B, ..., C): eight gathers of whole voxel rows instead of eight per
    channel, much faster than :func:`sample` for many channels (one-hot labels). Each corner
    outside the grid contributes ``fill``, as in :func:`sample`."""
    shape = vol.shape[1:4]
    b, c = vol.shape[0], vol.shape[-1]
    out_shape = coords.shape[1:-1]
    flat = ops.reshape(vol, (b, -1, c))
    pts = ops.reshape(coords, (b, -1, 3))
    lo = ops.floor(pts)
    frac = pts - lo
    lo = ops.cast(lo, 'int32')
    strides = (shape[1] * shape[2], shape[2], 1)
    result = 0
    for corner in range(8):
        bits = [(corner >> (2 - a)) & 1 for a in range(3)]
        w, idx, valid = 1.0, 0, True
        for a in range(3):
            i = lo[..., a] + bits[a]
            w = w * (frac[..., a] if bits[a] else 1 - frac[..., a])
            ok = ops.logical_and(i >= 0, i <= shape[a] - 1)
            valid = ok if valid is True else ops.logical_and(valid, ok)
            idx = idx + ops.clip(i, 0, shape[a] - 1) * strides[a]
        vals = ops.stack([ops.take(flat[k], idx[k], axis=0) for k in range(b)])
        vals = ops.where(valid[..., None], vals, ops.cast(fill, vals.dtype))
        result = result + w[..., None] * vals
    return ops.reshape(result, (b, *out_shape, c))


# ------------------------------------------------------------------ argument checks of layers
# Layers check their arguments where they are made, so that a typo (prior='gaussian') or an
# impossible value fails at once with its name, not silently or deep inside a compiled graph.

def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError('%s must be one of %s, got %r' % (name, ', '.join(map(repr, choices)),
                                                           value))
    return value


def check_number(name, value, low=None, high=None, low_open=False):
    """``value`` as a float, finite and within [low, high] (``low_open``: (low, high])."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError('%s must be a number, got %r' % (name, value)) from None
    if not np.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) \
            or (high is not None and v > high):
        bounds = '%s%s, %s]' % ('(' if low_open else '[', '-inf' if low is None else low,
                                'inf' if high is None else high)
        raise ValueError('%s must be a finite number in %s, got %r' % (name, bounds, value))
    return v


def check_range(name, value, low=None, ordered=True):
    """``value`` as a ``(low, high)`` tuple of finite numbers (``low <= high`` if ``ordered``)."""
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError('%s must be a pair (low, high), got %r' % (name, value)) from None
    if len(pair) != 2:
        raise ValueError('%s must be a pair (low, high), got %r' % (name, value))
    for v in pair:
        check_number(name, v, low)
    if ordered and pair[0] > pair[1]:
        raise ValueError('%s must have low <= high, got %r' % (name, value))
    return pair
