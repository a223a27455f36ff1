"""mri_synthsr: any brain scan -> a 1 mm isotropic MPRAGE-like T1 (SynthSR).

Pipeline per scan: load -> conform (1 mm, LIA, covering the input's field of view, robust
intensity rescale) -> mri_synthseg's refined 1 mm posteriors -> U-Net prediction of the T1 from
the scan and those posteriors (averaged with the left/right mirrored scan unless
--disable_flipping) -> light unsharp masking (unless --disable_sharpening) -> written in
FreeSurfer's T1 scale (white matter about 110).
"""

import argparse
import sys

import numpy as np

from ... import io
from ...cli import common

PROG = 'mri_synthsr'

DESCRIPTION = """\
Turn brain scans of any contrast, resolution and slice direction (including thick-slice clinical
scans and CT with --ct) into 1 mm isotropic T1-weighted images with MPRAGE contrast (SynthSR),
for tools that expect a T1: mri_synthseg, FreeSurfer's recon-all, morphometry pipelines.

Inputs may be a single image (nii, nii.gz, mgz, mgh), a folder of images, or a .txt file with
one path per line; --o must then be of the same kind (file, folder, .txt with as many lines).
Outputs are float32 images at 1 mm in LIA orientation covering the input's field of view, with
white matter near 110 as in FreeSurfer's T1.mgz.
"""

#: Suffixes of this tool's outputs: a folder's earlier results are not inputs again.
DERIVED = ('_synthsr',)


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--i', metavar='PATH', required=True,
                   help='input image, folder of images, or .txt list of images')
    p.add_argument('--o', metavar='PATH', required=True,
                   help='output image, folder, or .txt list (same kind as --i)')
    p.add_argument('--ct', action='store_true', help='inputs are CT scans (clipped to 0-80 HU)')
    p.add_argument('--disable_sharpening', action='store_true',
                   help='skip the final sharpening step')
    p.add_argument('--disable_flipping', action='store_true',
                   help='skip left-right flip averaging, in the T1 network and in the '
                        'segmentation it starts from (about 2x faster, slightly less accurate)')
    p.add_argument('--lowfield', action='store_true',
                   help='variant for low-field scans (e.g. portable 64 mT scanners)')
    p.add_argument('--v1', action='store_true', help='first version of the model (not available)')
    p.add_argument('--threads', metavar='N', type=int, default=1,
                   help='number of CPU threads, <=0 for all (default: %(default)s)')
    p.add_argument('--cpu', action='store_true', help='run on the CPU even if a GPU is present')
    p.add_argument('--model', metavar='FILE', help='alternative model weights (.weights.h5)')
    # ours
    p.add_argument('--crop', type=common.crop_size, nargs='+', metavar='N',
                   help='process only a centred box of N (or NX NY NZ) mm')
    p.add_argument('--png', action='store_true',
                   help='write a QC picture (input above, output below) beside each output')
    return p


def _outputs(args):
    pairs = io.batch_pairs(args.i, args.o, '_synthsr', derived=DERIVED)
    outputs = []
    for _, out in pairs:
        outputs.append(('--o', out))
        if args.png:
            outputs.append(('--png', common.png_beside(out)))
    common.check_outputs([i for i, _ in pairs] + [args.model], outputs)
    for flag, path in outputs:
        io.check_writable(path, exts=('.png',) if flag == '--png' else io.SUPPORTED)
    return pairs


def synthesize_one(sr, args, inp, out):
    """Synthesize one scan and write its outputs (True when done)."""
    vol, data, crop = common.read_scan(PROG, inp, args.crop, args.ct)
    result = sr.synthesize(data, vol.affine, flip=not args.disable_flipping,
                           sharpening=not args.disable_sharpening, crop=crop)
    io.save_volume(result.image, result.grid.affine, out, dtype=np.float32)
    if args.png:
        from ... import qc
        top = qc.montage(result.grid.data)
        bottom = qc.montage(np.clip(result.image / 150.0, 0, 1))
        qc.save_png(np.concatenate([top, bottom], 0), common.png_beside(out))
    return True


def find_model(lowfield=False, model=None):
    """(weights, card) of the SynthSR model ``--model`` names, else the shipped one
    (``models/synthsr_lowfield`` with ``lowfield``); raises ModelUnavailable, for
    ``--lowfield`` with its own message while that variant is not shipped."""
    try:
        return common.find_model('synthsr_lowfield' if lowfield else 'synthsr', model,
                                 tasks=('synthsr', 'synthsr_lowfield'))
    except common.ModelUnavailable:
        if lowfield and not model:
            raise common.ModelUnavailable('--lowfield: model not yet available (the low-field '
                                          'variant is not trained yet)') from None
        raise


def synthesize(args):
    common.require_inputs(args.i)
    if args.crop and len(args.crop) not in (1, 3):
        raise common.ToolError('--crop takes 1 or 3 sizes')
    if args.v1:
        raise common.ModelUnavailable('--v1: model not yet available (SynthSR 1.0)')
    if args.cpu:
        common.hide_gpus()
    pairs = _outputs(args)                   # every output checked before any work
    weights, card = find_model(args.lowfield, args.model)
    common.set_threads(args.threads)
    from .inference import Synthesizer      # TensorFlow: only once the arguments are known good
    sr = Synthesizer(weights, card)
    report = common.BatchReport(PROG)
    for inp, out in common.progress(pairs, 'synthesizing', disable=len(pairs) == 1):
        if report.attempt(inp, synthesize_one, sr, args, inp, out):
            print('%s: wrote %s' % (PROG, out), file=sys.stderr)
    return report.finish()


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.run(PROG, synthesize, args)
