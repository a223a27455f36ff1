#!/usr/bin/env python
"""Benchmark mri_synthseg on the real scans of ../shared/data/dev_eval.

Measures (all with the shipped model unless --model):
- Dice against the FreeSurfer asegs of the OASIS T1s (labels present in the reference and in
  our 33 outputs; choroid plexus folded into the lateral ventricles);
- the same on a 1x1x5 mm thick-slice version of each OASIS T1 (5 slices averaged, every 5th
  kept, along the third voxel axis: 5 mm coronal slices), compared at 1 mm;
- T1<->T2 consistency on ixi002: Dice between the two segmentations, compared in world space
  (as the scanner placed the two acquisitions), and again after a rigid registration of the T2
  to the T1 by mri_synthmorph (the head may move between them);
- wall time and peak memory of the `mri_synthseg` command on a 256^3 1 mm scan (an OASIS T1
  padded to 256^3), as a separate process with --threads 2;
- with a parcellation model (`models/synthparc`, or --parc-model): Dice per Desikan-Killiany
  parcel against FreeSurfer's aparc+aseg on the subjects its card held out of training
  (`../shared/data/fs_subjects`), at 1 mm and as 1x1x5 mm thick slices, and the time --parc adds
  to one 256^3 scan (in-process, flip averaging on, the SynthSeg network warmed up first).

Writes a markdown report (--out) and, with --card, merges the scores into the model card.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from synthkit import geometry, io, metrics
from synthkit import labels as lab
from synthkit.models.synthseg.inference import Segmenter
from benchlib import cpu_model, precision_note, measure, merge_card, tail, thick_slices

HERE = os.path.dirname(os.path.abspath(__file__))

OASIS = ('oasis_0455', 'oasis_0456', 'oasis_0457')
FOLD = {31: 4, 63: 43}   # choroid plexus -> lateral ventricles


def fold(ref):
    ref = ref.copy()
    for a, b in FOLD.items():
        ref[ref == a] = b
    return ref


def segment(seg, data, affine, fast=False):
    """Hard segmentation on the 1 mm output grid, and that grid's affine."""
    result = seg.segment(np.asarray(data, np.float32), affine, fast=fast)
    return result.hard, result.grid.affine


def on_grid(hard, affine, shape, dst_affine):
    return geometry.resample(hard, affine, shape, dst_affine, interp='nearest')


def mean(d):
    return float(np.mean(list(d.values()))) if d else float('nan')


def ixi_consistency(seg, data, labels):
    """ixi002's T1 and T2 segmented apart: per-label Dice between the two in world space (as
    the scanner placed them), and after a rigid registration of the T2 to the T1 by
    mri_synthmorph (images only, the segmentations play no part: the head may move between
    the two acquisitions); and that registration's size (its rotation in degrees, and how far
    it moves the centre of the T1's brain, in mm)."""
    from synthkit.cli import common
    from synthkit.models.synthmorph.inference import Registrar
    ixi = os.path.join(data, 'ixi002')
    t1 = io.load_volume(os.path.join(ixi, 't1.nii.gz'))
    t2 = io.load_volume(os.path.join(ixi, 't2.nii.gz'))
    d1, d2 = np.asarray(t1.data, np.float32), np.asarray(t2.data, np.float32)
    h1, a1 = segment(seg, d1, t1.affine)
    h2, a2 = segment(seg, d2, t2.affine)
    reg = Registrar(common.find_model('synthmorph_affine', None))
    matrix = reg.affine((d2, t2.affine), (d1, t1.affine), rigid=True, check='refine')
    angle = np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1) / 2, -1, 1)))
    centre = a1 @ np.append(np.argwhere(h1 > 0).mean(0), 1)      # the brain's, world mm
    motion = (float(angle), float(np.linalg.norm((np.linalg.inv(matrix) @ centre - centre)[:3])))
    tables = []
    for moved in (a2, matrix @ a2):
        h = on_grid(h2, moved, h1.shape, a1)
        both = [k for k in labels if (h1 == k).any() or (h == k).any()]
        tables.append(metrics.dice_table(h, h1, both))
    print('ixi002 T1<->T2 dice %.3f, after rigid alignment %.3f (%.1f deg, %.1f mm)'
          % (mean(tables[0]), mean(tables[1]), motion[0], motion[1]), flush=True)
    return tables[0], tables[1], motion


