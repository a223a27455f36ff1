#!/usr/bin/env python
"""Benchmark mri_synthsr on the real scans of ../shared/data/dev_eval.

The test that matters to users: segment the SynthSR output with our SynthSeg and score it.
- OASIS (x3): Dice against the FreeSurfer aseg of segmenting (a) the 1 mm T1 directly, (b) a
  thick-slice version directly (1x1x5 mm: 5 slices averaged, every 5th kept, along the third
  voxel axis; 5x1x1 mm along the first), (c) SynthSR of that version. Target: (c) within 0.03 of
  (a) and above (b).
- ixi002: the T2 (0.94x0.94x1.25 mm) through SynthSR, segmented, against the segmentation of
  the real T1 (world space, same session); and the T2 segmented directly, for comparison.
- Low-field-like versions of the OASIS scans (1.5 x 5 x 1.5 mm, noise, weaker contrast): Dice
  of segmenting them directly, after SynthSR and after SynthSR --lowfield (when that model is
  there).
- A CT-like synthetic case: an OASIS aseg painted with typical CT Hounsfield units (CSF 5, GM 40,
  WM 28, deep grey 38; noise 4 HU), 5 mm slices, run with --ct's clipping; Dice against the aseg.
- Image similarity of the SynthSR output to the real 1 mm T1 (correlation and SSIM inside the
  aseg's brain, both scaled by their white-matter median), on the reference's grid.
- Wall time and peak memory of the `mri_synthsr` command on a 256^3 scan (an OASIS T1 padded to
  256^3, and a whole-head FreeSurfer T1.mgz), as its own process with --threads 2.

Writes a markdown report (--out), a PNG montage (input / SynthSR / real T1; --png) and, with
--card, merges the scores into the SynthSR model card.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from synthkit import geometry, io, metrics, qc
from synthkit.models.synthseg.inference import Segmenter
from synthkit.models.synthsr.inference import Synthesizer
from benchlib import (cpu_model, lowfield_like, precision_note, measure, merge_card, tail,
                      thick_slices)
from bench_synthseg import OASIS, fold, mean, on_grid, segment

HERE = os.path.dirname(os.path.abspath(__file__))

#: typical CT values (HU) of brain tissue classes, for the CT-like case
CT_HU = {'csf': 5.0, 'gm': 40.0, 'wm': 28.0, 'deep': 38.0}
_DEEP = (10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60, 16)
_CSF = (4, 5, 14, 15, 24, 43, 44, 31, 63, 72)
_WM = (2, 41, 7, 46, 77, 251, 252, 253, 254, 255, 85)


def ct_like(aseg, rng, noise_hu=4.0):
    """A CT-like image (HU) of an aseg: one value per tissue class, Gaussian noise."""
    ct = np.full(aseg.shape, -1000.0, np.float32)
    brain = aseg > 0
    ct[brain] = CT_HU['gm']
    ct[np.isin(aseg, _WM)] = CT_HU['wm']
    ct[np.isin(aseg, _DEEP)] = CT_HU['deep']
    ct[np.isin(aseg, _CSF)] = CT_HU['csf']
    ct[brain] += rng.normal(0, noise_hu, int(brain.sum())).astype(np.float32)
    return ct


def synthesize(sr, data, affine, ct=False):
    """SynthSR output and its grid's affine (the pipeline of mri_synthsr, in process)."""
    data = np.asarray(data, np.float32)
    if ct:
        data = np.clip(data, 0, 80)
    result = sr.synthesize(data, affine)
    return result.image, result.grid.affine


def wm_scaled(image, ref, mask):
    """``image`` divided by its median over the white matter of ``ref`` (an aseg), clipped."""
    wm = np.isin(ref, (2, 41)) & mask
    scale = np.median(image[wm]) if wm.any() else np.percentile(image[mask], 95)
    return np.clip(image / max(float(scale), 1e-6), 0, 2)


