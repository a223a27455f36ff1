#!/usr/bin/env python
"""SynthKit's main jobs on a real scan, as a new user would run them (`make demo`).

The scan is the Colin27 T1 head (Debian's package `mricron-data`, fetched into .cache/mricron);
the registration target is the MNI ICBM152 2009a template (PyPI's nilearn wheel, fetched into
.cache/nilearn). Each step is the installed command line itself, run as its own process:

1. mri_synthseg: 33-label segmentation, volumes CSV, QC scores, QC picture;
2. mri_synthstrip: skull-stripped brain, brain mask, QC picture;
3. mri_synthmorph register: the stripped Colin27 brain onto the MNI152 template (affine, then
   deformable), with a QC picture (fixed, moved, checkerboard); then mri_synthmorph apply
   carries the segmentation along (nearest neighbour);
4. mri_synthsr (once its model is shipped): a 5 mm thick-slice version of the head (made here:
   5 slices averaged, every 5th kept) back to a 1 mm MPRAGE-like T1, with a QC picture (input
   above, output below).
With a shipped parcellation model, step 1 also parcellates the cortex (--parc).

Everything is written to --out (default demo/); the summary lists the files and times.
"""

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

from benchlib import colin27, mni152, thick_slices

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tool(name):
    """The installed command (beside this Python), else the repository's bin/ script."""
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return [exe] if os.path.isfile(exe) else [sys.executable, os.path.join(ROOT, 'bin', name)]


def step(title, cmd):
    print('== %s' % title, flush=True)
    print('   $ %s' % ' '.join(os.path.relpath(c) if os.path.isabs(c) else c for c in cmd),
          flush=True)
    t = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prog = next(os.path.basename(c) for c in cmd if os.path.basename(c).startswith('mri_'))
    for line in r.stdout.splitlines():
        if line.startswith(prog + ':'):        # the tool's own messages, not library logs
            print('   ' + line)
    if r.returncode != 0:
        print(r.stdout[-3000:])
        raise SystemExit('demo: step failed (exit %d): %s' % (r.returncode, title))
    seconds = time.time() - t
    print('   done in %.0f s' % seconds, flush=True)
    return seconds


def shipped(name):
    """Whether model ``name``'s weights are shipped (what the tools would load)."""
    folder = os.environ.get('SYNTHKIT_MODELS') or os.path.join(ROOT, 'models')
    return os.path.isfile(os.path.join(folder, name + '.weights.h5'))


def write_thick_slices(path, out, factor=5):
    """Write ``path`` as thick slices along its third voxel axis: ``factor`` slices averaged,
    one kept in ``factor`` (what a clinical 5 mm acquisition looks like)."""
    import nibabel as nib
    import numpy as np
    img = nib.load(path)
    thick, aff = thick_slices(np.asarray(img.dataobj, np.float32), img.affine, factor, axis=2)
    nib.save(nib.Nifti1Image(thick, aff), out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--out', default=os.path.join(ROOT, 'demo'))
    p.add_argument('--cache', default=os.path.join(ROOT, '.cache'))
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    args = p.parse_args()

    head, _ = colin27(os.path.join(args.cache, 'mricron'))
    template = mni152(os.path.join(args.cache, 'nilearn'))
    out = args.out
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    o = lambda name: os.path.join(out, name)  # noqa: E731
    j = str(args.threads)
    times = {}
    parc = ['--parc'] if shipped('synthparc') else []
    times['segmentation'] = step('segmentation%s (mri_synthseg)' % (
        ' and cortical parcellation' if parc else ''), tool('mri_synthseg') + [
        '--i', head, '--o', o('colin27_synthseg.mgz'), '--vol', o('colin27_volumes.csv'),
        '--qc', o('colin27_qc.csv'), '--png', '--threads', j] + parc)
    times['skull stripping'] = step('skull stripping (mri_synthstrip)', tool('mri_synthstrip') + [
        '-i', head, '-o', o('colin27_brain.nii.gz'), '-m', o('colin27_brainmask.nii.gz'),
        '--png', '-t', j])
    times['registration'] = step('registration to MNI152 (mri_synthmorph register)',
                                 tool('mri_synthmorph') + [
        'register', o('colin27_brain.nii.gz'), template, '-o', o('colin27_in_mni152.nii.gz'),
        '-t', o('colin27_to_mni152_warp.nii.gz'), '--png', '-j', j, '-v'])
    times['label transfer'] = step('segmentation carried to MNI152 (mri_synthmorph apply)',
                                   tool('mri_synthmorph') + [
        'apply', '-m', 'nearest', o('colin27_to_mni152_warp.nii.gz'), o('colin27_synthseg.mgz'),
        o('colin27_synthseg_in_mni152.mgz')])

    if shipped('synthsr'):
        thick = o('colin27_5mm_slices.nii.gz')
        write_thick_slices(head, thick)
        times['super-resolution'] = step('5 mm slices to a 1 mm T1 (mri_synthsr)',
                                         tool('mri_synthsr') + [
            '--i', thick, '--o', o('colin27_5mm_synthsr.nii.gz'), '--png', '--threads', j])
    else:
        print('== super-resolution (mri_synthsr): skipped, its model is not trained yet')

    with open(o('colin27_volumes.csv')) as f:
        row = next(csv.DictReader(f))
    print('\nColin27: total intracranial %.0f cm^3 (from the segmentation), hippocampi %.1f / '
          '%.1f cm^3' % (float(row['total intracranial']) / 1000,
                          float(row['left hippocampus']) / 1000,
                          float(row['right hippocampus']) / 1000))
    print('\nWrote %s:' % os.path.relpath(out))
    for name in sorted(os.listdir(out)):
        print('  %-40s %8.1f kB' % (name, os.path.getsize(o(name)) / 1024))
    print('Look at the pictures: %s' % ', '.join(
        os.path.relpath(o(n)) for n in sorted(os.listdir(out)) if n.endswith('.png')))
    print('Times: %s' % ', '.join('%s %.0f s' % kv for kv in times.items()))


if __name__ == '__main__':
    main()
