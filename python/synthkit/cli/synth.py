"""Synthesize random MRI scans, with their label maps, from brain label maps (SynthSeg's
domain-randomization generator).

Each pair is drawn afresh: the label map is randomly deformed (affine and smooth nonlinear,
left/right flip with hemisphere labels swapped), every label is painted with a random Gaussian
intensity, then a random bias field, acquisition resolution and contrast curve are applied. The
images look like scans of random contrast and resolution with exact labels: the data SynthKit's
networks are trained on.

The label maps must be 1 mm voxels of integer labels in 0..1023, numbered like FreeSurfer's
aseg (the generation labels of synthkit.labels; other labels are painted like background). Their
header gives the left-right axis used for flipping.
"""

import argparse
import dataclasses
import json
import os
import secrets
import sys
import zlib

import numpy as np

from .. import geometry, io
from .. import labels as lab
from . import common

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

PROG = 'mri_synth'
MARGIN = 8       # voxels kept around the labelled bounding box (as LabelMapBank)
SOURCE_MULTIPLE = 32  # sources are padded to a multiple of this: one compile serves many maps

EPILOG = """\
outputs, for each input NAME (the file name without extension) and k = 000 .. N-1:
  OUTDIR/NAME_k_image.nii.gz   synthetic image, float32 in [0, 1]
  OUTDIR/NAME_k_labels.nii.gz  its labels, int16: the input's labels deformed like the image,
                               left/right labels swapped when the sample was flipped
  OUTDIR/NAME_k.png            (--png) three orthogonal mid slices, labels in LUT colours below
Both volumes are on a grid of --shape voxels of --voxsize mm, with the axis directions and
orientation code of the input, centred on the labelled part of the input.

--config: a JSON object of generator parameters to override (the fields of
synthkit.generator.GeneratorParams, see docs/mri_synth.md), e.g.
  {"flip_prob": 0, "std_range": [0, 10], "resolution_prob": 0}
lr_axis is taken from each input's header.

Reproducibility: the same inputs, --seed and options give byte-identical files, and each
input's pairs depend only on the seed and its name (not on the other inputs of a batch).
Without --seed a random one is drawn and printed.
Exit status: 0, or 1 if any input failed (the others are still processed).

example: mri_synth --i aseg.mgz --o synth/ --n 10 --seed 1 --png"""


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--i', metavar='INPUT', required=True,
                   help='label map (.nii, .nii.gz, .mgz, .mgh), a folder of them, or a .txt '
                        'file listing one per line')
    p.add_argument('--o', metavar='OUTDIR', required=True,
                   help='output folder (created if missing)')
    p.add_argument('--n', metavar='N', type=int, default=1,
                   help='number of pairs per input label map (default: %(default)s)')
    p.add_argument('--seed', metavar='S', type=int,
                   help='random seed (default: a random one, printed)')
    p.add_argument('--shape', metavar=('X', 'Y', 'Z'), type=int, nargs=3, default=[160] * 3,
                   help='output grid in voxels (default: 160 160 160)')
    p.add_argument('--voxsize', metavar='MM', type=float,
                   help='output voxel size in mm (default: voxsize_mm of --config, 1)')
    p.add_argument('--config', metavar='JSON',
                   help='generator parameters to override (JSON object; see below)')
    p.add_argument('--png', action='store_true',
                   help='also save a PNG picture of each pair')
    p.add_argument('--threads', metavar='N', type=int,
                   help='number of CPU threads (default: all)')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    common.run(PROG, synthesize, args)


# ---------------------------------------------------------------------------------------------
# pipeline

