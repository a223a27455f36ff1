"""Register two brain scans of any contrast or resolution, affinely and nonlinearly (EasyReg).

Both scans are first segmented with SynthSeg (segmentations given with --ref_seg/--flo_seg are
used as they are; missing ones are computed and saved there). An affine transform is fitted to
the centroids of the segmented structures, then a network trained on synthetic images predicts
a symmetric diffeomorphic deformation. Fields map RAS mm coordinates between the two scans and
can be applied to other images with mri_easywarp.
"""

import argparse
import os

from ...cli import common

PROG = 'mri_easyreg'


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=common.MODEL_NOT_SHIPPED,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ref', metavar='FILE', required=True, help='reference image')
    p.add_argument('--flo', metavar='FILE', required=True, help='floating image')
    p.add_argument('--ref_seg', metavar='FILE', required=True,
                   help='SynthSeg segmentation of the reference (computed if it does not exist)')
    p.add_argument('--flo_seg', metavar='FILE', required=True,
                   help='SynthSeg segmentation of the floating image (computed if it does not '
                        'exist)')
    p.add_argument('--ref_reg', metavar='FILE',
                   help='save the reference deformed to the floating image')
    p.add_argument('--flo_reg', metavar='FILE',
                   help='save the floating image deformed to the reference')
    p.add_argument('--fwd_field', metavar='FILE', help='save the forward field (for mri_easywarp)')
    p.add_argument('--bak_field', metavar='FILE', help='save the backward field')
    p.add_argument('--affine_only', action='store_true',
                   help='affine registration only (no deformable network)')
    p.add_argument('--threads', metavar='N', type=int, default=1,
                   help='number of CPU threads, -1 for all (default: %(default)s)')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.run(PROG, register, args)


def register(args):
    common.require_inputs(args.ref, args.flo)
    if not (os.path.exists(args.ref_seg) and os.path.exists(args.flo_seg)):
        common.find_model('synthseg')
    if not args.affine_only:
        common.find_model('easyreg')
    raise common.ToolError('not yet implemented: EasyReg registration')
