"""mri_synthstrip: mask extraction, the command line with a tiny model, and the distance task."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from helpers import seeded
from synthkit import models, nets
from synthkit.models.synthstrip import inference as strip_inference
from synthkit.models.synthstrip import task as strip_task
from synthkit.models.synthstrip import cli as synthstrip


@pytest.fixture(scope='module')
def strip_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp('models')
    cfg = nets.UNetConfig(out_channels=1, final_activation='linear', features=4, levels=2,
                          convs_per_level=1)
    seeded(nets.unet(cfg), 4).save_weights(str(folder / 'synthstrip.weights.h5'))
    card = {'task': 'synthstrip', 'architecture': {'type': 'unet', **cfg.to_dict()},
            'input': {'voxsize_mm': 2.0},
            'target': {'csf': True, 'band_mm': 8.0}, 'training': {'steps': 0}}
    (folder / 'synthstrip.json').write_text(json.dumps(card))
    return folder


def _head(path, frames=1):
    shape = (30, 32, 28)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    r = np.sqrt((grid ** 2).sum(0))
    data = np.where(r < 0.6, 80.0, np.where(r < 0.8, 30.0, 0.0)).astype(np.float32)
    if frames > 1:
        data = np.stack([data * (f + 1) for f in range(frames)], -1)
    affine = np.diag([1.1, 1.0, 1.3, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


def test_brain_mask_keeps_largest_component_and_fills_holes():
    sdt = np.full((30, 30, 30), 5.0, np.float32)
    sdt[5:20, 5:20, 5:20] = -3          # the brain
    sdt[10:13, 10:13, 10:13] = 4        # a hole inside it
    sdt[25:28, 25:28, 25:28] = -3       # an island
    mask = strip_inference.brain_mask(sdt, border=1)
    assert mask[11, 11, 11] and not mask[26, 26, 26] and mask.sum() == 15 ** 3


def test_border_moves_the_boundary():
    sdt = np.linspace(-5, 5, 11)[:, None, None] * np.ones((11, 3, 3))
    assert strip_inference.brain_mask(sdt, 1).sum() < strip_inference.brain_mask(sdt, 3).sum()


def test_cli_outputs_on_input_grid(tmp_path, strip_models, monkeypatch, capsys):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(strip_models))
    data, affine = _head(tmp_path / 'head.nii.gz')
    with pytest.raises(SystemExit) as e:
        synthstrip.main(['-i', str(tmp_path / 'head.nii.gz'), '-o', str(tmp_path / 'b.nii.gz'),
                         '-m', str(tmp_path / 'm.mgz'), '-d', str(tmp_path / 'd.nii.gz'),
                         '--fill', '-1', '--png'])
    assert e.value.code == 0, capsys.readouterr().err
    out, mask, sdt = (nib.load(str(tmp_path / n)) for n in ('b.nii.gz', 'm.mgz', 'd.nii.gz'))
    for img in (out, mask, sdt):
        assert img.shape == data.shape and np.allclose(img.affine, affine, atol=1e-4)
    m = np.asarray(mask.dataobj).astype(bool)
    o = np.asarray(out.dataobj)
    assert np.all(o[~m] == -1) and np.allclose(o[m], data[m])   # stripped = input inside
    d = np.asarray(sdt.dataobj)
    assert np.array_equal(m, strip_inference.brain_mask(d, 1.0))     # mask = sdt < border, cleaned
    assert os.path.exists(tmp_path / 'b.png')


def test_cli_multiframe_is_stripped_frame_by_frame(tmp_path, strip_models, monkeypatch):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(strip_models))
    data, _ = _head(tmp_path / 'head.nii.gz', frames=2)
    with pytest.raises(SystemExit) as e:
        synthstrip.main(['-i', str(tmp_path / 'head.nii.gz'), '-m', str(tmp_path / 'm.nii.gz')])
    assert e.value.code == 0
    assert nib.load(str(tmp_path / 'm.nii.gz')).shape == data.shape


def test_cli_no_csf_needs_its_own_model(tmp_path, strip_models, monkeypatch, capsys):
    monkeypatch.setenv('SYNTHKIT_MODELS', str(strip_models))
    _head(tmp_path / 'head.nii.gz')
    with pytest.raises(SystemExit) as e:
        synthstrip.main(['-i', str(tmp_path / 'head.nii.gz'), '-m', str(tmp_path / 'm.nii.gz'),
                         '--no-csf'])
    assert e.value.code == 1 and 'synthstrip_nocsf' in capsys.readouterr().err


def test_distance_task_targets_and_score():
    cfg = models.preset('synthstrip', ['a', 'b', 'c'])
    task = strip_task.DistanceTask(cfg)
    labels = np.zeros((1, 20, 20, 20, 1), np.int32)
    labels[0, 5:15, 5:15, 5:15] = 3                     # cortex: brain
    labels[0, 2:5, 5:15, 5:15] = 507                    # skull-ish: not brain
    t = task.target(labels)
    assert t.shape == labels.shape and t[0, 10, 10, 10, 0] < 0 < t[0, 3, 10, 10, 0]
    assert np.abs(t).max() <= 2 * task.band              # clipped to twice the loss band
    assert task.score(t, t) == 1.0
    assert task.score(-t, t) == 0.0
    loss = strip_task.BandMSELoss(task.band)
    assert float(np.mean(np.asarray(loss(t, t)))) == 0.0
    assert float(np.mean(np.asarray(loss(t, t + 2)))) == pytest.approx(4.0, rel=1e-3)