def bench_cli(path_256, threads, model, fast=False):
    """(wall seconds, peak GB) of the whole mri_synthseg command on one scan, its own process."""
    out = tempfile.mkdtemp()
    cmd = [sys.executable, os.path.join(HERE, '..', 'bin', 'mri_synthseg'), '--i', path_256,
           '--o', os.path.join(out, 'seg.mgz'), '--vol', os.path.join(out, 'vol.csv'),
           '--threads', str(threads)] + (['--fast'] if fast else [])
    if model:
        cmd += ['--model', model]
    rc, wall, peak, text = measure(cmd, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
    if rc != 0:
        raise RuntimeError('mri_synthseg failed (exit %d): %s' % (rc, tail(text)))
    return wall, peak


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=os.path.join(HERE, '..', '..', 'shared', 'data', 'dev_eval'))
    p.add_argument('--model', help='weights (default: shipped models/synthseg.weights.h5)')
    p.add_argument('--out', default='docs/bench_synthseg.md')
    p.add_argument('--card', help='model card JSON to merge the scores into')
    p.add_argument('--skip-timing', action='store_true')
    p.add_argument('--parc-model', help='parcellation weights (default: shipped, if any)')
    p.add_argument('--parc-card', help='parcellation model card JSON to merge its scores into')
    p.add_argument('--parc-only', action='store_true', help='only the parcellation table')
    args = p.parse_args()

    seg = Segmenter(args.model)
    parc_lines, parc_scores = parcellation(seg, args)
    if parc_scores:
        merge_card(args.parc_card, parc_scores, replace=True)
    if args.parc_only:
        print('\n'.join(parc_lines))
        return
    labels = [l for l in seg.labels if l != 0]
    rows, per_label, thick_rows = [], {}, []
    for name in OASIS:
        t1 = io.load_volume(os.path.join(args.data, name, 't1.nii.gz'))
        ref = fold(np.asarray(io.load_volume(os.path.join(args.data, name, 'aseg.nii.gz')).data))
        t = time.time()
        hard, aff = segment(seg, t1.data, t1.affine)
        secs = time.time() - t
        d = metrics.dice_table(on_grid(hard, aff, ref.shape, t1.affine), ref, labels)
        rows.append((name, mean(d), secs))
        for k, v in d.items():
            per_label.setdefault(k, []).append(v)
        thick, thick_aff = thick_slices(np.asarray(t1.data, np.float32), t1.affine)
        hard, aff = segment(seg, thick, thick_aff)
        d = metrics.dice_table(on_grid(hard, aff, ref.shape, t1.affine), ref, labels)
        thick_rows.append((name, mean(d)))
        print('%s: dice %.3f (thick %.3f) %.1fs' % (name, rows[-1][1], thick_rows[-1][1], secs),
              flush=True)

    t1t2, t1t2_aligned, motion = ixi_consistency(seg, args.data, labels)

    head_lines, head_scores = whole_heads(seg, args.data, labels)

    timing = timing_head = None
    if not args.skip_timing:
        t1 = io.load_volume(os.path.join(args.data, OASIS[0], 't1.nii.gz'))
        big = np.zeros((256, 256, 256), np.float32)
        off = [(256 - n) // 2 for n in t1.shape3]
        big[off[0]:off[0] + t1.shape3[0], off[1]:off[1] + t1.shape3[1],
            off[2]:off[2] + t1.shape3[2]] = t1.data
        aff = t1.affine.copy()
        aff[:3, 3] -= aff[:3, :3] @ np.array(off, float)
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, 'head256.nii.gz')
        io.save_volume(big, aff, path)
        timing = bench_cli(path, 2, args.model)
        print('256^3: %.1f s, peak %.2f GB' % timing, flush=True)
        timing_fast = bench_cli(path, 2, args.model, fast=True)
        print('256^3 --fast: %.1f s, peak %.2f GB' % timing_fast, flush=True)
        # a whole head fills the 256^3 field of view: the network sees all of it
        head = os.path.join(args.data, '..', 'fs_subjects', 'sub-07', 'T1.mgz')
        if os.path.isfile(head):
            timing_head = bench_cli(head, 2, args.model)
            print('256^3 whole head: %.1f s, peak %.2f GB' % timing_head, flush=True)

    scores = {
        'oasis_mean_dice': round(float(np.mean([r[1] for r in rows])), 4),
        'oasis_thick_1x1x5_mean_dice': round(float(np.mean([r[1] for r in thick_rows])), 4),
        'ixi002_t1_t2_dice': round(mean(t1t2), 4),
        'ixi002_t1_t2_dice_rigidly_aligned': round(mean(t1t2_aligned), 4),
        'per_label_oasis_dice': {lab.SYNTHSEG_NAMES[k]: round(float(np.mean(v)), 4)
                                 for k, v in sorted(per_label.items())},
    }
    scores.update(head_scores)
    if timing:
        scores['seconds_256cubed_2threads'] = round(timing[0], 1)
        scores['peak_gb_256cubed'] = round(timing[1], 2)
        scores['seconds_256cubed_2threads_fast'] = round(timing_fast[0], 1)
    if timing_head:
        scores['seconds_256cubed_whole_head'] = round(timing_head[0], 1)
        scores['peak_gb_256cubed_whole_head'] = round(timing_head[1], 2)

    lines = ['# mri_synthseg benchmark', '',
             'Model: `%s` (%s steps). Data: ../shared/data/dev_eval. Machine: %d cores, %s, %s.'
             % (args.model or 'models/synthseg.weights.h5',
                seg.card.get('training', {}).get('steps', '?'), os.cpu_count(), cpu_model(),
                precision_note()), '',
             '| measure | value | target |', '| --- | --- | --- |',
             '| mean Dice, OASIS T1 x3 | %.3f | >= 0.85 |' % scores['oasis_mean_dice'],
             '| mean Dice, OASIS 1x1x5 mm thick slices | %.3f | >= 0.80 |'
             % scores['oasis_thick_1x1x5_mean_dice'],
             '| Dice T1 vs T2 segmentations, ixi002 (world space) | %.3f | >= 0.85 |'
             % scores['ixi002_t1_t2_dice'],
             '| the same after a rigid registration of the T2 to the T1 (%.1f deg, %.1f mm) '
             '| %.3f | >= 0.85 |' % (motion + (scores['ixi002_t1_t2_dice_rigidly_aligned'],)),
             '| lowest structure Dice, OASIS | %.3f | >= 0.6 |'
             % min(scores['per_label_oasis_dice'].values())]
    if timing:
        lines += ['| wall time, 256^3 scan (OASIS brain padded), `--threads 2` | %.1f s | <= 20 s |'
                  % timing[0],
                  '| peak memory, 256^3 scan (OASIS brain padded) | %.2f GB | <= 2 GB |'
                  % timing[1],
                  '| wall time, 256^3 scan, `--fast` | %.1f s | <= 10 s |' % timing_fast[0]]
    if timing_head:
        lines += ['| wall time, 256^3 whole head (fs_subjects sub-07 T1.mgz) | %.1f s | <= 20 s |'
                  % timing_head[0],
                  '| peak memory, 256^3 whole head | %.2f GB | <= 2 GB |' % timing_head[1]]
    lines += ['', '| subject | Dice | Dice (thick slices) | seconds (in-process) |',
              '| --- | --- | --- | --- |']
    lines += ['| %s | %.3f | %.3f | %.1f |' % (n, d, t[1], s)
              for (n, d, s), t in zip(rows, thick_rows)]
    lines += ['', '| structure | mean Dice (OASIS) |', '| --- | --- |']
    lines += ['| %s | %.3f |' % (n, v) for n, v in scores['per_label_oasis_dice'].items()]
    lines += [''] + head_lines + [''] + parc_lines
    text = '\n'.join(lines) + '\n'
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)
    merge_card(args.card, scores, replace=True)