def synthesize(args):
    if args.n < 1:
        raise common.ToolError('--n must be at least 1, got %d' % args.n)
    if min(args.shape) < 8:
        raise common.ToolError('--shape must be at least 8 voxels per axis, got %s'
                               % ' '.join(map(str, args.shape)))
    if args.threads is not None and args.threads < 1:
        raise common.ToolError('--threads must be at least 1, got %d' % args.threads)
    if args.voxsize is not None and not 0 < args.voxsize < float('inf'):
        raise common.ToolError('--voxsize must be a positive number, got %g' % args.voxsize)
    if os.path.exists(args.o) and not os.path.isdir(args.o):
        raise common.ToolError('%s: --o must be a folder, not a file' % args.o)
    inputs = [path for path, _ in io.batch_pairs(args.i, None, derived=DERIVED)]
    io.check_writable(os.path.join(args.o, '.%s_check.nii.gz' % PROG))
    common.check_outputs(inputs + [args.config], [
        ('--o', path) for inp in inputs for path in output_paths(inp, args.o, args.n, args.png)])

    common.set_threads(args.threads)
    from .. import generator   # imports Keras and TensorFlow: after the thread settings
    params = load_params(args.config, generator.GeneratorParams)
    if args.voxsize is not None:
        params = dataclasses.replace(params, voxsize_mm=args.voxsize)
    seed = args.seed
    if seed is None:
        seed = secrets.randbelow(2 ** 31)
        print('%s: seed %d (pass --seed %d to reproduce)' % (PROG, seed, seed), file=sys.stderr)

    synth = Synthesizer(generator, params, tuple(args.shape), seed)
    report = common.BatchReport(PROG)
    bar = common.progress(None, PROG, total=len(inputs) * args.n)
    names = {}
    for path in inputs:
        done = report.attempt(path, synth.write_pairs, path, args.o, args.n, args.png, names,
                              bar)
        if done is None:
            bar.update(args.n - synth.written_for_last)
    bar.close()
    print('%s: wrote %d pair(s) for %d label map(s) to %s'
          % (PROG, synth.written, report.done, args.o))
    return report.finish()


def load_params(path, params_class):
    """Generator parameters: defaults updated from the JSON object in ``path`` (if any)."""
    if path is None:
        return params_class()
    try:
        with open(path) as f:
            values = json.load(f)
    except OSError as e:
        raise common.ToolError('%s: cannot read config (%s)' % (path, e.strerror or e)) from None
    except ValueError as e:
        raise common.ToolError('%s: not valid JSON (%s)' % (path, e)) from None
    if not isinstance(values, dict):
        raise common.ToolError('%s: config must be a JSON object of {name: value}' % path)
    if 'lr_axis' in values:
        print('%s: warning: %s: lr_axis is ignored (taken from each input\'s header)'
              % (PROG, path), file=sys.stderr)
    try:
        return params_class.from_dict(values)
    except (TypeError, ValueError) as e:     # unknown names, invalid values
        raise common.ToolError('%s: %s' % (path, e)) from None


class Synthesizer:
    """Compiled samplers (one per left-right axis and source shape), reseeded per input."""

    def __init__(self, generator, params, shape, seed):
        self.generator, self.params, self.shape, self.seed = generator, params, shape, seed
        self.samplers = {}
        self.written = 0
        self.written_for_last = 0

    def sampler(self, lr_axis, src_shape):
        key = (lr_axis, src_shape)
        if key not in self.samplers:
            params = dataclasses.replace(self.params, lr_axis=lr_axis)
            gen = self.generator.SynthGenerator(self.shape, params, seed=0)
            self.samplers[key] = self.generator.PairSampler(gen, seed=0)
        return self.samplers[key]

    def write_pairs(self, path, outdir, n, png, names, bar):
        """Write ``n`` pairs for the label map at ``path``; ``names`` maps used names to paths."""
        self.written_for_last = 0
        name = io.stem(path)
        if name in names:
            raise common.ToolError('%s: same output name %s as %s' % (path, name, names[name]))
        names[name] = path
        vol = io.load_volume(path)
        labels = check_label_map(vol)
        lr_axis = geometry.orientation(vol.affine).replace('R', 'L').index('L')
        src, centre = source_array(labels)
        affine = output_affine(vol.affine, centre, self.shape, self.params.voxsize_mm)
        sampler = self.sampler(lr_axis, src.shape)
        reseed(sampler, self.seed, name)
        batch = src[None, ..., None]
        for k in range(n):
            out = sampler(batch)
            image = np.asarray(out['image'])[0, ..., 0]
            synth_labels = np.asarray(out['labels'])[0, ..., 0].astype(np.int16)
            paths = output_paths(path, outdir, n, png, k)
            io.save_volume(image, affine, paths[0], dtype=np.float32)
            io.save_volume(synth_labels, affine, paths[1], dtype=np.int16)
            if png:
                save_picture(image, synth_labels, affine, paths[2])
            self.written += 1
            self.written_for_last += 1
            bar.update(1)
        return n


#: Stem suffixes of this tool's outputs: a folder's earlier results are not inputs again.
DERIVED = (r'_\d{3,}_image', r'_\d{3,}_labels', r'_\d{3,}')


def output_paths(inp, outdir, n, png, k=None):
    """The files written for input ``inp``: image, labels (and picture) of pair ``k``, or of
    every pair when ``k`` is None (a flat list)."""
    width = max(3, len(str(n - 1)))
    if k is None:
        return [p for j in range(n) for p in output_paths(inp, outdir, n, png, j)]
    base = os.path.join(outdir, '%s_%0*d' % (io.stem(inp), width, k))
    return [base + '_image.nii.gz', base + '_labels.nii.gz'] + ([base + '.png'] if png else [])


