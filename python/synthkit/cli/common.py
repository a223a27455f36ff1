"""What every command-line tool shares: error reporting, threads, batches, models, progress.

A tool's ``main(argv=None)`` builds its argparse parser, then runs its pipeline inside
:func:`run`, which turns expected problems (bad input files, unwritable outputs, missing models)
into one line on stderr and exit status 1.
"""

import contextlib
import json
import os
import sys
import threading

from .. import io
from ..io import VolumeError


class ToolError(Exception):
    """An expected, user-facing failure: printed as one line, exit status 1."""


class ModelUnavailable(ToolError):
    """The tool's trained weights are not shipped (yet)."""


EXPECTED = (ToolError, VolumeError, ValueError, OSError, MemoryError)


def message(e, label=None):
    """One line for an expected error: its first line, the file named (``label`` where the
    error only says ``<array>``), "out of memory" for a MemoryError."""
    if isinstance(e, MemoryError):
        text = 'out of memory (%s)' % (str(e).strip() or 'allocation failed')
    else:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if label and text.startswith('<array>: '):
        text = '%s: %s' % (label, text[len('<array>: '):])
    return ' '.join(text.split())


def run(prog, fn, *args, **kwargs):
    """Call ``fn``; print ``prog: error: message`` and exit 1 on expected errors.

    While it runs, Python warnings become one line ``prog: warning: message`` (no file, line
    or source), and SIGTERM stops the tool like Ctrl-C: outputs being written are removed."""
    import signal
    import warnings

    def one_line(msg, category, filename, lineno, file=None, line=None):
        warn(prog, msg)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    warnings.showwarning = one_line
    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:                  # not the main thread (e.g. a test runner's worker)
        pass
    try:
        status = fn(*args, **kwargs)
    except EXPECTED as e:
        print('%s: error: %s' % (prog, message(e)), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print('%s: interrupted' % prog, file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def warn(prog, text):
    """One warning line on stderr, or into the list of :func:`collect_warnings` while one is
    open in this thread (a batch worker hands a scan's warnings back with its result)."""
    line = ' '.join(str(text).split())
    sink = getattr(_WARNINGS, 'sink', None)
    if sink is not None:
        sink.append(line)
    else:
        print('%s: warning: %s' % (prog, line), file=sys.stderr)


_WARNINGS = threading.local()


@contextlib.contextmanager
def collect_warnings():
    """Gather this thread's :func:`warn` lines and Python warnings into the list yielded,
    instead of printing them."""
    import warnings
    lines, before = [], getattr(_WARNINGS, 'sink', None)
    _WARNINGS.sink = lines
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('default')
            yield lines
        lines.extend(' '.join(str(w.message).split()) for w in caught)
    finally:
        _WARNINGS.sink = before


def check_outputs(inputs, outputs):
    """Before any work: raise :class:`ToolError` unless the outputs (``(flag, path)`` pairs,
    ``None`` paths skipped) differ from every input and from each other, paths resolved through
    symbolic links, so that no run ever writes over an input or one result over another."""
    reads = {}
    for path in inputs:
        if path:
            reads.setdefault(os.path.realpath(path), path)
    seen = {}
    for flag, path in outputs:
        if not path:
            continue
        real = os.path.realpath(path)
        if real in reads:
            raise ToolError('%s: output (%s) is also an input (%s); refusing to overwrite it'
                            % (path, flag, reads[real]))
        if real in seen:
            what = 'twice as ' + flag if seen[real] == flag else 'as %s and %s' % (seen[real], flag)
            raise ToolError('%s: the same output is given %s' % (path, what))
        seen[real] = flag


def set_threads(n):
    """Limit numpy, OpenVINO and TensorFlow to ``n`` threads (None or <= 0: leave the
    defaults). TensorFlow reads its limits from the environment when it starts, so this imports
    it only where it is already imported (a command on OpenVINO alone never needs it)."""
    if not n or n <= 0:
        return
    for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS',
                'TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS'):
        os.environ[var] = str(n)
    from .. import runtime
    runtime.set_threads(n)
    if 'tensorflow' in sys.modules:
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:
            pass  # already initialized


def hide_gpus():
    """Run on the CPU even where a GPU is visible (``--cpu``)."""
    os.environ['CUDA_VISIBLE_DEVICES'] = '-1'


def progress(iterable, desc, total=None, disable=False):
    """A tqdm progress bar on stderr, only on a terminal (a log file gets no bar lines);
    ``disable`` hides it there too (e.g. a single input)."""
    from tqdm import tqdm
    disable = disable or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, file=sys.stderr,
                unit='scan', leave=False)


