"""Register brain scans of any contrast or resolution, no preprocessing needed (SynthMorph).

  register  align a moving image to a fixed image: rigid, affine, deformable, or affine then
            deformable ('joint', the default), with networks trained only on synthetic images
  apply     resample images through a transform saved by 'register' or FreeSurfer (.lta matrix
            or displacement field image); needs no model

Run 'mri_synthmorph register --help' or 'mri_synthmorph apply --help' for their options.
"""

import argparse
import os

import numpy as np

from . import common
from .. import io, transforms

PROG = 'mri_synthmorph'

#: Models each registration type needs, in the order they run.
MODELS = {'joint': ('synthmorph_affine', 'synthmorph_deform'),
          'deform': ('synthmorph_deform',),
          'affine': ('synthmorph_affine',),
          'rigid': ('synthmorph_rigid',)}

REGISTER = """\
Align a moving image to a fixed image. The affine networks predict a matrix from corresponding
features of both scans; the deformable network predicts a stationary velocity field integrated
by scaling and squaring, smoother for larger -r. Transforms are saved as a matrix (.lta or
.txt) for rigid and affine models and as a displacement field image otherwise."""

APPLY = """\
Resample each input image through a transform saved by 'register' (-t or -T), or by FreeSurfer
tools, and save it to the output path that follows it. Any number of input/output pairs may be
given; a bad pair is reported and skipped, and the exit status is then 1.

Transforms go from the moving to the fixed image, as in FreeSurfer:
  .lta         FreeSurfer LTA matrix, LINEAR_RAS_TO_RAS (type 1) or LINEAR_VOX_TO_VOX (type 0),
               mapping moving-world to fixed-world RAS coordinates; the output takes the grid of
               its 'dst volume info' (the fixed image), or the input's own grid when that is
               invalid
  image        displacement field (X, Y, Z, 3) in world RAS mm on the fixed grid (.nii, .nii.gz,
               .mgz, .mgh): fixed voxel v is taken from the moving-world point
               vox2ras(v) + disp[v]; the output takes the field's grid

Inputs need not be the registered image itself: any image in the same world space (another
contrast, a label map with -m nearest) is placed by its own vox2ras matrix. Multi-frame images
are resampled frame by frame. Outputs never replace an input."""

EPILOG = """\
Note: the trained models that 'register' needs are not yet shipped in this release of SynthKit;
'register' checks its arguments and inputs, then exits with status 1 without writing anything.
'apply' needs no model."""


def build_parser():
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                                formatter_class=raw)
    sub = p.add_subparsers(dest='command', required=True, metavar='{register,apply}')

    r = sub.add_parser('register', help='register two images', description=REGISTER,
                       epilog=common.MODEL_NOT_SHIPPED, formatter_class=raw)
    r.add_argument('moving', help='moving input image')
    r.add_argument('fixed', help='fixed input image')
    r.add_argument('-m', '--model', choices=tuple(MODELS), default='joint',
                   help='transformation model (default: %(default)s)')
    r.add_argument('-o', '--out-moving', metavar='FILE', help='save moving image registered')
    r.add_argument('-O', '--out-fixed', metavar='FILE', help='save fixed image registered')
    r.add_argument('-H', '--header-only', action='store_true',
                   help='change the header instead of resampling (rigid and affine only)')
    r.add_argument('-t', '--trans', metavar='FILE',
                   help='save the transform from moving to fixed space')
    r.add_argument('-T', '--inverse', metavar='FILE', help='save the inverse transform')
    r.add_argument('-i', '--init', metavar='FILE', help='initial matrix transform')
    r.add_argument('-j', '--threads', metavar='N', type=int, help='number of CPU threads')
    r.add_argument('-g', '--gpu', action='store_true', help='run on the GPU')
    r.add_argument('-r', '--regularization', metavar='LAMBDA', type=float, default=0.5,
                   help='deformation smoothness in (0, 1) (default: %(default)s)')
    r.add_argument('-n', '--steps', metavar='N', type=int, default=7,
                   help='integration steps of the deformation, at least 5 '
                        '(default: %(default)s)')
    r.add_argument('-e', '--extent', type=int, choices=(256, 192), default=256,
                   help='isotropic extent of the network grid in mm (default: %(default)s)')
    r.add_argument('-w', '--weights', metavar='FILE', action='append',
                   help='alternative model weights, once per model (joint: affine, deform)')
    r.add_argument('-v', '--verbose', action='store_true', help='print more information')
    r.set_defaults(run=register, check=check_register)

    a = sub.add_parser('apply', help='apply a transform to images', description=APPLY,
                       formatter_class=raw)
    a.add_argument('trans', help='transform file: .lta matrix or displacement field image')
    a.add_argument('images', nargs='+', metavar='IMAGE',
                   help='pairs of paths: input output [input output ...]')
    a.add_argument('-H', '--header-only', action='store_true',
                   help='change the vox2ras matrix instead of resampling (matrix transforms '
                        'only); the voxels are kept as they are')
    a.add_argument('-m', '--method', choices=('linear', 'nearest'), default='linear',
                   help='interpolation method, nearest for label maps (default: %(default)s)')
    a.add_argument('-t', '--type', metavar='DTYPE', type=np.dtype,
                   help='output data type, e.g. float32 (default: that of the input; integer '
                        'types get rounded values)')
    a.add_argument('-f', '--fill', metavar='VALUE', type=float, default=0,
                   help='value outside the input field of view (default: %(default)s)')
    a.set_defaults(run=apply, check=check_apply)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = args.check(args)
    if problem:
        parser.error('%s: %s' % (args.command, problem))
    common.run(PROG, args.run, args)


