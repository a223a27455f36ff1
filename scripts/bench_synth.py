#!/usr/bin/env python
"""Benchmark the synthetic-pair generator: compile time, pairs per second, peak memory.

    python scripts/bench_synth.py --labels ../shared/data/label_maps --out docs/bench_synth.md

Loads every label map of --labels into a LabelMapBank, builds SynthGenerator(--shape) with
SynthSeg's default parameters and its compiled PairSampler (XLA on TensorFlow), times the first
pair (compile + run) separately, then --n pairs one at a time (each converted to numpy, as a
training loop or mri_synth would). Writes a markdown table to --out and prints it.
"""

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np

from benchlib import cpu_model

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float('nan')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--labels', required=True, help='folder of label maps')
    p.add_argument('--out', help='markdown file to write (default: print only)')
    p.add_argument('--n', type=int, default=20, help='timed pairs (default: %(default)s)')
    p.add_argument('--shape', type=int, nargs=3, default=[160, 160, 160],
                   help='output grid (default: 160 160 160)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--note', default='', help='free text added to the report (machine load...)')
    args = p.parse_args()

    import keras
    from synthkit import generator as gen
    from synthkit import io

    paths = io.list_images(args.labels)
    if not paths:
        sys.exit('error: no label maps in %s' % args.labels)
    load_before = load_average()
    t = time.perf_counter()
    bank = gen.LabelMapBank(paths)
    t_load = time.perf_counter() - t

    generator = gen.SynthGenerator(tuple(args.shape), seed=args.seed)
    sampler = gen.PairSampler(generator, seed=args.seed)
    rng = np.random.default_rng(args.seed)

    def one_pair():
        batch, _ = bank.batch(1, rng)
        out = sampler(batch)
        return np.asarray(out['image']), np.asarray(out['labels'])

    t = time.perf_counter()
    one_pair()
    t_first = time.perf_counter() - t
    times = []
    for _ in range(args.n):
        t = time.perf_counter()
        image, labels = one_pair()
        times.append(time.perf_counter() - t)
    assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    times = np.array(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    load_after = load_average()

    backend = keras.backend.backend()
    versions = 'Keras %s, %s backend' % (keras.__version__, backend)
    if backend == 'tensorflow':
        import tensorflow as tf
        device = 'GPU' if tf.config.list_physical_devices('GPU') else 'XLA on CPU'
        versions += ' (TensorFlow %s, %s)' % (tf.__version__, device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    rows = [
        ('output grid', '%s voxels, batch 1, default GeneratorParams'
         % 'x'.join(map(str, args.shape))),
        ('label maps', '%d, bank shape %s (loaded in %.1f s)' % (len(bank), 'x'.join(
            map(str, bank.shape)), t_load)),
        ('first pair (compile + run)', '%.1f s' % t_first),
        ('compile time (first pair - median)', '%.1f s' % (t_first - np.median(times))),
        ('timed pairs', '%d' % args.n),
        ('time per pair, mean', '%.3f s' % times.mean()),
        ('time per pair, median (min-max)', '%.3f s (%.3f-%.3f)' % (np.median(times), times.min(),
                                                                    times.max())),
        ('throughput', '**%.2f pairs/s**' % (args.n / times.sum())),
        ('peak resident memory', '%.0f MiB' % peak_mb),
        ('machine', '%d cores, %s, %s' % (cores, cpu_model(), platform.platform(terse=True))),
        ('software', 'Python %s, %s, NumPy %s' % (platform.python_version(), versions,
                                                  np.__version__)),
        ('load average (1 min) before/after', '%.1f / %.1f' % (load_before, load_after)),
        ('date', time.strftime('%Y-%m-%d %H:%M %Z')),
    ]
    if args.note:
        rows.append(('note', args.note))
    lines = ['# Generator benchmark (`make bench-synth`)', '',
             '`python scripts/bench_synth.py --labels %s --n %d`' % (args.labels, args.n), '',
             '| | |', '| --- | --- |'] + ['| %s | %s |' % r for r in rows]
    text = '\n'.join(lines) + '\n'
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(text)
    print(text, end='')


if __name__ == '__main__':
    main()
