"""A corpus of bad and awkward inputs, made on the fly, for every tool that takes them.

Each case asserts the exit status, that stderr says what is wrong in one line naming the file,
that the inputs are unchanged (hashes) and that nothing is left behind: no output under a final
name, no hidden temp file. Tiny random-weight models stand in for the shipped ones.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import seeded
from synthkit import io, nets
from synthkit import labels as lab
from synthkit.cli import synth
from synthkit.models.synthmorph import cli as synthmorph
from synthkit.models.synthmorph import network as morph
from synthkit.models.synthseg import cli as synthseg
from synthkit.models.synthstrip import cli as synthstrip

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ models
@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    """Tiny random-weight synthseg, synthstrip (both variants) and synthmorph models."""
    folder = tmp_path_factory.mktemp('models')
    seg = nets.UNetConfig(features=4, levels=2, convs_per_level=1)
    seeded(nets.unet(seg), 1).save_weights(str(folder / 'synthseg.weights.h5'))
    (folder / 'synthseg.json').write_text(json.dumps({
        'task': 'synthseg', 'architecture': {'type': 'unet', **seg.to_dict()},
        'output_labels': list(lab.SEGMENTATION_LABELS), 'input': {'voxsize_mm': 2.0}}))
    strip = nets.UNetConfig(out_channels=1, final_activation='linear', features=4, levels=2,
                            convs_per_level=1)
    for name in ('synthstrip', 'synthstrip_nocsf'):
        seeded(nets.unet(strip), 2).save_weights(str(folder / (name + '.weights.h5')))
        (folder / (name + '.json')).write_text(json.dumps({
            'task': name, 'architecture': {'type': 'unet', **strip.to_dict()},
            'input': {'voxsize_mm': 2.0}, 'target': {'band_mm': 8.0}}))
    arch_a = {'features': [4, 8, 8], 'out_features': 8, 'out_level': 1}
    seeded(morph.feature_net(**arch_a), 3).save_weights(str(folder / 'synthmorph_affine.weights.h5'))
    (folder / 'synthmorph_affine.json').write_text(json.dumps({
        'task': 'synthmorph_affine', 'input': {'voxsize_mm': 3.0},
        'architecture': {'type': 'affine_features', **arch_a}}))
    arch_d = {'features': [4, 8, 8], 'hyper_units': 4}
    seeded(morph.velocity_net(**arch_d), 4).save_weights(str(folder / 'synthmorph_deform.weights.h5'))
    (folder / 'synthmorph_deform.json').write_text(json.dumps({
        'task': 'synthmorph_deform', 'input': {'voxsize_mm': 2.0},
        'architecture': {'type': 'deform_velocity', **arch_d}}))
    return folder


@pytest.fixture(autouse=True)
def models_env(model_dir, monkeypatch):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(model_dir))


# ------------------------------------------------------------------------------------ corpus
def _head(shape=(40, 44, 36)):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    data = np.where((grid ** 2).sum(0) < 0.6, 100.0, 5.0) + 10 * grid[0]
    return data.astype(np.float32)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _zero_pixdim(path):
    img = nib.Nifti1Image(_head(), None)          # no qform, no sform: voxel sizes only
    img.header.set_zooms((0.0, 1.0, 1.0))
    nib.save(img, str(path))
    return str(path)


def _singular(path):
    img = nib.Nifti1Image(_head(), None)
    img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)   # an sform that maps nowhere
    nib.save(img, str(path))
    return str(path)


def _truncated(path):
    good = Path(str(path) + '.good.nii.gz')
    _save(good, _head())
    raw = good.read_bytes()
    good.unlink()
    Path(path).write_bytes(raw[:len(raw) // 3])
    return str(path)


#: name -> (builder(path), what stderr must say)
BAD_IMAGES = {
    'missing': (lambda p: str(p), 'not found'),
    'junk': (lambda p: (Path(p).write_bytes(b'not an image at all' * 50), str(p))[1],
             'not a readable image'),
    'truncated': (_truncated, 'truncated or corrupt'),
    '2d': (lambda p: _save(p, np.ones((20, 20), np.float32)), '2-D'),
    '5d': (lambda p: _save(p, np.ones((8, 8, 8, 2, 2), np.float32)), '5-D'),
    'empty': (lambda p: _save(p, np.zeros((20, 20, 20), np.float32)), 'all zeros'),
    'nan': (lambda p: _save(p, np.where(_head() > 50, np.nan, 1).astype(np.float32)), 'NaN'),
    'inf': (lambda p: _save(p, np.where(_head() > 50, np.inf, 1).astype(np.float32)), 'Inf'),
    'singular': (_singular, 'singular'),
    'zero_pixdim': (_zero_pixdim, 'geometry is undefined'),
    'complex': (lambda p: _save(p, (_head() + 1j).astype(np.complex64)), 'complex'),
    'float64_huge': (lambda p: _save(p, np.where(_head() > 50, 1e300, 1.0)), 'float32 range'),
}


def _digest(folder):
    """{relative path: sha1} of every file below ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha1(Path(p).read_bytes()).hexdigest()
    return out


