"""mri_synthseg: contrast- and resolution-agnostic whole-brain segmentation.

Pipeline per scan: load -> conform (1 mm, LIA, robust intensity rescale) -> U-Net posteriors
(averaged with the left/right mirrored scan unless --fast) -> post-processing (smoothing,
largest connected components of the brain and of each structure class; skipped with --fast) ->
1 mm posteriors sharpened by the scan's per-label Gaussian intensity model (unless
--disable_intensity_model) -> argmax -> outputs at 1 mm in network space, or on the input grid
with --keepgeom.
"""

import argparse
import sys

import numpy as np

from ... import geometry, io
from ... import labels as lab
from ...cli import common

common.use_system_allocator()       # before TensorFlow's import: bounded memory

PROG = 'mri_synthseg'

DESCRIPTION = """\
Segment brain MRI scans of any contrast and resolution into 33 aseg labels (SynthSeg).

Inputs may be a single image (nii, nii.gz, mgz, mgh), a folder of images, or a .txt file with
one path per line; --o (and --post, --resample) must then be of the same kind (file, folder,
.txt with as many lines). Outputs are segmentations in FreeSurfer aseg numbering, at 1 mm
isotropic in LIA orientation covering the input's field of view (or on the input grid with
--keepgeom). mgz outputs embed the FreeSurfer colour table.
"""


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--i', required=True, metavar='IN', help='image, folder or .txt list')
    p.add_argument('--o', required=True, metavar='OUT', help='segmentation(s): file, folder or .txt')
    p.add_argument('--parc', action='store_true',
                   help='cortical parcellation: cortex voxels become Desikan-Killiany parcels')
    p.add_argument('--robust', action='store_true', help='robust model (not available yet)')
    p.add_argument('--fast', action='store_true',
                   help='skip left/right flip averaging, the second network grid and '
                        'post-processing (about 1.5x faster)')
    p.add_argument('--disable_intensity_model', action='store_true',
                   help="labels from the network's posteriors alone, without the scan's "
                        "per-label intensity model that sharpens them at 1 mm (SynthKit)")
    p.add_argument('--vol', metavar='CSV', help='write soft volumes (mm^3) of every structure')
    p.add_argument('--qc', metavar='CSV', help='write quality scores per structure group')
    p.add_argument('--post', metavar='OUT', help='write posteriors (33 frames)')
    p.add_argument('--resample', metavar='OUT', help='write the input resampled to 1 mm')
    p.add_argument('--crop', type=common.crop_size, nargs='+', metavar='N',
                   help='analyse only a centred crop of N (or NX NY NZ) mm')
    p.add_argument('--threads', type=int, default=1, help='CPU threads (default 1; <=0: all)')
    p.add_argument('--cpu', action='store_true', help='run on the CPU even if a GPU is present')
    p.add_argument('--v1', action='store_true', help='SynthSeg 1.0 model (not available)')
    p.add_argument('--ct', action='store_true', help='CT scan: clip intensities to [0, 80]')
    # ours
    p.add_argument('--keepgeom', action='store_true',
                   help='write outputs on the input voxel grid instead of 1 mm')
    p.add_argument('--png', action='store_true',
                   help='write a QC picture (3 slices, labels overlaid) beside each output')
    p.add_argument('--seed', type=int, default=0, help='random seed (results are deterministic)')
    p.add_argument('--model', metavar='WEIGHTS', help='weights file (default: shipped model)')
    p.add_argument('--parc_model', metavar='WEIGHTS',
                   help='parcellation weights file (default: shipped model)')
    return p


#: Suffixes of this tool's outputs: a folder's earlier results are not inputs again.
DERIVED = ('_synthseg', '_posteriors', '_resampled')


def _outputs(args):
    """Per-input tuples (input, seg, post, resampled), checked before any work: outputs are
    disjoint from the inputs and from each other, and writable."""
    pairs = io.batch_pairs(args.i, args.o, '_synthseg', derived=DERIVED)
    post = io.batch_optional(args.i, args.post, '_posteriors', derived=DERIVED) if args.post \
        else [None] * len(pairs)
    res = io.batch_optional(args.i, args.resample, '_resampled', derived=DERIVED) \
        if args.resample else [None] * len(pairs)
    jobs = [(i, o, p, r) for (i, o), p, r in zip(pairs, post, res)]
    outputs = [('--vol', args.vol), ('--qc', args.qc)]
    for _, out, post_path, res_path in jobs:
        outputs += [('--o', out), ('--post', post_path), ('--resample', res_path)]
        if args.png:
            outputs.append(('--png', common.png_beside(out)))
    common.check_outputs([i for i, _, _, _ in jobs] + [args.model, args.parc_model], outputs)
    for flag, path in outputs:
        if path:
            io.check_writable(path, exts=('.csv',) if flag in ('--vol', '--qc') else
                              ('.png',) if flag == '--png' else io.SUPPORTED)
    return jobs


def _check_result(path, volumes, qc):
    """One warning line for an implausible result (no brain-sized brain, low confidence)."""
    brain = sum(v for label, v in volumes.items() if label not in (0, 24) and label < 1000) / 1e6
    if not 0.5 <= brain <= 2.5:
        common.warn(PROG, '%s: implausible brain volume %.2f L (expected 0.5-2.5 L): is it a '
                    'brain MRI?' % (path, brain))
    low = [name for name, score in qc.items() if 0 < score < 0.5]
    if low:
        common.warn(PROG, '%s: low QC scores (%s): check the segmentation' % (path, ', '.join(low)))


