"""Shared by the benchmark scripts: run one command as its own process and measure it, and merge
scores into a model card."""

import json
import os
import subprocess
import tempfile
import time


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


def measure(cmd, env=None):
    """Run ``cmd``; (exit status, wall seconds, peak RSS in GB of that process, output)."""
    log = tempfile.TemporaryFile(mode='w+')
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    # wait4 reaps exactly this child and returns its own rusage (ru_maxrss: the peak of that
    # process or of the largest descendant it waited for), unlike RUSAGE_CHILDREN, which is the
    # maximum over every child this script has had so far
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    text = log.read()
    log.close()
    return proc.returncode, wall, usage.ru_maxrss / 1024 ** 2, text


def merge_card(path, scores):
    """Update the ``scores`` of the model card at ``path`` (JSON) with ``scores``, atomically;
    a missing card is reported and skipped."""
    if not path:
        return
    if not os.path.isfile(path):
        print('model card %s not found: scores not merged' % path, flush=True)
        return
    with open(path) as f:
        card = json.load(f)
    card.setdefault('scores', {}).update(scores)
    with open(path + '.tmp', 'w') as f:
        json.dump(card, f, indent=2)
    os.replace(path + '.tmp', path)
    print('scores merged into %s' % path, flush=True)
