#!/usr/bin/env python
"""Round trip of SynthKit transforms through ANTs (antspyx, in the benchmark venv).

1. Ours -> ANTs: a smooth random displacement field and a random affine, written by
   ``transforms.write_warp(itk=True)`` and ``write_itk_affine`` (.txt and .mat), applied by
   ``ants.apply_transforms``; compared with ``transforms.apply`` of the same transforms.
2. ANTs -> ours: ``ants.registration`` (SyN) of two phantoms writes a ``*Warp.nii.gz`` and a
   ``*GenericAffine.mat``; each is applied by ANTs and by ``mri_synthmorph apply``'s reader.

The images are oblique (rotated, anisotropic voxels, non-zero origin), so any RAS/LPS or
direction mistake shows; a control (a field written without the RAS -> LPS flip) must fail.
Prints a markdown table; exit 1 when a comparison fails (relative RMS difference above 1 %,
over voxels inside both fields of view) or the control passes.

    python scripts/check_itk_interop.py --ants-python .venv-bench/bin/python
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthkit import io, transforms
from synthkit.transforms import Geometry, Transform

ANTS_SIDE = r'''
import json, sys
import ants
job = json.loads(sys.argv[1])
if job['do'] == 'apply':
    fixed, moving = ants.image_read(job['fixed']), ants.image_read(job['moving'])
    out = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=job['transforms'],
                                interpolator='linear')
    ants.image_write(out, job['out'])
else:
    fixed, moving = ants.image_read(job['fixed']), ants.image_read(job['moving'])
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform='SyN',
                            outprefix=job['prefix'], reg_iterations=(20, 10, 0))
    print(json.dumps(reg['fwdtransforms']))
'''


def rotation(deg):
    a, b, c = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid(shape, voxsize, deg, origin):
    aff = np.eye(4)
    aff[:3, :3] = rotation(deg) @ np.diag(voxsize)
    aff[:3, 3] = origin
    return Geometry(shape, aff)


def phantom(geom, seed):
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=geom.shape), 3)
    idx = np.indices(geom.shape).astype(float)
    centre = (np.array(geom.shape) - 1)[:, None, None, None] / 2
    ball = (((idx - centre) / (np.array(geom.shape)[:, None, None, None] / 2.6)) ** 2).sum(0) < 1
    return (100 * ball + 400 * data).astype(np.float32)


def save(data, geom, path):
    io.save_volume(data, geom.affine, path, dtype=np.float32)
    return path


def ants(python, job):
    r = subprocess.run([python, '-c', ANTS_SIDE, json.dumps(job)], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit('antspyx failed: %s' % r.stderr.strip().splitlines()[-1:])
    return r.stdout


def compare(ours, theirs, inside):
    d = (ours - theirs)[inside]
    ref = np.sqrt(np.mean(theirs[inside] ** 2))
    return float(np.sqrt(np.mean(d ** 2)) / ref), float(np.corrcoef(ours[inside],
                                                                    theirs[inside])[0, 1])


def ours_apply(trans, moving_path, target):
    vol = io.load_volume(moving_path)
    if not trans.is_warp:
        trans = Transform(trans.matrix, target=target)
    data, _ = transforms.apply(trans, vol, method='linear', fill=np.nan, dtype=np.float32)
    return np.asarray(data, np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--ants-python', default='.venv-bench/bin/python')
    p.add_argument('--work', default=None)
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix='itk_interop_')
    os.makedirs(work, exist_ok=True)
    fix_g = grid((40, 46, 36), (1.2, 1.0, 1.4), (8, -5, 12), (-21, 14, -30))
    mov_g = grid((44, 42, 40), (1.0, 1.1, 1.0), (-6, 10, -4), (-25, 12, -24))
    fixed = save(phantom(fix_g, 1), fix_g, os.path.join(work, 'fixed.nii.gz'))
    moving = save(phantom(mov_g, 2), mov_g, os.path.join(work, 'moving.nii.gz'))
    rows, ok = [], True

    def check(name, trans, files, target=fix_g, expect=True):
        nonlocal ok
        out = os.path.join(work, 'ants_%s.nii.gz' % name)
        ants(args.ants_python, {'do': 'apply', 'fixed': fixed, 'moving': moving,
                                'transforms': files, 'out': out})
        theirs = np.asarray(nib.load(out).dataobj, np.float32)
        mine = ours_apply(trans, moving, target)
        inside = np.isfinite(mine) & (theirs != 0)
        inside = ndimage.binary_erosion(inside, iterations=2)
        rel, corr = compare(np.nan_to_num(mine), theirs, inside)
        good = (rel < 0.01) == expect
        ok &= good
        rows.append((name, rel, corr, int(inside.sum()), good))

    # 1. ours -> ANTs
    rng = np.random.default_rng(3)
    disp = np.stack([ndimage.gaussian_filter(rng.normal(size=fix_g.shape), 4) for _ in range(3)],
                    -1)
    disp *= 3.0 / np.abs(disp).max()
    disp[..., 0] += 2.0                                         # a shift along RAS x too
    warp = Transform(disp=disp.astype(np.float32), target=fix_g)
    itk_warp = os.path.join(work, 'ours_itk_warp.nii.gz')
    transforms.write_warp(warp, itk_warp, itk=True)
    hdr = nib.load(itk_warp).header
    assert hdr['dim'][0] == 5 and hdr['intent_code'] == 1007
    check('ours warp (--itk) -> ants', warp, [itk_warp])
    # the control: the same field without the RAS -> LPS flip must disagree (the check can fail)
    wrong = os.path.join(work, 'wrong_itk_warp.nii.gz')
    transforms.write_itk_warp(Transform(disp=disp * [-1, -1, 1], target=fix_g), wrong)
    check('control: field without the LPS flip (expected to differ)', warp, [wrong],
          expect=False)
    m = np.eye(4)
    m[:3, :3] = rotation((4, -3, 6)) @ np.diag((1.05, 0.97, 1.02))
    m[:3, 3] = (3.0, -2.0, 4.0)
    aff = Transform(m, target=fix_g)
    for ext in ('.txt', '.mat'):
        path = os.path.join(work, 'ours_affine' + ext)
        transforms.write_itk_affine(aff, path)
        check('ours affine %s -> ants' % ext, aff, [path])
        back = transforms.load_transform(path)
        assert np.allclose(back.matrix, m, atol=1e-9), 'read back %s differs' % ext

    # 2. ANTs -> ours
    files = json.loads(ants(args.ants_python, {'do': 'register', 'fixed': fixed,
                                               'moving': moving,
                                               'prefix': os.path.join(work, 'ants_')}))
    warp_file = next(f for f in files if f.endswith('Warp.nii.gz'))
    mat_file = next(f for f in files if f.endswith('.mat'))
    check('ants SyN warp -> ours', transforms.load_transform(warp_file), [warp_file])
    check('ants affine .mat -> ours', transforms.load_transform(mat_file), [mat_file])

    print('| transform | relative RMS difference | correlation | voxels compared | ok |')
    print('| --- | --- | --- | --- | --- |')
    for name, rel, corr, n, good in rows:
        print('| %s | %.2e | %.4f | %d | %s |' % (name, rel, corr, n, 'yes' if good else 'NO'))
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
