"""Registration of two scans with the shipped SynthMorph networks, and the displacement-field
helpers the command line needs (composition, regridding, fields in world coordinates).

Matrices are world RAS mm, moving -> fixed (FreeSurfer's direction, :mod:`synthkit.transforms`);
fields on a network grid are in its voxels (neurite's convention).
"""

import numpy as np
from keras import ops

from ... import backend, geometry
from ...layers import utils
from .network import barycenters, deform_network, feature_net, fit_rigid, fit_symmetric, integrate


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
    """Run ``model`` once (compiled on TensorFlow: half the memory, faster)."""
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
            self.affine_net.load_weights(weights)
        if deform_model is not None:
            weights, self.deform_card = deform_model
            self.deform_net = build_network(self.deform_card)
            self.deform_net.load_weights(weights)

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

    def affine(self, moving, fixed, rigid=False):
        """4x4 RAS matrix moving -> fixed from ``(data, affine)`` pairs (3-D arrays). Symmetric:
        swapping the inputs gives the inverse matrix (exactly, up to rounding)."""
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

    def velocity(self, moving, fixed, matrix, lam=0.5, voxsize=None, disp=None):
        """Symmetric velocity field on the half-resolution deformable grid, and that grid.

        The moving image is resampled onto the fixed image's network grid (of ``voxsize`` mm,
        default the model's) through ``matrix`` (moving -> fixed RAS) first, then warped by
        ``disp`` (X, Y, Z, 3) on that grid, in its voxels, if given (a coarser level's result);
        the field maps that grid to itself, in its voxels."""
        shape, grid = self.deform_grid(fixed[0].shape, fixed[1], voxsize)
        f = geometry.resample(self._rescaled(fixed[0]), fixed[1], shape, grid, 'linear')
        m = geometry.resample(self._rescaled(moving[0]), matrix @ moving[1], shape, grid,
                              'linear')
        if disp is not None:
            m = warp_image(m, disp)
        lam = np.array([[lam]], np.float32)
        v1 = _predict(self.deform_net, [np.stack([m, f], -1)[None], lam])
        v2 = _predict(self.deform_net, [np.stack([f, m], -1)[None], lam])
        return (v1 - v2) / 2, shape, grid

    def deformation(self, moving, fixed, matrix, lam=0.5, steps=7, inverse=True,
                    fine_mm=None, progress=None):
        """Coarse-to-fine deformable registration: ``(fwd, inv, shape, grid)``, displacement
        fields (X, Y, Z, 3) in voxels of the fixed image's network grid ``(shape, grid)``.

        The network runs first on its own grid (the model's voxel size), then, if ``fine_mm``
        is smaller, once more on a ``fine_mm`` grid, on the moving image already warped by the
        first result (a finer grid: smaller structures, the same network). Each level is a
        symmetric SVF; the result is their composition, the inverse (if ``inverse``, else None)
        the composition of their exact inverses ``exp(-v)``. ``progress(message)`` is told of
        each level."""
        levels = [float(self.deform_card['input']['voxsize_mm'])]
        if fine_mm and float(fine_mm) < levels[0]:
            levels.append(float(fine_mm))
        fwd = inv = None
        for vox in levels:
            if fwd is not None:                  # the coarse result, on this level's grid
                level = self.deform_grid(fixed[0].shape, fixed[1], vox)
                fwd = regrid_displacement(fwd, grid, *level)
                if inverse:
                    inv = regrid_displacement(inv, grid, *level)
            vel, shape, grid = self.velocity(moving, fixed, matrix, lam, vox, fwd)
            u, u_inv = self.displacements(vel, shape, steps, inverse=inverse)
            fwd = u if fwd is None else compose_displacements(fwd, u)
            if inverse:
                inv = u_inv if inv is None else compose_displacements(u_inv, inv)
            if progress:
                progress('deformation on a %s grid of %g mm' % ('x'.join(map(str, shape)), vox))
        return fwd, inv, shape, grid

    def displacements(self, vel, shape, steps=7, inverse=True):
        """Forward and (if ``inverse``, else None) inverse displacement fields (X, Y, Z, 3) on
        the network grid ``shape``, in its voxels: ``exp(v)`` and ``exp(-v)``."""
        fwd = np.asarray(integrate(vel, shape, steps))[0]
        inv = np.asarray(integrate(-vel, shape, steps))[0] if inverse else None
        return fwd, inv


def _sample_displaced(vol, disp, clamp):
    """``vol`` (X, Y, Z, C) trilinearly sampled at ``x + disp(x)`` (voxels): beyond the grid,
    points clamped to its edge (``clamp``: fields continue with their edge values) or zero."""
    shape = vol.shape[:3]
    pts = utils.volume_grid(shape) + ops.convert_to_tensor(disp.astype(np.float32))
    if clamp:
        pts = ops.clip(pts, 0.0, ops.convert_to_tensor(np.array(shape, np.float32) - 1))
    return np.asarray(utils.sample_linear(ops.convert_to_tensor(vol[None]), pts[None]))[0]


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
