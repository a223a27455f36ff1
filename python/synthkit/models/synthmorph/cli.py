"""Register brain scans of any contrast or resolution, no preprocessing needed (SynthMorph).

  register  align a moving image to a fixed image: rigid, affine, deformable, or affine then
            deformable ('joint', the default), with networks trained only on synthetic images
  apply     resample images through a transform saved by 'register' or FreeSurfer (.lta matrix
            or displacement field image); needs no model

Run 'mri_synthmorph register --help' or 'mri_synthmorph apply --help' for their options.
"""

import argparse

import numpy as np

from ... import io, transforms
from ...cli import common

PROG = 'mri_synthmorph'

#: Models each registration type needs, in the order they run.
MODELS = {'joint': ('synthmorph_affine', 'synthmorph_deform'),
          'deform': ('synthmorph_deform',),
          'affine': ('synthmorph_affine',),
          'rigid': ('synthmorph_affine',)}

REGISTER = """\
Align a moving image to a fixed image, of any contrast and resolution, skull-stripped or not.

  affine   a network finds corresponding feature points in both scans (their barycentres);
           the affine matrix is fitted to them by weighted least squares, symmetrically, so
           swapping moving and fixed gives the inverse. The matrix is then checked against
           the headers' own alignment (or -i's) by normalized mutual information, and the
           better of the two kept (--no-check: the network's, always); --refine optimizes
           it by mutual information (rotation, translation, scales; 8 then 4 mm samples),
           which helps most between scans of one head in two contrasts
  rigid    the same feature points, fitted with a rotation and translation only, checked
           likewise, then optimized rigidly by mutual information (--no-refine: not)
  deform   a network predicts a stationary velocity field from both scans (assumed already
           affinely aligned, or aligned by -i), integrated by scaling and squaring (-n steps);
           symmetric: the inverse is the integral of the negated field. Smoother for larger -r.
           The network runs on its own 2 mm grid (and with --fine MM once more on a finer grid,
           on the moving image warped by the first field: the composition of both). Then
           --optimize N iterations (default 50) of mutual information, from the network's
           field, add the last millimetres: a symmetric velocity between both images in the
           network's mid-space, integrated like the network's; contrast-free (intensity
           relations are learnt from the pair); --optimize 0 keeps the network's field
  joint    affine, then deform (the default)

Transforms (-t, -T) are saved as FreeSurfer LTA matrices (.lta) for rigid and affine, and as
displacement field images in world RAS mm on the fixed grid (.nii.gz, .mgz, ...) for deform
and joint; a matrix may also be saved as a displacement image. 'apply' reads both, as do
FreeSurfer's tools for LTAs.

For ITK-based tools (ANTs, 3D Slicer, ITK-SNAP): a matrix given a .txt, .tfm or .mat path is
saved as an ITK AffineTransform (text; .mat as antsRegistration's MATLAB file), and --itk saves
displacement fields in ITK's layout (NIfTI, X x Y x Z x 1 x 3, intent vector, LPS mm), which
antsApplyTransforms -t and Slicer read as they are. docs/mri_synthmorph.md gives the
conventions."""

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
               An ITK/ANTs field (NIfTI X x Y x Z x 1 x 3, LPS mm: antsRegistration's
               *Warp.nii.gz, register --itk) is read too, converted to RAS
  .txt .tfm    ITK affine transform (text, or antsRegistration's *GenericAffine.mat): fixed to
  .mat         moving points in LPS, as ITK defines it; the output keeps the input's grid

Inputs need not be the registered image itself: any image in the same world space (another
contrast, a label map with -m nearest) is placed by its own vox2ras matrix. Multi-frame images
are resampled frame by frame. Outputs never replace an input."""

EPILOG = """\
Models: models/synthmorph_affine (affine, rigid) and models/synthmorph_deform, each with a model
card; -w gives other weights. 'apply' needs no model."""

REGISTER_EPILOG = """\
Accuracy, speed and memory on real scans, beside ANTs SyN: docs/bench_synthmorph.md and the model
cards. The affine model is coarse (a few mm): for scans already roughly aligned (e.g. to an
atlas), -m deform without it does as well or better than joint. --fine 0 is about 3x faster and
less accurate. Each level runs on the heads' bounding box, in tiles: two 256^3 whole-head
inputs need about 2.5 GB (3.8 GB with -T, -o, -O and --png as well)."""


def build_parser():
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                                formatter_class=raw)
    sub = p.add_subparsers(dest='command', required=True, metavar='{register,apply}')

    r = sub.add_parser('register', help='register two images', description=REGISTER,
                       epilog=REGISTER_EPILOG, formatter_class=raw)
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
    r.add_argument('-i', '--init', metavar='FILE',
                   help='initial matrix transform (.lta, or ITK .txt/.tfm/.mat)')
    r.add_argument('-j', '--threads', metavar='N', type=int, help='number of CPU threads')
    r.add_argument('-g', '--gpu', action='store_true', help='run on the GPU')
    r.add_argument('-r', '--regularization', metavar='LAMBDA', type=float, default=0.5,
                   help='deformation smoothness in (0, 1) (default: %(default)s)')
    r.add_argument('-n', '--steps', metavar='N', type=int, default=7,
                   help='integration steps of the deformation, at least 5 '
                        '(default: %(default)s)')
    r.add_argument('--fine', metavar='MM', type=float, default=0.0,
                   help='voxel size of a second network level, finer than the network\'s '
                        'own grid (0: none; default: %(default)g)')
    r.add_argument('--optimize', metavar='N', type=int, default=50,
                   help='iterations of mutual-information optimization after the network, on '
                        'the last level\'s grid; 0: the network\'s field as it is '
                        '(default: %(default)s)')
    r.add_argument('-e', '--extent', type=int, choices=(256, 192), default=256,
                   help='isotropic extent of the network grid in mm (default: %(default)s)')
    r.add_argument('-w', '--weights', metavar='FILE', action='append',
                   help='alternative model weights, once per model (joint: affine, deform)')
    r.add_argument('-v', '--verbose', action='store_true', help='print more information')
    r.add_argument('--refine', action='store_true',
                   help='(SynthKit) optimize the affine matrix by mutual information (about 6 s '
                        'more; the default for rigid)')
    r.add_argument('--no-refine', action='store_true',
                   help='(SynthKit) rigid: no mutual-information optimization of the matrix')
    r.add_argument('--no-check', action='store_true',
                   help='(SynthKit) keep the affine network\'s matrix even when the headers\' '
                        'own alignment has the higher mutual information')
    r.add_argument('--itk', action='store_true',
                   help='(SynthKit) save -t/-T displacement fields in ITK/ANTs layout (NIfTI '
                        'X x Y x Z x 1 x 3, LPS), for antsApplyTransforms and 3D Slicer')
    r.add_argument('--png', action='store_true',
                   help='(SynthKit) save a QC picture beside the first output: the fixed image, '
                        'the moved image and a checkerboard of both, in three orthogonal slices')
    r.set_defaults(run=register, check=check_register)

    a = sub.add_parser('apply', help='apply a transform to images', description=APPLY,
                       formatter_class=raw)
    a.add_argument('trans', help='transform file: .lta or ITK (.txt, .tfm, .mat) matrix, or '
                                 'displacement field image (ours or ITK/ANTs)')
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


def affine_check(args):
    """What follows the affine network (:meth:`Registrar.affine`'s ``check``): the header check
    by default, and the mutual-information refinement with --refine or for rigid."""
    if args.no_check:
        return 'off'
    if args.refine or (args.model == 'rigid' and not args.no_refine):
        return 'refine'
    return 'check'


def check_register(args):
    if not (args.out_moving or args.out_fixed or args.trans or args.inverse):
        return 'give at least one output: -o, -O, -t or -T'
    if args.header_only and args.model not in ('affine', 'rigid'):
        return '-H needs a rigid or affine model'
    if not 0 < args.regularization < 1:
        return '-r must lie in the open interval (0, 1)'
    if args.steps < 5:
        return '-n must be at least 5'
    if not (args.fine == 0 or 0.5 <= args.fine <= 4):
        return '--fine must be 0 (off) or a voxel size from 0.5 to 4 mm, got %g' % args.fine
    if not 0 <= args.optimize <= 1000:
        return '--optimize must be from 0 (off) to 1000 iterations, got %d' % args.optimize
    if args.weights and len(args.weights) != len(MODELS[args.model]):
        return '-w: model %s needs %d weight file(s)' % (args.model, len(MODELS[args.model]))
    deformable = args.model in ('deform', 'joint')
    for a, b in (('refine', 'no_check'), ('refine', 'no_refine')):
        if getattr(args, a) and getattr(args, b):
            return '--%s and --%s exclude each other' % (a.replace('_', '-'), b.replace('_', '-'))
    for flag, on in (('--refine', args.refine), ('--no-refine', args.no_refine),
                     ('--no-check', args.no_check)):
        if on and args.model == 'deform':
            return '%s: -m deform has no affine step (use -m joint, affine or rigid)' % flag
    matrix_exts = ('.lta',) + transforms.ITK_MATRIX_EXTS
    for flag, path in (('-t', args.trans), ('-T', args.inverse)):
        if path and deformable and path.lower().endswith(matrix_exts):
            return '%s: a %s transform is a displacement field: give an image path (%s), not ' \
                   'a matrix file' % (flag, args.model, ', '.join(io.SUPPORTED))
        if path and not deformable and not path.lower().endswith(matrix_exts + io.SUPPORTED):
            return '%s: save a matrix as .lta, an ITK .txt/.tfm/.mat (or a displacement ' \
                   'image: %s)' % (flag, ', '.join(io.SUPPORTED))
        if path and args.itk and io.split_ext(path)[1].lower() in ('.mgz', '.mgh'):
            return '%s: --itk fields are NIfTI (.nii, .nii.gz), not %s' \
                   % (flag, io.split_ext(path)[1])
    return None


def check_apply(args):
    if len(args.images) % 2:
        return 'images must come in input/output pairs, got %d path(s)' % len(args.images)
    return None


def _single_frame(vol):
    data = vol.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise io.VolumeError(vol.path, 'register needs a single-frame 3-D image, got shape %s'
                             % (vol.data.shape,))
    return data


def register(args):
    import time
    common.require_inputs(args.moving, args.fixed, args.init)
    names = MODELS[args.model]
    found = [common.find_model(name, path)
             for name, path in zip(names, args.weights or [None] * len(names))]
    flagged = [('-o', args.out_moving), ('-O', args.out_fixed), ('-t', args.trans),
               ('-T', args.inverse)]
    if args.png:
        flagged.append(('--png', common.png_beside(next(p for _, p in flagged if p))))
    common.check_outputs([args.moving, args.fixed, args.init] + list(args.weights or []),
                         flagged)
    trans_exts = ('.lta',) + transforms.ITK_MATRIX_EXTS + io.SUPPORTED
    for flag, path in flagged:
        if path:
            io.check_writable(path, {'-t': trans_exts, '-T': trans_exts,
                                     '--png': ('.png',)}.get(flag, io.SUPPORTED))
    mov = io.load_volume(args.moving)
    fix = io.load_volume(args.fixed)
    mdata, fdata = _single_frame(mov), _single_frame(fix)
    init = np.eye(4)
    if args.init:
        t = transforms.load_transform(args.init)
        if t.is_warp:
            raise common.ToolError('%s: -i needs a matrix transform (.lta, .txt, .tfm, .mat)'
                                   % args.init)
        init = t.matrix
    if args.threads:
        common.set_threads(args.threads)
    if not args.gpu:
        common.hide_gpus()

    from . import inference
    say = (lambda msg: print('%s: %s' % (PROG, msg), flush=True)) if args.verbose \
        else (lambda msg: None)
    t0 = time.time()
    affine_model = found[0] if args.model != 'deform' else None
    deform_model = found[-1] if args.model in ('deform', 'joint') else None
    reg = inference.Registrar(affine_model, deform_model, extent_mm=args.extent)
    say('models loaded (%.1f s)' % (time.time() - t0))

    matrix = init
    if affine_model is not None:
        info, check = {}, affine_check(args)
        step = reg.affine((mdata, init @ mov.affine), (fdata, fix.affine),
                          rigid=args.model == 'rigid', info=info, check=check)
        matrix = step @ init
        if info:
            own = 'initial matrix' if args.init else 'headers'
            say('mutual information (NMI): %s %.4f, network %.4f: kept the %s%s'
                % (own, info['nmi_identity'], info['nmi_network'],
                   'network' if info['start'] == 'network' else own,
                   ', refined to %.4f' % info['nmi_result'] if check == 'refine' else ''))
        say('%s matrix found (%.1f s)' % ('rigid' if args.model == 'rigid' else 'affine',
                                          time.time() - t0))
    src, dst = transforms.Geometry.of(mov), transforms.Geometry.of(fix)
    if deform_model is None:
        fwd = transforms.Transform(matrix=matrix, source=src, target=dst)
        inv = fwd.inverse()
    else:
        need_inverse = bool(args.inverse or args.out_fixed)
        u, u_inv, shape, grid = reg.deformation(
            (mdata, mov.affine), (fdata, fix.affine), matrix, args.regularization, args.steps,
            inverse=need_inverse, fine_mm=args.fine, iterations=args.optimize,
            progress=lambda msg: say('%s (%.1f s)' % (msg, time.time() - t0)))
        fwd = transforms.Transform(
            disp=inference.warp_to_world(u, grid, dst.shape, dst.affine,
                                         post=np.linalg.inv(matrix)),
            source=src, target=dst)
        inv = None
        if need_inverse:
            inv = transforms.Transform(
                disp=inference.warp_to_world(u_inv, grid, src.shape, src.affine, pre=matrix),
                source=dst, target=src)

    for trans, path in ((fwd, args.trans), (inv, args.inverse)):
        if not path:
            continue
        if path.lower().endswith('.lta'):
            transforms.write_lta(trans, path)
        elif path.lower().endswith(transforms.ITK_MATRIX_EXTS):
            transforms.write_itk_affine(trans, path)
        else:
            transforms.write_warp(trans, path, itk=args.itk)
    moved = None
    for trans, vol, path in ((fwd, mov, args.out_moving), (inv, fix, args.out_fixed)):
        if not path:
            continue
        if args.header_only:
            data, affine = transforms.header_only(trans, vol)
        else:
            data, affine = transforms.apply(trans, vol, method='linear',
                                            dtype=np.float32 if vol.data.dtype.kind == 'f'
                                            else None)
            if vol is mov:
                moved = data
        io.save_volume(data, affine, path, like=vol)
    if args.png:
        if moved is None:
            moved = transforms.apply(fwd, mov, method='linear', dtype=np.float32)[0]
        first = next(p for p in (args.out_moving, args.out_fixed, args.trans, args.inverse) if p)
        save_qc_picture(fdata, np.asarray(moved, np.float32), fix.affine, common.png_beside(first))
    say('done (%.1f s)' % (time.time() - t0))
    return 0


def save_qc_picture(fixed, moved, affine, png):
    """A QC picture at ``png``: fixed and moved images (both on the fixed grid ``affine``) at
    1 mm in LIA order, and their checkerboard."""
    from ... import geometry, qc
    if moved.ndim == 4:
        moved = moved[..., 0]
    grid = [geometry.conform((x, affine), voxsize=1.0, multiple=1).data for x in (fixed, moved)]
    qc.save_png(qc.registration_montage(*grid), png)


def apply(args):
    common.require_inputs(args.trans)
    trans = transforms.load_transform(args.trans)
    if args.header_only and trans.is_warp:
        raise common.ToolError('%s: -H needs a matrix transform (.lta), not a displacement field'
                               % args.trans)
    pairs = list(zip(args.images[::2], args.images[1::2]))
    common.check_outputs([args.trans] + [i for i, _ in pairs], [('output', o) for _, o in pairs])

    if not trans.is_warp and trans.target is None:
        what = 'an ITK matrix file stores no grid' if args.trans.lower().endswith(
            transforms.ITK_MATRIX_EXTS) else 'the LTA has no valid destination volume info'
        common.warn(PROG, '%s: %s; outputs take each input\'s own grid' % (args.trans, what))
    report = common.BatchReport(PROG)
    for inp, out in pairs:
        report.attempt(inp, apply_one, trans, inp, out, args.method, args.fill, args.type,
                       args.header_only)
    return report.finish()


def apply_one(trans, inp, out, method='linear', fill=0, dtype=None, header_only=False):
    """Resample (or, with ``header_only``, re-header) image ``inp`` through ``trans`` to ``out``."""
    io.check_writable(out)
    vol = io.load_volume(inp, allow_empty=True)
    out_dtype = np.dtype(dtype) if dtype is not None else np.asarray(vol.data).dtype
    if out_dtype.kind in 'iub' and not header_only:
        limits = np.iinfo(out_dtype) if out_dtype.kind != 'b' else np.iinfo(np.uint8)
        if not (np.isfinite(fill) and limits.min <= fill <= limits.max):
            raise common.ToolError('%s: --fill %g cannot be stored in %s voxels'
                                   % (inp, fill, out_dtype))
    if header_only:
        data, affine = transforms.header_only(trans, vol)
    else:
        data, affine = transforms.apply(trans, vol, method=method, fill=fill, dtype=dtype)
    io.save_volume(data, affine, out, like=vol, dtype=dtype)