def whole_heads(seg, data, labels):
    """(markdown lines, scores) on the whole-head T1s of ../shared/data/fs_subjects (FreeSurfer
    6 asegs; scans SynthSeg never trains on, not skull-stripped, unlike the OASIS ones)."""
    root = os.path.join(data, '..', 'fs_subjects')
    subjects = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else [])
                      if os.path.isfile(os.path.join(root, d, 'T1.mgz'))
                      and os.path.isfile(os.path.join(root, d, 'aseg.mgz')))
    title = ['## Whole heads: fs_subjects', '']
    if not subjects:
        return title + ['No fs_subjects found: not measured.'], {}
    scored = [k for k in labels if k != 24]   # FreeSurfer's CSF label is not SynthSeg's
    rows, per_label, ratio = [], {}, {}
    for name in subjects:
        t1 = io.load_volume(os.path.join(root, name, 'T1.mgz'))
        ref = fold(np.asarray(io.load_volume(os.path.join(root, name, 'aseg.mgz')).data))
        hard, aff = segment(seg, t1.data, t1.affine)
        hard = on_grid(hard, aff, ref.shape, t1.affine)
        d = metrics.dice_table(hard, ref, [k for k in scored if (ref == k).any()])
        rows.append((name, mean(d)))
        for k, v in d.items():
            per_label.setdefault(k, []).append(v)
        for k in (4, 43, 5, 44):       # the ventricles: ours / FreeSurfer's volume
            ratio.setdefault(k, []).append(float((hard == k).sum() / max((ref == k).sum(), 1)))
        print('%s (whole head): dice %.3f' % rows[-1], flush=True)
    per = {lab.SYNTHSEG_NAMES[k]: round(float(np.mean(v)), 4) for k, v in sorted(per_label.items())}
    scores = {'fs_subjects_whole_head_mean_dice': round(float(np.mean([r[1] for r in rows])), 4),
              'per_label_fs_subjects_dice': per}
    worst = sorted(per.items(), key=lambda kv: kv[1])[:5]
    lines = title + [
        'T1.mgz (whole head, 256^3, FreeSurfer-normalized) of the %d subjects, scored against '
        'their FreeSurfer 6 aseg.mgz (choroid plexus folded into the lateral ventricles, CSF '
        '(24) not scored). SynthSeg never trains on them (SynthSR and the parcellation model '
        'do). Mean Dice **%.3f** (OASIS, skull-stripped: see above).' % (
            len(rows), scores['fs_subjects_whole_head_mean_dice']), '',
        '| subject | Dice |', '| --- | --- |']
    lines += ['| %s | %.3f |' % r for r in rows]
    lines += ['', 'Lowest structures: ' + ', '.join('%s %.3f' % kv for kv in worst) + '. '
              'Volume ours / FreeSurfer\'s (median over subjects): ' + ', '.join(
                  '%s %.2f' % (lab.SYNTHSEG_NAMES[k], float(np.median(v)))
                  for k, v in ratio.items()) + '.']
    return lines, scores


