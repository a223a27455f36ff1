"""Run one tool over every scan of a study on a Dask cluster.

- Each worker process loads the tool's network once (:data:`_MODELS`) and then processes scan
  after scan, so a scan costs its inference, not TensorFlow's start-up.
- A scan is finished when its sidecar (``<main output>.json``: options, input stamp, the size of
  every output, metrics) is there and matches; outputs are written atomically and the sidecar
  last, so a run that is killed loses only the scans in flight and a re-run skips the others.
- A bad scan (unreadable, wrong dimensionality...) is reported with its one-line error and the
  study goes on; its partial outputs are removed. A worker that dies (e.g. killed for memory)
  has its scan retried once, when a worker is free, then reported (the clusters of
  :mod:`.cluster` count a death against the scan at once: ``allowed-failures`` 0).
- At the end: the tool's merged study tables (one row per finished scan), ``failures.csv``
  and an HTML report with a QC thumbnail per scan, outliers first.
"""

import json
import os
import socket
import sys
import time

from .. import __version__, io
from ..cli import common
from . import report, scans as scans_mod, tools

PROG = 'synthkit-batch'

#: Per worker process: the loaded networks, by :meth:`Tool.cache_key`.
_MODELS = {}


class Summary:
    """What a study run did: ``records`` of the finished scans (this run's and earlier ones'),
    ``failures`` as ``(scan id, input, error)``, counts, wall time, the study files written."""

    def __init__(self, records, failures, computed, skipped, seconds, files):
        self.records, self.failures = records, failures
        self.computed, self.skipped, self.seconds, self.files = computed, skipped, seconds, files

    @property
    def failed(self):
        return len(self.failures)

    def __repr__(self):
        return '<Summary %d computed, %d skipped, %d failed, %.0f s>' % (
            self.computed, self.skipped, self.failed, self.seconds)


# ---------------------------------------------------------------------------------------------
# on the workers

def process_scan(tool, scan, outputs, threads=None):
    """One scan on a worker: the cached network, the tool's outputs, then the sidecar; returns
    its record, or a failure record (``error``) for an expected or unexpected error."""
    start = time.time()
    with common.collect_warnings() as warnings:
        try:
            key = tool.cache_key()
            if key not in _MODELS:
                common.set_threads(threads)
                _MODELS[key] = tool.load()
            metrics = tool.process(_MODELS[key], scan, outputs)
            record = {
                'scan': scan.id, 'tool': tool.name, 'version': __version__,
                'source': scan.path, 'input': input_stamp(scan.path),
                'options': _jsonable(tool.signature()),
                'outputs': {n: {'file': os.path.basename(p), 'bytes': os.path.getsize(p)}
                            for n, p in outputs.items()},
                'metrics': metrics, 'seconds': round(time.time() - start, 2),
                'worker': '%s:%d' % (socket.gethostname(), os.getpid()),
                'worker_peak_mb': _peak_mb(),
                'finished': time.strftime('%Y-%m-%dT%H:%M:%S')}
            record['warnings'] = list(warnings)
            io.save_text(json.dumps(record, indent=1) + '\n', sidecar(outputs))
            return record
        except common.EXPECTED as e:
            error = common.message(e, scan.path)
        except Exception as e:                         # a bug: report it, go on with the study
            error = 'internal error (%s: %s)' % (type(e).__name__, common.message(e))
    if not error.startswith(scan.path):
        error = '%s: %s' % (scan.path, error)
    return {'scan': scan.id, 'source': scan.path, 'error': error, 'warnings': list(warnings)}


def _peak_mb():
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


# ---------------------------------------------------------------------------------------------
# finished scans

def sidecar(outputs):
    """The sidecar of a scan: its main (first) output with ``.json`` for the image extension."""
    main = next(iter(outputs.values()))
    return io.split_ext(main)[0] + '.json' if io.split_ext(main)[1] \
        else os.path.splitext(main)[0] + '.json'


