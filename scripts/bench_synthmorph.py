#!/usr/bin/env python
"""Benchmark mri_synthmorph register (and ANTs SyN, side by side) on pairs of labelled scans.

Pairs: every ordered pair (moving A, fixed B) of the dev_eval OASIS subjects (oasis_0455, 0456,
0457: 6 pairs), T1 images already skull-stripped, bias-corrected and affinely aligned to a common
atlas, 160x192x224 at 1 mm, with FreeSurfer asegs. --pairs N keeps the first N pairs.

Methods, each command its own process, on the CPU:
- identity: no registration (A's aseg compared with B's as they are, both already affinely
  aligned), to show what registration adds;
- synthmorph-affine: `mri_synthmorph register -m affine A/t1 B/t1 -t X.lta -j N`, then
  `mri_synthmorph apply -m nearest X.lta A/aseg moved`;
- synthmorph-deform (deformable only, the pairs being affinely pre-aligned): `register -m
  deform ... -t X.nii.gz -j N`, then apply as below;
- synthmorph-deform-network: the same with `--optimize 0` (the network's field on its 2 mm
  grid alone, without the mutual-information optimization that follows it by default);
- synthmorph-joint (affine then deformable): `register -m joint ... -t X.nii.gz -j N` (a
  displacement field on B's grid), then `apply -m nearest X.nii.gz A/aseg moved`;
- easyreg: `mri_easyreg --ref B/t1 --flo A/t1 --ref_seg SB --flo_seg SA --fwd_field F
  --threads N` with its defaults (affine from the centroids of the segmented structures, the
  deformable network in the affine mid-space, mutual-information optimization), then
  `mri_easywarp --i A/aseg --o moved --field F --nearest`; SA and SB are made once per subject
  by `mri_synthseg --i X/t1 --o SX --threads N` before (a user's EasyReg needs SynthSeg
  segmentations; FreeSurfer's asegs would leak the reference labels into the affine), their
  time reported apart;
- ants-syn: `scripts/ants_register.py` with the benchmark venv's Python (`make .venv-bench`):
  `ants.registration(B, A, type_of_transform='SyN')` with antspyx's default parameters (listed
  in that script), A's aseg resampled with `interpolator='genericLabel'`,
  ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=N.

Time: for ours, wall time of `register` plus that of `apply` (each a whole command: start-up,
imports and model loading included); both are also reported apart. For ANTs, wall time of the
whole ants_register.py process (start-up, imports, image reading, registration, resampling)
less the seconds it spent on the Jacobian statistics, which belong to the benchmark, not to
registration; the seconds inside ants.registration alone are reported apart. Peak memory is the
maximum resident set size of each process, read with os.wait4 on its pid (the larger of register
and apply for ours).

Scores, on the fixed grid:
- Dice of the moved aseg against the fixed aseg per structure, for the aseg structures of
  synthkit.labels.SEGMENTATION_LABELS but background (0) and CSF (24, absent from OASIS) that the
  fixed aseg holds; a pair's score is the mean over those structures;
- negative Jacobian: the share (%) of voxels inside the fixed brain (fixed aseg > 0) where the
  Jacobian determinant of the map from fixed to moving world is <= 0. For our warp,
  x -> x + disp(x) with disp the RAS mm displacement field of `-t` on the fixed grid, its
  derivatives by central finite differences (np.gradient) in voxels, converted to mm through the
  grid's vox2ras; for ANTs, ants.create_jacobian_determinant_image of its SyN warp on the fixed
  grid (also finite differences). For affine transforms the determinant is that of the matrix,
  the same at every voxel.

Targets (issues): deformable Dice >= 0.75 and >= affine + 0.05, >= ANTs SyN (issue 15), <= 20 s a
pair end to end (issue 15), easyreg Dice >= synthmorph-joint (issue 15); negative-Jacobian voxels
< 0.1 %
(in the worst pair); within 0.02 Dice of ANTs SyN at >= 10x its speed (mean seconds).

Writes a markdown report (--out) and, with --card-affine / --card-deform, merges our scores into
the model cards (skipped with a message when a card does not exist).
"""

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from synthkit import geometry, io, labels, metrics, transforms
from synthkit.models.easyreg.inference import transform_from_coordinates
from benchlib import measure, merge_card, run_quiet, tail, venv_problem

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

METHODS = ('synthmorph-affine', 'synthmorph-deform', 'synthmorph-deform-network',
           'synthmorph-joint', 'easyreg', 'ants-syn')
