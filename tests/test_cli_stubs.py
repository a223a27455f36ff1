"""Command lines of the tools whose models are not shipped yet: a real --help, honest refusal.

Every run below points ``SYNTHKIT_MODELS`` to an empty folder, so weights shipped later do not
change the results, and checks that no output file appears.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthkit.models.easyreg import cli as easyreg
from synthkit.models.easyreg import easywarp
from synthkit.models.synthmorph import cli as synthmorph
from synthkit.models.synthsr import cli as synthsr
from synthkit.models.synthstrip import cli as synthstrip

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ('synthstrip', 'synthmorph', 'easyreg', 'easywarp', 'synthsr')


@pytest.fixture(autouse=True)
def no_models(monkeypatch, tmp_path):
    empty = tmp_path / 'no_models'
    empty.mkdir()
    monkeypatch.setenv('SYNTHKIT_MODELS', str(empty))


@pytest.fixture
def scans(tmp_path):
    """Two existing (empty) input files and a folder for outputs that must stay empty."""
    a, b = tmp_path / 'a.nii.gz', tmp_path / 'b.nii.gz'
    a.touch()
    b.touch()
    out = tmp_path / 'out'
    out.mkdir()
    return str(a), str(b), str(out)


def call(main, argv):
    """Exit status of ``main(argv)``."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


HELP = [
    (synthstrip.main, [], ['--image', '--out', '--mask', '--sdt', '--gpu', '--border',
                           '--threads', '--no-csf', '--model', '--fill', '--png']),
    (synthmorph.main, [], ['register', 'apply']),
    (synthmorph.main, ['register'], ['moving', 'fixed', '--model', 'joint', '--out-moving',
                                     '--out-fixed', '--trans', '--inverse', '--header-only',
                                     '--init', '--regularization', '--steps', '--extent',
                                     '--weights', '--threads', '--gpu', '--verbose']),
    (synthmorph.main, ['apply'], ['trans', '--method', 'nearest', '--type', '--fill',
                                  '--header-only']),
    (easyreg.main, [], ['--ref', '--flo', '--ref_seg', '--flo_seg', '--ref_reg', '--flo_reg',
                        '--fwd_field', '--bak_field', '--affine_only', '--threads']),
    (easywarp.main, [], ['--i', '--o', '--field', '--nearest', '--threads']),
    (synthsr.main, [], ['--i', '--o', '--ct', '--disable_sharpening', '--disable_flipping',
                        '--lowfield', '--v1', '--threads', '--cpu', '--model']),
]


@pytest.mark.parametrize('main, sub, flags', HELP)
def test_help_describes_the_tool(main, sub, flags, capsys):
    assert call(main, sub + ['--help']) == 0
    out = capsys.readouterr().out
    assert 'usage: mri_' in out
    for flag in flags:
        assert flag in out
    if main in (synthstrip.main, synthmorph.main, easyreg.main, easywarp.main, synthsr.main):
        assert 'not yet' not in out        # real pipelines with shipped models
    else:
        assert 'not yet' in out


#: tool -> (main, argv from two input paths and an output folder, model it asks for first)
RUNS = {
    'synthstrip': (synthstrip.main, lambda a, b, o: ['-i', a, '-m', o + '/mask.nii.gz'],
                   'synthstrip'),
    'synthmorph': (synthmorph.main, lambda a, b, o: ['register', a, b, '-t', o + '/t.nii.gz'],
                   'synthmorph_affine'),
    'easyreg': (easyreg.main, lambda a, b, o: ['--ref', a, '--flo', b,
                                               '--ref_seg', o + '/rs.nii.gz',
                                               '--flo_seg', o + '/fs.nii.gz',
                                               '--fwd_field', o + '/f.nii.gz'], 'synthseg'),
    'easywarp': (easywarp.main, lambda a, b, o: ['--i', a, '--field', b, '--o', o + '/w.nii'],
                 None),
    'synthsr': (synthsr.main, lambda a, b, o: ['--i', a, '--o', o + '/sr.nii.gz'], 'synthsr'),
}


@pytest.mark.parametrize('tool', TOOLS)
def test_missing_input_is_one_line(tool, scans, capsys):
    main, argv, _ = RUNS[tool]
    a, b, out = scans
    missing = os.path.join(out, 'nope.nii.gz')
    assert call(main, argv(missing, b, out)) == 1
    err = capsys.readouterr().err
    assert err == 'mri_%s: error: %s: file not found\n' % (tool, missing)
    assert os.listdir(out) == []


