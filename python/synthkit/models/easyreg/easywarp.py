"""Resample an image through a deformation field computed by mri_easyreg (EasyWarp).

The field gives, for every voxel of the grid it lies on, the RAS mm position to sample in the
input image; the output lies on that grid (the reference's for a --fwd_field of mri_easyreg).
Intensity images are interpolated trilinearly; label maps need --nearest.
"""

import argparse

from ...cli import common

PROG = 'mri_easywarp'


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=common.MODEL_NOT_SHIPPED,
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


def warp(args):
    common.require_inputs(args.i, args.field)
    common.find_model('easyreg')  # the field format is defined by SynthKit's EasyReg
    raise common.ToolError('not yet implemented: resampling through an EasyReg field')