#: extra register arguments of a method
EXTRA_ARGS = {'synthmorph-deform-network': ['--optimize', '0']}
BASELINE = 'identity'
#: Structures scored: the aseg labels of mri_synthseg's output without background and CSF.
STRUCTURES = tuple(l for l in labels.SEGMENTATION_LABELS if l not in (0, 24))
SUBJECTS = ('oasis_0455', 'oasis_0456', 'oasis_0457')

TARGET_DICE = 0.75
TARGET_OVER_AFFINE = 0.05
TARGET_NEG_JAC = 0.1  # %
TARGET_ANTS_GAP = 0.02
TARGET_SPEEDUP = 10.0
TARGET_SECONDS = 20.0   # per pair, end to end (issue 15)


# ---------------------------------------------------------------------------------------------
# data

def subject_pairs(data, limit=None):
    """([subjects], [(moving, fixed)]) of the OASIS subjects found in ``data``, every ordered
    pair, the first ``limit`` only if given; each subject a dict with name, t1 and aseg paths."""
    subjects = []
    for name in SUBJECTS:
        t1, aseg = (os.path.join(data, name, f) for f in ('t1.nii.gz', 'aseg.nii.gz'))
        if os.path.isfile(t1) and os.path.isfile(aseg):
            subjects.append({'name': name, 't1': t1, 'aseg': aseg})
    pairs = list(itertools.permutations(subjects, 2))
    return subjects, pairs[:limit] if limit else pairs


def pair_name(moving, fixed):
    return '%s->%s' % (moving['name'].replace('oasis_', ''), fixed['name'].replace('oasis_', ''))


# ---------------------------------------------------------------------------------------------
# running a method

def synthmorph_base(tool):
    """Command prefix for mri_synthmorph: ``tool`` if given, else this tree's bin script run
    with this Python."""
    return [tool] if tool else tool_cmd('mri_synthmorph')


def register_cmd(base, model, moving, fixed, trans, threads, weights=None, extra=()):
    cmd = base + ['register', '-m', model, moving, fixed, '-t', trans, '-j', str(threads)]
    cmd += list(extra)
    for w in weights or ():
        cmd += ['-w', w]
    return cmd


def apply_cmd(base, trans, seg, out):
    return base + ['apply', '-m', 'nearest', trans, seg, out]


def tool_cmd(tool, *args):
    """This tree's bin script ``tool`` run with this Python."""
    return [sys.executable, os.path.join(ROOT, 'bin', tool)] + [str(a) for a in args]


def easyreg_cmd(moving, fixed, moving_seg, fixed_seg, field, threads):
    return tool_cmd('mri_easyreg', '--ref', fixed, '--flo', moving, '--ref_seg', fixed_seg,
                    '--flo_seg', moving_seg, '--fwd_field', field, '--threads', threads)


def ants_cmd(python, moving, fixed, moving_seg, fixed_seg, out_seg, out_json, threads):
    return [python, os.path.join(HERE, 'ants_register.py'), moving, fixed, moving_seg, out_seg,
            '--mask', fixed_seg, '--json', out_json, '--threads', str(threads)]


def ants_problem(python):
    """Why ANTs cannot run with ``python`` (None when it can)."""
    return venv_problem(python, 'ants', 'ants (antspyx)')


# ---------------------------------------------------------------------------------------------
# scores

def labels_on_grid(vol, ref):
    """Label map ``vol`` on ``ref``'s grid (nearest neighbour)."""
    data = np.asarray(vol.data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape == ref.data.shape[:3] and np.allclose(vol.affine, ref.affine, atol=1e-4):
        return data
    return geometry.resample(data, vol.affine, ref.data.shape[:3], ref.affine, interp='nearest')


def jacobian_determinant(disp, affine):
    """Jacobian determinant of x -> x + disp(x) at every voxel of a displacement field.

    ``disp`` (X, Y, Z, 3): world (mm) displacements on the grid of vox2world ``affine``. The
    derivatives are central differences in voxels (one-sided at the edges, np.gradient),
    converted to world units: J = I + (d disp / d v) @ inv(A) with A the affine's 3x3 part.
    Returns a float32 (X, Y, Z) array.
    """
    disp = np.asarray(disp, dtype=np.float32)
    if disp.ndim != 4 or disp.shape[3] != 3:
        raise ValueError('displacement field must be (X, Y, Z, 3), got %s' % (disp.shape,))
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3]).astype(np.float32)
    # j[i][k] = delta_ik + sum_a d disp_i / d v_a * inv[a, k]
    j = [[None] * 3 for _ in range(3)]
    for i in range(3):
        grads = np.gradient(disp[..., i], axis=(0, 1, 2)) if min(disp.shape[:3]) > 1 else \
            [np.gradient(disp[..., i], axis=a) if disp.shape[a] > 1
             else np.zeros(disp.shape[:3], np.float32) for a in range(3)]
        for k in range(3):
            j[i][k] = sum(grads[a] * inv[a, k] for a in range(3)) + (1.0 if i == k else 0.0)
        del grads
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])).astype(np.float32)