def check_register(args):
    if not (args.out_moving or args.out_fixed or args.trans or args.inverse):
        return 'give at least one output: -o, -O, -t or -T'
    if args.header_only and args.model not in ('affine', 'rigid'):
        return '-H needs a rigid or affine model'
    if not 0 < args.regularization < 1:
        return '-r must lie in the open interval (0, 1)'
    if args.steps < 5:
        return '-n must be at least 5'
    if args.weights and len(args.weights) != len(MODELS[args.model]):
        return '-w: model %s needs %d weight file(s)' % (args.model, len(MODELS[args.model]))
    return None


def check_apply(args):
    if len(args.images) % 2:
        return 'images must come in input/output pairs, got %d path(s)' % len(args.images)
    return None


def register(args):
    common.require_inputs(args.moving, args.fixed, args.init)
    for name, path in zip(MODELS[args.model], args.weights or [None] * len(MODELS[args.model])):
        common.find_model(name, path)
    raise common.ToolError('not yet implemented: %s registration with SynthMorph' % args.model)


def apply(args):
    common.require_inputs(args.trans)
    trans = transforms.load_transform(args.trans)
    if args.header_only and trans.is_warp:
        raise common.ToolError('%s: -H needs a matrix transform (.lta), not a displacement field'
                               % args.trans)
    pairs = list(zip(args.images[::2], args.images[1::2]))
    reads = {os.path.realpath(p) for p in [args.trans] + [i for i, _ in pairs]}
    seen = set()
    for _, out in pairs:
        real = os.path.realpath(out)
        if real in reads:
            raise common.ToolError('%s: output would overwrite an input' % out)
        if real in seen:
            raise common.ToolError('%s: output given twice' % out)
        seen.add(real)

    report = common.BatchReport(PROG)
    for inp, out in pairs:
        report.attempt(inp, apply_one, trans, inp, out, args.method, args.fill, args.type,
                       args.header_only)
    return report.finish()


def apply_one(trans, inp, out, method='linear', fill=0, dtype=None, header_only=False):
    """Resample (or, with ``header_only``, re-header) image ``inp`` through ``trans`` to ``out``."""
    io.check_writable(out)
    vol = io.load_volume(inp, allow_empty=True)
    if header_only:
        data, affine = transforms.header_only(trans, vol)
    else:
        data, affine = transforms.apply(trans, vol, method=method, fill=fill, dtype=dtype)
    io.save_volume(data, affine, out, like=vol, dtype=dtype)
