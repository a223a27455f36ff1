"""mri_synth end to end on small label maps: outputs, geometry, flips, reproducibility, errors.

The command runs in-process through ``main(argv)`` (one XLA compile per configuration, ~7 s on
two cores) and once as a subprocess, to prove that a fresh process writes the same bytes.
"""

import contextlib
import glob
import io as pyio
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from synthkit import geometry, io
from synthkit import labels as lab
from synthkit.cli import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ['--shape', '32', '32', '32']
IDENTITY = {'scaling_range': [1, 1], 'rotation_range_deg': [0, 0], 'shearing_range': [0, 0],
            'translation_range_mm': [0, 0], 'nonlin_std_mm': 0}


def head(lr_axis=0, extra=None):
    """40^3 head-like label map, left (low index along ``lr_axis``) and right hemispheres
    differing: 2 with 17 inside on the left, 41 with 42 on the right, CSF and a 502 shell."""
    a = np.zeros((40, 40, 40), np.int16)
    a[5:35, 5:35, 5:35] = 502
    a[7:33, 7:33, 7:33] = 24
    a[9:20, 9:31, 10:30] = 2
    a[11:16, 12:18, 14:20] = 17
    a[20:31, 10:30, 10:30] = 41
    a[26:31, 22:30, 12:18] = 42
    if extra:
        a[18:22, 18:22, 30:33] = extra
    return np.moveaxis(a, 0, lr_axis)


def affine(code, voxsize=1.0, origin=(3.0, -7.0, 11.0)):
    aff = np.eye(4)
    aff[:3, :3] = geometry.orientation_matrix(code) * voxsize
    aff[:3, 3] = origin
    return aff


