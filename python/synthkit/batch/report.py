"""What a study run shows: progress while it runs, an HTML report at the end.

The report lists failures first, then the scans flagged as outliers (QC score below
:data:`QC_THRESHOLD`, a measure with a robust z-score beyond :data:`Z_THRESHOLD`, or a warning
of the tool), worst first, then the others; each with its QC thumbnail.
"""

import html
import os
import sys
import time

import numpy as np

from .. import io

#: QC score (lowest of the structure groups) below which a segmentation is flagged.
QC_THRESHOLD = 0.65
#: Robust z-score (median / 1.4826 MAD over the study) beyond which a measure is flagged.
Z_THRESHOLD = 3.5
#: Fewest finished scans for volume z-scores to mean anything.
MIN_SCANS_FOR_Z = 5


class Progress:
    """A progress bar (on a terminal) or one line per ~5 % and at least every minute (in a
    log): done, failed, remaining, scans/min."""

    def __init__(self, total, log=None, enabled=None):
        self.total, self.log, self.done, self.failed = total, log or sys.stderr, 0, 0
        self.start = self.last = time.time()
        tty = getattr(self.log, 'isatty', lambda: False)()
        self.bar = None
        if (tty if enabled is None else enabled) and tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc='scans', unit='scan', file=self.log,
                            dynamic_ncols=True)
        self.every = max(1, total // 20)

    def rate(self):
        minutes = (time.time() - self.start) / 60.0
        return (self.done + self.failed) / minutes if minutes > 0 else 0.0

    def line(self):
        n = self.done + self.failed
        return '%d/%d done, %d failed, %d remaining, %.1f scans/min' % (
            self.done, self.total, self.failed, self.total - n, self.rate())

    def update(self, failed=False):
        if failed:
            self.failed += 1
        else:
            self.done += 1
        n = self.done + self.failed
        if self.bar is not None:
            self.bar.set_postfix_str('failed %d, %.1f scans/min' % (self.failed, self.rate()))
            self.bar.update(1)
        elif n % self.every == 0 or n == self.total or time.time() - self.last > 60:
            print('synthkit-batch: %s' % self.line(), file=self.log, flush=True)
            self.last = time.time()

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=self.log)
        else:
            print(text, file=self.log, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def robust_z(values):
    """Robust z-scores (median, 1.4826 x median absolute deviation) of ``values``; zeros when
    the deviation is 0."""
    x = np.asarray(values, np.float64)
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    if mad <= 0:
        return np.zeros_like(x)
    return (x - med) / mad


def flags(tool, records):
    """Per record: a list of ``(severity, text)`` reasons to look at it."""
    out = [[] for _ in records]
    for i, r in enumerate(records):
        score = tool.qc_score(r)
        if score is not None and score < QC_THRESHOLD:
            out[i].append((QC_THRESHOLD - score + 1.0, 'QC score %.2f < %.2f'
                           % (score, QC_THRESHOLD)))
        for w in r.get('warnings', []):
            out[i].append((0.5, w))
    if len(records) >= MIN_SCANS_FOR_Z:
        measures = [tool.measures(r) for r in records]
        for name in measures[0]:
            z = robust_z([m.get(name, np.nan) for m in measures])
            for i, zi in enumerate(z):
                if np.isfinite(zi) and abs(zi) > Z_THRESHOLD:
                    out[i].append((abs(zi) / Z_THRESHOLD, '%s z = %+.1f (%.0f)'
                                   % (name, zi, measures[i][name])))
    return out


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ccc; padding: 6px; width: 330px; font-size: 0.85em; }
.card img { width: 100%; image-rendering: pixelated; }
.flagged { border: 2px solid #d33; background: #fff4f4; }
.reason { color: #b00; }
.failed { color: #b00; }
"""


def write_html(path, tool, records, failures):
    """The study report at ``path`` (thumbnails linked relative to it)."""
    root = os.path.dirname(os.path.abspath(path))
    reasons = flags(tool, records)
    order = sorted(range(len(records)), key=lambda i: (
        -sum(s for s, _ in reasons[i]), records[i]['scan']))
    n_flagged = sum(1 for r in reasons if r)
    e = html.escape
    parts = ['<!DOCTYPE html><html><head><meta charset="utf-8"><title>%s study report</title>'
             '<style>%s</style></head><body>' % (e(tool.name), _CSS),
             '<h1>%s: %d scans finished, %d flagged, %d failed</h1>'
             % (e(tool.name), len(records), n_flagged, len(failures)),
             '<p>Generated %s. Flagged: QC score below %.2f, a measure with a robust z-score '
             'beyond %.1f (with at least %d scans), or a warning of the tool.</p>'
             % (time.strftime('%Y-%m-%d %H:%M'), QC_THRESHOLD, Z_THRESHOLD, MIN_SCANS_FOR_Z)]
    if failures:
        parts.append('<h2 class="failed">Failed (%d)</h2><table><tr><th>scan</th><th>error'
                     '</th></tr>' % len(failures))
        parts += ['<tr><td>%s</td><td>%s</td></tr>' % (e(s), e(err)) for s, _, err in failures]
        parts.append('</table>')
    parts.append('<h2>Scans (flagged first)</h2><div class="grid">')
    for i in order:
        r = reasons[i]
        rec = records[i]
        png = rec.get('outputs', {}).get('png')
        img = ''
        if png:
            rel = os.path.relpath(os.path.join(rec.get('folder', root), png['file']), root)
            img = '<img loading="lazy" src="%s" alt="QC of %s">' % (e(rel.replace(os.sep, '/')),
                                                                    e(rec['scan']))
        score = tool.qc_score(rec)
        lines = ['<b>%s</b>' % e(rec['scan'])]
        if score is not None:
            lines.append('QC %.2f' % score)
        lines.append('%.0f s' % rec.get('seconds', 0))
        lines += ['<span class="reason">%s</span>' % e(text) for _, text in sorted(r)[::-1]]
        parts.append('<div class="card%s">%s<br>%s</div>' % (' flagged' if r else '', img,
                                                             '<br>'.join(lines)))
    parts.append('</div></body></html>\n')
    io.save_text('\n'.join(parts), path)
