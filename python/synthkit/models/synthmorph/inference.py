"""Registration of two scans with the shipped SynthMorph networks, and the displacement-field
helpers the command line needs (composition, regridding, fields in world coordinates).

Matrices are world RAS mm, moving -> fixed (FreeSurfer's direction, :mod:`synthkit.transforms`);
fields on a network grid are in its voxels (neurite's convention).
"""

import itertools

import numpy as np
from keras import ops

from ... import backend, geometry, nets
from ...layers import ResizeField, utils
from .network import barycenters, deform_network, feature_net, fit_rigid, fit_symmetric


def build_network(card):
    """The network a SynthMorph model card describes (weights not loaded)."""
    arch = {k: v for k, v in card['architecture'].items() if k != 'type'}
    kind = card['architecture']['type']
    if kind == 'affine_features':
        return feature_net(**arch)
    if kind == 'deform_velocity':
        return deform_network(**arch)
    raise ValueError('not a SynthMorph model card (architecture %r)' % kind)


def _predict(model, inputs):
    """Run ``model`` once (compiled on TensorFlow: half the memory, faster) on float32 inputs
    (an array, or a list of them)."""
    if isinstance(inputs, (list, tuple)):
        inputs = [np.asarray(x, np.float32) for x in inputs]
    else:
        inputs = np.asarray(inputs, np.float32)
    return np.asarray(backend.predictor(model)(inputs))