def call(argv, capsys):
    """Run mri_synth in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        synth.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def outputs(folder, name):
    return sorted(glob.glob(os.path.join(folder, name + '_*')))


@pytest.fixture(scope='module')
def batch(tmp_path_factory):
    """A folder of three label maps and a corrupt file, synthesized once (2 pairs each)."""
    base = tmp_path_factory.mktemp('synth')
    inp = base / 'in'
    inp.mkdir()
    nib.save(nib.Nifti1Image(head(0), affine('LIA')), str(inp / 'a_lia.nii.gz'))
    nib.save(nib.Nifti1Image(head(0, extra=77), affine('RAS')), str(inp / 'b_ras.nii.gz'))
    nib.save(nib.Nifti1Image(head(0), affine('LIA', 1.3)), str(inp / 'c_thick.nii.gz'))
    (inp / 'bad.nii.gz').write_bytes(b'not an image at all')
    return base, inp


@pytest.fixture(scope='module')
def batch_run(batch):
    base, inp = batch
    out = base / 'out'
    # capsys is function-scoped: capture this module-wide run by redirecting the streams
    err, std = pyio.StringIO(), pyio.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        with pytest.raises(SystemExit) as e:
            synth.main([str(a) for a in ['--i', inp, '--o', out, '--n', 2, '--seed', 5, '--png']
                        + SHAPE])
    return out, e.value.code, std.getvalue(), err.getvalue()


def test_batch_goes_past_a_bad_file_and_exits_1(batch, batch_run):
    out, status, stdout, stderr = batch_run
    assert status == 1
    assert 'bad.nii.gz' in stderr and '1 of 4 input(s) failed' in stderr
    assert 'wrote 6 pair(s) for 3 label map(s)' in stdout
    for name in ('a_lia', 'b_ras', 'c_thick'):
        assert [os.path.basename(p) for p in outputs(out, name)] == [
            name + '_000.png', name + '_000_image.nii.gz', name + '_000_labels.nii.gz',
            name + '_001.png', name + '_001_image.nii.gz', name + '_001_labels.nii.gz']
    assert not outputs(out, 'bad')
    # one-line warnings: a thick-voxel input, a label the generator does not know
    assert 'c_thick.nii.gz: voxel size 1.3x1.3x1.3 mm is not 1 mm' in stderr
    assert 'label(s) 77 not among the generation labels' in stderr


def test_outputs_have_sane_headers_and_contents(batch, batch_run):
    base, inp = batch
    out = batch_run[0]
    allowed = set(lab.lr_swap_lookup()[[0, 2, 17, 41, 42, 24, 502, 77]].tolist()) | {
        0, 2, 17, 41, 42, 24, 502, 77}
    for name, code in (('a_lia', 'LIA'), ('b_ras', 'RAS'), ('c_thick', 'LIA')):
        for k in range(2):
            img = nib.load(os.path.join(out, '%s_%03d_image.nii.gz' % (name, k)))
            seg = nib.load(os.path.join(out, '%s_%03d_labels.nii.gz' % (name, k)))
            for im in (img, seg):
                assert im.shape == (32, 32, 32)
                assert geometry.orientation(im.affine) == code
                np.testing.assert_allclose(im.header.get_zooms(), 1.0)
                np.testing.assert_allclose(im.affine, img.affine)
                assert im.header['sform_code'] == 1 and im.header['qform_code'] == 1
            data, labels = img.get_fdata(), np.asarray(seg.dataobj)
            assert img.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.int16
            assert data.min() >= 0 and data.max() <= 1 and data.std() > 0.05
            assert set(np.unique(labels).tolist()) <= allowed
            assert (labels > 0).mean() > 0.05
    # the two pairs of one input differ; two inputs with the same labels differ too
    a0 = nib.load(os.path.join(out, 'a_lia_000_image.nii.gz')).get_fdata()
    a1 = nib.load(os.path.join(out, 'a_lia_001_image.nii.gz')).get_fdata()
    c0 = nib.load(os.path.join(out, 'c_thick_000_image.nii.gz')).get_fdata()
    assert not np.allclose(a0, a1) and not np.allclose(a0, c0)


def test_png_shows_image_and_label_colours(batch_run):
    from PIL import Image
    out = batch_run[0]
    pic = np.asarray(Image.open(os.path.join(out, 'a_lia_000.png')).convert('RGB'))
    assert pic.shape[0] >= 2 * 32 and pic.shape[1] >= 3 * 32
    top, bottom = pic[:pic.shape[0] // 2], pic[pic.shape[0] // 2:]
    # top row: grey levels; bottom row: LUT colours of the labels (CSF, extracerebral, ...)
    assert np.all(top[..., 0] == top[..., 1]) and top.std() > 10
    colours = {tuple(c) for c in bottom.reshape(-1, 3)}
    assert tuple(lab.color(24)) in colours or tuple(lab.color(502)) in colours


def test_same_seed_gives_identical_bytes_in_a_fresh_process(batch, batch_run, tmp):
    """A second run, as a separate process on one input alone, rewrites exactly the same bytes
    (gzip headers included): the pairs of an input depend only on the seed and its name."""
    base, inp = batch
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, 'python'), TF_CPP_MIN_LOG_LEVEL='2')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bin', 'mri_synth'),
                           '--i', str(inp / 'a_lia.nii.gz'), '--o', tmp, '--n', '2',
                           '--seed', '5', '--png'] + SHAPE,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = outputs(batch_run[0], 'a_lia')
    again = outputs(tmp, 'a_lia')
    assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in again]
    for a, b in zip(first, again):
        with open(a, 'rb') as fa, open(b, 'rb') as fb:
            assert fa.read() == fb.read(), os.path.basename(a)
    with open(again[1], 'rb') as f:
        assert f.read(10)[4:8] == b'\0\0\0\0'     # gzip mtime 0


def test_geometry_and_flip_in_world_space(tmp, capsys):
    """No deformation but a flip, on an input whose left-right axis is its third voxel axis:
    the output, read through its header, is the input mirrored across the sagittal plane
    through the grid centre, with left and right labels swapped."""
    src = head(lr_axis=2)
    in_aff = affine('ASL', origin=(-20.0, 15.0, 30.0))
    path = os.path.join(tmp, 'asl.nii.gz')
    nib.save(nib.Nifti1Image(src, in_aff), path)
    cfg = os.path.join(tmp, 'flip.json')
    with open(cfg, 'w') as f:
        json.dump(dict(IDENTITY, flip_prob=1), f)
    status, _, err = call(['--i', path, '--o', os.path.join(tmp, 'out'), '--seed', 1,
                           '--config', cfg, '--shape', 36, 34, 32], capsys)
    assert status == 0, err
    seg = io.load_volume(os.path.join(tmp, 'out', 'asl_000_labels.nii.gz'))
    assert geometry.orientation(seg.affine) == 'ASL' and seg.shape3 == (36, 34, 32)
    centre = seg.affine @ np.append((np.array(seg.shape3) - 1) / 2, 1)
    mirror = np.diag([-1.0, 1, 1, 1])
    mirror[0, 3] = 2 * centre[0]                       # x -> 2 c_x - x (world R axis)
    back = geometry.resample(seg.data, seg.affine, src.shape, mirror @ in_aff, 'nearest', fill=-1)
    inside = back >= 0
    assert inside.mean() > 0.5
    np.testing.assert_array_equal(back[inside], lab.lr_swap_lookup()[src][inside])
    assert 53 in seg.data and 17 not in seg.data


def test_bad_config_is_one_line_error(tmp, capsys):
    cfg = os.path.join(tmp, 'p.json')
    with open(cfg, 'w') as f:
        json.dump({'flip_prob': 0, 'flip_probability': 1}, f)
    path = os.path.join(tmp, 'a.nii.gz')
    nib.save(nib.Nifti1Image(head(), affine('LIA')), path)
    status, _, err = call(['--i', path, '--o', tmp, '--config', cfg], capsys)
    assert status == 1
    assert err.strip().count('\n') == 0
    assert err.startswith('mri_synth: error:') and 'flip_probability' in err
    for bad, words in (('{"flip_prob": 2}', 'flip_prob must be in [0, 1]'),
                       ('{"scaling_range": [1.2, 0.8]}', 'low <= high'),
                       ('{"std_range": 5}', 'pair of numbers'),
                       ('{"flip_prob": ', 'not valid JSON')):
        with open(cfg, 'w') as f:
            f.write(bad)
        status, _, err = call(['--i', path, '--o', tmp, '--config', cfg], capsys)
        assert status == 1 and words in err and err.strip().count('\n') == 0, err
    assert not glob.glob(os.path.join(tmp, 'a_*'))


def test_bad_arguments_and_inputs(tmp, capsys):
    path = os.path.join(tmp, 'a.nii.gz')
    nib.save(nib.Nifti1Image(head(), affine('LIA')), path)
    status, _, err = call(['--i', path, '--o', tmp, '--n', 0], capsys)
    assert status == 1 and err.strip() == 'mri_synth: error: --n must be at least 1, got 0'
    status, _, err = call(['--i', os.path.join(tmp, 'missing.nii.gz'), '--o', tmp], capsys)
    assert status == 1 and 'missing.nii.gz' in err
    floats = os.path.join(tmp, 'float.nii.gz')
    nib.save(nib.Nifti1Image(head().astype(np.float32) + 0.25, affine('LIA')), floats)
    status, _, err = call(['--i', floats, '--o', tmp], capsys)
    assert status == 1 and 'float.nii.gz: not a label map (non-integer values)' in err
    assert not glob.glob(os.path.join(tmp, 'float_*'))


def test_help_documents_flags_and_outputs(capsys):
    with pytest.raises(SystemExit) as e:
        synth.main(['--help'])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ('--i', '--o', '--n', '--seed', '--shape', '--config', '--png', '--threads',
                 '--voxsize', '_image.nii.gz', '_labels.nii.gz', '.png', 'byte-identical'):
        assert flag in text