def input_stamp(path):
    st = os.stat(path)
    return {'name': os.path.basename(path), 'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _slots(client, resources):
    """How many scans the workers can run at once: their ``scan`` resources (else threads),
    at least 1 (a job queue's workers may not have joined yet)."""
    workers = client.scheduler_info().get('workers', {}).values()
    if resources:
        n = sum(int(w.get('resources', {}).get('scan', 0)) for w in workers)
    else:
        n = sum(int(w.get('nthreads', 1)) for w in workers)
    return max(1, n)


def _result(fut, scan, killed):
    """A finished future's record; a failure record (``killed``) when its worker died."""
    try:
        record = fut.result()
    except killed:
        record = {'scan': scan.id, 'source': scan.path, 'warnings': [], 'killed': True,
                  'error': '%s: its worker died twice while processing it (out of memory? '
                           'give more with --memory)' % scan.path}
    except Exception as e:
        record = {'scan': scan.id, 'source': scan.path, 'warnings': [],
                  'error': '%s: %s' % (scan.path, common.message(e))}
    fut.release()
    return record


def _jsonable(value):
    return json.loads(json.dumps(value))


def finished(tool, scan, outputs, signature):
    """The record of a scan finished earlier with these options on this very input, every
    output present with its recorded size; else None."""
    try:
        with open(sidecar(outputs)) as f:
            record = json.load(f)
        if record.get('tool') != tool.name or record.get('options') != signature \
                or record.get('input') != input_stamp(scan.path) \
                or set(record['outputs']) != set(outputs):
            return None
        for name, path in outputs.items():
            info = record['outputs'][name]
            if info['file'] != os.path.basename(path) or os.path.getsize(path) != info['bytes']:
                return None
        record['scan'] = scan.id
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_outputs(outputs):
    """Remove a failed scan's outputs, its sidecar and temp files a killed writer left."""
    for path in list(outputs.values()) + [sidecar(outputs)]:
        try:
            os.remove(path)
        except OSError:
            pass
        parent, base = os.path.split(os.path.abspath(path))
        io._remove_stale_temps(parent, base)


# ---------------------------------------------------------------------------------------------
# the study

def plan(tool, inputs, out, bids_suffix='T1w', create=True):
    """``(scans, [(scan, outputs)], study root)``, every output checked before any work:
    disjoint from the inputs and from each other, and writable (without creating their folders
    unless ``create``)."""
    scans = scans_mod.find_scans(inputs, out, [d for d in tool.derived], bids_suffix)
    root = scans_mod.study_root(inputs, out)
    jobs = [(s, tool.outputs(s)) for s in scans]
    flagged = [('--o', os.path.join(root, name)) for name in study_files(tool)]
    folders = {}
    for s, outs in jobs:
        flagged += [('--o', p) for p in outs.values()] + [('--o', sidecar(outs))]
        for p in outs.values():
            folders.setdefault((os.path.dirname(os.path.abspath(p)), io.split_ext(p)[1] or
                                os.path.splitext(p)[1]), p)
    common.check_outputs([s.path for s in scans] + tool.inputs(), flagged)
    for path in folders.values():                      # one check per folder and file type
        io.check_writable(path, exts=(io.split_ext(path)[1] or os.path.splitext(path)[1],),
                          create=create)
    return scans, jobs, root


def study_files(tool):
    return ['%s_volumes.csv' % tool.short, '%s_qc.csv' % tool.short, 'failures.csv',
            '%s_report.html' % tool.short]


def run(tool, inputs, outputs, client=None, force=False, bids_suffix='T1w', threads=None,
        progress=None, log=None, one_scan_per_worker=None, **options):
    """Run ``tool`` (a name such as ``'mri_synthseg'``, with its ``options`` as keywords, or a
    :class:`tools.Tool`) over the study ``inputs`` (folder, BIDS dataset, ``.txt`` list, list of
    paths) into the folder ``outputs``, on the Dask ``client`` (default: a LocalCluster of this
    machine, closed at the end). Finished scans are skipped unless ``force``; ``threads``: the
    network's threads in each worker. ``one_scan_per_worker``: have each task take the
    workers' ``scan`` resource (default: when every worker has one, as the clusters of
    :mod:`.cluster` do). Returns a :class:`Summary`; a bad scan never raises, it is in
    ``Summary.failures``."""
    from distributed import Client, wait
    try:
        from distributed import KilledWorker
    except ImportError:                                        # older distributed
        from distributed.scheduler import KilledWorker
    log = log or sys.stderr
    start = time.time()
    if isinstance(tool, str):
        tool = tools.get(tool, **options)
    _, jobs, root = plan(tool, inputs, outputs, bids_suffix)
    signature = _jsonable(tool.signature())
    done, todo = {}, []
    for scan, outs in jobs:
        record = None if force else finished(tool, scan, outs, signature)
        if record is not None:
            done[scan.id] = dict(record, folder=os.path.dirname(sidecar(outs)))
        else:
            todo.append((scan, outs))
    skipped = len(done)
    print('%s: %s over %d scans: %d finished earlier, %d to do' % (
        PROG, tool.name, len(jobs), skipped, len(todo)), file=log)

    failures, own = [], None
    if todo:
        if client is None:
            from . import cluster
            cluster.configure()
            own = Client(cluster.local_cluster(threads_per_worker=threads or 1))
            client = own
        if one_scan_per_worker is None:
            workers = client.scheduler_info().get('workers', {})
            one_scan_per_worker = bool(workers) and all(
                'scan' in w.get('resources', {}) for w in workers.values())
        resources = {'scan': 1} if one_scan_per_worker else None
        from . import cluster
        if getattr(client, 'cluster', None) is None or cluster.has_dashboard():
            print('%s: Dask dashboard: %s' % (PROG, client.dashboard_link), file=log)
        futures = {}
        pending, retried = list(reversed(todo)), set()
        try:
            bar = report.Progress(len(todo), log, progress)
            while pending or futures:
                # at most one scan in flight per worker slot: a worker that dies then takes
                # only its own scan down (the scheduler counts a death against every task
                # it had handed that worker), and workers joining later get work at once
                for _ in range(max(0, _slots(client, resources) - len(futures))):
                    if not pending:
                        break
                    scan, outs = pending.pop()
                    fut = client.submit(process_scan, tool, scan, outs, threads, pure=False,
                                        resources=resources, key='%s-%s-%s' % (
                                            tool.short, scan.id.replace('/', '_'),
                                            os.urandom(4).hex()))
                    futures[fut] = (scan, outs)
                try:
                    finished_now = wait(list(futures), timeout=5,
                                        return_when='FIRST_COMPLETED').done
                except TimeoutError:         # none yet: look for new workers, wait again
                    continue
                for fut in finished_now:
                    scan, outs = futures.pop(fut)
                    record = _result(fut, scan, KilledWorker)
                    if record.get('killed') and scan.id not in retried:
                        retried.add(scan.id)         # once more, when a worker slot is free
                        pending.append((scan, outs))
                        bar.write('%s: warning: %s: its worker died; trying it once more'
                                  % (PROG, scan.path))
                        continue
                    for w in record.get('warnings', []):
                        bar.write('%s: warning: %s' % (PROG, w if scan.path in w else
                                                       '%s: %s' % (scan.path, w)))
                    if 'error' in record:
                        remove_outputs(outs)
                        failures.append((scan.id, scan.path, record['error']))
                        bar.write('%s: error: %s' % (PROG, record['error']))
                    else:
                        done[scan.id] = dict(record, folder=os.path.dirname(sidecar(outs)))
                    bar.update(failed='error' in record)
            bar.close()
        except KeyboardInterrupt:
            client.cancel(list(futures))
            print('%s: interrupted: %d scans finished are kept; run the same command again to '
                  'go on' % (PROG, len(done)), file=log)
            raise
        finally:
            if own is not None:
                own_cluster = own.cluster
                own.close()
                own_cluster.close()

    order = [s.id for s, _ in jobs]
    records = [done[i] for i in order if i in done]
    failures.sort(key=lambda f: order.index(f[0]))
    files = write_study(tool, root, records, failures, inputs)
    summary = Summary(records, failures, len(records) - skipped, skipped, time.time() - start,
                      files)
    print('%s: %d computed, %d finished earlier, %d failed in %.0f s; study report: %s' % (
        PROG, summary.computed, skipped, summary.failed, summary.seconds, files[-1]), file=log)
    return summary


def write_study(tool, root, records, failures, inputs):
    """The merged tables, ``failures.csv`` and the HTML report; returns their paths."""
    os.makedirs(root, exist_ok=True)
    if isinstance(inputs, (str, os.PathLike)) and scans_mod.is_bids(os.fspath(inputs)):
        scans_mod.write_bids_description(root, tool.name)
    files = tool.study_tables(root, records)
    fail_csv = os.path.join(root, 'failures.csv')
    io.save_csv(fail_csv, ['subject', 'input', 'error'], [list(f) for f in failures])
    html = os.path.join(root, '%s_report.html' % tool.short)
    report.write_html(html, tool, records, failures)
    return files + [fail_csv, html]
