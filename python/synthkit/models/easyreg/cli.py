"""Register two brain scans of any contrast or resolution, affinely and nonlinearly (EasyReg).

Both scans are first segmented with SynthSeg (segmentations given with --ref_seg/--flo_seg are
used as they are; missing ones are computed and saved there). An affine transform is fitted to
the centroids of the structures segmented in both scans (robust least squares, symmetric: no
network), then SynthMorph's deformable network finds a symmetric diffeomorphic deformation in
the affine mid-space of the two scans, finished by a short symmetric optimization of mutual
information (--optimize): the forward and backward fields are exact inverses, and swapping
--ref and --flo gives the inverse transform.

Fields are FreeSurfer EasyReg's: 3-frame images holding, for every voxel of the grid they lie on,
the absolute RAS mm coordinates of the matching point in the other scan (the forward field lies
on the reference grid and points into the floating scan). Apply them with mri_easywarp.

examples:
  mri_easyreg --ref t1.nii.gz --flo flair.nii.gz --ref_seg t1_seg.mgz --flo_seg flair_seg.mgz \\
      --flo_reg flair_in_t1.nii.gz --fwd_field fwd.nii.gz --bak_field bak.nii.gz --threads 2
  mri_easywarp --i flair_lesions.nii.gz --o lesions_in_t1.nii.gz --field fwd.nii.gz --nearest
"""

import argparse
import os
import sys
import time

import numpy as np

from ... import io
from ... import labels as lab
from ... import transforms
from ...cli import common

PROG = 'mri_easyreg'

EPILOG = """\
Models: models/synthseg (segmentation) and models/synthmorph_deform (deformation), with their
model cards. --mode chooses what the deformable network sees: 'image' (default) the scans
themselves, masked to the segmented heads; 'seg' renderings of the two segmentations with one
fixed intensity per structure. On 6 dev OASIS pairs, aseg Dice after registration 0.829 at the
defaults (0.620 before; docs/mri_easyreg.md); before the MI optimization, on 3 pairs: image 0.783,
seg 0.697."""


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ref', metavar='FILE', required=True, help='reference image')
    p.add_argument('--flo', metavar='FILE', required=True, help='floating image')
    p.add_argument('--ref_seg', metavar='FILE', required=True,
                   help='SynthSeg segmentation of the reference (computed and saved here if it '
                        'does not exist)')
    p.add_argument('--flo_seg', metavar='FILE', required=True,
                   help='SynthSeg segmentation of the floating image (computed and saved here if '
                        'it does not exist)')
    p.add_argument('--ref_reg', metavar='FILE',
                   help='save the reference image deformed to the floating image')
    p.add_argument('--flo_reg', metavar='FILE',
                   help='save the floating image deformed to the reference image')
    p.add_argument('--fwd_field', metavar='FILE',
                   help='save the forward field (on the reference grid; for mri_easywarp)')
    p.add_argument('--bak_field', metavar='FILE',
                   help='save the backward field (on the floating grid)')
    p.add_argument('--affine_only', action='store_true',
                   help='affine registration only (no deformable network)')
    p.add_argument('--threads', metavar='N', type=int, default=1,
                   help='number of CPU threads, -1 for all (default: %(default)s)')
    p.add_argument('--mode', choices=('image', 'seg'), default='image',
                   help='(SynthKit) input of the deformable network (default: %(default)s)')
    p.add_argument('--fine', metavar='MM', type=float, default=0.0,
                   help='(SynthKit) voxel size of a second network level, finer than the '
                        'network\'s own grid (0: none; default: %(default)g)')
    p.add_argument('--optimize', metavar='N', type=int, default=100,
                   help='(SynthKit) iterations of mutual-information optimization after the '
                        'network (0: none; default: %(default)s)')
    p.add_argument('-v', '--verbose', action='store_true', help='(SynthKit) print each step')
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.ref_reg or args.flo_reg or args.fwd_field or args.bak_field):
        parser.error('give at least one output: --ref_reg, --flo_reg, --fwd_field or --bak_field')
    if not (args.fine == 0 or 0.5 <= args.fine <= 4):
        parser.error('--fine must be 0 (off) or a voxel size from 0.5 to 4 mm, got %g' % args.fine)
    if not 0 <= args.optimize <= 1000:
        parser.error('--optimize must be from 0 (off) to 1000 iterations, got %d' % args.optimize)
    common.run(PROG, register, args)


