"""Shared by the benchmark and demo scripts: real scans from package registries, running one
command as its own process and measuring it, merging scores into a model card."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

TEMPLATES = 'usr/share/mricron/templates'
MNI152 = 'nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz'


def run_quiet(cmd, **kw):
    """``subprocess.run`` with stdout and stderr captured together as text."""
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def tail(text, n=3):
    """The last ``n`` non-empty lines of ``text`` on one line (for error reports)."""
    lines = [line for line in (text or '').strip().splitlines() if line.strip()]
    return ' / '.join(lines[-n:]) if lines else '(no output)'


def venv_problem(python, module, what):
    """Why ``module`` (``what``, for the message) cannot be imported by the benchmark venv's
    ``python``; None when it can."""
    if not os.path.isfile(python):
        return 'benchmark venv not found (%s): run `make .venv-bench`' % python
    r = run_quiet([python, '-c', 'import %s' % module])
    if r.returncode != 0:
        return 'cannot import %s with %s: %s' % (what, python, tail(r.stdout, 1))
    return None


#: Starts the measured command from a small process and reports its own exit status and peak
#: RSS: a child forked straight from a benchmark that holds networks and scans counts the
#: parent's resident pages until it execs (2.90 GB reported for a 1.84 GB mri_synthseg run).
_LAUNCHER = (
    'import os, subprocess, sys\n'
    'p = subprocess.Popen(sys.argv[2:])\n'
    '_, status, usage = os.wait4(p.pid, 0)\n'
    'open(sys.argv[1], "w").write("%d %d" % (os.waitstatus_to_exitcode(status), '
    'usage.ru_maxrss))\n')


def measure(cmd, env=None):
    """Run ``cmd``; (exit status, wall seconds, peak RSS in GB of that process, output)."""
    log = tempfile.TemporaryFile(mode='w+')
    fd, report = tempfile.mkstemp()
    os.close(fd)
    t = time.perf_counter()
    # wait4 (in the launcher) reaps exactly this command and returns its own rusage
    # (ru_maxrss: the peak of that process or of the largest descendant it waited for)
    proc = subprocess.Popen([sys.executable, '-c', _LAUNCHER, report] + list(cmd), stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    proc.wait()
    wall = time.perf_counter() - t
    try:
        with open(report) as f:
            rc, maxrss = (int(v) for v in f.read().split())
    except ValueError:                      # the launcher itself failed
        rc, maxrss = proc.returncode or 1, 0
    os.remove(report)
    log.seek(0)
    text = log.read()
    log.close()
    return rc, wall, maxrss / 1024 ** 2, text


def merge_card(path, scores, replace=False):
    """Update the ``scores`` of the model card at ``path`` (JSON) with ``scores`` (or, with
    ``replace``, make them its scores), atomically; a missing card is reported and skipped."""
    if not path:
        return
    if not os.path.isfile(path):
        print('model card %s not found: scores not merged' % path, flush=True)
        return
    with open(path) as f:
        card = json.load(f)
    if replace:
        card['scores'] = dict(scores)
    else:
        card.setdefault('scores', {}).update(scores)
    with open(path + '.tmp', 'w') as f:
        json.dump(card, f, indent=2)
    os.replace(path + '.tmp', path)
    print('scores merged into %s' % path, flush=True)


def thick_slices(data, affine, factor=5, axis=2):
    """Average ``factor`` slices along ``axis`` and keep one in ``factor`` (a thick-slice
    acquisition): (data float32, affine)."""
    n = data.shape[axis] // factor * factor
    d = np.take(data, np.arange(n), axis=axis)
    shape = list(d.shape)
    shape[axis:axis + 1] = [n // factor, factor]
    thick = d.reshape(shape).mean(axis=axis + 1)
    new = affine.copy()
    new[:3, axis] *= factor
    # the centre of thick slice j sits at old voxel j*factor + (factor-1)/2
    new[:3, 3] = affine[:3, 3] + affine[:3, axis] * (factor - 1) / 2
    return thick.astype(np.float32), new


def lowfield_like(data, affine, rng, spacing=(1.5, 5.0, 1.5), gamma=0.7, noise=0.05):
    """A low-field-like version of a scan (e.g. 64 mT portable scanners: about 1.5 x 1.5 x 5 mm,
    low SNR, weaker contrast): intensities scaled to their 99th percentile and compressed by
    ``gamma`` (< 1: white and grey matter closer), blurred by each axis' slice profile (Gaussian
    of sigma 0.425 x spacing), sampled every ``spacing`` mm along the voxel axes (the default's
    thick axis is OASIS' second, inferior-superior: axial slices), then Rician noise of
    ``noise`` (std, in units of that percentile) on the coarse grid. Returns (data float32,
    affine): the coarse voxel j of an axis is centred on the old voxel j * f + (f - 1) / 2 (f
    the spacing in old voxels)."""
    from scipy import ndimage
    x = np.clip(np.asarray(data, np.float32), 0, None)
    x = (x / max(float(np.percentile(x[x > 0], 99)), 1e-6)) ** np.float32(gamma)
    vox = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    factor = np.asarray(spacing, float) / vox
    x = ndimage.gaussian_filter(x, 0.425 * factor * (factor > 1.05))
    shape = [int((n - 1 - (f - 1) / 2) // f) + 1 for n, f in zip(x.shape, factor)]
    offset = (factor - 1) / 2
    x = ndimage.affine_transform(x, factor, offset=offset, output_shape=shape, order=1)
    x = np.sqrt((x + rng.normal(0, noise, x.shape)) ** 2 + rng.normal(0, noise, x.shape) ** 2)
    new = np.array(affine, float).copy()
    new[:3, 3] = new[:3, :3] @ offset + new[:3, 3]
    new[:3, :3] = new[:3, :3] * factor
    return x.astype(np.float32), new


def colin27(cache):
    """(head path, BET brain path) of Colin27, fetched into ``cache`` if missing."""
    head, bet = (os.path.join(cache, TEMPLATES, f) for f in ('ch2.nii.gz', 'ch2bet.nii.gz'))
    if os.path.isfile(head) and os.path.isfile(bet):
        return head, bet
    os.makedirs(cache, exist_ok=True)
    debs = glob.glob(os.path.join(cache, 'mricron-data_*.deb'))
    if not debs:
        if not shutil.which('apt-get'):
            raise RuntimeError('apt-get not found: cannot fetch Debian package mricron-data')
        r = run_quiet(['apt-get', 'download', 'mricron-data'], cwd=cache)
        if r.returncode != 0 and os.geteuid() == 0:
            print('apt-get download failed; running apt-get update once and retrying', flush=True)
            run_quiet(['apt-get', 'update', '-q'])
            r = run_quiet(['apt-get', 'download', 'mricron-data'], cwd=cache)
        debs = glob.glob(os.path.join(cache, 'mricron-data_*.deb'))
        if r.returncode != 0 or not debs:
            raise RuntimeError('apt-get download mricron-data failed: %s' % tail(r.stdout))
    r = run_quiet(['dpkg', '-x', sorted(debs)[-1], cache])
    if r.returncode != 0 or not (os.path.isfile(head) and os.path.isfile(bet)):
        raise RuntimeError('dpkg -x %s failed: %s' % (sorted(debs)[-1], tail(r.stdout)))
    return head, bet


def mni152(cache):
    """Path of the MNI ICBM152 2009a T1 template (1 mm, brain only) from PyPI's nilearn wheel,
    downloaded into ``cache`` (``pip download``) and extracted if missing."""
    path = os.path.join(cache, MNI152)
    if os.path.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, 'nilearn-*.whl'))
    if not wheels:
        r = run_quiet([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                       '--only-binary=:all:', '-d', cache, 'nilearn'])
        wheels = glob.glob(os.path.join(cache, 'nilearn-*.whl'))
        if r.returncode != 0 or not wheels:
            raise RuntimeError('pip download nilearn failed: %s' % tail(r.stdout))
    with zipfile.ZipFile(sorted(wheels)[-1]) as z:
        z.extract(MNI152, cache)
    return path


def cpu_model():
    """The processor's name, for benchmark reports: timings differ between the machines
    sessions get."""
    from synthkit.trainer import processor_name
    return processor_name()


def precision_note():
    """How the networks computed (SYNTHKIT_PRECISION, default auto), for benchmark reports:
    bfloat16 on CPUs that have it changes the timings."""
    from synthkit.backend import inference_precision
    name = inference_precision()
    return 'networks in %s (SYNTHKIT_PRECISION=%s)' % (
        'bfloat16' if name == 'mixed_bfloat16' else name,
        os.environ.get('SYNTHKIT_PRECISION') or 'auto')