@pytest.mark.parametrize('tool', [t for t in TOOLS if RUNS[t][2]])   # mri_easywarp needs none
def test_no_model_refuses(tool, scans, capsys):
    main, argv, model = RUNS[tool]
    a, b, out = scans
    assert call(main, argv(a, b, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith('mri_%s: error: model not yet available: %s ' % (tool, model))
    assert err.count('\n') == 1
    assert os.listdir(out) == []


@pytest.mark.parametrize('tool, argv', [
    ('synthstrip', ['-o', 'x.nii']),                         # -i is required
    ('synthstrip', ['-i', 'x.nii']),                         # no output
    ('synthmorph', []),                                      # no subcommand
    ('synthmorph', ['register', 'a.nii', 'b.nii']),          # no output
    ('synthmorph', ['register', 'a', 'b', '-t', 't', '-H']),  # -H with a deformable model
    ('synthmorph', ['register', 'a', 'b', '-t', 't', '-r', '1.5']),
    ('synthmorph', ['register', 'a', 'b', '-t', 't', '-n', '3']),
    ('synthmorph', ['register', 'a', 'b', '-t', 't', '-e', '128']),
    ('synthmorph', ['register', 'a', 'b', '-t', 't', '-w', 'only_one.weights.h5']),
    ('synthmorph', ['apply', 't.lta', 'in.nii', 'out.nii', 'in2.nii']),  # odd pairs
    ('synthmorph', ['apply', 't.lta', 'in.nii', 'out.nii', '-t', 'notatype']),
    ('easyreg', ['--ref', 'a', '--ref_seg', 'b', '--flo_seg', 'c']),  # --flo is required
    ('easywarp', ['--i', 'a', '--o', 'b']),                  # --field is required
    ('synthsr', ['--i', 'a']),                               # --o is required
])
def test_bad_arguments_exit_2(tool, argv, capsys):
    main = RUNS[tool][0]
    assert call(main, argv) == 2
    assert 'mri_%s' % tool in capsys.readouterr().err


@pytest.mark.parametrize('model, needs', [('affine', 'synthmorph_affine'),
                                          ('deform', 'synthmorph_deform'),
                                          ('rigid', 'synthmorph_affine')])
def test_synthmorph_asks_for_the_model_of_its_type(model, needs, scans, capsys):
    a, b, out = scans
    trans = out + ('/t.nii.gz' if model == 'deform' else '/t.lta')
    assert call(synthmorph.main, ['register', a, b, '-m', model, '-t', trans]) == 1
    assert 'model not yet available: %s ' % needs in capsys.readouterr().err


def test_explicit_missing_weights_refuse(scans, capsys):
    a, b, out = scans
    weights = os.path.join(out, 'mine.weights.h5')
    assert call(synthstrip.main, ['-i', a, '-o', out + '/s.nii', '--model', weights]) == 1
    assert weights in capsys.readouterr().err
    assert os.listdir(out) == []


def test_synthmorph_apply_refuses_an_unreadable_transform(scans, capsys):
    # apply works without a model (tests/test_transforms.py); an empty file is no transform
    a, b, out = scans
    assert call(synthmorph.main, ['apply', a, b, out + '/moved.nii.gz']) == 1
    err = capsys.readouterr().err
    assert err.startswith('mri_synthmorph: error: %s: ' % a) and err.count('\n') == 1
    assert os.listdir(out) == []


def test_easyreg_with_segmentations_and_affine_only_needs_no_model(scans, capsys):
    a, b, out = scans
    argv = ['--ref', a, '--flo', a, '--ref_seg', b, '--flo_seg', b, '--affine_only',
            '--fwd_field', out + '/f.nii.gz']
    assert call(easyreg.main, argv) == 1       # no model asked for: the empty image is refused
    assert 'not a readable image' in capsys.readouterr().err
    assert os.listdir(out) == []


def test_scripts_run_from_the_shell(tmp_path):
    for tool in TOOLS:
        script = ROOT / 'bin' / ('mri_' + tool)
        assert os.access(script, os.X_OK), script
        assert script.read_text().startswith('#!/usr/bin/env python3\n')
    # Through the shebang, with this interpreter first on PATH and no PYTHONPATH: the script
    # must find the package from its own location.
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    done = subprocess.run([str(ROOT / 'bin' / 'mri_synthstrip'), '--help'], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '--no-csf' in done.stdout and 'signed distance' in done.stdout