def neg_jacobian_percent(det, mask=None):
    """Share (%) of voxels (inside boolean ``mask`` if given) with a determinant <= 0."""
    det = np.asarray(det)
    vals = det[mask] if mask is not None else det.ravel()
    return 100.0 * float((vals <= 0).mean()) if vals.size else float('nan')


def transform_neg_jac(path, fixed_mask):
    """(neg-Jacobian % inside ``fixed_mask``, % over the grid, minimum determinant) of a
    transform file written by register: a warp's field, or an LTA's matrix."""
    trans = transforms.load_transform(path)
    if trans.is_warp:
        return field_neg_jac(trans, fixed_mask, path)
    d = float(np.linalg.det(trans.matrix[:3, :3]))
    pct = 0.0 if d > 0 else 100.0
    return pct, pct, d


def field_neg_jac(trans, fixed_mask, path=''):
    """:func:`transform_neg_jac` of a displacement-field transform on the fixed grid."""
    if trans.target.shape != fixed_mask.shape:
        raise ValueError('%s: field grid %s is not the fixed grid %s'
                         % (path, trans.target.shape, fixed_mask.shape))
    det = jacobian_determinant(trans.disp, trans.target.affine)
    return neg_jacobian_percent(det, fixed_mask), neg_jacobian_percent(det), float(det.min())


# ---------------------------------------------------------------------------------------------
# report

def fmt(v, f):
    return f % v if isinstance(v, (int, float)) and np.isfinite(v) else '-'


def nanmean(values):
    values = [v for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.mean(values)) if values else float('nan')


def nanmax(values):
    values = [v for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.max(values)) if values else float('nan')


def summary(results, pairs):
    """{method: means over the pairs it completed} (identity included)."""
    names = [pair_name(m, f) for m, f in pairs]
    out = {}
    for method, res in results.items():
        rows = [res[n] for n in names if n in res]
        if not rows:
            continue
        s = {'n': len(rows)}
        for k in ('dice', 'neg_jac', 'seconds', 'reg_seconds', 'apply_seconds', 'peak_gb'):
            s[k] = nanmean([r.get(k) for r in rows])
        s['neg_jac_max'] = nanmax([r.get('neg_jac') for r in rows])
        s['per_label'] = {l: nanmean([r['per_label'].get(l) for r in rows])
                          for l in STRUCTURES if any(l in r['per_label'] for r in rows)}
        out[method] = s
    return out


