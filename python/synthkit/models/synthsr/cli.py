"""Turn a brain scan of any contrast and resolution into a 1 mm MPRAGE-like T1w image (SynthSR).

A network trained only on synthetic images predicts, for every input, a 1 mm isotropic T1w
volume with the contrast of an MPRAGE, which the usual T1w tools can then process. The input
may be one image, a folder of images, or a .txt file listing one image per line; the output is
then a file, a folder, or a .txt list of the same length. The output lies on a 1 mm grid aligned
with the input.
"""

import argparse

from ...cli import common

PROG = 'mri_synthsr'


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=common.MODEL_NOT_SHIPPED,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--i', metavar='PATH', required=True,
                   help='input image, folder of images, or .txt list of images')
    p.add_argument('--o', metavar='PATH', required=True,
                   help='output image, folder, or .txt list (same kind as --i)')
    p.add_argument('--ct', action='store_true', help='inputs are CT scans (clipped to 0-80 HU)')
    p.add_argument('--disable_sharpening', action='store_true',
                   help='skip the final sharpening step')
    p.add_argument('--disable_flipping', action='store_true',
                   help='skip left-right flip averaging (faster, slightly less accurate)')
    p.add_argument('--lowfield', action='store_true',
                   help='variant for low-field scans (e.g. portable 64 mT scanners)')
    p.add_argument('--v1', action='store_true', help='first version of the model')
    p.add_argument('--threads', metavar='N', type=int, default=1,
                   help='number of CPU threads, -1 for all (default: %(default)s)')
    p.add_argument('--cpu', action='store_true', help='run on the CPU even if a GPU is present')
    p.add_argument('--model', metavar='FILE', help='alternative model weights (.weights.h5)')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.run(PROG, synthesize, args)


def synthesize(args):
    common.require_inputs(args.i)
    common.find_model('synthsr', args.model)
    raise common.ToolError('not yet implemented: synthesis with the synthsr model')