def find_parcellation(path=None):
    """(weights, card) of the parcellation model, or :class:`common.ModelUnavailable` naming
    --parc."""
    try:
        return common.find_model('synthparc', path)
    except common.ModelUnavailable as e:
        raise common.ModelUnavailable('--parc: %s' % e) from None


def segment_one(seg, args, inp, out, post_path, res_path, parc=None):
    """Segment one scan and write its outputs (with ``parc``, a Parcellator, the cortex
    parcellated); returns (volumes, qc scores)."""
    vol, data, crop = common.read_scan(PROG, inp, args.crop, args.ct, verb='segmenting')
    writers = []

    def posteriors_file(grid, channels):
        """--post on the 1 mm grid, slab by slab (with --keepgeom a scratch file beside it)."""
        writers.append(io.FrameWriter(post_path, grid.data.shape, len(channels), grid.affine,
                                      fill={channels.index(0): 1.0}))
        return writers[-1]

    try:
        result = seg.segment(data, vol.affine, fast=args.fast, crop=crop,
                             keep_posteriors=posteriors_file if post_path else False, parc=parc)
        grid, hard = result.grid, result.hard
        lut = lab.color_table(output_labels(seg, parc))
        if args.keepgeom:
            io.save_volume(geometry.to_input_grid(hard, grid, 'nearest'), vol.affine, out,
                           like=vol, lut=lut, dtype=np.int32)
        else:
            io.save_volume(hard, grid.affine, out, lut=lut, dtype=np.int32)
        if post_path and args.keepgeom:      # frame by frame onto the input grid
            on_grid = writers[0]
            with io.FrameWriter(post_path, grid.src_shape[:3], on_grid.shape[3],
                                grid.src_affine) as moved:
                for c in range(on_grid.shape[3]):
                    moved.write_frame(c, geometry.to_input_grid(on_grid.read_frame(c), grid,
                                                                'linear'))
        elif post_path:
            writers[0].close()
    finally:
        for w in writers:
            w.discard()        # the scratch file, or what a failure left
    if res_path:
        raw = geometry.conform((data, vol.affine), voxsize=1.0, crop=crop, multiple=16, rescale=False)
        io.save_volume(raw.data, raw.affine, res_path, like=vol)
    if args.png:
        from ... import qc
        qc.save_png(qc.montage(grid.data, hard), common.png_beside(out))
    _check_result(inp, result.volumes, result.qc)
    return result.volumes, result.qc


def output_labels(seg, parc=None):
    """The labels a segmentation may hold: the 33 structures, and the parcels with ``parc``."""
    return tuple(seg.labels) + (lab.PARCEL_LABELS if parc is not None else ())


def write_volumes_csv(path, rows, out_labels):
    """One row per subject: subject, total intracranial, then every structure (mm^3), then
    the cortical parcels if ``out_labels`` has them (their volumes add up to the cortex's, so
    they do not count again in the intracranial total)."""
    structures = [k for k in out_labels if 0 < k < 1000]
    parcels = [k for k in out_labels if k >= 1000]
    header = ['subject', 'total intracranial'] + [lab.SYNTHSEG_NAMES[k] for k in structures] \
        + [lab.name(k) for k in parcels]
    io.save_csv(path, header, [[name, '%.3f' % sum(v[k] for k in structures)]
                               + ['%.3f' % v[k] for k in structures + parcels]
                               for name, v in rows])


def write_qc_csv(path, rows):
    names = [g for g, _ in lab.QC_GROUPS]
    io.save_csv(path, ['subject'] + names,
                [[subject] + ['%.4f' % s[g] for g in names] for subject, s in rows])


def run(args):
    for flag, what in (('robust', 'the robust model'), ('v1', 'the SynthSeg 1.0 model')):
        if getattr(args, flag):
            raise common.ModelUnavailable('--%s: model not yet available (%s)' % (flag, what))
    if args.crop and len(args.crop) not in (1, 3):
        raise common.ToolError('--crop takes 1 or 3 sizes')
    if args.cpu:
        common.hide_gpus()
    if args.parc_model and not args.parc:
        raise common.ToolError('--parc_model needs --parc')
    jobs = _outputs(args)            # every output checked before any work
    weights, card = common.find_model('synthseg', args.model)
    parc_model = find_parcellation(args.parc_model) if args.parc else None
    common.set_threads(args.threads)
    from .inference import Segmenter   # TensorFlow: only once the arguments are known good
    seg = Segmenter(weights, card)
    seg.intensity_model = not args.disable_intensity_model
    parc = None
    if parc_model:
        from ..synthparc.inference import Parcellator
        parc = Parcellator(*parc_model)

    report = common.BatchReport(PROG)
    vol_rows, qc_rows = [], []
    for inp, out, post, res in common.progress(jobs, 'segmenting', disable=len(jobs) == 1):
        result = report.attempt(inp, segment_one, seg, args, inp, out, post, res, parc)
        if result is not None:
            vol_rows.append((io.stem(inp), result[0]))
            qc_rows.append((io.stem(inp), result[1]))
            print('%s: wrote %s' % (PROG, out), file=sys.stderr)
    if args.vol and vol_rows:
        write_volumes_csv(args.vol, vol_rows, output_labels(seg, parc))
    if args.qc and qc_rows:
        write_qc_csv(args.qc, qc_rows)
    return report.finish()


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.run(PROG, run, args)