class BatchReport:
    """Collect per-file failures so a batch goes on past a bad file and reports at the end."""

    def __init__(self, prog):
        self.prog, self.failed, self.done = prog, [], 0

    def attempt(self, label, fn, *args, **kwargs):
        """Run ``fn``; on an expected error print it, remember it, and return None."""
        try:
            out = fn(*args, **kwargs)
            self.done += 1
            return out
        except EXPECTED as e:
            msg = message(e, label)
            if not msg.startswith(str(label) + ':'):
                msg = '%s: %s' % (label, msg)
            print('%s: error: %s' % (self.prog, msg), file=sys.stderr)
            self.failed.append((label, msg))
            return None

    def finish(self):
        """Print the summary; return the exit status (1 if anything failed)."""
        if self.failed:
            print('%s: %d of %d input(s) failed:' % (self.prog, len(self.failed),
                                                     len(self.failed) + self.done),
                  file=sys.stderr)
            for _, msg in self.failed:
                print('  %s' % msg, file=sys.stderr)
            return 1
        return 0


def models_dir():
    """Folder of shipped weights: $SYNTHKIT_MODELS, else the repository's ``models/``."""
    env = os.environ.get('SYNTHKIT_MODELS')
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, '..', '..', '..', 'models'))


def find_model(name, path=None, tasks=None):
    """(weights path, model card dict) of model ``name`` or of an explicit ``path``.

    ``path`` may be a ``.weights.h5`` file with its ``.json`` card beside it. Raises
    :class:`ModelUnavailable` when nothing is there, and :class:`ToolError` when the card is not
    readable or is another tool's model (its ``task`` must be one of ``tasks``, default
    ``(name,)``: e.g. a SynthStrip card given to mri_synthseg).
    """
    weights = path or os.path.join(models_dir(), name + '.weights.h5')
    card_path = weights[:-len('.weights.h5')] + '.json' if weights.endswith('.weights.h5') \
        else None
    if path and not os.path.isfile(path):
        raise ToolError('%s: model weights not found' % path)
    if path and not card_path:
        raise ToolError('%s: model weights must be a .weights.h5 file with its model card '
                        '(.json) beside it' % path)
    if not os.path.isfile(weights) or not card_path or not os.path.isfile(card_path):
        raise ModelUnavailable('model not yet available: %s (expected %s and its model card)'
                               % (name, weights))
    try:
        with open(card_path) as f:
            card = json.load(f)
        task = card.get('task') if isinstance(card, dict) else None
        card['architecture']['type']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ToolError('%s: not a readable model card (%s)' % (card_path, message(e))) from None
    tasks = tuple(tasks or (name,))
    if task not in tasks:
        raise ToolError('%s is a %s model, not %s' % (weights, task, ' or '.join(tasks)) if task
                        else '%s is not a %s model (its card %s names no task)'
                        % (weights, ' or '.join(tasks), card_path))
    return weights, card


def not_yet_available(prog, what):
    """Exit cleanly for a tool whose model is not shipped yet (never pretend to work)."""
    print('%s: model not yet available: %s' % (prog, what), file=sys.stderr)
    sys.exit(1)


#: ``--help`` epilog of the tools whose trained networks are not shipped yet.
MODEL_NOT_SHIPPED = """\
Note: the trained model of this tool is not yet shipped in this release of SynthKit. The tool
checks its arguments and inputs, then exits with status 1 without writing anything."""