def parcellation(seg, args):
    """(markdown lines, scores) of the parcellation model on its held-out subjects; a line
    saying why not when there is no model or no subject."""
    from synthkit.cli import common
    from synthkit.models.synthparc.inference import Parcellator
    try:
        weights, card = common.find_model('synthparc', args.parc_model)
    except common.ModelUnavailable:
        return ['## Parcellation (--parc)', '', 'No parcellation model: not measured.'], None
    parc = Parcellator(weights, card)
    root = os.path.join(args.data, '..', 'fs_subjects')
    held = [os.path.join(root, os.path.basename(m))
            for m in card.get('training', {}).get('held_out_maps', [])]
    held = [h for h in held if os.path.isfile(os.path.join(h, 'aparc+aseg.mgz'))]
    if not held:
        return ['## Parcellation (--parc)', '', 'No held-out subject found: not measured.'], None
    per = {'1 mm': {}, '1x1x5 mm': {}}
    split = {'1 mm': [], '1x1x5 mm': []}
    subject_rows, added = [], []
    for path in held:
        t1 = io.load_volume(os.path.join(path, 'T1.mgz'))
        ref = np.asarray(io.load_volume(os.path.join(path, 'aparc+aseg.mgz')).data)
        present = [k for k in lab.PARCEL_LABELS if (ref == k).any()]
        means = []
        for kind, (data, aff) in (('1 mm', (np.asarray(t1.data, np.float32), t1.affine)),
                                  ('1x1x5 mm', thick_slices(np.asarray(t1.data, np.float32),
                                                            t1.affine))):
            if kind == '1 mm' and not added:
                # the SynthSeg network's first call in this process (TensorFlow's and oneDNN's
                # set-up, 2-4 s) is paid with or without --parc: not counted as the parcels'
                seg.segment(data, aff)
            t = time.time()
            result = seg.segment(data, aff, parc=parc)
            with_parc = time.time() - t
            hard = on_grid(result.hard, result.grid.affine, ref.shape, t1.affine)
            d = metrics.dice_table(hard, ref, present)
            for k, v in d.items():
                per[kind].setdefault(k, []).append(v)
            means.append(mean(d))
            # how much is the cortex, how much the parcels: Dice of the cortex as a whole, and
            # the share of the voxels both call cortex that get the reference's parcel
            ours, theirs = hard >= 1000, ref >= 1000
            both = ours & theirs
            split[kind].append((2 * both.sum() / max(ours.sum() + theirs.sum(), 1),
                                float((hard[both] == ref[both]).mean()) if both.any() else 0.0))
            if kind == '1 mm':
                t = time.time()
                seg.segment(data, aff)
                added.append(with_parc - (time.time() - t))
        subject_rows.append((os.path.basename(path), *means))
        print('%s: parcel dice %.3f (thick %.3f), --parc adds %.1f s'
              % (subject_rows[-1] + (added[-1],)), flush=True)
    scores = {'heldout_mean_parcel_dice_1mm': round(mean({k: np.mean(v) for k, v in
                                                          per['1 mm'].items()}), 4),
              'heldout_mean_parcel_dice_1x1x5': round(mean({k: np.mean(v) for k, v in
                                                            per['1x1x5 mm'].items()}), 4),
              'seconds_added_256cubed': round(float(np.mean(added)), 1),
              'cortex_dice_1mm': round(float(np.mean([c for c, _ in split['1 mm']])), 4),
              'parcel_agreement_on_common_cortex_1mm': round(float(np.mean(
                  [a for _, a in split['1 mm']])), 4),
              'parcel_agreement_on_common_cortex_1x1x5': round(float(np.mean(
                  [a for _, a in split['1x1x5 mm']])), 4),
              'heldout_subjects': [r[0] for r in subject_rows],
              'per_parcel_dice_1mm': {lab.name(k): round(float(np.mean(v)), 4)
                                      for k, v in sorted(per['1 mm'].items())}}
    lines = ['## Parcellation (--parc)', '',
             'Model: `%s` (%s steps); reference: FreeSurfer aparc+aseg of the held-out '
             'subject(s) %s (T1.mgz in, whole head).' % (
                 weights, card.get('training', {}).get('steps', '?'),
                 ', '.join(scores['heldout_subjects'])), '',
             '| measure | value | target |', '| --- | --- | --- |',
             '| mean parcel Dice, 1 mm | %.3f | >= 0.75 |'
             % scores['heldout_mean_parcel_dice_1mm'],
             '| mean parcel Dice, 1x1x5 mm | %.3f | >= 0.65 |'
             % scores['heldout_mean_parcel_dice_1x1x5'],
             '| time --parc adds, 256^3 scan (in-process) | %.1f s | <= 10 s |'
             % scores['seconds_added_256cubed'], '',
             'What limits it: the cortex as a whole (all parcels one label) has Dice %.3f '
             'against FreeSurfer\'s (the first network\'s cortex); on the voxels both call '
             'cortex, %.1f %% (1 mm) and %.1f %% (1x1x5 mm) get FreeSurfer\'s parcel.' % (
                 scores['cortex_dice_1mm'],
                 100 * scores['parcel_agreement_on_common_cortex_1mm'],
                 100 * scores['parcel_agreement_on_common_cortex_1x1x5']), '',
             '| parcel | Dice, 1 mm | Dice, 1x1x5 mm |', '| --- | --- | --- |']
    lines += ['| %s | %.3f | %.3f |' % (lab.name(k), np.mean(per['1 mm'][k]),
                                        np.mean(per['1x1x5 mm'].get(k, [np.nan])))
              for k in sorted(per['1 mm'])]
    return lines, scores


if __name__ == '__main__':
    main()
