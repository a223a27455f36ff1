"""Cortical parcellation (mri_synthseg --parc): training data from aparc+aseg subjects, the
parcel field and its hemisphere swap under flips, the cortex split (labels, volumes,
posteriors), flip averaging with hemispheres swapped, and the command line end to end with tiny
random-weight networks."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from helpers import seeded
from synthkit import labels as lab
from synthkit import io, models, nets
from synthkit.models.synthparc import task as parctask
from synthkit.models.synthparc.inference import (Parcellator, label_cortex, output_labels,
                                                 parcel_volumes, split_cortex)
from synthkit.models.synthseg import cli as synthseg
from synthkit.task import TrainConfig

SIZE = 40
SEG_LABELS = lab.SEGMENTATION_LABELS


def _phantom(size=SIZE):
    """(aparc+aseg, T1) of a spherical head: WM hemispheres (2 / 41), a cortex shell cut into
    two parcels per hemisphere (front / back: bankssts and cuneus), an 'unknown' cortex patch
    (1000), scalp."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing='ij')) - (size - 1) / 2
    r = np.sqrt((grid ** 2).sum(0))
    left, front = grid[0] < 0, grid[1] > 0
    aparc = np.zeros((size,) * 3, np.int32)
    shell = (r >= 9) & (r < 12)
    aparc[shell & left & front] = 1001
    aparc[shell & left & ~front] = 1005
    aparc[shell & ~left & front] = 2001
    aparc[shell & ~left & ~front] = 2005
    aparc[shell & left & (grid[2] > 10)] = 1000
    aparc[(r < 9) & left] = 2
    aparc[(r < 9) & ~left] = 41
    t1 = np.zeros((size,) * 3, np.float32)
    t1[r < 9] = 110
    t1[shell] = 70
    t1[(r >= 12) & (r < 15)] = 40
    t1[(r >= 15) & (r < 18)] = 150
    return aparc, t1


def _subject(folder, name='sub-01'):
    aparc, t1 = _phantom()
    path = os.path.join(folder, name)
    os.makedirs(path)
    aff = np.diag([-1.0, -1, 1, 1])
    nib.save(nib.MGHImage(t1.astype(np.uint8), aff), os.path.join(path, 'T1.mgz'))
    nib.save(nib.MGHImage(aparc, aff), os.path.join(path, 'aparc+aseg.mgz'))
    return path


def test_parcel_field_extends_the_nearest_parcel_over_the_band():
    codes = np.zeros((30, 10, 10), np.uint8)
    codes[10, 5, 5] = 1
    codes[20, 5, 5] = 35
    field = parctask.parcel_field(codes, band_mm=3.0)
    assert field[12, 5, 5] == 1 and field[18, 5, 5] == 35     # nearest parcel
    assert field[13, 5, 5] == 1 and field[14, 5, 5] == 0      # 3 mm reach, 4 mm not
    assert field[10, 5, 8] == 1 and field[10, 5, 9] == 0


def test_fold_and_codes_of_an_aparc():
    aparc, _ = _phantom()
    folded = parctask.fold_cortex(aparc)
    assert set(np.unique(folded)) == {0, 2, 3, 41, 42}
    codes = parctask.parcel_codes(aparc)
    assert codes[aparc == 1001].min() == 1 and codes[aparc == 2001].min() == 35
    assert not codes[aparc == 1000].any() and not codes[aparc < 1000].any()
    assert (parctask.SWAP_CODES[parctask.SWAP_CODES] == np.arange(69)).all()
    assert lab.PARCEL_LABELS[parctask.SWAP_CODES[1] - 1] == 2001


@pytest.fixture(scope='module')
def parc_cfg(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('parc_data'))
    subject = _subject(folder)
    return TrainConfig(label_maps=[subject], val_maps=[subject], task='synthparc',
                       shape=(24, 24, 24), val_pairs=1, out_labels=parctask.CHANNEL_LABELS,
                       unet=nets.UNetConfig(in_channels=3, out_channels=69, features=4,
                                            levels=2, convs_per_level=1).to_dict(),
                       generator={'voxsize_mm': 2.0, 'translation_range_mm': (-2.0, 2.0)})


