#!/usr/bin/env python
"""Benchmark synthkit-batch against a shell loop of mri_synthseg, on this machine's cores.

A study of 20 scans: the 5 real dev scans (OASIS 0455-0457 T1, ixi002 T1 and T2) and 15
synthetic heads made by mri_synth from training label maps (random contrast and resolution,
192 x 224 x 192 at 1 mm; cached in --work). Measured, one after the other:

1. the loop: `mri_synthseg --i scan --o seg --threads T` once per scan (T = all cores), as a
   user's shell script would, each call paying Python/TensorFlow start-up and model loading;
2. `synthkit-batch mri_synthseg --i study --o out --scheduler local --workers W
   --threads-per-worker 1`: wall time, scans/min, each worker's peak memory (from the scans'
   sidecars), and agreement of its segmentations with the loop's (same model);
3. the same command killed (SIGKILL to its whole process group, workers included) once half the
   scans are finished, then run again: how many scans the second run recomputed, against the
   number left unfinished by the kill, and whether any temp file or half-written output was left.

Writes a markdown report (--out).
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchlib import measure, tail  # noqa: E402

DEV = [('oasis_0455/t1.nii.gz', 'oasis_0455_t1'), ('oasis_0456/t1.nii.gz', 'oasis_0456_t1'),
       ('oasis_0457/t1.nii.gz', 'oasis_0457_t1'), ('ixi002/t1.nii.gz', 'ixi002_t1'),
       ('ixi002/t2.nii.gz', 'ixi002_t2')]


def tool(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def make_study(data, labels, folder, n_synth=15):
    os.makedirs(folder, exist_ok=True)
    for rel, name in DEV:
        dst = os.path.join(folder, name + '.nii.gz')
        if not os.path.exists(dst):
            os.symlink(os.path.abspath(os.path.join(data, rel)), dst)
    synth = os.path.join(folder, '..', 'synth')
    maps = sorted(glob.glob(os.path.join(labels, 'training_seg_*.nii.gz')))[:n_synth]
    todo = [m for m in maps if not os.path.exists(os.path.join(
        folder, 'synth_%s.nii.gz' % os.path.basename(m)[len('training_seg_'):-len('.nii.gz')]))]
    if todo:
        listing = os.path.join(synth, 'maps.txt')
        os.makedirs(synth, exist_ok=True)
        with open(listing, 'w') as f:
            f.write('\n'.join(todo) + '\n')
        r = subprocess.run([tool('mri_synth'), '--i', listing, '--o', synth, '--seed', '7',
                            '--shape', '192', '224', '192'], capture_output=True, text=True)
        if r.returncode:
            sys.exit('mri_synth failed: %s' % tail(r.stderr))
        for m in todo:
            k = os.path.basename(m)[len('training_seg_'):-len('.nii.gz')]
            os.replace(os.path.join(synth, 'training_seg_%s_000_image.nii.gz' % k),
                       os.path.join(folder, 'synth_%s.nii.gz' % k))
    keep = {name for _, name in DEV} | {'synth_%s' % os.path.basename(m)[
        len('training_seg_'):-len('.nii.gz')] for m in maps}
    return sorted(p for p in glob.glob(os.path.join(folder, '*.nii.gz'))
                  if os.path.basename(p)[:-len('.nii.gz')] in keep)


def loop(scans, out, threads):
    os.makedirs(out, exist_ok=True)
    start, walls = time.perf_counter(), []
    for s in scans:
        dst = os.path.join(out, os.path.basename(s).replace('.nii.gz', '_synthseg.nii.gz'))
        rc, wall, _, text = measure([tool('mri_synthseg'), '--i', s, '--o', dst,
                                     '--threads', str(threads)])
        if rc:
            sys.exit('mri_synthseg failed on %s: %s' % (s, tail(text)))
        walls.append(wall)
    return time.perf_counter() - start, walls


def batch_cmd(study, out, workers):
    return [tool('synthkit-batch'), 'mri_synthseg', '--i', study, '--o', out, '--scheduler',
            'local', '--workers', str(workers), '--threads-per-worker', '1', '--no-progress']


def sidecars(out):
    return [p for p in glob.glob(os.path.join(out, '*_synthseg.json'))]


def leftovers(out):
    return [n for n in os.listdir(out) if n.startswith('.')] if os.path.isdir(out) else []


def agreement(a, b):
    import nibabel as nib
    x, y = np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)
    return float((x == y).mean()) if x.shape == y.shape else float('nan')


def killed_and_resumed(study, out, workers, n):
    proc = subprocess.Popen(batch_cmd(study, out, workers), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t = time.perf_counter()
    while len(sidecars(out)) < n // 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    finished = len(sidecars(out))
    segs = glob.glob(os.path.join(out, '*_synthseg.nii.gz'))
    temps = leftovers(out)
    first = time.perf_counter() - t
    r = subprocess.run(batch_cmd(study, out, workers), capture_output=True, text=True)
    text = r.stderr
    computed = skipped = None
    for line in text.splitlines():
        if ' computed, ' in line:
            words = line.split()
            computed, skipped = int(words[1]), int(words[3])
    return {'finished_at_kill': finished, 'segs_at_kill': len(segs), 'temps_at_kill': len(temps),
            'first_run_s': first, 'recomputed': computed, 'skipped': skipped,
            'rc': r.returncode, 'complete_after': len(sidecars(out)),
            'temps_after': len(leftovers(out)), 'log': tail(text)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default='../shared/data/dev_eval')
    p.add_argument('--labels', default='../shared/data/label_maps')
    p.add_argument('--work', default='.cache/bench_batch')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default='docs/bench_batch.md')
    p.add_argument('--synthetic', type=int, default=15, help='synthetic scans (default 15)')
    args = p.parse_args()
    cores = os.cpu_count()
    study = os.path.join(args.work, 'study')
    scans = make_study(args.data, args.labels, study, args.synthetic)
    n = len(scans)
    print('study: %d scans' % n, flush=True)
    for sub in ('loop', 'batch', 'resume'):
        subprocess.run(['rm', '-rf', os.path.join(args.work, sub)])

    loop_s, walls = loop(scans, os.path.join(args.work, 'loop'), cores)
    print('loop: %.0f s' % loop_s, flush=True)

    rc, batch_s, main_gb, text = measure(batch_cmd(study, os.path.join(args.work, 'batch'),
                                                   args.workers))
    if rc:
        sys.exit('synthkit-batch failed: %s' % tail(text))
    records = [json.load(open(p)) for p in sidecars(os.path.join(args.work, 'batch'))]
    peaks = {}
    for r in records:
        peaks[r['worker']] = max(peaks.get(r['worker'], 0), r['worker_peak_mb'])
    per_scan = [r['seconds'] for r in records]
    agree = [agreement(os.path.join(args.work, 'batch', os.path.basename(s).replace(
        '.nii.gz', '_synthseg.nii.gz')), os.path.join(args.work, 'loop', os.path.basename(s)
                                                      .replace('.nii.gz', '_synthseg.nii.gz')))
             for s in scans]
    print('batch: %.0f s' % batch_s, flush=True)

    res = killed_and_resumed(study, os.path.join(args.work, 'resume'), args.workers, n)
    print('resume: %s' % res, flush=True)

    rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                         text=True).stdout.strip()
    loop_rate, batch_rate = n / loop_s * 60, n / batch_s * 60
    lines = [
        '# synthkit-batch vs a shell loop of mri_synthseg',
        '',
        'Made by `make bench-batch` (scripts/bench_batch.py) at commit %s on %s, %d cores. '
        'Study: %d scans (5 real dev scans: OASIS 0455-0457 T1, ixi002 T1 and T2, 256^3; '
        '%d synthetic heads from mri_synth, 192x224x192). Shipped SynthSeg model. Nothing '
        'else ran on the machine.' % (rev, time.strftime('%Y-%m-%d'), cores, n, n - len(DEV)),
        '',
        '| run | wall time | scans/min | per scan |',
        '| --- | --- | --- | --- |',
        '| shell loop, `mri_synthseg --threads %d` per scan | %.0f s | %.2f | %.1f s '
        '(median %.1f s) |' % (cores, loop_s, loop_rate, loop_s / n, float(np.median(walls))),
        '| `synthkit-batch --workers %d --threads-per-worker 1` | %.0f s | %.2f | %.1f s '
        '(median in-worker %.1f s) |'
        % (args.workers, batch_s, batch_rate, batch_s / n, float(np.median(per_scan))),
        '',
        '- Throughput, batch over loop: **%.2fx** (target >= 1.5x).' % (batch_rate / loop_rate),
        '- Peak memory per worker (ru_maxrss of each worker process): %s; largest process of '
        'the command (wait4 ru_maxrss): %.2f GB.'
        % (', '.join('%.2f GB' % (v / 1024) for v in sorted(peaks.values())), main_gb),
        '- Segmentations of the batch vs the loop (the loop runs %d threads, the workers 1): '
        'voxels with the same label: min %.5f, mean %.5f.'
        % (cores, float(np.nanmin(agree)), float(np.nanmean(agree))),
        '',
        '## Killed halfway, then resumed',
        '',
        'The batch command was killed with SIGKILL (its whole process group: client, nannies, '
        'workers) once %d scans were finished, then the same command was run again.' % (n // 2),
        '',
        '| measure | value |',
        '| --- | --- |',
        '| scans finished (sidecar written) at the kill | %d |' % res['finished_at_kill'],
        '| segmentations on disk at the kill (finished + in flight) | %d |' % res['segs_at_kill'],
        '| hidden temp files left by the kill | %d |' % res['temps_at_kill'],
        '| second run: skipped as finished | %s |' % res['skipped'],
        '| second run: recomputed | %s (expected %d: the unfinished ones) |'
        % (res['recomputed'], n - res['finished_at_kill']),
        '| scans complete after the second run | %d of %d |' % (res['complete_after'], n),
        '| temp files left after the second run | %d |' % res['temps_after'],
        '| second run exit status | %d |' % res['rc'],
        '',
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