def targets(summ, n_pairs):
    """[(target, value text, met: True/False/None)]."""
    joint, affine, ants = (summ.get(m) for m in ('synthmorph-joint', 'synthmorph-affine',
                                                 'ants-syn'))
    complete = {m: s for m, s in summ.items() if s['n'] == n_pairs}

    def ok(cond, *needed):
        return bool(cond) if all(m in complete for m in needed) else None

    out = []
    if joint:
        out.append(('deformable Dice >= %.2f' % TARGET_DICE, '%.3f' % joint['dice'],
                    ok(joint['dice'] >= TARGET_DICE, 'synthmorph-joint')))
        out.append(('worst pair negative Jacobian < %.1f %%' % TARGET_NEG_JAC,
                    '%s %%' % fmt(joint['neg_jac_max'], '%.4f'),
                    ok(joint['neg_jac_max'] < TARGET_NEG_JAC, 'synthmorph-joint')))
    if joint and affine:
        gain = joint['dice'] - affine['dice']
        out.append(('deformable Dice >= affine + %.2f' % TARGET_OVER_AFFINE, '%+.3f' % gain,
                    ok(gain >= TARGET_OVER_AFFINE, 'synthmorph-joint', 'synthmorph-affine')))
    if joint and ants:
        gap = joint['dice'] - ants['dice']
        out.append(('Dice >= ANTs SyN', '%+.3f' % gap,
                    ok(gap >= 0, 'synthmorph-joint', 'ants-syn')))
        out.append(('Dice within %.2f of ANTs SyN' % TARGET_ANTS_GAP, '%+.3f' % gap,
                    ok(gap >= -TARGET_ANTS_GAP, 'synthmorph-joint', 'ants-syn')))
        speed = ants['seconds'] / joint['seconds'] if joint['seconds'] > 0 else float('nan')
        out.append(('>= %.0fx the speed of ANTs SyN' % TARGET_SPEEDUP, '%sx' % fmt(speed, '%.1f'),
                    ok(speed >= TARGET_SPEEDUP, 'synthmorph-joint', 'ants-syn')))
    if joint:
        out.append(('<= %.0f s per pair (end to end)' % TARGET_SECONDS,
                    '%s s' % fmt(joint['seconds'], '%.1f'),
                    ok(joint['seconds'] <= TARGET_SECONDS, 'synthmorph-joint')))
    easyreg = summ.get('easyreg')
    if joint and easyreg:
        gap = easyreg['dice'] - joint['dice']
        out.append(('easyreg Dice >= synthmorph-joint', '%+.3f' % gap,
                    ok(gap >= 0, 'easyreg', 'synthmorph-joint')))
    network = summ.get('synthmorph-deform-network')
    if network and ants:      # the network alone (--optimize 0), for comparison
        gap = network['dice'] - ants['dice']
        speed = ants['seconds'] / network['seconds'] if network['seconds'] > 0 else float('nan')
        out.append(('(--optimize 0) Dice within %.2f of ANTs SyN' % TARGET_ANTS_GAP,
                    '%+.3f' % gap,
                    ok(gap >= -TARGET_ANTS_GAP, 'synthmorph-deform-network', 'ants-syn')))
        out.append(('(--optimize 0) >= %.0fx the speed of ANTs SyN' % TARGET_SPEEDUP,
                    '%sx' % fmt(speed, '%.1f'),
                    ok(speed >= TARGET_SPEEDUP, 'synthmorph-deform-network', 'ants-syn')))
    return out


def segment_text(info):
    seconds = info.get('segment_seconds') or {}
    if not seconds:
        return 'not run'
    return ', '.join('%s %.1f s' % (n.replace('oasis_', ''), t) for n, t in seconds.items())