@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
def test_targets_keep_their_hemisphere_under_flips(parc_cfg, flip_prob):
    """Mirrored examples swap the hemispheres of the labels (the generator) and so must the
    parcel target: the parcels on the left cortex are left parcels; the front/back split
    follows the anatomy; the cortex masks are the deformed cortex of each side."""
    cfg = TrainConfig(**{**parc_cfg.__dict__,
                         'generator': {**parc_cfg.generator, 'flip_prob': flip_prob}})
    task = models.create(cfg)
    bank = task.make_bank(cfg.label_maps)
    sampler, rng = task.stream(0)
    for _ in range(2):
        x, (codes, cortex) = task.sample(sampler, bank, rng, 1)
        assert x.shape == (1, 24, 24, 24, 3) and codes.shape == cortex.shape == (1, 24, 24, 24)
        c = codes[0]
        lh = x[0, ..., 1] > 0.5
        rh = x[0, ..., 2] > 0.5
        assert lh.sum() > 50 and rh.sum() > 50
        assert np.mean((c[lh] >= 1) & (c[lh] <= 34)) > 0.8    # a swap would give ~0
        assert np.mean(c[rh] >= 35) > 0.8
        assert set(np.unique(c[cortex[0]])) <= {0, 1, 4, 35, 38}   # bankssts, cuneus codes
        assert np.mean(c[cortex[0]] > 0) > 0.9                      # 'unknown' is a patch
        assert task.score(np.eye(69, dtype=np.float32)[c][None], (codes, cortex)) > 0.99


def test_task_trains_and_scores(parc_cfg, tmp_path):
    from synthkit import trainer
    cfg = TrainConfig(**{**parc_cfg.__dict__, 'steps': 2, 'val_every': 2})
    run = str(tmp_path / 'run')
    trainer.Trainer(cfg, run, progress=False).run()
    card = trainer.export(run, str(tmp_path / 'synthparc'))
    assert card['task'] == 'synthparc' and card['output_labels'] == list(parctask.CHANNEL_LABELS)
    assert card['architecture']['in_channels'] == 3 and card['training']['steps'] == 2


def test_split_cortex_parcels_add_up_to_the_cortex():
    rng = np.random.default_rng(0)
    part = rng.random((6, 5, 4, len(SEG_LABELS))).astype(np.float32)
    part /= part.sum(-1, keepdims=True)
    q = rng.random((6, 5, 4, 69)).astype(np.float32)
    hard = np.asarray(SEG_LABELS)[np.argmax(part, -1)]
    hard[0] = 3
    hard[1] = 42
    before = hard.copy()
    split = split_cortex(part, SEG_LABELS, q)
    label_cortex(hard, np.eye(4), q, np.eye(4))      # the labels: the cortex voxels' parcels
    labels = output_labels(SEG_LABELS)
    assert split.shape[-1] == len(labels) == 99
    np.testing.assert_allclose(split.sum(-1), 1, atol=1e-5)
    lh = [labels.index(k) for k in lab.PARCEL_LABELS[:34]]
    np.testing.assert_allclose(split[..., lh].sum(-1), part[..., SEG_LABELS.index(3)], rtol=1e-5)
    assert np.isin(hard[0], lab.PARCEL_LABELS[:34]).all()
    assert np.isin(hard[1], lab.PARCEL_LABELS[34:]).all()
    assert hard[0, 0, 0] == lab.PARCEL_LABELS[np.argmax(q[0, 0, 0, 1:35])]
    assert not np.isin(hard, (3, 42)).any()
    other = ~np.isin(before, (3, 42))
    assert (hard[other] == before[other]).all()