def check_label_map(vol):
    """The volume's labels as int32, after checking it is a usable label map (warnings for a
    voxel size other than 1 mm and for labels the generator does not know)."""
    data = vol.data
    if data.ndim != 3:
        raise io.VolumeError(vol.path, 'label map must be 3-D, got shape %s' % (data.shape,))
    if data.dtype.kind == 'f' and not np.array_equal(data, np.round(data)):
        raise io.VolumeError(vol.path, 'not a label map (non-integer values)')
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 1023:
        raise io.VolumeError(vol.path, 'labels must be in 0..1023, found %d..%d' % (lo, hi))
    labels = data.astype(np.int32)
    voxsize = vol.voxsize
    if np.any(np.abs(voxsize - 1) > 0.05):
        print('%s: warning: %s: voxel size %s mm is not 1 mm, treated as 1 mm (resample the '
              'label map to 1 mm first)' % (PROG, vol.path, 'x'.join('%.3g' % v for v in voxsize)),
              file=sys.stderr)
    unknown = sorted(set(np.unique(labels).tolist()) - set(lab.GENERATION_LABELS))
    if unknown:
        print('%s: warning: %s: label(s) %s not among the generation labels, painted like '
              'background' % (PROG, vol.path, ', '.join(map(str, unknown))), file=sys.stderr)
    return labels


def source_array(labels):
    """(source, centre): the labels cropped to their bounding box plus ``MARGIN`` voxels (as
    :class:`~synthkit.generator.LabelMapBank` does) and centred in a grid padded to a multiple
    of ``SOURCE_MULTIPLE``; ``centre`` is the input voxel position of the source's centre,
    which the generator maps to the centre of the output grid."""
    nz = np.argwhere(labels > 0)
    lo = np.maximum(nz.min(0) - MARGIN, 0)
    hi = np.minimum(nz.max(0) + MARGIN + 1, labels.shape)
    crop = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shape = -(-np.asarray(crop.shape) // SOURCE_MULTIPLE) * SOURCE_MULTIPLE
    off = (shape - crop.shape) // 2
    src = np.zeros(tuple(int(n) for n in shape), np.int32)
    src[off[0]:off[0] + crop.shape[0], off[1]:off[1] + crop.shape[1],
        off[2]:off[2] + crop.shape[2]] = crop
    return src, lo - off + (shape - 1) / 2


def output_affine(in_affine, centre, shape, voxsize):
    """Vox2world of the output grid: the input's axis directions with ``voxsize`` mm voxels,
    the grid's centre at the world position of input voxel ``centre``."""
    lin = np.asarray(in_affine, np.float64)[:3, :3]
    axes = lin / np.linalg.norm(lin, axis=0) * voxsize
    world = lin @ centre + np.asarray(in_affine, np.float64)[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = world - axes @ ((np.asarray(shape) - 1) / 2)
    return affine


def _seed_generators(obj, found, seen):
    """Every keras SeedGenerator reachable through the attributes of ``obj`` (layers nested in
    layers), in a fixed order (attribute names sorted)."""
    import keras
    for attr in sorted(vars(obj)):
        value = getattr(obj, attr, None)
        if id(value) in seen:
            continue
        if isinstance(value, keras.random.SeedGenerator):
            seen.add(id(value))
            found.append(value)
        elif isinstance(value, keras.layers.Layer):
            seen.add(id(value))
            _seed_generators(value, found, seen)
    return found


def reseed(sampler, seed, name):
    """Restart every random stream of ``sampler`` from (``seed``, ``name``): an input's pairs
    then depend on nothing else, and the compiled function is reused (it reads the states)."""
    from keras import ops
    gens = _seed_generators(sampler.generator, [], set()) + [sampler.noise_seed]
    states = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(len(gens))
    for gen, state in zip(gens, states):
        gen.state.assign(ops.convert_to_tensor([int(state) >> 1, 0], dtype=gen.state.dtype))


def save_picture(image, labels, affine, path):
    """PNG of three orthogonal slices of the image, the labels in LUT colours below them."""
    import nibabel as nib

    from .. import qc
    to_lia = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                             nib.orientations.axcodes2ornt('LIA'))
    image = nib.orientations.apply_orientation(image, to_lia)
    labels = nib.orientations.apply_orientation(labels, to_lia)
    rgb = qc.montage(image, labels, center=[n // 2 for n in image.shape], side_by_side=True)
    qc.save_png(rgb, path, scale=max(1, 192 // max(image.shape)))