def similarity(sr_img, sr_aff, t1, ref):
    """(correlation, SSIM) of a SynthSR output and the real T1 inside the brain of ``ref``."""
    on_ref = geometry.resample(sr_img, sr_aff, ref.shape, t1.affine, interp='linear')
    mask = ref > 0
    a = wm_scaled(on_ref, ref, mask)
    b = wm_scaled(np.asarray(t1.data, np.float32), ref, mask)
    return metrics.correlation(a, b, mask), metrics.ssim(a, b, mask, data_range=2.0)


def dice(seg, data, affine, ref, ref_affine, labels):
    hard, aff = segment(seg, data, affine)
    return metrics.dice_table(on_grid(hard, aff, ref.shape, ref_affine), ref, labels)


def lowfield(seg, sr, sr_lowfield, args, labels):
    """Low-field-like OASIS scans (:func:`benchlib.lowfield_like`: 1.5 x 5 x 1.5 mm axial, Rician
    noise, compressed contrast): mean Dice against the aseg of segmenting them directly, after
    the standard SynthSR model and after the low-field one (``sr_lowfield``, or None).
    Returns (scores, markdown lines)."""
    rng = np.random.default_rng(1)
    rows, sims = [], []
    for name in OASIS[:args.subjects]:
        t1 = io.load_volume(os.path.join(args.data, name, 't1.nii.gz'))
        ref = fold(np.asarray(io.load_volume(os.path.join(args.data, name, 'aseg.nii.gz')).data))
        img, aff = lowfield_like(t1.data, t1.affine, rng)
        row, sim = [mean(dice(seg, img, aff, ref, t1.affine, labels))], []
        for model in (sr, sr_lowfield):
            if model is not None:
                out, out_aff = synthesize(model, img, aff)
                row.append(mean(dice(seg, out, out_aff, ref, t1.affine, labels)))
                sim += list(similarity(out, out_aff, t1, ref))
        rows.append(row)
        sims.append(sim)
        print('%s low-field-like: direct %s (corr, SSIM with the real T1: %s)' % (
            name, ', SynthSR '.join('%.3f' % v for v in row), ', '.join('%.3f' % v for v in sim)),
            flush=True)
    means, sim = np.mean(rows, 0), np.mean(sims, 0)
    scores = {'lowfield_like_seg_dice_direct': round(float(means[0]), 4),
              'lowfield_like_seg_dice_synthsr': round(float(means[1]), 4),
              'lowfield_like_corr_synthsr': round(float(sim[0]), 4),
              'lowfield_like_ssim_synthsr': round(float(sim[1]), 4)}
    if sr_lowfield is not None:
        scores.update({'lowfield_like_seg_dice_synthsr_lowfield': round(float(means[2]), 4),
                       'lowfield_like_corr_synthsr_lowfield': round(float(sim[2]), 4),
                       'lowfield_like_ssim_synthsr_lowfield': round(float(sim[3]), 4)})
    lines = ['', '## Low-field-like scans (`--lowfield`)', '',
             'The OASIS T1s made low-field-like (scripts/benchlib.py `lowfield_like`: contrast '
             'compressed by a gamma of 0.7, 1.5 x 5 x 1.5 mm axial slices, Rician noise of 0.05 '
             'of the 99th percentile), segmented with mri_synthseg; mean Dice against the '
             'FreeSurfer aseg (%d subjects), and the SynthSR output\'s correlation and SSIM '
             'with the real 1 mm T1 inside the brain:' % len(rows), '',
             '| input | mean Dice | corr | SSIM |', '| --- | --- | --- | --- |',
             '| segmented directly | %.3f | - | - |' % means[0],
             '| after SynthSR (standard model) | %.3f | %.3f | %.3f |' % (means[1], *sim[:2])]
    if sr_lowfield is not None:
        lines.append('| after SynthSR `--lowfield` (`%s`, %s steps) | %.3f | %.3f | %.3f |' % (
            os.path.relpath(args.lowfield_model), sr_lowfield.card.get('training', {}).get(
                'steps', '?'), means[2], *sim[2:]))
    return scores, lines


