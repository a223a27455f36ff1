"""synthkit-batch: a study on a LocalCluster of 2 worker processes, tiny random-weight models.

One cluster serves the module (workers load TensorFlow once); each test makes its own study of
small phantoms. Checked: every output and the study files written, a corrupt scan reported
while the others finish, a second run skipping everything, re-runs recomputing exactly the
scans whose outputs, input or options changed, a worker dying on a scan (retried once, then
reported), BIDS and list layouts, and the SLURM job script of --dry-run.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import nibabel as nib
import numpy as np
import pytest

from helpers import seeded
from synthkit import io, nets
from synthkit import labels as lab
from synthkit.batch import cli, cluster, engine, scans, tools
from synthkit.cli import common

ROOT = Path(__file__).resolve().parents[1]

# the crash-test tool below is defined here: workers get it by value, not by importing this file
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('models')
    seg = nets.UNetConfig(features=4, levels=2, convs_per_level=1)
    seeded(nets.unet(seg), 1).save_weights(str(folder / 'synthseg.weights.h5'))
    (folder / 'synthseg.json').write_text(json.dumps({
        'task': 'synthseg', 'architecture': {'type': 'unet', **seg.to_dict()},
        'output_labels': list(lab.SEGMENTATION_LABELS), 'input': {'voxsize_mm': 2.0}}))
    strip = nets.UNetConfig(out_channels=1, final_activation='linear', features=4, levels=2,
                            convs_per_level=1)
    seeded(nets.unet(strip), 2).save_weights(str(folder / 'synthstrip.weights.h5'))
    (folder / 'synthstrip.json').write_text(json.dumps({
        'task': 'synthstrip', 'architecture': {'type': 'unet', **strip.to_dict()},
        'input': {'voxsize_mm': 2.0}, 'target': {'band_mm': 8.0}}))
    seeded(nets.unet(strip), 3).save_weights(str(folder / 'synthsr.weights.h5'))
    (folder / 'synthsr.json').write_text(json.dumps({
        'task': 'synthsr', 'architecture': {'type': 'unet', **strip.to_dict()},
        'input': {'voxsize_mm': 1.0}}))
    return folder


@pytest.fixture(scope='module')
def client(model_dir):
    """A LocalCluster of 2 worker processes, 1 thread each, made as synthkit-batch makes it."""
    from distributed import Client
    mp = pytest.MonkeyPatch()
    mp.setenv('SYNTHKIT_MODELS', str(model_dir))      # the spawned workers inherit it
    cluster.configure()
    local = cluster.local_cluster(workers=2, threads_per_worker=1, memory='3GB')
    c = Client(local)
    yield c
    c.close()
    local.close()
    mp.undo()


@pytest.fixture(autouse=True)
def models_env(model_dir, monkeypatch):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(model_dir))


def _phantom(path, seed=0, shape=(36, 40, 32)):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    rng = np.random.default_rng(seed)
    data = np.where((grid ** 2).sum(0) < 0.5 + 0.05 * seed, 100.0, 8.0) + rng.normal(0, 2, shape)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return str(path)


def _study(folder, n=4, corrupt=True):
    for i in range(n):
        _phantom(os.path.join(folder, 'scan%d.nii.gz' % i), i)
    if corrupt:
        with open(os.path.join(folder, 'broken.nii.gz'), 'wb') as f:
            f.write(b'\x1f\x8b not really gzip')
    return folder


def _rows(path):
    with open(path) as f:
        return list(csv.reader(f))


def _stat(folder):
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}


def _hidden(folder):
    return [n for _, _, names in os.walk(folder) for n in names if n.startswith('.')]


def test_synthseg_study_then_rerun_skips_everything(client, tmp):
    study, out = _study(os.path.join(tmp, 'study')), os.path.join(tmp, 'out')
    before = {n: open(os.path.join(study, n), 'rb').read() for n in os.listdir(study)}
    s = engine.run('mri_synthseg', study, out, client=client, vol=True)
    assert (s.computed, s.skipped, s.failed) == (4, 0, 1)
    assert s.failures[0][0] == 'broken' and 'broken.nii.gz' in s.failures[0][2]
    for i in range(4):
        for suffix in ('_synthseg.nii.gz', '_synthseg.png', '_synthseg_vol.csv', '_synthseg.json'):
            assert os.path.getsize(os.path.join(out, 'scan%d%s' % (i, suffix))) > 0
        seg = io.load_volume(os.path.join(out, 'scan%d_synthseg.nii.gz' % i))
        assert set(np.unique(seg.data)) <= set(lab.SEGMENTATION_LABELS)
    assert not [n for n in os.listdir(out) if n.startswith('broken')]   # nothing of the failure
    vols = _rows(os.path.join(out, 'synthseg_volumes.csv'))
    assert [r[0] for r in vols[1:]] == ['scan0', 'scan1', 'scan2', 'scan3']
    assert vols[0][:2] == ['subject', 'total intracranial'] and len(vols[0]) == 2 + 32
    # the merged row is the per-scan CSV's row
    assert _rows(os.path.join(out, 'scan2_synthseg_vol.csv'))[1] == vols[3]
    assert len(_rows(os.path.join(out, 'synthseg_qc.csv'))) == 5
    fails = _rows(os.path.join(out, 'failures.csv'))
    assert fails[0] == ['subject', 'input', 'error'] and [f[0] for f in fails[1:]] == ['broken']
    page = open(os.path.join(out, 'synthseg_report.html')).read()
    assert page.count('<img') == 4 and 'scan3_synthseg.png' in page and 'broken' in page
    assert {n: open(os.path.join(study, n), 'rb').read() for n in os.listdir(study)} == before

    stamps = _stat(out)
    again = engine.run('mri_synthseg', study, out, client=client, vol=True)
    assert (again.computed, again.skipped, again.failed) == (0, 4, 1)
    changed = [n for n, t in _stat(out).items() if stamps.get(n) != t]
    assert all(n.startswith('synthseg_') or n == 'failures.csv' for n in changed), changed
    assert _rows(os.path.join(out, 'synthseg_volumes.csv')) == vols
    assert not _hidden(out)


def test_rerun_recomputes_only_what_changed(client, tmp):
    study, out = _study(os.path.join(tmp, 'study'), corrupt=False), os.path.join(tmp, 'out')
    engine.run('mri_synthstrip', study, out, client=client)
    os.remove(os.path.join(out, 'scan0_synthstrip.json'))              # killed before its sidecar
    with open(os.path.join(out, 'scan1_brainmask.nii.gz'), 'r+b') as f:  # a truncated output
        f.truncate(100)
    _phantom(os.path.join(study, 'scan2.nii.gz'), 7)                   # a new input
    s = engine.run('mri_synthstrip', study, out, client=client)
    assert (s.computed, s.skipped, s.failed) == (3, 1, 0)
    assert io.load_volume(os.path.join(out, 'scan1_brainmask.nii.gz')).shape3 == (36, 40, 32)
    # other options: every scan again; --force too
    assert engine.run('mri_synthstrip', study, out, client=client, border=2.0).computed == 4
    assert engine.run('mri_synthstrip', study, out, client=client, border=2.0,
                      force=True).computed == 4
    table = _rows(os.path.join(out, 'synthstrip_volumes.csv'))
    assert len(table) == 5 and all(float(r[1]) >= 0 for r in table[1:])


def test_synthseg_parc_study_has_parcel_labels_and_columns(client, tmp):
    """--parc over a study (its model given with --parc_model): parcel labels instead of the
    cortex, the study CSV gains the 68 parcel columns; a rerun without --parc is other work."""
    folder = os.path.join(tmp, 'parc_model')
    os.makedirs(folder)
    cfg = nets.UNetConfig(in_channels=3, out_channels=69, features=4, levels=2,
                          convs_per_level=1)
    weights = os.path.join(folder, 'synthparc.weights.h5')
    seeded(nets.unet(cfg), 4).save_weights(weights)
    with open(os.path.join(folder, 'synthparc.json'), 'w') as f:
        json.dump({'task': 'synthparc', 'architecture': {'type': 'unet', **cfg.to_dict()},
                   'output_labels': [0] + list(lab.PARCEL_LABELS),
                   'input': {'voxsize_mm': 2.0, 'norm_statistics': 'image'}}, f)
    study, out = _study(os.path.join(tmp, 'study'), n=2, corrupt=False), os.path.join(tmp, 'out')
    s = engine.run('mri_synthseg', study, out, client=client, parc=True, parc_model=weights)
    assert (s.computed, s.failed) == (2, 0)
    for i in range(2):
        seg = np.asarray(nib.load(os.path.join(out, 'scan%d_synthseg.nii.gz' % i)).dataobj)
        # (nibabel: io.load_volume would make the output an input this process never overwrites)
        assert set(np.unique(seg)) <= set(lab.SEGMENTATION_LABELS) - {3, 42} | set(
            lab.PARCEL_LABELS)
    vols = _rows(os.path.join(out, 'synthseg_volumes.csv'))
    assert len(vols[0]) == 2 + 32 + 68 and vols[0][-1] == 'ctx-rh-insula'
    assert engine.run('mri_synthseg', study, out, client=client).computed == 2


def test_synthsr_study_writes_1mm_images_and_goes_past_a_bad_file(client, tmp):
    study, out = _study(os.path.join(tmp, 'study'), n=2), os.path.join(tmp, 'out')
    s = engine.run('mri_synthsr', study, out, client=client)
    assert (s.computed, s.skipped, s.failed) == (2, 0, 1)
    for i in range(2):
        img = io.load_volume(os.path.join(out, 'scan%d_synthsr.nii.gz' % i))
        assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), 1.0)   # 2 mm in, 1 mm out
        assert min(img.shape3) >= 64 and np.isfinite(img.data).all()
        assert os.path.getsize(os.path.join(out, 'scan%d_synthsr.png' % i)) > 0
    again = engine.run('mri_synthsr', study, out, client=client, disable_sharpening=True)
    assert again.computed == 2                         # another option: every scan again
    with pytest.raises(common.ToolError, match='--lowfield: model not yet available'):
        tools.get('mri_synthsr', lowfield=True)


class CrashTool(tools.Tool):
    """Writes a tiny image per scan; the worker process dies on scans named ``crash*``, and on
    ``flaky*`` only the first time (a marker file beside the output remembers it)."""
    name, short = 'crashtest', 'crashtest'

    def outputs(self, scan):
        return {'out': scan.output('_crashtest', 'crashtest', 'dseg')}

    def load(self):
        return 'model'

    def process(self, model, scan, outputs):
        marker = outputs['out'] + '.tried'
        if scan.id.startswith('crash') or (scan.id.startswith('flaky')
                                           and not os.path.exists(marker)):
            open(marker, 'w').close()
            os._exit(1)
        io.save_volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), outputs['out'])
        return {'pid': os.getpid()}


def test_a_dying_worker_gets_one_retry_then_the_scan_is_reported(client, tmp):
    study, out = os.path.join(tmp, 'study'), os.path.join(tmp, 'out')
    for name in ('crash', 'flaky', 'good'):
        _phantom(os.path.join(study, name + '.nii.gz'))
    s = engine.run(CrashTool(), study, out, client=client)
    assert [f[0] for f in s.failures] == ['crash']
    assert 'worker died twice' in s.failures[0][2]
    assert sorted(r['scan'] for r in s.records) == ['flaky', 'good']
    assert not os.path.exists(os.path.join(out, 'crash_crashtest.nii.gz'))
    # the nannies restart the three dead workers for the module's later tests; on a loaded
    # machine (trainings beside the suite) a restart took over 60 s: wait as long as it takes
    # (this returns as soon as both are back)
    client.wait_for_workers(2, timeout=600)


def test_bids_dataset_goes_to_a_derivatives_tree(client, tmp):
    bids, out = os.path.join(tmp, 'bids'), os.path.join(tmp, 'deriv')
    with open(os.path.join(_phantom(os.path.join(bids, 'sub-01', 'anat', 'sub-01_T1w.nii.gz'))
                           .rsplit('/sub-01/', 1)[0], 'dataset_description.json'), 'w') as f:
        json.dump({'Name': 'test', 'BIDSVersion': '1.9.0'}, f)
    _phantom(os.path.join(bids, 'sub-02', 'ses-a', 'anat', 'sub-02_ses-a_T1w.nii.gz'), 1)
    _phantom(os.path.join(bids, 'sub-02', 'ses-a', 'anat', 'sub-02_ses-a_T2w.nii.gz'), 2)
    s = engine.run('mri_synthseg', bids, out, client=client, fast=True)
    assert (s.computed, s.failed) == (2, 0)
    root = os.path.join(out, 'synthkit')
    assert os.path.isfile(os.path.join(root, 'sub-01', 'anat', 'sub-01_desc-synthseg_dseg.nii.gz'))
    assert os.path.isfile(os.path.join(root, 'sub-02', 'ses-a', 'anat',
                                       'sub-02_ses-a_desc-synthseg_dseg.json'))
    assert json.load(open(os.path.join(root, 'dataset_description.json')))['DatasetType'] \
        == 'derivative'
    assert [r[0] for r in _rows(os.path.join(root, 'synthseg_volumes.csv'))[1:]] == \
        ['sub-01_T1w', 'sub-02_ses-a_T1w']
    t2 = scans.find_scans(bids, out, bids_suffix='T2w')
    assert [os.path.basename(t2[0].output('_synthseg', 'synthseg', 'dseg'))] == \
        ['sub-02_ses-a_desc-synthsegT2w_dseg.nii.gz']


def test_a_list_with_equal_names_mirrors_the_folders(tmp):
    a = _phantom(os.path.join(tmp, 'data', 'subj1', 'T1.nii.gz'))
    b = _phantom(os.path.join(tmp, 'data', 'subj2', 'T1.nii.gz'))
    listing = os.path.join(tmp, 'list.txt')
    with open(listing, 'w') as f:
        f.write('%s\n\n%s\n' % (a, b))
    found = scans.find_scans(listing, os.path.join(tmp, 'out'))
    assert [s.id for s in found] == ['subj1/T1', 'subj2/T1']
    assert found[1].output('_synthseg', 'synthseg', 'dseg') == \
        os.path.join(tmp, 'out', 'subj2', 'T1_synthseg.nii.gz')
    with pytest.raises(ValueError, match='share the outputs'):
        scans.find_scans([a, a], os.path.join(tmp, 'out'))


def test_outputs_are_checked_before_any_work(tmp):
    x = _phantom(os.path.join(tmp, 'in', 'x.nii.gz'))
    y = _phantom(os.path.join(tmp, 'in', 'x_synthseg.nii.gz'))
    with pytest.raises(Exception, match='also an input'):       # x's result would replace y
        engine.plan(tools.get('mri_synthseg'), [x, y], os.path.join(tmp, 'in'))
    blocker = os.path.join(tmp, 'file')
    open(blocker, 'w').close()
    with pytest.raises(Exception, match='cannot create output directory'):
        engine.plan(tools.get('mri_synthseg'), [x], os.path.join(blocker, 'out'))
    assert sorted(os.listdir(os.path.join(tmp, 'in'))) == ['x.nii.gz', 'x_synthseg.nii.gz']


def test_dry_run_prints_the_slurm_job_script(tmp, capsys):
    study = _study(os.path.join(tmp, 'study'), n=2, corrupt=False)
    with pytest.raises(SystemExit) as e:
        cli.main(['mri_synthseg', '--i', study, '--o', os.path.join(tmp, 'out'), '--scheduler',
                  'slurm', '--workers', '8', '--threads-per-worker', '2', '--memory', '6GB',
                  '--queue', 'short', '--walltime', '01:30:00', '--account', 'lab',
                  '--job-extra=--constraint=avx2', '--dry-run', '--fast'])
    assert e.value.code == 0
    script = capsys.readouterr().out
    for line in ('#SBATCH -p short', '#SBATCH --cpus-per-task=2', '#SBATCH --mem=6G',
                 '#SBATCH -t 01:30:00', '#SBATCH -A lab', '#SBATCH --constraint=avx2',
                 'export OMP_NUM_THREADS=2', '--resources scan=1', '--nthreads 2'):
        assert line in script, line
    assert '8 slurm job(s)' in script and '2 to do' in script
    assert not os.path.exists(os.path.join(tmp, 'out'))          # a dry run creates nothing


@pytest.mark.parametrize('argv, message', [
    (['mri_synthseg', '--parc'], '--parc: model not yet available'),
    (['mri_synthstrip', '--no-image', '--no-mask'], 'leave nothing to write'),
    (['mri_synthseg', '--scheduler', 'tcp://127.0.0.1:9'], 'cannot reach the Dask scheduler'),
])
def test_refusals_are_one_line(tmp, capsys, argv, message):
    import dask
    import distributed  # noqa: F401  (its defaults first: the set() below would undo them)
    study = _study(os.path.join(tmp, 'study'), n=1, corrupt=False)
    with pytest.raises(SystemExit) as e, \
            dask.config.set({'distributed.comm.timeouts.connect': '2s'}):
        cli.main(argv[:1] + ['--i', study, '--o', os.path.join(tmp, 'out')] + argv[1:])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and message in err[0], err


def test_command_line_end_to_end(tmp):
    """The installed command, as a user runs it: exit 1 for the corrupt scan, one line each."""
    study, out = _study(os.path.join(tmp, 'study'), n=2), os.path.join(tmp, 'out')
    cmd = [sys.executable, str(ROOT / 'bin' / 'synthkit-batch'), 'mri_synthstrip', '--i', study,
           '--o', out, '--workers', '1', '--sdt', '--no-progress']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert 'error: %s' % os.path.join(study, 'broken.nii.gz') in p.stderr
    assert '1 of 3 scan(s) failed' in p.stderr
    for i in range(2):
        for suffix in ('_synthstrip.nii.gz', '_brainmask.nii.gz', '_sdt.nii.gz',
                       '_synthstrip.png', '_synthstrip.json'):
            assert os.path.isfile(os.path.join(out, 'scan%d%s' % (i, suffix)))
    assert _rows(os.path.join(out, 'failures.csv'))[1][0] == 'broken'