def _call(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    cap = capsys.readouterr()
    return e.value.code, cap.err


def _one_error_line(err, path):
    lines = [line for line in err.strip().splitlines() if line]
    errors = [line for line in lines if ': error: ' in line]
    assert len(errors) >= 1 and str(path) in errors[0], err
    assert 'Traceback' not in err, err
    return errors[0]


TOOLS = {
    'mri_synthseg': (synthseg.main, lambda i, o: ['--i', i, '--o', o / 'seg.nii.gz']),
    'mri_synthstrip': (synthstrip.main, lambda i, o: ['-i', i, '-m', o / 'mask.nii.gz']),
    'mri_synthmorph': (synthmorph.main,
                       lambda i, o: ['register', i, i + '.other.nii.gz', '-m', 'affine',
                                     '-t', o / 't.lta']),
}


@pytest.mark.parametrize('case', sorted(BAD_IMAGES))
@pytest.mark.parametrize('tool', sorted(TOOLS))
def test_bad_image_is_one_line_error_naming_the_file(tool, case, tmp_path, capsys):
    main, argv = TOOLS[tool]
    build, says = BAD_IMAGES[case]
    inputs = tmp_path / 'in'
    out = tmp_path / 'out'
    inputs.mkdir()
    out.mkdir()
    path = build(inputs / ('%s.nii.gz' % case))
    _save(path + '.other.nii.gz', _head())
    before = _digest(inputs)
    code, err = _call(main, argv(path, out), capsys)
    assert code == 1, err
    line = _one_error_line(err, path)
    assert says in line, line
    assert _digest(inputs) == before
    assert os.listdir(out) == []          # no output, no hidden temp file


def test_mri_synth_bad_label_maps(tmp_path, capsys):
    inputs, out = tmp_path / 'in', tmp_path / 'out'
    inputs.mkdir()
    for case in ('junk', 'truncated', 'nan', 'complex', 'singular'):
        BAD_IMAGES[case][0](inputs / ('%s.nii.gz' % case))
    before = _digest(inputs)
    code, err = _call(synth.main, ['--i', inputs, '--o', out, '--seed', 1, '--shape', 16, 16, 16],
                      capsys)
    assert code == 1 and '5 of 5 input(s) failed' in err
    for case in ('junk', 'truncated', 'nan', 'complex', 'singular'):
        assert sum(case + '.nii.gz:' in line for line in err.splitlines()) == 2   # error + list
    assert not any(line.count('%s.nii.gz:' % c) > 1 for line in err.splitlines()
                   for c in ('junk',)), err                                 # no "X: X: ..."
    assert _digest(inputs) == before and [n for n in os.listdir(out) if n.startswith('.')] == []


# --------------------------------------------------------------------------- output collisions
@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / 'scans'
    folder.mkdir()
    a = _save(folder / 'A.nii.gz', _head())
    b = _save(folder / 'B.nii.gz', _head()[::-1].copy())
    return folder, a, b


def _refused(main, argv, capsys, folder, says):
    before = _digest(folder)
    code, err = _call(main, argv, capsys)
    assert code == 1, err
    assert says in _one_error_line(err, ''), err
    assert _digest(folder) == before        # nothing written, nothing changed


def test_synthseg_list_naming_a_later_input_as_output_is_refused(scans, tmp_path, capsys):
    folder, a, b = scans
    ins, outs = tmp_path / 'in.txt', tmp_path / 'out.txt'
    ins.write_text('%s\n%s\n' % (a, b))
    outs.write_text('%s\n%s\n' % (b, os.path.join(folder, 'B_seg.nii.gz')))
    _refused(synthseg.main, ['--i', ins, '--o', outs], capsys, folder, 'is also an input')


def test_synthseg_duplicate_outputs_are_refused(scans, tmp_path, capsys):
    folder, a, b = scans
    ins, outs = tmp_path / 'in.txt', tmp_path / 'out.txt'
    ins.write_text('%s\n%s\n' % (a, b))
    same = os.path.join(tmp_path, 'seg.nii.gz')
    outs.write_text('%s\n%s\n' % (same, same))
    _refused(synthseg.main, ['--i', ins, '--o', outs], capsys, folder, 'given twice')
    assert not os.path.exists(same)


@pytest.mark.parametrize('extra, says', [
    (lambda t: ['--post', t / 'x.nii.gz'], 'as --o and --post'),
    (lambda t: ['--vol', t / 'a.csv', '--qc', t / 'a.csv'], 'as --vol and --qc'),
    (lambda t: ['--resample', t / 'x.nii.gz'], 'as --o and --resample'),
])
def test_synthseg_two_outputs_on_one_path_are_refused(scans, tmp_path, capsys, extra, says):
    folder, a, _ = scans
    _refused(synthseg.main, ['--i', a, '--o', tmp_path / 'x.nii.gz'] + extra(tmp_path),
             capsys, folder, says)
    assert not (tmp_path / 'x.nii.gz').exists() and not (tmp_path / 'a.csv').exists()


def test_synthseg_resample_onto_an_input_is_refused_before_any_work(scans, tmp_path, capsys):
    folder, a, b = scans
    t = time.time()
    _refused(synthseg.main, ['--i', a, '--o', tmp_path / 's.nii.gz', '--resample', a], capsys,
             folder, 'is also an input')
    assert not (tmp_path / 's.nii.gz').exists()
    assert time.time() - t < 5                  # refused up front, not after inference


def test_synthseg_folder_into_itself_skips_its_own_outputs(scans, tmp_path, capsys):
    folder, a, b = scans
    code, err = _call(synthseg.main, ['--i', folder, '--o', folder, '--fast'], capsys)
    assert code == 0, err
    first = sorted(os.listdir(folder))
    assert first == ['A.nii.gz', 'A_synthseg.nii.gz', 'B.nii.gz', 'B_synthseg.nii.gz']
    code, err = _call(synthseg.main, ['--i', folder, '--o', folder, '--fast'], capsys)
    assert code == 0, err
    assert sorted(os.listdir(folder)) == first        # no A_synthseg_synthseg


def test_synthstrip_mask_and_image_on_one_path_are_refused(scans, tmp_path, capsys):
    folder, a, _ = scans
    y = tmp_path / 'y.nii.gz'
    _refused(synthstrip.main, ['-i', a, '-m', y, '-o', y], capsys, folder, 'as -o and -m')
    _refused(synthstrip.main, ['-i', a, '-o', a], capsys, folder, 'is also an input')
    assert not y.exists()


def test_synthmorph_outputs_on_inputs_or_each_other_are_refused(scans, tmp_path, capsys):
    folder, a, b = scans
    _refused(synthmorph.main, ['register', a, b, '-m', 'affine', '-t', tmp_path / 't.lta',
                               '-o', b], capsys, folder, 'is also an input')
    _refused(synthmorph.main, ['register', a, b, '-m', 'affine', '-t', tmp_path / 't.lta',
                               '-T', tmp_path / 't.lta'], capsys, folder, 'as -t and -T')


def test_mri_synth_folder_with_an_earlier_output_name_keeps_its_inputs(tmp_path, capsys):
    folder = tmp_path / 'maps'
    folder.mkdir()
    labels = np.zeros((20, 20, 20), np.int16)
    labels[5:15, 5:15, 5:15] = 2
    labels[8:12, 8:12, 8:12] = 17
    _save(folder / 'a.nii.gz', labels)
    _save(folder / 'a_000_labels.nii.gz', labels)        # looks like a's first output
    before = _digest(folder)
    code, err = _call(synth.main, ['--i', folder, '--o', tmp_path / 'out', '--seed', 1,
                                   '--shape', 16, 16, 16], capsys)
    assert code == 0, err
    assert _digest(folder) == before
    assert sorted(os.listdir(tmp_path / 'out')) == ['a_000_image.nii.gz', 'a_000_labels.nii.gz']
    # into the same folder: the old 'a_000_labels' is a's output now, and no input is lost
    code, err = _call(synth.main, ['--i', folder / 'a.nii.gz', '--o', folder, '--seed', 1,
                                   '--shape', 16, 16, 16], capsys)
    assert code == 0, err
    assert _digest(folder)['a.nii.gz'] == before['a.nii.gz']


# ---------------------------------------------------------------------------- flags, models
@pytest.mark.parametrize('argv, code, says', [
    (lambda a, t: ['--i', a, '--o', t / 's.nii.gz', '--crop', 0], 2, '--crop'),
    (lambda a, t: ['--i', a, '--o', t / 's.nii.gz', '--crop', -50], 2, '--crop'),
])
def test_synthseg_bad_crop_is_refused_at_parse_time(scans, tmp_path, capsys, argv, code, says):
    _, a, _ = scans
    got, err = _call(synthseg.main, argv(a, tmp_path), capsys)
    assert got == code and says in err and not (tmp_path / 's.nii.gz').exists()


def test_synthseg_huge_field_of_view_is_refused_with_a_hint(tmp_path, capsys):
    big = _save(tmp_path / 'big.nii.gz', np.ones((64, 64, 64), np.float32) * np.arange(64),
                np.diag([10.0, 10.0, 10.0, 1.0]))
    code, err = _call(synthseg.main, ['--i', big, '--o', tmp_path / 's.nii.gz'], capsys)
    assert code == 1 and '--crop' in _one_error_line(err, big) and '640' in err


def test_synthseg_model_of_another_tool_or_corrupt_is_refused(scans, model_dir, tmp_path,
                                                              capsys):
    _, a, _ = scans
    strip = model_dir / 'synthstrip.weights.h5'
    code, err = _call(synthseg.main, ['--i', a, '--o', tmp_path / 's.nii.gz', '--model', strip],
                      capsys)
    assert code == 1 and 'is a synthstrip model, not synthseg' in _one_error_line(err, strip)
    bad = tmp_path / 'bad.weights.h5'
    bad.write_bytes(b'\x89HDF\r\n\x1a\n' + b'garbage' * 100)
    (tmp_path / 'bad.json').write_text((model_dir / 'synthseg.json').read_text())
    code, err = _call(synthseg.main, ['--i', a, '--o', tmp_path / 's.nii.gz', '--model', bad],
                      capsys)
    assert code == 1 and 'cannot load these weights' in _one_error_line(err, bad)
    assert len(err.strip().splitlines()) <= 3       # the error (and the batch summary) only
    assert not (tmp_path / 's.nii.gz').exists()


def test_synthstrip_fill_and_border_are_checked(tmp_path, capsys):
    img = _save(tmp_path / 'u8.nii.gz', (_head() * 2).clip(0, 255).astype(np.uint8))
    code, err = _call(synthstrip.main, ['-i', img, '-o', tmp_path / 'o.nii.gz', '--fill', 300],
                      capsys)
    assert code == 1 and 'does not fit' in err and 'uint8' in err
    code, err = _call(synthstrip.main, ['-i', img, '-m', tmp_path / 'm.nii.gz', '-b', 'nan'],
                      capsys)
    assert code == 2 and 'finite' in err
    assert os.listdir(tmp_path) == ['u8.nii.gz']


def test_apply_fill_that_an_integer_type_cannot_hold_is_refused(scans, tmp_path, capsys):
    folder, a, b = scans
    lta = tmp_path / 't.lta'
    code, err = _call(synthmorph.main, ['register', a, b, '-m', 'affine', '-t', lta], capsys)
    assert code == 0, err
    code, err = _call(synthmorph.main, ['apply', lta, a, tmp_path / 'o.nii.gz', '-f', 'nan',
                                        '-t', 'int16'], capsys)
    assert code == 1 and 'cannot be stored in int16' in _one_error_line(err, a)
    assert not (tmp_path / 'o.nii.gz').exists()


def test_apply_warns_of_an_lta_without_volume_info(scans, tmp_path, capsys):
    folder, a, b = scans
    lta = tmp_path / 't.lta'
    _call(synthmorph.main, ['register', a, b, '-m', 'affine', '-t', lta], capsys)
    text = lta.read_text()
    cut = tmp_path / 'cut.lta'
    cut.write_text(text[:text.index('src volume info')])
    code, err = _call(synthmorph.main, ['apply', cut, a, tmp_path / 'o.nii.gz'], capsys)
    assert 'warning' in err and 'no valid destination volume info' in err and str(cut) in err


def test_mri_synth_infinite_voxel_size_is_refused_at_once(tmp_path, capsys):
    labels = np.zeros((20, 20, 20), np.int16)
    labels[5:15, 5:15, 5:15] = 2
    m = _save(tmp_path / 'm.nii.gz', labels)
    t = time.time()
    code, err = _call(synth.main, ['--i', m, '--o', tmp_path / 'o', '--voxsize', 'inf'], capsys)
    assert code == 1 and '--voxsize' in err and time.time() - t < 5


# ------------------------------------------------------------------------- one clean line
def test_warnings_are_one_line_and_no_progress_bar_off_a_terminal(tmp_path, capsys):
    nib.save(nib.Nifti1Image(_head(), None), str(tmp_path / 'noform.nii'))   # no q/sform
    b = _save(tmp_path / 'b.nii.gz', _head())
    ins, outs = tmp_path / 'in.txt', tmp_path / 'out.txt'
    ins.write_text('%s\n%s\n' % (tmp_path / 'noform.nii', b))
    outs.write_text('%s\n%s\n' % (tmp_path / 's1.nii.gz', tmp_path / 's2.nii.gz'))
    code, err = _call(synthseg.main, ['--i', ins, '--o', outs, '--fast'], capsys)
    assert code == 0, err
    warning = [line for line in err.splitlines() if 'qform' in line]
    assert len(warning) == 1 and warning[0].startswith('mri_synthseg: warning: ')
    assert 'noform.nii' in warning[0] and 'warnings.warn' not in err and '.py:' not in err
    assert '\r' not in err and '%|' not in err            # no tqdm bar in a log


def test_tools_refuse_a_missing_input_before_loading_tensorflow(tmp_path):
    """Checked in a fresh interpreter: the refusal comes without importing TensorFlow."""
    code = ('import sys\nfrom synthkit.models.synthseg import cli\ntry:\n'
            '    cli.main(["--i", "/nonexistent.nii.gz", "--o", %r])\nexcept SystemExit as e:\n'
            '    print(e.code, "tensorflow" in sys.modules)\n' % str(tmp_path / 's.nii.gz'))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': str(ROOT / 'python')})
    assert r.stdout.split() == ['1', 'False'], r.stderr


# --------------------------------------------------------------------------- killed writers
def test_a_stale_temp_from_a_killed_run_is_removed_by_the_next(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / ('.out.nii.gz.tmp%d-deadbeef.nii.gz' % dead.pid)
    stale.write_bytes(b'')
    alive = tmp_path / ('.out.nii.gz.tmp%d-cafe0000.nii.gz' % os.getpid())
    alive.write_bytes(b'')
    io.save_volume(_head(), np.eye(4), str(tmp_path / 'out.nii.gz'))
    assert not stale.exists() and alive.exists()       # a live writer's temp is left alone
    alive.unlink()
    assert sorted(os.listdir(tmp_path)) == ['out.nii.gz']


@pytest.mark.slow
def test_sigterm_while_writing_leaves_no_temp_file(tmp_path):
    """A tool stopped by SIGTERM removes what it was writing, like Ctrl-C."""
    code = ('import numpy as np, sys\nfrom synthkit import io\nfrom synthkit.cli import common\n'
            'def job():\n    print("ready", flush=True)\n'
            '    while True:\n        io.save_volume(np.random.rand(200, 200, 200).astype(np.float32),'
            ' np.eye(4), sys.argv[1])\n'
            'common.run("writer", job)\n')
    proc = subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'big.nii.gz')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONPATH': str(ROOT / 'python')})
    assert proc.stdout.readline().strip() == 'ready'
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'interrupted' in err
    assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []


def test_out_of_memory_on_one_scan_is_reported_and_the_batch_goes_on(scans, tmp_path, capsys,
                                                                     monkeypatch):
    folder, a, b = scans
    from synthkit.models.synthseg import inference
    real = inference.Segmenter.segment

    def segment(self, data, affine, **kw):
        if data.shape[0] == 40 and data[0, 0, 0] == _head()[0, 0, 0]:    # scan A only
            raise MemoryError('Unable to allocate 32.2 GiB')
        return real(self, data, affine, **kw)

    monkeypatch.setattr(inference.Segmenter, 'segment', segment)
    code, err = _call(synthseg.main, ['--i', folder, '--o', tmp_path / 'segs', '--fast'], capsys)
    assert code == 1
    assert 'A.nii.gz: out of memory (Unable to allocate 32.2 GiB)' in err
    assert '1 of 2 input(s) failed' in err
    assert sorted(os.listdir(tmp_path / 'segs')) == ['B_synthseg.nii.gz']


@pytest.mark.parametrize('shape, voxsize, says', [
    ((5, 5, 5), 1.0, 'cannot hold a whole brain'),
    ((40, 40, 40), 0.1, 'outside 0.3-10 mm'),
])
def test_inputs_that_cannot_be_a_head_are_warned_about(tmp_path, capsys, shape, voxsize, says):
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    img = _save(tmp_path / 'odd.nii.gz', data, np.diag([voxsize] * 3 + [1.0]))
    code, err = _call(synthseg.main, ['--i', img, '--o', tmp_path / 's.nii.gz', '--fast'], capsys)
    warnings = [line for line in err.splitlines() if ': warning: ' in line]
    assert code == 0 and any(says in w and 'odd.nii.gz' in w for w in warnings), err
    assert any('implausible brain volume' in w for w in warnings), err