def bench_cli(path, threads, model):
    out = tempfile.mkdtemp()
    cmd = [sys.executable, os.path.join(HERE, '..', 'bin', 'mri_synthsr'), '--i', path,
           '--o', os.path.join(out, 'sr.mgz'), '--threads', str(threads)]
    if model:
        cmd += ['--model', model]
    rc, wall, peak, text = measure(cmd, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
    if rc != 0:
        raise RuntimeError('mri_synthsr failed (exit %d): %s' % (rc, tail(text)))
    return wall, peak


def montage_row(images, affine, shape):
    """Input, SynthSR output and real T1 (each ``(data, affine)``) side by side: three
    orthogonal slices each, on the SynthSR output grid (1 mm LIA)."""
    tiles = [qc.montage(geometry.resample(np.asarray(d, np.float32), a, shape, affine, 'linear'))
             for d, a in images]
    h = max(t.shape[0] for t in tiles)
    return np.concatenate([np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0))) for t in tiles], 1)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=os.path.join(HERE, '..', '..', 'shared', 'data', 'dev_eval'))
    p.add_argument('--model', help='SynthSR weights (default: shipped models/synthsr.weights.h5)')
    p.add_argument('--seg-model', help='SynthSeg weights (default: shipped)')
    p.add_argument('--out', default='docs/bench_synthsr.md')
    p.add_argument('--png', default='docs/synthsr_montage.png')
    p.add_argument('--card', help='model card JSON to merge the scores into')
    p.add_argument('--skip-timing', action='store_true')
    p.add_argument('--subjects', type=int, default=len(OASIS), help='OASIS subjects to use')
    shipped_lowfield = os.path.join(HERE, '..', 'models', 'synthsr_lowfield.weights.h5')
    p.add_argument('--lowfield-model', default=shipped_lowfield if os.path.isfile(
        shipped_lowfield) else None, help='low-field SynthSR weights (default: shipped '
        'models/synthsr_lowfield.weights.h5 if present)')
    p.add_argument('--lowfield-only', action='store_true',
                   help='only the low-field-like scans: print the table, write nothing but '
                        '--lowfield-card')
    p.add_argument('--lowfield-card', help='model card JSON to merge the low-field scores into')
    args = p.parse_args()
    if not 1 <= args.subjects <= len(OASIS):
        p.error('--subjects must be 1 to %d, got %d' % (len(OASIS), args.subjects))

    seg = Segmenter(args.seg_model)
    sr = Synthesizer(args.model)
    labels = [k for k in seg.labels if k != 0]
    sr_lowfield = Synthesizer(args.lowfield_model) if args.lowfield_model else None
    if args.lowfield_only:
        lf_scores, lf_lines = lowfield(seg, sr, sr_lowfield, args, labels)
        print('\n'.join(lf_lines))
        merge_card(args.lowfield_card, lf_scores)
        return
    versions = {'1mm': None, '1x1x5': 2, '5x1x1': 0}
    rows, sims, pictures = [], {}, []
    rng = np.random.default_rng(0)
    for name in OASIS[:args.subjects]:
        t1 = io.load_volume(os.path.join(args.data, name, 't1.nii.gz'))
        ref = fold(np.asarray(io.load_volume(os.path.join(args.data, name, 'aseg.nii.gz')).data))
        data = np.asarray(t1.data, np.float32)
        row = {'subject': name}
        for v, axis in versions.items():
            img, aff = (data, t1.affine) if axis is None else \
                thick_slices(data, t1.affine, axis=axis)
            t = time.time()
            row['direct ' + v] = mean(dice(seg, img, aff, ref, t1.affine, labels))
            out, out_aff = synthesize(sr, img, aff)
            row['sr ' + v] = mean(dice(seg, out, out_aff, ref, t1.affine, labels))
            sims.setdefault(v, []).append(similarity(out, out_aff, t1, ref))
            if name == OASIS[0] and v != '1mm':
                pictures.append(montage_row([(img, aff), (out, out_aff), (data, t1.affine)],
                                            out_aff, out.shape))
            print('%s %s: direct %.3f, synthsr %.3f (corr %.3f, ssim %.3f) %.0fs'
                  % (name, v, row['direct ' + v], row['sr ' + v], *sims[v][-1],
                     time.time() - t), flush=True)
        ct, ct_aff = thick_slices(ct_like(np.asarray(ref), rng), t1.affine, axis=2)
        out, out_aff = synthesize(sr, ct, ct_aff, ct=True)
        row['sr ct'] = mean(dice(seg, out, out_aff, ref, t1.affine, labels))
        row['direct ct'] = mean(dice(seg, np.clip(ct, 0, 80), ct_aff, ref, t1.affine, labels))
        print('%s CT-like 1x1x5: direct %.3f, synthsr %.3f'
              % (name, row['direct ct'], row['sr ct']), flush=True)
        rows.append(row)

    ixi = os.path.join(args.data, 'ixi002')
    t1 = io.load_volume(os.path.join(ixi, 't1.nii.gz'))
    t2 = io.load_volume(os.path.join(ixi, 't2.nii.gz'))
    h1, a1 = segment(seg, t1.data, t1.affine)
    present = [k for k in labels if (h1 == k).any()]
    h2, a2 = segment(seg, t2.data, t2.affine)
    ixi_direct = mean(metrics.dice_table(on_grid(h2, a2, h1.shape, a1), h1, present))
    out, out_aff = synthesize(sr, t2.data, t2.affine)
    hs, as_ = segment(seg, out, out_aff)
    ixi_sr = mean(metrics.dice_table(on_grid(hs, as_, h1.shape, a1), h1, present))
    t1_on = geometry.resample(np.asarray(t1.data, np.float32), t1.affine, h1.shape, a1, 'linear')
    out_on = geometry.resample(out, out_aff, h1.shape, a1, 'linear')
    mask = h1 > 0
    ixi_sim = (metrics.correlation(wm_scaled(out_on, h1, mask), wm_scaled(t1_on, h1, mask), mask),
               metrics.ssim(wm_scaled(out_on, h1, mask), wm_scaled(t1_on, h1, mask), mask,
                            data_range=2.0))
    pictures.append(montage_row([(t2.data, t2.affine), (out, out_aff), (t1.data, t1.affine)],
                                out_aff, out.shape))
    print('ixi002 T2: direct %.3f, synthsr %.3f vs seg(T1); corr %.3f ssim %.3f'
          % (ixi_direct, ixi_sr, *ixi_sim), flush=True)

    lf_scores, lf_lines = lowfield(seg, sr, sr_lowfield, args, labels)
    timing = timing_head = None
    if not args.skip_timing:
        t1 = io.load_volume(os.path.join(args.data, OASIS[0], 't1.nii.gz'))
        big = np.zeros((256, 256, 256), np.float32)
        off = [(256 - n) // 2 for n in t1.shape3]
        big[tuple(slice(o, o + n) for o, n in zip(off, t1.shape3))] = t1.data
        aff = t1.affine.copy()
        aff[:3, 3] -= aff[:3, :3] @ np.array(off, float)
        path = os.path.join(tempfile.mkdtemp(), 'head256.nii.gz')
        io.save_volume(big, aff, path)
        timing = bench_cli(path, 2, args.model)
        print('256^3: %.1f s, peak %.2f GB' % timing, flush=True)
        # a whole head, where the network sees the whole 1 mm field of view (192 x 256 x 256)
        head = os.path.join(args.data, '..', 'fs_subjects', 'sub-07', 'T1.mgz')
        if os.path.isfile(head):
            timing_head = bench_cli(head, 2, args.model)
            print('256^3 whole head: %.1f s, peak %.2f GB' % timing_head, flush=True)

    def avg(key):
        return round(float(np.mean([r[key] for r in rows])), 4)

    scores = {'oasis_seg_dice_direct_1mm': avg('direct 1mm')}
    for v in ('1mm', '1x1x5', '5x1x1'):
        scores['oasis_seg_dice_synthsr_' + v] = avg('sr ' + v)
        if v != '1mm':
            scores['oasis_seg_dice_direct_' + v] = avg('direct ' + v)
        scores['oasis_corr_' + v] = round(float(np.mean([s[0] for s in sims[v]])), 4)
        scores['oasis_ssim_' + v] = round(float(np.mean([s[1] for s in sims[v]])), 4)
    scores.update({'ct_like_seg_dice_synthsr': avg('sr ct'),
                   'ct_like_seg_dice_direct': avg('direct ct'),
                   'ixi002_t2_seg_dice_synthsr_vs_t1': round(ixi_sr, 4),
                   'ixi002_t2_seg_dice_direct_vs_t1': round(ixi_direct, 4),
                   'ixi002_corr': round(ixi_sim[0], 4), 'ixi002_ssim': round(ixi_sim[1], 4)})
    scores.update({k: v for k, v in lf_scores.items() if 'synthsr_lowfield' not in k})
    if timing:
        scores['seconds_256cubed_2threads'] = round(timing[0], 1)
        scores['peak_gb_256cubed'] = round(timing[1], 2)
    if timing_head:
        scores['seconds_256cubed_whole_head'] = round(timing_head[0], 1)
        scores['peak_gb_256cubed_whole_head'] = round(timing_head[1], 2)

    d1 = scores['oasis_seg_dice_direct_1mm']
    lines = ['# mri_synthsr benchmark', '',
             'SynthSR model: `%s` (%s steps); segmentations by SynthSeg `%s` (%s steps). '
             'Data: ../shared/data/dev_eval (%d OASIS subjects). Machine: %d cores, %s.' % (
                 args.model or 'models/synthsr.weights.h5',
                 sr.card.get('training', {}).get('steps', '?'),
                 args.seg_model or 'models/synthseg.weights.h5',
                 seg.card.get('training', {}).get('steps', '?'), len(rows), os.cpu_count(),
                 '%s, %s' % (cpu_model(), precision_note())), '',
             'Mean Dice against the FreeSurfer aseg of segmenting each version with mri_synthseg'
             ' (target for SynthSR: within 0.03 of the direct 1 mm segmentation, %.3f, and above'
             ' the direct segmentation of the same version):' % d1, '',
             '| input | segmented directly | segmented after SynthSR | SR vs real T1: corr | '
             'SSIM |', '| --- | --- | --- | --- | --- |']
    for v in ('1mm', '1x1x5', '5x1x1'):
        direct = d1 if v == '1mm' else scores['oasis_seg_dice_direct_' + v]
        lines.append('| OASIS %s | %.3f | %.3f | %.3f | %.3f |' % (
            '1 mm' if v == '1mm' else v + ' mm', direct, scores['oasis_seg_dice_synthsr_' + v], scores['oasis_corr_' + v],
            scores['oasis_ssim_' + v]))
    lines += ['| CT-like, 1x1x5 mm (`--ct` clipping) | %.3f | %.3f | - | - |'
              % (scores['ct_like_seg_dice_direct'], scores['ct_like_seg_dice_synthsr']),
              '| ixi002 T2 (Dice vs the T1\'s segmentation) | %.3f | %.3f | %.3f | %.3f |'
              % (ixi_direct, ixi_sr, ixi_sim[0], ixi_sim[1])]
    if timing:
        lines += ['', 'Whole `mri_synthsr` command on a 256^3 scan, `--threads 2`: %.1f s, '
                  'peak %.2f GB (target <= 30 s).' % timing]
    if timing_head:
        lines += ['', 'The same on a whole head (fs_subjects sub-07 `T1.mgz`, 256^3, the network '
                  'on its 1 mm field of view): %.1f s, peak %.2f GB.' % timing_head]
    lines += lf_lines
    lines += ['', '![input / SynthSR / real T1](%s)' % os.path.basename(args.png), '',
              'Rows: OASIS 0455 as 1x1x5 mm and 5x1x1 mm, ixi002 T2; columns: input, SynthSR '
              'output, real 1 mm T1 (three orthogonal slices each, on the SynthSR output grid).']
    text = '\n'.join(lines) + '\n'
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    if args.png:
        w = max(r.shape[1] for r in pictures)
        qc.save_png(np.concatenate([np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0)))
                                    for r in pictures], 0), args.png, scale=1)
    print(text)
    merge_card(args.card, scores)
    merge_card(args.lowfield_card, lf_scores)


if __name__ == '__main__':
    main()
