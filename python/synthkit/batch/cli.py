"""synthkit-batch: run a SynthKit tool over a whole study on Dask (this machine or a cluster)."""

import argparse
import sys

from ..cli import common
from . import cluster, engine, tools

PROG = 'synthkit-batch'

DESCRIPTION = """\
Run a SynthKit tool over every scan of a study, on the cores of this machine or on a SLURM,
PBS, SGE or LSF cluster (Dask). Each worker loads the network once and then processes scan
after scan. Finished scans are skipped when the command is run again (--force recomputes), so
a run that was killed goes on where it stopped. A bad scan is reported and the study goes on.

Inputs (--i): a folder of images, a .txt list of image paths, a BIDS dataset (the
sub-*/[ses-*/]anat/*_T1w.nii[.gz] images, or --bids-suffix T2w...) or one image. Outputs go
to the folder --o (BIDS: --o/synthkit/sub-*/[ses-*/]anat/, derivatives style), with the study
files: merged CSVs (one row per scan), failures.csv and <tool>_report.html (a QC thumbnail
per scan, outliers first).
"""

EPILOG = """\
examples:
  synthkit-batch mri_synthseg --i study/ --o seg/
      all cores of this machine (one worker per core)
  synthkit-batch mri_synthseg --i bids/ --o bids/derivatives --workers 2 --threads-per-worker 1
  synthkit-batch mri_synthstrip --i scans.txt --o stripped/ --no-csf
  synthkit-batch mri_synthseg --i bids/ --o out/ --scheduler slurm --workers 50 \\
      --memory 8GB --walltime 02:00:00 --queue short --dry-run
      print the sbatch script of each worker job (nothing is submitted)
  synthkit-batch mri_synthseg --i study/ --o seg/ --scheduler tcp://10.0.0.5:8786
      a running Dask scheduler
"""


def _add_batch_arguments(p):
    g = p.add_argument_group('study')
    g.add_argument('--i', required=True, metavar='STUDY',
                   help='folder, BIDS dataset, .txt list of images, or one image')
    g.add_argument('--o', required=True, metavar='OUT', help='output folder')
    g.add_argument('--bids-suffix', default='T1w', metavar='SUFFIX',
                   help='BIDS images to process (default: %(default)s)')
    g.add_argument('--force', action='store_true', help='recompute finished scans too')
    g.add_argument('--dry-run', action='store_true',
                   help='show what would run (and the job script of a job queue); run nothing')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    c = p.add_argument_group('Dask')
    c.add_argument('--scheduler', default='local', metavar='WHERE',
                   help='local (default), slurm, pbs, sge, lsf, or the address of a running '
                        'Dask scheduler (tcp://host:8786)')
    c.add_argument('--workers', type=_positive, metavar='N',
                   help='worker processes (local: default cores / threads per worker) or jobs '
                        '(job queue: default 1)')
    c.add_argument('--threads-per-worker', type=_positive, default=1, metavar='T',
                   help='threads of each worker\'s network (default: %(default)s)')
    c.add_argument('--memory', metavar='SIZE',
                   help='memory per worker, e.g. 8GB (local: default the machine\'s memory '
                        'shared; job queue: default 8GB); a worker beyond it is restarted and '
                        'its scan retried once')
    c.add_argument('--queue', metavar='NAME', help='job queue / partition')
    c.add_argument('--walltime', metavar='HH:MM:SS', help='job wall time')
    c.add_argument('--account', metavar='NAME', help='account / project charged')
    c.add_argument('--job-extra', action='append', default=[], metavar='DIRECTIVE',
                   help='extra job-script directive, e.g. --job-extra=--gres=gpu:1 (repeatable)')
    c.add_argument('--log-dir', metavar='DIR', help='folder of the job queue\'s worker logs')
    c.add_argument('--dask-config', metavar='YAML',
                   help='Dask settings (e.g. jobqueue: slurm: ...) besides ~/.config/dask/')


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError('must be at least 1, got %s' % text)
    return value


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='tool', metavar='TOOL', required=True,
                           help='%s (then TOOL --help)' % ', '.join(tools.TOOLS))
    for name, cls in tools.TOOLS.items():
        t = sub.add_parser(name, help='%s over a study' % name, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description='%s over a study. %s' % (name, DESCRIPTION))
        _add_batch_arguments(t)
        cls.add_arguments(t)
    for name, why in tools.NOT_BATCHED.items():
        sub.add_parser(name, help='(%s)' % why, add_help=False)
    return p