def test_label_cortex_and_volumes_agree_with_the_split():
    """On one grid, labelling the cortex from the parcel posteriors at its voxels gives each
    voxel its hemisphere's most likely parcel; the soft parcel volumes add up to the cortex volume they are scaled to,
    in the split's proportions."""
    rng = np.random.default_rng(2)
    part = rng.random((6, 5, 4, len(SEG_LABELS))).astype(np.float32)
    part /= part.sum(-1, keepdims=True)
    q = rng.random((6, 5, 4, 69)).astype(np.float32)
    hard = np.asarray(SEG_LABELS)[np.argmax(part, -1)]
    hard[:2] = 3
    hard[2:4] = 42
    expected = hard.copy()
    for cortex, labels in ((3, lab.PARCEL_LABELS[:34]), (42, lab.PARCEL_LABELS[34:])):
        first = 1 + lab.PARCEL_LABELS.index(labels[0])
        best = np.asarray(labels)[np.argmax(q[..., first:first + 34], -1)]
        expected[hard == cortex] = best[hard == cortex]
    split = split_cortex(part, SEG_LABELS, q)
    labelled = hard.copy()
    label_cortex(labelled, np.eye(4), q, np.eye(4))
    assert (labelled == expected).all()
    # a coarser parcel grid: the voxel centres of 2 mm voxels land on every other 1 mm voxel
    coarse = np.diag([2.0, 2, 2, 1])
    labelled = hard.copy()
    label_cortex(labelled, np.eye(4), q, coarse)
    at = np.argmax(q[0, 0, 0, 1:35]) if hard[0, 0, 0] == 3 else None
    assert at is None or labelled[0, 0, 0] == lab.PARCEL_LABELS[at]
    assert not np.isin(labelled, (3, 42)).any()
    vols = parcel_volumes(part, SEG_LABELS, q, {3: 1000.0, 42: 500.0}, 8.0)
    assert sum(vols[k] for k in lab.PARCEL_LABELS[:34]) == pytest.approx(1000.0)
    assert sum(vols[k] for k in lab.PARCEL_LABELS[34:]) == pytest.approx(500.0)
    labels = output_labels(SEG_LABELS)
    soft = split[..., labels.index(1001)].sum() / split[..., [labels.index(k) for k in
                                                             lab.PARCEL_LABELS[:34]]].sum()
    assert vols[1001] / 1000.0 == pytest.approx(soft, rel=1e-4)


def _parc_model(folder, voxsize=1.0):
    cfg = nets.UNetConfig(in_channels=3, out_channels=69, features=4, levels=2,
                          convs_per_level=1)
    seeded(nets.unet(cfg), 5).save_weights(str(folder / 'synthparc.weights.h5'))
    card = {'task': 'synthparc', 'architecture': {'type': 'unet', **cfg.to_dict()},
            'output_labels': list(parctask.CHANNEL_LABELS),
            'input': {'voxsize_mm': voxsize, 'norm_statistics': 'image'},   # as exported
            'training': {'steps': 0}}
    (folder / 'synthparc.json').write_text(json.dumps(card))
    return str(folder / 'synthparc.weights.h5')


def test_flip_averaging_swaps_hemispheres(tmp_path):
    """The flip-averaged parcellation of the mirrored input (its cortex masks swapped) is the
    mirrored parcellation with the parcels of the two hemispheres swapped."""
    parc = Parcellator(_parc_model(tmp_path))
    rng = np.random.default_rng(1)
    image = rng.random((12, 10, 9)).astype(np.float32)     # padded to the network's divisor
    left, right = rng.random((2, 12, 10, 9)) > 0.7
    p = parc.posteriors(image, left, right)
    assert p.shape == (12, 10, 9, 69)
    m = parc.posteriors(np.flip(image, 0), np.flip(right, 0), np.flip(left, 0))
    swap = lab.lr_swap_table(parctask.CHANNEL_LABELS)
    np.testing.assert_allclose(np.flip(m, 0)[..., swap], p, atol=1e-5)


def _models(folder, voxsize=1.0):
    """Tiny synthseg and parcellation networks (``voxsize`` mm) with their cards in
    ``folder``."""
    cfg = nets.UNetConfig(features=4, levels=2, convs_per_level=1)
    seeded(nets.unet(cfg), 3).save_weights(str(folder / 'synthseg.weights.h5'))
    card = {'task': 'synthseg', 'architecture': {'type': 'unet', **cfg.to_dict()},
            'output_labels': list(SEG_LABELS), 'input': {'voxsize_mm': voxsize},
            'training': {'steps': 0}}
    (folder / 'synthseg.json').write_text(json.dumps(card))
    _parc_model(folder, voxsize)
    return folder