def report(results, pairs, args, info, errors):
    summ = summary(results, pairs)
    order = [m for m in (BASELINE,) + METHODS if m in summ]
    lines = ['# mri_synthmorph register benchmark', '',
             'Models: %s. ANTs: %s. Machine: %d cores, CPU only; `-j %d` for ours, '
             'ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=%d for ANTs. %d ordered pair(s) of the '
             'dev_eval OASIS subjects (moving->fixed), one run per pair and method, each command '
             'its own process.' % (info['models'], info.get('ants', '(not run)'), os.cpu_count(),
                                   args.threads, args.threads, len(pairs)), '',
             '## Summary', '',
             '| method | pairs | mean Dice | mean neg. Jacobian % | worst pair neg. Jac. % | '
             'mean s (end to end) | mean s (registration) | peak GB |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for m in order:
        s = summ[m]
        lines.append('| %s | %d | %s | %s | %s | %s | %s | %s |' % (
            m, s['n'], fmt(s['dice'], '%.3f'), fmt(s['neg_jac'], '%.4f'),
            fmt(s['neg_jac_max'], '%.4f'), fmt(s['seconds'], '%.1f'),
            fmt(s['reg_seconds'], '%.1f'), fmt(s['peak_gb'], '%.2f')))
    tgt = targets(summ, len(pairs))
    if tgt:
        lines += ['', '| target | value | status |', '| --- | --- | --- |']
        status = {True: 'met', False: 'missed', None: 'not measured (incomplete)'}
        for name, value, met in tgt:
            lines.append('| %s | %s | %s |' % (name, value, status[met]))
    lines += ['', '## Per pair', '',
              '| pair |' + ''.join(' %s Dice |' % m for m in order)
              + ''.join(' %s neg. Jac. %% | %s s |' % (m, m) for m in order if m != BASELINE),
              '|' + ' --- |' * (1 + len(order) + 2 * (len(order) - (BASELINE in order)))]
    for mov, fix in pairs:
        n = pair_name(mov, fix)
        row = '| %s |' % n + ''.join(' %s |' % fmt(results[m].get(n, {}).get('dice'), '%.3f')
                                     for m in order)
        for m in order:
            if m != BASELINE:
                r = results[m].get(n, {})
                row += ' %s | %s |' % (fmt(r.get('neg_jac'), '%.4f'), fmt(r.get('seconds'), '%.1f'))
        lines.append(row)
    lines += ['', '## Per structure (mean Dice over the pairs)', '',
              '| structure | label |' + ''.join(' %s |' % m for m in order),
              '|' + ' --- |' * (2 + len(order))]
    for l in STRUCTURES:
        if not any(l in summ[m]['per_label'] for m in order):
            continue
        lines.append('| %s | %d |' % (labels.SYNTHSEG_NAMES.get(l, labels.name(l)), l) + ''.join(
            ' %s |' % fmt(summ[m]['per_label'].get(l), '%.3f') for m in order))
    lines += ['', '## What was run', '',
              'Moving A = `oasis_X/t1.nii.gz`, fixed B = `oasis_Y/t1.nii.gz` (skull-stripped, '
              'bias-corrected, affinely pre-aligned to a common atlas, 160x192x224, 1 mm). '
              '**identity**: A\'s aseg scored against B\'s as they are. '
              '**synthmorph-affine**: `mri_synthmorph register -m affine A B -t X.lta -j %d`, then '
              '`mri_synthmorph apply -m nearest X.lta A/aseg.nii.gz moved.nii.gz`. '
              '**synthmorph-deform**: the same with `-m deform -t X.nii.gz` (deformable only, '
              'the pairs being affinely pre-aligned; a displacement field on B\'s grid; '
              'the network on its 2 mm grid, then 50 iterations of symmetric mutual-information '
              'optimization on that grid, the defaults). '
              '**synthmorph-deform-network**: the same with `--optimize 0` (the network\'s '
              'field alone). '
              '**synthmorph-joint**: the same with `-m joint -t X.nii.gz` (affine then '
              'deformable). '
              '**easyreg**: `mri_easyreg --ref B --flo A --ref_seg SB --flo_seg SA --fwd_field F '
              '--threads %d` at its defaults, then `mri_easywarp --i A/aseg.nii.gz --o moved '
              '--field F --nearest`; SA, SB: `mri_synthseg` segmentations of the T1s, made once '
              'per subject before (%s), not counted in its time. '
              '**ants-syn**: `scripts/ants_register.py` in the benchmark venv: '
              '`ants.registration(B, A, type_of_transform=\'SyN\')` with antspyx\'s defaults '
              '(centre-of-mass initialisation; Affine[0.25], Mattes MI 32 bins, 20 %% regular '
              'sampling, 2100x1200x1200x0 iterations, shrink 4x2x2x1, smoothing 3x2x1x0; '
              'SyN[0.2,3,0], Mattes MI 32 bins, 40x20x0 iterations, shrink 4x2x1, smoothing '
              '2x1x0; no fixed random seed), A\'s aseg resampled with '
              '`ants.apply_transforms(..., interpolator=\'genericLabel\')`.'
              % (args.threads, args.threads, segment_text(info)), '',
              'Dice: per structure on B\'s grid, over the aseg structures of '
              '`synthkit.labels.SEGMENTATION_LABELS` but background and CSF (24, absent from '
              'OASIS) that B\'s aseg holds; a pair\'s Dice is the mean over them. '
              'Negative Jacobian: share of the voxels inside B\'s brain (aseg > 0) where the '
              'Jacobian determinant of the fixed-to-moving map is <= 0: for our field, x -> x + '
              'disp(x) with central finite differences (np.gradient) of the RAS mm displacement '
              'written by `-t`; for ANTs, `ants.create_jacobian_determinant_image` of its SyN '
              'warp (finite differences); for affine transforms, the sign of the matrix '
              'determinant.', '',
              'Seconds, end to end: for ours, `register` plus `apply`, each a whole command '
              '(start-up, imports, model loading); "registration" is `register` alone. For ANTs, '
              'the whole ants_register.py process (start-up, imports, reading, registration, '
              'resampling) less its Jacobian statistics; "registration" is the time inside '
              '`ants.registration` alone. Peak GB: maximum resident set size of a process (for '
              'ours the larger of register and apply), from os.wait4. Other jobs may share this '
              'machine\'s CPU, so times are indicative.']
    if errors:
        lines += ['', 'Problems:', ''] + ['- %s' % e for e in errors]
    return '\n'.join(lines) + '\n'


def card_scores(s, threads):
    """Model card scores from one method's summary."""
    scores = {'oasis_pairs_mean_dice': round(s['dice'], 4),
              'oasis_pairs_n': s['n'],
              'oasis_pairs_neg_jac_percent': round(s['neg_jac'], 5),
              'oasis_pairs_max_neg_jac_percent': round(s['neg_jac_max'], 5),
              'seconds_oasis_%dthreads' % threads: round(s['seconds'], 1),
              'peak_gb_oasis': round(s['peak_gb'], 2),
              'per_label_oasis_pairs_dice': {
                  labels.SYNTHSEG_NAMES.get(l, labels.name(l)): round(v, 4)
                  for l, v in s['per_label'].items() if np.isfinite(v)}}
    return {k: v for k, v in scores.items() if not isinstance(v, float) or np.isfinite(v)}


# ---------------------------------------------------------------------------------------------

def run_synthmorph(method, base, mov, fix, fixed_seg, mask, work, env, args):
    """Register with our tool and carry the aseg along; a result dict or an error text."""
    model = method.split('-')[1]
    stem = os.path.join(work, '%s_%s_to_%s' % (method, mov['name'], fix['name']))
    trans = stem + ('.lta' if model == 'affine' else '_warp.nii.gz')
    moved = stem + '_aseg.nii.gz'
    weights = {'affine': [args.weights_affine], 'deform': [args.weights_deform],
               'joint': [args.weights_affine, args.weights_deform]}[model]
    names = {'affine': ('synthmorph_affine',), 'deform': ('synthmorph_deform',),
             'joint': ('synthmorph_affine', 'synthmorph_deform')}[model]
    weights = [w or default_weights(n) for w, n in zip(weights, names)] if any(weights) \
        else None
    rc, wall, peak, text = measure(register_cmd(base, model, mov['t1'], fix['t1'], trans,
                                                args.threads, weights,
                                                EXTRA_ARGS.get(method, ())), env=env)
    if rc != 0 or not os.path.isfile(trans):
        return 'register failed (exit %d): %s' % (rc, tail(text))
    rc, wall_apply, peak_apply, text = measure(apply_cmd(base, trans, mov['aseg'], moved), env=env)
    if rc != 0 or not os.path.isfile(moved):
        return 'apply failed (exit %d): %s' % (rc, tail(text))
    return scored(moved, fixed_seg, transform_neg_jac(trans, mask), (wall, wall_apply),
                  (peak, peak_apply))


def scored(moved, fixed_seg, jacobian, seconds, peaks):
    """A result dict of our tools: the Dice of the ``moved`` aseg file against ``fixed_seg``,
    ``jacobian`` (:func:`transform_neg_jac`), the (register, apply) ``seconds`` and ``peaks``."""
    per_label = metrics.dice_table(labels_on_grid(io.load_volume(moved, allow_empty=True),
                                                  fixed_seg), fixed_seg.data, STRUCTURES)
    neg, neg_grid, det_min = jacobian
    return {'per_label': per_label, 'dice': nanmean(list(per_label.values())),
            'neg_jac': neg, 'neg_jac_grid': neg_grid, 'det_min': det_min,
            'seconds': sum(seconds), 'reg_seconds': seconds[0], 'apply_seconds': seconds[1],
            'peak_gb': max(peaks)}


def segment_subjects(subjects, work, env, args):
    """{subject name: SynthSeg segmentation path or an error text}, each made once by
    ``mri_synthseg`` (for easyreg), and {name: seconds}."""
    paths, seconds = {}, {}
    for s in subjects:
        out = os.path.join(work, 'synthseg_%s.nii.gz' % s['name'])
        rc, wall, _, text = measure(tool_cmd('mri_synthseg', '--i', s['t1'], '--o', out,
                                             '--threads', args.threads), env=env)
        if rc != 0 or not os.path.isfile(out):
            paths[s['name']] = 'mri_synthseg failed (exit %d): %s' % (rc, tail(text))
        else:
            paths[s['name']], seconds[s['name']] = out, wall
        print('%-9s segmented by mri_synthseg in %.1f s' % (s['name'], wall), flush=True)
    return paths, seconds


def run_easyreg(mov, fix, segs, fixed_seg, mask, work, env, args):
    """mri_easyreg (SynthSeg segmentations given) then mri_easywarp of the aseg."""
    for s in (mov, fix):
        if not os.path.isfile(segs[s['name']]):
            return segs[s['name']]
    stem = os.path.join(work, 'easyreg_%s_to_%s' % (mov['name'], fix['name']))
    field, moved = stem + '_fwd.nii.gz', stem + '_aseg.nii.gz'
    rc, wall, peak, text = measure(easyreg_cmd(mov['t1'], fix['t1'], segs[mov['name']],
                                               segs[fix['name']], field, args.threads), env=env)
    if rc != 0 or not os.path.isfile(field):
        return 'mri_easyreg failed (exit %d): %s' % (rc, tail(text))
    rc, wall_apply, peak_apply, text = measure(tool_cmd(
        'mri_easywarp', '--i', mov['aseg'], '--o', moved, '--field', field, '--nearest',
        '--threads', args.threads), env=env)
    if rc != 0 or not os.path.isfile(moved):
        return 'mri_easywarp failed (exit %d): %s' % (rc, tail(text))
    vol = io.load_volume(field)
    jacobian = field_neg_jac(transform_from_coordinates(np.asarray(vol.data), vol.affine), mask,
                             field)
    return scored(moved, fixed_seg, jacobian, (wall, wall_apply), (peak, peak_apply))


def run_ants(python, mov, fix, fixed_seg, work, env, args):
    stem = os.path.join(work, 'ants-syn_%s_to_%s' % (mov['name'], fix['name']))
    moved, info_path = stem + '_aseg.nii.gz', stem + '.json'
    env = {**env, 'ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS': str(args.threads)}
    rc, wall, peak, text = measure(ants_cmd(python, mov['t1'], fix['t1'], mov['aseg'],
                                            fix['aseg'], moved, info_path, args.threads), env=env)
    if rc != 0 or not os.path.isfile(moved) or not os.path.isfile(info_path):
        return 'failed (exit %d): %s' % (rc, tail(text))
    with open(info_path) as f:
        info = json.load(f)
    per_label = metrics.dice_table(labels_on_grid(io.load_volume(moved, allow_empty=True),
                                                  fixed_seg), fixed_seg.data, STRUCTURES)
    return {'per_label': per_label, 'dice': nanmean(list(per_label.values())),
            'neg_jac': info.get('neg_jac_percent_mask', float('nan')),
            'neg_jac_grid': info.get('neg_jac_percent_grid', float('nan')),
            'det_min': info.get('jac_min', float('nan')),
            'seconds': wall - info.get('jacobian_seconds', 0.0),
            'reg_seconds': info.get('registration_seconds', float('nan')),
            'apply_seconds': info.get('apply_seconds', float('nan')), 'peak_gb': peak}


def default_weights(name):
    return os.path.join(os.environ.get('SYNTHKIT_MODELS') or os.path.join(ROOT, 'models'),
                        name + '.weights.h5')


def describe_models(args):
    out = []
    for name, path in (('synthmorph_affine', args.weights_affine),
                       ('synthmorph_deform', args.weights_deform)):
        weights = path or default_weights(name)
        card = weights[:-len('.weights.h5')] + '.json'
        steps = '?'
        if os.path.isfile(card):
            with open(card) as f:
                steps = json.load(f).get('training', {}).get('steps', '?')
        shown = os.path.abspath(weights)
        if shown.startswith(ROOT + os.sep):
            shown = os.path.relpath(shown, ROOT)
        out.append('`%s` (%s training steps)' % (shown, steps))
    return ', '.join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data', 'dev_eval'))
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--pairs', type=int, help='only the first N ordered pairs (quick checks)')
    p.add_argument('--methods', default=','.join(METHODS),
                   help='comma-separated subset of %s (default: all)' % ', '.join(METHODS))
    p.add_argument('--ants-python', default=os.path.join(ROOT, '.venv-bench', 'bin', 'python'),
                   help='Python of the venv with antspyx (default: %(default)s)')
    p.add_argument('--synthmorph', metavar='EXE',
                   help='mri_synthmorph to run (default: bin/mri_synthmorph with this Python)')
    p.add_argument('--weights-affine', help='affine model weights (register -w)')
    p.add_argument('--weights-deform', help='deformable model weights (register -w)')
    p.add_argument('--out', default='docs/bench_synthmorph.md')
    p.add_argument('--card-affine', help='model card JSON to merge the affine scores into')
    p.add_argument('--card-deform', help='model card JSON to merge the joint scores into')
    p.add_argument('--keep', metavar='DIR', help='keep transforms and moved asegs in DIR')
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error('unknown method(s) %s; choose from %s' % (', '.join(unknown), ', '.join(METHODS)))

    work = args.keep or tempfile.mkdtemp(prefix='bench_synthmorph_')
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
    errors = []
    info = {'models': describe_models(args)}
    base = synthmorph_base(args.synthmorph)

    if 'ants-syn' in methods:
        problem = ants_problem(args.ants_python)
        if problem:
            errors.append('ants-syn not run: ' + problem)
            print('ants-syn not run: ' + problem, flush=True)
            methods.remove('ants-syn')
        else:
            info['ants'] = 'antspyx ' + run_quiet(
                [args.ants_python, '-c', 'import importlib.metadata as m; '
                 'print(m.version("antspyx"))']).stdout.strip()

    subjects, pairs = subject_pairs(args.data, args.pairs)
    if len(subjects) < 2:
        print('need at least two OASIS subjects with t1.nii.gz and aseg.nii.gz in %s' % args.data,
              file=sys.stderr)
        return 1
    results = {m: {} for m in (BASELINE,) + tuple(methods)}
    asegs = {s['name']: io.load_volume(s['aseg']) for s in subjects}
    if 'easyreg' in methods:
        segs, info['segment_seconds'] = segment_subjects(subjects, work, env, args)
    for mov, fix in pairs:
        name = pair_name(mov, fix)
        fixed_seg = asegs[fix['name']]
        mask = np.asarray(fixed_seg.data) > 0
        per_label = metrics.dice_table(labels_on_grid(asegs[mov['name']], fixed_seg),
                                       fixed_seg.data, STRUCTURES)
        results[BASELINE][name] = {'per_label': per_label,
                                   'dice': nanmean(list(per_label.values()))}
        print('%-9s %-17s Dice %.3f' % (name, BASELINE, results[BASELINE][name]['dice']),
              flush=True)
        for method in methods:
            if method == 'ants-syn':
                r = run_ants(args.ants_python, mov, fix, fixed_seg, work, env, args)
            elif method == 'easyreg':
                r = run_easyreg(mov, fix, segs, fixed_seg, mask, work, env, args)
            else:
                r = run_synthmorph(method, base, mov, fix, fixed_seg, mask, work, env, args)
            if isinstance(r, str):
                msg = '%s on %s: %s' % (method, name, r)
                errors.append(msg)
                print(msg, flush=True)
                continue
            results[method][name] = r
            print('%-9s %-17s Dice %.3f  neg. Jac. %.4f %%  %6.1f s (registration %6.1f s)  '
                  'peak %.2f GB' % (name, method, r['dice'], r['neg_jac'], r['seconds'],
                                    r['reg_seconds'], r['peak_gb']), flush=True)

    text = report(results, pairs, args, info, errors)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)
    summ = summary(results, pairs)
    for method, card in (('synthmorph-affine', args.card_affine),
                         ('synthmorph-joint', args.card_deform)):
        if card and method in summ:
            scores = card_scores(summ[method], args.threads)
            if method == 'synthmorph-joint' and 'ants-syn' in summ:
                a, j = summ['ants-syn'], summ[method]
                scores['oasis_pairs_dice_minus_ants_syn'] = round(j['dice'] - a['dice'], 4)
                if j['seconds'] > 0:
                    scores['speedup_vs_ants_syn'] = round(a['seconds'] / j['seconds'], 1)
            # the deformable model alone (-m deform; on pairs that are already affinely aligned,
            # joint also carries the affine model's errors), and the network's field alone
            # (--optimize 0)
            for key, other in (('deform_only', 'synthmorph-deform'),
                               ('deform_network_only', 'synthmorph-deform-network')):
                if method == 'synthmorph-joint' and other in summ:
                    scores[key + '_oasis_pairs_mean_dice'] = round(summ[other]['dice'], 4)
                    scores[key + '_seconds_oasis_2threads'] = round(summ[other]['seconds'], 1)
            merge_card(card, scores)
        elif card:
            print('%s did not run: %s not updated' % (method, card), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ran = [m for m in methods if results.get(m)]
    return 0 if ran and all(len(results[m]) == len(pairs) for m in methods) else 1


if __name__ == '__main__':
    sys.exit(main())
