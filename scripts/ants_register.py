#!/usr/bin/env python
"""Register MOVING to FIXED with ANTs SyN (antspyx) and carry a label map along; for
scripts/bench_synthmorph.py, run with the benchmark venv's Python (`make .venv-bench`).

    ants_register.py MOVING FIXED MOVING_SEG OUT_SEG --mask FIXED_SEG --json OUT.json

`ants.registration(fixed, moving, type_of_transform='SyN')` with antspyx's default parameters
(antspyx 0.6.3): initial translation by the centres of mass; Affine[0.25], Mattes mutual
information (32 bins, regular sampling of 20 % of the voxels), 2100x1200x1200x0 iterations,
shrink factors 4x2x2x1, smoothing sigmas 3x2x1x0 voxels; then SyN[0.2, 3, 0] (gradient step 0.2,
update field sigma 3 voxels, total field sigma 0), Mattes mutual information (32 bins, all
voxels), 40x20x0 iterations (so no iteration at full resolution), shrink factors 4x2x1,
smoothing sigmas 2x1x0 voxels, convergence 1e-7 over 8 iterations. No random seed is fixed
(antspyx's default), so repeated runs can differ slightly.

MOVING_SEG is resampled through the forward transforms (SyN warp, then affine) onto the fixed
grid with `interpolator='genericLabel'` and written to OUT_SEG. The Jacobian determinant of the
SyN warp on the fixed grid (`ants.create_jacobian_determinant_image`, finite differences,
not log, not geometric) gives the share of voxels with a determinant <= 0, inside FIXED_SEG > 0
(--mask) and over the whole grid; the affine part has a positive determinant and does not change
the sign. The JSON gets those percentages, the affine matrix determinant, the seconds spent in
registration, resampling and Jacobian computation, and the versions.

Threads: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, set from --threads before antspyx is imported.
"""

import argparse
import json
import os
import shutil
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('moving')
    p.add_argument('fixed')
    p.add_argument('moving_seg')
    p.add_argument('out_seg')
    p.add_argument('--mask', help='label map or mask on the fixed grid: Jacobian statistics '
                                  'inside its voxels > 0')
    p.add_argument('--json', help='write timings and Jacobian statistics here')
    p.add_argument('--warp', help='also save the SyN warp (fixed grid) here')
    p.add_argument('--threads', type=int, help='ITK threads (default: the environment\'s '
                                               'ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS)')
    args = p.parse_args()
    if args.threads:
        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(args.threads)

    import ants  # after the thread count is set
    import numpy as np

    fixed = ants.image_read(args.fixed)
    moving = ants.image_read(args.moving)
    t = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform='SyN')
    t_reg = time.perf_counter() - t

    t = time.perf_counter()
    seg = ants.image_read(args.moving_seg)
    moved = ants.apply_transforms(fixed, seg, transformlist=reg['fwdtransforms'],
                                  interpolator='genericLabel')
    ants.image_write(moved.clone('unsigned int'), args.out_seg)
    t_apply = time.perf_counter() - t

    warp = [f for f in reg['fwdtransforms'] if f.endswith(('.nii.gz', '.nii'))]
    affine = [f for f in reg['fwdtransforms'] if f.endswith('.mat')]
    t = time.perf_counter()
    info = {'registration_seconds': t_reg, 'apply_seconds': t_apply,
            'antspyx': getattr(ants, '__version__', '?'),
            'itk_threads': os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', '(default)'),
            'fwdtransforms': [os.path.basename(f) for f in reg['fwdtransforms']]}
    if warp:
        jac = ants.create_jacobian_determinant_image(fixed, warp[0], do_log=False,
                                                     geom=False).numpy()
        neg = jac <= 0
        info['neg_jac_percent_grid'] = 100.0 * float(neg.mean())
        info['jac_min'] = float(jac.min())
        if args.mask:
            mask = ants.image_read(args.mask).numpy() > 0
            if mask.shape != jac.shape:
                sys.exit('--mask %s: shape %s, not the fixed grid %s'
                         % (args.mask, mask.shape, jac.shape))
            info['neg_jac_percent_mask'] = 100.0 * float(neg[mask].mean()) if mask.any() else 0.0
            info['mask_voxels'] = int(mask.sum())
        if args.warp:
            shutil.copyfile(warp[0], args.warp)
    if affine:
        tx = ants.read_transform(affine[0])
        dim = fixed.dimension
        info['affine_det'] = float(np.linalg.det(
            np.asarray(tx.parameters[:dim * dim]).reshape(dim, dim)))
    info['jacobian_seconds'] = time.perf_counter() - t

    for f in set(reg['fwdtransforms']) | set(reg['invtransforms']):
        if os.path.isfile(f):
            os.remove(f)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(info, f, indent=2)
    print(json.dumps(info))
    return 0


if __name__ == '__main__':
    sys.exit(main())
