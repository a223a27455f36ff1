"""Dask clusters for ``synthkit-batch``: this machine, a job queue, or a running scheduler.

Every cluster made here runs one scan at a time per worker (workers have one ``scan``
resource and each task asks for it) with ``threads_per_worker`` threads for the network. The
scheduler fails a scan whose worker dies (e.g. killed for memory) at once
(``distributed.scheduler.allowed-failures = 0``): :func:`engine.run` then tries it once more
when a worker is free, so that a scan that kills workers takes no other scan with it.
"""

import importlib.util
import logging
import os
import sys

from ..cli import common

#: --scheduler names of the dask-jobqueue clusters.
JOBQUEUE = {'slurm': 'SLURMCluster', 'pbs': 'PBSCluster', 'sge': 'SGECluster',
            'lsf': 'LSFCluster'}


def worker_environment(threads):
    """Environment of the workers: quiet TensorFlow, oneDNN kernels, threads as asked."""
    return {'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_ENABLE_ONEDNN_OPTS':
            os.environ.get('TF_ENABLE_ONEDNN_OPTS', '1'), 'OMP_NUM_THREADS': str(threads),
            'OPENBLAS_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}


def configure(config_file=None):
    """Dask settings for a study: no scheduler retry of a task whose worker died (the engine
    retries it once itself); ``config_file``: a
    YAML file of Dask settings (e.g. ``jobqueue:`` defaults) on top of Dask's own files
    (``~/.config/dask/*.yaml``, ``$DASK_CONFIG``)."""
    import dask
    import distributed  # noqa: F401  (loads Dask's distributed.* defaults before ours)
    if config_file:
        import yaml
        try:
            with open(config_file) as f:
                extra = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise common.ToolError('%s: not a readable Dask YAML config (%s)'
                                   % (config_file, common.message(e))) from None
        if not isinstance(extra, dict):
            raise common.ToolError('%s: a Dask YAML config must be a mapping' % config_file)
        dask.config.update(dask.config.config, extra, priority='new')
    dask.config.set({'distributed.scheduler.allowed-failures': 0,
                     'distributed.admin.tick.limit': '60s',
                     'distributed.worker.daemon': False})


def has_dashboard():
    return importlib.util.find_spec('bokeh') is not None


def local_cluster(workers=None, threads_per_worker=1, memory=None):
    """A LocalCluster of worker processes on this machine (``memory``: limit per worker, e.g.
    ``8GB``; default: the machine's memory shared among the workers)."""
    from distributed import LocalCluster
    n = workers or max(1, (os.cpu_count() or 1) // threads_per_worker)
    os.environ.update(worker_environment(threads_per_worker))   # the spawned workers inherit it
    try:
        return LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                            memory_limit=memory or 'auto', resources={'scan': 1},
                            dashboard_address=':0',     # a free port, never 8787's clash
                            silence_logs=logging.CRITICAL)
    except (ValueError, TypeError) as e:
        raise common.ToolError('cannot start a local Dask cluster: %s' % common.message(e)) \
            from None


def jobqueue_cluster(scheduler, threads_per_worker=1, memory=None, queue=None, walltime=None,
                     account=None, job_extra=(), log_directory=None):
    """A dask-jobqueue cluster (not scaled yet: no job is submitted): one worker per job, one
    scan at a time, ``threads_per_worker`` cores; flags left out come from Dask's config
    (``jobqueue.<scheduler>.*``), memory defaulting to 8GB."""
    import dask
    try:
        import dask_jobqueue
    except ImportError:
        raise common.ToolError('--scheduler %s needs dask-jobqueue (pip install dask-jobqueue)'
                               % scheduler) from None
    cls = getattr(dask_jobqueue, JOBQUEUE[scheduler])
    env = worker_environment(threads_per_worker)
    kwargs = {'cores': threads_per_worker, 'processes': 1, 'memory': memory, 'queue': queue,
              'walltime': walltime, 'account': account, 'job_name': 'synthkit',
              'python': sys.executable, 'log_directory': log_directory,
              'worker_extra_args': ['--resources', 'scan=1'],
              'job_script_prologue': ['export %s=%s' % kv for kv in sorted(env.items())]}
    if job_extra:
        kwargs['job_extra_directives'] = list(job_extra)
    if memory is None and not dask.config.get('jobqueue.%s.memory' % scheduler, None):
        kwargs['memory'] = '8GB'
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if scheduler == 'lsf' and 'account' in kwargs:      # LSF calls it a project
        kwargs['project'] = kwargs.pop('account')
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise common.ToolError('cannot set up the %s cluster: %s'
                               % (scheduler, common.message(e))) from None