class Registrar:
    """Registration of two scans with the shipped SynthMorph networks.

    ``affine_model`` / ``deform_model`` are ``(weights path, model card)`` pairs (either may be
    None when the mode does not need it). All matrices are world RAS mm, moving -> fixed
    (FreeSurfer's direction, :mod:`synthkit.transforms`).
    """

    def __init__(self, affine_model=None, deform_model=None, extent_mm=256.0):
        self.affine_net = self.deform_net = None
        self.extent = float(extent_mm)
        self._rescale_cache = []            # [(input array, its rescaled copy)]
        if affine_model is not None:
            weights, self.affine_card = affine_model
            self.affine_net = build_network(self.affine_card)
            nets.load_weights(self.affine_net, weights)
        self.tiled = None
        if deform_model is not None:
            weights, self.deform_card = deform_model
            self.deform_net = build_network(self.deform_card)
            nets.load_weights(self.deform_net, weights)
            if self.deform_card['architecture'].get('kind') == 'correlation':
                self.tiled = TiledCorrelation(self.deform_net)

    def _rescaled(self, data):
        """``geometry.rescale_intensities(data)``, computed once per input array (the affine step
        and each deformable level use the same two images)."""
        for source, result in self._rescale_cache:
            if source is data:
                return result
        result = geometry.rescale_intensities(data)
        # the moving and the fixed image (kept alive here, so ``is`` cannot match a new array)
        self._rescale_cache = (self._rescale_cache + [(data, result)])[-2:]
        return result

    def network_grid(self, card, src_shape, src_affine, voxsize=None):
        """(shape, affine) of a network grid over an image's field of view: LIA voxels of the
        model's size (``card``; or ``voxsize`` mm), a multiple of 16, at most ``extent`` mm per
        axis."""
        vox = float(voxsize or card['input']['voxsize_mm'])
        shape, grid = geometry.conform_grid(src_shape, src_affine, vox, 'LIA', multiple=16)
        limit = int(self.extent // vox) // 16 * 16
        if max(shape) > limit:
            shape, grid = geometry.conform_grid(src_shape, src_affine, vox, 'LIA', multiple=16,
                                                crop=np.minimum(shape, limit))
        return shape, grid

    # ----------------------------------------------------------------------------- affine
    def _points(self, data, affine):
        """World barycentres (K, 3) and masses (K,) of one image's feature maps."""
        shape, grid = self.network_grid(self.affine_card, data.shape, affine)
        img = geometry.resample(self._rescaled(data), affine, shape, grid, 'linear')
        feat = _predict(self.affine_net, img[None, ..., None])
        pts, mass = barycenters(feat, shape)
        pts = np.asarray(pts, np.float64)[0] + (np.asarray(shape) - 1) / 2   # grid voxels
        return (grid[:3, :3] @ pts.T + grid[:3, 3:]).T, np.asarray(mass, np.float64)[0]

    def affine(self, moving, fixed, rigid=False, check='check', info=None):
        """4x4 RAS matrix moving -> fixed from ``(data, affine)`` pairs (3-D arrays). Symmetric:
        swapping the inputs gives the inverse matrix (exactly, up to rounding).

        ``check`` (:func:`refine.refine`): ``'check'`` keeps the network's matrix or the
        identity (the images' own alignment), whichever has the higher mutual information;
        ``'refine'`` then optimizes it (rigidly for ``rigid``, else rotation, translation and
        scales); ``'off'``: the network's matrix as it is. ``info`` (a dict) receives the
        objective's values and which start was kept."""
        matrix = self._network_affine(moving, fixed, rigid)
        if check == 'off':
            return matrix
        if check not in ('check', 'refine'):
            raise ValueError("check must be 'off', 'check' or 'refine', got %r" % (check,))
        from . import refine as _refine
        matrix, found = _refine.refine(moving, fixed, matrix, kind='rigid' if rigid else
                                       'similar', optimize=check == 'refine')
        if info is not None:
            info.update(found)
        return matrix

    def _network_affine(self, moving, fixed, rigid):
        pm, wm = self._points(*moving)
        pf, wf = self._points(*fixed)
        w = np.sqrt(wm * wf) + 1e-12
        if rigid:
            fixed_to_moving = fit_rigid(pf, pm, w)
        else:    # in world mm and float64, so a much smaller ridge than in training
            fixed_to_moving = np.asarray(fit_symmetric(pm[None], pf[None], w[None],
                                                       ridge=1e-6))[0]
        return np.linalg.inv(fixed_to_moving)

    # ------------------------------------------------------------------------- deformable
    def deform_grid(self, fixed_shape, fixed_affine, voxsize=None):
        """(shape, affine) of the grid the deformable network runs on: the fixed image's
        :meth:`network_grid` (voxels of the model's size, or ``voxsize`` mm)."""
        return self.network_grid(self.deform_card, fixed_shape, fixed_affine, voxsize)

    def level(self, moving, fixed, matrix, voxsize=None, margin=8):
        """One deformable level: ``(shape, affine, fixed image, moving image)``, the fixed
        image's network grid (voxels of ``voxsize`` mm, default the model's) cropped to where
        either image has content (plus ``margin`` voxels, in blocks of 16: time and memory
        follow the heads, not the field of view), and both images on it, rescaled, the moving
        one through ``matrix`` (moving -> fixed RAS)."""
        shape, grid = self.deform_grid(fixed[0].shape, fixed[1], voxsize)
        f = geometry.resample(self._rescaled(fixed[0]), fixed[1], shape, grid, 'linear')
        m = geometry.resample(self._rescaled(moving[0]), matrix @ moving[1], shape, grid,
                              'linear')
        box = content_box((f > 0) | (m > 0), 16, margin)
        start = np.array([b.start for b in box], float)
        cropped = grid.copy()
        cropped[:3, 3] = grid[:3, :3] @ start + grid[:3, 3]
        return (tuple(b.stop - b.start for b in box), cropped,
                np.ascontiguousarray(f[box]), np.ascontiguousarray(m[box]))

    def velocity(self, moving, fixed, matrix, lam=0.5, voxsize=None, disp=None, level=None):
        """Symmetric velocity field on the half-resolution grid of a level, and the level's
        grid ``(shape, affine)`` (:meth:`level`, or ``level`` if given).

        The moving image, already on the level's grid, is warped by ``disp`` (X, Y, Z, 3) on
        that grid, in its voxels, if given (a coarser level's result); the field maps that grid
        to itself, in its voxels."""
        shape, grid, f, m = level or self.level(moving, fixed, matrix, voxsize)
        if disp is not None:
            m = warp_image(m, disp)
        lam = np.array([[lam]], np.float32)
        if self.tiled is not None:          # each image's features once, the head per order
            feat_m, feat_f = self.tiled.features(m), self.tiled.features(f)
            v1 = self.tiled.head(feat_f, feat_m, lam)
            v2 = self.tiled.head(feat_m, feat_f, lam)
        else:
            v1 = _predict(self.deform_net, [np.stack([m, f], -1)[None], lam])
            v2 = _predict(self.deform_net, [np.stack([f, m], -1)[None], lam])
        return (v1 - v2) / 2, shape, grid

    def deformation(self, moving, fixed, matrix, lam=0.5, steps=7, inverse=True,
                    fine_mm=None, progress=None, iterations=0):
        """Coarse-to-fine deformable registration: ``(fwd, inv, shape, grid)``, displacement
        fields (X, Y, Z, 3) in voxels of the last level's grid ``(shape, grid)`` (the fixed
        image's network grid where the images are; identity beyond it).

        Levels: the network on its own grid (the model's voxel size), a symmetric SVF; then, if
        ``fine_mm`` is smaller, the network once more on a ``fine_mm`` grid, on the moving
        image already warped by the first result (the composition of the two SVFs). Then, with
        ``iterations``, the mutual-information optimization of :mod:`.optimize` on the last
        level's grid, from the network's result: a velocity ``r`` found between the two images
        in the network's mid-space (moving warped by ``exp(v/2)``, fixed by ``exp(-v/2)``),
        the result ``exp(v/2) o exp(r) o exp(v/2)``, whose inverse is the same with ``-v`` and
        ``-r``, so swapping the inputs gives the inverse (after two network levels: ``phi o
        exp(r)``, the fixed image against the moving one warped by the network's ``phi``).

        The inverse (if ``inverse``, else None) composes the exact inverses. ``progress(message)``
        is told of each level."""
        levels = [float(self.deform_card['input']['voxsize_mm'])]
        if fine_mm and float(fine_mm) < levels[0]:
            levels.append(float(fine_mm))
        fwd = inv = grid = half = None
        need_inverse = inverse or bool(iterations)
        for vox in levels:
            level = self.level(moving, fixed, matrix, vox)
            if fwd is not None:                  # the coarse result, on this level's grid
                fwd = regrid_displacement(fwd, grid, level[0], level[1])
                if need_inverse:
                    inv = regrid_displacement(inv, grid, level[0], level[1])
            vel, shape, grid = self.velocity(moving, fixed, matrix, lam, disp=fwd, level=level)
            if iterations and len(levels) == 1:  # the mid-space of the one level (exp(v)
                half = self.displacements(vel / 2, shape, steps)    # itself is not needed)
            else:
                u, u_inv = self.displacements(vel, shape, steps, inverse=need_inverse)
                fwd = u if fwd is None else compose_displacements(fwd, u)
                if need_inverse:
                    inv = u_inv if inv is None else compose_displacements(u_inv, inv)
            if progress:
                progress('network on a %s grid of %g mm' % ('x'.join(map(str, shape)), vox))
        if iterations:
            fwd, inv = self.optimized(level[2], level[3], fwd, inv, half, iterations, steps)
            if progress:
                progress('%d iterations of mutual information on the %g mm grid'
                         % (iterations, levels[-1]))
        return fwd, (inv if inverse else None), shape, grid

    def optimized(self, fixed, moving, fwd, inv, half=None, iterations=40, steps=7):
        """``(fwd, inv)`` refined by :class:`.optimize.MIOptimizer` between the ``fixed`` and
        ``moving`` images of their grid (:meth:`deformation`); ``half``: ``(exp(v/2),
        exp(-v/2))`` of a single-level result ``fwd = exp(v)``, for the symmetric form."""
        from .optimize import MIOptimizer
        if half is not None:
            f, m = warp_image(fixed, half[1]), warp_image(moving, half[0])
        else:
            f, m = fixed, warp_image(moving, fwd)
        r = MIOptimizer(iterations).run(f, m)
        e_r, e_r_inv = exponential(r, steps), exponential(-r, steps)
        if half is not None:
            return (compose_displacements(half[0], compose_displacements(e_r, half[0])),
                    compose_displacements(half[1], compose_displacements(e_r_inv, half[1])))
        return compose_displacements(fwd, e_r), compose_displacements(e_r_inv, inv)

    def displacements(self, vel, shape, steps=7, inverse=True):
        """Forward and (if ``inverse``, else None) inverse displacement fields (X, Y, Z, 3) on
        the network grid ``shape``, in its voxels: ``exp(v)`` and ``exp(-v)``."""
        resize = ResizeField(tuple(shape))
        vel = np.asarray(vel, np.float32)[0]
        fwd = np.asarray(resize(exponential(vel, steps)[None]))[0]
        inv = np.asarray(resize(exponential(-vel, steps)[None]))[0] if inverse else None
        return fwd, inv


def exponential(vel, steps=7):
    """Displacement (X, Y, Z, 3) of ``exp(vel)``, a velocity (X, Y, Z, 3) in voxels of its own
    grid: scaling and squaring as :class:`~synthkit.layers.IntegrateVelocity` (the field
    continued beyond the grid by its edge values), one compiled program per squaring (XLA,
    given all squarings at once, recomputes each one's samples in every later one: 20 times
    slower on the CPU than this)."""
    global _SQUARE
    if _SQUARE is None:
        _SQUARE = backend.compiled(_square, jit=True)
    disp = ops.convert_to_tensor(np.asarray(vel, np.float32) / 2 ** int(steps))
    grid = utils.volume_grid(disp.shape[:3])
    upper = ops.convert_to_tensor(np.array(disp.shape[:3], np.float32) - 1)
    for _ in range(int(steps)):
        disp = _SQUARE(disp, grid, upper)
    return np.asarray(disp, np.float32)


def _square(disp, grid, upper):
    coords = ops.minimum(ops.maximum(grid + disp, 0.0), upper)
    return disp + utils.sample_linear(disp[None], coords[None])[0]


_SQUARE = None


def content_box(mask, divisor=16, margin=8):
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels and to sizes that are
    multiples of ``divisor``, inside the array (whose sizes are multiples of ``divisor``); the
    whole array when the mask is empty."""
    out = []
    for axis, n in enumerate(mask.shape):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(np.any(mask, axis=other))
        if nz.size == 0:
            return tuple(slice(0, m) for m in mask.shape)
        lo, hi = max(nz[0] - margin, 0), min(nz[-1] + 1 + margin, n)
        size = min(-(-(hi - lo) // divisor) * divisor, n)
        lo = min(lo - lo % 4, n - size)          # whole pooling blocks from the grid's origin
        out.append(slice(int(lo), int(lo + size)))
    return tuple(out)


def plan_tiles(shape, max_voxels, margin, align):
    """Tiles covering a grid of ``shape``: ``[(region slices, core slices in the region,
    core slices in the grid)]``, as few as keep each region (its core and up to ``margin``
    voxels of context, less at the grid's edges) within ``max_voxels``; the axis with the
    largest cores is split first. Starts and sizes are multiples of ``align`` (the grid's
    sizes must be too)."""
    shape = [int(n) for n in shape]
    splits = [1, 1, 1]

    def axis_tiles(n, k):
        core = -(-n // k)
        core = -(-core // align) * align
        out = []
        for c0 in range(0, n, core):
            c1 = min(c0 + core, n)
            r0 = max(0, c0 - margin) // align * align
            r1 = min(n, -(-(c1 + margin) // align) * align)
            out.append((r0, r1, c0, c1))
        return out

    while True:
        tiles = [axis_tiles(n, k) for n, k in zip(shape, splits)]
        biggest = np.prod([max(r1 - r0 for r0, r1, _, _ in t) for t in tiles])
        cores = [max(c1 - c0 for _, _, c0, c1 in t) for t in tiles]
        if biggest <= max_voxels or max(cores) <= max(align, margin):   # context dominates
            break
        splits[int(np.argmax(cores))] += 1
    out = []
    for region in itertools.product(*tiles):
        out.append((tuple(slice(r0, r1) for r0, r1, _, _ in region),
                    tuple(slice(c0 - r0, c1 - r0) for r0, _, c0, c1 in region),
                    tuple(slice(c0, c1) for _, _, c0, c1 in region)))
    return out


class TiledCorrelation:
    """A correlation network (:func:`~.network.correlation_net`) run in tiles, with the same
    result as on the whole grid: memory is bounded by the tile size whatever the field of view.

    Its encoder is local but for its last step (each feature vector less the image's mean
    feature, scaled to unit length): the raw features are computed tile by tile, with enough
    context around each tile (``margin``, beyond the encoder's receptive field) and tiles on
    whole pooling blocks, then normalized over the whole image. The head (cost volume over
    shifts of 2 voxels, three 3x3x3 convolutions) is local too: tiles of the half-resolution
    grid with ``head_margin`` voxels of context. Each image's features are computed once and
    serve both orders of the symmetric velocity."""

    def __init__(self, net, max_voxels=7e6, margin=32, head_max_voxels=5e5, head_margin=8):
        import keras
        self.max_voxels, self.margin = max_voxels, margin
        self.head_max_voxels, self.head_margin = head_max_voxels, head_margin
        encoder = net.get_layer('encoder')
        self.raw = keras.Model(encoder.input, encoder.get_layer('embed').output)
        channels = encoder.output.shape[-1]
        ff = keras.Input((None, None, None, channels), name='fixed_features')
        mf = keras.Input((None, None, None, channels), name='moving_features')
        lam = keras.Input((1,), name='lambda')
        cost = net.get_layer('cost')([ff, mf])
        flow = net.get_layer('soft_argmax')(cost)
        y = net.get_layer('head_in')([cost, flow])
        h = net.get_layer('hyper1')(net.get_layer('hyper0')(lam))
        i = 0
        while True:
            try:
                conv = net.get_layer('head_conv%d' % i)
            except ValueError:
                break
            y = net.get_layer('head_act%d' % i)(conv(y))
            y = net.get_layer('head_mod%d' % i)([y, net.get_layer('head_film%d' % i)(h)])
            i += 1
        y = net.get_layer('correction')(y)
        self.head_model = keras.Model([ff, mf, lam], net.get_layer('velocity')([flow, y]))

    def features(self, image):
        """Unit feature vectors (X/2, Y/2, Z/2, C) of an image (X, Y, Z)."""
        out = None
        for region, core, dst in plan_tiles(image.shape, self.max_voxels, self.margin, 4):
            part = _predict(self.raw, np.ascontiguousarray(image[region])[None, ..., None])[0]
            if out is None:
                out = np.empty(tuple(n // 2 for n in image.shape) + (part.shape[-1],),
                               np.float32)
            half = lambda sl: tuple(slice(s.start // 2, s.stop // 2) for s in sl)  # noqa: E731
            out[half(dst)] = part[half(core)]
        out -= out.reshape(-1, out.shape[-1]).mean(0, dtype=np.float64).astype(np.float32)
        out /= np.sqrt(np.square(out).sum(-1, keepdims=True) + 1e-6)
        return out

    def head(self, fixed_features, moving_features, lam):
        """Velocity (1, X/2, Y/2, Z/2, 3) of the moving -> fixed correspondence."""
        shape = fixed_features.shape[:3]
        out = np.empty((1,) + tuple(shape) + (3,), np.float32)
        for region, core, dst in plan_tiles(shape, self.head_max_voxels, self.head_margin, 1):
            part = _predict(self.head_model, [fixed_features[region][None],
                                              moving_features[region][None], lam])[0]
            out[(0,) + dst] = part[core]
        return out


def _sample_displaced(vol, disp, clamp, slab_voxels=2 ** 21):
    """``vol`` (X, Y, Z, C) trilinearly sampled at ``x + disp(x)`` (voxels): beyond the grid,
    points clamped to its edge (``clamp``: fields continue with their edge values) or zero.
    Slab by slab of about ``slab_voxels`` points, so the sampler's temporaries stay small."""
    shape = vol.shape[:3]
    src = ops.convert_to_tensor(np.asarray(vol, np.float32)[None])
    upper = np.array(shape, np.float32) - 1
    out = np.empty(tuple(disp.shape[:3]) + (vol.shape[3],), np.float32)
    step = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    for a in range(0, disp.shape[0], step):
        b = min(a + step, disp.shape[0])
        grid = np.stack(np.meshgrid(np.arange(a, b, dtype=np.float32),
                                    np.arange(shape[1], dtype=np.float32),
                                    np.arange(shape[2], dtype=np.float32), indexing='ij'), -1)
        pts = grid + disp[a:b].astype(np.float32)
        if clamp:
            pts = np.clip(pts, 0.0, upper)
        out[a:b] = np.asarray(_sampler()(src, ops.convert_to_tensor(pts[None])))[0]
    return out


_SAMPLER = None


def _sampler():
    """:func:`~synthkit.layers.utils.sample_linear`, compiled (XLA: a tenth of the eager
    time on the CPU)."""
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = backend.compiled(utils.sample_linear, jit=True)
    return _SAMPLER


def warp_image(img, disp):
    """Image (X, Y, Z) warped by a displacement (X, Y, Z, 3) in its voxels: ``img(x + d(x))``,
    trilinear, zero beyond the grid."""
    return _sample_displaced(img[..., None], disp, clamp=False)[..., 0]


def compose_displacements(outer, inner):
    """The displacement of the composed map ``x -> phi_outer(phi_inner(x))``, ``phi(x) = x +
    d(x)``: ``inner(x) + outer(x + inner(x))``, fields (X, Y, Z, 3) in voxels of one grid."""
    return inner + _sample_displaced(outer, inner, clamp=True)


def regrid_displacement(disp, grid_affine, shape, affine):
    """A displacement field (X, Y, Z, 3) in voxels of the grid ``grid_affine`` as a field on
    another grid ``(shape, affine)`` over the same world, in its voxels (zero where the first
    grid does not reach)."""
    world = warp_to_world(disp, grid_affine, shape, affine)
    return (world.reshape(-1, 3) @ np.linalg.inv(affine[:3, :3]).T.astype(np.float32)).reshape(
        world.shape).astype(np.float32)


def warp_to_world(disp_grid, grid_affine, target_shape, target_affine, pre=None, post=None):
    """A displacement field on the network grid (voxels) as a RAS displacement image on a target
    grid: for target voxel ``w`` at world ``q = target_affine @ w``, the network field is read at
    ``p = pre @ q`` (``pre``: 4x4 world map into the network grid's world, default identity) and
    the result is ``post @ (p + R u(p)) - q`` (``R``: the grid's voxel axes, ``post`` default
    identity). Outside the network grid the field is zero (``pre``/``post`` still apply)."""
    pre = np.eye(4) if pre is None else pre
    post = np.eye(4) if post is None else post
    u = geometry.resample(disp_grid.astype(np.float32), grid_affine, target_shape,
                          pre @ target_affine, 'linear')                     # (X, Y, Z, 3), voxels
    # post @ (pre @ q + R u) - q = (post @ pre - I) @ A @ w + (post R) u: affine in the voxel
    # index w (built axis by axis) plus a 3x3 map of the field
    lin = ((post @ pre - np.eye(4)) @ target_affine).astype(np.float32)
    out = u.reshape(-1, 3) @ (post[:3, :3] @ grid_affine[:3, :3]).T.astype(np.float32)
    out = out.reshape(tuple(target_shape) + (3,))
    axes = [np.arange(n, dtype=np.float32) for n in target_shape]
    out += lin[:3, 3]
    out += axes[0][:, None, None, None] * lin[:3, 0]
    out += axes[1][None, :, None, None] * lin[:3, 1]
    out += axes[2][None, None, :, None] * lin[:3, 2]
    return out
