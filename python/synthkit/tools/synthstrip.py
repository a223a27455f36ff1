"""Remove non-brain tissue from a head scan of any contrast or resolution (SynthStrip).

A network trained only on synthetic images predicts the signed distance of every voxel to the
brain boundary, so one model serves T1w, T2w, FLAIR, PD, DWI, EPI and CT scans alike. The brain
mask is where that distance is below --border mm; it includes the cerebrospinal fluid around the
brain unless --no-csf is given. Outputs keep the geometry of the input image.
"""

import argparse

from . import common

PROG = 'mri_synthstrip'


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=common.MODEL_NOT_SHIPPED,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-i', '--image', metavar='FILE', required=True, help='input image to strip')
    p.add_argument('-o', '--out', metavar='FILE', help='save the skull-stripped image')
    p.add_argument('-m', '--mask', metavar='FILE', help='save the binary brain mask')
    p.add_argument('-d', '--sdt', metavar='FILE', help='save the signed distance transform (mm)')
    p.add_argument('-g', '--gpu', action='store_true', help='run on the GPU')
    p.add_argument('-b', '--border', metavar='MM', type=float, default=1,
                   help='mask border threshold in mm (default: %(default)s)')
    p.add_argument('-t', '--threads', metavar='N', type=int, help='number of CPU threads')
    p.add_argument('--no-csf', action='store_true', help='exclude CSF from the brain border')
    p.add_argument('--model', metavar='FILE', help='alternative model weights (.weights.h5)')
    p.add_argument('--fill', metavar='VALUE', type=float, default=0,
                   help='(SynthKit) value of removed voxels in --out (default: %(default)s)')
    p.add_argument('--png', metavar='FILE', help='(SynthKit) save a QC picture of the mask')
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.out or args.mask or args.sdt):
        parser.error('give at least one output: -o, -m or -d')
    common.run(PROG, strip, args)


def strip(args):
    common.require_inputs(args.image)
    common.find_model('synthstrip', args.model)
    raise common.ToolError('not yet implemented: skull stripping with the synthstrip model')
