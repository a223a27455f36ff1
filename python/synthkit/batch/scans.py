"""The scans of a study and where each one's outputs go.

A study is given as

- a BIDS dataset (a folder with ``dataset_description.json``, or with ``sub-*`` folders): the
  anatomical images ``sub-*/anat/sub-*_<SUFFIX>.nii[.gz]`` and
  ``sub-*/ses-*/anat/sub-*_ses-*_<SUFFIX>.nii[.gz]`` (``SUFFIX`` is ``T1w`` unless told
  otherwise); outputs go BIDS-derivatives style to ``OUT/synthkit/sub-*/[ses-*/]anat/``;
- a folder of images (not searched recursively; a tool's earlier outputs in it are skipped);
- a ``.txt`` file with one image path per line (or, from Python, a list of paths): outputs
  mirror the images' folders below their common parent, so that ``a/T1.nii.gz`` and
  ``b/T1.nii.gz`` do not collide;
- a single image.
"""

import glob
import json
import os
import re
from dataclasses import dataclass, field

from .. import io

BIDS_PIPELINE = 'synthkit'
_ENTITY = re.compile(r'^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$')


@dataclass(frozen=True)
class Scan:
    """One input image of a study.

    ``id``: unique name within the study (the CSV row and report label); ``folder`` and ``root``:
    output folder and base name (``root`` + a tool's suffix + ``ext`` names an output);
    ``bids``: the BIDS suffix of the image (``T1w``...), or None outside BIDS."""
    id: str
    path: str
    folder: str
    root: str
    ext: str
    bids: str = None
    entities: dict = field(default_factory=dict, compare=False, hash=False)

    def output(self, plain, desc, suffix, ext=None):
        """The path of one output: ``<root><plain><ext>`` outside BIDS,
        ``<root>_desc-<desc>_<suffix>.nii.gz`` in a BIDS derivatives tree (``suffix`` None:
        the image's own suffix, e.g. a skull-stripped ``desc-brain_T1w``)."""
        if self.bids is None:
            name = self.root + plain + (self.ext if ext is None else ext)
        else:
            label = '' if self.bids == 'T1w' or suffix is None else self.bids
            name = '%s_desc-%s%s_%s%s' % (self.root, desc, label, suffix or self.bids,
                                          '.nii.gz' if ext is None else ext)
        return os.path.join(self.folder, name)


def is_bids(path):
    """A folder holding a BIDS dataset: ``dataset_description.json`` or ``sub-*/`` folders
    with anatomical images."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, 'dataset_description.json')):
        return True
    return bool(glob.glob(os.path.join(path, 'sub-*', 'anat'))
                or glob.glob(os.path.join(path, 'sub-*', 'ses-*', 'anat')))


def study_root(inputs, out):
    """Where the study's merged outputs (CSVs, report) go: ``OUT/synthkit`` for BIDS inputs."""
    if isinstance(inputs, (str, os.PathLike)) and is_bids(os.fspath(inputs)):
        return os.path.join(os.fspath(out), BIDS_PIPELINE)
    return os.fspath(out)


def find_scans(inputs, out, derived=(), bids_suffix='T1w'):
    """The scans of a study (see the module's doc) with their output locations under ``out``.

    ``derived``: suffixes (regular expressions) of the tool's own outputs, skipped in a folder.
    Raises ``ValueError`` naming the path when there is nothing to process."""
    out = os.fspath(out)
    if isinstance(inputs, (list, tuple)):
        return _from_list([os.fspath(p) for p in inputs], out, '<list>')
    inputs = os.fspath(inputs)
    if inputs.lower().endswith('.txt'):
        if not os.path.isfile(inputs):
            raise ValueError('%s: input list not found' % inputs)
        with open(inputs) as f:
            paths = [line.strip() for line in f if line.strip() and not line.startswith('#')]
        return _from_list(paths, out, inputs)
    if is_bids(inputs):
        return _from_bids(inputs, out, bids_suffix)
    if os.path.isdir(inputs):
        paths = io.list_images(inputs, derived)
        if not paths:
            raise ValueError('%s: no images (%s) in folder' % (inputs, ', '.join(io.SUPPORTED)))
        return [_plain(p, out, io.stem(p)) for p in paths]
    if not os.path.exists(inputs):
        raise ValueError('%s: input not found' % inputs)
    if not io.split_ext(inputs)[1]:
        raise ValueError('%s: unsupported input (expected an image, a folder, a BIDS dataset or '
                         'a .txt list)' % inputs)
    return [_plain(inputs, out, io.stem(inputs))]


def _plain(path, folder, scan_id):
    return Scan(scan_id, path, folder, io.stem(path), io.split_ext(path)[1])


def _from_list(paths, out, what):
    if not paths:
        raise ValueError('%s: input list is empty' % what)
    for p in paths:
        if not io.split_ext(p)[1]:
            raise ValueError('%s: unsupported input in %s (expected %s)'
                             % (p, what, ', '.join(io.SUPPORTED)))
    dirs = [os.path.dirname(os.path.abspath(p)) for p in paths]
    common = os.path.commonpath(dirs)
    scans = []
    for p, d in zip(paths, dirs):
        rel = os.path.relpath(d, common)
        rel = '' if rel == '.' else rel
        scan_id = os.path.join(rel, io.stem(p)) if rel else io.stem(p)
        scans.append(Scan(scan_id.replace(os.sep, '/'), p, os.path.join(out, rel), io.stem(p),
                          io.split_ext(p)[1]))
    _check_unique(scans, what)
    return scans


def _from_bids(root, out, suffix):
    if not re.fullmatch(r'[a-zA-Z0-9]+', suffix or ''):
        raise ValueError('--bids-suffix must be alphanumeric (e.g. T1w), got %r' % suffix)
    pattern = ('sub-*/anat/sub-*_%s.nii*' % suffix, 'sub-*/ses-*/anat/sub-*_%s.nii*' % suffix)
    paths = sorted(p for pat in pattern for p in glob.glob(os.path.join(root, pat))
                   if io.split_ext(p)[1] in ('.nii', '.nii.gz'))
    if not paths:
        raise ValueError('%s: BIDS dataset without %s images (looked for %s)'
                         % (root, suffix, ' and '.join(pattern)))
    deriv = os.path.join(out, BIDS_PIPELINE)
    scans = []
    for p in paths:
        rel = os.path.relpath(os.path.dirname(p), root)
        stem = io.stem(p)
        base = stem[:-len(suffix) - 1]
        entities = dict(m.groups() for m in map(_ENTITY.match, base.split('_')) if m)
        scans.append(Scan(stem, p, os.path.join(deriv, rel), base, '.nii.gz', suffix, entities))
    _check_unique(scans, root)
    return scans


def _check_unique(scans, what):
    seen = {}
    for s in scans:
        if s.id in seen:
            raise ValueError('%s: %s and %s would share the outputs of %s' % (
                what, seen[s.id], s.path, s.id))
        seen[s.id] = s.path


def write_bids_description(root, tool):
    """``dataset_description.json`` of the derivatives folder (BIDS requires one)."""
    from .. import __version__
    path = os.path.join(root, 'dataset_description.json')
    if os.path.exists(path):
        return
    os.makedirs(root, exist_ok=True)
    io.save_text(json.dumps({
        'Name': 'SynthKit derivatives', 'BIDSVersion': '1.9.0', 'DatasetType': 'derivative',
        'GeneratedBy': [{'Name': 'SynthKit', 'Version': __version__,
                         'Description': 'synthkit-batch %s' % tool}]}, indent=2) + '\n', path)