def png_beside(path):
    """The QC picture's path for an output ``path``: its stem + ``.png``, in its folder."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), io.stem(path) + '.png')


#: Largest field of view (mm, any axis) taken as a head scan; beyond it, --crop is needed.
MAX_FOV_MM = 400.0


def check_head_geometry(prog, vol, crop=None):
    """Refuse a field of view that cannot be a head (memory grows with it) unless --crop
    bounds it (``crop``: the tool's --crop, None if not given); warn about voxel sizes no head
    scan has."""
    import numpy as np
    voxsize = np.sqrt((np.asarray(vol.affine)[:3, :3] ** 2).sum(0))
    fov = voxsize * np.asarray(vol.shape3)
    if crop is None and fov.max() > MAX_FOV_MM:
        raise ToolError('%s: field of view %s mm is beyond %g mm: not a head scan? '
                        'Process a centred box with --crop (e.g. --crop 256)'
                        % (vol.path, ' x '.join('%.0f' % v for v in fov), MAX_FOV_MM))
    if voxsize.min() < 0.3 or voxsize.max() > 10:
        warn(prog, '%s: voxel size %s mm is outside 0.3-10 mm; the result is unlikely '
             'to be meaningful' % (vol.path, ' x '.join('%.2f' % v for v in voxsize)))
    if fov.min() < 60:
        warn(prog, '%s: field of view %s mm cannot hold a whole brain'
             % (vol.path, ' x '.join('%.0f' % v for v in fov)))


def crop_size(text):
    """argparse type of a --crop size (mm): an integer from 16 to 1000."""
    import argparse
    value = int(text)
    if not 16 <= value <= 1000:
        raise argparse.ArgumentTypeError('--crop sizes must be 16 to 1000 mm, got %s' % text)
    return value


def read_scan(prog, path, crop=None, ct=False, verb='using'):
    """``(volume, float32 data, crop)`` of one input scan of a head tool: loaded, its geometry
    checked (:func:`check_head_geometry`), the first frame of a multi-frame image (with a
    warning: "``verb`` the first"), clipped to [0, 80] for ``ct``; ``crop`` (a tool's --crop: 1
    or 3 sizes, or None) as 3 sizes."""
    import numpy as np
    vol = io.load_volume(path)
    if crop:
        crop = list(crop) * 3 if len(crop) == 1 else list(crop)
    check_head_geometry(prog, vol, crop or None)
    if vol.nframes > 1:
        warn(prog, '%s has %d frames; %s the first' % (path, vol.nframes, verb))
        vol = vol.frame(0)
    data = np.asarray(vol.data, np.float32)
    if ct:
        data = np.clip(data, 0, 80)
    return vol, data, crop or None


def require_inputs(*paths):
    """Raise :class:`ToolError` (``<path>: file not found``) for the first path that is missing.

    ``None`` entries (optional inputs left out) are skipped; a folder counts as present.
    """
    for path in paths:
        if path is not None and not os.path.exists(path):
            raise ToolError('%s: file not found' % path)


def use_system_allocator():
    """Have oneDNN's convolutions take their buffers from the system allocator instead of
    their own pool, which keeps a network's largest working set for the rest of the process
    where numpy cannot reuse it. Call before TensorFlow is imported (the tools import it
    lazily); a user's own TF_ONEDNN_USE_SYSTEM_ALLOCATOR wins. Measured on a whole-head 256^3
    scan (2 cores, one run each): mri_synthseg 2.71 -> 2.00 GB at 15.6 -> 16.4 s, mri_synthstrip
    1.58 -> 1.19 GB at the same 6.8 s; not used by mri_synthsr (37.9 -> 47.9 s: its many 1 mm
    tiles pay the fresh pages each time) nor mri_synthmorph (41.4 -> 45.7 s for -0.2 GB)."""
    os.environ.setdefault('TF_ONEDNN_USE_SYSTEM_ALLOCATOR', '1')