def batch(args):
    tool = tools.get(args.tool, args)
    cluster.configure(args.dask_config)
    scans, jobs, root = engine.plan(tool, args.i, args.o, args.bids_suffix,
                                    create=not args.dry_run)
    where = args.scheduler.lower()
    if args.dry_run:
        return _dry_run(args, tool, jobs, where)
    if where == 'local':
        client_cluster = cluster.local_cluster(args.workers, args.threads_per_worker, args.memory)
    elif where in cluster.JOBQUEUE:
        client_cluster = _jobqueue(args, where)
        client_cluster.scale(jobs=args.workers or 1)
        print('%s: submitted %d %s job(s); scans start as workers join' % (
            PROG, args.workers or 1, where), file=sys.stderr)
    else:
        client_cluster = None
    from distributed import Client
    try:
        client = Client(client_cluster) if client_cluster is not None else \
            Client(args.scheduler)   # timeout: distributed.comm.timeouts.connect
    except (OSError, TimeoutError, ValueError) as e:
        raise common.ToolError('cannot reach the Dask scheduler %s (%s)'
                               % (args.scheduler, common.message(e))) from None
    try:
        summary = engine.run(tool, args.i, args.o, client=client, force=args.force,
                             bids_suffix=args.bids_suffix, threads=args.threads_per_worker,
                             progress=False if args.no_progress else None,
                             one_scan_per_worker=True if client_cluster is not None else None)
    finally:
        client.close()
        if client_cluster is not None:
            client_cluster.close()
    if summary.failures:
        print('%s: %d of %d scan(s) failed (see %s):' % (
            PROG, summary.failed, summary.failed + len(summary.records),
            summary.files[-2]), file=sys.stderr)
        for _, _, error in summary.failures:
            print('  %s' % error, file=sys.stderr)
        return 1
    return 0


def _jobqueue(args, where):
    return cluster.jobqueue_cluster(where, args.threads_per_worker, args.memory, args.queue,
                                    args.walltime, args.account, args.job_extra, args.log_dir)


def _dry_run(args, tool, jobs, where):
    signature = engine._jsonable(tool.signature())
    todo = [s for s, outs in jobs if args.force or not engine.finished(tool, s, outs, signature)]
    print('%s over %d scans: %d to do, %d finished earlier' % (
        tool.name, len(jobs), len(todo), len(jobs) - len(todo)))
    for scan, outs in jobs[:3]:
        print('  %s -> %s' % (scan.path, ', '.join(outs.values())))
    if len(jobs) > 3:
        print('  ... (%d more)' % (len(jobs) - 3))
    if where == 'local':
        import os
        n = args.workers or max(1, (os.cpu_count() or 1) // args.threads_per_worker)
        print('local Dask cluster: %d worker process(es) x %d thread(s), memory per worker: %s'
              % (n, args.threads_per_worker, args.memory or 'machine memory / workers'))
    elif where in cluster.JOBQUEUE:
        c = _jobqueue(args, where)
        try:
            print('%d %s job(s), each running this script:' % (args.workers or 1, where))
            print(c.job_script())
        finally:
            c.close()
    else:
        print('Dask scheduler: %s' % args.scheduler)
    return 0


def _refuse(name):
    raise common.ToolError('%s: %s' % (name, tools.NOT_BATCHED[name]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in tools.NOT_BATCHED:
        common.run(PROG, _refuse, argv[0])
    args = build_parser().parse_args(argv)
    common.run(PROG, batch, args)
