#!/usr/bin/env python
"""Train (or resume) one of the shipped networks on synthetic data, then export it.

    python scripts/train.py --task synthseg --labels ../shared/data/label_maps \
        --run runs/synthseg --export models/synthseg [--steps N] [--init models/synthseg]

The configuration of each task is its `Task.preset` (registry: `synthkit.models.TASKS`; the last
two label maps, sorted, are held out for the validation score). Interrupt at any time: rerunning
the same command resumes from the last checkpoint (every few minutes). In a fresh clone, where only the shipped weights
are committed, `--init models/NAME` starts a new run from them and continues their step count.
"""

import argparse
import glob
import os
import sys


from synthkit import models, trainer
from synthkit.task import override


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--task', default='synthseg', choices=sorted(models.TASKS))
    p.add_argument('--labels', required=True, help='folder of training label maps')
    p.add_argument('--run', help='run directory (default runs/TASK)')
    p.add_argument('--export', help='write PREFIX.weights.h5 and PREFIX.json when done')
    p.add_argument('--steps', type=int, default=None, help='total steps (default: preset)')
    p.add_argument('--minutes', type=float, help='stop (with a checkpoint) after this much '
                                                 'wall time')
    p.add_argument('--checkpoint-minutes', type=float, help='checkpoint interval (default: '
                                                            'preset, 5)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=JSON',
                   help='override a TrainConfig field or a task option (task_options.NAME), '
                        'e.g. learning_rate=1e-3 or task_options.coord_weight=0.1')
    p.add_argument('--workers', type=int, default=0,
                   help='generate the training data in this many CPU processes (default: in '
                        'the training process)')
    p.add_argument('--export-only', action='store_true', help='only export the last checkpoint')
    p.add_argument('--snapshot-every', type=int, default=0, metavar='STEPS',
                   help='keep the weights at a checkpoint every STEPS steps in RUN/snapshots/ '
                        '(default: none)')
    p.add_argument('--snapshot-keep', type=int, default=10, help='snapshots kept (default 10)')
    p.add_argument('--average', type=int, default=0, metavar='K',
                   help='export the mean of the last K snapshots (weight averaging) instead '
                        'of the last checkpoint')
    p.add_argument('--precision', choices=trainer.PRECISIONS + ('auto',),
                   help="the networks' precision (TrainConfig.precision; default: the preset's, "
                        "float32); auto: mixed_bfloat16 where the hardware computes bfloat16 "
                        "natively (a GPU, or a CPU with AMX / AVX-512 BF16), else float32. A run "
                        "keeps the precision it started with")
    p.add_argument('--init', help='start a new run from shipped weights PREFIX (e.g. '
                                  'models/synthseg), continuing their step count')
    args = p.parse_args()

    maps = sorted(glob.glob(os.path.join(args.labels, '*.nii.gz')))
    cfg = models.preset(args.task, maps)
    options = models.task_class(args.task).Options
    if args.steps:
        cfg.steps = args.steps
    for item in args.set:
        override(cfg, item, options)
    if args.precision:
        cfg.precision = args.precision if args.precision != 'auto' else \
            ('mixed_bfloat16' if trainer.bfloat16_hardware() else 'float32')
    if args.checkpoint_minutes:
        cfg.checkpoint_minutes = args.checkpoint_minutes
    run = args.run or os.path.join('runs', args.task)
    if not args.export_only:
        t = trainer.Trainer(cfg, run, progress=sys.stderr.isatty(), init=args.init,
                            snapshot_every=args.snapshot_every, snapshot_keep=args.snapshot_keep)
        t.run(max_minutes=args.minutes, workers=args.workers)
        if t.stopped and args.export:      # a stopped run is not a finished model
            print('stopped: %s not exported (rerun to resume, or export it with --export-only)'
                  % args.export, flush=True)
            return
    if args.export:
        card = trainer.export(run, args.export, label_dir=args.labels, average=args.average)
        print('exported %s.weights.h5 (%d steps)' % (args.export, card['training']['steps']))


if __name__ == '__main__':
    main()
