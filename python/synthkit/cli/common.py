"""What every command-line tool shares: error reporting, threads, batches, models, progress.

A tool's ``main(argv=None)`` builds its argparse parser, then runs its pipeline inside
:func:`run`, which turns expected problems (bad input files, unwritable outputs, missing models)
into one line on stderr and exit status 1.
"""

import json
import os
import sys

from ..io import VolumeError


class ToolError(Exception):
    """An expected, user-facing failure: printed as one line, exit status 1."""


class ModelUnavailable(ToolError):
    """The tool's trained weights are not shipped (yet)."""


def run(prog, fn, *args, **kwargs):
    """Call ``fn``; print ``prog: error: message`` and exit 1 on expected errors."""
    try:
        status = fn(*args, **kwargs)
    except (ToolError, VolumeError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print('%s: error: %s' % (prog, msg), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print('%s: interrupted' % prog, file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def set_threads(n):
    """Limit numpy/TensorFlow to ``n`` threads (None or <= 0: leave the defaults)."""
    if not n or n <= 0:
        return
    for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ[var] = str(n)
    import keras
    if keras.backend.backend() == 'tensorflow':
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:
            pass  # already initialized


def hide_gpus():
    """Run on the CPU even where a GPU is visible (``--cpu``)."""
    os.environ['CUDA_VISIBLE_DEVICES'] = '-1'


def progress(iterable, desc, total=None, disable=None):
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal, unless forced)."""
    from tqdm import tqdm
    if disable is None:
        disable = not sys.stderr.isatty()
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
        except (ToolError, VolumeError, ValueError, OSError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print('%s: error: %s' % (self.prog, msg), file=sys.stderr)
            self.failed.append((label, msg))
            return None

    def finish(self):
        """Print the summary; return the exit status (1 if anything failed)."""
        if self.failed:
            print('%s: %d of %d input(s) failed:' % (self.prog, len(self.failed),
                                                     len(self.failed) + self.done),
                  file=sys.stderr)
            for label, msg in self.failed:
                print('  %s: %s' % (label, msg), file=sys.stderr)
            return 1
        return 0


def models_dir():
    """Folder of shipped weights: $SYNTHKIT_MODELS, else the repository's ``models/``."""
    env = os.environ.get('SYNTHKIT_MODELS')
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, '..', '..', '..', 'models'))


def find_model(name, path=None):
    """(weights path, model card dict) of model ``name`` or of an explicit ``path``.

    ``path`` may be a ``.weights.h5`` file with its ``.json`` card beside it. Raises
    :class:`ModelUnavailable` when nothing is there.
    """
    weights = path or os.path.join(models_dir(), name + '.weights.h5')
    card_path = weights[:-len('.weights.h5')] + '.json' if weights.endswith('.weights.h5') \
        else None
    if not os.path.isfile(weights) or not card_path or not os.path.isfile(card_path):
        raise ModelUnavailable('model not yet available: %s (expected %s and its model card)'
                               % (name, weights))
    with open(card_path) as f:
        return weights, json.load(f)


def not_yet_available(prog, what):
    """Exit cleanly for a tool whose model is not shipped yet (never pretend to work)."""
    print('%s: model not yet available: %s' % (prog, what), file=sys.stderr)
    sys.exit(1)


#: ``--help`` epilog of the tools whose trained networks are not shipped yet.
MODEL_NOT_SHIPPED = """\
Note: the trained model of this tool is not yet shipped in this release of SynthKit. The tool
checks its arguments and inputs, then exits with status 1 without writing anything."""


def require_inputs(*paths):
    """Raise :class:`ToolError` (``<path>: no such file``) for the first path that is missing.

    ``None`` entries (optional inputs left out) are skipped; a folder counts as present.
    """
    for path in paths:
        if path is not None and not os.path.exists(path):
            raise ToolError('%s: no such file' % path)
