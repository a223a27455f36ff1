"""Remove non-brain tissue from a head scan of any contrast or resolution (SynthStrip).

A network trained only on synthetic images predicts the signed distance of every voxel to the
brain boundary, so one model serves T1w, T2w, FLAIR, PD, DWI, EPI and CT scans alike. The brain
mask is where that distance is below --border mm (largest connected component, holes filled);
it includes the cerebrospinal fluid around the brain unless --no-csf is given. Outputs keep the
geometry of the input image; multi-frame inputs are stripped frame by frame.
"""

import argparse
import sys

import numpy as np

from ... import io
from ...cli import common

common.use_system_allocator()       # before TensorFlow's import: bounded memory

PROG = 'mri_synthstrip'


def _finite(text):
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError('expected a finite number, got %s' % text)
    return value


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-i', '--image', metavar='FILE', required=True, help='input image to strip')
    p.add_argument('-o', '--out', metavar='FILE', help='save the skull-stripped image')
    p.add_argument('-m', '--mask', metavar='FILE', help='save the binary brain mask')
    p.add_argument('-d', '--sdt', metavar='FILE', help='save the signed distance transform (mm)')
    p.add_argument('-g', '--gpu', action='store_true', help='run on the GPU')
    p.add_argument('-b', '--border', metavar='MM', type=_finite, default=1,
                   help='mask border threshold in mm (default: %(default)s)')
    p.add_argument('-t', '--threads', metavar='N', type=int, help='number of CPU threads')
    p.add_argument('--no-csf', action='store_true', help='exclude CSF from the brain border')
    p.add_argument('--model', metavar='FILE', help='alternative model weights (.weights.h5)')
    p.add_argument('--fill', metavar='VALUE', type=_finite, default=0,
                   help='(SynthKit) value of removed voxels in --out (default: %(default)s)')
    p.add_argument('--png', action='store_true',
                   help='(SynthKit) save a QC picture (mask over the image) beside the first output')
    return p


def strip(args):
    outputs = [p for p in (args.out, args.mask, args.sdt) if p]
    common.require_inputs(args.image)
    flagged = [('-o', args.out), ('-m', args.mask), ('-d', args.sdt)]
    if args.png:
        flagged.append(('--png', common.png_beside(outputs[0])))
    common.check_outputs([args.image, args.model], flagged)
    weights, card = common.find_model('synthstrip_nocsf' if args.no_csf else 'synthstrip',
                                      args.model, tasks=('synthstrip', 'synthstrip_nocsf'))
    for flag, path in flagged:
        if path:
            io.check_writable(path, ('.png',) if flag == '--png' else io.SUPPORTED)
    vol = io.load_volume(args.image)
    if args.out:
        check_fill(vol, args.fill)
    if args.threads:
        common.set_threads(args.threads)
    if not args.gpu:
        common.hide_gpus()
    from .inference import Stripper   # TensorFlow: once the inputs are known good
    net = Stripper(weights, card)
    litres = strip_one(net, vol, args.out, args.mask, args.sdt, border=args.border,
                       fill=args.fill, png=common.png_beside(outputs[0]) if args.png else None,
                       progress=True)
    print('%s: brain volume %.1f cm^3' % (PROG, litres * 1000), file=sys.stderr)
    return 0


def check_fill(vol, fill):
    """Refuse a --fill value that the input's integer voxels cannot hold."""
    fill_dtype = np.asarray(vol.data).dtype
    if fill_dtype.kind in 'iu' and float(fill).is_integer():
        info = np.iinfo(fill_dtype)
        if not info.min <= fill <= info.max:
            raise common.ToolError('--fill %g does not fit the %s voxels of %s (%d to %d)'
                                   % (fill, fill_dtype, vol.path, info.min, info.max))


def strip_one(net, vol, out=None, mask_path=None, sdt_path=None, border=1, fill=0, png=None,
              progress=False):
    """Strip one loaded volume (every frame) and write the outputs given; returns the brain
    volume in litres (first frame), after warning if it is implausible."""
    from .inference import brain_mask
    frames = [vol.frame(f) for f in range(vol.nframes)] if vol.nframes > 1 else [vol]
    masks, sdts = [], []
    for frame in common.progress(frames, 'stripping', disable=not progress or len(frames) == 1):
        sdt, image_net, sdt_net = net.distance(frame.data, frame.affine)
        masks.append(brain_mask(sdt, border))
        sdts.append(sdt.astype(np.float32))
    stack = (lambda xs: np.stack(xs, -1)) if vol.nframes > 1 else (lambda xs: xs[0])
    mask = stack(masks)
    if out:
        data = np.asarray(vol.data)
        dtype = data.dtype if float(fill).is_integer() else np.float32
        io.save_volume(np.where(mask, data, fill).astype(dtype), vol.affine, out, like=vol)
    if mask_path:
        io.save_volume(mask.astype(np.uint8), vol.affine, mask_path, like=vol)
    if sdt_path:
        io.save_volume(stack(sdts), vol.affine, sdt_path, like=vol)
    if png:
        from ... import qc
        qc.save_png(qc.montage(image_net, np.where(sdt_net < border, 12, 0)), png)
    litres = masks[0].sum() * abs(np.linalg.det(vol.affine[:3, :3])) / 1e6
    if not 0.5 <= litres <= 2.5:
        common.warn(PROG, '%s: implausible brain volume %.2f L (expected 0.5-2.5 L): is it a '
                    'head MRI?' % (vol.path, litres))
    return float(litres)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.out or args.mask or args.sdt):
        parser.error('give at least one output: -o, -m or -d')
    common.run(PROG, strip, args)
