#!/usr/bin/env python
"""Benchmark mri_synthstrip (and deepbet, side by side) against reference brain masks.

Cases:
- colin27: the Colin27 T1 whole head (`ch2.nii.gz`, 1 mm, 181x217x181) against its BET brain
  (`ch2bet.nii.gz`, mask = ch2bet > 0), both from Debian's package `mricron-data`, downloaded
  once with `apt-get download` and unpacked with `dpkg -x` into --cache;
- ixi002_t1, ixi002_t2: ../shared/data/dev_eval/ixi002 T1 and T2 against their HD-BET masks.
  These images are already brain images, slightly dilated around the brain (no skull, no
  scalp), so they are a weak check: what is measured there is mostly where each method puts
  the boundary in the thin band of tissue left around the brain, not skull stripping.

For each case and method the command runs once, as its own process: `mri_synthstrip -i IMG -m
MASK --threads N` (this venv's Python) and `scripts/deepbet_mask.py IMG MASK --threads N` (the
deepbet venv's Python, `make .venv-bench`). Wall time is the whole command (start-up, imports
and model loading included); peak memory is the maximum resident set size of that one process
(and of any process it waited for), read with os.wait4 on its pid, so one method's peak never
leaks into another's. Both run on the CPU.

Scores, on the reference grid (predictions are resampled there with nearest neighbour if their
grid differs): Dice, and the mean symmetric surface distance in mm (surface voxels = mask XOR
its 6-connected erosion; distances from each surface to the other with an exact Euclidean
distance transform in the voxel sizes of the grid; the mean over the surface voxels of both).

Writes a markdown report (--out) and, with --card, merges our scores into the model card.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from synthkit import geometry, io, metrics
from benchlib import colin27, measure, merge_card, run_quiet, tail, venv_problem

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

METHODS = ('synthstrip', 'synthstrip-nocsf', 'deepbet')


# ---------------------------------------------------------------------------------------------
# data

def padded_256(head, work):
    """Colin27 zero-padded (centred) to 256^3 at 1 mm, the size of the speed target: the path,
    and the affine that keeps every voxel where it was in world space."""
    vol = io.load_volume(head)
    data = np.asarray(vol.data)
    off = [(256 - n) // 2 for n in data.shape[:3]]
    big = np.zeros((256, 256, 256), data.dtype)
    big[off[0]:off[0] + data.shape[0], off[1]:off[1] + data.shape[1],
        off[2]:off[2] + data.shape[2]] = data
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(off, float)
    path = os.path.join(work, 'colin27_256.nii.gz')
    io.save_volume(big, vol.affine @ shift, path)
    return path


def cases(data, cache, work=None):
    """[(name, image path, reference mask Volume or error text, note)]."""
    out = []
    try:
        head, bet = colin27(cache)
        ref = io.load_volume(bet)
        mask = io.Volume(np.asarray(ref.data) > 0, ref.affine, bet)
        out.append(('colin27', head, mask, 'whole head vs BET'))
        if work:
            # the same head on a 256^3 grid (scored on the BET grid, predictions resampled)
            out.append(('colin27_256', padded_256(head, work), mask,
                        'the same, zero-padded to 256^3 (speed target)'))
    except (RuntimeError, OSError, io.VolumeError) as e:
        out.append(('colin27', None, str(e), 'whole head vs BET'))
    ixi = os.path.join(data, 'ixi002')
    for c in ('t1', 't2'):
        img, ref = (os.path.join(ixi, f) for f in ('%s.nii.gz' % c, '%s_brainmask.nii.gz' % c))
        try:
            vol = io.load_volume(ref)
            out.append(('ixi002_' + c, img, io.Volume(np.asarray(vol.data) > 0, vol.affine, ref),
                        'dilated brain image vs HD-BET'))
        except io.VolumeError as e:
            out.append(('ixi002_' + c, None, str(e), 'dilated brain image vs HD-BET'))
    return out


# ---------------------------------------------------------------------------------------------
# running a method

def synthstrip_cmd(image, mask, threads, model, no_csf=False):
    cmd = [sys.executable, os.path.join(ROOT, 'bin', 'mri_synthstrip'), '-i', image, '-m', mask,
           '--threads', str(threads)]
    return cmd + (['--model', model] if model else []) + (['--no-csf'] if no_csf else [])


def deepbet_cmd(python, image, mask, threads):
    return [python, os.path.join(HERE, 'deepbet_mask.py'), image, mask, '--threads', str(threads)]


def deepbet_problem(python):
    """Why deepbet cannot run with ``python`` (None when it can)."""
    return venv_problem(python, 'deepbet', 'deepbet')


# ---------------------------------------------------------------------------------------------
# scores

def on_grid(vol, ref):
    """``vol``'s data on ``ref``'s grid (nearest neighbour), as bool."""
    data = np.asarray(vol.data) > 0
    if data.shape == ref.data.shape and np.allclose(vol.affine, ref.affine, atol=1e-4):
        return data
    return geometry.resample(data.astype(np.uint8), vol.affine, ref.data.shape, ref.affine,
                             interp='nearest') > 0


def score(pred_path, ref):
    pred = on_grid(io.load_volume(pred_path, allow_empty=True), ref)
    truth = np.asarray(ref.data)
    vox = ref.voxsize
    return {'dice': float(metrics.dice(pred, truth)),
            'msd_mm': metrics.mean_surface_distance(pred, truth, vox),
            'volume_cm3': float(pred.sum() * np.prod(vox) / 1000)}


# ---------------------------------------------------------------------------------------------
# report

def fmt(v, f):
    return f % v if isinstance(v, (int, float)) and np.isfinite(v) else '-'


def nanmean(values):
    values = [v for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.mean(values)) if values else float('nan')


def report(results, case_list, args, weights, steps, errors):
    active = [m for m in METHODS if m in results]
    keys = ('dice', 'msd_mm', 'seconds', 'peak_gb')
    lines = ['# mri_synthstrip benchmark', '',
             'Model: `%s` (%s training steps); deepbet %s. Machine: %d cores, CPU only, '
             '`--threads %d` for both. One run per case and method, each its own process: wall '
             'time includes start-up, imports and model loading; peak memory is that process\'s '
             'maximum resident set size.' % (
                 weights, steps,
                 results.get('deepbet', {}).get('_version', '(not run)'),
                 os.cpu_count(), args.threads), '',
             'Reference masks: Colin27 `ch2bet > 0` (FSL BET, Debian `mricron-data`) for the '
             'whole-head T1; HD-BET masks for ixi002. The ixi002 images are already brain images '
             '(slightly dilated around the brain, no skull), so those rows are a weak check of '
             'boundary placement, not of skull stripping. deepbet is trained for T1 only. '
             'MSD: mean symmetric surface distance. `synthstrip` masks include the CSF around '
             'the brain (model card target `csf`), as FreeSurfer\'s SynthStrip does by default; '
             '`synthstrip-nocsf` is `mri_synthstrip --no-csf` (its own model, CSF outside), '
             'closer to what BET and HD-BET call brain.', '']
    head = '| case | reference |' + ''.join(
        ' %s Dice | %s MSD mm | %s s | %s peak GB |' % ((m,) * 4) for m in active)
    lines += [head, '|' + ' --- |' * (2 + 4 * len(active))]
    for name, _, ref, note in case_list:
        row = '| %s | %s |' % (name, note)
        for m in active:
            r = results[m].get(name, {})
            row += ' %s | %s | %s | %s |' % (
                fmt(r.get('dice'), '%.3f'), fmt(r.get('msd_mm'), '%.2f'),
                fmt(r.get('seconds'), '%.1f'), fmt(r.get('peak_gb'), '%.2f'))
        lines.append(row)
    row = '| **mean** (without colin27_256, a copy) | |'
    scored = [n for n, *_ in case_list if n != 'colin27_256']
    for m in active:
        means = [nanmean([results[m].get(n, {}).get(k) for n in scored]) for k in keys]
        row += ' %s | %s | %s | %s |' % (fmt(means[0], '%.3f'), fmt(means[1], '%.2f'),
                                         fmt(means[2], '%.1f'), fmt(means[3], '%.2f'))
    lines.append(row)
    lines += ['', '| case | reference cm^3 |' + ''.join(' %s cm^3 |' % m for m in active),
              '|' + ' --- |' * (2 + len(active))]
    for name, _, ref, _ in case_list:
        refvol = (float(np.asarray(ref.data).sum() * np.prod(ref.voxsize) / 1000)
                  if isinstance(ref, io.Volume) else float('nan'))
        lines.append('| %s | %s |' % (name, fmt(refvol, '%.0f')) + ''.join(
            ' %s |' % fmt(results[m].get(name, {}).get('volume_cm3'), '%.0f') for m in active))
    if errors:
        lines += ['', 'Problems:', ''] + ['- %s' % e for e in errors]
    return '\n'.join(lines) + '\n'


def our_scores(results, case_list, method='synthstrip'):
    ours = results[method]
    scores = {}
    for name, *_ in case_list:
        r = ours.get(name, {})
        if 'dice' in r:
            scores['%s_dice' % name] = round(r['dice'], 4)
            scores['%s_msd_mm' % name] = round(r['msd_mm'], 3)
    names = [n for n, *_ in case_list if n != 'colin27_256']
    scores['strip_mean_dice'] = round(nanmean([ours.get(n, {}).get('dice') for n in names]), 4)
    scores['strip_mean_msd_mm'] = round(nanmean([ours.get(n, {}).get('msd_mm') for n in names]), 3)
    if 'seconds' in ours.get('colin27', {}):
        scores['strip_seconds_colin27_2threads'] = round(ours['colin27']['seconds'], 1)
        scores['strip_peak_gb_colin27'] = round(ours['colin27']['peak_gb'], 2)
    if 'seconds' in ours.get('colin27_256', {}):
        scores['strip_seconds_256cube_2threads'] = round(ours['colin27_256']['seconds'], 1)
        scores['strip_peak_gb_256cube'] = round(ours['colin27_256']['peak_gb'], 2)
    return {k: v for k, v in scores.items() if np.isfinite(v)}


# ---------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data', 'dev_eval'))
    p.add_argument('--cache', default=os.path.join(ROOT, '.cache', 'mricron'),
                   help='where mricron-data is downloaded and unpacked (default: %(default)s)')
    p.add_argument('--model', help='weights (default: shipped models/synthstrip.weights.h5)')
    p.add_argument('--deepbet-python', default=os.path.join(ROOT, '.venv-bench', 'bin', 'python'),
                   help='Python of the venv with deepbet (default: %(default)s)')
    p.add_argument('--skip-deepbet', action='store_true')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default='docs/bench_synthstrip.md')
    p.add_argument('--card', help='model card JSON to merge our scores into')
    p.add_argument('--model-nocsf', help='--no-csf weights (default: synthstrip_nocsf.weights.h5 '
                                         'beside the main model; skipped when absent)')
    p.add_argument('--card-nocsf', help='model card JSON to merge the --no-csf scores into')
    p.add_argument('--keep', metavar='DIR', help='keep the predicted masks in DIR')
    args = p.parse_args()

    work = args.keep or tempfile.mkdtemp(prefix='bench_synthstrip_')
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
    errors = []

    weights = args.model or os.path.join(
        os.environ.get('SYNTHKIT_MODELS') or os.path.join(ROOT, 'models'), 'synthstrip.weights.h5')
    card_path = weights[:-len('.weights.h5')] + '.json'
    steps = '?'
    if os.path.isfile(card_path):
        with open(card_path) as f:
            steps = json.load(f).get('training', {}).get('steps', '?')

    methods = {'synthstrip': lambda img, out: synthstrip_cmd(img, out, args.threads, args.model)}
    results = {'synthstrip': {}}
    nocsf = args.model_nocsf or os.path.join(os.path.dirname(weights),
                                             'synthstrip_nocsf.weights.h5')
    if os.path.isfile(nocsf):
        methods['synthstrip-nocsf'] = lambda img, out: synthstrip_cmd(
            img, out, args.threads, nocsf, no_csf=True)
        results['synthstrip-nocsf'] = {}
    if not args.skip_deepbet:
        problem = deepbet_problem(args.deepbet_python)
        if problem:
            errors.append('deepbet not run: ' + problem)
            print('deepbet not run: ' + problem, flush=True)
        else:
            methods['deepbet'] = lambda img, out: deepbet_cmd(args.deepbet_python, img, out,
                                                              args.threads)
            results['deepbet'] = {'_version': run_quiet(
                [args.deepbet_python, '-c', 'import importlib.metadata as m, torch; '
                 'print(m.version("deepbet"), "(torch %s)" % torch.__version__)']).stdout.strip()}

    case_list = cases(args.data, args.cache, work)
    for name, image, ref, _ in case_list:
        if not isinstance(ref, io.Volume):
            errors.append('%s skipped: %s' % (name, ref))
            print('%s skipped: %s' % (name, ref), flush=True)
            continue
        for method, make_cmd in methods.items():
            out = os.path.join(work, '%s_%s_mask.nii.gz' % (name, method))
            rc, wall, peak, text = measure(make_cmd(image, out), env=env)
            if rc != 0 or not os.path.isfile(out):
                msg = '%s on %s failed (exit %d): %s' % (method, name, rc, tail(text))
                errors.append(msg)
                print(msg, flush=True)
                continue
            r = score(out, ref)
            r.update(seconds=wall, peak_gb=peak)
            results[method][name] = r
            print('%-10s %-11s Dice %.3f  MSD %6.2f mm  %6.1f s  peak %.2f GB  (%.0f cm^3)' % (
                name, method, r['dice'], r['msd_mm'], wall, peak, r['volume_cm3']), flush=True)

    shown = os.path.abspath(weights)
    if shown.startswith(ROOT + os.sep):
        shown = os.path.relpath(shown, ROOT)
    text = report(results, case_list, args, shown, steps, errors)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)
    if args.card:
        merge_card(args.card, our_scores(results, case_list))
    if args.card_nocsf and results.get('synthstrip-nocsf'):
        merge_card(args.card_nocsf, our_scores(results, case_list, 'synthstrip-nocsf'))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if results['synthstrip'] else 1


if __name__ == '__main__':
    sys.exit(main())