def _outputs(args):
    """Every output checked (disjoint from the inputs and each other, writable) before work;
    segmentations that do not exist yet are outputs too."""
    common.require_inputs(args.ref, args.flo)
    missing = [(flag, path) for flag, path in (('--ref_seg', args.ref_seg),
                                               ('--flo_seg', args.flo_seg))
               if not os.path.exists(path)]
    inputs = [args.ref, args.flo] + [p for p in (args.ref_seg, args.flo_seg)
                                     if not any(p == m for _, m in missing)]
    outputs = missing + [('--ref_reg', args.ref_reg), ('--flo_reg', args.flo_reg),
                         ('--fwd_field', args.fwd_field), ('--bak_field', args.bak_field)]
    common.check_outputs(inputs, outputs)
    for _, path in outputs:
        if path:
            io.check_writable(path)
    return [path for _, path in missing]


def _segmentation(path, image, segmenter, say):
    """``(labels, affine)`` of ``path``, computed from ``image`` and saved there if missing."""
    if os.path.exists(path):
        vol = io.load_volume(path)
        if vol.data.ndim != 3:
            raise io.VolumeError(path, 'a segmentation must be a 3-D label map, got shape %s'
                                 % (vol.data.shape,))
        if vol.data.dtype.kind == 'f' and not np.allclose(vol.data, np.rint(vol.data)):
            raise io.VolumeError(path, 'not a label map (non-integer values)')
        return np.asarray(vol.data), vol.affine
    result = segmenter().segment(np.asarray(image.data, np.float32), image.affine)
    io.save_volume(result.hard, result.grid.affine, path, lut=lab.color_table(
        segmenter().labels), dtype=np.int32)
    say('segmented %s into %s' % (image.path, path))
    return result.hard, result.grid.affine


def _image(path):
    vol = io.load_volume(path)
    if vol.nframes > 1:
        common.warn(PROG, '%s has %d frames; registering the first' % (path, vol.nframes))
        vol = vol.frame(0)
    if vol.data.ndim != 3:
        raise io.VolumeError(path, 'needs a single-frame 3-D image, got shape %s'
                             % (vol.data.shape,))
    return vol


def register(args):
    t0 = time.time()
    missing = _outputs(args)
    say = (lambda msg: print('%s: %s (%.1f s)' % (PROG, msg, time.time() - t0),
                             file=sys.stderr, flush=True)) if args.verbose else (lambda m: None)
    seg_model = common.find_model('synthseg') if missing else None
    deform_model = None if args.affine_only else common.find_model('synthmorph_deform')
    ref, flo = _image(args.ref), _image(args.flo)
    common.set_threads(args.threads)

    cache = {}

    def segmenter():
        if 'seg' not in cache:
            from ..synthseg.inference import Segmenter
            cache['seg'] = Segmenter(*seg_model)
        return cache['seg']

    ref_seg = _segmentation(args.ref_seg, ref, segmenter, say)
    flo_seg = _segmentation(args.flo_seg, flo, segmenter, say)
    cache.clear()

    from .inference import EasyReg, coordinates_from_transform
    reg = EasyReg(deform_model)
    fwd, bak, a = reg.register((np.asarray(ref.data, np.float32), ref.affine),
                               (np.asarray(flo.data, np.float32), flo.affine), ref_seg, flo_seg,
                               mode=args.mode, fine_mm=args.fine or None,
                               iterations=args.optimize, progress=say)
    for trans, path in ((fwd, args.fwd_field), (bak, args.bak_field)):
        if path:
            warp = trans.as_warp()
            io.save_volume(coordinates_from_transform(warp), warp.target.affine, path,
                           dtype=np.float32)
    for trans, vol, path in ((fwd, flo, args.flo_reg), (bak, ref, args.ref_reg)):
        if path:
            data, affine = transforms.apply(trans, vol, method='linear', dtype=np.float32)
            io.save_volume(data, affine, path, like=vol)
    say('done')
    return 0
