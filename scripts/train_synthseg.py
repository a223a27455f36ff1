#!/usr/bin/env python
"""Train (or resume) the mri_synthseg U-Net on synthetic pairs, then export the weights.

    python scripts/train_synthseg.py --labels ../shared/data/label_maps --run runs/synthseg \
        --export models/synthseg [--steps N]

Label maps 19 and 20 are held out for the validation Dice on synthetic pairs. Interrupt at any
time: rerunning the same command resumes from the last checkpoint (every few minutes).
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'python'))

from synthkit import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--labels', required=True, help='folder of training label maps')
    p.add_argument('--run', default='runs/synthseg', help='run directory (checkpoints, log)')
    p.add_argument('--export', help='write PREFIX.weights.h5 and PREFIX.json when done')
    p.add_argument('--steps', type=int, default=None, help='total steps (default: config)')
    p.add_argument('--export-only', action='store_true', help='only export the last checkpoint')
    p.add_argument('--init', help='start a new run from shipped weights PREFIX (e.g. '
                                  'models/synthseg), continuing their step count')
    args = p.parse_args()

    maps = sorted(glob.glob(os.path.join(args.labels, '*.nii.gz')))
    if len(maps) < 3:
        sys.exit('error: need at least 3 label maps in %s' % args.labels)
    cfg = train.TrainConfig(label_maps=maps[:-2], val_maps=maps[-2:])
    if args.steps:
        cfg.steps = args.steps
    if not args.export_only:
        train.Trainer(cfg, args.run, progress=sys.stderr.isatty(), init=args.init).run()
    if args.export:
        card = train.export(args.run, args.export)
        print('exported %s.weights.h5 (%d steps)' % (args.export, card['training']['steps']))


if __name__ == '__main__':
    main()