@pytest.mark.parametrize('voxsize', [1.0, 2.0])     # 2 mm: two network grids, averaged
def test_synthseg_parc_end_to_end(tmp_path, monkeypatch, capsys, voxsize):
    os.makedirs(tmp_path / 'models')
    monkeypatch.setenv('SYNTHKIT_MODELS', str(_models(tmp_path / 'models', voxsize)))
    _, t1 = _phantom()
    nib.save(nib.Nifti1Image(t1, np.diag([-1.0, 1, 1, 1])), str(tmp_path / 'scan.nii.gz'))
    out, vol, post = (str(tmp_path / n) for n in ('seg.mgz', 'vol.csv', 'post.nii.gz'))
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', out, '--parc', '--vol', vol,
                       '--post', post, '--png'])
    assert e.value.code == 0
    seg = np.asarray(nib.load(out).dataobj)
    allowed = set(SEG_LABELS) - {3, 42} | set(lab.PARCEL_LABELS)
    assert set(np.unique(seg).tolist()) <= allowed
    lut = io.load_lut(out)                         # the embedded colour table has the parcels
    assert lut[1035] == ('ctx-lh-insula', (255, 192, 32)) and lut[2001][0] == 'ctx-rh-bankssts'
    rows = list(csv.reader(open(vol)))
    header, values = rows[0], dict(zip(rows[0], rows[1]))
    assert header[-68:] == [lab.name(k) for k in lab.PARCEL_LABELS]
    left = sum(float(values[lab.name(k)]) for k in lab.PARCEL_LABELS[:34])
    assert left == pytest.approx(float(values['left cerebral cortex']), rel=1e-3, abs=0.01)
    structures = sum(float(values[lab.SYNTHSEG_NAMES[k]]) for k in SEG_LABELS if k)
    assert float(values['total intracranial']) == pytest.approx(structures, rel=1e-4)
    p = nib.load(post)
    assert p.shape[-1] == 99
    np.testing.assert_allclose(np.asarray(p.dataobj).sum(-1), 1, atol=1e-4)
    assert os.path.exists(str(tmp_path / 'seg.png'))


def test_parc_refused_without_its_model(tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'models'
    os.makedirs(folder)
    _models(folder)
    os.remove(folder / 'synthparc.json')
    monkeypatch.setenv('SYNTHKIT_MODELS', str(folder))
    _, t1 = _phantom()
    nib.save(nib.Nifti1Image(t1, np.eye(4)), str(tmp_path / 'scan.nii.gz'))
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(tmp_path / 's.mgz'),
                       '--parc'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and '--parc: model not yet available' in err
    assert not os.path.exists(tmp_path / 's.mgz')
    with pytest.raises(SystemExit) as e:
        synthseg.main(['--i', str(tmp_path / 'scan.nii.gz'), '--o', str(tmp_path / 's.mgz'),
                       '--parc_model', str(folder / 'synthparc.weights.h5')])
    assert e.value.code == 1 and '--parc_model needs --parc' in capsys.readouterr().err


def test_trilinear_gather_matches_map_coordinates_channel_by_channel():
    from scipy import ndimage
    from synthkit.models.synthparc.inference import _trilinear
    rng = np.random.default_rng(3)
    q = rng.random((5, 6, 4, 3)).astype(np.float32)
    # inside, on the edges and beyond them (clamped, as mode='nearest')
    points = rng.uniform(-1.5, 7, size=(3, 200))
    points[:, :3] = [[0, 4, 4], [0, 5, 5], [0, 3, 3]]
    got = _trilinear(q, points)
    want = np.stack([ndimage.map_coordinates(q[..., c], points, order=1, mode='nearest')
                     for c in range(q.shape[-1])], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    flat = np.ones((1, 3, 2, 2), np.float16)        # a one-voxel-thick axis
    np.testing.assert_allclose(_trilinear(flat, np.array([[0.4], [1.2], [0.5]])), 1.0)
