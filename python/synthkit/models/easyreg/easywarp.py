"""Resample an image through a deformation field computed by mri_easyreg (EasyWarp).

The field gives, for every voxel of the grid it lies on, the RAS mm position to sample in the
input image (FreeSurfer EasyReg's format: 3 frames of absolute coordinates); the output lies on
that grid (the reference's for a --fwd_field of mri_easyreg). Intensity images are interpolated
trilinearly; label maps need --nearest. Points outside the input get 0.

example:
  mri_easywarp --i flo_aseg.mgz --o flo_aseg_in_ref.mgz --field fwd.nii.gz --nearest
"""

import argparse

import numpy as np

from ... import io, transforms
from ...cli import common

PROG = 'mri_easywarp'


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--i', metavar='FILE', required=True, help='input image to deform')
    p.add_argument('--o', metavar='FILE', required=True, help='output deformed image')
    p.add_argument('--field', metavar='FILE', required=True,
                   help='deformation field from mri_easyreg (--fwd_field or --bak_field)')
    p.add_argument('--nearest', action='store_true',
                   help='nearest-neighbour interpolation (for label maps)')
    p.add_argument('--threads', metavar='N', type=int, default=1,
                   help='number of CPU threads, -1 for all (default: %(default)s)')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.run(PROG, warp, args)


def read_field(path):
    """An EasyReg coordinate field as a :class:`transforms.Transform`."""
    from .inference import transform_from_coordinates
    vol = io.load_volume(path, allow_empty=True)
    if vol.data.ndim != 4 or vol.data.shape[3] != 3:
        raise io.VolumeError(path, 'not an EasyReg field: expected 3 frames of RAS coordinates '
                             '(X, Y, Z, 3), got shape %s' % (vol.data.shape,))
    if vol.data.dtype.kind not in 'fiu':
        raise io.VolumeError(path, 'not an EasyReg field: %s values' % vol.data.dtype)
    return transform_from_coordinates(vol.data, vol.affine, path)


def warp(args):
    common.require_inputs(args.i, args.field)
    common.check_outputs([args.i, args.field], [('--o', args.o)])
    io.check_writable(args.o)
    field = read_field(args.field)
    vol = io.load_volume(args.i, allow_empty=True)
    method = 'nearest' if args.nearest else 'linear'
    dtype = None if args.nearest or vol.data.dtype.kind not in 'f' else np.float32
    data, affine = transforms.apply(field, vol, method=method, dtype=dtype)
    io.save_volume(data, affine, args.o, like=vol)
    return 0
